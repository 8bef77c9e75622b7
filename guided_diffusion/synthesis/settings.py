"""Settings of a synthesis run: the sampling flags, step arithmetic, model config resolution,
checkpoint loading, and where this process sits among the launcher's ranks."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict

import torch

from .. import fileio
from ..data.classes import LABELS_MERGED, LABELS_MERGED_HELP
from ..errors import DiffMixError

SAMPLERS = ("ddim", "ddpm", "dpmpp2m")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Keys of ModelConfig that describe *how to sample*, not the trained network: they come from the
# sampling flags (default ddim100), never from the training config saved beside the checkpoint.
SAMPLING_ONLY_MODEL_KEYS = ("timestep_respacing",)
DEFAULT_TIMESTEP_RESPACING = "ddim100"


@dataclass
class SampleConfig:
    """Settings of a synthesis run (flags of ``scripts/image_sample.py`` besides the model's).

    Names of the official ``image_sample.py`` are kept (``data_dir``, ``dataset_mode``,
    ``model_path``, ``results_path``, ``s``, ``ddim_percent`` in percent, ``batch_size``,
    ``num_samples``, ``clip_denoised``, ``idx_img``); ``gpu`` and ``use_ddim`` are accepted and
    ignored (choose GPUs with ``CUDA_VISIBLE_DEVICES`` or the launcher; the sampler is ``--sampler``).
    """

    data_dir: str = field(default="", metadata={"help": "dataset root or split folder with Images/ and Labels/ (real reference images)"})
    dataset_mode: str = field(default="consep", metadata={"help": "consep, glysac or custom"})
    labels_merged: str = field(default="auto", metadata={"help": LABELS_MERGED_HELP})
    split: str = field(default="Train", metadata={"help": "split used when data_dir is a dataset root"})
    label_dir: str = field(default="", metadata={"help": "GradMix output folder (<stem>__balance000.mat ...); '' = the dataset's own labels"})
    class_table: str = field(default="", metadata={"help": "custom mode: class mapping JSON ('' = identity over num_classes)"})
    idx_img: str = field(default="", metadata={"help": "comma list of image indices (sorted stems), image stems or label-map names; '' = all"})
    stride: int = field(default=0, metadata={"help": "patch grid stride in pixels (0 = image_size)"})
    model_path: str = field(default="", metadata={"help": "checkpoint (.pt / .safetensors); config.json beside it is read"})
    results_path: str = field(default="", metadata={"help": "output root; a run folder s<s>_<respacing>_p<percent> is made inside"})
    run_name: str = field(default="", metadata={"help": "run folder name ('' = official s<s>_<respacing>_p<percent>[_<sampler>])"})
    s: float = field(default=1.0, metadata={"help": "classifier-free guidance scale (>= 1; 1 = conditional only)"})
    ddim_percent: float = field(default=100.0, metadata={"help": "percent of the respaced steps to run from the noised real patch; 100 = from pure noise"})
    sampler: str = field(default="ddim", metadata={"help": "ddim, ddpm or dpmpp2m"})
    eta: float = field(default=0.0, metadata={"help": "DDIM eta (0 = deterministic)"})
    clip_denoised: bool = field(default=True, metadata={"help": "clip the x0 prediction to [-1, 1]"})
    batch_size: int = field(default=1, metadata={"help": "patches per model call"})
    num_samples: int = field(default=0, metadata={"help": "cap on the number of outputs (0 = every patch x samples_per_map)"})
    samples_per_map: int = field(default=1, metadata={"help": "samples (seeds) per patch of each label map"})
    seed: int = field(default=0, metadata={"help": "base seed of every sample's noise"})
    precision: str = field(default="auto", metadata={"help": "fp32, bf16 or fp16 autocast; auto = fp16 on CUDA if use_fp16 else fp32"})
    fast: bool = field(default=True, metadata={"help": "cached SPADE + shared encoder (exact); false = official two full forwards"})
    batched_guidance: bool = field(default=False, metadata={"help": "run both guidance branches as one doubled batch (GPU)"})
    channels_last: bool = field(default=False, metadata={"help": "channels_last memory format"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model calls"})
    device: str = field(default="", metadata={"help": "'' = this rank's CUDA device, else cpu"})
    figure_rows: int = field(default=8, metadata={"help": "rows of the real | label | synthetic figure (0 = none)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    gpu: str = field(default="", metadata={"help": "official flag, ignored (use CUDA_VISIBLE_DEVICES)"})
    use_ddim: bool = field(default=False, metadata={"help": "official flag, ignored (use --sampler)"})

    def validate(self) -> None:
        if self.labels_merged not in LABELS_MERGED:
            raise DiffMixError(f"--labels_merged {self.labels_merged!r}: expected one of {', '.join(LABELS_MERGED)}")
        if self.sampler not in SAMPLERS:
            raise DiffMixError(f"--sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.precision not in PRECISIONS:
            raise DiffMixError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if not (0 < self.ddim_percent <= 100):
            raise DiffMixError(f"--ddim_percent {self.ddim_percent}: must be in (0, 100] (percent of the steps)")
        if self.s < 1:
            # The official sampler silently ignores s <= 1; a value below 1 is almost surely a mistake.
            raise DiffMixError(f"--s {self.s}: the guidance scale must be >= 1 (1 = conditional model only)")
        if self.eta < 0:
            raise DiffMixError(f"--eta {self.eta}: must be >= 0")
        if self.eta and self.sampler != "ddim":
            raise DiffMixError(f"--eta applies to the ddim sampler only (got --sampler {self.sampler})")
        for name in ("batch_size", "samples_per_map"):
            if getattr(self, name) < 1:
                raise DiffMixError(f"--{name} {getattr(self, name)}: must be >= 1")
        if self.num_samples < 0 or self.stride < 0 or self.figure_rows < 0:
            raise DiffMixError("--num_samples, --stride and --figure_rows must be >= 0")
        if not self.data_dir:
            raise DiffMixError("--data_dir is required (the real reference images)")
        if not self.results_path:
            raise DiffMixError("--results_path is required")


def start_steps(num_steps: int, ddim_percent: float) -> int:
    """Steps to run for ``ddim_percent`` percent of ``num_steps`` respaced steps (floor, >= 1).

    The official script computes ``int(num_steps * (percent * 0.01))``, whose float rounding drops
    a step for some values (29 % of 100 -> 28); this computes the exact floor (55 % of 100 -> 55,
    the paper's setting, agrees with the official script).
    """
    steps = math.floor(num_steps * float(ddim_percent) / 100.0 + 1e-9)
    if steps < 1 or steps > num_steps:
        raise DiffMixError(
            f"--ddim_percent {ddim_percent} of {num_steps} steps leaves {steps} steps; need 1..{num_steps}"
        )
    return steps


def default_run_name(cfg: SampleConfig, timestep_respacing: str) -> str:
    """The official run folder name ``s<s>_<respacing>_p<percent>``, plus the sampler/eta if not the defaults."""
    pct = int(cfg.ddim_percent) if float(cfg.ddim_percent).is_integer() else cfg.ddim_percent
    name = f"s{cfg.s}_{timestep_respacing or 'full'}_p{pct}"
    if cfg.sampler != "ddim":
        name += f"_{cfg.sampler}"
    if cfg.eta:
        name += f"_eta{cfg.eta}"
    return name


def resolve_model_path(model_path: str) -> str:
    """``--model_path`` as a checkpoint file: a training run folder gives its newest complete
    checkpoint's EMA weights (named on stderr). Raises DiffMixError when it is missing."""
    import sys

    if not model_path:
        raise DiffMixError("--model_path is required: a checkpoint (e.g. ema_0.9999_010000.pt) or a training run folder")
    if fileio.is_remote(model_path) or not os.path.isdir(model_path):
        if not fileio.exists(model_path):
            raise DiffMixError(f"{model_path}: checkpoint not found (--model_path)")
        return model_path
    from ..checkpoint_folder import newest_ema_checkpoint

    path, why = newest_ema_checkpoint(model_path)
    print(f"--model_path {model_path} is a training run folder: using {path} ({why})", file=sys.stderr)
    return path


def resolve_model_config(model_path: str, explicit: Dict[str, Any], defaults: Dict[str, Any]) -> tuple:
    """The model settings to sample with: defaults <- config.json beside the checkpoint <- flags.

    Args:
        model_path: the checkpoint; ``config.json`` in its folder (written by training) is read
            when present. Its model keys may sit at the top level or under ``"model"``.
        explicit: model flags given on the command line (they always win).
        defaults: the flag defaults (used for keys neither source sets).

    Returns:
        ``(settings dict, source)`` where source names the config file or ``"flags"``.
    """
    from ..config import CONFIG_NAME, ModelConfig, load_config_for_checkpoint

    if model_path and not fileio.exists(model_path):
        raise DiffMixError(f"{model_path}: checkpoint not found")
    saved = load_config_for_checkpoint(model_path) if model_path else None
    values = dict(defaults)
    source = "flags"
    if saved is not None:
        if isinstance(saved.get("model"), dict):
            saved = saved["model"]
        model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
        values.update({k: v for k, v in saved.items() if k in model_keys and k not in SAMPLING_ONLY_MODEL_KEYS})
        from ..config import config_path_for_checkpoint

        source = config_path_for_checkpoint(model_path)
    values.update(explicit)
    if saved is None and not values.get("class_cond"):
        # The official defaults (class_cond False, 151 ADE20K classes) never describe a DiffMix model:
        # the likely mistake is a checkpoint copied without its config.json.
        raise DiffMixError(
            f"{model_path}: no {CONFIG_NAME} beside the checkpoint and no model flags given (--class_cond is "
            "still the official default False); pass the flags the model was trained with, as "
            "scripts/scripts_ddim_sample/consep.sh does (--image_size, --num_channels, --num_classes, --class_cond True, ...)"
        )
    return ModelConfig.from_dict(values, source=source).to_dict(), source


def load_model_and_diffusion(model_path: str, model_cfg: Dict[str, Any], device: torch.device):
    """Build the SDM U-Net + respaced diffusion from ``model_cfg`` and load ``model_path`` (strict).

    Returns ``(model in eval mode on device, diffusion)``. A missing checkpoint or one that does not
    fit the settings raises :class:`DiffMixError` naming the file.
    """
    from ..checkpoints import load_model_weights
    from ..script_util import create_model_and_diffusion

    if not model_path:
        raise DiffMixError("--model_path is required (a checkpoint such as ema_0.9999_010000.pt)")
    if not fileio.exists(model_path):
        raise DiffMixError(f"{model_path}: checkpoint not found")
    if not model_cfg.get("class_cond"):
        raise DiffMixError(
            f"{model_path}: class_cond is false in the model settings; the SDM U-Net needs the label map "
            "(set --class_cond True, or fix config.json beside the checkpoint)"
        )
    model, diffusion = create_model_and_diffusion(**model_cfg)
    load_model_weights(model, model_path, strict=True)
    return model.to(device).eval(), diffusion


def launch_rank() -> tuple:
    """``(rank, world_size, local_rank)`` from the launcher's environment, no process group needed.

    Sharding needs no collectives, so ranks are read from torchrun (``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK``), Open MPI (``OMPI_COMM_WORLD_*``), MPICH/Hydra (``PMI_RANK``/``PMI_SIZE``,
    ``MPI_LOCALRANKID``) or PMIx (``PMIX_RANK``); a plain ``python`` run is rank 0 of 1.
    """

    def env(*names):
        for name in names:
            value = os.environ.get(name, "")
            if value.strip():
                try:
                    return int(value)
                except ValueError:
                    raise DiffMixError(f"environment variable {name}={value!r} is not an integer") from None
        return None

    world = env("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE") or 1
    rank = env("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK") or 0
    local = env("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK")
    if not (0 <= rank < world):
        raise DiffMixError(f"launcher rank {rank} is outside its world size {world}")
    return rank, world, rank if local is None else local


def default_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank mod device count>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_precision(cfg: SampleConfig, model_cfg: Dict[str, Any], device: torch.device) -> str:
    """The autocast precision to use: ``cfg.precision``, with ``auto`` = fp16 on CUDA when the model
    was configured ``use_fp16`` (the official meaning), else fp32."""
    precision = cfg.precision
    if precision == "auto":
        precision = "fp16" if (model_cfg.get("use_fp16") and device.type == "cuda") else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise DiffMixError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision
