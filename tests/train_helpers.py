"""Small models, data and settings shared by the training tests (tests/test_train*.py)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from guided_diffusion import logger
from guided_diffusion.respace import create_gaussian_diffusion

COND_CH = 6  # 5 classes + instance edges
STEPS = 50  # diffusion steps: short, but the linear schedule stays below beta = 1

# The real SDM U-Net at its smallest useful size (about 2.8 M parameters, ~0.5 s per step on one core).
TINY_UNET = dict(
    image_size=32,
    num_classes=5,
    num_channels=32,
    num_res_blocks=1,
    num_head_channels=16,
    attention_resolutions="16",
    channel_mult="1,2",
    class_cond=True,
    learn_sigma=True,
    diffusion_steps=STEPS,
    resblock_updown=True,
    dropout=0.1,  # exercises the global torch RNG (restored on resume)
)


class MicroDenoiser(nn.Module):
    """A stand-in for the U-Net with its call form: ``model(x, t, y=cond) -> [N, 6, H, W]``.

    One 3x3 conv over ``[x, y]`` plus a learned bias per timestep, then dropout (which draws from
    the global torch RNG, like the U-Net's dropout). Fast enough for many-step loop tests.
    """

    def __init__(self, cond_ch: int = COND_CH, steps: int = STEPS, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(3 + cond_ch, 6, 3, padding=1)
        self.temb = nn.Embedding(steps, 6)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor = None, **kwargs) -> torch.Tensor:
        h = self.conv(torch.cat([x, y.to(x.dtype)], 1)) + self.temb(t)[:, :, None, None].to(x.dtype)
        return self.drop(h)


def micro_diffusion(steps: int = STEPS):
    return create_gaussian_diffusion(steps=steps, learn_sigma=True, noise_schedule="linear")


class SeededBatches:
    """Deterministic resumable batches: batch k is a pure function of (seed, k).

    Yields ``(x float [n,3,s,s] in [-1,1], {"y": float {0,1} [n,COND_CH,s,s]})`` and exposes
    ``state_dict``/``load_state_dict`` like the real training pipeline. ``nan_at`` puts NaN into
    the images of that batch index (0-based).
    """

    def __init__(self, n: int = 4, size: int = 8, seed: int = 0, nan_at: int = -1, rank: int = 0):
        self.n, self.size, self.seed, self.nan_at, self.rank = n, size, seed, nan_at, rank
        self.step = 0

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 10_007 + self.step)
        x = torch.rand(self.n, 3, self.size, self.size, generator=g) * 2 - 1
        y = (torch.rand(self.n, COND_CH, self.size, self.size, generator=g) > 0.5).float()
        if self.step == self.nan_at:
            x[0, 0, 0, 0] = float("nan")
        self.step += 1
        return x, {"y": y}

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["step"])


@contextlib.contextmanager
def quiet_logger(folder: str):
    """Log to files in ``folder`` only (no terminal output) for the duration of a test."""
    logger.configure(str(folder), format_strs=("log", "csv"))
    try:
        yield
    finally:
        logger.close()


@contextlib.contextmanager
def one_thread():
    """Run with one intra-op thread: on a shared 2-core machine two threads mostly wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def state_equal(a: dict, b: dict) -> bool:
    """Bitwise equality of two (nested) state dicts of tensors / numbers."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b
