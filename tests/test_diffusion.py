"""GaussianDiffusion, beta schedules and likelihood helpers against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)


def make(T=20, var=gd.ModelVarType.FIXED_SMALL, loss=gd.LossType.MSE, mean=gd.ModelMeanType.EPSILON, schedule="cosine"):
    # Cosine by default: the linear schedule needs T > 20 (beta_T = 0.02 * 1000 / T < 1).
    return gd.GaussianDiffusion(betas=gd.get_named_beta_schedule(schedule, T), model_mean_type=mean,
                                model_var_type=var, loss_type=loss)


def full(i, n=2):
    return torch.full((n,), i, dtype=torch.long)


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_alpha_bar_product_formula():
    betas = gd.get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # alpha_bar(540) = prod_{i<=540} (1 - beta_i), beta_i = 1e-4 + i * (0.02 - 1e-4) / 999.
    abar_540 = math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(541))
    d = make(T=1000, schedule="linear")
    assert d.alphas_cumprod[540] == pytest.approx(abar_540, rel=1e-10)
    assert abar_540 == pytest.approx(0.0511, abs=5e-4)


def test_linear_schedule_scales_with_T():
    betas = gd.get_named_beta_schedule("linear", 250)
    assert betas[0] == pytest.approx(4e-4) and betas[-1] == pytest.approx(0.08)


def test_cosine_schedule_matches_alpha_bar_formula():
    T = 1000
    d = make(T=T, schedule="cosine")
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    # Until the 0.999 cap bites (only the last steps), abar_t = f((t+1)/T) / f(0).
    for t in (0, 10, 300, 700, 950):
        assert d.alphas_cumprod[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert d.betas.max() == pytest.approx(0.999)


def test_unknown_schedule_and_too_few_linear_steps_are_user_errors():
    with pytest.raises(DiffMixError, match="noise_schedule"):
        gd.get_named_beta_schedule("quadratic", 10)
    for T in (10, 20):
        with pytest.raises(DiffMixError, match="more than 20"):
            gd.get_named_beta_schedule("linear", T)


# ----------------------------------------------------------------------------- forward process


def test_q_sample_and_q_mean_variance_closed_form():
    d = make(T=30)
    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 17])
    xt = d.q_sample(x0, t, noise=noise)
    abar = np.cumprod(1 - d.betas)[[0, 17]]
    for b in range(2):
        expect = math.sqrt(abar[b]) * x0[b].double() + math.sqrt(1 - abar[b]) * noise[b].double()
        torch.testing.assert_close(xt[b].double(), expect, rtol=1e-6, atol=1e-6)
    mean, var, logvar = d.q_mean_variance(x0, t)
    assert var[1, 0, 0, 0].item() == pytest.approx(1 - abar[1], rel=1e-6)
    assert logvar[1, 0, 0, 0].item() == pytest.approx(math.log(1 - abar[1]), rel=1e-6)
    torch.testing.assert_close(mean[1], x0[1] * math.sqrt(abar[1]))


def test_posterior_matches_gaussian_product():
    d = make(T=25)
    torch.manual_seed(1)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    xt = torch.randn(2, 3, 4, 4)
    for tt in (1, 12, 24):
        beta, abar, abar_prev = d.betas[tt], d.alphas_cumprod[tt], d.alphas_cumprod[tt - 1]
        # q(x_{t-1}|x_t,x_0) ~ N(x_t; sqrt(1-beta) x_{t-1}, beta) * N(x_{t-1}; sqrt(abar_prev) x_0, 1-abar_prev)
        precision = (1 - beta) / beta + 1 / (1 - abar_prev)
        expect_mean = (math.sqrt(1 - beta) / beta * xt.double() + math.sqrt(abar_prev) / (1 - abar_prev) * x0.double()) / precision
        mean, var, logvar = d.q_posterior_mean_variance(x0, xt, full(tt))
        torch.testing.assert_close(mean.double(), expect_mean, rtol=1e-5, atol=1e-6)
        assert var[0, 0, 0, 0].item() == pytest.approx(beta * (1 - abar_prev) / (1 - abar), rel=1e-6)
        assert var[0, 0, 0, 0].item() == pytest.approx(1 / precision, rel=1e-6)
        assert logvar[0, 0, 0, 0].item() == pytest.approx(math.log(1 / precision), rel=1e-5)
    # t = 0: the log variance borrows entry 1 (the true variance is 0).
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == math.log(d.posterior_variance[1])


# ----------------------------------------------------------------------------- p_mean_variance


class Recorder:
    """Callable model that records its calls and returns a fixed output (or a function of y)."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, x, t, **kwargs):
        self.calls.append((t.clone(), dict(kwargs)))
        return self.fn(x, t, **kwargs)


