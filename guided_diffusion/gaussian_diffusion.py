"""Gaussian diffusion (DDPM/IDDPM/DDIM) in the official guided-diffusion / SDM / DiffMix form.

Method names, arguments and numerics follow openai/guided-diffusion as modified by SDM and the
DiffMix sampler (classifier-free guidance through ``model_kwargs["s"]``, partial "SDEdit" start
through ``ddim_percent`` and ``model_kwargs["gt"]``), so official checkpoints and scripts give the
official numbers. The per-step formulas live in :mod:`guided_diffusion.samplers`; this class adds
the model-calling conventions, training losses and the variational bound.

Shapes: ``x`` float32 ``[N, C, H, W]`` in [-1, 1]; ``t`` long ``[N]`` indices of this
(possibly respaced) process, 0 = least noisy. Schedule arrays are float64 numpy ``[T]``; each
coefficient is looked up at ``t`` and cast to float32 before use.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch as th
from tqdm.auto import tqdm

from . import samplers
from .infra.errors import DiffMixError
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .samplers import extract_into_tensor as _extract_into_tensor  # noqa: F401  (official name)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas (float64 ``[T]``) of a named schedule.

    ``linear``: Ho et al.'s linspace(1e-4, 0.02) scaled by ``1000 / T`` so any T gives a similar
    process. ``cosine``: Nichol & Dhariwal's alpha_bar(s) = cos(((s + 0.008) / 1.008) * pi / 2)^2,
    s = t / T, with betas capped at 0.999.
    """
    if num_diffusion_timesteps < 1:
        raise DiffMixError(f"diffusion_steps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        # beta_T = 20 / T: T = 20 gives beta_T = 1, alpha_bar_T = 0 and infinite coefficients.
        if num_diffusion_timesteps <= 20:
            raise DiffMixError(f"the linear noise_schedule needs more than 20 diffusion_steps (beta_T = "
                               f"20 / T must stay below 1), got {num_diffusion_timesteps}")
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise DiffMixError(f"unknown noise_schedule {schedule_name!r} (expected 'linear' or 'cosine')")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into float64 betas ``[T]``:
    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta)."""
    n = num_diffusion_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
        dtype=np.float64,
    )


class ModelMeanType(enum.Enum):
    """What the model's first C output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the added noise


class ModelVarType(enum.Enum):
    """How the variance of p(x_{t-1} | x_t) is chosen (LEARNED_RANGE interpolates the two fixed ones)."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # raw MSE (plus the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # raw MSE, VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound
    RESCALED_KL = enum.auto()  # the bound scaled by num_timesteps (estimates the full VLB)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def _mean_flat(tensor: th.Tensor) -> th.Tensor:
    """Mean over all non-batch dimensions: ``[N, ...] -> [N]``."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def _model_device(model: Any, fallback: Optional[th.Tensor]) -> th.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return fallback.device if fallback is not None else th.device("cpu")


