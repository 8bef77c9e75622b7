"""Training-loop pieces and behaviour on a micro model: EMA, condition dropout, timestep sampling,
microbatching, resume, checkpoint integrity (NaN, full disk, pruning), precision."""

from __future__ import annotations

import errno
import math
import os

import numpy as np
import pytest
import torch

from guided_diffusion import train_util as tu
from guided_diffusion.infra.checkpoints import load_torch_file
from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.resample import LossSecondMomentResampler, ScheduleSampler, UniformSampler
from train_helpers import MicroDenoiser, SeededBatches, micro_diffusion, one_thread, quiet_logger, state_equal


def make_loop(log_dir, data=None, seed=0, **kw):
    torch.manual_seed(seed)
    model = MicroDenoiser()
    diffusion = micro_diffusion()
    args = dict(batch_size=4, lr=1e-2, ema_rate="0.9,0.5", log_interval=2, save_interval=2, seed=seed,
                log_dir=str(log_dir), progress=False, schedule_sampler=UniformSampler(diffusion))
    args.update(kw)
    return tu.TrainLoop(model=model, diffusion=diffusion, data=data or SeededBatches(), **args)


# ---- pure pieces --------------------------------------------------------------------------------


def test_update_ema_closed_form():
    # k updates towards a constant source: e_k = p + (e_0 - p) * r^k.
    e = [torch.full((3,), 2.0, dtype=torch.float64)]
    p = [torch.full((3,), -1.0, dtype=torch.float64)]
    for _ in range(5):
        tu.update_ema(e, p, 0.9)
    assert torch.allclose(e[0], torch.full((3,), -1.0 + 3.0 * 0.9**5, dtype=torch.float64), rtol=0, atol=1e-12)
    # One step with hand numbers: 0.75 * 4 + 0.25 * 8 = 5.
    e = [torch.tensor([4.0])]
    tu.update_ema(e, [torch.tensor([8.0])], 0.75)
    assert e[0].item() == 5.0


def test_parse_ema_rates_and_names():
    assert tu.parse_ema_rates("0.9999, 0.999") == [0.9999, 0.999]
    assert tu.ema_filename(0.9999, 10000) == "ema_0.9999_010000.pt"  # the official name
    with pytest.raises(DiffMixError, match="ema_rate"):
        tu.parse_ema_rates("0.9,abc")
    with pytest.raises(DiffMixError, match=r"\[0, 1\)"):
        tu.parse_ema_rates("1.5")


def test_drop_condition_frequency_and_content():
    g = torch.Generator().manual_seed(0)
    n, p = 20000, 0.2
    y = torch.rand(n, 2, 3, 3, generator=g) + 0.5  # strictly positive, so zero rows are dropped rows
    out, keep = tu.drop_condition(y, p, g)
    dropped = (~keep).float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 4.5 * sigma, dropped
    assert torch.equal(out[keep], y[keep])
    assert torch.count_nonzero(out[~keep]) == 0  # the WHOLE condition, edge channel included
    assert tu.drop_condition(y[:50], 0.0, g)[1].all()
    assert not tu.drop_condition(y[:50], 1.0, g)[1].any()


def test_sample_timesteps_uniform_and_importance():
    g = torch.Generator().manual_seed(0)
    t, w = UniformSampler(micro_diffusion()).sample(500, torch.device("cpu"), g)
    assert t.dtype == torch.long and 0 <= t.min() and t.max() < 50 and torch.all(w == 1)

    class Skewed(ScheduleSampler):
        def weights(self):
            return np.array([1.0, 3.0])

    t, w = Skewed().sample(40000, torch.device("cpu"), g)
    assert abs((t == 1).float().mean().item() - 0.75) < 0.01
    # Importance weights 1 / (T p(t)): 1/(2*0.25) = 2 and 1/(2*0.75) = 2/3; their mean is ~1.
    assert torch.allclose(w[t == 0], torch.tensor(2.0)) and torch.allclose(w[t == 1], torch.tensor(2 / 3))
    assert abs(w.mean().item() - 1.0) < 0.02