def test_learned_range_variance_interpolates_logs():
    d = make(T=20, var=gd.ModelVarType.LEARNED_RANGE)
    x = torch.zeros(2, 3, 2, 2)
    v = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    model = lambda x, t, **k: torch.cat([torch.zeros_like(x), v], 1)
    out = d.p_mean_variance(model, x, full(7))
    assert out["log_variance"][0, 0, 0, 0].item() == pytest.approx(d.posterior_log_variance_clipped[7], rel=1e-6)
    assert out["log_variance"][1, 0, 0, 0].item() == pytest.approx(math.log(d.betas[7]), rel=1e-6)
    v0 = torch.zeros(2, 3, 2, 2)
    out = d.p_mean_variance(lambda x, t, **k: torch.cat([torch.zeros_like(x), v0], 1), x, full(7))
    mid = 0.5 * (math.log(d.betas[7]) + d.posterior_log_variance_clipped[7])
    assert out["log_variance"][0, 0, 0, 0].item() == pytest.approx(mid, rel=1e-6)


def test_fixed_large_variance_uses_betas():
    d = make(T=20, var=gd.ModelVarType.FIXED_LARGE)
    x = torch.zeros(2, 3, 2, 2)
    out = d.p_mean_variance(lambda x, t: torch.zeros_like(x), x, torch.tensor([0, 9]))
    assert out["variance"][0, 0, 0, 0].item() == pytest.approx(d.posterior_variance[1], rel=1e-6)
    assert out["variance"][1, 0, 0, 0].item() == pytest.approx(d.betas[9], rel=1e-6)


def test_guidance_scale_one_is_plain_conditional_and_kwargs_filtered():
    d = make(T=10, var=gd.ModelVarType.LEARNED_RANGE)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 4)
    y = torch.rand(2, 2, 4, 4)
    fn = lambda x, t, y: torch.cat([x * 0.3 + y.mean(1, keepdim=True), y[:, :1].expand(-1, 3, -1, -1) - 0.5], 1)
    model = Recorder(fn)
    plain = d.p_mean_variance(model, x, full(5), model_kwargs={"y": y})
    one = d.p_mean_variance(model, x, full(5), model_kwargs={"y": y, "s": 1.0, "gt": x})
    assert len(model.calls) == 2  # no unconditional call for s = 1
    assert all(set(kw) == {"y"} for _, kw in model.calls)  # "s" and "gt" never reach the model
    for k in plain:
        assert torch.equal(plain[k], one[k])


def test_guidance_formula_for_s_above_one():
    d = make(T=10, var=gd.ModelVarType.LEARNED_RANGE)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 4, 4)
    y = torch.rand(2, 2, 4, 4) + 0.5
    cond_eps, uncond_eps = torch.randn(2, 3, 4, 4) * 0.1, torch.randn(2, 3, 4, 4) * 0.1
    cond_v, uncond_v = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), -0.5)

    def fn(x, t, y):
        is_uncond = bool((y == 0).all())
        return torch.cat([uncond_eps, uncond_v], 1) if is_uncond else torch.cat([cond_eps, cond_v], 1)

    model = Recorder(fn)
    s = 2.5
    out = d.p_mean_variance(model, x, full(6), clip_denoised=False, model_kwargs={"y": y, "s": s})
    assert len(model.calls) == 2 and bool((model.calls[1][1]["y"] == 0).all())
    eps = uncond_eps + s * (cond_eps - uncond_eps)
    abar = d.alphas_cumprod[6]
    expect_x0 = (x.double() - math.sqrt(1 - abar) * eps.double()) / math.sqrt(abar)
    torch.testing.assert_close(out["pred_xstart"].double(), expect_x0, rtol=1e-5, atol=1e-5)
    # Variance channels come from the conditional output (frac = 0.75).
    expect_log = 0.75 * math.log(d.betas[6]) + 0.25 * d.posterior_log_variance_clipped[6]
    assert out["log_variance"][0, 0, 0, 0].item() == pytest.approx(expect_log, rel=1e-6)


def test_guidance_without_condition_is_user_error():
    d = make(T=10)
    with pytest.raises(DiffMixError, match="'y'"):
        d.p_mean_variance(lambda x, t, **k: x, torch.zeros(1, 3, 2, 2), full(1, 1), model_kwargs={"s": 2.0})


def test_clip_and_start_x_prediction():
    d = make(T=10, mean=gd.ModelMeanType.START_X)
    x = torch.zeros(1, 3, 2, 2)
    out = d.p_mean_variance(lambda x, t: torch.full_like(x, 3.0), x, full(4, 1))
    assert torch.all(out["pred_xstart"] == 1.0)
    out = d.p_mean_variance(lambda x, t: torch.full_like(x, 3.0), x, full(4, 1), clip_denoised=False)
    assert torch.all(out["pred_xstart"] == 3.0)


def test_previous_x_prediction_inverts_posterior_mean():
    d = make(T=10, mean=gd.ModelMeanType.PREVIOUS_X)
    torch.manual_seed(4)
    x0, xt = torch.rand(1, 3, 2, 2) * 0.5, torch.randn(1, 3, 2, 2)
    prev_mean = d.q_posterior_mean_variance(x0, xt, full(5, 1))[0]
    out = d.p_mean_variance(lambda x, t: prev_mean, xt, full(5, 1))
    torch.testing.assert_close(out["pred_xstart"], x0, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- steps


def test_ddim_eta0_is_deterministic_and_reversible():
    d = make(T=50)
    torch.manual_seed(5)
    x0 = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    e = torch.randn(2, 3, 4, 4)
    eps_model = lambda x, t: e  # the exact noise of a state on the line x0 -> e
    t = 30
    xt = d.q_sample(x0, full(t), noise=e)
    torch.manual_seed(100)
    a = d.ddim_sample(eps_model, xt, full(t), clip_denoised=False)["sample"]
    torch.manual_seed(200)
    b = d.ddim_sample(eps_model, xt, full(t), clip_denoised=False)["sample"]
    assert torch.equal(a, b)
    expect = d.q_sample(x0, full(t - 1), noise=e)
    torch.testing.assert_close(a, expect, rtol=1e-5, atol=1e-5)
    back = d.ddim_reverse_sample(eps_model, a, full(t - 1), clip_denoised=False)["sample"]
    torch.testing.assert_close(back, xt, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        d.ddim_reverse_sample(eps_model, a, full(t - 1), eta=0.5)


def test_ddim_last_step_returns_pred_xstart():
    d = make(T=20)
    x = torch.randn(2, 3, 4, 4)
    out = d.ddim_sample(lambda x, t: torch.zeros_like(x), x, full(0), eta=1.0)
    torch.testing.assert_close(out["sample"], out["pred_xstart"], rtol=1e-6, atol=1e-6)


def test_p_sample_noise_scale_and_t0():
    d = make(T=20, var=gd.ModelVarType.FIXED_LARGE)
    x = torch.randn(2, 3, 4, 4)
    model = lambda x, t: torch.zeros_like(x)
    torch.manual_seed(6)
    out = d.p_sample(model, x, torch.tensor([0, 11]))
    torch.manual_seed(6)
    mv = d.p_mean_variance(model, x, torch.tensor([0, 11]))
    noise = torch.randn_like(x)
    torch.testing.assert_close(out["sample"][0], mv["mean"][0])
    torch.testing.assert_close(out["sample"][1], mv["mean"][1] + math.sqrt(d.betas[11]) * noise[1], rtol=1e-5, atol=1e-6)


def test_ddim_loop_start_states_and_bad_percent():
    d = make(T=10)
    calls = []

    def model(x, t, **kw):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    noise = torch.randn(1, 3, 4, 4)
    d.ddim_sample_loop(model, (1, 3, 4, 4), noise=noise, ddim_percent=0.5)
    assert calls == [4, 3, 2, 1, 0]
    calls.clear()
    out = d.ddim_sample_loop(model, (1, 3, 4, 4))  # no gt, no noise: pure randn start
    assert calls == list(range(9, -1, -1)) and out.shape == (1, 3, 4, 4)
    for bad in (0.0, 0.05, 1.5):
        with pytest.raises(DiffMixError, match="ddim_percent"):
            d.ddim_sample_loop(model, (1, 3, 4, 4), ddim_percent=bad)


# ----------------------------------------------------------------------------- losses


def _oracle_model(noise, v):
    """Outputs the true noise and constant variance values: the ideal eps-predictor."""
    return lambda x, t, **k: torch.cat([noise, torch.full_like(noise, v)], 1)


def test_training_losses_hybrid_and_perfect_predictor():
    d = make(T=40, var=gd.ModelVarType.LEARNED_RANGE)
    torch.manual_seed(7)
    x0 = torch.rand(3, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 5, 39])
    terms = d.training_losses(_oracle_model(noise, -1.0), x0, t, model_kwargs={"y": torch.zeros(3, 1, 4, 4)}, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (3,) for v in terms.values())
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert terms["mse"].abs().max() < 1e-10
    # Exact mean and posterior variance: the KL terms (t > 0) vanish.
    assert terms["vb"][1:].abs().max() < 1e-4
    assert terms["vb"][0] > 0  # t = 0: decoder NLL in bits


def test_training_losses_mse_value_and_vb_rescaling():
    torch.manual_seed(8)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 30])
    model = lambda x, t, **k: torch.cat([torch.zeros_like(x), torch.full_like(x, 0.3)], 1)
    plain = make(T=40, var=gd.ModelVarType.LEARNED_RANGE).training_losses(model, x0, t, noise=noise)
    resc = make(T=40, var=gd.ModelVarType.LEARNED_RANGE, loss=gd.LossType.RESCALED_MSE).training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(plain["mse"], (noise**2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(resc["vb"], plain["vb"] * 40 / 1000)
    torch.testing.assert_close(resc["mse"], plain["mse"])
    fixed = make(T=40).training_losses(lambda x, t: torch.zeros_like(x), x0, t, noise=noise)
    assert set(fixed) == {"loss", "mse"}


def test_vb_does_not_train_the_mean():
    d = make(T=20, var=gd.ModelVarType.LEARNED_RANGE)
    w = torch.zeros(6, requires_grad=True)
    model = lambda x, t, **k: x.repeat(1, 2, 1, 1) * w.view(1, 6, 1, 1)
    x0 = torch.rand(2, 3, 4, 4)
    noise = torch.randn_like(x0)
    terms = d.training_losses(model, x0, torch.tensor([4, 9]), noise=noise)
    terms["vb"].sum().backward()
    assert torch.all(w.grad[:3] == 0) and torch.any(w.grad[3:] != 0)


def test_kl_losses():
    d_kl = make(T=10, var=gd.ModelVarType.LEARNED_RANGE, loss=gd.LossType.KL)
    d_rkl = make(T=10, var=gd.ModelVarType.LEARNED_RANGE, loss=gd.LossType.RESCALED_KL)
    torch.manual_seed(9)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    model = lambda x, t, **k: torch.cat([x * 0.1, torch.zeros_like(x)], 1)
    t = torch.tensor([0, 6])
    a = d_kl.training_losses(model, x0, t, noise=noise)
    b = d_rkl.training_losses(model, x0, t, noise=noise)
    assert set(a) == {"loss"}
    torch.testing.assert_close(b["loss"], a["loss"] * 10)


def test_calc_bpd_loop_shapes():
    d = make(T=5, var=gd.ModelVarType.LEARNED_RANGE)
    out = d.calc_bpd_loop(lambda x, t, **k: torch.zeros(x.shape[0], 6, *x.shape[2:]), torch.rand(2, 3, 4, 4) * 2 - 1)
    assert out["vb"].shape == (2, 5) and out["total_bpd"].shape == (2,)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])


