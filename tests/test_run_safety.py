"""Runs that must not go silently wrong: 16-bit images, full disks at checkpoint time, skipped
incomplete checkpoints, run-folder locks, a run folder as --model_path, torchrun recipes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from guided_diffusion.infra import checkpoint_folder as cf
from guided_diffusion.infra import fileio, runlock
from guided_diffusion.infra.errors import DiffMixError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (grey [H, W] or RGB [H, W, 3], uint16) written by hand: big-endian samples."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if arr.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16bit_images_keep_their_content(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 65536, (8, 8)).astype(np.uint16)
    rgb = rng.integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    (tmp_path / "g.png").write_bytes(png16(grey))
    (tmp_path / "c.png").write_bytes(png16(rgb))
    g = fileio.read_image(str(tmp_path / "g.png"))
    c = fileio.read_image(str(tmp_path / "c.png"))
    # Not all-white (the old clip): the high byte of every sample, grey expanded to RGB.
    assert g.dtype == np.uint8 and g.shape == (8, 8, 3)
    assert np.array_equal(g[..., 0], (grey >> 8).astype(np.uint8)) and np.array_equal(g[..., 2], g[..., 0])
    assert np.array_equal(c, (rgb >> 8).astype(np.uint8))
    from PIL import Image

    Image.fromarray(np.full((4, 4), 1.5, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DiffMixError, match=r"f\.tif.*32-bit float"):
        fileio.read_image(str(tmp_path / "f.tif"))


def fake_checkpoint(folder, step, complete=True, size=1000):
    os.makedirs(folder, exist_ok=True)
    names = cf.checkpoint_filenames(step, [0.9999])
    for n in names:
        with open(os.path.join(folder, n), "wb") as f:
            f.write(b"x" * size)
    if complete:
        fileio.write_json(os.path.join(folder, cf.marker_filename(step)),
                          {"step": step, "complete": True, "files": {n: size for n in names}})


def test_checkpoint_not_started_when_disk_too_full(tmp_path, monkeypatch):
    folder = str(tmp_path / "run")
    fake_checkpoint(folder, 10)
    usage = shutil.disk_usage(folder)
    monkeypatch.setattr(cf.shutil, "disk_usage", lambda p: usage._replace(free=3000))
    files = {"model000020.pt": lambda: {"w": torch.zeros(4)}}
    with pytest.raises(DiffMixError, match=r"step 20.*needs about.*last complete checkpoint is step 10"):
        cf.write_checkpoint(folder, 20, files)  # the previous checkpoint's 4000 bytes do not fit
    assert not os.path.exists(os.path.join(folder, "model000020.pt"))
    cf.write_checkpoint(folder, 20, files, expected_bytes=2000)  # fits
    assert cf.list_complete_checkpoints(folder) == [10, 20]
    # The start-up projection: 5 kept checkpoints of 1 GB with 3 kB free.
    msg = cf.disk_use_notice(folder, 10**9, keep=0, max_steps=50, save_interval=10)
    assert "6 checkpoints" in msg and "lower --keep_checkpoints" in msg
    assert "every save is kept" in cf.disk_use_notice(folder, 10**9, keep=0, max_steps=0, save_interval=10)
    monkeypatch.setattr(cf.shutil, "disk_usage", lambda p: usage._replace(free=10**13))
    assert cf.disk_use_notice(folder, 10**9, keep=3, max_steps=0, save_interval=10) is None


def test_resume_names_skipped_incomplete_checkpoint(tmp_path, capsys):
    folder = str(tmp_path / "run")
    fake_checkpoint(folder, 10)
    fake_checkpoint(folder, 20, complete=False)
    assert cf.resolve_resume_checkpoint("latest", folder).endswith("model000010.pt")
    err = capsys.readouterr().err
    assert "skipping the checkpoint of step 20" in err and "checkpoint000020.json" in err
    cf.resolve_resume_checkpoint("latest", folder)  # named once per folder and step
    assert capsys.readouterr().err == ""
    # A marker whose files changed size is named too.
    fake_checkpoint(folder, 30)
    with open(os.path.join(folder, "opt000030.pt"), "ab") as f:
        f.write(b"more")
    cf.find_latest_checkpoint(folder)
    assert "step 30: checkpoint000030.json lists files that are missing" in capsys.readouterr().err


def test_run_folder_as_model_path(tmp_path):
    from guided_diffusion.synthesis import resolve_model_path

    folder = str(tmp_path / "run")
    fake_checkpoint(folder, 10)
    fake_checkpoint(folder, 20, complete=False)
    assert resolve_model_path(folder) == os.path.join(folder, "ema_0.9999_000010.pt")


def test_lock_refuses_live_holder_and_takes_over_stale(tmp_path, capsys, monkeypatch):
    folder = str(tmp_path / "run")
    os.makedirs(folder)
    path = os.path.join(folder, ".lock")
    now = time.time()
    live = {"pid": 1, "host": socket.gethostname(), "what": "training", "started": now, "heartbeat": now, "token": "t"}
    fileio.write_json(path, live)
    with pytest.raises(DiffMixError, match=r"in use by training \(pid 1"):
        runlock.acquire(folder, "training")
    # Dead pid on this host: taken over with a notice.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fileio.write_json(path, dict(live, pid=dead.pid))
    lock = runlock.acquire(folder, "synthesis")
    assert f"process {dead.pid} on this host no longer runs" in capsys.readouterr().err
    assert json.load(open(path))["what"] == "synthesis"
    lock.release()
    assert not os.path.exists(path) and os.path.isdir(folder)
    # Another host: stale only once its heartbeat stops.
    fileio.write_json(path, dict(live, host="elsewhere", heartbeat=now - runlock.STALE_AFTER_S - 5))
    lock = runlock.acquire(folder, "training")
    assert "heartbeat stopped" in capsys.readouterr().err
    lock.release()
    fileio.write_json(path, dict(live, host="elsewhere"))
    with pytest.raises(DiffMixError, match="elsewhere"):
        runlock.check_available(folder)
    # A folder the lock created is removed again when nothing else was written.
    fresh = str(tmp_path / "fresh")
    runlock.acquire(fresh, "training").release()
    assert not os.path.exists(fresh)


def test_synthesis_recipe_through_torchrun_two_ranks(tmp_path):
    """The recipe's exact command line (synthesize.sh with NPROC=2, --s 1.5) through torchrun on CPU."""
    if shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")):
        pytest.skip("torchrun is not installed")
    from guided_diffusion.infra.checkpoints import save_state_dict
    from guided_diffusion.infra.config import ModelConfig, save_config
    from guided_diffusion.data import make_toy_dataset
    from guided_diffusion.script_util import create_model_and_diffusion

    tiny = ModelConfig(image_size=32, num_classes=5, num_channels=32, num_res_blocks=1, num_head_channels=16,
                       attention_resolutions="16", channel_mult="1,2", class_cond=True, learn_sigma=True,
                       diffusion_steps=40, resblock_updown=True, use_scale_shift_norm=True).to_dict()
    model, _ = create_model_and_diffusion(**tiny)
    run = tmp_path / "run"
    save_state_dict(str(run / "ema_0.9999_000010.pt"), model.state_dict())
    save_config(str(run / "config.json"), dict(tiny, timestep_respacing=""))
    data = str(tmp_path / "data")
    make_toy_dataset(data, num_train=1, num_test=0, size=64, seed=0, progress=False)
    # The recipe's model flags are the paper's; EXTRA (appended last) shrinks them to the tiny model.
    extra = " ".join(f"--{k} {tiny[k]}" for k in ("image_size", "num_channels", "num_res_blocks", "num_head_channels",
                                                  "attention_resolutions", "channel_mult", "diffusion_steps"))
    extra += " --use_fp16 False --timestep_respacing ddim4 --figure_rows 0 --progress False --num_samples 3"
    env = dict(os.environ, NPROC="2", DATA_DIR=data, LABEL_DIR="", MODEL=str(run / "ema_0.9999_000010.pt"),
               OUT=str(tmp_path / "out"), BATCH="1", PRECISION="fp32", EXTRA=extra, OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "scripts_ddim_sample", "consep.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out" / "s1.5_ddim4_p55"
    assert sorted(os.listdir(out / "records")) == [f"toy_train_000_{i:03d}.json" for i in range(3)]
    assert "ambiguous option" not in proc.stderr
    # FAST=1: the fast preset (DPM-Solver++, 10 model calls), one process
    env.update(NPROC="1", FAST="1", EXTRA=extra.replace("--num_samples 3", "--num_samples 1"))
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "scripts_ddim_sample", "consep.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "s1.5_ddim4_p55_dpmpp2m10" / "records" / "toy_train_000_000.json").read_text())
    assert record["sampler"] == "dpmpp2m" and record["solver_steps"] == 10 and record["model_calls"] >= 8