def test_loss_aware_sampler_state_round_trip():
    diffusion = type("D", (), {"num_timesteps": 4})()
    s = LossSecondMomentResampler(diffusion, history_per_term=2)
    s.update_with_local_losses(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), torch.tensor([1.0, 2, 3, 4, 1, 2, 3, 4]))
    fresh = LossSecondMomentResampler(diffusion, history_per_term=2)
    tu.load_sampler_state(fresh, tu.sampler_state(s))
    assert np.array_equal(fresh.weights(), s.weights())
    assert not np.allclose(s.weights(), s.weights()[0])  # warmed up: non-uniform


def test_global_rng_round_trip():
    state = tu.capture_global_rng()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    tu.restore_global_rng(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_parse_step_from_filename():
    assert tu.parse_resume_step_from_filename("/x/model005900.pt") == 5900
    assert tu.parse_resume_step_from_filename("ema_0.9999_010000.pt") == 10000
    assert tu.parse_resume_step_from_filename("weights.pt") == 0


def test_invalid_settings_are_reported_together():
    cfg = tu.TrainConfig(batch_size=0, drop_rate=1.5, precision="fp8")
    with pytest.raises(DiffMixError) as err:
        tu.validate_train_config(cfg)
    msg = str(err.value)
    assert "--batch_size" in msg and "--drop_rate" in msg and "--precision" in msg


# ---- the loop -----------------------------------------------------------------------------------


def test_microbatch_gives_the_full_batch_gradient(tmp_path):
    grads = []
    for mb in (-1, 1, 3):
        with quiet_logger(tmp_path / str(mb)):
            loop = make_loop(tmp_path / str(mb), microbatch=mb, drop_rate=0.3)
            loop.model.eval()  # no dropout: the three runs see the same function
            x, cond = next(SeededBatches())
            loop.forward_backward(x, cond)
            grads.append(torch.cat([p.grad.flatten() for p in loop.params]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert torch.allclose(grads[0], grads[2], rtol=1e-5, atol=1e-7)


def test_ema_follows_the_weights_in_the_loop(tmp_path):
    with quiet_logger(tmp_path):
        loop = make_loop(tmp_path, ema_rate="0.9")
        before = [p.detach().clone() for p in loop.params]
        loop.run_step(*next(loop.data))
        for e, b, p in zip(loop.ema_params[0], before, loop.params):
            assert torch.allclose(e, 0.9 * b + 0.1 * p.detach(), rtol=1e-6, atol=1e-7)
        assert not all(torch.equal(b, p) for b, p in zip(before, loop.params))  # the weights moved


def _final_state(folder, step):
    names = tu.checkpoint_filenames(step, [0.9, 0.5])
    return {n.replace(f"{step:06d}", ""): load_torch_file(os.path.join(folder, n)) for n in names}


def test_resume_continues_bitwise(tmp_path):
    kw = dict(drop_rate=0.5, microbatch=2, grad_clip=0.5, lr_anneal_steps=10)
    with one_thread():
        with quiet_logger(tmp_path / "a"):
            make_loop(tmp_path / "a", max_steps=6, **kw).run_loop()
        with quiet_logger(tmp_path / "b"):
            make_loop(tmp_path / "b", max_steps=4, **kw).run_loop()
        # A new process would start from another seed state; scramble the global RNGs to be sure.
        torch.manual_seed(1234)
        np.random.seed(99)
        with quiet_logger(tmp_path / "b"):
            loop = make_loop(tmp_path / "b", seed=0, max_steps=6, resume_checkpoint="latest", **kw)
            assert loop.step == 4 and loop.data.step == 4
            loop.run_loop()
    a, b = _final_state(tmp_path / "a", 6), _final_state(tmp_path / "b", 6)
    for name in ("model.pt", "ema_0.9_.pt", "ema_0.5_.pt", "opt.pt"):
        assert state_equal(a[name], b[name]), name
    assert state_equal(a["train_state.pt"]["ranks"], b["train_state.pt"]["ranks"])


def test_weights_only_checkpoint_starts_ema_and_optimizer_fresh(tmp_path):
    torch.manual_seed(5)
    official = MicroDenoiser().state_dict()
    folder = tmp_path / "official"
    folder.mkdir()
    torch.save({k: v.half() for k, v in official.items()}, folder / "model000007.pt")  # official files may be fp16
    with quiet_logger(tmp_path / "run"):
        loop = make_loop(tmp_path / "run", resume_checkpoint=str(folder / "model000007.pt"))
    assert loop.step == 7  # parsed from the name
    for (name, p), e in zip(loop.model.named_parameters(), loop.ema_params[0]):
        assert torch.equal(p.detach(), official[name].half().float()) and torch.equal(e, p.detach())
    assert loop.opt.state_dict()["state"] == {}


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    with quiet_logger(tmp_path):
        loop = make_loop(tmp_path, data=SeededBatches(nan_at=2), max_steps=6)
        with pytest.raises(DiffMixError, match="non-finite loss .* at step 3"):
            loop.run_loop()
    assert tu.list_complete_checkpoints(str(tmp_path)) == [2]
    assert not (tmp_path / "model000003.pt").exists()


def test_full_disk_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    from guided_diffusion.infra import checkpoint_folder

    real_save_pt = checkpoint_folder._save_pt

    def save_pt_disk_full(path, obj):
        if path.endswith("ema_0.5_000004.pt"):
            with tu.fileio.atomic_open(path) as f:  # half-written temporary, then the disk is full
                f.write(b"x" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_pt(path, obj)

    monkeypatch.setattr(checkpoint_folder, "_save_pt", save_pt_disk_full)
    with quiet_logger(tmp_path):
        loop = make_loop(tmp_path, max_steps=6)
        with pytest.raises(DiffMixError, match=r"ema_0.5_000004.pt: cannot write .*No space left.*step 2"):
            loop.run_loop()
    assert tu.list_complete_checkpoints(str(tmp_path)) == [2]
    assert tu.find_latest_checkpoint(str(tmp_path)).endswith("model000002.pt")
    leftovers = [n for n in os.listdir(tmp_path) if "000004" in n or n.endswith(".tmp")]
    assert leftovers == []


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    with quiet_logger(tmp_path):
        make_loop(tmp_path, max_steps=4).run_loop()
    assert tu.list_complete_checkpoints(str(tmp_path)) == [2, 4]
    # A truncated file (size differs from the marker) makes step 4 incomplete; a missing marker too.
    with open(tmp_path / "opt000004.pt", "r+b") as f:
        f.truncate(10)
    (tmp_path / "model000006.pt").write_bytes(b"partial")
    assert tu.find_latest_checkpoint(str(tmp_path)).endswith("model000002.pt")


@pytest.mark.parametrize("max_steps, log_interval, logged", [(3, 10, [3]), (5, 2, [2, 4, 5]), (4, 2, [2, 4])])
def test_progress_csv_gets_the_final_step(tmp_path, max_steps, log_interval, logged):
    import csv

    with quiet_logger(tmp_path):
        make_loop(tmp_path, max_steps=max_steps, log_interval=log_interval, save_interval=100).run_loop()
    with open(tmp_path / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == logged  # the last step once, never twice
    assert all(math.isfinite(float(r["loss"])) and float(r["steps_per_sec"]) > 0 for r in rows)


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    with quiet_logger(tmp_path):
        make_loop(tmp_path, max_steps=6, keep_checkpoints=2).run_loop()
    assert tu.list_complete_checkpoints(str(tmp_path)) == [4, 6]
    assert not any("000002" in n for n in os.listdir(tmp_path))


def test_fresh_start_refuses_a_folder_with_checkpoints(tmp_path):
    with quiet_logger(tmp_path):
        make_loop(tmp_path, max_steps=2).run_loop()
        with pytest.raises(DiffMixError, match="resume_checkpoint latest"):
            make_loop(tmp_path, max_steps=4)
        assert make_loop(tmp_path, max_steps=4, resume_checkpoint="latest").step == 2


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps(tmp_path, precision):
    with quiet_logger(tmp_path):
        ref = make_loop(tmp_path / "fp32", max_steps=1, precision="fp32")
        x, cond = next(SeededBatches())
        ref.model.eval()
        ref.forward_backward(x, cond)
        _, ref_norm = ref.optimize()
        loop = make_loop(tmp_path / precision, max_steps=1, precision=precision)
        loop.model.eval()
        start = loop.generator.get_state()
        for _ in range(10):  # fp16: the first steps overflow at the initial scale 2**20 and are skipped
            loop.generator.set_state(start)  # same timesteps and noise as the fp32 reference
            loop.forward_backward(x, cond)
            took, norm = loop.optimize()
            if took:
                break
    # The gradient is unscaled before its norm is measured (else it would be 2**16 or more larger).
    assert took and math.isfinite(norm) and abs(norm - ref_norm) < 0.05 * ref_norm, (norm, ref_norm)
    assert loop.scaler.is_enabled() == (precision == "fp16")


def test_resuming_an_older_checkpoint_retires_newer_ones(tmp_path):
    with quiet_logger(tmp_path):
        make_loop(tmp_path, max_steps=6).run_loop()
        loop = make_loop(tmp_path, max_steps=6, resume_checkpoint=str(tmp_path / "model000002.pt"))
    assert loop.step == 2
    assert tu.list_complete_checkpoints(str(tmp_path)) == [2]  # latest now means this branch
    assert (tmp_path / "model000006.pt").exists()  # files kept


def test_the_loop_of_a_train_config_is_the_loop_of_its_keywords(tmp_path):
    """TrainLoop.from_config (how train() builds the loop) maps each TrainConfig setting to the
    official keyword of the same meaning; overrides win; the named sampler is built."""
    diffusion = micro_diffusion()
    cfg = tu.TrainConfig(batch_size=3, microbatch=1, lr=2e-3, ema_rate="0.9,0.5", drop_rate=0.25, log_interval=3,
                         save_interval=5, weight_decay=0.01, lr_anneal_steps=9, max_steps=7, seed=4, grad_clip=1.5,
                         keep_checkpoints=2, snr_gamma=5.0, progress=False, t_max=3, log_dir=str(tmp_path / "cfg"))
    loop = tu.TrainLoop.from_config(model=MicroDenoiser(), diffusion=diffusion, data=SeededBatches(), cfg=cfg)
    assert (loop.batch_size, loop.microbatch, loop.lr, loop.ema_rates, loop.drop_rate) == (3, 1, 2e-3, [0.9, 0.5], 0.25)
    assert (loop.log_interval, loop.save_interval, loop.weight_decay, loop.lr_anneal_steps, loop.max_steps) == (3, 5, 0.01, 9, 7)
    assert (loop.seed, loop.grad_clip, loop.keep_checkpoints, loop.snr_gamma, loop.progress) == (4, 1.5, 2, 5.0, False)
    assert loop.log_dir == str(tmp_path / "cfg") and loop.end_step == 7
    t, _ = loop.schedule_sampler.sample(64, torch.device("cpu"))
    assert int(t.max()) <= 3  # --t_max: the truncated sampler of the config
    other = tu.TrainLoop.from_config(model=MicroDenoiser(), diffusion=diffusion, data=SeededBatches(), cfg=cfg,
                                     log_dir=str(tmp_path / "override"), schedule_sampler=UniformSampler(diffusion))
    assert other.log_dir == str(tmp_path / "override") and type(other.schedule_sampler) is UniformSampler
