"""Timestep respacing and the diffusion factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.respace import SpacedDiffusion, create_gaussian_diffusion, space_timesteps


def test_ddim_striding():
    assert space_timesteps(1000, "ddim100") == set(range(0, 1000, 10))
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    # 1000 / 143 -> 7 steps: a stride exists.
    assert space_timesteps(1000, "ddim7") == set(range(0, 1000, 143))
    with pytest.raises(DiffMixError, match="no integer stride gives exactly 7 of 10"):
        space_timesteps(10, "ddim7")
    with pytest.raises(DiffMixError, match="ddimN"):
        space_timesteps(10, "ddimx")


def test_section_counts_hand_cases():
    # One section of 10 steps, 3 picks: stride 4.5 -> 0, round(4.5) = 4 (half to even), 9.
    assert space_timesteps(10, "3") == {0, 4, 9}
    # Two sections of 5: {0, 4} and 5 + {0, 2, 4}.
    assert space_timesteps(10, "2,3") == {0, 4, 5, 7, 9}
    # Uneven: 11 -> sections of 6 and 5 (the earlier one longer).
    assert space_timesteps(11, [2, 3]) == {0, 5, 6, 8, 10}
    assert space_timesteps(1000, "1000") == set(range(1000))
    assert space_timesteps(1000, "1") == {0}


def test_section_counts_official_examples():
    steps = space_timesteps(300, "10,20,30")
    assert len(steps) == 60
    first = sorted(s for s in steps if s < 100)
    assert first == list(range(0, 100, 11))
    assert {100, 199, 200, 299} <= steps and len([s for s in steps if 100 <= s < 200]) == 20
    s250 = sorted(space_timesteps(1000, "250"))
    assert len(s250) == 250 and s250[0] == 0 and s250[-1] == 999
    assert set(np.diff(s250)) <= {4, 5}  # stride 999/249 = 4.012
    uneven = space_timesteps(1000, "10,20,30")  # sections 334, 333, 333
    assert {0, 37, 333, 334, 666, 667, 999} <= uneven and len(uneven) == 60


def test_bad_section_counts():
    with pytest.raises(DiffMixError, match="cannot take 20 steps from a section of 10"):
        space_timesteps(20, "20,1")
    with pytest.raises(DiffMixError, match="comma-separated"):
        space_timesteps(20, "5;5")
    with pytest.raises(DiffMixError, match="positive"):
        space_timesteps(20, "0")


def test_spaced_schedule_keeps_marginals():
    base = create_gaussian_diffusion(steps=1000)
    sp = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim100")
    assert sp.num_timesteps == 100 and sp.original_num_steps == 1000
    assert sp.timestep_map == list(range(0, 1000, 10))
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[sp.timestep_map], rtol=1e-12)
    assert sp.betas[0] == base.betas[0]
    # beta_i of the respaced chain = 1 - abar(map_i) / abar(map_{i-1}).
    assert sp.betas[1] == pytest.approx(1 - base.alphas_cumprod[10] / base.alphas_cumprod[0], rel=1e-12)
    # DiffMix's partial start: ddim100, p = 0.55 -> index 54 = original t 540, abar ~ 0.0511.
    assert sp.timestep_map[int(100 * 0.55) - 1] == 540
    assert sp.alphas_cumprod[54] == pytest.approx(0.0511, abs=5e-4)
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    a = sp.q_sample(x0, torch.tensor([54, 3]), noise=noise)
    b = base.q_sample(x0, torch.tensor([540, 30]), noise=noise)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_model_sees_original_timesteps():
    seen = []

    def model(x, t, **kw):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sp = create_gaussian_diffusion(steps=1000, timestep_respacing="ddim100")
    x = torch.zeros(2, 3, 2, 2)
    sp.p_mean_variance(model, x, torch.tensor([54, 0]))
    sp.training_losses(model, x, torch.tensor([99, 1]))
    assert seen[0].tolist() == [540, 0] and seen[0].dtype == torch.long
    assert seen[1].tolist() == [990, 10]
    seen.clear()
    resc = create_gaussian_diffusion(steps=500, timestep_respacing="ddim50", rescale_timesteps=True)
    resc.p_mean_variance(model, x, torch.tensor([1, 49]))
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [20.0, 980.0]  # 10 * 2, 490 * 2


def test_factory_types():
    d = create_gaussian_diffusion(steps=50)
    assert isinstance(d, SpacedDiffusion) and d.num_timesteps == 50 and d.timestep_map == list(range(50))
    assert d.model_var_type == gd.ModelVarType.FIXED_LARGE and d.loss_type == gd.LossType.MSE
    assert d.model_mean_type == gd.ModelMeanType.EPSILON
    assert create_gaussian_diffusion(steps=50, sigma_small=True).model_var_type == gd.ModelVarType.FIXED_SMALL
    d = create_gaussian_diffusion(steps=50, learn_sigma=True, rescale_learned_sigmas=True, predict_xstart=True)
    assert d.model_var_type == gd.ModelVarType.LEARNED_RANGE and d.loss_type == gd.LossType.RESCALED_MSE
    assert d.model_mean_type == gd.ModelMeanType.START_X
    assert create_gaussian_diffusion(steps=50, use_kl=True, rescale_learned_sigmas=True).loss_type == gd.LossType.RESCALED_KL
    cos = create_gaussian_diffusion(steps=50, noise_schedule="cosine", timestep_respacing="10")
    assert cos.num_timesteps == 10 and cos.timestep_map[-1] == 49


def test_spaced_diffusion_rejects_out_of_range_steps():
    with pytest.raises(DiffMixError, match="subset"):
        SpacedDiffusion([0, 60], betas=gd.get_named_beta_schedule("linear", 50),
                        model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL,
                        loss_type=gd.LossType.MSE)