class GaussianDiffusion:
    """Training and sampling utilities for a discrete Gaussian diffusion.

    :param betas: 1-D array of T betas in (0, 1], from t = 0 (least noise) upward.
    :param model_mean_type: a :class:`ModelMeanType`.
    :param model_var_type: a :class:`ModelVarType`.
    :param loss_type: a :class:`LossType`.
    :param rescale_timesteps: pass ``t * 1000 / T`` (float) to the model instead of ``t``.

    Every array of :data:`guided_diffusion.samplers.ARRAY_NAMES` is an attribute (float64 ``[T]``).
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        rescale_timesteps: bool = False,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        for name, arr in samplers.diffusion_arrays(betas).items():
            setattr(self, name, arr)
        self.num_timesteps = int(self.betas.shape[0])

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start: th.Tensor, t: th.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like ``x_start``."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: th.Tensor, t: th.Tensor, noise: Optional[th.Tensor] = None) -> th.Tensor:
        """Draw x_t ~ q(x_t | x_0) (noise from ``randn_like`` when not given)."""
        if noise is None:
            noise = th.randn_like(x_start)
        return samplers.q_sample(self, x_start, t, noise)

    def q_posterior_mean_variance(self, x_start: th.Tensor, x_t: th.Tensor, t: th.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), shaped like ``x_t``."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ")
        mean = samplers.posterior_mean(self, x_start, x_t, t)
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def _call_model(self, model, x: th.Tensor, t: th.Tensor, model_kwargs: Dict[str, Any]) -> th.Tensor:
        """The official calling convention: with ``y`` present only ``y`` reaches the model (``s``
        and ``gt`` are sampler settings); ``s > 1`` adds an unconditional call with ``y = 0`` and
        classifier-free guidance on the first C channels."""
        ts = self._scale_timesteps(t)
        s = model_kwargs.get("s")
        guided = samplers.guidance_active(s)
        if "y" not in model_kwargs:
            if guided:
                raise DiffMixError("guidance scale 's' > 1 needs a condition 'y' in model_kwargs")
            return model(x, ts, **model_kwargs)
        y = model_kwargs["y"]
        out = model(x, ts, y=y)
        if guided:
            uncond = model(x, ts, y=th.zeros_like(y))
            out = samplers.cfg_combine(out, uncond, float(s), eps_channels=x.shape[1])
        return out

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        :param model: ``model(x, t, y=...) -> [N, C or 2C, H, W]``.
        :param denoised_fn: applied to the x_0 prediction before clipping.
        :return: dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` (each like ``x``).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output = self._call_model(model, x, t, model_kwargs)

        var_values = None
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(f"learned variance needs a [N, {2 * C}, ...] output, got {tuple(model_output.shape)}")
            model_output, var_values = th.split(model_output, C, dim=1)
        variance, log_variance = samplers.output_variance(
            self.model_var_type.name.lower(), self, t, x.shape, var_values
        )

        def process_xstart(x0: th.Tensor) -> th.Tensor:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return x0.clamp(-1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
            model_mean = model_output
        else:
            if self.model_mean_type == ModelMeanType.START_X:
                pred_xstart = process_xstart(model_output)
            else:
                pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
            model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": model_mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _abar(self, arr: np.ndarray, t: th.Tensor) -> th.Tensor:
        """float64 ``arr[t]`` as a tensor ``[N]`` (samplers cast derived coefficients to float32)."""
        return th.from_numpy(arr).to(device=t.device)[t]

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return samplers.predict_xstart_from_eps(x_t, eps, self._abar(self.alphas_cumprod, t))

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return samplers.predict_eps_from_xstart(x_t, pred_xstart, self._abar(self.alphas_cumprod, t))

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # Inverts the posterior mean: x_0 = (x_prev - coef2 x_t) / coef1.
        return (
            _extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t.shape) * xprev
            - _extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t.shape) * x_t
        )

    def _scale_timesteps(self, t: th.Tensor) -> th.Tensor:
        if self.rescale_timesteps:
            return t.float() * (1000.0 / self.num_timesteps)
        return t

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al. 2015)."""
        gradient = cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """p_mean_variance output with the score shifted by cond_fn (Song et al. 2020)."""
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, self._scale_timesteps(t), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None):
        """One ancestral step: ``{"sample": x_{t-1}, "pred_xstart": x_0}`` (no noise where t == 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        noise = th.randn_like(x)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = samplers.ancestral_update(out["mean"], out["log_variance"], noise, nonzero=t != 0)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _start_state(self, model, shape, noise, model_kwargs, device, start_index):
        """Device, kwargs (``y`` moved to the device, dict not mutated) and the start state."""
        model_kwargs = dict(model_kwargs or {})
        gt = model_kwargs.get("gt")
        if device is None:
            device = _model_device(model, noise if noise is not None else gt)
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape must be a tuple or list, got {type(shape).__name__}")
        if "y" in model_kwargs:
            model_kwargs["y"] = model_kwargs["y"].to(device)
        if noise is not None:
            img = noise
        elif gt is not None and start_index is not None:
            img, _ = samplers.partial_start(self, gt.to(device), start_index + 1)
        else:
            img = th.randn(*shape, device=device)
        return device, model_kwargs, img

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False):
        """Ancestral sampling over all steps; returns the final ``[N, C, H, W]`` sample."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                    denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                    model_kwargs=model_kwargs, device=device, progress=progress):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                  cond_fn=None, model_kwargs=None, device=None, progress=False) -> Iterator[dict]:
        """Yield each :meth:`p_sample` output from t = T-1 down to 0 (start: ``noise`` or randn)."""
        device, model_kwargs, img = self._start_state(model, shape, noise, model_kwargs, device, None)
        indices = samplers.progress_iter(list(range(self.num_timesteps))[::-1], progress, "ddpm")
        for i in indices:
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs)
                yield out
                img = out["sample"]

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0):
        """One DDIM step: ``{"sample": x_{t-1}, "pred_xstart": x_0}``. Noise is drawn even for
        eta = 0 so the RNG stream matches the official sampler."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        noise = th.randn_like(x)
        sample = samplers.ddim_update(
            x, out["pred_xstart"], self._abar(self.alphas_cumprod, t), self._abar(self.alphas_cumprod_prev, t),
            eta, noise, nonzero=t != 0,
        )
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """Deterministic DDIM inversion x_t -> x_{t+1}: ``{"sample", "pred_xstart"}``."""
        if eta != 0.0:
            raise ValueError("the reverse ODE is only defined for eta = 0")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        sample = samplers.ddim_reverse_update(
            x, out["pred_xstart"], self._abar(self.alphas_cumprod, t), self._abar(self.alphas_cumprod_next, t)
        )
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, ddim_percent=1.0, eta=0.0):
        """DDIM sampling (see :meth:`ddim_sample_loop_progressive`); returns the final sample."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
            model_kwargs=model_kwargs, device=device, progress=progress, ddim_percent=ddim_percent, eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False,
                                     ddim_percent=1.0, eta=0.0) -> Iterator[dict]:
        """DiffMix's DDIM loop: ``T = int(num_timesteps * ddim_percent)`` steps (a fraction, the official
        rounding: :func:`~guided_diffusion.samplers.official_start_steps`), T-1 down to 0.

        Start state: ``noise`` if given (taken as the state at step T-1); else
        ``q_sample(model_kwargs["gt"], T-1)`` (the official partial start); else, without ``gt``,
        pure ``randn`` (unconditional-start sampling, an extension of the official code).
        """
        steps = samplers.official_start_steps(self.num_timesteps, ddim_percent)
        device, model_kwargs, img = self._start_state(model, shape, noise, model_kwargs, device, steps - 1)
        indices = samplers.progress_iter(list(range(steps))[::-1], progress, "ddim")
        for i in indices:
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta)
                yield out
                img = out["sample"]

    # ------------------------------------------------------------------ losses and the bound

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One VLB term in bits per dimension: ``{"output": [N], "pred_xstart"}``; the decoder NLL
        at t == 0, else KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = _mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = _mean_flat(decoder_nll) / np.log(2.0)
        return {"output": th.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def min_snr_weight(self, t: th.Tensor, gamma: float) -> th.Tensor:
        """Min-SNR-gamma weights of the MSE term (Hang et al., ICCV 2023), float32 ``[N]``.

        With SNR(t) = abar_t / (1 - abar_t): min(SNR, gamma) / SNR for an epsilon-predicting model
        (the x_0-space weight min(SNR, gamma) carried over to the noise error), min(SNR, gamma)
        for one that predicts x_0. Large-SNR (small t) steps are down-weighted, so the easy
        low-noise steps no longer dominate the gradient.
        """
        if not gamma > 0:
            raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
        abar = th.as_tensor(self.alphas_cumprod, dtype=th.float64, device=t.device)[t]
        snr = abar / (1.0 - abar)
        clipped = th.clamp(snr, max=float(gamma))
        if self.model_mean_type == ModelMeanType.EPSILON:
            return (clipped / snr).float()
        if self.model_mean_type == ModelMeanType.START_X:
            return clipped.float()
        raise ValueError(f"min-SNR weighting needs an epsilon or x_0 model, not {self.model_mean_type}")

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, mse_weight=None):
        """Per-sample losses for one timestep each.

        :param x_start: float ``[N, C, H, W]`` clean images in [-1, 1].
        :param t: long ``[N]`` timestep indices.
        :param mse_weight: optional float ``[N]`` weights of the MSE term in ``loss`` (e.g.
            :meth:`min_snr_weight`); the VB term is not weighted and ``mse`` stays unweighted.
        :return: dict of float ``[N]`` tensors: ``loss``, and for MSE losses ``mse`` (mean over
            non-batch dims of (target - prediction)^2) and, with learned variance, ``vb`` (the VLB
            term in bits/dim with the prediction detached; scaled by T/1000 for RESCALED_MSE);
            ``loss = mse_weight * mse + vb``.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: Dict[str, th.Tensor] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms
        if self.loss_type not in (LossType.MSE, LossType.RESCALED_MSE):
            raise NotImplementedError(self.loss_type)

        ts = self._scale_timesteps(t)
        model_output = model(x_t, ts, y=model_kwargs["y"]) if "y" in model_kwargs else model(x_t, ts, **model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if model_output.shape != (B, C * 2, *x_t.shape[2:]):
                raise ValueError(f"learned variance needs a [N, {2 * C}, ...] output, got {tuple(model_output.shape)}")
            model_output, model_var_values = th.split(model_output, C, dim=1)
            # The VB term trains only the variance: the mean prediction is detached.
            frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(model=lambda *args, r=frozen_out, **kwargs: r, x_start=x_start,
                                             x_t=x_t, t=t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Keeps the VB term from swamping the MSE term (official scaling).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
        }[self.model_mean_type]()
        if model_output.shape != target.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} does not match {tuple(target.shape)}")
        terms["mse"] = _mean_flat((target - model_output) ** 2)
        mse = terms["mse"] if mse_weight is None else terms["mse"] * mse_weight.to(terms["mse"].dtype)
        terms["loss"] = mse + terms["vb"] if "vb" in terms else mse
        return terms

    def _prior_bpd(self, x_start: th.Tensor) -> th.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, ``[N]`` (constant w.r.t. the model)."""
        t = th.full((x_start.shape[0],), self.num_timesteps - 1, dtype=th.long, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return _mean_flat(kl_prior) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False):
        """The full variational bound in bits/dim: dict with ``total_bpd``, ``prior_bpd`` ``[N]`` and
        per-step ``vb``, ``xstart_mse``, ``mse`` ``[N, T]``."""
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            steps = tqdm(steps)
        for i in steps:
            t = th.full((batch,), i, dtype=th.long, device=x_start.device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(_mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(_mean_flat((eps - noise) ** 2))
        # Columns in increasing t order would be nicer, but the official layout (T-1 first) is kept.
        vb_t, xs_t, mse_t = (th.stack(v, dim=1) for v in (vb, xstart_mse, mse))
        prior_bpd = self._prior_bpd(x_start)
        return {"total_bpd": vb_t.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb_t,
                "xstart_mse": xs_t, "mse": mse_t}
