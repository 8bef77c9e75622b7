"""Likelihood helpers for the diffusion variational bound (Gaussian KL and the DDPM decoder).

All functions are elementwise over tensors of any (broadcastable) shape and return values in nats;
callers divide by ``log(2)`` for bits. They follow the DDPM/guided-diffusion numerics exactly
(tanh approximation of the normal CDF, open-ended outer bins, logs clamped at 1e-12) because the
reported bits-per-dimension of official checkpoints depend on them.
"""

from __future__ import annotations

import math
from typing import Union

import torch

Number = Union[float, torch.Tensor]

# Half-width of one 8-bit intensity bin once pixels are scaled from [0, 255] to [-1, 1].
_BIN_HALF_WIDTH = 1.0 / 255.0
# Pixels beyond these edges lie in the first/last bin, which extends to -inf/+inf.
_EDGE = 0.999
_LOG_CLAMP = 1e-12


def normal_kl(mean1: Number, logvar1: Number, mean2: Number, logvar2: Number) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other; at least one must be a tensor (scalars are
    converted to tensors of its dtype/device so the log-variances can be exponentiated).
    """
    tensor = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if tensor is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (
        lv if isinstance(lv, torch.Tensor) else torch.tensor(lv, dtype=tensor.dtype, device=tensor.device)
        for lv in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF via the tanh approximation 0.5*(1+tanh(sqrt(2/pi)*(x+0.044715x^3))).

    Kept instead of ``erf`` for bit-compatibility with the official likelihood numbers.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability of 8-bit data under a Gaussian discretised into 256 bins.

    :param x: float [N, C, H, W] targets in [-1, 1] that were uint8 values rescaled
        (x = v / 127.5 - 1).
    :param means: float, same shape: Gaussian means.
    :param log_scales: float, same shape: log standard deviations.
    :return: float, same shape: log-likelihoods in nats (<= 0). Each bin has half-width 1/255;
        values below -0.999 / above 0.999 get the open-ended outer bins.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + _BIN_HALF_WIDTH))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - _BIN_HALF_WIDTH))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=_LOG_CLAMP))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=_LOG_CLAMP))
    cdf_delta = cdf_plus - cdf_min
    log_probs = torch.where(
        x < -_EDGE,
        log_cdf_plus,
        torch.where(x > _EDGE, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=_LOG_CLAMP))),
    )
    return log_probs
