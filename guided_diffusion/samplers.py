"""Pure sampling math over a denoiser: DDIM, DDPM ancestral and DPM-Solver++(2M) (ODE or SDE), plus guidance.

This is the single implementation of the per-step formulas; :class:`~guided_diffusion.
gaussian_diffusion.GaussianDiffusion` calls the same functions, so the fast path
(:func:`sample_ddim` over any callable) and the official-form path
(``GaussianDiffusion.ddim_sample_loop``) give bit-identical results for the same start state and
noises.

Conventions (shared by every function here):

* ``x`` is a float tensor ``[N, C, H, W]`` (any trailing dims work); images live in ``[-1, 1]``.
* Schedule arrays are float64 numpy; a coefficient is computed in float64 and cast to float32 right
  before it multiplies a tensor, exactly like the official ``_extract_into_tensor``. ``abar`` arguments
  may be a Python/numpy float (one level for the whole batch) or a float64 tensor ``[N]``.
* Indices ``i`` are *respaced* indices ``0..S-1`` of the (possibly respaced) diffusion; the model sees
  ``schedule.model_timesteps(i)`` (the original timestep, or its 0..1000 rescaling).
* A *denoiser* is any callable ``denoiser(x, t_model) -> output`` with ``output`` float
  ``[N, C, H, W]`` (epsilon, or x0 for ``start_x`` schedules) or ``[N, 2C, H, W]`` (prediction then
  learned-variance values in ``[-1, 1]``). Guidance is expected to be applied already (see
  :func:`cfg_combine`).
* Random draws take an optional ``torch.Generator``; without one they use the global torch RNG in
  the same order as the official code (one ``randn_like(x)`` per step, after the model call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from .infra.errors import DiffMixError

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# keep(x, abar) -> x with a known region replaced by a reference noised to level abar (1.0 = clean).
Keep = Callable[[torch.Tensor, float], torch.Tensor]
Level = Union[float, np.floating, torch.Tensor]
Indices = Union[int, Sequence[int]]

VAR_TYPES = ("learned", "fixed_small", "fixed_large", "learned_range")
MEAN_TYPES = ("previous_x", "start_x", "epsilon")

ARRAY_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


# ---------------------------------------------------------------------------------------------
# Schedule arrays
# ---------------------------------------------------------------------------------------------


def diffusion_arrays(betas: Sequence[float]) -> Dict[str, np.ndarray]:
    """Every float64 ``[S]`` array the diffusion needs, derived from ``betas`` (0 < beta <= 1).

    Keys are :data:`ARRAY_NAMES`. ``alphas_cumprod_prev[0] = 1`` and ``alphas_cumprod_next[-1] = 0``;
    ``posterior_log_variance_clipped[0]`` repeats entry 1 because the true posterior variance at
    t = 0 is zero (its log would be -inf).
    """
    betas = np.array(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise ValueError("betas must lie in (0, 1]")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas, axis=0)
    abar_prev = np.append(1.0, abar[:-1])
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    # A one-step process has no entry 1 to borrow; fall back to beta_0 (only reachable with S = 1).
    first = posterior_variance[1] if betas.size > 1 else betas[0]
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "alphas_cumprod_next": np.append(abar[1:], 0.0),
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.append(first, posterior_variance[1:])),
        "posterior_mean_coef1": betas * np.sqrt(abar_prev) / (1.0 - abar),
        "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    }


def extract_into_tensor(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
    """``arr[timesteps]`` as float32, shaped ``[N, 1, ..., 1]`` and expanded to ``broadcast_shape``.

    :param arr: float64 ``[S]`` numpy array.
    :param timesteps: long ``[N]`` indices into ``arr``.
    """
    res = torch.from_numpy(np.asarray(arr)).to(device=timesteps.device)[timesteps].float()
    while res.ndim < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)


@dataclass(eq=False)
class Schedule:
    """The float64 arrays of a (respaced) diffusion plus what the samplers need to call a model.

    Build with :meth:`from_diffusion` or :meth:`from_betas`; every array field is float64 ``[S]``
    where ``S`` is the number of (respaced) steps. ``timestep_map`` (int64 ``[S]``) gives the
    original timestep of each respaced index.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    alphas_cumprod_next: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    log_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    timestep_map: np.ndarray
    model_var_type: str = "fixed_small"
    model_mean_type: str = "epsilon"
    rescale_timesteps: bool = False
    original_num_steps: int = 0

    def __post_init__(self) -> None:
        self.timestep_map = np.asarray(self.timestep_map, dtype=np.int64)
        if self.original_num_steps <= 0:
            self.original_num_steps = int(self.timestep_map.max()) + 1
        if self.model_var_type not in VAR_TYPES:
            raise ValueError(f"model_var_type must be one of {VAR_TYPES}, got {self.model_var_type!r}")
        if self.model_mean_type not in MEAN_TYPES:
            raise ValueError(f"model_mean_type must be one of {MEAN_TYPES}, got {self.model_mean_type!r}")

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas, timestep_map=None, **meta: Any) -> "Schedule":
        """Schedule of the process with these betas (``timestep_map`` defaults to the identity)."""
        arrays = diffusion_arrays(betas)
        if timestep_map is None:
            timestep_map = np.arange(arrays["betas"].shape[0])
        return cls(**arrays, timestep_map=timestep_map, **meta)

    @classmethod
    def from_diffusion(cls, diffusion: Any) -> "Schedule":
        """Copy the arrays of a ``GaussianDiffusion``/``SpacedDiffusion`` (no recomputation)."""
        n = int(diffusion.num_timesteps)
        timestep_map = getattr(diffusion, "timestep_map", None)
        return cls(
            **{name: getattr(diffusion, name) for name in ARRAY_NAMES},
            timestep_map=np.arange(n) if timestep_map is None else timestep_map,
            model_var_type=diffusion.model_var_type.name.lower(),
            model_mean_type=diffusion.model_mean_type.name.lower(),
            rescale_timesteps=bool(diffusion.rescale_timesteps),
            original_num_steps=int(getattr(diffusion, "original_num_steps", n)),
        )

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices ``t`` (long ``[N]``) -> what the model sees: the original timesteps
        (long), or with ``rescale_timesteps`` those times ``1000 / original_num_steps`` (float32)."""
        new_t = torch.as_tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]
        if self.rescale_timesteps:
            return new_t.float() * (1000.0 / self.original_num_steps)
        return new_t


def as_schedule(obj: Any) -> Schedule:
    """Accept a :class:`Schedule` or a diffusion object and return a :class:`Schedule`."""
    if isinstance(obj, Schedule):
        return obj
    # Cheap: the arrays are shared, not recomputed.
    return Schedule.from_diffusion(obj)


# ---------------------------------------------------------------------------------------------
# Per-step formulas
# ---------------------------------------------------------------------------------------------


def _column(value: Level, x: torch.Tensor) -> torch.Tensor:
    """float64 tensor on x's device shaped ``[N or 1, 1, ..., 1]`` (broadcasts against ``x``)."""
    v = torch.as_tensor(value, dtype=torch.float64, device=x.device)
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _mask(nonzero: Union[bool, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """1.0 where noise is added (t != 0), as float32 ``[N or 1, 1, ..., 1]``."""
    return torch.as_tensor(nonzero, device=x.device).float().reshape(-1, *([1] * (x.ndim - 1)))


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``; ``generator=None`` uses the global RNG exactly like
    ``torch.randn_like`` (so the official RNG stream is reproduced)."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
    return noise.to(x.device)


def q_sample(schedule: Any, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise at respaced indices ``t`` (long ``[N]``)."""
    if noise.shape != x_start.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
    return (
        extract_into_tensor(schedule.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        + extract_into_tensor(schedule.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
    )


def predict_xstart_from_eps(x_t: torch.Tensor, eps: torch.Tensor, abar_t: Level) -> torch.Tensor:
    """x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps (float32, shape of ``x_t``; unclipped)."""
    if x_t.shape != eps.shape:
        raise ValueError(f"eps shape {tuple(eps.shape)} != x shape {tuple(x_t.shape)}")
    a = _column(abar_t, x_t)
    return torch.sqrt(1.0 / a).float() * x_t - torch.sqrt(1.0 / a - 1).float() * eps


def predict_eps_from_xstart(x_t: torch.Tensor, pred_xstart: torch.Tensor, abar_t: Level) -> torch.Tensor:
    """eps = (sqrt(1/abar) x_t - x_0) / sqrt(1/abar - 1) (float32, shape of ``x_t``)."""
    a = _column(abar_t, x_t)
    return (torch.sqrt(1.0 / a).float() * x_t - pred_xstart) / torch.sqrt(1.0 / a - 1).float()


def ddim_update(
    x: torch.Tensor,
    pred_xstart: torch.Tensor,
    abar_t: Level,
    abar_prev: Level,
    eta: float,
    noise: Optional[torch.Tensor],
    nonzero: Union[bool, torch.Tensor] = True,
) -> torch.Tensor:
    """One DDIM update (Song et al. 2021, eq. 12) given an (already clipped) x_0 prediction.

    eps is re-derived from ``pred_xstart`` so clipping is reflected in it;
    sigma = eta * sqrt((1-abar_prev)/(1-abar)) * sqrt(1 - abar/abar_prev), computed in float32 like
    the official code; x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma^2) eps
    + nonzero * sigma * noise. ``noise`` may be None only when no noise is added (eta = 0).
    :return: float32 tensor shaped like ``x``.
    """
    eps = predict_eps_from_xstart(x, pred_xstart, abar_t)
    ab = _column(abar_t, x).float()
    ab_prev = _column(abar_prev, x).float()
    sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab)) * torch.sqrt(1 - ab / ab_prev)
    mean_pred = pred_xstart * torch.sqrt(ab_prev) + torch.sqrt(1 - ab_prev - sigma**2) * eps
    if noise is None:
        if eta != 0:
            raise ValueError("ddim_update needs noise when eta != 0")
        return mean_pred
    return mean_pred + _mask(nonzero, x) * sigma * noise


def ddim_reverse_update(x: torch.Tensor, pred_xstart: torch.Tensor, abar_t: Level, abar_next: Level) -> torch.Tensor:
    """Deterministic DDIM inversion step x_t -> x_{t+1} (eta = 0): sqrt(abar_next) x_0 +
    sqrt(1 - abar_next) eps, with eps re-derived from ``pred_xstart``."""
    eps = predict_eps_from_xstart(x, pred_xstart, abar_t)
    ab_next = _column(abar_next, x).float()
    return pred_xstart * torch.sqrt(ab_next) + torch.sqrt(1 - ab_next) * eps


def posterior_mean(schedule: Any, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean of q(x_{t-1} | x_t, x_0) = coef1_t x_0 + coef2_t x_t at respaced indices ``t`` [N]."""
    return (
        extract_into_tensor(schedule.posterior_mean_coef1, t, x_t.shape) * x_start
        + extract_into_tensor(schedule.posterior_mean_coef2, t, x_t.shape) * x_t
    )


def output_variance(
    var_type: str, schedule: Any, t: torch.Tensor, shape, var_values: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(variance, log_variance)`` of p(x_{t-1} | x_t), float32 expanded to ``shape``.

    ``var_type`` is one of :data:`VAR_TYPES`. ``learned``: ``var_values`` is the log-variance.
    ``learned_range``: ``var_values`` in [-1, 1] interpolates log between the clipped posterior
    variance (-1) and beta_t (+1). ``fixed_small``: posterior variance; ``fixed_large``: beta_t, with
    entry 0 replaced by the posterior variance at 1 (a better decoder likelihood).
    """
    if var_type in ("learned", "learned_range"):
        if var_values is None:
            raise ValueError(f"{var_type} variance needs the model's variance channels")
        if var_type == "learned":
            return torch.exp(var_values), var_values
        min_log = extract_into_tensor(schedule.posterior_log_variance_clipped, t, shape)
        max_log = extract_into_tensor(np.log(schedule.betas), t, shape)
        frac = (var_values + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        return torch.exp(log_variance), log_variance
    if var_type == "fixed_large":
        variance = np.append(schedule.posterior_variance[1], schedule.betas[1:])
        log_variance = np.log(variance)
    elif var_type == "fixed_small":
        variance = schedule.posterior_variance
        log_variance = schedule.posterior_log_variance_clipped
    else:
        raise ValueError(f"unknown variance type {var_type!r}")
    return extract_into_tensor(variance, t, shape), extract_into_tensor(log_variance, t, shape)


def ancestral_update(
    mean: torch.Tensor, log_variance: torch.Tensor, noise: torch.Tensor, nonzero: Union[bool, torch.Tensor] = True
) -> torch.Tensor:
    """x_{t-1} = mean + nonzero * exp(0.5 log_variance) * noise (DDPM ancestral sampling)."""
    return mean + _mask(nonzero, mean) * torch.exp(0.5 * log_variance) * noise


def guidance_active(s: Optional[float]) -> bool:
    """The official rule: classifier-free guidance (and its unconditional model call) only when
    ``s > 1``; otherwise the conditional output is used as it is."""
    return s is not None and float(s) > 1.0


def cfg_combine(cond_out: torch.Tensor, uncond_out: torch.Tensor, s: float, eps_channels: int = 3) -> torch.Tensor:
    """Classifier-free guidance on a model output ``[N, K, H, W]``: the one guidance formula, used by
    the official-form loop, the plain and the fast denoisers alike.

    The first ``eps_channels`` channels become ``uncond + s * (cond - uncond)``; the remaining
    (variance) channels are taken from the conditional output. ``s == 1`` returns ``cond_out``
    itself (bit-exact "no guidance"). Callers apply it only when :func:`guidance_active`.
    """
    if cond_out.shape != uncond_out.shape:
        raise ValueError(f"cond {tuple(cond_out.shape)} and uncond {tuple(uncond_out.shape)} differ")
    if s == 1:
        return cond_out
    k = eps_channels
    guided = uncond_out[:, :k] + s * (cond_out[:, :k] - uncond_out[:, :k])
    return torch.cat([guided, cond_out[:, k:]], dim=1)


def dpmpp_2m_update(
    x: torch.Tensor,
    pred_xstart: torch.Tensor,
    abar_t: float,
    abar_next: float,
    prev_xstart: Optional[torch.Tensor] = None,
    h_prev: Optional[float] = None,
    eta: float = 0.0,
    noise: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, float]:
    """One DPM-Solver++(2M) step (Lu et al. 2022, data prediction, multistep order 2), as an ODE
    step (``eta = 0``) or as the SDE solver's step (``eta > 0``; ``eta = 1`` is SDE-DPM-Solver++(2M)).

    With lambda = log(sqrt(abar) / sqrt(1 - abar)), h = lambda_next - lambda_t, alpha = sqrt(abar)
    and sigma = sqrt(1 - abar):
    x_next = (sigma_next / sigma_t) e^(-eta h) x + alpha_next (1 - e^(-(1 + eta) h)) D
    + sigma_next sqrt(1 - e^(-2 eta h)) noise, where D = x_0 (first order, used for the first step
    or when ``prev_xstart`` is None) or D = (1 + 1/(2r)) x_0 - 1/(2r) x_0_prev with r = h_prev / h.
    At eta = 0 this is the ODE solver; at eta = 1 its first-order step is DDIM's step with eta = 1
    (the DDPM posterior variance). A step to ``abar_next == 1`` (clean data) returns ``pred_xstart``
    itself, as in DDIM's last step.
    :param noise: standard normal, shaped like ``x``; needed when ``eta > 0``.
    :return: ``(x_next, h)``; pass ``h`` as ``h_prev`` of the next step.
    """
    abar_t, abar_next = float(abar_t), float(abar_next)
    if abar_next >= 1.0:
        return pred_xstart, math.inf
    h = float(log_snr(abar_next)) - float(log_snr(abar_t))
    data = pred_xstart
    if prev_xstart is not None and h_prev is not None and math.isfinite(h_prev):
        half_inv_r = 0.5 * h / h_prev
        data = (1 + half_inv_r) * pred_xstart - half_inv_r * prev_xstart
    ratio = math.sqrt((1.0 - abar_next) / (1.0 - abar_t)) * math.exp(-eta * h)
    coef = -math.sqrt(abar_next) * math.expm1(-(1.0 + eta) * h)
    x_next = ratio * x + coef * data
    if eta > 0:
        if noise is None:
            raise ValueError("a stochastic DPM-Solver++ step (eta > 0) needs noise")
        x_next = x_next + math.sqrt((1.0 - abar_next) * -math.expm1(-2.0 * eta * h)) * noise
    return x_next, h


# ---------------------------------------------------------------------------------------------
# Loops over a denoiser
# ---------------------------------------------------------------------------------------------


def known_region(reference: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> Keep:
    """RePaint-style known-region replacement (Lugmayr et al. 2022) for the samplers' ``keep``.

    ``keep(x, abar)`` returns ``x`` with the pixels under ``mask`` set to
    ``sqrt(abar) * reference + sqrt(1 - abar) * noise``: the reference as the forward process would
    have it at that noise level; at abar = 1 the reference itself. One fixed noise for every level
    keeps the known region on the path a deterministic sampler would follow from that reference.

    Args:
        reference: float ``[N, C, H, W]`` in [-1, 1] (e.g. the GradMix image holding the donors).
        mask: bool ``[N, 1 or C, H, W]``, True where the reference is kept.
        noise: float ``[N, C, H, W]`` standard normal, drawn once per sample.

    Outside the mask ``x`` passes through untouched (``torch.where``), so an all-False mask gives
    exactly the plain sampler's result.
    """
    if reference.shape != noise.shape or mask.shape[0] != reference.shape[0] or mask.shape[2:] != reference.shape[2:]:
        raise ValueError(f"known_region: reference {tuple(reference.shape)}, mask {tuple(mask.shape)} and "
                         f"noise {tuple(noise.shape)} do not match")
    mask = mask.bool()

    def keep(x: torch.Tensor, abar: float) -> torch.Tensor:
        a = float(abar)
        known = (reference.float() * math.sqrt(a) + noise.float() * math.sqrt(max(1.0 - a, 0.0))).to(x.dtype)
        return torch.where(mask, known, x)

    return keep


def start_steps(num_steps: int, ddim_percent: float) -> int:
    """Steps to run for ``ddim_percent`` *percent* of ``num_steps`` respaced steps: the exact floor, >= 1.

    DiffMix's partial start runs the last ``start_steps`` steps from the noised real patch (100 =
    from pure noise). This is the one rule of the synthesis pipeline and the CLI. The official
    float product ``int(num_steps * (percent * 0.01))`` drops a step for some values (29 % of 100
    gives 28); the exact floor gives 29, and agrees with it at the paper's 55 %.
    Only the official call form keeps the official rounding (:func:`official_start_steps`).
    """
    steps = math.floor(num_steps * float(ddim_percent) / 100.0 + 1e-9)
    if steps < 1 or steps > num_steps:
        raise DiffMixError(
            f"--ddim_percent {ddim_percent} of {num_steps} steps leaves {steps} steps; need 1..{num_steps}"
        )
    return steps


def official_start_steps(num_steps: int, ddim_percent: float) -> int:
    """``int(num_steps * ddim_percent)`` for a *fraction* in (0, 1]: the official
    ``ddim_sample_loop(..., ddim_percent=0.55)`` rule, kept bit for bit for code written against
    the official API (S=100, 0.29 -> 28 steps). New code uses :func:`start_steps`."""
    steps = int(num_steps * ddim_percent)
    if not (0 < ddim_percent <= 1) or steps < 1:
        raise DiffMixError(
            f"ddim_percent must be in (0, 1] and leave at least one of the {num_steps} steps, got {ddim_percent}"
        )
    return steps


def partial_start(
    schedule: Any,
    x0: torch.Tensor,
    steps: int,
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, int]:
    """DiffMix's partial start (SDEdit): noise a reference image to respaced index ``steps - 1``.

    :param schedule: a diffusion or :class:`Schedule` with ``S`` (respaced) steps.
    :param x0: float ``[N, C, H, W]`` reference in [-1, 1].
    :param steps: how many steps will run, 1..S (:func:`start_steps` of a percent).
    :param noise: optional standard normal ``[N, C, H, W]``; drawn (``generator`` or global RNG,
        like the official ``q_sample``) when None.
    :return: ``(x_T, start_index)``: the noised state and the respaced index it sits at; pass
        ``start_index`` as ``indices`` of :func:`sample_ddim` / :func:`sample_ddpm` /
        :func:`sample_dpmpp_2m`.
    """
    schedule = as_schedule(schedule)
    if not (1 <= steps <= schedule.num_timesteps):
        raise ValueError(f"steps {steps} outside 1..{schedule.num_timesteps}")
    start = steps - 1
    if noise is None:
        noise = randn_like(x0, generator)
    t = torch.full((x0.shape[0],), start, dtype=torch.long, device=x0.device)
    return q_sample(schedule, x0, t, noise), start


def log_snr(abar: Union[float, np.ndarray]) -> Union[float, np.ndarray]:
    """lambda = log(sqrt(abar) / sqrt(1 - abar)), the half log signal-to-noise ratio (float64)."""
    abar = np.asarray(abar, dtype=np.float64)
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def lambda_spaced_indices(schedule: Any, num_steps: int, start: Optional[int] = None) -> List[int]:
    """At most ``num_steps`` respaced indices from ``start`` (default S-1) down to 0, roughly
    uniform in :func:`log_snr` (used by ``benchmarks/bench_steps.py`` for DPM-Solver++).

    Multistep solvers such as :func:`sample_dpmpp_2m` assume slowly varying step sizes in lambda;
    indices evenly spaced in t give a last step whose lambda gap is several times the previous one,
    which makes the second-order extrapolation overshoot at few steps. Nearest indices are used, so
    duplicates collapse and fewer than ``num_steps`` may come back; ``start`` and 0 are always kept.
    """
    sched = as_schedule(schedule)
    start = sched.num_timesteps - 1 if start is None else int(start)
    if num_steps < 1 or not (0 <= start < sched.num_timesteps):
        raise DiffMixError(f"need num_steps >= 1 and 0 <= start < {sched.num_timesteps}, got {num_steps}, {start}")
    lam = log_snr(sched.alphas_cumprod[: start + 1])
    if num_steps == 1:
        return [start]
    targets = np.linspace(lam[start], lam[0], num_steps)
    picked = {int(np.argmin(np.abs(lam - v))) for v in targets} | {start, 0}
    return sorted(picked, reverse=True)


def _index_list(indices: Indices, num_steps: int, consecutive: bool = False) -> List[int]:
    """``int k`` -> [k, k-1, ..., 0]; a sequence must be strictly decreasing within [0, S)."""
    if isinstance(indices, (int, np.integer)):
        idx = list(range(int(indices), -1, -1))
    else:
        idx = [int(i) for i in indices]
    if not idx:
        raise DiffMixError("no sampling steps to run (empty index list)")
    if idx[0] >= num_steps or idx[-1] < 0:
        raise DiffMixError(f"step indices must lie in [0, {num_steps}), got {idx[0]}..{idx[-1]}")
    gaps = [a - b for a, b in zip(idx, idx[1:])]
    if any(g <= 0 for g in gaps):
        raise DiffMixError("step indices must be strictly decreasing")
    if consecutive and any(g != 1 for g in gaps):
        raise DiffMixError("DDPM sampling needs consecutive step indices (respace the diffusion instead)")
    return idx


def _split_output(out: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Model output -> (prediction ``[N, C, ...]``, variance values or None)."""
    c = x.shape[1]
    if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or out.shape[1] not in (c, 2 * c):
        raise ValueError(f"denoiser returned shape {tuple(out.shape)}; expected [N, {c} or {2 * c}, ...] "
                         f"for input {tuple(x.shape)}")
    if out.shape[1] == 2 * c:
        return out[:, :c], out[:, c:]
    return out, None


def _pred_xstart(schedule: Schedule, x: torch.Tensor, pred: torch.Tensor, abar: float, clip: bool) -> torch.Tensor:
    if schedule.model_mean_type == "epsilon":
        x0 = predict_xstart_from_eps(x, pred, abar)
    elif schedule.model_mean_type == "start_x":
        x0 = pred
    else:
        raise DiffMixError("the pure samplers support epsilon or x0 prediction, not previous_x")
    return x0.clamp(-1, 1) if clip else x0


def progress_iter(idx: List[int], progress: bool, desc: str):
    """``idx`` itself, or wrapped in a tqdm progress bar when ``progress``."""
    if not progress:
        return idx

    return tqdm(idx, desc=desc)


def _timesteps(i: int, x: torch.Tensor) -> torch.Tensor:
    # Same dtype/device as the official ``th.tensor([i] * N, device=device)``.
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x_start_state: torch.Tensor,
    schedule: Any,
    indices: Indices,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    noise_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    clip: bool = True,
    progress: bool = False,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    keep: Optional[Keep] = None,
) -> torch.Tensor:
    """DDIM sampling over respaced ``indices`` (an int k means k, k-1, ..., 0).

    :param denoiser: ``(x, t_model) -> output`` (see module docstring).
    :param x_start_state: float ``[N, C, H, W]``, the state at ``indices[0]`` (e.g. from
        :func:`partial_start`, or ``randn`` at index S-1).
    :param schedule: respaced diffusion or :class:`Schedule`.
    :param eta: 0 for deterministic DDIM; 1 for DDPM-like noise. Noise is drawn every step even
        when eta = 0, reproducing the official RNG consumption.
    :param noise_fn: ``x -> noise shaped like x``, replacing ``generator`` (e.g. per-sample
        generators, so a sample's noise does not depend on its batch).
    :param callback: called after each step with ``{"i", "x", "pred_xstart"}``.
    :param keep: known-region replacement (:func:`known_region`), applied to the state before every
        model call and to the result; None leaves the loop as it is.
    :return: float32 ``[N, C, H, W]`` sample (in [-1, 1] up to the last step's rounding when clip).

    For contiguous indices this equals ``GaussianDiffusion.ddim_sample_loop`` bit for bit; for a
    sparse subsequence abar_prev is taken at the next listed index.
    """
    sched = as_schedule(schedule)
    idx = _index_list(indices, sched.num_timesteps)
    x = x_start_state
    for k, i in enumerate(progress_iter(idx, progress, "ddim")):
        abar = sched.alphas_cumprod[i]
        abar_prev = sched.alphas_cumprod[idx[k + 1]] if k + 1 < len(idx) else sched.alphas_cumprod_prev[i]
        if keep is not None:
            x = keep(x, float(abar))
        pred, _ = _split_output(denoiser(x, sched.model_timesteps(_timesteps(i, x))), x)
        pred_xstart = _pred_xstart(sched, x, pred, abar, clip)
        noise = noise_fn(x) if noise_fn is not None else randn_like(x, generator)
        x = ddim_update(x, pred_xstart, abar, abar_prev, eta, noise, nonzero=i != 0)
        if callback is not None:
            callback({"i": i, "x": x, "pred_xstart": pred_xstart})
    return x if keep is None else keep(x, 1.0)


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x_start_state: torch.Tensor,
    schedule: Any,
    indices: Indices,
    generator: Optional[torch.Generator] = None,
    noise_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    clip: bool = True,
    progress: bool = False,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    keep: Optional[Keep] = None,
) -> torch.Tensor:
    """DDPM ancestral sampling over consecutive respaced ``indices`` (int k -> k..0).

    Same arguments as :func:`sample_ddim`; the variance follows ``schedule.model_var_type``
    (learned-range needs a ``2C``-channel output). Equals ``GaussianDiffusion.p_sample_loop``
    bit for bit for the same start state and noises.
    """
    sched = as_schedule(schedule)
    idx = _index_list(indices, sched.num_timesteps, consecutive=True)
    x = x_start_state
    for i in progress_iter(idx, progress, "ddpm"):
        t = _timesteps(i, x)
        if keep is not None:
            x = keep(x, float(sched.alphas_cumprod[i]))
        pred, var_values = _split_output(denoiser(x, sched.model_timesteps(t)), x)
        pred_xstart = _pred_xstart(sched, x, pred, sched.alphas_cumprod[i], clip)
        mean = posterior_mean(sched, pred_xstart, x, t)
        _, log_variance = output_variance(sched.model_var_type, sched, t, x.shape, var_values)
        noise = noise_fn(x) if noise_fn is not None else randn_like(x, generator)
        x = ancestral_update(mean, log_variance, noise, nonzero=i != 0)
        if callback is not None:
            callback({"i": i, "x": x, "pred_xstart": pred_xstart})
    return x if keep is None else keep(x, 1.0)


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x_start_state: torch.Tensor,
    schedule: Any,
    indices: Indices,
    generator: Optional[torch.Generator] = None,
    clip: bool = True,
    progress: bool = False,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    keep: Optional[Keep] = None,
    eta: float = 0.0,
    noise_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) over respaced ``indices`` (an int k means k, k-1, ..., 0).

    The state moves through the noise levels abar[indices[0]], ..., abar[indices[-1]] and finally to
    clean data (the last step returns the x_0 prediction, as DDIM does). With ``eta = 0`` (default)
    the solver is deterministic and draws nothing; with ``eta > 0`` it is the SDE solver
    (:func:`dpmpp_2m_update`), drawing one noise per step except the last, from ``noise_fn`` or
    ``generator`` as in :func:`sample_ddim`. Being second order it reaches DDIM's many-step result
    with far fewer steps when the steps are roughly even in log-SNR; with few steps evenly spaced in
    t, the uneven last gap can make it worse than DDIM. ``keep``: as in :func:`sample_ddim`.
    """
    sched = as_schedule(schedule)
    idx = _index_list(indices, sched.num_timesteps)
    x = x_start_state
    prev_xstart, h_prev = None, None
    for k, i in enumerate(progress_iter(idx, progress, "dpm++2m")):
        abar = float(sched.alphas_cumprod[i])
        abar_next = float(sched.alphas_cumprod[idx[k + 1]] if k + 1 < len(idx) else sched.alphas_cumprod_prev[i])
        if keep is not None:
            x = keep(x, abar)
        pred, _ = _split_output(denoiser(x, sched.model_timesteps(_timesteps(i, x))), x)
        pred_xstart = _pred_xstart(sched, x, pred, abar, clip)
        noise = None
        if eta > 0 and abar_next < 1.0:
            noise = noise_fn(x) if noise_fn is not None else randn_like(x, generator)
        x, h = dpmpp_2m_update(x, pred_xstart, abar, abar_next, prev_xstart, h_prev, eta, noise)
        prev_xstart, h_prev = pred_xstart, h
        if callback is not None:
            callback({"i": i, "x": x, "pred_xstart": pred_xstart})
    return x if keep is None else keep(x, 1.0)
