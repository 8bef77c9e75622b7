"""benchmarks/bench_steps.py (DDIM-55 vs DPM-Solver++ from one SDEdit start) on a tiny random
checkpoint and a one-tile toy dataset, on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

from guided_diffusion import samplers as smp
from guided_diffusion import synthesis as syn
from guided_diffusion.data import build_condition, make_toy_dataset
from guided_diffusion.data.patches import sampling_patches
from guided_diffusion.infra.checkpoints import save_state_dict
from guided_diffusion.infra.config import ModelConfig, save_config
from guided_diffusion.infra.errors import run_cli
from guided_diffusion.script_util import create_model_and_diffusion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ModelConfig(image_size=32, num_classes=5, num_channels=32, num_res_blocks=1, num_head_channels=16,
                   attention_resolutions="16", channel_mult="1,2", class_cond=True, learn_sigma=True,
                   resblock_updown=True, use_scale_shift_norm=True, diffusion_steps=100).to_dict()


def _load(name):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


bench = _load("bench_steps")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("steps")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**dict(TINY, timestep_respacing="ddim20"))
    bench.common.perturb_weights(model, std=0.05)
    ckpt = str(root / "run" / "ema_0.9999_000010.pt")
    save_state_dict(ckpt, model.state_dict())
    save_config(str(root / "run" / "config.json"), dict(TINY, timestep_respacing="", lr=1e-4))
    data = str(root / "data")
    make_toy_dataset(data, num_train=1, num_test=0, size=64, seed=3, progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"root": root, "ckpt": ckpt, "data": data, "model": model.eval()}
    torch.set_num_threads(before)


def test_solver_plan_over_the_respaced_timesteps_is_the_respaced_solver(setup):
    # --solver_steps runs DPM-Solver++ on the trained grid from the respaced start state; given the
    # respaced run's own timesteps it must reproduce the respaced dpmpp2m run bit for bit.
    model = setup["model"]
    _, diffusion = create_model_and_diffusion(**dict(TINY, timestep_respacing="ddim20"))
    patches = sampling_patches(data_dir=setup["data"], dataset_mode="consep", image_size=32, progress=False)[:2]
    y = build_condition(np.stack([p.type_map for p in patches]), np.stack([p.inst_map for p in patches]), 5)
    ref = syn.image_to_tensor([p.image for p in patches])
    den = syn.FastGuidedDenoiser(model, y, 1.5)
    sched = smp.as_schedule(diffusion)
    steps = syn.start_steps(sched.num_timesteps, 55)
    expected = syn.sample_batch(den, sched, ref, steps, syn.PerSampleNoise([11, 12]), sampler="dpmpp2m")
    own = (syn.trained_schedule(TINY), [int(t) for t in sched.timestep_map[:steps][::-1]])
    got = syn.sample_batch(den, sched, ref, steps, syn.PerSampleNoise([11, 12]), sampler="dpmpp2m", solver=own)
    assert torch.equal(got, expected)
    fewer = syn.solver_plan(TINY, sched, steps, 4)
    other = syn.sample_batch(den, sched, ref, steps, syn.PerSampleNoise([11, 12]), sampler="dpmpp2m", solver=fewer)
    assert not torch.equal(other, expected) and torch.isfinite(other).all()


def test_solver_timesteps_cover_the_same_interval():
    _, diffusion = create_model_and_diffusion(**dict(TINY, timestep_respacing="ddim20"))
    sched = smp.as_schedule(diffusion)
    full, idx = syn.solver_plan(TINY, sched, 11, 8)
    assert full.num_timesteps == 100 and int(sched.timestep_map[10]) == 50
    assert idx[0] == 50 and idx[-1] == 0 and len(idx) == 8 and idx == sorted(idx, reverse=True)


def test_study_cli_writes_the_comparison_and_calls_the_fidelity_scorer(setup, tmp_path, monkeypatch):
    (tmp_path / "fidmod.py").write_text(
        "import numpy as np\n"
        "CALLS = []\n"
        "def score(images, inst, types):\n"
        "    CALLS.append((images.shape, images.dtype.str, inst.shape, types.shape))\n"
        "    return {'foreground_mean': float(images[inst > 0].mean())}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "study"
    argv = ["--model_path", setup["ckpt"], "--data_dir", setup["data"], "--dataset_mode", "consep",
            "--timestep_respacing", "ddim20", "--num_patches", "2", "--batch_size", "2", "--compare_steps", "3,6",
            "--results_path", str(out), "--progress", "False", "--fidelity", "fidmod:score"]
    run_cli(lambda: bench.main(argv))
    report = json.loads((out / "steps_study.json").read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["real patch (no sampling)", "DDIM-11", "DDIM-11, other noise (noise floor)",
                          "DPM-Solver++(2M), 3 steps", "DPM-Solver++(2M), 6 steps"]
    real = rows.pop("real patch (no sampling)")
    assert real["model_calls"] == 0 and "foreground_mean" in real["fidelity"]
    assert report["settings"]["t_start"] == 50 and report["settings"]["reference_steps"] == 11
    assert rows["DPM-Solver++(2M), 6 steps"]["timesteps"][0] == 50
    for name, r in rows.items():
        assert r["seconds_per_patch"] > 0 and "foreground_mean" in r["fidelity"]
        if name != "DDIM-11":
            assert np.isfinite(r["psnr_db"]["mean"]) and -1 < r["ssim"]["mean"] < 1
    assert "within_noise_psnr_ssim" in rows["DPM-Solver++(2M), 3 steps"]
    assert isinstance(rows["DPM-Solver++(2M), 3 steps"]["fidelity_beyond_noise"], list)
    assert set(rows["DDIM-11, other noise (noise floor)"]["fidelity_change"]) == {"foreground_mean"}
    import fidmod

    pooled, single = ((2, 32, 32, 3), "|u1", (2, 32, 32), (2, 32, 32)), ((1, 32, 32, 3), "|u1", (1, 32, 32), (1, 32, 32))
    assert sorted(fidmod.CALLS) == sorted([pooled] * 5 + [single] * 8)  # pooled per method + real; per patch
    assert (out / "steps_study.md").read_text().count("| DPM-Solver++(2M)") == 2
    assert (out / "steps_study.png").stat().st_size > 0


def test_fidelity_within_noise_is_a_per_patch_change_no_larger_than_the_noise_floors():
    ref = [{"dice": 0.8, "f1_other": 0.5}, {"dice": 0.6, "f1_other": float("nan")}]
    floor = [{"dice": 0.7, "f1_other": 0.5}, {"dice": 0.7, "f1_other": 1.0}]  # moves dice 0.1 per patch, f1 0
    close = [{"dice": 0.75, "f1_other": 0.5}, {"dice": 0.65, "f1_other": 0.0}]
    far = [{"dice": 0.6, "f1_other": 0.0}, {"dice": 0.8, "f1_other": 1.0}]
    fc = bench.fidelity_change(floor, ref)
    assert fc == pytest.approx({"dice": 0.1, "f1_other": 0.0})
    assert bench.fidelity_change(close, ref) == pytest.approx({"dice": 0.05, "f1_other": 0.0})
    assert bench.fidelity_shortfalls(bench.fidelity_change(close, ref), fc) == []
    assert bench.fidelity_shortfalls(bench.fidelity_change(far, ref), fc) == ["dice", "f1_other"]
    assert np.isnan(bench.fidelity_change([{"x": 1.0}], [{"x": float("nan")}])["x"])


def test_identical_images_score_perfectly():
    img = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    psnr, ssim = bench.psnr_ssim(img, img)
    assert np.all(np.isinf(psnr)) and np.allclose(ssim, 1.0)
    noisy = np.clip(img.astype(int) + 8, 0, 255).astype(np.uint8)
    psnr, ssim = bench.psnr_ssim(noisy, img)
    assert np.all((psnr > 25) & (psnr < 40)) and np.all(ssim < 1)


def test_bad_fidelity_hook_is_a_one_line_error(setup, tmp_path, capsys):
    argv = ["--model_path", setup["ckpt"], "--data_dir", setup["data"], "--results_path", str(tmp_path),
            "--fidelity", "no_such_module_xyz:score"]
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: bench.main(argv))
    assert exc.value.code == 2
    assert "--fidelity" in capsys.readouterr().err and not (tmp_path / "steps_study.json").exists()
