"""Timestep respacing (fewer sampling steps over a trained T-step process) and the diffusion factory.

A respaced process keeps a subset of the original timesteps; its betas are rebuilt from the kept
alphas_cumprod so q(x_t | x_0) at a kept step is unchanged, and the model is still called with the
original timestep value (``timestep_map``), so a model trained with T steps samples with any subset.
"""

from __future__ import annotations

from typing import Iterable, List, Sequence, Set, Union

import numpy as np
import torch as th

from . import gaussian_diffusion as gd
from .infra.errors import DiffMixError


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> Set[int]:
    """Original timesteps to keep.

    :param num_timesteps: T of the original process.
    :param section_counts: ``"ddimN"``: the integer stride that gives exactly N steps (the DDIM
        paper's striding; ``"ddim100"`` over 1000 keeps 0, 10, ..., 990). Otherwise counts per
        section (``"250"``, ``"10,20,30"`` or a list): the T steps are cut into equal sections,
        earlier sections one step longer when T does not divide evenly, and each count is spread
        over its section with a fractional stride rounded to the nearest step (both ends kept).
    :return: a set of kept timesteps in [0, T).
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise DiffMixError(f"timestep_respacing {section_counts!r}: expected 'ddimN' with an integer N")
            for stride in range(1, num_timesteps):
                kept = range(0, num_timesteps, stride)
                if len(kept) == desired:
                    return set(kept)
            if desired == num_timesteps:  # stride 1 when T == 1 (the loop above is empty)
                return set(range(num_timesteps))
            raise DiffMixError(
                f"timestep_respacing {section_counts!r}: no integer stride gives exactly {desired} of "
                f"{num_timesteps} steps"
            )
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise DiffMixError(f"timestep_respacing {section_counts!r}: expected 'ddimN' or comma-separated integers")
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise DiffMixError(f"timestep_respacing {section_counts!r}: section counts must be positive")

    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept_steps: List[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise DiffMixError(f"timestep_respacing {section_counts!r}: cannot take {count} steps from a "
                               f"section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Python's round (half to even) on the accumulated fractional index, as in the original.
        cur = 0.0
        for _ in range(count):
            kept_steps.append(start + round(cur))
            cur += stride
        start += size
    return set(kept_steps)


class SpacedDiffusion(gd.GaussianDiffusion):
    """A diffusion that skips steps of a base process.

    :param use_timesteps: original timesteps to keep (any iterable).
    :param kwargs: :class:`~guided_diffusion.gaussian_diffusion.GaussianDiffusion` arguments of the
        base process (``betas`` of length T, ...).

    Attributes: ``timestep_map`` (list: respaced index -> original timestep, increasing),
    ``original_num_steps`` (T). Methods that call the model wrap it so it receives
    ``timestep_map[t]`` (times ``1000 / T`` as float with ``rescale_timesteps``).
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(int(t) for t in use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = gd.GaussianDiffusion(**kwargs)
        if not self.use_timesteps or min(self.use_timesteps) < 0 or max(self.use_timesteps) >= self.original_num_steps:
            raise DiffMixError(f"kept timesteps must be a non-empty subset of [0, {self.original_num_steps})")
        self.timestep_map: List[int] = []
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas, dtype=np.float64)
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):  # pylint: disable=signature-differs
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):  # pylint: disable=signature-differs
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps)

    def _scale_timesteps(self, t):
        # The wrapper maps and scales; scaling here too would apply it twice.
        return t


class _WrappedModel:
    """Calls ``model(x, timestep_map[t] (rescaled if asked), **kwargs)``."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        map_tensor = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = map_tensor[ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)


def create_gaussian_diffusion(
    *,
    steps: int = 1000,
    learn_sigma: bool = False,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    predict_xstart: bool = False,
    rescale_timesteps: bool = False,
    rescale_learned_sigmas: bool = False,
    timestep_respacing: Union[str, Sequence[int]] = "",
) -> SpacedDiffusion:
    """The official diffusion factory (guided-diffusion ``script_util`` semantics).

    Loss: RESCALED_KL if ``use_kl``, else RESCALED_MSE if ``rescale_learned_sigmas``, else MSE.
    Variance: LEARNED_RANGE if ``learn_sigma``, else FIXED_SMALL if ``sigma_small`` else FIXED_LARGE.
    Mean: START_X if ``predict_xstart`` else EPSILON. An empty ``timestep_respacing`` keeps all
    ``steps`` steps. Always returns a :class:`SpacedDiffusion`.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    if learn_sigma:
        var_type = gd.ModelVarType.LEARNED_RANGE
    else:
        var_type = gd.ModelVarType.FIXED_SMALL if sigma_small else gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )
