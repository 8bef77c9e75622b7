"""The training loop: AdamW + EMA, classifier-free condition dropout, mixed precision, checkpoints.

``TrainLoop`` keeps the constructor keywords of the official SDM/DiffMix ``TrainLoop`` and adds what
a run needs to end, recover and scale: ``max_steps``, ``seed``, ``grad_clip``, ``precision``,
``keep_checkpoints``, exact resume and DistributedDataParallel on any backend.

Step numbering: ``step`` counts completed optimiser updates. ``model%06d.pt`` holds the weights
after that many updates, and a resumed run continues with update ``step + 1``. (The official loop
saved before incrementing, so its ``modelNNNNNN.pt`` holds NNNNNN + 1 updates; only the name differs.)

Checkpoint files in the log folder, per saved step N (official names first):

* ``model%06d.pt``: ``model.state_dict()`` (float32 tensors, official layout, loads with strict=True);
* ``ema_<rate>_%06d.pt``: the same keys holding the EMA weights, one file per rate;
* ``opt%06d.pt``: ``AdamW.state_dict()`` (official layout);
* ``train_state%06d.pt``: the rest of the resume state (step, RNG states of every rank, grad-scaler,
  timestep-sampler and data-stream state);
* ``checkpoint%06d.json``: the completion marker, written last (file names and sizes). Only
  checkpoints with a valid marker count as complete; ``--resume_checkpoint latest`` picks the newest.

Every file is written to a temporary name and renamed, so a killed process or a full disk never
leaves a corrupt file under a final name, and the marker makes the set all-or-nothing.
``config.json`` (model + train settings, flat) is written beside them at the start of a run, once
:func:`train` has checked every input (settings, model, dataset, resume file): a run that fails
to start leaves no folder, ``log.txt`` or ``progress.csv`` behind.
All ``.pt`` files hold only tensors, numbers, strings, lists and dicts: they load with
``torch.load(..., weights_only=True)``.

Resume (``--resume_checkpoint``): ``latest`` (newest complete checkpoint in the log folder, or a
fresh start when there is none), a folder (its newest complete checkpoint), or a file path. A
complete checkpoint written by this loop restores everything, so the resumed run continues
bitwise as the uninterrupted run would (CPU, ``--deterministic True``). Any other weights file --
an official ``modelNNNNNN.pt``, or an ``ema_...`` file -- is loaded as *weights only*: EMA files
beside it at the same step are loaded when present (else the EMA starts from the weights), an
``opt%06d.pt`` beside it is loaded when present (else a fresh optimiser), the step is parsed from
the file name (0 when it has no number), and the random streams start from ``--seed``.
Resuming from an older checkpoint of the same folder retires the newer ones (their markers are
removed, their files kept), so ``latest`` never jumps back to the abandoned branch.

Mixed precision: parameters, optimizer state and EMA stay float32; ``--precision bf16|fp16`` runs
the forward pass under ``torch.autocast``. fp16 adds a dynamic loss scale (``torch.amp.GradScaler``,
initial 2**20 as officially, doubled after ``round(1 / fp16_scale_growth)`` overflow-free steps --
the official log2 growth rate -- and halved on overflow, that step being skipped). Gradients are
unscaled for the whole optimizer (every parameter group) before clipping and the norm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import random
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from . import dist_util, fileio, logger, runlock
from .errors import DiffMixError
from .data.classes import LABELS_MERGED, LABELS_MERGED_HELP
from .checkpoint_folder import (  # noqa: F401  (the loop's checkpoint API, re-exported)
    ema_filename,
    checkpoint_filenames,
    marker_filename,
    valid_marker,
    parse_resume_step_from_filename,
    list_complete_checkpoints,
    find_latest_checkpoint,
    resolve_resume_checkpoint,
    load_pt,
    write_checkpoint,
    checkpoint_bytes,
    disk_use_notice,
    prune_checkpoints,
    remove_stale_temporaries,
)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Official MixedPrecisionTrainer started at 2**20; its log2 scale grew by fp16_scale_growth per step.
INITIAL_LOG_LOSS_SCALE = 20.0
STATE_FORMAT = "diffmix-train-state"
STATE_VERSION = 1



# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def _f(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Training settings: the official ``image_train.py`` flag names and defaults, plus new ones.

    ``use_fp16`` is a model setting (:class:`guided_diffusion.config.ModelConfig`) and keeps its
    official meaning for training: with ``precision auto`` it selects fp16 autocast + loss scaling.
    """

    data_dir: str = _f("", "dataset root holding Train/Images and Train/Labels")
    dataset_mode: str = _f("", "consep, glysac or custom")
    labels_merged: str = _f("auto", LABELS_MERGED_HELP)
    schedule_sampler: str = _f("uniform", "timestep sampler: uniform or loss-second-moment")
    lr: float = _f(1e-4, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_anneal_steps: int = _f(0, "anneal lr linearly to 0 over this many steps, then stop (0: constant lr)")
    batch_size: int = _f(1, "images per step on each rank")
    microbatch: int = _f(-1, "split each batch into chunks of this size, accumulating gradients (-1: off)")
    ema_rate: str = _f("0.9999", "comma-separated EMA rates, one ema_<rate>_NNNNNN.pt per rate")
    drop_rate: float = _f(0.0, "probability of replacing a sample's whole condition by zeros (classifier-free)")
    log_interval: int = _f(10, "write progress.csv / log.txt every this many steps")
    save_interval: int = _f(10000, "save a checkpoint every this many steps (and at the end)")
    resume_checkpoint: str = _f("", "'latest', a checkpoint folder, or a model/ema .pt file ('' to start fresh)")
    fp16_scale_growth: float = _f(1e-3, "fp16 loss-scale growth in log2 per step (doubles every 1/x steps)")
    is_train: bool = _f(True, "read the Train split (False: the Test split)")
    gpu: str = _f("", "deprecated; select GPUs with CUDA_VISIBLE_DEVICES or the launcher (see image_train.py)")
    max_steps: int = _f(0, "stop after this many steps in total, counting resumed ones (0: no limit)")
    log_dir: str = _f("", "run folder (default: $OPENAI_LOGDIR, else runs/train-<time>)")
    seed: int = _f(0, "seed of the initial weights, timesteps, noise, condition dropout and crops")
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value (0: off)")
    keep_checkpoints: int = _f(0, "keep only the newest N complete checkpoints (0: keep all)")
    precision: str = _f("auto", "fp32, bf16 or fp16 autocast; auto: fp16 if --use_fp16 else fp32")
    num_workers: int = _f(0, "data-loading worker processes per rank")
    deterministic: bool = _f(False, "deterministic kernels (bitwise-reproducible resume; slower on GPU)")
    progress: bool = _f(True, "show a progress bar on the terminal")


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


def resolve_precision(precision: str, use_fp16: bool) -> str:
    """The autocast mode: ``auto`` means fp16 when ``use_fp16`` (the official flag), else fp32."""
    if precision not in PRECISIONS:
        raise DiffMixError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if use_fp16 else "fp32"
    return precision


def validate_train_config(cfg: TrainConfig) -> None:
    """Raise :class:`DiffMixError` for settings that cannot work (checked before any heavy work)."""
    problems = []
    if cfg.batch_size < 1:
        problems.append(f"--batch_size must be >= 1 (got {cfg.batch_size})")
    if cfg.microbatch == 0 or cfg.microbatch < -1:
        problems.append(f"--microbatch must be -1 (off) or >= 1 (got {cfg.microbatch})")
    if not 0.0 <= cfg.drop_rate <= 1.0:
        problems.append(f"--drop_rate must be in [0, 1] (got {cfg.drop_rate})")
    if cfg.lr <= 0:
        problems.append(f"--lr must be > 0 (got {cfg.lr})")
    for name in ("log_interval", "save_interval"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
    for name in ("lr_anneal_steps", "max_steps", "keep_checkpoints", "num_workers"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    if cfg.grad_clip < 0:
        problems.append(f"--grad_clip must be >= 0 (got {cfg.grad_clip})")
    if cfg.fp16_scale_growth <= 0:
        problems.append(f"--fp16_scale_growth must be > 0 (got {cfg.fp16_scale_growth})")
    if cfg.precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)} (got {cfg.precision!r})")
    if cfg.labels_merged not in LABELS_MERGED:
        problems.append(f"--labels_merged must be one of {', '.join(LABELS_MERGED)} (got {cfg.labels_merged!r})")
    if cfg.schedule_sampler not in ("uniform", "loss-second-moment"):
        problems.append(f"--schedule_sampler must be uniform or loss-second-moment (got {cfg.schedule_sampler!r})")
    try:
        parse_ema_rates(cfg.ema_rate)
    except DiffMixError as err:
        problems.append(str(err))
    if len(problems) == 1:
        raise DiffMixError(f"invalid training setting: {problems[0]}")
    if problems:
        raise DiffMixError("invalid training settings:\n  " + "\n  ".join(problems))


def check_fresh_start(log_dir: str, resume_checkpoint: str) -> None:
    """Refuse to start a fresh run (no ``--resume_checkpoint``) in a folder that holds checkpoints.

    Training there would interleave two runs' checkpoints and overwrite ``config.json``.
    """
    if resume_checkpoint:
        return
    existing = list_complete_checkpoints(log_dir)
    if existing:
        raise DiffMixError(
            f"{log_dir}: already holds checkpoints (newest: step {existing[-1]}); "
            "pass --resume_checkpoint latest to continue that run, or choose another --log_dir"
        )


# --------------------------------------------------------------------------------------------
# Pure pieces: seeds, EMA, condition dropout, timestep sampling
# --------------------------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, purpose tag), independent streams per tuple."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


@torch.no_grad()
def update_ema(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], rate: float) -> None:
    """In place, for each pair: ``target = rate * target + (1 - rate) * source``.

    Same float operations as the official ``update_ema`` (``mul_(rate).add_(src, alpha=1-rate)``).
    """
    for targ, src in zip(targets, sources):
        targ.mul_(rate).add_(src.detach().to(targ.dtype), alpha=1 - rate)


