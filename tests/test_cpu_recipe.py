"""DiffMix's CPU recipe options (training t-range, min-SNR-gamma, rare-aware crops) and donor keeping
(RePaint-style known-region replacement during synthesis)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from test_synthesis import TINY, base_argv, load_outputs, run_main, setup, tiny_model  # noqa: F401  (fixture)

from guided_diffusion import samplers as smp
from guided_diffusion.data import CONSEP, write_label_mat
from guided_diffusion.data.classes import identity_table
from guided_diffusion.data.readers import LabeledImage, SampleFiles, read_label_file
from guided_diffusion.data.training import CropPlan, TrainCropDataset, nucleus_centres
from guided_diffusion.infra import fileio
from guided_diffusion.infra.checkpoints import save_state_dict
from guided_diffusion.infra.config import save_config
from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.infra.train_config import TrainConfig, validate_train_config
from guided_diffusion.resample import TruncatedUniformSampler, create_named_schedule_sampler
from guided_diffusion.respace import create_gaussian_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- training t-range


def test_t_range_sampler_draws_only_inside_its_range():
    diffusion = create_gaussian_diffusion(steps=100)
    sampler = create_named_schedule_sampler("uniform", diffusion, t_max=30)
    assert isinstance(sampler, TruncatedUniformSampler)
    t, w = sampler.sample(5000, "cpu", generator=torch.Generator().manual_seed(0))
    assert int(t.min()) == 0 and int(t.max()) == 30  # the whole range [0, t_max] and nothing above
    assert torch.all(w == 1)  # a chosen objective, not importance-weighted towards the full range
    counts = torch.bincount(t, minlength=31).float()
    assert counts.min() > 100 and counts.max() < 230  # ~161 each
    assert np.array_equal(sampler.weights() > 0, np.arange(100) <= 30)
    for bad in (100, 250, -1):
        with pytest.raises(DiffMixError, match="--t_max"):
            TruncatedUniformSampler(diffusion, bad)
    with pytest.raises(DiffMixError, match="uniform only"):
        create_named_schedule_sampler("loss-second-moment", diffusion, t_max=30)


# ----------------------------------------------------------------------------- min-SNR-gamma


@pytest.mark.parametrize("predict_xstart", [False, True])
def test_min_snr_weights_match_their_closed_form(predict_xstart):
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="linear", predict_xstart=predict_xstart)
    t = torch.tensor([0, 10, 100, 300, 600, 999])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()]
    snr = abar / (1 - abar)
    expected = np.minimum(snr, 5.0) if predict_xstart else np.minimum(snr, 5.0) / snr
    got = diffusion.min_snr_weight(t, 5.0)
    assert got.dtype == torch.float32 and np.allclose(got.numpy(), expected, rtol=1e-5)
    if not predict_xstart:  # low noise down-weighted, high noise (SNR < gamma) untouched
        assert got[0] < 0.01 and got[-1] == 1.0


def test_mse_weight_scales_the_mse_term_only():
    diffusion = create_gaussian_diffusion(steps=50, learn_sigma=True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([1, 20, 45])

    def model(x_t, ts, **kw):
        return torch.cat([x_t * 0.3, torch.tanh(x_t)], 1)

    plain = diffusion.training_losses(model, x, t, noise=noise)
    weight = diffusion.min_snr_weight(t, 2.0)
    weighted = diffusion.training_losses(model, x, t, noise=noise, mse_weight=weight)
    assert torch.allclose(weighted["mse"], plain["mse"]) and torch.allclose(weighted["vb"], plain["vb"])
    assert torch.allclose(weighted["loss"], weight * plain["mse"] + plain["vb"])


# ----------------------------------------------------------------------------- rare-aware crops


def _sample_with_one_rare_nucleus(size=128):
    """A 128 px image of common nuclei (class 2) on a grid, and one rare nucleus (class 1) in a corner."""
    inst = np.zeros((size, size), np.int32)
    types = np.zeros((size, size), np.int32)
    k = 1
    for y in range(8, size - 8, 24):
        for x in range(8, size - 8, 24):
            inst[y : y + 4, x : x + 4], types[y : y + 4, x : x + 4] = k, 2
            k += 1
    inst[118:122, 4:8], types[118:122, 4:8] = k, 1
    image = np.zeros((size, size, 3), np.uint8)
    return LabeledImage(SampleFiles("img", "img.png", "img.mat"), image, inst, types)


def test_rare_aware_crops_draw_with_the_configured_frequency():
    common = _sample_with_one_rare_nucleus()
    common_types = np.where(common.type_map == 1, 2, common.type_map)  # a second image without the rare one
    plain = LabeledImage(SampleFiles("img2", "img2.png", "img2.mat"), common.image, common.inst_map, common_types)
    ds = TrainCropDataset([common, plain], image_size=32, rare_classes=(1,))
    assert np.allclose(ds.rare_centres[0], [[119.5, 5.5]]) and len(ds.rare_centres[1]) == 0
    for share in (0.0, 0.3, 1.0):
        plan = CropPlan([0, 1], batch_size=8, seed=1, rare_images=[0], rare_share=share)
        keys = [k for step in range(200) for k in plan.batch_keys(step)]
        holds_rare = np.array([(ds[k]["type"] == 1).any().item() for k in keys])
        forced = np.array([len(k) == 3 for k in keys])
        assert np.all(holds_rare[forced])  # a rare-aware crop always holds the rare nucleus
        n = len(keys)
        assert abs(forced.mean() - share) <= 4 * np.sqrt(share * (1 - share) / n) + 1e-9
        natural = holds_rare[~forced].mean() if (~forced).any() else 0.0
        assert natural < 0.1  # a plain random crop seldom holds it: the share is what changes the frequency
    # share 0 keeps the plain stream exactly (the official crops and seeds)
    assert CropPlan([0, 1], 8, 1, rare_images=[0], rare_share=0.0).batch_keys(3) == CropPlan([0, 1], 8, 1).batch_keys(3)
    with pytest.raises(DiffMixError, match="no training image"):
        CropPlan([1], 8, 1, rare_images=[], rare_share=0.5)


def test_nucleus_centres_and_class_table_rare_classes():
    s = _sample_with_one_rare_nucleus()
    assert nucleus_centres(s.inst_map, s.type_map, (3,)).shape == (0, 2)
    assert len(nucleus_centres(s.inst_map, s.type_map, (2,))) == 25
    assert identity_table(5).rare_classes == (1,)
    assert CONSEP.rare_classes == (CONSEP.minor or (1,))


def test_recipe_flags_are_validated():
    for kwargs, fragment in ((dict(t_max=-1), "--t_max"), (dict(snr_gamma=float("nan")), "--snr_gamma nan"),
                             (dict(snr_gamma=-1.0), "--snr_gamma"), (dict(rare_crop_share=1.5), "--rare_crop_share")):
        with pytest.raises(DiffMixError, match=fragment):
            validate_train_config(TrainConfig(**kwargs))


# ----------------------------------------------------------------------------- donor keeping


def _recording(denoiser, seen):
    def call(x, t):
        seen.append(x.clone())
        return denoiser(x, t)

    return call


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp2m"])
def test_donor_keeping_holds_the_noised_reference_and_is_exact_with_an_empty_mask(sampler):
    diffusion = create_gaussian_diffusion(steps=40, timestep_respacing="ddim10", learn_sigma=True)
    sched = smp.as_schedule(diffusion)
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Conv2d(3, 6, 3, padding=1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def denoiser(x, t):
        out = net(x)
        return torch.cat([out[:, :3], torch.tanh(out[:, 3:])], 1)

    reference = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    keep_noise = torch.randn(2, 3, 8, 8, generator=g)
    start = torch.randn(2, 3, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 2:5, 3:6] = True
    run = {"ddim": smp.sample_ddim, "ddpm": smp.sample_ddpm, "dpmpp2m": smp.sample_dpmpp_2m}[sampler]
    rng = lambda: torch.Generator().manual_seed(5)  # noqa: E731

    seen = []
    out = run(_recording(denoiser, seen), start, sched, 6, generator=rng(), keep=smp.known_region(reference, mask, keep_noise))
    for x, i in zip(seen, range(6, -1, -1)):
        abar = float(sched.alphas_cumprod[i])
        expected = np.sqrt(abar) * reference + np.sqrt(1 - abar) * keep_noise
        assert torch.allclose(x.masked_select(mask.expand_as(x)), expected.masked_select(mask.expand_as(x)), atol=1e-6)
    assert torch.equal(out.masked_select(mask.expand_as(out)), reference.masked_select(mask.expand_as(out)))
    assert not torch.equal(out, reference)  # outside the mask the model renders

    plain = run(denoiser, start, sched, 6, generator=rng())
    empty = run(denoiser, start, sched, 6, generator=rng(),
                keep=smp.known_region(reference, torch.zeros_like(mask), keep_noise))
    assert torch.equal(plain, empty)


def _placed_map(setup, label_dir):  # noqa: F811
    """A balancing map whose record lists one placed nucleus (id 999, 4x4 px at 40..43), its GradMix image."""
    inst, types = read_label_file(os.path.join(setup["data"], "Train", "Labels", setup["stem"] + ".mat"), CONSEP)
    inst, types = inst.copy(), types.copy()
    inst[40:44, 40:44], types[40:44, 40:44] = 999, 1
    name = f"{setup['stem']}__balance000"
    write_label_mat(str(label_dir / "Labels" / f"{name}.mat"), inst, types, classes_merged=np.array(1),
                    num_classes=np.array(5))
    fileio.write_json(str(label_dir / "Records" / f"{name}.json"),
                      {"kind": "balance", "edits": [{"target_id": 999, "donor_image": "elsewhere"}]})
    gradmix = np.random.default_rng(0).integers(0, 256, inst.shape + (3,), dtype=np.uint8)
    fileio.write_png(str(label_dir / "Images" / f"{name}.png"), gradmix)
    return name, gradmix


def test_keep_donors_writes_the_placed_nucleus_as_gradmix_drew_it(setup, tmp_path, capsys):  # noqa: F811
    name, gradmix = _placed_map(setup, tmp_path / "gradmix")
    argv = ["--label_dir", str(tmp_path / "gradmix"), "--figure_rows", "0", "--changed_only", "True"]
    run_main(base_argv(setup, tmp_path / "keep", *argv, "--keep_donors", "1"))
    run_main(base_argv(setup, tmp_path / "plain", *argv))
    keep_png, _, rec = load_outputs(tmp_path / "keep" / "s1.5_ddim10_p50", f"{name}_003")
    plain_png, _, _ = load_outputs(tmp_path / "plain" / "s1.5_ddim10_p50", f"{name}_003")
    assert rec["keep_donors"] == 1
    window = gradmix[32:64, 32:64]
    assert np.array_equal(keep_png[7:13, 7:13], window[7:13, 7:13])  # the nucleus (8..11) and a 1 px ring
    assert not np.array_equal(plain_png[8:12, 8:12], window[8:12, 8:12])
    assert not np.array_equal(keep_png[:6], window[:6])  # away from it the model renders
    with pytest.raises(SystemExit) as exc:
        run_main(base_argv(setup, tmp_path / "bad", "--keep_donors", "0"))
    assert exc.value.code == 2 and "--keep_donors needs --label_dir" in capsys.readouterr().err


def test_a_model_trained_with_t_max_refuses_a_higher_start(setup, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "tmax_run"
    run.mkdir()
    shutil.copy(setup["ckpt"], run / "ema_0.9999_000010.pt")
    save_config(str(run / "config.json"), dict(TINY, timestep_respacing="", t_max=30))
    ckpt = str(run / "ema_0.9999_000010.pt")
    with pytest.raises(SystemExit) as exc:  # 50 % of ddim10 over 100 trained steps starts at t = 44
        run_main(base_argv(setup, tmp_path / "out", "--model_path", ckpt, "--figure_rows", "0"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "trained on timesteps 0..30 only" in err and "--ddim_percent" in err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    run_main(base_argv(setup, tmp_path / "ok", "--model_path", ckpt, "--figure_rows", "0", "--ddim_percent", "30",
                       "--num_samples", "1"))
    assert json.load(open(tmp_path / "ok" / "s1.5_ddim10_p30" / "run.json"))["start_timestep"] <= 30


# ----------------------------------------------------------------------------- validation loss


def test_denoising_scores_are_deterministic_and_match_their_definition():
    from guided_diffusion.metrics.denoising import denoising_scores

    diffusion = create_gaussian_diffusion(steps=100)

    class Zero(torch.nn.Module):  # predicts eps = 0: the x_0 estimate is x_t / sqrt(abar)
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, y=None):
            return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    conds = torch.zeros(5, 2, 8, 8)
    rows = denoising_scores(Zero(), diffusion, images, conds, [5, 50], seed=3, batch_size=2)
    assert [r["t"] for r in rows] == [5, 50] and all(r["n"] == 5 for r in rows)
    assert 0.8 < rows[0]["eps_mse"] < 1.2  # E[eps^2] = 1
    assert rows[0]["psnr_db"] > rows[1]["psnr_db"]  # more noise, worse one-call estimate
    assert denoising_scores(Zero(), diffusion, images, conds, [5, 50], seed=3, batch_size=5) == rows
    assert denoising_scores(Zero(), diffusion, images, conds, [5], seed=4)[0] != rows[0]


def test_sdm_validate_scores_checkpoints_on_the_same_patches(setup, tmp_path, capsys):  # noqa: F811
    from conftest import load_script

    other = tmp_path / "other"
    other.mkdir()
    save_state_dict(str(other / "ema.pt"), tiny_model(seed=1)[0].state_dict())
    save_config(str(other / "config.json"), dict(TINY, timestep_respacing="", t_max=20))
    out = tmp_path / "v.json"
    argv = ["--data_dir", setup["data"], "--dataset_mode", "consep", "--split", "Train", "--timesteps", "10,40"]
    rows = load_script("sdm_validate").main(argv + ["--model_paths", f"{setup['ckpt']},{other / 'ema.pt'}",
                                                     "--out_json", str(out)])
    assert [(r["t"], r["n"], r["beyond_t_max"]) for r in rows] == [(10, 4, False), (40, 4, False), (10, 4, False),
                                                                  (40, 4, True)]
    assert rows[0]["eps_mse"] != rows[2]["eps_mse"]
    again = load_script("sdm_validate").main(argv + ["--model_paths", setup["ckpt"]])
    assert [r["eps_mse"] for r in again] == [r["eps_mse"] for r in rows[:2]]  # same patches, same noise
    assert json.load(open(out))["rows"] == rows
    larger = load_script("sdm_validate").main(argv + ["--model_paths", setup["ckpt"], "--patch_size", "64"])
    assert [r["n"] for r in larger] == [1, 1] and larger[0]["eps_mse"] != rows[0]["eps_mse"]  # one 64 px patch
    with pytest.raises(SystemExit) as exc:
        run_cli_main = load_script("sdm_validate")
        from guided_diffusion.infra.errors import run_cli

        run_cli(lambda: run_cli_main.main(["--data_dir", setup["data"], "--model_paths", setup["ckpt"], "--timesteps", "a"]))
    assert exc.value.code == 2 and "--timesteps 'a'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: run_cli_main.main(argv + ["--model_paths", setup["ckpt"], "--patch_size", "33"]))
    assert exc.value.code == 2 and "--patch_size 33 is not a multiple of" in capsys.readouterr().err
