"""DiffMix end to end: toy data (or a real dataset) -> statistics -> GradMix -> SDM training ->
classifier-free fine-tuning -> DDIM synthesis -> HoVer-Net patches -> a report.

This is the README's main command (``make demo`` runs ``scripts/demo.py``). Every stage calls the
same package functions as the individual scripts, so the demo exercises the real pipeline, only
at sizes a 2-core CPU finishes in minutes. Presets:

* ``demo`` (default): toy tiles of 256 px, a 64 px / 32-channel SDM, a few hundred CPU steps.
* ``quick``: tiny sizes and a handful of steps (the end-to-end test).
* ``paper``: the DiffMix settings (256 px, 256 channels, batch 16, lr 1e-4 then 2e-5 with drop
  rate 0.2, DDIM 100 with ddim_percent 55 and s 1.5) for a GPU and real CoNSeP/GLySAC paths.

Outputs (all inside ``out_dir``): ``toy_data/`` (unless ``--data_dir``), ``stats/``, ``gradmix/``,
``train/``, ``finetune/``, ``synthesis/``, ``report.md`` + ``report/*.png`` and ``demo.json``
(settings, seed, timings, output paths). Re-running resumes: finished stages are kept.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from . import fileio
from .errors import DiffMixError

PRESETS: Dict[str, Dict[str, Any]] = {
    "quick": dict(
        toy_train=2, toy_test=1, toy_size=96, toy_rare_share=0.25, image_size=32, channel_mult="1,2,2", num_channels=32, num_res_blocks=1,
        attention_resolutions="8", num_head_channels=16, train_steps=3, finetune_steps=2, batch_size=2,
        lr=2e-4, finetune_lr=2e-5, margin=8, timestep_respacing="ddim10", ddim_percent=55.0,
        max_synthesis_maps=2, sample_batch_size=4, log_interval=1,
    ),
    "demo": dict(
        toy_train=6, toy_test=2, toy_size=256, toy_rare_share=0.0, image_size=64, channel_mult="", num_channels=32, num_res_blocks=1,
        attention_resolutions="16,8", num_head_channels=16, train_steps=300, finetune_steps=50, batch_size=6,
        lr=3e-4, finetune_lr=5e-5, margin=16, timestep_respacing="ddim50", ddim_percent=55.0,
        max_synthesis_maps=4, sample_batch_size=8, log_interval=10,
    ),
    "paper": dict(
        toy_train=16, toy_test=4, toy_size=1000, toy_rare_share=0.0, image_size=256, channel_mult="", num_channels=256, num_res_blocks=2,
        attention_resolutions="32,16,8", num_head_channels=64, train_steps=5900, finetune_steps=4100,
        batch_size=16, lr=1e-4, finetune_lr=2e-5, margin=30, timestep_respacing="ddim100", ddim_percent=55.0,
        max_synthesis_maps=0, sample_batch_size=4, log_interval=100,
    ),
}


@dataclass
class DemoConfig:
    """Settings of an end-to-end run. ``None`` fields take the preset's value."""

    out_dir: str = field(default="runs/demo", metadata={"help": "run folder (everything is written inside)"})
    preset: str = field(default="demo", metadata={"help": "demo, quick (tiny, for tests) or paper (GPU, real data)"})
    data_dir: str = field(default="", metadata={"help": "real dataset root (CoNSeP/GLySAC layout); '' = make the toy dataset"})
    dataset_mode: str = field(default="consep", metadata={"help": "consep, glysac or custom"})
    num_classes: int = field(default=0, metadata={"help": "custom mode: classes incl. background (0 = from the mode)"})
    seed: int = field(default=0, metadata={"help": "seed of every stage (toy data, GradMix, training, sampling)"})
    toy_train: Optional[int] = field(default=None, metadata={"help": "toy training tiles"})
    toy_test: Optional[int] = field(default=None, metadata={"help": "toy test tiles"})
    toy_size: Optional[int] = field(default=None, metadata={"help": "toy tile side (px)"})
    toy_rare_share: Optional[float] = field(default=None, metadata={"help": "share of the rare 'other' class in the toy data (0 = the generator's CoNSeP-like default)"})
    image_size: Optional[int] = field(default=None, metadata={"help": "SDM image size (px)"})
    channel_mult: Optional[str] = field(default=None, metadata={"help": "SDM width multipliers ('' = by image size)"})
    num_channels: Optional[int] = field(default=None, metadata={"help": "SDM base width"})
    num_res_blocks: Optional[int] = field(default=None, metadata={"help": "SDM residual blocks per level"})
    attention_resolutions: Optional[str] = field(default=None, metadata={"help": "SDM attention resolutions"})
    num_head_channels: Optional[int] = field(default=None, metadata={"help": "channels per attention head"})
    train_steps: Optional[int] = field(default=None, metadata={"help": "pre-training steps"})
    finetune_steps: Optional[int] = field(default=None, metadata={"help": "classifier-free fine-tuning steps"})
    batch_size: Optional[int] = field(default=None, metadata={"help": "training batch size"})
    lr: Optional[float] = field(default=None, metadata={"help": "pre-training learning rate"})
    finetune_lr: Optional[float] = field(default=None, metadata={"help": "fine-tuning learning rate"})
    drop_rate: float = field(default=0.2, metadata={"help": "condition drop rate while fine-tuning"})
    margin: Optional[int] = field(default=None, metadata={"help": "GradMix border margin (px)"})
    num_balance: int = field(default=1, metadata={"help": "GradMix balancing maps per image"})
    num_enlarge: int = field(default=1, metadata={"help": "GradMix enlarging maps per image"})
    timestep_respacing: Optional[str] = field(default=None, metadata={"help": "sampling steps, e.g. ddim50"})
    ddim_percent: Optional[float] = field(default=None, metadata={"help": "percent of the steps run from the noised real patch"})
    s: float = field(default=1.5, metadata={"help": "classifier-free guidance scale"})
    max_synthesis_maps: Optional[int] = field(default=None, metadata={"help": "label maps to synthesise for (0 = all)"})
    sample_batch_size: Optional[int] = field(default=None, metadata={"help": "patches per sampling batch"})
    log_interval: Optional[int] = field(default=None, metadata={"help": "training log interval"})
    precision: str = field(default="auto", metadata={"help": "fp32, bf16 or fp16 autocast for training and sampling; auto = bf16 on a GPU, else fp32"})
    figure_dir: str = field(default="", metadata={"help": "also write the README figures (pipeline.png, demo_grid.png) here"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def resolved(self) -> "DemoConfig":
        if self.preset not in PRESETS:
            raise DiffMixError(f"--preset {self.preset!r}: expected one of {', '.join(PRESETS)}")
        values = {k: v for k, v in dataclasses.asdict(self).items()}
        for key, value in PRESETS[self.preset].items():
            if values.get(key) is None:
                values[key] = value
        return DemoConfig(**values)


def _model_config(cfg: DemoConfig, num_classes: int):
    from .config import ModelConfig

    return ModelConfig(
        image_size=cfg.image_size, num_classes=num_classes, num_channels=cfg.num_channels,
        num_res_blocks=cfg.num_res_blocks, num_heads=4, num_head_channels=cfg.num_head_channels,
        attention_resolutions=cfg.attention_resolutions, channel_mult=cfg.channel_mult, dropout=0.0, class_cond=True,
        use_checkpoint=cfg.preset == "paper", use_scale_shift_norm=True, resblock_updown=True,
        use_fp16=False, no_instance=False, learn_sigma=True, diffusion_steps=1000, noise_schedule="linear",
    )


class _Stages:
    """Runs named stages, timing each and recording what it wrote."""

    def __init__(self) -> None:
        self.timings: Dict[str, float] = {}
        self.outputs: Dict[str, str] = {}

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n== {name} ==", flush=True)
        t0 = time.time()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.time() - t0, 2)
        print(f"== {name}: {self.timings[name]:.1f} s", flush=True)
        return result


def run_demo(cfg: DemoConfig) -> Dict[str, Any]:
    """Run the whole pipeline; returns the run record (also saved as ``<out_dir>/demo.json``)."""
    from .data.classes import resolve_class_table
    from .data.stats import dataset_statistics, write_statistics
    from .data.readers import list_samples, read_samples
    from .data.toy import ToyConfig, make_toy_dataset
    from .gradmix.pipeline import run_gradmix
    from .synthesis import SampleConfig, run_synthesis
    from .train_util import TrainConfig, find_latest_checkpoint, train

    cfg = cfg.resolved()
    out = cfg.out_dir
    if cfg.data_dir and not fileio.exists(cfg.data_dir):  # before the output folder is made
        raise DiffMixError(f"{cfg.data_dir}: --data_dir not found")
    fileio.check_output_dir(out, "--out_dir")
    fileio.makedirs(out)
    stages = _Stages()
    t_all = time.time()

    # 1. Data: the real dataset, or the procedural toy dataset in the CoNSeP layout.
    if cfg.data_dir:
        data_dir = cfg.data_dir
    else:
        data_dir = fileio.join(out, "toy_data")
        if not fileio.exists(fileio.join(data_dir, "toy_dataset.json")):
            if os.path.isdir(data_dir):
                shutil.rmtree(data_dir)  # an interrupted toy stage of this run folder: start it again
            toy_cfg = ToyConfig()
            if cfg.toy_rare_share:
                rest = np.asarray(toy_cfg.class_probs[1:], np.float64)
                rest = rest / rest.sum() * (1 - cfg.toy_rare_share)
                toy_cfg = dataclasses.replace(toy_cfg, class_probs=(cfg.toy_rare_share, *rest.tolist()))
            stages.run(
                "toy dataset", make_toy_dataset, data_dir, num_train=cfg.toy_train, num_test=cfg.toy_test,
                size=cfg.toy_size, seed=cfg.seed, config=toy_cfg, progress=cfg.progress,
            )
    stages.outputs["dataset"] = data_dir
    table = resolve_class_table(cfg.dataset_mode, None, cfg.num_classes or None)
    # The fixed CoNSeP/GLySAC tables are looked up by mode; only custom data passes its table on.
    table_arg = table if cfg.dataset_mode == "custom" else None

    # Every file is checked (pairing, keys, sizes >= the crop, class table) before any stage writes.
    stages.run(
        "data check", read_samples, list_samples(data_dir, "Train"), table, min_size=cfg.image_size,
        what=f"dataset {data_dir}", progress=False,
    )

    # 2. Class statistics of the real labels.
    stats_dir = fileio.join(out, "stats")
    before = stages.run(
        "class statistics", dataset_statistics, data_dir=data_dir, dataset_mode=cfg.dataset_mode,
        class_table=table_arg, progress=cfg.progress,
    )
    write_statistics(before, stats_dir, prefix="real_train", title="real training labels")
    stages.outputs["statistics"] = stats_dir

    # 3. GradMix: balancing and enlarging virtual label maps.
    gradmix_dir = fileio.join(out, "gradmix")
    gm = stages.run(
        "GradMix", run_gradmix, data_dir, cfg.dataset_mode, gradmix_dir, class_table=table_arg,
        num_balance=cfg.num_balance, num_enlarge=cfg.num_enlarge, margin=cfg.margin, seed=cfg.seed,
        progress=cfg.progress,
    )
    stages.outputs["gradmix"] = gradmix_dir

    # 4-5. SDM pre-training, then classifier-free fine-tuning from its weights.
    model_cfg = _model_config(cfg, table.num_classes)
    precision = cfg.precision
    if precision == "auto":
        import torch

        precision = "bf16" if torch.cuda.is_available() else "fp32"
    common = dict(
        data_dir=data_dir, dataset_mode=cfg.dataset_mode, batch_size=cfg.batch_size, ema_rate="0.9999",
        log_interval=cfg.log_interval, seed=cfg.seed, progress=cfg.progress, keep_checkpoints=1,
        precision=precision,
    )
    train_dir = fileio.join(out, "train")
    stages.run(
        "SDM training", train, model_cfg,
        TrainConfig(lr=cfg.lr, max_steps=cfg.train_steps, save_interval=cfg.train_steps, log_dir=train_dir,
                    resume_checkpoint="latest", **common),
    )
    pretrained = _final_file(train_dir, "model", cfg.train_steps)
    finetune_dir = fileio.join(out, "finetune")
    finetune_resume = "latest" if find_latest_checkpoint(finetune_dir) else pretrained
    stages.run(
        "classifier-free fine-tuning", train, model_cfg,
        TrainConfig(lr=cfg.finetune_lr, drop_rate=cfg.drop_rate, max_steps=cfg.train_steps + cfg.finetune_steps,
                    save_interval=cfg.finetune_steps, log_dir=finetune_dir, resume_checkpoint=finetune_resume,
                    **common),
    )
    # EMA 0.9999 barely moves in a few hundred steps, so short runs sample from the raw weights;
    # the paper's recipe (10k steps) samples from the EMA file.
    final_step = cfg.train_steps + cfg.finetune_steps
    checkpoint = _final_file(finetune_dir, "ema_0.9999_" if cfg.preset == "paper" else "model", final_step)
    stages.outputs["checkpoint"] = checkpoint

    # 6. Synthesis from the virtual maps.
    label_dir = fileio.join(gradmix_dir, "Labels")
    map_names = sorted(n[:-4] for n in fileio.listdir(label_dir) if n.endswith(".mat"))
    if cfg.max_synthesis_maps:
        # Balance the two kinds: take maps round-robin over kinds.
        by_kind = {k: [n for n in map_names if f"__{k}" in n] for k in ("balance", "enlarge")}
        picked: List[str] = []
        while len(picked) < cfg.max_synthesis_maps and any(by_kind.values()):
            for names in by_kind.values():
                if names and len(picked) < cfg.max_synthesis_maps:
                    picked.append(names.pop(0))
        map_names = picked
    synth_cfg = SampleConfig(
        data_dir=data_dir, dataset_mode=cfg.dataset_mode, label_dir=label_dir, model_path=checkpoint,
        results_path=out, run_name="synthesis", s=cfg.s, ddim_percent=cfg.ddim_percent,
        batch_size=cfg.sample_batch_size, seed=cfg.seed, progress=cfg.progress, figure_rows=6, precision=precision,
        idx_img=",".join(map_names),
    )
    model_dict = model_cfg.to_dict()
    model_dict["timestep_respacing"] = cfg.timestep_respacing
    summary = stages.run("DDIM synthesis", run_synthesis, synth_cfg, model_dict, model_config_source="demo settings")
    stages.outputs["synthesis"] = summary.out_dir
    stages.outputs["hovernet_patches"] = fileio.join(summary.out_dir, "npy_patch")

    # 7. Report.
    from .report import write_report

    record = {
        "settings": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "timings_s": stages.timings,
        "total_s": round(time.time() - t_all, 2),
        "outputs": stages.outputs,
        "gradmix": {
            "maps_written": len(gm["written"]),
            "maps_kept": len(gm["skipped"]),
            "counts": {k: np.asarray(v).tolist() if k in ("before", "after") else v for k, v in gm.get("counts", {}).items()},
        },
        "class_names": list(table.names),
    }
    report = stages.run("report", write_report, out, record, train_dir, finetune_dir, summary, cfg.figure_dir)
    record["outputs"]["report"] = report
    record["timings_s"] = stages.timings
    fileio.write_json(fileio.join(out, "demo.json"), record)
    print(f"\nDone in {time.time() - t_all:.0f} s. Report: {report}")
    return record


def _final_file(folder: str, prefix: str, step: int) -> str:
    path = fileio.join(folder, f"{prefix}{step:06d}.pt")
    if not fileio.exists(path):
        raise DiffMixError(f"{folder}: expected checkpoint {prefix}{step:06d}.pt after training, not found")
    return path
