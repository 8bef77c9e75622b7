"""The demo's settings: :class:`DemoConfig` (the flags of ``scripts/demo.py``) and its presets.

Light (no torch, no scipy), so ``demo.py --help`` starts at once; the run itself is
:func:`guided_diffusion.app.demo.run_demo`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from ..infra.config import SettingsCheck, flag
from ..infra.errors import DiffMixError
from .pretrained import DEFAULT_CLASSIFIER, DEFAULT_MODEL, REPO_ROOT

SAMPLE_DATA = os.path.join(REPO_ROOT, "datasets", "sample")

# The recommended synthesis for rare-class work (docs/REAL_DATA.md, sections 0c-0d): SDEdit from GradMix's
# composed image, DPM-Solver++(2M) with 10 model calls. The paper's start (the real patch, DDIM) is the
# paper preset, and one flag away (--start real --sampler ddim) in the others.
RECOMMENDED_PERCENT = 55.0

PRESETS: Dict[str, Dict[str, Any]] = {
    "quick": dict(
        data_dir="", dataset_mode="consep", num_classes=0, model_path="",
        toy_train=2, toy_test=1, toy_size=96, toy_rare_share=0.25, image_size=32, channel_mult="1,2,2", num_channels=32, num_res_blocks=1,
        attention_resolutions="8", num_head_channels=16, spade_hidden=128, train_steps=3, finetune_steps=2, batch_size=2,
        lr=2e-4, finetune_lr=2e-5, ema_rate="0.9999", margin=8, timestep_respacing="ddim10", ddim_percent=55.0,
        start="gradmix", sampler="dpmpp2m", solver_steps=3, classifier=DEFAULT_CLASSIFIER,
        max_synthesis_maps=2, sample_batch_size=4, log_interval=1,
    ),
    "demo": dict(
        data_dir=SAMPLE_DATA, dataset_mode="consep", num_classes=0, model_path=DEFAULT_MODEL,
        margin=16, timestep_respacing="ddim100", ddim_percent=RECOMMENDED_PERCENT, start="gradmix", sampler="dpmpp2m",
        solver_steps=10, classifier=DEFAULT_CLASSIFIER, max_synthesis_maps=4, sample_batch_size=8, log_interval=10,
    ),
    "paper": dict(
        data_dir="", dataset_mode="consep", num_classes=0, model_path="",
        toy_train=16, toy_test=4, toy_size=1000, toy_rare_share=0.0, image_size=256, channel_mult="", num_channels=256, num_res_blocks=2,
        attention_resolutions="32,16,8", num_head_channels=64, spade_hidden=128, train_steps=5900, finetune_steps=4100,
        batch_size=16, lr=1e-4, finetune_lr=2e-5, ema_rate="0.9999", margin=30, timestep_respacing="ddim100", ddim_percent=55.0,
        start="real", sampler="ddim", solver_steps=0, classifier="", max_synthesis_maps=0, sample_batch_size=4, log_interval=100,
    ),
}


@dataclass
class DemoConfig:
    """Settings of an end-to-end run. ``None`` fields take the preset's value."""

    out_dir: str = flag("runs/demo", "run folder (everything is written inside)")
    preset: str = flag("demo", "demo (real sample + pretrained SDM), quick (toy, tiny, for tests) or paper (GPU, real data)")
    data_dir: Optional[str] = flag(None, "dataset root (CoNSeP layout); '' = make the toy dataset")
    dataset_mode: Optional[str] = flag(None, "consep, glysac, custom, pannuke, conic or lizard")
    num_classes: Optional[int] = flag(None, "custom mode: classes incl. background (0 = from the mode)")
    model_path: Optional[str] = flag(None, "pretrained SDM (config.json beside it); '' = train one here")
    retrain: bool = flag(False, "train the SDM from scratch instead of using --model_path (its training.json gives the recipe)")
    seed: int = flag(0, "seed of every stage (toy data, GradMix, training, sampling)")
    toy_train: Optional[int] = flag(None, "toy training tiles")
    toy_test: Optional[int] = flag(None, "toy test tiles")
    toy_size: Optional[int] = flag(None, "toy tile side (px)")
    toy_rare_share: Optional[float] = flag(None, "share of the rare 'other' class in the toy data (0 = the generator's CoNSeP-like default)")
    image_size: Optional[int] = flag(None, "SDM image size (px) when training")
    channel_mult: Optional[str] = flag(None, "SDM width multipliers ('' = by image size)")
    num_channels: Optional[int] = flag(None, "SDM base width")
    num_res_blocks: Optional[int] = flag(None, "SDM residual blocks per level")
    attention_resolutions: Optional[str] = flag(None, "SDM attention resolutions")
    num_head_channels: Optional[int] = flag(None, "channels per attention head")
    spade_hidden: Optional[int] = flag(None, "SPADE hidden width")
    train_steps: Optional[int] = flag(None, "pre-training steps")
    finetune_steps: Optional[int] = flag(None, "classifier-free fine-tuning steps")
    batch_size: Optional[int] = flag(None, "training batch size")
    lr: Optional[float] = flag(None, "pre-training learning rate")
    finetune_lr: Optional[float] = flag(None, "fine-tuning learning rate")
    ema_rate: Optional[str] = flag(None, "EMA rate of training")
    drop_rate: float = flag(0.2, "condition drop rate while fine-tuning")
    margin: Optional[int] = flag(None, "GradMix border margin (px)")
    num_balance: int = flag(1, "GradMix balancing maps per image")
    num_enlarge: int = flag(1, "GradMix enlarging maps per image")
    timestep_respacing: Optional[str] = flag(None, "sampling steps, e.g. ddim50")
    ddim_percent: Optional[float] = flag(None, "percent of the steps run from the noised start image")
    start: Optional[str] = flag(None, "what SDEdit noises: gradmix (GradMix's composed image of the map; balancing maps "
                                      "only, as GradMix composes no image for enlarging maps) or real (the real patch, "
                                      "the paper's; balancing and enlarging maps)")
    sampler: Optional[str] = flag(None, "ddim, ddpm or dpmpp2m")
    solver_steps: Optional[int] = flag(None, "dpmpp2m: model calls from the start (0 = one per respaced step)")
    classifier: Optional[str] = flag(None, "nucleus-type classifier folder (scripts/export_classifier.py) for the report's label fidelity; '' = none")
    s: float = flag(1.5, "classifier-free guidance scale")
    max_synthesis_maps: Optional[int] = flag(None, "label maps to synthesise for (0 = all)")
    sample_batch_size: Optional[int] = flag(None, "patches per sampling batch")
    log_interval: Optional[int] = flag(None, "training log interval")
    precision: str = flag("auto", "fp32, bf16 or fp16 autocast for training and sampling; auto = fp16 on CUDA if the model sets use_fp16, else fp32")
    figure_dir: str = flag("", "also write the README figures (pipeline.png, demo_grid.png) here")
    progress: bool = flag(True, "progress bars")

    def resolved(self) -> "DemoConfig":
        if self.preset not in PRESETS:
            raise DiffMixError(f"--preset {self.preset!r}: expected one of {', '.join(PRESETS)}")
        values = {k: v for k, v in dataclasses.asdict(self).items()}
        for key, value in PRESETS[self.preset].items():
            if values.get(key) is None:
                values[key] = value
        if not values["model_path"] and values["image_size"] is None:
            raise DiffMixError(
                f"--model_path '': preset {self.preset} has no training settings; use --retrain True to train "
                "the shipped model's recipe, or --preset quick / paper"
            )
        if not values["data_dir"] and values["toy_size"] is None:
            raise DiffMixError(f"--data_dir '': preset {self.preset} has no toy-data settings; pass --toy_train, "
                               "--toy_test and --toy_size, or use --preset quick / paper")
        cfg = DemoConfig(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise DiffMixError naming every bad flag of the resolved settings (None: unused by this
        preset), before anything is written."""
        check = SettingsCheck(self)
        for name in ("toy_train", "toy_size", "train_steps", "batch_size", "sample_batch_size", "log_interval",
                     "image_size", "num_channels", "num_res_blocks", "spade_hidden"):
            check.need(name, lambda v: v >= 1, ">= 1")
        for name in ("seed", "toy_test", "finetune_steps", "margin", "num_balance", "num_enlarge",
                     "max_synthesis_maps", "num_classes"):
            check.need(name, lambda v: v >= 0, ">= 0")
        check.need("toy_rare_share", lambda v: 0 <= v <= 1, "in [0, 1]")
        check.need("lr", lambda v: v > 0, "> 0")
        check.need("finetune_lr", lambda v: v > 0, "> 0")
        check.need("drop_rate", lambda v: 0 <= v <= 1, "in [0, 1]")
        # Sampling flags by the synthesis stage's own rules (--s, --ddim_percent, --precision);
        # the paths only satisfy its required-path checks. Imported here: synthesis loads torch.
        from ..synthesis.settings import SampleConfig

        check.rule(SampleConfig(data_dir=".", results_path=".", label_dir=".", s=self.s, ddim_percent=self.ddim_percent,
                                start=self.start, sampler=self.sampler, solver_steps=self.solver_steps,
                                precision=self.precision, seed=self.seed).validate)
        check.done()
