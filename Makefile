# The two set-up commands of the README:
#   make demo   -- install, then run DiffMix end to end on the shipped real CoNSeP sample with the shipped SDM (CPU)
#   make test   -- install, then run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_DIR ?= runs/demo
# Installed only when torch is missing or older than the supported 2.1: pinned, because an unpinned
# torch spec can resolve to a CUDA build with gigabytes of CUDA packages. A GPU user's own torch
# (2.1 or newer, any CUDA build) is left as it is. Extra pip arguments for it: TORCH_PIP_ARGS.
TORCH_CPU ?= torch==2.13.0
TORCH_PIP_ARGS ?=

.PHONY: install install-torch demo test

install-torch:
	@if $(PYTHON) -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 1))" 2>/dev/null; then \
		$(PYTHON) -c "import torch; print('keeping the installed torch', torch.__version__)"; \
	else \
		echo "installing $(TORCH_CPU) (no supported torch found)"; \
		$(PIP) install -q "$(TORCH_CPU)" $(TORCH_PIP_ARGS); \
	fi

install: install-torch
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .

demo: install
	$(PYTHON) scripts/demo.py --out_dir $(DEMO_DIR)

test: install
	$(PYTHON) -m pytest -q tests
