"""Timestep samplers for training: which t each sample gets, with importance weights.

``sample`` (what training calls) draws t from p(t) proportional to ``weights()`` and returns weights 1 / (T * p(t)), so
the weighted loss is an unbiased estimate of the uniform-t objective. ``loss-second-moment``
(Nichol & Dhariwal 2021) samples t proportional to sqrt(E[L_t^2]) once every t has a full loss
history, reducing the variance of the VLB objective.

``t_max`` (DiffMix's "train where you sample") is a different objective, not an estimator of the
uniform one: t is drawn uniformly from [0, t_max] with weight 1. DiffMix's synthesis starts part-way
(ddim_percent 55 starts at t <= 540 of 1000), so capacity spent on larger t is never used; such a
model cannot sample from pure noise, and synthesis refuses a start above its ``t_max``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .infra.errors import DiffMixError


def create_named_schedule_sampler(name: str, diffusion, t_max: int = 0) -> "ScheduleSampler":
    """``"uniform"`` -> :class:`UniformSampler`; ``"loss-second-moment"`` ->
    :class:`LossSecondMomentResampler` (both over ``diffusion.num_timesteps``). ``t_max`` > 0
    (uniform only): :class:`TruncatedUniformSampler` over [0, t_max]."""
    if t_max:
        if name != "uniform":
            raise DiffMixError(f"--t_max works with --schedule_sampler uniform only (got {name!r})")
        return TruncatedUniformSampler(diffusion, t_max)
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise DiffMixError(f"unknown schedule_sampler {name!r} (expected 'uniform' or 'loss-second-moment')")


class ScheduleSampler(ABC):
    """Distribution over timesteps [0, T) with importance weights."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive float64 weights ``[T]``."""

    def sample(
        self, batch_size: int, device, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw timesteps for a batch by importance sampling over :meth:`weights` (training's draw).

        :param generator: optional ``torch.Generator`` on ``device`` for reproducible draws; the
            global torch RNG otherwise.
        :return: ``(timesteps, weights)``: long ``[batch_size]`` in [0, T) and float32
            ``[batch_size]`` importance weights 1 / (T p(t)), both on ``device``, so the weighted
            loss is an unbiased estimate of the uniform-timestep loss. With equal weights (the
            uniform sampler, or a loss-aware one before warm-up) this is ``randint`` and every
            weight is 1.
        """
        w = np.asarray(self.weights(), dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or not np.all(np.isfinite(w)) or w.sum() <= 0:
            raise ValueError("timestep sampler returned invalid weights")
        T = len(w)
        if np.all(w == w[0]):
            t = torch.randint(0, T, (batch_size,), generator=generator, device=device)
            return t, torch.ones(batch_size, dtype=torch.float32, device=device)
        p = torch.from_numpy(w / w.sum()).to(device)
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        return t, (1.0 / (T * p[t])).float()


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps], dtype=np.float64)

    def weights(self) -> np.ndarray:
        return self._weights


class TruncatedUniformSampler(ScheduleSampler):
    """t uniform on [0, t_max] with weight 1 (see the module docstring: a chosen objective, so no
    importance reweighting towards the full range)."""

    def __init__(self, diffusion, t_max: int):
        T = diffusion.num_timesteps
        if not 0 < int(t_max) < T:
            raise DiffMixError(f"--t_max {t_max}: must be in 1..{T - 1} (0: the full range of {T} steps)")
        self.diffusion, self.t_max = diffusion, int(t_max)
        self._weights = (np.arange(T) <= self.t_max).astype(np.float64)

    def weights(self) -> np.ndarray:
        return self._weights

    def sample(self, batch_size: int, device, generator: Optional[torch.Generator] = None):
        t = torch.randint(0, self.t_max + 1, (batch_size,), generator=generator, device=device)
        return t, torch.ones(batch_size, dtype=torch.float32, device=device)


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights adapt to the training losses it is told about."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Report this process's ``(t, loss)`` pairs (``[B]`` each); with torch.distributed
        initialised they are gathered from every rank first so all ranks keep identical weights."""
        ts = local_ts.detach().reshape(-1)
        losses = local_losses.detach().reshape(-1).float()
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            size = torch.tensor([ts.numel()], dtype=torch.int64, device=ts.device)
            sizes = [torch.zeros_like(size) for _ in range(world)]
            dist.all_gather(sizes, size)
            counts = [int(s.item()) for s in sizes]
            # all_gather needs equal shapes: pad to the largest batch, then trim.
            max_n = max(counts)
            ts_pad = torch.zeros(max_n, dtype=ts.dtype, device=ts.device)
            loss_pad = torch.zeros(max_n, dtype=losses.dtype, device=losses.device)
            ts_pad[: ts.numel()] = ts
            loss_pad[: losses.numel()] = losses
            all_ts = [torch.zeros_like(ts_pad) for _ in range(world)]
            all_losses = [torch.zeros_like(loss_pad) for _ in range(world)]
            dist.all_gather(all_ts, ts_pad)
            dist.all_gather(all_losses, loss_pad)
            ts_list = [int(x) for b, n in zip(all_ts, counts) for x in b[:n].tolist()]
            loss_list = [float(x) for b, n in zip(all_losses, counts) for x in b[:n].tolist()]
        else:
            ts_list = [int(x) for x in ts.tolist()]
            loss_list = [float(x) for x in losses.tolist()]
        self.update_with_all_losses(ts_list, loss_list)

    @abstractmethod
    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        """Update with the losses of every rank (identical call on all ranks)."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(mean of the last ``history_per_term`` squared losses at t), mixed
    with ``uniform_prob`` of the uniform distribution; uniform until every t has a full history."""

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest entry.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def state_dict(self) -> dict:
        """Resume state: ``loss_history`` float64 ``[T, history]`` and ``loss_counts`` int64 ``[T]``."""
        return {
            "loss_history": torch.from_numpy(self._loss_history.copy()),
            "loss_counts": torch.from_numpy(self._loss_counts.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        history = np.asarray(torch.as_tensor(state["loss_history"]).cpu().numpy(), dtype=np.float64)
        counts = np.asarray(torch.as_tensor(state["loss_counts"]).cpu().numpy(), dtype=np.int64)
        if history.shape != self._loss_history.shape or counts.shape != self._loss_counts.shape:
            raise DiffMixError(
                f"timestep sampler state has loss history {history.shape} / counts {counts.shape}, expected "
                f"{self._loss_history.shape} / {self._loss_counts.shape} (different diffusion_steps?)"
            )
        self._loss_history, self._loss_counts = history, counts

    def _warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())
