# The two set-up commands of the README:
#   make demo   -- install, then run DiffMix end to end on the built-in toy dataset (CPU is fine)
#   make test   -- install, then run the test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_DIR ?= runs/demo

.PHONY: install demo test

install:
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -e .

demo: install
	$(PYTHON) scripts/demo.py --out_dir $(DEMO_DIR)

test: install
	$(PYTHON) -m pytest -q tests
