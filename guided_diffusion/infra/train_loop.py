"""The training loop (``TrainLoop``): AdamW + EMA, classifier-free condition dropout, mixed precision, checkpoints.

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
import math
import random
import time
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import dist_util, logger
from ..resample import UniformSampler, create_named_schedule_sampler
from . import fileio
from .checkpoint_folder import ResumePlan, load_resume_checkpoint, plan_resume, remove_stale_temporaries, save_checkpoint
from .config import CONFIG_NAME, save_config
from .errors import DiffMixError
from .precision import autocast_context, resolve_precision, sdm_half
from .train_config import TrainConfig, parse_ema_rates
from .train_state import derive_seed

# Official MixedPrecisionTrainer started at 2**20; its log2 scale grew by fp16_scale_growth per step.
INITIAL_LOG_LOSS_SCALE = 20.0


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
# The loop
# --------------------------------------------------------------------------------------------


class TrainLoop:
    """Train ``model`` on ``data`` with ``diffusion.training_losses``; see the module docstring.

    Args (official names first):
        model: the U-Net on its device (float32 parameters); called as ``model(x, t, y=cond)``.
        diffusion: provides ``training_losses(model, x, t, model_kwargs, noise, mse_weight)``,
            ``min_snr_weight(t, gamma)`` and ``num_timesteps``.
        data: iterator of ``(x float [B,3,S,S] in [-1,1], {"y": float [B,C,S,S], ...})``. If it has
            ``state_dict()``/``load_state_dict()`` its position is saved and restored with checkpoints.
        batch_size: images per step on this rank; microbatch: chunk size for accumulation (-1: off).
        lr, weight_decay: AdamW; lr_anneal_steps: linear decay to 0, ending the run.
        ema_rate: comma-separated rates (or a float). drop_rate: classifier-free condition dropout.
        log_interval, save_interval: in steps. resume_checkpoint: see module docstring (or a
            :class:`~guided_diffusion.infra.checkpoint_folder.ResumePlan` already made by the caller).
        use_fp16, fp16_scale_growth: official fp16 flags (fp16 autocast + dynamic loss scaling).
        schedule_sampler: a :class:`~guided_diffusion.resample.ScheduleSampler` (uniform when None);
            loss-aware samplers also get ``update_with_local_losses(t, losses)``.
        num_classes: accepted for compatibility (the condition arrives ready-made).
        max_steps: total steps (0: no limit). log_dir: run folder (default: ``logger.get_dir()``).
        seed: seeds this loop's random stream (timesteps, noise, dropout of the condition).
        grad_clip: max global grad norm (0: off). keep_checkpoints: newest N kept (0: all).
        precision: auto/fp32/bf16/fp16. config: flat settings dict written to config.json.
        progress: show a tqdm progress bar on rank 0.
        snr_gamma: min-SNR-gamma weighting of the MSE term (0: off, the official loss).
        prepare_folder: create the run folder and write ``config.json`` now (False: the caller
            calls :meth:`prepare_folder` later, after its own checks).
        gpu: the official DiffMix keyword, accepted and ignored (devices come from the launcher).

    The package builds the loop from its typed settings with :meth:`from_config`; this keyword
    form is the official API.
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
        resume_checkpoint: Union[str, ResumePlan] = "",
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
        snr_gamma: float = 0.0,
        gpu: Any = None,
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
        self.snr_gamma = float(snr_gamma)
        self.keep_checkpoints = int(keep_checkpoints)
        self.schedule_sampler = schedule_sampler if schedule_sampler is not None else UniformSampler(diffusion)
        self.num_classes = num_classes
        self.seed = int(seed)
        self.progress = progress
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device, sdm_half(use_fp16))
        self.config = dict(config) if config is not None else None

        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        self.global_batch = self.batch_size * self.world_size
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

        # This loop's own random stream (timesteps, noise, condition dropout), distinct per rank;
        # the global torch RNG (dropout layers) is re-seeded per rank too.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(derive_seed(self.seed, self.rank, 1))
        torch.manual_seed(derive_seed(self.seed, self.rank, 2))
        np.random.seed(derive_seed(self.seed, self.rank, 3) % 2**32)
        random.seed(derive_seed(self.seed, self.rank, 4))

        plan = resume_checkpoint if isinstance(resume_checkpoint, ResumePlan) else plan_resume(resume_checkpoint, self.log_dir)
        # Identical starting weights on every rank (rank 0's), before any loading.
        dist_util.sync_params(self.model.parameters())
        self.ema_params = [[p.detach().clone() for p in self.params] for _ in self.ema_rates]
        if plan.path is not None:
            load_resume_checkpoint(self, plan.path)
        elif plan.requested == "latest":
            logger.log(f"no complete checkpoint in {self.log_dir}; starting from step 0")

        self.ddp_model = self.model
        self.use_ddp = self.world_size > 1
        if self.use_ddp:
            self.ddp_model = DistributedDataParallel(
                self.model,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                output_device=self.device if self.device.type == "cuda" else None,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )

        if prepare_folder:
            self.prepare_folder()

    @classmethod
    def from_config(cls, *, model: torch.nn.Module, diffusion: Any, data: Iterator, cfg: TrainConfig,
                    use_fp16: bool = False, **overrides: Any) -> "TrainLoop":
        """The loop of a :class:`~guided_diffusion.infra.train_config.TrainConfig` (how the package builds it).

        Each setting of ``cfg`` goes to the keyword of the same meaning; the named timestep sampler
        is built on ``diffusion`` (``cfg.schedule_sampler``, ``cfg.t_max``). ``use_fp16`` is the
        model setting (:class:`~guided_diffusion.infra.config.ModelConfig`). ``overrides`` replace any
        keyword, e.g. ``resume_checkpoint`` (a :class:`ResumePlan`), ``log_dir``, a resolved
        ``precision``, ``config``, ``prepare_folder``.
        """
        kwargs: dict[str, Any] = dict(
            batch_size=cfg.batch_size,
            microbatch=cfg.microbatch,
            lr=cfg.lr,
            ema_rate=cfg.ema_rate,
            drop_rate=cfg.drop_rate,
            log_interval=cfg.log_interval,
            save_interval=cfg.save_interval,
            resume_checkpoint=cfg.resume_checkpoint,
            fp16_scale_growth=cfg.fp16_scale_growth,
            weight_decay=cfg.weight_decay,
            lr_anneal_steps=cfg.lr_anneal_steps,
            max_steps=cfg.max_steps,
            log_dir=cfg.log_dir or None,
            seed=cfg.seed,
            grad_clip=cfg.grad_clip,
            keep_checkpoints=cfg.keep_checkpoints,
            precision=cfg.precision,
            progress=cfg.progress,
            snr_gamma=cfg.snr_gamma,
        )
        kwargs.update(overrides)
        if kwargs.get("schedule_sampler") is None:
            kwargs["schedule_sampler"] = create_named_schedule_sampler(cfg.schedule_sampler, diffusion, cfg.t_max)
        return cls(model=model, diffusion=diffusion, data=data, use_fp16=use_fp16, **kwargs)

    def prepare_folder(self) -> None:
        """Create the run folder, delete a killed run's temporaries, write ``config.json`` (rank 0).

        Called by the constructor unless ``prepare_folder=False``: :func:`train` calls it itself once
        every input is validated, so a failed start leaves nothing behind.
        """
        if self.rank == 0:
            fileio.makedirs(self.log_dir)
            remove_stale_temporaries(self.log_dir)
            if self.config is not None:
                save_config(fileio.join(self.log_dir, CONFIG_NAME), self.config)

    @property
    def end_step(self) -> Optional[int]:
        ends = [s for s in (self.max_steps, self.lr_anneal_steps) if s > 0]
        return min(ends) if ends else None

    def run_loop(self) -> int:
        """Train until ``max_steps`` / ``lr_anneal_steps`` (forever if both are 0); returns the step."""
        end = self.end_step
        bar = None
        if self.progress and self.rank == 0:
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
        t, weights = self.schedule_sampler.sample(n, self.device, self.generator)
        noise = torch.randn(x.shape, generator=self.generator, device=self.device, dtype=x.dtype)
        mse_weight = self.diffusion.min_snr_weight(t, self.snr_gamma) if self.snr_gamma > 0 else None
        for i in range(0, n, self.microbatch):
            sl = slice(i, i + self.microbatch)
            last = i + self.microbatch >= n
            sync = contextlib.nullcontext() if (last or not self.use_ddp) else self.ddp_model.no_sync()
            with sync:
                with autocast_context(self.precision, self.device):
                    losses = self.diffusion.training_losses(
                        self.ddp_model, x[sl], t[sl], model_kwargs={"y": y[sl]}, noise=noise[sl],
                        mse_weight=None if mse_weight is None else mse_weight[sl],
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

    # ---- saving (checkpoint_folder.save_checkpoint) ---------------------------------------------

    def ema_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` layout with the EMA values of rate ``self.ema_rates[index]``."""
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        for (name, _), value in zip(self.model.named_parameters(), self.ema_params[index]):
            sd[name] = value.detach().cpu()
        return sd

    def save(self) -> None:
        """Write the checkpoint of the current step (rank 0), then prune; a collective call."""
        save_checkpoint(self)
