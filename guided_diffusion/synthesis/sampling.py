"""Sampling one batch: per-sample noise, the guided denoisers (official and fast) and the loop.

The per-step formulas are those of :mod:`guided_diffusion.samplers`; the loop here adds only what
the pipeline needs on top: every sample's noise comes from its own generator.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import samplers as smp
from ..infra.errors import DiffMixError
from ..infra.precision import autocast_context
from ..respace import create_gaussian_diffusion
from .settings import SAMPLERS


class PerSampleNoise:
    """Standard normal noise drawn per sample from its own CPU generator.

    ``randn(shape)`` returns float32 ``[N, *shape]`` whose row ``j`` depends only on seed ``j`` and
    how many draws were made before: batching and devices do not change the values.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]

    def randn(self, shape: Sequence[int], device: Any = "cpu") -> torch.Tensor:
        draws = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(device)


def _null_condition(y: torch.Tensor) -> torch.Tensor:
    return torch.zeros((1, *y.shape[1:]), dtype=y.dtype, device=y.device)


class PlainGuidedDenoiser:
    """The official guided model call: ``model(x, t, y)`` and, when guidance is active (``s > 1``),
    ``model(x, t, 0)``, combined by :func:`~guided_diffusion.samplers.cfg_combine`.

    ``y``: float ``[N, cond_ch, H, W]``. Returns float32 ``[N, out_ch, H, W]``.
    """

    def __init__(self, model: torch.nn.Module, y: torch.Tensor, s: float):
        self.model, self.y, self.s = model, y, float(s)
        self.y_null = torch.zeros_like(y)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.model(x, t, y=self.y).float()
        if smp.guidance_active(self.s):
            out = smp.cfg_combine(out, self.model(x, t, y=self.y_null).float(), self.s, eps_channels=x.shape[1])
        return out


class FastGuidedDenoiser:
    """Same output as :class:`PlainGuidedDenoiser`, computed with the model's fast path.

    Every SPADE gamma/beta is computed once here (for ``y`` and, with guidance active, for the
    all-zero null map at batch 1) and reused at every step; each step runs the encoder once and the
    middle block + decoder once per branch (``batched``: both branches in one doubled batch), then
    the same :func:`~guided_diffusion.samplers.cfg_combine` as the plain path.
    ``forward`` replaces ``model.forward_branches`` (e.g. its compiled form).
    """

    def __init__(self, model: torch.nn.Module, y: torch.Tensor, s: float, batched: bool = False, forward: Optional[Callable] = None):
        self.model, self.s, self.batched = model, float(s), batched
        self.forward = forward or model.forward_branches
        with torch.no_grad():
            self.cache_cond = model.spade_cache(y)
            self.cache_uncond = model.spade_cache(_null_condition(y)) if smp.guidance_active(self.s) else None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = self.forward(x, t, self.cache_cond, self.cache_uncond, batched=self.batched)
        if uncond is None:
            return cond.float()
        return smp.cfg_combine(cond.float(), uncond.float(), self.s, eps_channels=x.shape[1])


def trained_schedule(model_cfg: Dict[str, Any]) -> smp.Schedule:
    """The un-respaced schedule of ``model_cfg`` (all ``diffusion_steps``): the grid that
    ``--solver_steps`` picks DPM-Solver++ timesteps from."""
    keys = ("learn_sigma", "noise_schedule", "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas")
    diffusion = create_gaussian_diffusion(steps=model_cfg["diffusion_steps"], timestep_respacing="",
                                          **{k: model_cfg[k] for k in keys})
    return smp.as_schedule(diffusion)


def solver_plan(model_cfg: Dict[str, Any], schedule: Any, steps: int, solver_steps: int) -> Tuple[smp.Schedule, List[int]]:
    """``(trained schedule, indices)`` for DPM-Solver++ with ``solver_steps`` model calls from the start
    state of ``steps`` respaced steps (respaced index ``steps - 1``) down to 0, evenly spaced in
    log-SNR on the trained grid (:func:`~guided_diffusion.samplers.lambda_spaced_indices`).

    The start state is the one the respaced run starts from (the same noise level), so only the
    path to the clean image changes. Fewer indices come back when neighbours coincide.
    """
    full = trained_schedule(model_cfg)
    t_start = int(smp.as_schedule(schedule).timestep_map[steps - 1])
    return full, smp.lambda_spaced_indices(full, solver_steps, t_start)