def drop_condition(
    y: torch.Tensor, drop_rate: float, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free training: zero each sample's whole condition with probability ``drop_rate``.

    Args:
        y: float [N, C, H, W] condition (one-hot classes + instance edges).
        drop_rate: probability in [0, 1].
        generator: torch generator on ``y``'s device (one uniform draw per sample is consumed,
            also when ``drop_rate`` is 0, so the random stream does not depend on it).

    Returns:
        (y with dropped samples all zeros, keep mask bool [N]).
    """
    u = torch.rand(y.shape[0], generator=generator, device=y.device)
    keep = u >= drop_rate
    return y * keep.to(y.dtype).view(-1, *([1] * (y.dim() - 1))), keep


def sample_timesteps(
    sampler: Any, n: int, device: torch.device, generator: Optional[torch.Generator] = None, num_timesteps: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` timesteps by importance sampling over ``sampler.weights()``.

    Returns ``(t, weights)``: t long [n] in [0, T), weights float32 [n] = 1 / (T p(t)), so the
    weighted loss is an unbiased estimate of the uniform-timestep loss. With equal weights (the
    uniform sampler) this is ``randint`` and all weights are 1. ``generator`` lives on ``device``.
    """
    w = np.asarray(sampler.weights(), dtype=np.float64) if sampler is not None else np.ones(num_timesteps)
    if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or w.sum() <= 0:
        raise ValueError("timestep sampler returned invalid weights")
    T = len(w)
    if np.all(w == w[0]):
        t = torch.randint(0, T, (n,), generator=generator, device=device)
        return t, torch.ones(n, dtype=torch.float32, device=device)
    p = torch.from_numpy(w / w.sum()).to(device)
    t = torch.multinomial(p, n, replacement=True, generator=generator)
    weights = (1.0 / (T * p[t])).float()
    return t, weights


def log_loss_dict(num_timesteps: int, ts: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> None:
    """Log the mean of each loss term and its mean per timestep quartile (``loss_q0``..``loss_q3``)."""
    t_cpu = ts.detach().cpu().numpy()
    quart = np.minimum((4 * t_cpu) // max(1, num_timesteps), 3).astype(int)
    for key, values in losses.items():
        vals = values.detach().float().cpu().numpy().reshape(len(t_cpu), -1).mean(axis=1)
        logger.logkv_mean(key, float(vals.mean()))
        for q, v in zip(quart, vals):
            logger.logkv_mean(f"{key}_q{q}", float(v))


# --------------------------------------------------------------------------------------------
# RNG and component state (everything as tensors / numbers / lists / dicts for weights_only)
# --------------------------------------------------------------------------------------------


def capture_global_rng() -> dict[str, Any]:
    """The process-wide random states (torch CPU and CUDA, numpy, python) in a weights_only form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_global_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
    )
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def sampler_state(sampler: Any) -> Optional[dict[str, Any]]:
    """Resume state of a timestep sampler: its ``state_dict()``, else the official loss-aware fields."""
    if sampler is None:
        return None
    if hasattr(sampler, "state_dict"):
        return sampler.state_dict()
    if hasattr(sampler, "_loss_history"):
        return {
            "loss_history": torch.as_tensor(np.asarray(sampler._loss_history)),
            "loss_counts": torch.as_tensor(np.asarray(sampler._loss_counts)),
        }
    return None


def load_sampler_state(sampler: Any, state: Optional[Mapping[str, Any]]) -> None:
    if sampler is None or state is None:
        return
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
    elif hasattr(sampler, "_loss_history") and "loss_history" in state:
        sampler._loss_history = np.asarray(state["loss_history"].numpy(), dtype=np.asarray(sampler._loss_history).dtype)
        sampler._loss_counts = np.asarray(state["loss_counts"].numpy(), dtype=np.asarray(sampler._loss_counts).dtype)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class TrainLoop:
    """Train ``model`` on ``data`` with ``diffusion.training_losses``; see the module docstring.

    Args (official names first):
        model: the U-Net on its device (float32 parameters); called as ``model(x, t, y=cond)``.
        diffusion: provides ``training_losses(model, x, t, model_kwargs, noise)`` and ``num_timesteps``.
        data: iterator of ``(x float [B,3,S,S] in [-1,1], {"y": float [B,C,S,S], ...})``. If it has
            ``state_dict()``/``load_state_dict()`` its position is saved and restored with checkpoints.
        batch_size: images per step on this rank; microbatch: chunk size for accumulation (-1: off).
        lr, weight_decay: AdamW; lr_anneal_steps: linear decay to 0, ending the run.
        ema_rate: comma-separated rates (or a float). drop_rate: classifier-free condition dropout.
        log_interval, save_interval: in steps. resume_checkpoint: see module docstring.
        use_fp16, fp16_scale_growth: official fp16 flags (fp16 autocast + dynamic loss scaling).
        schedule_sampler: object with ``weights()`` (uniform when None); loss-aware samplers also get
            ``update_with_local_losses(t, losses)``.
        num_classes: accepted for compatibility (the condition arrives ready-made).
        max_steps: total steps (0: no limit). log_dir: run folder (default: ``logger.get_dir()``).
        seed: seeds this loop's random stream (timesteps, noise, dropout of the condition).
        grad_clip: max global grad norm (0: off). keep_checkpoints: newest N kept (0: all).
        precision: auto/fp32/bf16/fp16. config: flat settings dict written to config.json.
        progress: show a tqdm progress bar on rank 0.
        prepare_folder: create the run folder and write ``config.json`` now (False: the caller
            calls :meth:`prepare_folder` later, after its own checks).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        diffusion: Any,
        data: Iterator,
        batch_size: int,
        microbatch: int = -1,
        lr: float = 1e-4,
        ema_rate: Any = "0.9999",
        drop_rate: float = 0.0,
        log_interval: int = 10,
        save_interval: int = 10000,
        resume_checkpoint: str = "",
        use_fp16: bool = False,
        fp16_scale_growth: float = 1e-3,
        schedule_sampler: Any = None,
        weight_decay: float = 0.0,
        lr_anneal_steps: int = 0,
        num_classes: Optional[int] = None,
        max_steps: int = 0,
        log_dir: Optional[str] = None,
        seed: int = 0,
        grad_clip: float = 0.0,
        keep_checkpoints: int = 0,
        precision: str = "auto",
        config: Optional[Mapping[str, Any]] = None,
        progress: bool = True,
        prepare_folder: bool = True,
        gpu: Any = None,  # official keyword, ignored: devices come from the launcher
    ):
        self.model = model
        self.diffusion = diffusion
        self.data = data
        self.batch_size = int(batch_size)
        self.microbatch = int(microbatch) if microbatch and microbatch > 0 else self.batch_size
        self.lr = float(lr)
        self.ema_rates = parse_ema_rates(ema_rate)
        self.drop_rate = float(drop_rate)
        self.log_interval = int(log_interval)
        self.save_interval = int(save_interval)
        self.weight_decay = float(weight_decay)
        self.lr_anneal_steps = int(lr_anneal_steps)
        self.max_steps = int(max_steps)
        self.grad_clip = float(grad_clip)
        self.keep_checkpoints = int(keep_checkpoints)
        self.schedule_sampler = schedule_sampler
        self.num_classes = num_classes
        self.seed = int(seed)
        self.progress = progress
        self.precision = resolve_precision(precision, use_fp16)
        self.config = dict(config) if config is not None else None

        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        self.global_batch = self.batch_size * self.world_size
        self.device = next(model.parameters()).device
        self.log_dir = log_dir or logger.get_dir()
        if not self.log_dir:
            raise DiffMixError("no log folder: pass log_dir or call logger.configure() first")
        self.step = 0
        self.last_saved_step = -1
        self.resumed_from: Optional[str] = None

        for p in model.parameters():
            if p.dtype != torch.float32:
                raise DiffMixError(
                    "training needs float32 parameters (mixed precision uses autocast); "
                    f"found a {p.dtype} parameter -- do not convert the model to half precision"
                )
        self.params = [p for p in model.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)
        self.scaler = torch.amp.GradScaler(
            self.device.type,
            init_scale=2.0**INITIAL_LOG_LOSS_SCALE,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=max(1, int(round(1.0 / float(fp16_scale_growth)))),
            enabled=self.precision == "fp16",
        )
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

        # This loop's own random stream (timesteps, noise, condition dropout), distinct per rank;
        # the global torch RNG (dropout layers) is re-seeded per rank too.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(derive_seed(self.seed, self.rank, 1))
        torch.manual_seed(derive_seed(self.seed, self.rank, 2))
        np.random.seed(derive_seed(self.seed, self.rank, 3) % 2**32)
        random.seed(derive_seed(self.seed, self.rank, 4))

        check_fresh_start(self.log_dir, resume_checkpoint)
        resume_path = resolve_resume_checkpoint(resume_checkpoint, self.log_dir)
        # Identical starting weights on every rank (rank 0's), before any loading.
        dist_util.sync_params(self.model.parameters())
        self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rates]
        if resume_path is not None:
            self._load_checkpoint(resume_path)
        elif resume_checkpoint == "latest":
            logger.log(f"no complete checkpoint in {self.log_dir}; starting from step 0")

        self.ddp_model = self.model
        self.use_ddp = self.world_size > 1
        if self.use_ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                output_device=self.device if self.device.type == "cuda" else None,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )

        if prepare_folder:
            self.prepare_folder()

    def prepare_folder(self) -> None:
        """Create the run folder, delete a killed run's temporaries, write ``config.json`` (rank 0).

        Called by the constructor unless ``prepare_folder=False``: :func:`train` calls it itself once
        every input is validated, so a failed start leaves nothing behind.
        """
        if self.rank == 0:
            fileio.makedirs(self.log_dir)
            remove_stale_temporaries(self.log_dir)
            if self.config is not None:
                from .config import CONFIG_NAME, save_config

                save_config(fileio.join(self.log_dir, CONFIG_NAME), self.config)

    # ---- resume -------------------------------------------------------------------------------

    def _load_checkpoint(self, path: str) -> None:
        from .checkpoints import load_model_weights, load_state_dict

        folder = os.path.dirname(path)
        step = parse_resume_step_from_filename(path)
        name = os.path.basename(path)
        marker = valid_marker(folder, marker_filename(step)) if name == f"model{step:06d}.pt" else None
        full = marker is not None and f"train_state{step:06d}.pt" in marker.get("files", {})
        logger.log(f"loading {'checkpoint' if full else 'weights only'} from {path} (step {step})")
        load_model_weights(self.model, path, strict=True)
        names = [n for n, _ in self.model.named_parameters()]
        for i, rate in enumerate(self.ema_rates):
            ema_path = fileio.join(folder, ema_filename(rate, step))
            if fileio.exists(ema_path):
                sd = load_state_dict(ema_path)
                for j, n in enumerate(names):
                    if n not in sd or sd[n].shape != self.ema_params[i][j].shape:
                        found = tuple(sd[n].shape) if n in sd else "missing"
                        raise DiffMixError(
                            f"{ema_path}: EMA weights do not fit the model ({n}: {found}, "
                            f"model {tuple(self.ema_params[i][j].shape)})"
                        )
                    self.ema_params[i][j].copy_(sd[n].to(self.ema_params[i][j]))
            else:
                for e, p in zip(self.ema_params[i], self.params):
                    e.copy_(p.detach())
                logger.log(f"{ema_path} not found; EMA rate {rate} starts from the loaded weights")
        opt_path = fileio.join(folder, f"opt{step:06d}.pt")
        if fileio.exists(opt_path):
            try:
                self.opt.load_state_dict(load_pt(opt_path, map_location=self.device))
            except (ValueError, KeyError, RuntimeError) as err:
                raise DiffMixError(f"{opt_path}: optimizer state does not match this model ({err})") from None
            for group in self.opt.param_groups:
                group["weight_decay"] = self.weight_decay  # this run's setting, not the saved one
        else:
            logger.log(f"{opt_path} not found; the optimizer starts fresh")
        self.step = step
        self.last_saved_step = step
        self.resumed_from = path
        if full:
            self._load_train_state(load_pt(fileio.join(folder, f"train_state{step:06d}.pt")), folder, step)
        self._retire_newer_checkpoints(folder, step)

    def _retire_newer_checkpoints(self, folder: str, step: int) -> None:
        """Resuming from an older checkpoint of this run folder starts a new branch: newer checkpoints
        lose their completion marker (their files stay, usable as weights) so that ``latest`` and
        pruning never mix the two branches."""
        if self.rank != 0 or fileio.is_remote(folder) or not self.log_dir or fileio.is_remote(self.log_dir):
            return
        if os.path.realpath(folder or ".") != os.path.realpath(self.log_dir):
            return
        for newer in [s for s in list_complete_checkpoints(folder) if s > step]:
            with contextlib.suppress(OSError):
                os.remove(fileio.join(folder, marker_filename(newer)))
            logger.warn(f"resuming from step {step}: checkpoint of step {newer} in {folder} no longer counts as complete")

    def _load_train_state(self, state: Any, folder: str, step: int) -> None:
        path = fileio.join(folder, f"train_state{step:06d}.pt")
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise DiffMixError(f"{path}: not a DiffMix training-state file")
        self.step = int(state["step"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        load_sampler_state(self.schedule_sampler, state.get("sampler"))
        ranks = state.get("ranks", [])
        if int(state.get("world_size", 1)) == self.world_size and len(ranks) == self.world_size:
            mine = ranks[self.rank]
            restore_global_rng(mine["rng"])
            self.generator.set_state(mine["generator"].to(self.generator.get_state().device))
            if mine.get("data") is not None and hasattr(self.data, "load_state_dict"):
                self.data.load_state_dict(mine["data"])
        else:
            logger.warn(
                f"{path}: saved with {state.get('world_size')} ranks, resuming with {self.world_size}; "
                "random streams restart from --seed and the data stream restarts at the saved step"
            )
            # The data position (seed, step) is the same on every rank, so rank 0's entry serves all.
            if hasattr(self.data, "load_state_dict") and ranks and ranks[0].get("data") is not None:
                self.data.load_state_dict(ranks[0]["data"])

    def _rank_state(self) -> dict[str, Any]:
        return {
            "rng": capture_global_rng(),
            "generator": self.generator.get_state().cpu(),
            "data": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
        }

    # ---- the loop -----------------------------------------------------------------------------

    @property
    def end_step(self) -> Optional[int]:
        ends = [s for s in (self.max_steps, self.lr_anneal_steps) if s > 0]
        return min(ends) if ends else None

    def run_loop(self) -> int:
        """Train until ``max_steps`` / ``lr_anneal_steps`` (forever if both are 0); returns the step."""
        end = self.end_step
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self._t_last, self._step_last = time.time(), self.step
        try:
            while end is None or self.step < end:
                batch, cond = next(self.data)
                self.run_step(batch, cond)
                if bar is not None:
                    bar.update(1)
                if self.step % self.log_interval == 0:
                    self._dump_metrics(bar)
                if self.step % self.save_interval == 0:
                    self.save()
            if self.step != self._step_last:
                # The last steps did not reach a log interval (e.g. --max_steps < --log_interval):
                # their metrics would otherwise never reach progress.csv.
                self._dump_metrics(bar)
            if self.last_saved_step != self.step:
                self.save()
        finally:
            if bar is not None:
                bar.close()
        return self.step

    def _dump_metrics(self, bar: Any) -> None:
        """Write the metrics accumulated since the last dump (a collective call, like dumpkvs)."""
        now = time.time()
        logger.logkv("steps_per_sec", (self.step - self._step_last) / max(now - self._t_last, 1e-9))
        self._t_last, self._step_last = now, self.step
        logger.logkv("param_norm", self._param_norm())
        kvs = logger.dumpkvs()
        if bar is not None and "loss" in kvs:
            bar.set_postfix(loss=f"{kvs['loss']:.4g}")

    def run_step(self, batch: torch.Tensor, cond: Mapping[str, Any]) -> None:
        """One optimiser update on ``batch``; increments ``self.step``."""
        self._set_lr()
        self.forward_backward(batch, cond)
        took_step, grad_norm = self.optimize()
        if took_step:
            for rate, params in zip(self.ema_rates, self.ema_params):
                update_ema(params, self.params, rate)
        self.step += 1
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])
        if math.isfinite(grad_norm):
            logger.logkv_mean("grad_norm", grad_norm)
        if self.scaler.is_enabled():
            # fp16: steps whose scaled gradients overflowed are skipped and the scale halves.
            logger.logkv_mean("skipped_steps", 0.0 if took_step else 1.0)
            logger.logkv("loss_scale", float(self.scaler.get_scale()))

    def _set_lr(self) -> None:
        # Set every step (not only when annealing) so a resumed run uses this run's --lr.
        lr = self.lr
        if self.lr_anneal_steps:
            lr = self.lr * (1.0 - self.step / self.lr_anneal_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, batch: torch.Tensor, cond: Mapping[str, Any]) -> None:
        """Accumulate the gradient of the batch-mean (importance-weighted) loss over microbatches.

        All random draws (condition dropout, timesteps, noise) are made for the whole batch first,
        so the result does not depend on ``microbatch``. Each microbatch's mean loss is scaled by
        its share of the batch: the accumulated gradient is the full-batch gradient (the official
        loop summed microbatch means instead, multiplying the gradient by the number of chunks).
        """
        self.opt.zero_grad(set_to_none=True)
        if "y" not in cond:
            raise DiffMixError("training batches must carry the condition under cond['y']")
        x = batch.to(self.device)
        y = cond["y"].to(self.device)
        n = x.shape[0]
        y, _ = drop_condition(y, self.drop_rate, self.generator)
        t, weights = sample_timesteps(
            self.schedule_sampler, n, self.device, self.generator, self.diffusion.num_timesteps
        )
        noise = torch.randn(x.shape, generator=self.generator, device=self.device, dtype=x.dtype)
        for i in range(0, n, self.microbatch):
            sl = slice(i, i + self.microbatch)
            last = i + self.microbatch >= n
            sync = contextlib.nullcontext() if (last or not self.use_ddp) else self.ddp_model.no_sync()
            with sync:
                with self._autocast():
                    losses = self.diffusion.training_losses(
                        self.ddp_model, x[sl], t[sl], model_kwargs={"y": y[sl]}, noise=noise[sl]
                    )
                if hasattr(self.schedule_sampler, "update_with_local_losses"):
                    self.schedule_sampler.update_with_local_losses(t[sl], losses["loss"].detach())
                loss = (losses["loss"].float() * weights[sl]).mean()
                self._check_finite(loss)
                log_loss_dict(self.diffusion.num_timesteps, t[sl], {k: v * weights[sl] for k, v in losses.items()})
                self.scaler.scale(loss * (x[sl].shape[0] / n)).backward()

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0], dtype=torch.float64)
        # Agree across ranks before backward, so no rank waits in a gradient all-reduce forever.
        if dist_util.all_reduce_sum(bad).item() > 0:
            raise DiffMixError(
                f"non-finite loss ({loss.item()}) at step {self.step + 1}; stopping. "
                f"The last complete checkpoint in {self.log_dir} is unaffected "
                "(try a lower --lr, --grad_clip, or --precision fp32/bf16)"
            )

    def optimize(self) -> tuple[bool, float]:
        """Unscale, measure (and clip) the gradient norm, step AdamW; returns (took_step, grad_norm)."""
        # unscale_ covers every parameter group of the optimizer (the official fp16 path missed one).
        self.scaler.unscale_(self.opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else torch.zeros(())
        grad_norm = float(norm)
        if not self.scaler.is_enabled():
            if not math.isfinite(grad_norm):
                raise DiffMixError(f"non-finite gradient norm at step {self.step + 1}; stopping (try --grad_clip or a lower --lr)")
            self.opt.step()
            return True, grad_norm
        scale = self.scaler.get_scale()
        self.scaler.step(self.opt)  # skipped when the scaled gradients overflowed
        self.scaler.update()
        return self.scaler.get_scale() >= scale, grad_norm

    @torch.no_grad()
    def _param_norm(self) -> float:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in self.params])))

    # ---- saving -------------------------------------------------------------------------------

    def ema_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` layout with the EMA values of rate ``self.ema_rates[index]``."""
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        for (name, _), value in zip(self.model.named_parameters(), self.ema_params[index]):
            sd[name] = value.detach().cpu()
        return sd

    def save(self) -> None:
        """Write the checkpoint of the current step (rank 0), then prune; a collective call."""
        ranks = [None] * self.world_size
        mine = self._rank_state()
        if self.world_size > 1:
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        error = None
        if self.rank == 0:
            step = self.step
            state = {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "step": step,
                "world_size": self.world_size,
                "seed": self.seed,
                "ema_rates": list(self.ema_rates),
                "precision": self.precision,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "sampler": sampler_state(self.schedule_sampler),
                "ranks": ranks,
            }
            # Built lazily, one file at a time (a 256-channel model's optimizer state is GBs).
            files: dict[str, Any] = {
                f"model{step:06d}.pt": lambda: {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            }
            for i, rate in enumerate(self.ema_rates):
                files[ema_filename(rate, step)] = functools.partial(self.ema_state_dict, i)
            files[f"opt{step:06d}.pt"] = lambda: _to_cpu(self.opt.state_dict())
            files[f"train_state{step:06d}.pt"] = state
            try:
                write_checkpoint(self.log_dir, step, files, {"seed": self.seed, "world_size": self.world_size},
                                 expected_bytes=checkpoint_bytes(sum(p.numel() for p in self.params), len(self.ema_rates)))
                logger.log(f"saved checkpoint of step {step} to {self.log_dir}")
                for s in prune_checkpoints(self.log_dir, self.keep_checkpoints):
                    logger.log(f"removed checkpoint of step {s} (--keep_checkpoints {self.keep_checkpoints})")
            except DiffMixError as err:
                error = str(err)
        error = dist_util.broadcast_object(error)
        if error is not None:
            raise DiffMixError(error)
        self.last_saved_step = self.step


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# Whole runs (what scripts/image_train.py calls)
# --------------------------------------------------------------------------------------------


def flat_config(model_cfg: Any, train_cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The settings written to config.json: model fields, then train fields, then ``extra``."""
    out = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dataclasses.asdict(model_cfg))
    out.update(dataclasses.asdict(train_cfg))
    out.update(extra)
    return out


def train(model_cfg: Any, train_cfg: TrainConfig, data: Optional[Iterator] = None) -> TrainLoop:
    """Run a whole training job (set-up, model, data, loop); returns the finished loop.

    ``model_cfg`` is a :class:`guided_diffusion.config.ModelConfig`. ``data`` replaces the dataset
    reader (tests, custom pipelines). Call inside :func:`guided_diffusion.errors.run_cli`.

    Every user input is checked before anything is written: settings, the resume file and the
    "folder already holds checkpoints" case, the model, the dataset, and the resume checkpoint
    (loaded into the model). Only then is the run folder created and the logger configured, so a
    failed start leaves no folder behind; messages before that point reach the terminal only.
    """
    from .resample import create_named_schedule_sampler
    from .script_util import create_model_and_diffusion

    validate_train_config(train_cfg)
    precision = resolve_precision(train_cfg.precision, bool(getattr(model_cfg, "use_fp16", False)))
    if data is None and not train_cfg.data_dir:
        raise DiffMixError("--data_dir is required (a dataset root holding Train/Images and Train/Labels)")
    if data is None and not fileio.exists(train_cfg.data_dir):
        raise DiffMixError(f"{train_cfg.data_dir}: --data_dir not found")
    if train_cfg.deterministic:
        # Before CUDA starts (setup_dist pins the device): cuBLAS reads this variable once.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    info = dist_util.setup_dist()
    log_dir = dist_util.broadcast_object(train_cfg.log_dir or logger.default_dir())
    # Cheap checks of the run folder first, before the model and the dataset take their time.
    runlock.acquire_on_rank0(log_dir, "training", info.rank, dist_util.broadcast_object, "--log_dir", check_only=True)
    check_fresh_start(log_dir, train_cfg.resume_checkpoint)
    resume_path = resolve_resume_checkpoint(train_cfg.resume_checkpoint, log_dir)
    resume_step = parse_resume_step_from_filename(resume_path) if resume_path else None

    # Same seed on every rank, so all ranks build identical weights (also broadcast by the loop).
    torch.manual_seed(train_cfg.seed)
    model, diffusion = create_model_and_diffusion(**model_cfg.to_dict())
    model.to(dist_util.dev())
    sampler = create_named_schedule_sampler(train_cfg.schedule_sampler, diffusion)
    if data is None:
        from .data.training import load_data

        logger.log(f"reading {train_cfg.data_dir} ({train_cfg.dataset_mode})...")
        data = load_data(
            data_dir=train_cfg.data_dir,
            dataset_mode=train_cfg.dataset_mode,
            batch_size=train_cfg.batch_size,
            image_size=model_cfg.image_size,
            num_classes=model_cfg.num_classes,
            no_instance=model_cfg.no_instance,
            seed=train_cfg.seed,
            split="Train" if train_cfg.is_train else "Test",
            num_workers=train_cfg.num_workers,
            progress=info.rank == 0,
            labels_merged=train_cfg.labels_merged,
        )
        data_classes = getattr(data, "num_classes", model_cfg.num_classes)
        if data_classes != model_cfg.num_classes:
            raise DiffMixError(
                f"{train_cfg.data_dir}: dataset mode {train_cfg.dataset_mode!r} has {data_classes} classes "
                f"but --num_classes is {model_cfg.num_classes}"
            )
    # Builds the optimizer and loads the resume checkpoint (a bad file fails here, nothing written yet).
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=train_cfg.batch_size,
        microbatch=train_cfg.microbatch,
        lr=train_cfg.lr,
        ema_rate=train_cfg.ema_rate,
        drop_rate=train_cfg.drop_rate,
        log_interval=train_cfg.log_interval,
        save_interval=train_cfg.save_interval,
        resume_checkpoint=resume_path or train_cfg.resume_checkpoint,
        use_fp16=bool(getattr(model_cfg, "use_fp16", False)),
        fp16_scale_growth=train_cfg.fp16_scale_growth,
        schedule_sampler=sampler,
        weight_decay=train_cfg.weight_decay,
        lr_anneal_steps=train_cfg.lr_anneal_steps,
        max_steps=train_cfg.max_steps,
        log_dir=log_dir,
        seed=train_cfg.seed,
        grad_clip=train_cfg.grad_clip,
        keep_checkpoints=train_cfg.keep_checkpoints,
        precision=precision,
        config=flat_config(model_cfg, train_cfg, precision_resolved=precision, world_size=info.world_size),
        progress=train_cfg.progress,
        prepare_folder=False,
    )

    # Everything checked: from here on the run folder is written.
    run_lock = runlock.acquire_on_rank0(log_dir, "training", info.rank, dist_util.broadcast_object, "--log_dir")
    logger.configure(log_dir, resume_step=resume_step)
    loop.prepare_folder()
    logger.log(
        f"run folder {log_dir}; rank {info.rank}/{info.world_size} ({info.launcher}, {info.backend}) "
        f"on {dist_util.dev()}; precision {precision}"
    )
    if loop.resumed_from is not None:
        logger.log(f"resumed from {loop.resumed_from} at step {loop.step}")
    n_params = sum(p.numel() for p in model.parameters())
    logger.log(f"model: {n_params / 1e6:.2f} M parameters; global batch {train_cfg.batch_size * info.world_size}")
    if info.rank == 0 and (notice := disk_use_notice(log_dir, checkpoint_bytes(n_params, len(loop.ema_rates)),
                                                     train_cfg.keep_checkpoints, loop.end_step or 0,
                                                     train_cfg.save_interval, loop.step)):
        logger.log(notice)
    if loop.end_step is None:
        logger.log("no --max_steps or --lr_anneal_steps: training runs until interrupted")
    logger.log("training...")
    loop.run_loop()
    logger.log(f"done at step {loop.step}; checkpoints in {log_dir}")
    if run_lock is not None:
        run_lock.release()
    return loop
