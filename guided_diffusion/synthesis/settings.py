"""Settings of a synthesis run: the sampling flags, step arithmetic, model config resolution,
checkpoint loading, and the device of this rank."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict

import torch

from ..data.classes import LABELS_MERGED, LABELS_MERGED_HELP, dataset_mode_flag
from ..data.formats.export import ARRAY_FORMATS
from ..infra import fileio
from ..infra.checkpoint_folder import newest_ema_checkpoint
from ..infra.checkpoints import load_model_weights
from ..infra.config import (CONFIG_NAME, ModelConfig, SettingsCheck, check_model_kind, config_path_for_checkpoint,
                            flag, load_config_for_checkpoint)
from ..infra.errors import DiffMixError
from ..infra.precision import check_precision, resolve_precision, sdm_half
from ..script_util import create_model_and_diffusion, parse_channel_mult
from ..unet import downsampling_factor

SAMPLERS = ("ddim", "ddpm", "dpmpp2m")
STARTS = ("real", "gradmix")

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

    data_dir: str = flag("", "dataset root or split folder with Images/ and Labels/ (real reference images)")
    dataset_mode: str = dataset_mode_flag()
    split: str = flag("Train", "split used when data_dir is a dataset root (pannuke/conic/lizard: Train = folds 1,2, Test = fold 3, all, or fold1,fold3)")
    labels_merged: str = flag("auto", LABELS_MERGED_HELP)
    label_dir: str = flag("", "GradMix output folder (<stem>__balance000.mat ...); '' = the dataset's own labels")
    class_table: str = flag("", "custom mode: class mapping JSON ('' = identity over num_classes)")
    idx_img: str = flag("", "comma list of image indices (sorted stems), image stems or label-map names; '' = all")
    start: str = flag("real", "what SDEdit noises: real (the real patch, the paper's) or gradmix (GradMix's composed image of the same map, <label_dir>/Images/, gradmix.py --write_images true)")
    changed_only: bool = flag(False, "with --label_dir: only the patches that hold a nucleus GradMix placed (balancing) or moved (enlarging), as its Records/ say")
    keep_donors: int = flag(-1, "with --label_dir: keep GradMix's image inside each placed nucleus grown by this many pixels, noised to every step (RePaint-style), so the placed nucleus is a real one; -1 = off")
    patch_size: int = flag(0, "size in px of the patches to synthesise (0 = the model's image_size); the U-Net is convolutional, so a model trained on smaller crops can synthesise larger patches")
    stride: int = flag(0, "patch grid stride in pixels (0 = the patch size)")
    model_path: str = flag("", "checkpoint (.pt / .safetensors); config.json beside it is read")
    results_path: str = flag("", "output root; a run folder s<s>_<respacing>_p<percent> is made inside")
    run_name: str = flag("", "run folder name ('' = official s<s>_<respacing>_p<percent>[_<sampler>])")
    s: float = flag(1.0, "classifier-free guidance scale (>= 1; 1 = conditional only)")
    ddim_percent: float = flag(100.0, "percent of the respaced steps to run from the noised real patch; 100 = from pure noise")
    sampler: str = flag("ddim", "ddim, ddpm or dpmpp2m")
    solver_steps: int = flag(0, "dpmpp2m only: model calls from the start, evenly spaced in log-SNR on the trained steps (fast preset: --sampler dpmpp2m --solver_steps 10, benchmarks/RESULTS.md); 0 = one per respaced step")
    eta: float = flag(0.0, "noise per step: DDIM eta, or with dpmpp2m the SDE solver's (0 = deterministic ODE, 1 = SDE-DPM-Solver++(2M), at most 1)")
    clip_denoised: bool = flag(True, "clip the x0 prediction to [-1, 1]")
    batch_size: int = flag(1, "patches per model call")
    num_samples: int = flag(0, "cap on the number of outputs (0 = every patch x samples_per_map)")
    samples_per_map: int = flag(1, "samples (seeds) per patch of each label map")
    seed: int = flag(0, "base seed of every sample's noise")
    precision: str = flag("auto", "fp32, bf16 or fp16 autocast; auto = fp16 on CUDA if use_fp16 else fp32")
    fast: bool = flag(True, "cached SPADE + shared encoder (exact); false = official two full forwards")
    batched_guidance: bool = flag(False, "run both guidance branches as one doubled batch (GPU)")
    channels_last: bool = flag(False, "channels_last memory format")
    compile: bool = flag(False, "torch.compile the model calls")
    device: str = flag("", "'' = this rank's CUDA device, else cpu")
    source_format: bool = flag(False, "pannuke/conic: also collect the outputs into the dataset's own arrays (<run>/source_format/, to append to yours)")
    figure_rows: int = flag(8, "rows of the real | label | synthetic figure (0 = none)")
    progress: bool = flag(True, "show a progress bar")
    gpu: str = flag("", "official flag, ignored (use CUDA_VISIBLE_DEVICES)")
    use_ddim: bool = flag(False, "official flag, ignored (use --sampler)")

    def validate(self) -> None:
        """Raise :class:`DiffMixError` naming every flag that cannot work."""
        check = SettingsCheck(self)
        check.add(self.labels_merged not in LABELS_MERGED,
                  f"--labels_merged {self.labels_merged!r}: expected one of {', '.join(LABELS_MERGED)}")
        check.add(self.sampler not in SAMPLERS, f"--sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        check.rule(check_precision, self.precision)
        check.need("ddim_percent", lambda v: 0 < v <= 100, "in (0, 100] (percent of the steps)")
        # The official sampler silently ignores s <= 1; a value below 1 is almost surely a mistake.
        check.add(self.s < 1, f"--s {self.s}: the guidance scale must be >= 1 (1 = conditional model only)")
        check.add(self.solver_steps < 0 or (self.solver_steps and self.sampler != "dpmpp2m"),
                  f"--solver_steps {self.solver_steps}: must be >= 0, and applies to --sampler dpmpp2m only "
                  f"(got --sampler {self.sampler})")
        check.need("eta", lambda v: v >= 0, ">= 0")
        check.add(self.eta and self.sampler == "ddpm", "--eta applies to the ddim and dpmpp2m samplers (ddpm draws its own noise)")
        check.add(self.sampler == "dpmpp2m" and self.eta > 1, f"--eta {self.eta}: with --sampler dpmpp2m at most 1 (1 = the SDE solver)")
        for name in ("batch_size", "samples_per_map"):
            check.need(name, lambda v: v >= 1, ">= 1")
        for name in ("num_samples", "patch_size", "stride", "figure_rows"):
            check.need(name, lambda v: v >= 0, ">= 0")
        check.add(not self.data_dir, "--data_dir is required (the real reference images)")
        check.add(self.source_format and self.dataset_mode.lower() not in ARRAY_FORMATS,
                  f"--source_format applies to dataset_mode {' or '.join(ARRAY_FORMATS)}, not {self.dataset_mode!r}")
        check.add(not self.results_path, "--results_path is required")
        check.add(self.start not in STARTS, f"--start {self.start!r}: expected one of {', '.join(STARTS)}")
        check.add(self.start == "gradmix" and not self.label_dir,
                  "--start gradmix needs --label_dir (a GradMix output folder with Images/)")
        check.need("keep_donors", lambda v: v >= -1, "-1 (off) or a ring width >= 0 in pixels")
        check.add(self.keep_donors >= 0 and not self.label_dir,
                  "--keep_donors needs --label_dir (a GradMix output folder with Images/ and Records/)")
        check.add(self.changed_only and not self.label_dir,
                  "--changed_only True needs --label_dir (a GradMix output folder with Records/)")
        check.done()


def default_run_name(cfg: SampleConfig, timestep_respacing: str) -> str:
    """The official run folder name ``s<s>_<respacing>_p<percent>``, plus the sampler/eta if not the defaults."""
    pct = int(cfg.ddim_percent) if float(cfg.ddim_percent).is_integer() else cfg.ddim_percent
    name = f"s{cfg.s}_{timestep_respacing or 'full'}_p{pct}"
    if cfg.sampler != "ddim":
        name += f"_{cfg.sampler}" + (str(cfg.solver_steps) if cfg.solver_steps else "")
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
    if model_path and not fileio.exists(model_path):
        raise DiffMixError(f"{model_path}: checkpoint not found")
    saved = load_config_for_checkpoint(model_path) if model_path else None
    values = dict(defaults)
    source = "flags"
    if saved is not None:
        check_model_kind(saved, model_path, "sdm", "--model_path")  # e.g. a segmenter's model.safetensors
        if isinstance(saved.get("model"), dict):
            saved = saved["model"]
        model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
        values.update({k: v for k, v in saved.items() if k in model_keys and k not in SAMPLING_ONLY_MODEL_KEYS})

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


def run_size(model_cfg: Dict[str, Any], patch_size: int, model_path: str) -> int:
    """The patch size in px a model runs at: ``patch_size``, or its own ``image_size`` when 0.

    The U-Net is convolutional (SPADE resizes the label map to each block, attention is placed by
    down-sampling factor), so any multiple of its total down-sampling works; a size the encoder cannot
    halve evenly raises :class:`DiffMixError` naming ``model_path``.
    """
    size = int(patch_size or model_cfg["image_size"])
    levels = downsampling_factor(parse_channel_mult(model_cfg["channel_mult"], int(model_cfg["image_size"])))
    if size % levels:
        raise DiffMixError(f"{model_path}: --patch_size {size} is not a multiple of {levels}, the U-Net's total down-sampling")
    return size


def load_model_and_diffusion(model_path: str, model_cfg: Dict[str, Any], device: torch.device):
    """Build the SDM U-Net + respaced diffusion from ``model_cfg`` and load ``model_path`` (strict).

    Returns ``(model in eval mode on device, diffusion)``. A missing checkpoint or one that does not
    fit the settings raises :class:`DiffMixError` naming the file.
    """
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


def sampling_precision(cfg: SampleConfig, model_cfg: Dict[str, Any], device: torch.device) -> str:
    """The autocast precision to sample with (the shared policy of :mod:`guided_diffusion.infra.precision`);
    fp16 sampling is refused on the CPU."""
    precision = resolve_precision(cfg.precision, device, sdm_half(bool(model_cfg.get("use_fp16"))))
    if precision == "fp16" and device.type != "cuda":
        raise DiffMixError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision
