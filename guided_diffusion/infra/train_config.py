"""Training settings: the flags of ``scripts/image_train.py`` (official names first), their
validation, and the flat settings written to ``config.json`` beside the checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..data.classes import LABELS_MERGED, LABELS_MERGED_HELP, dataset_mode_flag
from .config import SettingsCheck, flag
from .errors import DiffMixError
from .precision import check_precision


@dataclasses.dataclass
class TrainConfig:
    """Training settings: the official ``image_train.py`` flag names and defaults, plus new ones.

    ``use_fp16`` is a model setting (:class:`guided_diffusion.infra.config.ModelConfig`) and keeps its
    official meaning for training: with ``precision auto`` on CUDA it selects fp16 autocast + loss
    scaling (:mod:`guided_diffusion.infra.precision`).
    """

    data_dir: str = flag("", "dataset root holding Train/Images and Train/Labels")
    dataset_mode: str = dataset_mode_flag()
    labels_merged: str = flag("auto", LABELS_MERGED_HELP)
    schedule_sampler: str = flag("uniform", "timestep sampler: uniform or loss-second-moment")
    lr: float = flag(1e-4, "AdamW learning rate")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    lr_anneal_steps: int = flag(0, "anneal lr linearly to 0 over this many steps, then stop (0: constant lr)")
    batch_size: int = flag(1, "images per step on each rank")
    microbatch: int = flag(-1, "split each batch into chunks of this size, accumulating gradients (-1: off)")
    ema_rate: str = flag("0.9999", "comma-separated EMA rates, one ema_<rate>_NNNNNN.pt per rate")
    drop_rate: float = flag(0.0, "probability of replacing a sample's whole condition by zeros (classifier-free)")
    log_interval: int = flag(10, "write progress.csv / log.txt every this many steps")
    save_interval: int = flag(10000, "save a checkpoint every this many steps (and at the end)")
    resume_checkpoint: str = flag("", "'latest', a checkpoint folder, or a model/ema .pt file ('' to start fresh)")
    fp16_scale_growth: float = flag(1e-3, "fp16 loss-scale growth in log2 per step (doubles every 1/x steps)")
    is_train: bool = flag(True, "read the Train split (False: the Test split)")
    gpu: str = flag("", "deprecated; select GPUs with CUDA_VISIBLE_DEVICES or the launcher (see image_train.py)")
    max_steps: int = flag(0, "stop after this many steps in total, counting resumed ones (0: no limit)")
    log_dir: str = flag("", "run folder (default: $OPENAI_LOGDIR, else runs/train-<time>)")
    seed: int = flag(0, "seed of the initial weights, timesteps, noise, condition dropout and crops")
    grad_clip: float = flag(0.0, "clip the global gradient norm to this value (0: off)")
    keep_checkpoints: int = flag(0, "keep only the newest N complete checkpoints (0: keep all)")
    precision: str = flag("auto", "fp32, bf16 or fp16 autocast; auto: fp16 with --use_fp16 on CUDA, else fp32")
    num_workers: int = flag(0, "data-loading worker processes per rank")
    deterministic: bool = flag(False, "deterministic kernels (bitwise-reproducible resume; slower on GPU)")
    progress: bool = flag(True, "show a progress bar on the terminal")
    # DiffMix's CPU recipe options (docs/REAL_DATA.md); the defaults keep the official objective.
    crop_size: int = flag(0, "side in px of the training crops (0: the model's --image_size); the U-Net is "
                             "convolutional, so a model trained on smaller crops still samples at --image_size")
    t_max: int = flag(0, "draw training timesteps only from [0, t_max] (0: all); such a model cannot "
                         "sample from pure noise, and synthesis refuses a start above t_max")
    snr_gamma: float = flag(0.0, "min-SNR-gamma weighting of the MSE term, e.g. 5 (0: off)")
    rare_crop_share: float = flag(0.0, "share of training crops centred on a rare-class nucleus (the class "
                                       "table's minor classes, else class 1); 0: plain random crops")


def parse_ema_rates(ema_rate: Any) -> list[float]:
    """``"0.9999,0.999"`` -> ``[0.9999, 0.999]``; each rate must lie in [0, 1)."""
    if isinstance(ema_rate, (int, float)):
        rates = [float(ema_rate)]
    else:
        parts = [p.strip() for p in str(ema_rate).split(",") if p.strip()]
        try:
            rates = [float(p) for p in parts]
        except ValueError:
            raise DiffMixError(f"--ema_rate {ema_rate!r}: expected comma-separated numbers such as 0.9999") from None
    for r in rates:
        if not 0.0 <= r < 1.0:
            raise DiffMixError(f"--ema_rate {ema_rate!r}: every rate must be in [0, 1), got {r}")
    return rates


def validate_train_config(cfg: TrainConfig) -> None:
    """Raise :class:`DiffMixError` naming every setting that cannot work (checked before any heavy work)."""
    check = SettingsCheck(cfg)
    for name in ("batch_size", "log_interval", "save_interval"):
        check.need(name, lambda v: v >= 1, ">= 1")
    check.need("microbatch", lambda v: v == -1 or v >= 1, "-1 (off) or >= 1")
    for name in ("drop_rate", "rare_crop_share"):
        check.need(name, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    for name in ("lr", "fp16_scale_growth"):
        check.need(name, lambda v: v > 0, "> 0")
    for name in ("lr_anneal_steps", "max_steps", "keep_checkpoints", "num_workers", "crop_size", "t_max", "snr_gamma", "grad_clip"):
        check.need(name, lambda v: v >= 0, ">= 0")
    check.rule(check_precision, cfg.precision)
    check.need("labels_merged", lambda v: v in LABELS_MERGED, f"one of {', '.join(LABELS_MERGED)}")
    check.need("schedule_sampler", lambda v: v in ("uniform", "loss-second-moment"), "uniform or loss-second-moment")
    check.rule(parse_ema_rates, cfg.ema_rate)
    check.done()


def flat_config(model_cfg: Any, train_cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The settings written to config.json: model fields, then train fields, then ``extra``."""
    out = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dataclasses.asdict(model_cfg))
    out.update(dataclasses.asdict(train_cfg))
    out.update(extra)
    return out
