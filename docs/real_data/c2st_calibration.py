"""Analysis of docs/REAL_DATA.md section 0i (a record, not part of the tool): what the evidence's C2ST
critic detects. The real source crops of one synthesis run are tested against changed copies of
themselves (a Gaussian blur of sigma px, a JPEG re-encoding at the sources' quality 75) and against the
run's synthetic patches (as written, and re-encoded as JPEG), with the evidence's own critic, folds and
steps; beside each, the power per octave (synthetic / real, metrics.spectrum).

Usage (repository root): python docs/real_data/c2st_calibration.py RUN_DIR OUT_JSON [critic seeds, default 0,1]
"""

import io
import json
import sys

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from guided_diffusion.data.classes import load_class_table
from guided_diffusion.downstream.nuclei.classifier import ClassifierConfig
from guided_diffusion.downstream.nuclei.crops import read_run
from guided_diffusion.downstream.nuclei.evidence import c2st, tile_of
from guided_diffusion.metrics.spectrum import octave_power_ratio


def jpeg(images, quality=75):
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=quality)
        out.append(np.array(Image.open(buf)))
    return np.stack(out)


def blur(images, sigma):
    smooth = [gaussian_filter(im.astype(np.float64), (sigma, sigma, 0)) for im in images]
    return np.clip(np.rint(np.stack(smooth)), 0, 255).astype(np.uint8)


torch.set_num_threads(1)
run_dir, out_json = sys.argv[1], sys.argv[2]
seeds = [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0,1").split(",")]
run = read_run(run_dir, load_class_table("datasets/consep_merged.json"), progress=False)
real = np.stack(run.real)
synthetic = np.stack([s.image for s in run.samples])
groups = [tile_of(src) for src in run.sources]
variants = {"synthetic": synthetic, "synthetic, JPEG q75": jpeg(synthetic), "real, JPEG q75 again": jpeg(real)}
for sigma in (0.3, 0.4, 0.5):
    variants[f"real, blur {sigma} px"] = blur(real, sigma)
variants["real, blur 0.5 px, JPEG q75"] = jpeg(blur(real, 0.5))
result = {"run": run_dir, "n_real": len(real), "seeds": seeds, "variants": {}}
for name, images in variants.items():
    row = {"power_ratio": octave_power_ratio(real, images)}
    for seed in seeds:  # the evidence's critic (nucleus_evidence.py: 3 tile-grouped folds, 500 steps here)
        critic = ClassifierConfig(width=8, stem_stride=2, steps=500, batch_size=32, jitter=0.0, seed=seed)
        row[f"c2st_seed{seed}"] = c2st(real, images, groups, groups, critic, 3, seed)["accuracy"]
    result["variants"][name] = row
    print(name, json.dumps(row), flush=True)
with open(out_json, "w") as f:
    json.dump(result, f, indent=1)
