"""Training the real (tiny) SDM U-Net on the toy dataset: files, config, strict reload, resume,
over-fitting, and the image_train.py command line."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion import train_util as tu
from guided_diffusion.infra.config import ModelConfig, load_config_for_checkpoint
from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.script_util import create_model_and_diffusion
from train_helpers import TINY_UNET, one_thread, quiet_logger, state_equal

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    from guided_diffusion.data.toy import make_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    make_toy_dataset(str(root), num_train=2, num_test=0, size=48, seed=3, progress=False)
    return root


def _train(toy_root, log_dir, **kw):
    model_cfg = ModelConfig(**TINY_UNET)
    train_cfg = tu.TrainConfig(
        data_dir=str(toy_root), dataset_mode="consep", batch_size=2, lr=1e-3, ema_rate="0.99",
        drop_rate=0.5, log_interval=1, save_interval=2, log_dir=str(log_dir), progress=False,
        schedule_sampler="loss-second-moment", deterministic=True, **kw,
    )
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        with one_thread():
            return tu.train(model_cfg, train_cfg)
    finally:
        # train() sets process-wide state that a CLI run keeps; give it back for the other tests.
        torch.use_deterministic_algorithms(was_deterministic)
        logger.close()
        dist_util.cleanup()


def test_run_writes_official_files_and_resumes_bitwise(toy_root, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _train(toy_root, full, max_steps=4)
    names = set(os.listdir(full))
    for step in (2, 4):
        expected = {f"model{step:06d}.pt", f"ema_0.99_{step:06d}.pt", f"opt{step:06d}.pt",
                    f"train_state{step:06d}.pt", f"checkpoint{step:06d}.json"}
        assert expected <= names
    assert {"config.json", "log.txt", "progress.csv"} <= names
    assert not [n for n in names if n.endswith(".tmp")]

    # Every .pt file loads with weights_only=True; model and EMA files load strictly into a fresh U-Net.
    for n in names:
        if n.endswith(".pt"):
            torch.load(full / n, map_location="cpu", weights_only=True)
    cfg = load_config_for_checkpoint(str(full / "model000004.pt"))
    assert cfg["drop_rate"] == 0.5 and cfg["seed"] == 0 and cfg["max_steps"] == 4
    fresh, _ = create_model_and_diffusion(**ModelConfig.from_dict(cfg).to_dict())
    for n in ("model000004.pt", "ema_0.99_000004.pt"):
        sd = torch.load(full / n, map_location="cpu", weights_only=True)
        assert all(v.dtype == torch.float32 for v in sd.values())
        fresh.load_state_dict(sd, strict=True)

    with open(full / "progress.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["samples"]) for r in rows] == [2, 4, 6, 8]
    for key in ("loss", "mse", "vb", "grad_norm", "param_norm", "lr", "steps_per_sec"):
        assert all(r[key] not in ("", "nan") for r in rows), key
    assert any(k.startswith("loss_q") for k in rows[0])

    # Interrupted after step 2, then resumed with `latest`: the same weights, EMA and optimizer state.
    _train(toy_root, part, max_steps=2)
    _train(toy_root, part, max_steps=4, resume_checkpoint="latest")
    for n in ("model000004.pt", "ema_0.99_000004.pt", "opt000004.pt"):
        a = torch.load(full / n, weights_only=True)
        b = torch.load(part / n, weights_only=True)
        assert state_equal(a, b), n
    with open(part / "progress.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_loss_falls_when_overfitting_one_batch(tmp_path):
    torch.manual_seed(0)
    cfg = dict(TINY_UNET, dropout=0.0)
    model, diffusion = create_model_and_diffusion(**ModelConfig(**cfg).to_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (torch.rand(2, 6, 32, 32, generator=g) > 0.5).float()

    class OneBatch:
        def __next__(self):
            return x, {"y": y}

    # A fixed evaluation set: every 5th timestep with fixed noise.
    t_eval = torch.arange(0, 50, 5)
    noise = torch.randn(10, 3, 32, 32, generator=g)

    def eval_mse():
        with torch.no_grad():
            out = diffusion.training_losses(model, x.repeat(5, 1, 1, 1), t_eval,
                                            model_kwargs={"y": y.repeat(5, 1, 1, 1)}, noise=noise)
        return out["mse"].mean().item()

    with one_thread(), quiet_logger(tmp_path):
        loop = tu.TrainLoop(model=model, diffusion=diffusion, data=OneBatch(), batch_size=2, lr=2e-3,
                            log_dir=str(tmp_path), progress=False, max_steps=10, save_interval=100)
        before = eval_mse()
        loop.run_loop()
        after = eval_mse()
    assert before > 0.9  # an untrained eps-predictor scores ~1 (the noise variance)
    assert after < 0.6 * before, (before, after)


def _load_script():
    spec = importlib.util.spec_from_file_location("image_train", REPO / "scripts" / "image_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_train_flags_cover_both_configs_and_parse_the_official_recipe():
    import dataclasses

    parser = _load_script().create_argparser()
    flags = {a.dest for a in parser._actions}
    for cls in (ModelConfig, tu.TrainConfig):
        assert {f.name for f in dataclasses.fields(cls)} <= flags
    official = (
        "--data_dir /Dataset/consep --dataset_mode consep --lr 2e-5 --batch_size 16 --attention_resolutions 32,16,8 "
        "--diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True "
        "--use_checkpoint True --num_classes 5 --class_cond True --drop_rate 0.2 --no_instance False "
        "--resume_checkpoint OUTPUT/model005900.pt --save_interval 100 --gpu 3"
    ).split()
    args = parser.parse_args(official)
    from guided_diffusion.infra.config import dataclass_from_args

    train_cfg = dataclass_from_args(tu.TrainConfig, args)
    model_cfg = dataclass_from_args(ModelConfig, args)
    assert (train_cfg.lr, train_cfg.drop_rate, train_cfg.batch_size, train_cfg.gpu) == (2e-5, 0.2, 16, "3")
    assert model_cfg.use_fp16 and model_cfg.num_channels == 256 and model_cfg.use_checkpoint
    assert tu.resolve_precision(train_cfg.precision, "cuda", tu.sdm_half(model_cfg.use_fp16)) == "fp16"  # the paper's GPU run
    assert tu.resolve_precision(train_cfg.precision, "cpu", tu.sdm_half(model_cfg.use_fp16)) == "fp32"  # one "auto" everywhere


def test_image_train_reports_user_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "image_train.py"), "--data_dir", str(tmp_path / "missing"),
         "--dataset_mode", "consep", "--num_classes", "5", "--class_cond", "True", "--image_size", "32",
         "--num_channels", "32", "--channel_mult", "1,2", "--num_res_blocks", "1", "--attention_resolutions", "16",
         "--log_dir", str(tmp_path / "run"), "--progress", "False"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "missing" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a run that never started


# ---- a failed start leaves nothing behind -----------------------------------------------------------


def _fake_checkpoint(folder):
    from guided_diffusion.infra.checkpoint_folder import write_checkpoint

    folder.mkdir(parents=True)
    write_checkpoint(str(folder), 7, {"model000007.pt": {"w": torch.zeros(1)}})
    return set(os.listdir(folder))


@pytest.mark.parametrize("case", ["dataset_mode", "class_cond", "text_resume", "missing_resume", "class_count",
                                  "corrupt_label", "small_image", "crop_size", "has_checkpoints"])
def test_bad_input_leaves_no_run_folder(toy_root, tmp_path, case):
    import shutil

    run = tmp_path / "run"
    root, kw, before = toy_root, {}, None
    model_kw = dict(TINY_UNET)
    if case == "dataset_mode":
        kw["dataset_mode"], match = "consepp", "consepp"
    elif case == "class_cond":
        model_kw["class_cond"], match = False, "class_cond"
    elif case == "text_resume":
        (tmp_path / "model000100.pt").write_text("these are not weights\n")
        kw["resume_checkpoint"], match = str(tmp_path / "model000100.pt"), "not a PyTorch checkpoint"
    elif case == "missing_resume":
        kw["resume_checkpoint"], match = str(tmp_path / "nope.pt"), "not found"
    elif case == "class_count":
        kw["dataset_mode"], match = "glysac", "4|num_classes"
    elif case == "corrupt_label":
        root = tmp_path / "toy"
        shutil.copytree(toy_root, root)
        (root / "Train" / "Labels" / "toy_train_001.mat").write_bytes(b"garbage, not MATLAB")
        match = "toy_train_001"
    elif case == "small_image":
        model_kw["image_size"], match = 64, "smaller|64"
    elif case == "crop_size":  # the tiny U-Net halves once: an odd crop cannot pass its encoder
        kw["crop_size"], match = 13, r"--crop_size 13: .*not divisible by 2"
    else:
        # Reported before the dataset is read: the bad --dataset_mode would fail later.
        before = _fake_checkpoint(run)
        kw["dataset_mode"], match = "consepp", "already holds checkpoints"
    model_cfg = ModelConfig(**model_kw)
    train_cfg = tu.TrainConfig(data_dir=str(root), dataset_mode=kw.pop("dataset_mode", "consep"), batch_size=2,
                               log_dir=str(run), progress=False, max_steps=1, **kw)
    try:
        with pytest.raises(DiffMixError, match=match):
            tu.train(model_cfg, train_cfg)
    finally:
        logger.close()
        dist_util.cleanup()
    if before is None:
        assert not run.exists()
    else:
        assert set(os.listdir(run)) == before  # no log.txt / progress.csv / config.json added


def test_image_train_refuses_a_text_file_as_resume_checkpoint(toy_root, tmp_path):
    fake = tmp_path / "model000100.pt"
    fake.write_text("these are not weights\n")
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "image_train.py"), "--data_dir", str(toy_root),
         "--dataset_mode", "consep", "--num_classes", "5", "--class_cond", "True", "--image_size", "32",
         "--num_channels", "32", "--channel_mult", "1,2", "--num_res_blocks", "1", "--attention_resolutions", "16",
         "--num_head_channels", "16", "--batch_size", "2", "--resume_checkpoint", str(fake),
         "--log_dir", str(tmp_path / "run"), "--progress", "False"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"{fake}: not a PyTorch checkpoint" in proc.stderr
    assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_one_precision_policy_for_sdm_and_segmenter(monkeypatch):
    """``auto`` is the model's half precision on a capable CUDA device, fp32 elsewhere; the segmenter
    (half = bf16, no fp16) goes through the same function."""
    import torch

    from guided_diffusion.infra import precision as prec
    from guided_diffusion.downstream import train as dtrain
    from guided_diffusion.infra.errors import DiffMixError

    assert prec.resolve_precision("auto", "cuda", prec.sdm_half(False)) == "fp32"  # no half configured
    assert prec.resolve_precision("bf16", "cpu", None) == "bf16"  # explicit wins
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert prec.resolve_precision("auto", "cuda", "bf16") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert prec.resolve_precision("auto", "cuda", "bf16") == "bf16"
    assert dtrain.segmenter_dtype("auto", torch.device("cpu")) is None
    assert dtrain.segmenter_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(DiffMixError, match="--precision 'fp16': expected one of auto, fp32, bf16"):
        dtrain.segmenter_dtype("fp16", torch.device("cpu"))
