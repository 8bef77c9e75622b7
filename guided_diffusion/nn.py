"""Small building blocks shared by the U-Net: normalisation, zero init, timestep embedding, checkpointing.

Names follow openai/guided-diffusion (``GroupNorm32``, ``normalization``, ``zero_module``,
``timestep_embedding``, ``checkpoint``) so code written against the official package keeps working.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def autocast_disabled(device_type: str) -> ContextManager:
    """A context that turns autocast off for ``device_type`` if it is on (else does nothing).

    Entering ``torch.autocast`` is skipped when autocast is off, which also keeps devices without
    autocast support (``meta``) working.
    """
    try:
        active = torch.is_autocast_enabled(device_type)
    except (RuntimeError, TypeError):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False) if active else contextlib.nullcontext()


class SiLU(nn.Module):
    """x * sigmoid(x), computed as the official model does on the CPU.

    ``F.silu`` rounds differently from the official two-op form; near t = T the x_0 prediction
    amplifies the noise prediction ~150x, enough for last-bit differences to show. On the CPU (where
    fidelity to official numbers is checked) the official form is used; elsewhere the fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x) if x.device.type == "cpu" else F.silu(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype.

    The official model keeps these norms in float32 even when the trunk runs in half precision,
    because group statistics over large feature maps lose too much precision in fp16.

    Input/output: float tensor [N, C, ...] (any float dtype); output has the input's dtype.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        # autocast is turned off so the float32 computation really happens in float32.
        with autocast_disabled(x.device.type):
            out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The standard normalisation layer: 32 groups, affine, eps 1e-5."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (used for residual output convs)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding (cosines first, then sines).

    With ``half = dim // 2`` and ``f_i = exp(-ln(max_period) * i / half)`` for ``i < half``,
    the embedding of ``t`` is ``[cos(t f_0) .. cos(t f_{half-1}), sin(t f_0) .. sin(t f_{half-1})]``,
    plus one zero column when ``dim`` is odd.

    Args:
        timesteps: [N] tensor of (possibly fractional) timesteps, any numeric dtype.
        dim: embedding width.
        max_period: controls the lowest frequency.

    Returns:
        float32 tensor [N, dim].
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def checkpoint(func: Callable[..., torch.Tensor], *args, enabled: bool = True):
    """Run ``func(*args)``, with gradient checkpointing when ``enabled`` and autograd is on.

    Checkpointing recomputes the activations of ``func`` in the backward pass instead of storing
    them; results and gradients are the same as without it. Uses the non-reentrant implementation,
    which supports keyword-free tuple inputs that do not require grad and nested use.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *args, use_reentrant=False)
    return func(*args)
