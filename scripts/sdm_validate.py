"""Validation loss of SDM checkpoints: one-call denoising of held-out patches at fixed timesteps.

Example (the shipped CPU model against a new run's checkpoints, on consep256's held-out tiles):

    python scripts/sdm_validate.py --data_dir ../shared/data/consep256 --dataset_mode custom \\
        --class_table datasets/consep_merged.json \\
        --model_paths models/consep256_cpu/model.safetensors,runs/sdm/new/ema_0.995_000600.pt \\
        --timesteps 10,50,200,340,540 --out_json runs/validate.json

For each checkpoint (a file, or a training run folder: its newest complete EMA checkpoint) and each
timestep: the epsilon MSE and the PSNR of the one-call x_0 prediction over every grid patch of the
split (guided_diffusion.metrics.denoising). Every checkpoint sees the same patches and the same
noise, so the numbers compare recipes directly. A checkpoint trained with --t_max below a
requested timestep is scored there too (its row says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from guided_diffusion.infra.config import add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from guided_diffusion.metrics.denoising import DenoisingConfig

    add_dataclass_args(p, DenoisingConfig)
    cfg = dataclass_from_args(DenoisingConfig, p.parse_args(argv))
    paths, timesteps = cfg.resolve()

    import numpy as np
    import torch

    from guided_diffusion.infra import fileio
    from guided_diffusion.infra.config import ModelConfig, load_config_for_checkpoint
    from guided_diffusion.data import build_condition
    from guided_diffusion.data.condition import image_to_tensor
    from guided_diffusion.data.patches import sampling_patches
    from guided_diffusion.metrics.denoising import denoising_scores
    from guided_diffusion.synthesis import load_model_and_diffusion, resolve_model_config, resolve_model_path, run_size

    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    rows, patches = [], None
    for path in paths:
        ckpt = resolve_model_path(path)
        model_cfg, _ = resolve_model_config(ckpt, {"timestep_respacing": ""}, defaults)
        size = run_size(model_cfg, cfg.patch_size, ckpt)
        if patches is None or patches[0].image.shape[0] != size:
            patches = sampling_patches(data_dir=cfg.data_dir, dataset_mode=cfg.dataset_mode,
                                       image_size=size, split=cfg.split,
                                       class_table=cfg.class_table or None, num_classes=model_cfg["num_classes"],
                                       progress=False)
            patches = patches[: cfg.num_patches or None]
            images = image_to_tensor(np.stack([q.image for q in patches]))
            conds = build_condition(np.stack([q.type_map for q in patches]), np.stack([q.inst_map for q in patches]),
                                    model_cfg["num_classes"], model_cfg["no_instance"])
        model, diffusion = load_model_and_diffusion(ckpt, model_cfg, torch.device("cpu"))
        t_max = int((load_config_for_checkpoint(ckpt) or {}).get("t_max") or 0)
        for r in denoising_scores(model, diffusion, images, conds, timesteps, cfg.seed, cfg.batch_size):
            rows.append({"model": path, "checkpoint": ckpt, **r, "beyond_t_max": bool(t_max and r["t"] > t_max)})
            print(f"{path}  t={r['t']:4d}  eps MSE {r['eps_mse']:.5f}  x0 PSNR {r['psnr_db']:.2f} dB  (n={r['n']})"
                  + ("  [beyond its --t_max]" if rows[-1]["beyond_t_max"] else ""), flush=True)
    if cfg.out_json:
        fileio.write_json(cfg.out_json, {"settings": dataclasses.asdict(cfg), "command": " ".join(sys.argv), "rows": rows})
    return rows


if __name__ == "__main__":
    run_cli(main)
