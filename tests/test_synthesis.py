"""Synthesis pipeline (image_sample.py) on a tiny random checkpoint and a tiny toy dataset (CPU).

The checkpoint is a 32 px, 2-level SDM U-Net with every weight perturbed (the official init zeroes
several convs, which would make guidance and the fast path trivially exact), saved with a
config.json beside it, as training writes it.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from train_helpers import TINY_UNET

from guided_diffusion import samplers as smp
from guided_diffusion import synthesis as syn
from guided_diffusion.data import CONSEP, build_condition, make_toy_dataset, relabel_contiguous, write_label_mat
from guided_diffusion.data.readers import read_label_file
from guided_diffusion.infra import fileio
from guided_diffusion.infra.checkpoints import save_state_dict
from guided_diffusion.infra.config import ModelConfig, save_config
from guided_diffusion.infra.errors import run_cli
from guided_diffusion.script_util import create_model_and_diffusion

# The training tests' tiny U-Net (one definition), sampled in eval mode over 100 diffusion steps.
TINY = ModelConfig(**dict(TINY_UNET, dropout=0.0, diffusion_steps=100)).to_dict()


def tiny_model(respacing: str = "ddim10", seed: int = 0):
    cfg = dict(TINY, timestep_respacing=respacing)
    model, diffusion = create_model_and_diffusion(**cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval(), diffusion


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint folder (ema .pt + flat config.json) and a one-tile 64 px CoNSeP-layout toy dataset."""
    root = tmp_path_factory.mktemp("synthesis")
    model, _ = tiny_model()
    ckpt = str(root / "run" / "ema_0.9999_000010.pt")
    save_state_dict(ckpt, model.state_dict())
    # Training writes flat model + train settings; the sampler must take only the model keys.
    save_config(str(root / "run" / "config.json"), dict(TINY, timestep_respacing="", lr=1e-4, batch_size=2))
    data = str(root / "data")
    make_toy_dataset(data, num_train=1, num_test=0, size=64, seed=3, progress=False)
    return {"root": root, "ckpt": ckpt, "data": data, "stem": "toy_train_000"}


