"""Timestep samplers: uniform and loss-second-moment importance sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from guided_diffusion.respace import create_gaussian_diffusion


@pytest.fixture
def diffusion():
    return create_gaussian_diffusion(steps=20, noise_schedule="cosine")


def test_factory(diffusion):
    assert isinstance(create_named_schedule_sampler("uniform", diffusion), UniformSampler)
    assert isinstance(create_named_schedule_sampler("loss-second-moment", diffusion), LossSecondMomentResampler)
    with pytest.raises(DiffMixError, match="schedule_sampler"):
        create_named_schedule_sampler("importance", diffusion)


def test_uniform_sampler(diffusion):
    g = torch.Generator().manual_seed(0)
    t, w = UniformSampler(diffusion).sample(4000, "cpu", generator=g)
    assert t.dtype == torch.long and w.dtype == torch.float32 and t.shape == w.shape == (4000,)
    assert t.min() >= 0 and t.max() < 20 and torch.all(w == 1)
    counts = torch.bincount(t, minlength=20).float()
    assert counts.min() > 120 and counts.max() < 290  # ~200 each
    t2, _ = UniformSampler(diffusion).sample(4000, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)


def test_second_moment_weights_and_history(diffusion):
    s = LossSecondMomentResampler(diffusion, history_per_term=2, uniform_prob=0.1)
    s.update_with_all_losses(list(range(20)), [1.0] * 20)
    assert np.all(s.weights() == 1)  # not warmed up: every t needs 2 losses
    s.update_with_all_losses(list(range(20)), [float(t + 1) for t in range(20)])
    # History of t: [1, t+1]; weight ~ sqrt((1 + (t+1)^2) / 2), normalised, mixed with 10% uniform.
    raw = np.sqrt((1 + (np.arange(20) + 1.0) ** 2) / 2)
    expect = 0.9 * raw / raw.sum() + 0.1 / 20
    np.testing.assert_allclose(s.weights(), expect, rtol=1e-12)
    s.update_with_all_losses([3], [7.0])  # full: the oldest entry (1.0) drops out
    assert s._loss_history[3].tolist() == [4.0, 7.0]
    s.update_with_local_losses(torch.tensor([5]), torch.tensor([2.0]))  # not distributed: same path
    assert s._loss_history[5].tolist() == [6.0, 2.0]


def test_importance_weights_are_unbiased(diffusion):
    s = LossSecondMomentResampler(diffusion, history_per_term=1, uniform_prob=0.0)
    s.update_with_all_losses(list(range(20)), [float(t + 1) for t in range(20)])
    g = torch.Generator().manual_seed(1)
    t, w = s.sample(200_000, "cpu", generator=g)
    f = (t.double() - 7.0) ** 2  # any function of t
    uniform_mean = ((torch.arange(20).double() - 7.0) ** 2).mean()
    assert (w.double() * f).mean().item() == pytest.approx(uniform_mean.item(), rel=0.02)
    p = s.weights() / s.weights().sum()
    torch.testing.assert_close(w[:5].double(), torch.from_numpy(1 / (20 * p[t[:5].numpy()])), rtol=1e-6, atol=0)


def test_state_roundtrip(diffusion):
    s = LossSecondMomentResampler(diffusion, history_per_term=2)
    s.update_with_all_losses([1, 1, 2], [0.5, 0.25, 3.0])
    fresh = LossSecondMomentResampler(diffusion, history_per_term=2)
    fresh.load_state_dict(s.state_dict())
    np.testing.assert_array_equal(fresh._loss_history, s._loss_history)
    np.testing.assert_array_equal(fresh._loss_counts, s._loss_counts)
    with pytest.raises(DiffMixError, match="diffusion_steps"):
        LossSecondMomentResampler(create_gaussian_diffusion(steps=30), history_per_term=2).load_state_dict(s.state_dict())
