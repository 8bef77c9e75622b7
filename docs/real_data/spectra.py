"""Analysis of docs/REAL_DATA.md section 0i (a record, not part of the tool): the power per octave of
spatial frequency (synthetic / real source crops, metrics.spectrum) of finished synthesis runs, as
nucleus_evidence.py reports it for one run.

Usage (repository root): python docs/real_data/spectra.py OUT_JSON RUN_DIR [RUN_DIR ...]
"""

import json
import os
import sys

import numpy as np

from guided_diffusion.data.classes import load_class_table
from guided_diffusion.downstream.nuclei.crops import read_run
from guided_diffusion.metrics.spectrum import octave_power_ratio

table = load_class_table("datasets/consep_merged.json")
runs = {}
for run_dir in sys.argv[2:]:
    run = read_run(run_dir, table, progress=False)
    name = os.path.basename(run_dir.rstrip("/"))
    runs[name] = octave_power_ratio(np.stack(run.real), np.stack([s.image for s in run.samples]))
    print(name, [round(r, 2) for r in runs[name]["ratio"]], flush=True)
with open(sys.argv[1], "w") as f:
    json.dump({"command": "python docs/real_data/spectra.py " + " ".join(sys.argv[1:]), "runs": runs}, f, indent=1)