def run_main(argv):
    """Run scripts/image_sample.py's main in-process through run_cli (exit code, no traceback)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "image_sample.py")
    spec = importlib.util.spec_from_file_location("image_sample_cli", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run_cli(lambda: mod.main(argv))


def base_argv(setup, out, *extra):
    return [
        "--data_dir", setup["data"], "--dataset_mode", "consep", "--model_path", setup["ckpt"],
        "--results_path", str(out), "--timestep_respacing", "ddim10", "--ddim_percent", "50",
        "--s", "1.5", "--progress", "False", *extra,
    ]


def load_outputs(run_dir, name):
    png = fileio.read_image(os.path.join(run_dir, "samples", name + ".png"))
    npy = np.load(os.path.join(run_dir, "npy_patch", name + ".npy"))
    rec = json.load(open(os.path.join(run_dir, "records", name + ".json")))
    return png, npy, rec


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def test_ddim_percent_is_exact_percent_of_steps():
    assert syn.start_steps(100, 55) == 55  # the paper's setting: 55 steps from t = 540 with ddim100
    assert syn.start_steps(100, 29) == 29  # the official float product gives 28 here
    assert syn.start_steps(100, 100) == 100
    assert syn.start_steps(10, 50) == 5
    with pytest.raises(syn.DiffMixError):
        syn.start_steps(10, 5)  # 0.5 steps


def test_hovernet_patch_keeps_large_ids_and_renumbers():
    inst = (np.arange(32 * 32).reshape(32, 32) // 2) * 3 + 7  # 512 instances, ids up to 1540
    inst[0, :4] = 0
    types = (inst % 5).astype(np.int32)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = syn.hovernet_patch(img, inst, types)
    assert out.dtype == np.int32 and out.shape == (32, 32, 5)
    np.testing.assert_array_equal(out[..., :3], img)
    np.testing.assert_array_equal(out[..., 3], relabel_contiguous(inst))
    assert out[..., 3].max() == 510 and set(np.unique(out[..., 3])) == set(range(511))
    np.testing.assert_array_equal(out[..., 4], types)


def test_noise_seeds_and_shards():
    a = syn.noise_seed(0, "img_1__balance000", 3, 0)
    assert a == syn.noise_seed(0, "img_1__balance000", 3, 0)
    others = {syn.noise_seed(1, "img_1__balance000", 3, 0), syn.noise_seed(0, "img_1__balance001", 3, 0),
              syn.noise_seed(0, "img_1__balance000", 4, 0), syn.noise_seed(0, "img_1__balance000", 3, 1)}
    assert a not in others and len(others) == 4
    jobs = list(range(10))
    parts = [syn.shard(jobs, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == jobs and parts[1] == [1, 4, 7]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
def test_per_sample_noise_does_not_depend_on_batching(sampler):
    model, diffusion = tiny_model()
    y = torch.zeros(2, 6, 32, 32)
    y[0, 1], y[1, 2] = 1, 1
    ref = torch.rand(2, 3, 32, 32) * 2 - 1
    seeds = [11, 22]

    def run(idx):
        den = syn.FastGuidedDenoiser(model, y[idx], 1.5)
        noise = syn.PerSampleNoise([seeds[i] for i in idx])
        return syn.sample_batch(den, diffusion, ref[idx], 3, noise, sampler=sampler, eta=1.0)

    both, alone = run([0, 1]), run([1])
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Exactness: fast path == plain path == the official ddim_sample_loop
# ---------------------------------------------------------------------------------------------


def test_fast_path_equals_official_ddim_loop():
    model, diffusion = tiny_model()
    types = torch.zeros(2, 32, 32, dtype=torch.long)
    inst = torch.zeros(2, 32, 32, dtype=torch.long)
    types[0, 4:12, 4:14], inst[0, 4:12, 4:14] = 2, 1
    types[1, 16:30, 3:9], inst[1, 16:30, 3:9] = 4, 1
    types[1, 2:9, 20:31], inst[1, 2:9, 20:31] = 1, 2
    y = build_condition(types, inst, 5)
    ref = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    steps, s, seeds = 5, 1.5, [5, 6]

    sched = smp.as_schedule(diffusion)
    x_t = smp.q_sample(sched, ref, torch.full((2,), steps - 1), syn.PerSampleNoise(seeds).randn((3, 32, 32)))
    official = diffusion.ddim_sample_loop(
        model, (2, 3, 32, 32), noise=x_t, clip_denoised=True,
        model_kwargs={"y": y, "s": s, "gt": ref}, ddim_percent=steps / diffusion.num_timesteps,
    )
    fast = syn.sample_batch(syn.FastGuidedDenoiser(model, y, s), diffusion, ref, steps, syn.PerSampleNoise(seeds))
    plain = syn.sample_batch(syn.PlainGuidedDenoiser(model, y, s), diffusion, ref, steps, syn.PerSampleNoise(seeds))
    batched = syn.sample_batch(syn.FastGuidedDenoiser(model, y, s, batched=True), diffusion, ref, steps, syn.PerSampleNoise(seeds))
    assert (official - ref).abs().max() > 0.1  # the loop did something
    for out in (fast, plain, batched):
        assert (out - official).abs().max().item() < 1e-4


def _count(obj, name, counter):
    fn = getattr(obj, name)

    def wrapped(*a, **k):
        counter[name] = counter.get(name, 0) + 1
        return fn(*a, **k)

    setattr(obj, name, wrapped)


def test_guidance_scale_one_runs_one_branch():
    model, diffusion = tiny_model()
    y = torch.zeros(1, 6, 32, 32)
    y[:, 1] = 1
    ref = torch.zeros(1, 3, 32, 32)
    for s, decodes in ((1.0, 3), (1.5, 6)):
        calls = {}
        _count(model, "decode", calls)
        _count(model, "encode", calls)
        syn.sample_batch(syn.FastGuidedDenoiser(model, y, s), diffusion, ref, 3, syn.PerSampleNoise([0]))
        assert calls == {"decode": decodes, "encode": 3}, (s, calls)
        del model.decode, model.encode
    calls = {}
    _count(model, "forward", calls)
    syn.sample_batch(syn.PlainGuidedDenoiser(model, y, 1.0), diffusion, ref, 3, syn.PerSampleNoise([0]))
    assert calls == {"forward": 3}


def _gaussian_problem():
    """A smooth exact denoiser: data ~ N(m, 0.3^2) per pixel, so eps(x_t) is closed-form and the
    probability-flow ODE keeps z = (x_t - sqrt(abar) m) / sqrt(abar v0 + 1 - abar) constant."""
    _, base = tiny_model("")
    abar = torch.from_numpy(smp.as_schedule(base).alphas_cumprod)
    mean = torch.linspace(-0.6, 0.6, 3 * 32 * 32, dtype=torch.float64).reshape(1, 3, 32, 32)
    var0 = 0.09

    def exact_eps(x, t_model):
        a = abar[t_model.long()].reshape(-1, 1, 1, 1)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * mean) / (a * var0 + 1 - a)).float()

    def ode_solution(x_t, t):
        # Follow the ODE to t = 0, then take the x0 prediction there (what DDIM's last step returns).
        a, a0 = abar[t], abar[0]
        z = (x_t.double() - a.sqrt() * mean) / (a * var0 + 1 - a).sqrt()
        x_0 = a0.sqrt() * mean + (a0 * var0 + 1 - a0).sqrt() * z
        return (x_0 - (1 - a0).sqrt() * exact_eps(x_0, torch.tensor([0])).double()) / a0.sqrt()

    return base, exact_eps, ode_solution


def _eps_schedule(respacing):
    sched = smp.as_schedule(tiny_model(respacing)[1])
    sched.model_var_type = "fixed_small"  # the exact denoiser predicts eps only
    return sched


def test_dpmpp_2m_approaches_many_step_ddim():
    """Same start (t = 40, same noise): DPM-Solver++(2M) converges to the ODE solution that many-step
    DDIM approaches, and is more accurate than DDIM at every step count."""
    base, exact_eps, ode_solution = _gaussian_problem()
    ref = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    x_t = smp.q_sample(smp.as_schedule(base), ref, torch.tensor([40]), syn.PerSampleNoise([9]).randn((3, 32, 32)))
    exact = ode_solution(x_t, 40)
    err = {}
    for respacing, steps in (("ddim20", 9), ("ddim50", 21), ("", 41)):
        sched = _eps_schedule(respacing)
        assert sched.timestep_map[steps - 1] == 40
        for sampler in ("ddim", "dpmpp2m"):
            out = syn.sample_batch(exact_eps, sched, ref, steps, syn.PerSampleNoise([9]), sampler=sampler, clip=False)
            err[sampler, steps] = (out.double() - exact).abs().max().item()
    assert err["dpmpp2m", 41] < err["dpmpp2m", 21] < err["dpmpp2m", 9]
    assert err["ddim", 41] < err["ddim", 21] < err["ddim", 9]
    for steps in (9, 21, 41):
        assert err["dpmpp2m", steps] < err["ddim", steps]
    assert err["dpmpp2m", 41] < 0.5 * err["ddim", 41] < 0.05


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.7), ("ddpm", 0.0), ("dpmpp2m", 0.0), ("dpmpp2m", 1.0)])
def test_loop_matches_pure_samplers(sampler, eta):
    """For one sample the per-sample noise stream is one generator's stream, so the pipeline's loop
    must equal samplers.partial_start + sample_ddim / sample_ddpm / sample_dpmpp_2m exactly."""
    _, exact_eps, _ = _gaussian_problem()
    sched = _eps_schedule("ddim10")
    ref = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ours = syn.sample_batch(exact_eps, sched, ref, 6, syn.PerSampleNoise([123]), sampler=sampler, eta=eta)
    gen = torch.Generator().manual_seed(123)
    x_t, start = smp.partial_start(sched, ref, smp.start_steps(sched.num_timesteps, 60), generator=gen)
    if sampler == "ddim":
        # sample_ddim draws step noise every step, as our loop does when eta > 0.
        theirs = smp.sample_ddim(exact_eps, x_t, sched, start, eta=eta, generator=gen)
    elif sampler == "ddpm":
        theirs = smp.sample_ddpm(exact_eps, x_t, sched, start, generator=gen)
    else:
        theirs = smp.sample_dpmpp_2m(exact_eps, x_t, sched, start, eta=eta, generator=gen)
    assert start == 5
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# The pipeline end to end (CLI)
# ---------------------------------------------------------------------------------------------


def test_cli_outputs_labels_records_and_figure(setup, tmp_path):
    run_main(base_argv(setup, tmp_path, "--batch_size", "3"))
    run_dir = tmp_path / "s1.5_ddim10_p50"
    names = sorted(n[:-5] for n in os.listdir(run_dir / "records"))
    assert names == [f"{setup['stem']}_{i:03d}" for i in range(4)]  # 64 px tile, 32 px grid
    inst_full, type_full = read_label_file(os.path.join(setup["data"], "Train", "Labels", setup["stem"] + ".mat"), CONSEP)
    for name in names:
        png, npy, rec = load_outputs(run_dir, name)
        assert png.shape == (32, 32, 3) and png.dtype == np.uint8
        assert npy.shape == (32, 32, 5) and npy.dtype == np.int32
        np.testing.assert_array_equal(npy[..., :3], png)
        y0, x0 = rec["crop"]["y0"], rec["crop"]["x0"]
        window = (slice(y0, y0 + 32), slice(x0, x0 + 32))
        np.testing.assert_array_equal(npy[..., 3], relabel_contiguous(inst_full[window]))
        np.testing.assert_array_equal(npy[..., 4], type_full[window])
        assert rec["steps"] == 5 and rec["start_timestep"] == 40 and rec["sampler"] == "ddim"
        assert rec["guidance_scale"] == 1.5 and rec["checkpoint"] == setup["ckpt"]
        assert rec["model_config_source"].endswith("config.json")
        assert rec["noise_seed"] == syn.noise_seed(0, setup["stem"], rec["patch_index"], 0)
    assert {(r["y0"], r["x0"]) for r in (load_outputs(run_dir, n)[2]["crop"] for n in names)} == {(0, 0), (0, 32), (32, 0), (32, 32)}
    assert (run_dir / "figure.png").exists() and (run_dir / "run.json").exists()
    fig = fileio.read_image(str(run_dir / "figure.png"))
    assert fig.shape[1] >= 3 * 32
    # Sharding: two ranks together make the same patches (independent of batch size too).
    for rank in (0, 1):
        cfg = syn.SampleConfig(data_dir=setup["data"], model_path=setup["ckpt"], results_path=str(tmp_path / "sharded"),
                               ddim_percent=50, s=1.5, progress=False, figure_rows=0)
        model_cfg, _ = syn.resolve_model_config(setup["ckpt"], {"timestep_respacing": "ddim10"}, TINY)
        summary = syn.run_synthesis(cfg, model_cfg, rank=rank, world_size=2)
        assert summary.rank_jobs == 2 and len(summary.written) == 2
    for name in names:
        a, b = load_outputs(run_dir, name)[1], np.load(tmp_path / "sharded" / "s1.5_ddim10_p50" / "npy_patch" / (name + ".npy"))
        assert np.abs(a - b).max() <= 1


def test_virtual_label_maps_are_used_as_given(setup, tmp_path):
    """A GradMix map (classes already merged, ids > 255, class 4) comes out unchanged (renumbered):
    merging it again would turn class 4 into 3."""
    inst, types = read_label_file(os.path.join(setup["data"], "Train", "Labels", setup["stem"] + ".mat"), CONSEP)
    v_inst = np.where(inst > 0, inst * 7 + 300, 0).astype(np.int32)
    v_type = np.where(inst > 0, 4, 0).astype(np.int32)
    label_dir = tmp_path / "gradmix"
    for kind in ("balance000", "enlarge000"):
        write_label_mat(str(label_dir / "Labels" / f"{setup['stem']}__{kind}.mat"), v_inst, v_type,
                        classes_merged=np.array(1), num_classes=np.array(5))
    run_main(base_argv(setup, tmp_path / "out", "--label_dir", str(label_dir), "--num_samples", "2",
                       "--samples_per_map", "2", "--figure_rows", "2", "--idx_img", f"{setup['stem']}__balance000"))
    run_dir = tmp_path / "out" / "s1.5_ddim10_p50"
    names = sorted(n[:-5] for n in os.listdir(run_dir / "records"))
    assert names == [f"{setup['stem']}__balance000_000", f"{setup['stem']}__balance000_000_k01"]
    a, b = load_outputs(run_dir, names[0]), load_outputs(run_dir, names[1])
    np.testing.assert_array_equal(a[1][..., 3], relabel_contiguous(v_inst[:32, :32]))
    np.testing.assert_array_equal(a[1][..., 4], v_type[:32, :32])
    assert a[2]["label_source"].endswith("__balance000.mat") and a[2]["source_image"].endswith(setup["stem"] + ".png")
    assert a[2]["noise_seed"] != b[2]["noise_seed"] and not np.array_equal(a[0], b[0])  # two seeds, two images


def test_resume_skips_finished_patches(setup, tmp_path, capsys):
    argv = base_argv(setup, tmp_path, "--num_samples", "2", "--figure_rows", "0")
    run_main(argv)
    run_dir = tmp_path / "s1.5_ddim10_p50"
    first = {n: os.path.getmtime(run_dir / "records" / n) for n in os.listdir(run_dir / "records")}
    assert len(first) == 2
    # A crash after the PNG but before the record: that patch must be redone.
    victim = sorted(first)[1]
    os.remove(run_dir / "records" / victim)
    capsys.readouterr()
    run_main(base_argv(setup, tmp_path, "--num_samples", "3", "--figure_rows", "0"))
    out = capsys.readouterr().out
    assert "2 patches written, 1 already complete" in out
    kept = sorted(first)[0]
    assert os.path.getmtime(run_dir / "records" / kept) == first[kept]
    assert len(os.listdir(run_dir / "records")) == 3
    # Resuming into the same folder with output-changing settings would mix two runs: refused.
    _expect_error([*argv, "--seed", "1"], capsys, "run.json", "seed: 0 -> 1")


def test_patch_size_synthesises_larger_patches_than_the_model_was_trained_on(setup, tmp_path, capsys):
    # the 32 px model is convolutional: --patch_size 64 makes one patch of the whole 64 px tile
    argv = base_argv(setup, tmp_path, "--patch_size", "64", "--figure_rows", "0")
    run_main(argv)
    run_dir = tmp_path / "s1.5_ddim10_p50"
    assert sorted(os.listdir(run_dir / "records")) == [f"{setup['stem']}_000.json"]
    png, npy, rec = load_outputs(run_dir, f"{setup['stem']}_000")
    inst_full, type_full = read_label_file(os.path.join(setup["data"], "Train", "Labels", setup["stem"] + ".mat"), CONSEP)
    assert png.shape == (64, 64, 3) and rec["patch_size"] == 64
    np.testing.assert_array_equal(npy[..., 3], relabel_contiguous(inst_full))
    np.testing.assert_array_equal(npy[..., 4], type_full)
    _expect_error([*argv[:-4], "--figure_rows", "0"], capsys, "run.json", "patch_size: 64 -> 32")
    _expect_error([*argv, "--patch_size", "63"], capsys, setup["ckpt"], "--patch_size 63 is not a multiple of 2")


def test_guidance_on_a_model_trained_without_label_dropout_warns(setup, tmp_path, capsys):
    ckpt = tmp_path / "run" / "ema.pt"
    save_state_dict(str(ckpt), tiny_model()[0].state_dict())
    save_config(str(tmp_path / "run" / "config.json"), dict(TINY, timestep_respacing="", drop_rate=0.0))
    argv = base_argv(setup, tmp_path / "out", "--model_path", str(ckpt), "--num_samples", "1", "--figure_rows", "0")
    run_main(argv)
    assert "trained with --drop_rate 0" in capsys.readouterr().err
    run_main([*argv, "--s", "1", "--run_name", "s1"])  # no guidance, no unconditional branch: no warning
    assert "drop_rate" not in capsys.readouterr().err


def test_pure_noise_and_ddpm(setup, tmp_path):
    run_main(base_argv(setup, tmp_path, "--ddim_percent", "100", "--sampler", "ddpm", "--num_samples", "1",
                       "--timestep_respacing", "ddim4", "--figure_rows", "0", "--idx_img", "0"))
    _, npy, rec = load_outputs(tmp_path / "s1.5_ddim4_p100_ddpm", f"{setup['stem']}_000")
    assert rec["start"] == "pure noise" and rec["steps"] == 4 and rec["start_timestep"] == 75
    assert npy.shape == (32, 32, 5)


def test_fast_preset_solver_steps(setup, tmp_path, capsys):
    # the fast preset: DPM-Solver++ with a few model calls from the same SDEdit start as DDIM
    argv = base_argv(setup, tmp_path, "--sampler", "dpmpp2m", "--solver_steps", "3", "--num_samples", "1",
                     "--figure_rows", "0", "--idx_img", "0")
    run_main(argv)
    _, npy, rec = load_outputs(tmp_path / "s1.5_ddim10_p50_dpmpp2m3", f"{setup['stem']}_000")
    assert rec["solver_steps"] == 3 and rec["model_calls"] == 3 and rec["steps"] == 5 and rec["start_timestep"] == 40
    assert npy.shape == (32, 32, 5)
    _expect_error([*argv, "--solver_steps", "4", "--run_name", "s1.5_ddim10_p50_dpmpp2m3"], capsys,
                  "run.json", "solver_steps: 3 -> 4")
    _expect_error(base_argv(setup, tmp_path, "--solver_steps", "3"), capsys, "--solver_steps 3", "dpmpp2m only")


# ---------------------------------------------------------------------------------------------
# Bad inputs: clear errors, exit 2, no traceback
# ---------------------------------------------------------------------------------------------


def _expect_error(argv, capsys, *fragments):
    with pytest.raises(SystemExit) as exc:
        run_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and any(line.startswith("error: ") for line in err.splitlines())
    for frag in fragments:
        assert frag in err, err
    return err


def test_bad_inputs_give_clear_errors(setup, tmp_path, capsys):
    missing = str(tmp_path / "nope" / "ema.pt")
    argv = base_argv(setup, tmp_path)
    _expect_error([*argv, "--model_path", missing], capsys, missing, "checkpoint not found")
    # Flags that contradict the checkpoint (5 classes + edge channel): the loader names the file.
    _expect_error([*argv, "--num_classes", "4", "--dataset_mode", "custom"], capsys, setup["ckpt"], "does not fit")
    # GradMix maps whose source image does not exist.
    bad = tmp_path / "gradmix"
    write_label_mat(str(bad / "Labels" / "ghost__balance000.mat"), np.zeros((64, 64), np.int32), np.zeros((64, 64), np.int32))
    _expect_error([*argv, "--label_dir", str(bad)], capsys, "ghost__balance000.mat", "ghost")
    _expect_error([*argv, "--s", "0.5"], capsys, "--s 0.5")
    _expect_error([*argv, "--sampler", "euler"], capsys, "--sampler 'euler'")
    _expect_error([*argv, "--data_dir", str(tmp_path / "nodata")], capsys, "nodata")


def test_official_checkpoint_without_config_works_from_flags(setup, tmp_path, capsys):
    import shutil

    bare = tmp_path / "official" / "ema_0.9999_010000.pt"
    bare.parent.mkdir()
    shutil.copy(setup["ckpt"], bare)
    argv = [a if a != setup["ckpt"] else str(bare) for a in base_argv(setup, tmp_path / "out", "--num_samples", "1", "--figure_rows", "0")]
    # Without config.json and without model flags: a clear error pointing at the missing config.
    _expect_error(argv, capsys, str(bare), "no config.json beside the checkpoint")
    flags = []
    for key in ("image_size", "num_classes", "num_channels", "num_res_blocks", "num_head_channels", "attention_resolutions",
                "channel_mult", "class_cond", "learn_sigma", "resblock_updown", "use_scale_shift_norm", "diffusion_steps"):
        flags += [f"--{key}", str(TINY[key])]
    run_main(argv + flags)
    _, npy, rec = load_outputs(tmp_path / "out" / "s1.5_ddim10_p50", f"{setup['stem']}_000")
    assert rec["model_config_source"] == "flags" and npy.shape == (32, 32, 5)


def test_idx_img_map_names_with_double_underscore_stems():
    from types import SimpleNamespace

    from guided_diffusion.synthesis.pipeline import _selection

    cfg = syn.SampleConfig(data_dir="unused", results_path="unused", idx_img="slide__A__balance000,other")
    stems, keep = _selection(cfg)
    assert stems == ["other", "slide__A"]
    assert keep(SimpleNamespace(map_name="slide__A__balance000"))
    assert not keep(SimpleNamespace(map_name="slide__A__enlarge000"))
    assert keep(SimpleNamespace(map_name="other__enlarge003"))  # every map of a selected image


def test_changed_only_keeps_the_patches_that_hold_a_changed_nucleus(setup, tmp_path, capsys):
    """--changed_only: of the four 32 px patches of a 64 px map, only those holding a nucleus that the
    map's GradMix record lists as placed are synthesised."""
    inst, types = read_label_file(os.path.join(setup["data"], "Train", "Labels", setup["stem"] + ".mat"), CONSEP)
    inst, types = inst.copy(), types.copy()
    inst[40:44, 40:44], types[40:44, 40:44] = 999, 1  # a "placed" nucleus inside the bottom-right patch only
    label_dir = tmp_path / "gradmix"
    name = f"{setup['stem']}__balance000"
    write_label_mat(str(label_dir / "Labels" / f"{name}.mat"), inst, types, classes_merged=np.array(1),
                    num_classes=np.array(5))
    fileio.write_json(str(label_dir / "Records" / f"{name}.json"),
                      {"kind": "balance", "edits": [{"target_id": 999, "donor_image": "elsewhere"},
                                                    {"target_id": 1, "donor_image": None}]})
    run_main(base_argv(setup, tmp_path / "out", "--label_dir", str(label_dir), "--changed_only", "True",
                       "--figure_rows", "0"))
    run_dir = tmp_path / "out" / "s1.5_ddim10_p50"
    records = [json.load(open(run_dir / "records" / n)) for n in os.listdir(run_dir / "records")]
    assert [(r["crop"]["y0"], r["crop"]["x0"]) for r in records] == [(32, 32)]
    assert json.load(open(run_dir / "run.json"))["changed_only"] is True
    with pytest.raises(SystemExit) as exc:
        run_main(base_argv(setup, tmp_path / "out2", "--changed_only", "True"))
    assert exc.value.code == 2 and "--changed_only True needs --label_dir" in capsys.readouterr().err


def test_a_model_that_produces_nan_writes_nothing_for_its_batch(setup, tmp_path, capsys):
    """A checkpoint with a NaN weight samples NaN: refused before the batch's outputs are written (they
    would be black patches that look complete), naming the model and the first affected output."""
    model, _ = tiny_model()
    with torch.no_grad():
        model.out[-1].weight.view(-1)[0] = float("nan")  # the output conv: every pixel becomes NaN
    ckpt = str(tmp_path / "nan_run" / "ema_0.9999_000010.pt")
    save_state_dict(ckpt, model.state_dict())
    save_config(str(tmp_path / "nan_run" / "config.json"), dict(TINY, timestep_respacing=""))
    out = tmp_path / "out"
    err = _expect_error(base_argv(setup, out, "--model_path", ckpt, "--figure_rows", "0", "--batch_size", "2"), capsys,
                        ckpt, "non-finite values", f"for output {setup['stem']}", "nothing written for this batch",
                        "kept: 0 complete patches")
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 1
    run_dir = out / "s1.5_ddim10_p50"
    for folder in ("samples", "npy_patch", "records"):
        assert not (run_dir / folder).exists() or not os.listdir(run_dir / folder)


def test_start_gradmix_noises_the_gradmix_image_of_the_same_map(setup, tmp_path, capsys):
    """--start gradmix: SDEdit starts from <label_dir>/Images/<map>.png (same window) instead of the
    real patch; with the same noise seed the two starts give different outputs, and the record says
    which start was used. A map without its GradMix image is refused."""
    inst, types = read_label_file(os.path.join(setup["data"], "Train", "Labels", setup["stem"] + ".mat"), CONSEP)
    label_dir = tmp_path / "gradmix"
    name = f"{setup['stem']}__balance000"
    write_label_mat(str(label_dir / "Labels" / f"{name}.mat"), inst, types, classes_merged=np.array(1),
                    num_classes=np.array(5))
    flat = np.full(inst.shape + (3,), 90, np.uint8)  # a GradMix "image" unlike the real tile
    fileio.write_png(str(label_dir / "Images" / f"{name}.png"), flat)
    argv = ["--label_dir", str(label_dir), "--num_samples", "1", "--figure_rows", "0", "--ddim_percent", "20"]
    run_main(base_argv(setup, tmp_path / "real", *argv))
    run_main(base_argv(setup, tmp_path / "gm", *argv, "--start", "gradmix"))
    real_png, _, real_rec = load_outputs(tmp_path / "real" / "s1.5_ddim10_p20", f"{name}_000")
    gm_png, _, gm_rec = load_outputs(tmp_path / "gm" / "s1.5_ddim10_p20", f"{name}_000")
    assert real_rec["start_image"] == "real" and gm_rec["start_image"] == "gradmix"
    assert real_rec["noise_seed"] == gm_rec["noise_seed"]
    # a small start strength keeps the start image's look: the flat grey start stays closer to grey
    assert np.abs(gm_png.astype(float) - 90).mean() < np.abs(real_png.astype(float) - 90).mean()
    os.remove(label_dir / "Images" / f"{name}.png")
    with pytest.raises(SystemExit) as exc:
        run_main(base_argv(setup, tmp_path / "gm2", *argv, "--start", "gradmix"))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--start gradmix needs the GradMix image" in err