def test_calc_bpd_loop_values_with_an_oracle_model():
    """A model that knows x_0 returns the exact noise of every x_t and, with learned-range value -1,
    the exact posterior variance: every KL term vanishes, both MSEs are 0, and the prior and the
    decoder term have closed forms."""
    T = 6
    d = make(T=T, var=gd.ModelVarType.LEARNED_RANGE)
    x0 = (torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1).double().float()
    abar = torch.from_numpy(d.alphas_cumprod)

    def oracle(x, t, **kwargs):
        a = abar[t].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)  # frac 0: the clipped posterior variance

    out = d.calc_bpd_loop(oracle, x0)
    assert out["mse"].abs().max() < 1e-8 and out["xstart_mse"].abs().max() < 1e-8
    # Columns run t = T-1 down to 0, as the official loop stacks them.
    assert out["vb"][:, :-1].abs().max() < 1e-5  # exact posterior mean and variance: KL = 0
    # Decoder term at t = 0: -log2 of the discretized Gaussian likelihood of x0 around itself.
    var0 = float(d.posterior_variance[1])  # the clipped variance at t = 0 borrows entry 1
    ll = discretized_gaussian_log_likelihood(x0, means=x0, log_scales=0.5 * math.log(var0) * torch.ones_like(x0))
    torch.testing.assert_close(out["vb"][:, -1], -ll.mean(dim=(1, 2, 3)) / math.log(2.0), rtol=1e-4, atol=1e-6)
    # Prior: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dimension, in bits, averaged.
    aT = float(d.alphas_cumprod[-1])
    kl = 0.5 * (-math.log(1 - aT) + (1 - aT) + aT * x0.double() ** 2 - 1)
    torch.testing.assert_close(out["prior_bpd"].double(), kl.mean(dim=(1, 2, 3)) / math.log(2.0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])


# ----------------------------------------------------------------------------- losses.py


def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = torch.tensor([0.3, -1.0]), torch.tensor([0.2, -0.5]), torch.tensor([0.0, 1.0]), torch.tensor([-0.1, 0.4])
    p = torch.distributions.Normal(m1, torch.exp(0.5 * lv1))
    q = torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q))
    assert normal_kl(m1, lv1, 0.0, 0.0).shape == (2,)


def test_approx_cdf_close_to_erf():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 1e-3


def test_discretized_likelihood_sums_to_one_over_bins():
    x = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(1, 1, 1, 256)
    for mean, scale in ((0.1, 0.3), (-0.9, 0.05), (0.0, 2.0)):
        ll = discretized_gaussian_log_likelihood(
            x, means=torch.full_like(x, mean), log_scales=torch.full_like(x, math.log(scale))
        )
        assert torch.exp(ll).sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (ll <= 0).all()
    # A very confident prediction at the right pixel has likelihood ~1.
    x1 = torch.full((1, 1, 1, 1), 0.2, dtype=torch.float64)
    ll = discretized_gaussian_log_likelihood(x1, means=x1, log_scales=torch.full_like(x1, math.log(1e-4)))
    assert ll.item() == pytest.approx(0.0, abs=1e-6)