@torch.no_grad()
def sample_batch(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Any,
    reference: Optional[torch.Tensor],
    steps: int,
    noise: PerSampleNoise,
    sampler: str = "ddim",
    eta: float = 0.0,
    clip: bool = True,
    shape: Optional[Sequence[int]] = None,
    device: Any = None,
    solver: Optional[Tuple[Any, Sequence[int]]] = None,
    keep: Optional[smp.Keep] = None,
) -> torch.Tensor:
    """Synthesise one batch.

    Args:
        denoiser: ``(x, t_model) -> output`` (already guided), e.g. :class:`FastGuidedDenoiser`.
        schedule: the respaced diffusion (or a ``samplers.Schedule``) with S steps.
        reference: float32 ``[N, 3, H, W]`` real patches in [-1, 1] noised to the start step
            (DiffMix's partial start), or None to start from pure noise (then ``shape`` = [N, 3, H, W]).
        steps: respaced steps to run (``start_steps``); the start state sits at index ``steps - 1``.
        noise: per-sample noise; draws: the start noise, then one per step for DDPM and DDIM
            (DDIM draws even at eta = 0, as the official loop does; DPM-Solver++ draws only with
            eta > 0, one per step but the last).
        sampler: "ddim", "ddpm" or "dpmpp2m".
        device: where a pure-noise start lives (default: the reference's device, else the CPU).
        solver: dpmpp2m only: ``(schedule, indices)`` of :func:`solver_plan`: the solver runs over
            these indices of that schedule instead of every respaced step (same start state).
        keep: known-region replacement (:func:`~guided_diffusion.samplers.known_region`: the
            placed donors kept), or None.

    Returns:
        float32 ``[N, 3, H, W]`` sample in [-1, 1] (up to the last step's rounding).

    The loops are those of :mod:`guided_diffusion.samplers`, fed with per-sample noise. For DDIM with
    eta = 0 it equals ``diffusion.ddim_sample_loop`` given the same start state.
    """
    sched = smp.as_schedule(schedule)
    if not (1 <= steps <= sched.num_timesteps):
        raise ValueError(f"steps {steps} outside 1..{sched.num_timesteps}")
    if reference is not None:
        device = reference.device
    elif device is None:
        device = torch.device("cpu")
    per_sample = tuple(reference.shape[1:]) if reference is not None else tuple(shape[1:])
    start = steps - 1
    if reference is None:
        x = noise.randn(per_sample, device)
    else:
        x, _ = smp.partial_start(sched, reference, steps, noise.randn(per_sample, device))
    if solver is not None and sampler != "dpmpp2m":
        raise DiffMixError(f"a solver plan applies to the dpmpp2m sampler only (got {sampler!r})")
    draw = lambda like: noise.randn(per_sample, like.device)  # noqa: E731
    if sampler == "ddim":
        return smp.sample_ddim(denoiser, x, sched, start, eta=eta, noise_fn=draw, clip=clip, keep=keep)
    if sampler == "ddpm":
        return smp.sample_ddpm(denoiser, x, sched, start, noise_fn=draw, clip=clip, keep=keep)
    if sampler == "dpmpp2m":
        where, idx = solver if solver is not None else (sched, start)
        return smp.sample_dpmpp_2m(denoiser, x, where, idx, clip=clip, keep=keep, eta=eta, noise_fn=draw)
    raise DiffMixError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")


def with_autocast(denoiser: Callable, precision: str, device: torch.device) -> Callable:
    """Run only the network under autocast; the sampler arithmetic stays float32."""
    if precision == "fp32":
        return denoiser

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast_context(precision, device):
            out = denoiser(x, t)
        return out.float()

    return call


def maybe_compiled(model: torch.nn.Module, compile_model: bool) -> Optional[Callable]:
    """``torch.compile(model.forward_branches)`` when asked (None otherwise).

    If compilation fails at the first call (no C++ compiler, an unsupported op), a warning is
    printed and the eager method is used from then on; it computes the same numbers.
    """
    if not compile_model:
        return None
    eager = model.forward_branches
    state = {"fn": torch.compile(eager), "compiled": True}

    def forward(*args, **kwargs):
        if not state["compiled"]:
            return eager(*args, **kwargs)
        try:
            return state["fn"](*args, **kwargs)
        except DiffMixError:
            raise
        except Exception as err:
            print(f"warning: torch.compile failed ({type(err).__name__}: {err}); running eagerly", file=sys.stderr)
            state["compiled"] = False
            return eager(*args, **kwargs)

    return forward
