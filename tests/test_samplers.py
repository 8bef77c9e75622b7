"""Pure samplers: equality with the official-form loops, closed-form oracles, partial starts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guided_diffusion import samplers
from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.respace import create_gaussian_diffusion


class TinyNet(torch.nn.Module):
    """Small SDM-shaped model: (x [N,3,H,W], t [N], y [N,2,H,W]) -> [N,6,H,W] (eps, var in [-1,1])."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(5, 6, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t, y=None, **unused):
        h = self.conv(torch.cat([x, y], 1)) * (1 + t.float().view(-1, 1, 1, 1) / 1000)
        return torch.cat([h[:, :3], torch.tanh(h[:, 3:])], 1)


def guided(model, y, s):
    """The denoiser a fast sampler receives: official CFG over a conditional model."""

    def denoiser(x, t):
        cond = model(x, t, y=y)
        return samplers.cfg_combine(cond, model(x, t, y=torch.zeros_like(y)), s) if s > 1 else cond

    return denoiser


def inputs(n=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    y = (torch.rand(n, 2, size, size, generator=g) > 0.5).float()
    return gt, y


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("eta,s", [(0.0, 2.0), (0.8, 1.0)])
def test_sample_ddim_equals_ddim_sample_loop(eta, s):
    d = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim100")
    model, (gt, y) = TinyNet(), inputs()
    torch.manual_seed(11)
    official = d.ddim_sample_loop(model, gt.shape, model_kwargs={"y": y, "s": s, "gt": gt}, ddim_percent=0.55, eta=eta)
    torch.manual_seed(11)
    x_T, start = samplers.partial_start(d, gt, samplers.official_start_steps(d.num_timesteps, 0.55))
    fast = samplers.sample_ddim(guided(model, y, s), x_T, d, start, eta=eta)
    assert start == 54
    assert torch.equal(official, fast)
    # Both paths share ddim_update: check them against formulas written out independently too.
    torch.manual_seed(11)
    torch.testing.assert_close(fast, _reference_ddim(d, model, gt, y, s, 0.55, eta), rtol=1e-5, atol=1e-5)


def _reference_ddim(d, model, gt, y, s, percent, eta):
    """DiffMix's DDIM loop written out directly from the published facts (float64 numpy arrays,
    each coefficient indexed then cast to float32), as an independent oracle."""

    def coef(arr, i):
        return torch.from_numpy(np.asarray(arr, dtype=np.float64))[torch.full((gt.shape[0],), i)].float().view(-1, 1, 1, 1)

    abar = np.cumprod(1 - d.betas)
    abar_prev = np.append(1.0, abar[:-1])
    steps = int(d.num_timesteps * percent)
    x = coef(np.sqrt(abar), steps - 1) * gt + coef(np.sqrt(1 - abar), steps - 1) * torch.randn_like(gt)
    for i in range(steps - 1, -1, -1):
        t_model = torch.full((gt.shape[0],), d.timestep_map[i])
        cond, uncond = model(x, t_model, y=y), model(x, t_model, y=torch.zeros_like(y))
        eps = uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3])
        x0 = (coef(np.sqrt(1 / abar), i) * x - coef(np.sqrt(1 / abar - 1), i) * eps).clamp(-1, 1)
        eps = (coef(np.sqrt(1 / abar), i) * x - x0) / coef(np.sqrt(1 / abar - 1), i)
        a, ap = coef(abar, i), coef(abar_prev, i)
        sigma = eta * torch.sqrt((1 - ap) / (1 - a)) * torch.sqrt(1 - a / ap)
        noise = torch.randn_like(x)
        x = x0 * torch.sqrt(ap) + torch.sqrt(1 - ap - sigma**2) * eps + (1.0 if i else 0.0) * sigma * noise
    return x


def test_ddim_loop_matches_reference_formulas():
    d = create_gaussian_diffusion(steps=1000, learn_sigma=True, timestep_respacing="ddim50")
    model, (gt, y) = TinyNet(), inputs(seed=1)
    torch.manual_seed(5)
    ref = _reference_ddim(d, model, gt, y, 3.0, 0.6, 0.5)
    torch.manual_seed(5)
    got = d.ddim_sample_loop(model, gt.shape, model_kwargs={"y": y, "s": 3.0, "gt": gt}, ddim_percent=0.6, eta=0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_sample_ddpm_equals_p_sample_loop(learn_sigma):
    d = create_gaussian_diffusion(steps=100, learn_sigma=learn_sigma, timestep_respacing="25")
    model, (gt, y) = TinyNet(), inputs(seed=2)
    net = model if learn_sigma else (lambda x, t, y: model(x, t, y=y)[:, :3])
    start = torch.randn(gt.shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(12)
    official = d.p_sample_loop(net, gt.shape, noise=start, model_kwargs={"y": y})
    torch.manual_seed(12)
    fast = samplers.sample_ddpm(lambda x, t: net(x, t, y=y), start, d, d.num_timesteps - 1)
    assert torch.equal(official, fast)
    # Both paths share output_variance and ancestral_update: check them against the formulas too.
    torch.manual_seed(12)
    torch.testing.assert_close(fast, _reference_ddpm(d, net, start, y, learn_sigma), rtol=1e-5, atol=1e-5)


def _reference_ddpm(d, net, x, y, learn_sigma):
    """Ancestral DDPM written out from Ho et al. (2020) and Nichol & Dhariwal (2021) in float64
    numpy coefficients: posterior mean of the clipped x_0, variance learned as an interpolation of
    log beta_t and the clipped posterior log variance (or fixed to beta_t, first step the posterior's)."""

    def coef(arr, i):
        return torch.tensor(float(np.asarray(arr, dtype=np.float64)[i])).float()

    betas = np.asarray(d.betas, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    for i in range(len(betas) - 1, -1, -1):
        out = net(x, torch.full((x.shape[0],), d.timestep_map[i]), y=y)
        eps = out[:, :3]
        x0 = (coef(np.sqrt(1 / abar), i) * x - coef(np.sqrt(1 / abar - 1), i) * eps).clamp(-1, 1)
        mean = (coef(betas * np.sqrt(abar_prev) / (1 - abar), i) * x0
                + coef((1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar), i) * x)
        if learn_sigma:
            frac = (out[:, 3:] + 1) / 2
            log_var = frac * coef(np.log(betas), i) + (1 - frac) * coef(post_log_var, i)
        else:
            log_var = coef(np.log(np.append(post_var[1], betas[1:])), i) * torch.ones_like(x)
        noise = torch.randn_like(x)
        x = mean + (1.0 if i else 0.0) * torch.exp(0.5 * log_var) * noise
    return x


# ----------------------------------------------------------------------------- closed forms


def _line_setup(seed=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 1.6 - 0.8
    e = torch.randn(2, 3, 4, 4, generator=g)
    return x0, e


def test_sparse_ddim_and_dpm_stay_on_the_exact_line():
    # A state sqrt(abar) x0 + sqrt(1-abar) e with the exact eps (= e) must land on the same line at
    # every listed level, whatever the gaps, and finish at x0.
    d = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim100")
    x0, e = _line_setup()
    idx = [90, 61, 20, 3, 0]
    x_T = samplers.q_sample(d, x0, torch.full((2,), 90), e)
    levels = []
    out = samplers.sample_ddim(lambda x, t: e, x_T, d, idx, clip=False, callback=levels.append)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    mid = samplers.q_sample(d, x0, torch.full((2,), 20), e)
    torch.testing.assert_close(levels[1]["x"], mid, rtol=1e-4, atol=1e-4)  # after step 61 -> 20
    out = samplers.sample_dpmpp_2m(lambda x, t: e, x_T, d, idx, clip=False)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def _gaussian_data_denoiser(abar_orig, mu, s):
    """Exact eps-prediction for data x0 ~ N(mu, s^2) elementwise (t_model = original timestep)."""

    def denoiser(x, t_model):
        a = torch.from_numpy(np.asarray(abar_orig))[t_model].view(-1, 1, 1, 1)
        x64 = x.double()
        eps = torch.sqrt(1 - a) * (x64 - torch.sqrt(a) * mu) / (a * s**2 + 1 - a)
        return eps.float()

    return denoiser


def _ode_solution(x_T, a_T, a_0, mu, s):
    """Probability-flow ODE for Gaussian data maps z = (x - sqrt(a) mu) / sqrt(a s^2 + 1 - a)
    unchanged; the samplers' last step returns E[x0 | x] at level a_0."""
    z = (x_T.double() - math.sqrt(a_T) * mu) / math.sqrt(a_T * s**2 + 1 - a_T)
    x = math.sqrt(a_0) * mu + math.sqrt(a_0 * s**2 + 1 - a_0) * z
    return mu + math.sqrt(a_0) * s**2 * (x - math.sqrt(a_0) * mu) / (a_0 * s**2 + 1 - a_0)


def test_dpmpp_2m_beats_ddim_and_converges():
    mu, s = 0.2, 0.5
    sched = create_gaussian_diffusion(steps=1000)  # respaced index = original timestep
    den = _gaussian_data_denoiser(sched.alphas_cumprod, mu, s)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    start = 990
    exact = _ode_solution(x_T, sched.alphas_cumprod[start], sched.alphas_cumprod[0], mu, s)

    def run(sample_fn, idx):
        return sample_fn(den, x_T, sched, idx, clip=False).double()

    def err(sample_fn, idx):
        return (run(sample_fn, idx) - exact).abs().max().item()

    coarse = samplers.lambda_spaced_indices(sched, 10, start)
    assert coarse[0] == start and coarse[-1] == 0 and len(coarse) <= 10
    assert err(samplers.sample_dpmpp_2m, coarse) < err(samplers.sample_ddim, coarse) / 5
    fine = samplers.lambda_spaced_indices(sched, 60, start)
    dpm_fine = run(samplers.sample_dpmpp_2m, fine)
    assert (dpm_fine - exact).abs().max() < err(samplers.sample_ddim, fine) / 5
    # Many steps: DPM-Solver++ with 60 steps lands on DDIM's 991-step result.
    ddim_all = run(samplers.sample_ddim, start)
    assert (ddim_all - exact).abs().max() < 0.01
    assert (dpm_fine - ddim_all).abs().max() < 0.01


# ----------------------------------------------------------------------------- partial start


def test_partial_start_and_step_counts():
    d = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim100")
    gt, _ = inputs()
    noise = torch.randn_like(gt)
    x_T, start = samplers.partial_start(d, gt, samplers.start_steps(100, 55), noise=noise)
    assert start == 54
    a = d.alphas_cumprod[54]
    torch.testing.assert_close(x_T, math.sqrt(a) * gt + math.sqrt(1 - a) * noise, rtol=1e-5, atol=1e-6)
    for fn in (samplers.sample_ddim, samplers.sample_ddpm, samplers.sample_dpmpp_2m):
        seen = []

        def den(x, t):
            seen.append(int(t[0]))
            return torch.zeros_like(x)

        out = fn(den, x_T, d, start)
        assert seen == list(range(540, -1, -10)) and len(seen) == 55 and out.shape == gt.shape
    # Two rules, each in one place: the official call form's fraction with int(), and the percent rule.
    assert samplers.official_start_steps(100, 0.29) == 28  # int(100 * 0.29) = 28 steps
    assert samplers.start_steps(100, 29) == 29
    assert samplers.official_start_steps(100, 0.55) == samplers.start_steps(100, 55) == 55
    for bad in (0.0, 0.001, 1.2):
        with pytest.raises(DiffMixError, match="ddim_percent"):
            samplers.official_start_steps(100, bad)
    with pytest.raises(ValueError, match="steps 0 outside"):
        samplers.partial_start(d, gt, 0)


def test_generator_determinism_leaves_global_rng_alone():
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="ddim20")
    model, (gt, y) = TinyNet(), inputs()
    den = guided(model, y, 1.5)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x_T, start = samplers.partial_start(d, gt, 10, generator=g)
        return samplers.sample_ddim(den, x_T, d, start, eta=1.0, generator=g)

    state = torch.get_rng_state()
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- step functions


def test_cfg_combine():
    cond, uncond = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    assert samplers.cfg_combine(cond, uncond, 1.0) is cond
    out = samplers.cfg_combine(cond, uncond, 3.0)
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])
    torch.testing.assert_close(samplers.cfg_combine(cond, uncond, 0.0, eps_channels=6), uncond)


def test_step_functions_roundtrip():
    x0, e = _line_setup(7)
    a_t, a_prev = 0.3, 0.6
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * e
    torch.testing.assert_close(samplers.predict_xstart_from_eps(x_t, e, a_t), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(samplers.predict_eps_from_xstart(x_t, x0, a_t), e, rtol=1e-5, atol=1e-5)
    pred = samplers.predict_xstart_from_eps(x_t, e, a_t)
    x_prev = samplers.ddim_update(x_t, pred, a_t, a_prev, 0.0, None)
    torch.testing.assert_close(x_prev, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e, rtol=1e-5, atol=1e-5)
    back = samplers.ddim_reverse_update(x_prev, pred, a_prev, a_t)
    torch.testing.assert_close(back, x_t, rtol=1e-5, atol=1e-5)
    # eta = 1: sigma^2 equals the DDPM posterior variance (1-a_prev)/(1-a_t) * (1 - a_t/a_prev).
    z = torch.ones_like(x0)
    noisy = samplers.ddim_update(x_t, x0, a_t, a_prev, 1.0, z) - samplers.ddim_update(x_t, x0, a_t, a_prev, 1.0, 0 * z)
    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    torch.testing.assert_close(noisy, sigma * z, rtol=1e-5, atol=1e-6)


def test_dpmpp_first_step_equals_ddim():
    # With no history, DPM-Solver++ is first-order and coincides with deterministic DDIM.
    x0, e = _line_setup(8)
    x = torch.randn_like(x0)
    pred = x0.clamp(-1, 1)
    ddim = samplers.ddim_update(x, pred, 0.2, 0.5, 0.0, None)
    dpm, h = samplers.dpmpp_2m_update(x, pred, 0.2, 0.5)
    torch.testing.assert_close(dpm, ddim, rtol=1e-5, atol=1e-5)
    assert h == pytest.approx(0.5 * (math.log(0.5 / 0.5) - math.log(0.2 / 0.8)))


def test_dpmpp_sde_first_step_equals_ddim_eta1():
    # The SDE solver's first-order step is DDIM's step with eta = 1 (the DDPM posterior variance),
    # noise included; eta = 0 is the ODE step.
    x0, _ = _line_setup(9)
    x, z = torch.randn_like(x0), torch.randn_like(x0)
    pred = x0.clamp(-1, 1)
    ddim = samplers.ddim_update(x, pred, 0.2, 0.5, 1.0, z)
    sde, _ = samplers.dpmpp_2m_update(x, pred, 0.2, 0.5, eta=1.0, noise=z)
    torch.testing.assert_close(sde, ddim, rtol=1e-5, atol=1e-5)
    assert torch.equal(samplers.dpmpp_2m_update(x, pred, 0.2, 0.5, eta=0.0)[0], samplers.dpmpp_2m_update(x, pred, 0.2, 0.5)[0])
    with pytest.raises(ValueError, match="needs noise"):
        samplers.dpmpp_2m_update(x, pred, 0.2, 0.5, eta=0.5)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_dpmpp_sde_samples_the_data_distribution(eta):
    # Exact denoiser of Gaussian data N(mu, s^2): from pure noise the SDE solver must end with the
    # data's mean and spread (a wrong noise or drift coefficient moves the spread by far more than 3 %).
    mu, s = 0.2, 0.5
    sched = create_gaussian_diffusion(steps=1000)
    den = _gaussian_data_denoiser(sched.alphas_cumprod, mu, s)
    g = torch.Generator().manual_seed(11)
    x_T = torch.randn(8, 3, 32, 32, generator=g)
    idx = samplers.lambda_spaced_indices(sched, 60, 990)
    draws = []

    def noise_fn(x):
        draws.append(1)
        return torch.randn(x.shape, generator=g)

    out = samplers.sample_dpmpp_2m(den, x_T, sched, idx, clip=False, eta=eta, noise_fn=noise_fn).double()
    assert len(draws) == len(idx) - 1  # one per step, none for the last (it returns the x_0 prediction)
    assert abs(out.mean().item() - mu) < 0.02
    assert out.std().item() == pytest.approx(s, rel=0.03)
    ode = samplers.sample_dpmpp_2m(den, x_T, sched, idx, clip=False).double()
    assert (out - ode).abs().mean() > 0.1  # the noise changes each sample, not only the set
    again = samplers.sample_dpmpp_2m(den, x_T, sched, idx, clip=False, eta=eta, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, samplers.sample_dpmpp_2m(den, x_T, sched, idx, clip=False, eta=eta,
                                                       generator=torch.Generator().manual_seed(3)))


def test_schedule_from_betas_and_validation():
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim20", rescale_timesteps=True)
    sched = samplers.Schedule.from_diffusion(d)
    assert sched.num_timesteps == 20 and sched.model_var_type == "fixed_large"
    assert sched.model_timesteps(torch.tensor([1, 19])).tolist() == [50.0, 950.0]
    again = samplers.Schedule.from_betas(d.betas, timestep_map=d.timestep_map, original_num_steps=100)
    np.testing.assert_array_equal(again.alphas_cumprod, d.alphas_cumprod)
    den = lambda x, t: torch.zeros_like(x)
    x = torch.zeros(1, 3, 2, 2)
    with pytest.raises(DiffMixError, match="decreasing"):
        samplers.sample_ddim(den, x, sched, [3, 5])
    with pytest.raises(DiffMixError, match=r"\[0, 20\)"):
        samplers.sample_ddim(den, x, sched, 20)
    with pytest.raises(DiffMixError, match="consecutive"):
        samplers.sample_ddpm(den, x, sched, [5, 3, 0])
    with pytest.raises(ValueError, match="expected"):
        samplers.sample_ddim(lambda x, t: torch.zeros(1, 4, 2, 2), x, sched, 2)
