"""The bad-input catalogue: every command, given a user mistake or an environment fault, exits 2
with one error line naming the file or flag, no traceback, and no partial output (docs/BAD_INPUT.md).

The commands run in-process through their ``main(argv)`` and :func:`run_cli` (as ``__main__``
does); full disks and unwritable folders are simulated by injecting the OS error.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import pickle
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import pytest
import torch

from data_helpers import write_mat
from guided_diffusion.data import make_toy_dataset
from guided_diffusion.infra import fileio
from guided_diffusion.infra.checkpoints import save_state_dict
from guided_diffusion.infra.config import ModelConfig, save_config
from guided_diffusion.infra.errors import run_cli
from guided_diffusion.script_util import create_model_and_diffusion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {
    "gradmix": "scripts/gradmix.py",
    "stats": "scripts/dataset_stats.py",
    "evaluate": "scripts/evaluate.py",
    "sample": "scripts/image_sample.py",
    "train": "scripts/image_train.py",
    "toy": "datasets/make_toy.py",
    "demo": "scripts/demo.py",
    "hover_predict": "scripts/hovernet_predict.py",
    "hover_train": "scripts/hovernet_train.py",
    "study": "scripts/utility_study.py",
    "fidelity": "scripts/label_fidelity.py",
    "convert": "scripts/convert_dataset.py",
    "export": "scripts/export_model.py",
    "diagnose": "scripts/hovernet_diagnose.py",
}
_modules: dict = {}

TINY = ModelConfig(
    image_size=32, num_classes=5, num_channels=32, num_res_blocks=1, num_head_channels=16,
    attention_resolutions="16", channel_mult="1,2", class_cond=True, learn_sigma=True, diffusion_steps=40,
).to_dict()


def script(name: str):
    if name not in _modules:
        spec = importlib.util.spec_from_file_location(f"cli_{name}", os.path.join(REPO, SCRIPTS[name]))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _modules[name] = mod
    return _modules[name]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Shared inputs: a raw-CoNSeP toy dataset, a tiny checkpoint with config.json, odd files."""
    root = tmp_path_factory.mktemp("bad_input")
    data = str(root / "toy")
    make_toy_dataset(data, num_train=2, num_test=0, size=64, seed=1, progress=False)
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**TINY)
    run = root / "run"
    ckpt = str(run / "ema_0.9999_000010.pt")
    save_state_dict(ckpt, model.state_dict())
    save_config(str(run / "config.json"), dict(TINY, timestep_respacing=""))
    (root / "a_file").write_text("not a folder")
    with open(run / "pickle.pt", "wb") as f:  # beside config.json: the file itself is the problem
        pickle.dump({"w": [1.0, 2.0]}, f, protocol=4)
    (run / "empty.pt").write_bytes(b"")
    (root / "empty_run").mkdir()
    labels = os.path.join(data, "Train", "Labels")
    seg = str(root / "seg")  # a finished hovernet_train.py run: config.json as training writes it, weights
    write_segmenter(seg)
    return {
        "root": root, "data": data, "ckpt": ckpt, "file": str(root / "a_file"),
        "pickle": str(run / "pickle.pt"), "empty_pt": str(run / "empty.pt"),
        "empty_run": str(root / "empty_run"), "labels": labels, "missing": str(root / "does_not_exist"),
        "seg": seg, "sdm": str(run),
    }


def write_segmenter(folder: str, net: Optional[dict] = None) -> None:
    """A tiny finished segmenter run (small network, width 4, 5 classes); ``net`` replaces its
    ``"net"`` entry in config.json (the weights stay those of width 4)."""
    from guided_diffusion.downstream.nets import NetConfig, build_network

    real = NetConfig("small", 5, 4)
    torch.manual_seed(0)
    save_state_dict(os.path.join(folder, "model.safetensors"), build_network(real).state_dict())
    fileio.write_json(os.path.join(folder, "config.json"), {"settings": {"arch": "small", "width": 4},
                                                            "net": real.to_dict() if net is None else net})


def edited_segmenter(change: Callable[[dict], object]):
    """Prepare: tmp/seg, a copy of the segmenter whose config.json is ``change(config)`` (the dict
    edited in place when it returns None)."""
    def prepare(e, out, tmp, mp):
        import shutil

        shutil.copytree(e["seg"], str(tmp / "seg"))
        path = str(tmp / "seg" / "config.json")
        config = fileio.read_json(path)
        new = change(config)
        fileio.write_json(path, config if new is None else new)
    return prepare


def predict_argv(*extra, data=None):
    """hovernet_predict.py on the toy Train split (or ``data(e, tmp)``) with the env's segmenter."""
    return lambda e, out, tmp: ["--run_dir", e["seg"], "--data_dir", data(e, tmp) if data else e["data"], "--split",
                                "Train", "--out_dir", out, "--progress", "false", "--device", "cpu",
                                *fill(e, out, tmp, extra)]


def diagnose_argv(*extra, data=None):
    return lambda e, out, tmp: ["--run_dir", e["seg"], "--data_dir", data(e, tmp) if data else e["data"], "--split",
                                "Train", "--dataset_mode", "consep", "--out_json", out + "/diagnosis.json",
                                "--progress", "false", "--device", "cpu", *fill(e, out, tmp, extra)]


def tiny_image(stem: str, h: int, w: int):
    """Change: image ``stem`` of the Train split becomes h x w (its label map too)."""
    def change(root):
        fileio.write_png(os.path.join(root, "Train", "Images", stem + ".png"), np.full((h, w, 3), 200, np.uint8))
        write_mat(os.path.join(root, "Train", "Labels", stem + ".mat"), inst_map=np.zeros((h, w), np.int32),
                  type_map=np.zeros((h, w), np.int32))
    return change


def sdm_stages(pre_resume: str = "", fine_resume: str = "{tmp}/pre/model000002.pt"):
    """Prepare: two SDM training stages tmp/pre and tmp/fine (config.json only: the stage order is
    checked before any checkpoint is read), recording where each resumed from."""
    def prepare(e, out, tmp, mp):
        for name, resume in (("pre", pre_resume), ("fine", fine_resume)):
            save_config(str(tmp / name / "config.json"), dict(TINY, resume_checkpoint=resume.format(tmp=tmp),
                                                              log_dir=str(tmp / name), ema_rate="0.9999"))
    return prepare


def export_argv(runs: str):
    return lambda e, out, tmp: ["--run_dirs", runs.format(**e, tmp=tmp), "--out_dir", out]


def with_test_split(e, out, tmp, mp):
    """Prepare: tmp/data, a copy of the toy dataset whose Test split is a copy of its Train split."""
    import shutil

    root = copy_dataset(e["data"], str(tmp / "data"))
    shutil.copytree(os.path.join(root, "Train"), os.path.join(root, "Test"))


def copy_dataset(src: str, dst: str) -> str:
    import shutil

    shutil.copytree(src, dst)
    return dst


def dataset_with(env, tmp, change: Callable[[str], None]) -> str:
    """A copy of the toy dataset, then ``change(copy_root)``."""
    root = copy_dataset(env["data"], str(tmp / "data"))
    change(root)
    return root


def live_lock(folder: str, rank: int = 0) -> None:
    """A lock held by a live process (pid 1 always runs) with a fresh heartbeat."""
    os.makedirs(folder, exist_ok=True)
    now = time.time()
    name = ".lock" if rank == 0 else f".lock-rank{rank}"
    fileio.write_json(os.path.join(folder, name), {"pid": 1, "host": socket.gethostname(), "what": "training",
                                                    "started": now, "heartbeat": now, "token": "other"})


def no_space(monkeypatch, target="os.fsync"):
    """Every write of the given function fails as on a full disk."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "os.fsync":
        monkeypatch.setattr(os, "fsync", full)
    else:
        module, name = target.rsplit(".", 1)
        monkeypatch.setattr(importlib.import_module(module), name, full)


def read_only(monkeypatch, folder: str):
    """``folder`` behaves as unwritable (tests may run as root, who bypasses permission bits)."""
    real = os.access
    full = os.path.abspath(folder)
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.path.abspath(p) == full else real(p, mode, **k))


@dataclass
class Case:
    id: str
    command: str
    argv: Callable  # (env, out, tmp) -> list of str
    fragments: Sequence[str]  # each must appear in the error line; "{out}" etc. are filled in
    prepare: Optional[Callable] = None  # (env, out, tmp, monkeypatch) -> None
    out_kind: str = "absent"  # absent: out must not exist after; consistent: no .tmp / record-less outputs;
    # unchanged: the folder extra["keep"](env, out, tmp) (default out) holds the same files and bytes after
    extra: dict = field(default_factory=dict)


def stats_argv(*extra):
    return lambda e, out, tmp: ["--data_dir", e["data"], "--dataset_mode", "consep", "--out_dir", out, *extra]


def gradmix_argv(*extra, data=None):
    return lambda e, out, tmp: ["--data_dir", data(e, tmp) if data else e["data"], "--dataset_mode", "consep",
                                "--out_dir", out, "--progress", "False", "--margin", "2", *extra]


def sample_argv(*extra, drop=()):
    def build(e, out, tmp):
        argv = {"--data_dir": e["data"], "--dataset_mode": "consep", "--model_path": e["ckpt"], "--results_path": out,
                "--timestep_respacing": "ddim4", "--ddim_percent": "50", "--s": "1.5", "--progress": "False",
                "--figure_rows": "0", "--num_samples": "2"}
        flat = [x for k, v in argv.items() if k not in drop for x in (k, v)]
        return flat + [str(x).format(**e, out=out, tmp=tmp) for x in extra]
    return build


def train_argv(*extra, drop=()):
    def build(e, out, tmp):
        argv = {"--data_dir": e["data"], "--dataset_mode": "consep", "--log_dir": out, "--max_steps": "1",
                "--batch_size": "1", "--progress": "False"}
        model = [f"--{k}" for k in ("image_size", "num_classes", "num_channels", "num_res_blocks", "num_head_channels",
                                     "attention_resolutions", "channel_mult", "class_cond", "learn_sigma", "diffusion_steps")]
        flat = [x for k, v in argv.items() if k not in drop for x in (k, v)]
        flat += [x for k in model for x in (k, str(TINY[k[2:]]))]
        return flat + [str(x).format(**e, out=out, tmp=tmp) for x in extra]
    return build


def eval_dirs(tmp, true_types=(1, 2), pred_types=(1, 2), pred_stem="a", true_npy=None):
    inst = np.zeros((16, 16), np.int32)
    tmap = np.zeros((16, 16), np.int32)
    pmap = np.zeros((16, 16), np.int32)
    for k, (t, p) in enumerate(zip(true_types, pred_types)):
        inst[2 + 5 * k : 5 + 5 * k, 2:5] = k + 1
        tmap[inst == k + 1], pmap[inst == k + 1] = t, p
    true_dir, pred_dir = tmp / "true", tmp / "pred"
    if true_npy is not None:
        os.makedirs(true_dir, exist_ok=True)
        np.save(true_dir / "a.npy", true_npy)
    else:
        write_mat(str(true_dir / "a.mat"), inst_map=inst, type_map=tmap)
    write_mat(str(pred_dir / f"{pred_stem}.mat"), inst_map=inst, type_map=pmap)
    return str(true_dir), str(pred_dir)


def eval_argv(*extra, **kw):
    def build(e, out, tmp):
        t, p = eval_dirs(tmp, **kw)
        return ["--true_dir", t, "--pred_dir", p, "--out_dir", out, "--no_progress", *extra]
    return build


def fill(e, out, tmp, extra):
    return [str(x).format(**e, out=out, tmp=tmp) for x in extra]


def hover_train_argv(*extra):
    return lambda e, out, tmp: ["--data_dir", e["data"], "--dataset_mode", "consep", "--out_dir", out, "--arch", "small",
                                "--width", "4", "--crop_size", "32", "--batch_size", "1", "--steps", "1",
                                "--progress", "false", *fill(e, out, tmp, extra)]


def study_argv(*extra):
    return lambda e, out, tmp: ["--data_dir", e["data"], "--dataset_mode", "consep", "--arms", "real", "--preset", "quick",
                                "--out_dir", out, "--num_threads", "1", "--progress", "false", *fill(e, out, tmp, extra)]


def predict_into(rel_data: str, rel_out: str):
    """hovernet_predict.py on a copy of the toy dataset (tmp/data) with --data_dir / --out_dir relative to it."""
    def build(e, out, tmp):
        root = copy_dataset(e["data"], str(tmp / "data"))
        return ["--run_dir", e["empty_run"], "--data_dir", os.path.join(root, rel_data), "--split", "Train",
                "--out_dir", os.path.join(root, rel_out), "--progress", "false"]
    return build


def eval_into(which: str, sub: str = ""):
    """evaluate.py with --out_dir = the true or pred folder (or a folder ``sub`` inside it)."""
    def build(e, out, tmp):
        t, p = eval_dirs(tmp)
        return ["--true_dir", t, "--pred_dir", p, "--out_dir", os.path.join(str(tmp / which), sub), "--no_progress"]
    return build


def symlink(target: str, link: str):
    return lambda e, out, tmp, mp: os.symlink(target.format(**e, tmp=tmp), link.format(**e, tmp=tmp))


def keep(rel: str):
    return {"keep": lambda e, out, tmp: str(tmp / rel)}


def replace_label(stem: str, **arrays):
    def change(root):
        write_mat(os.path.join(root, "Train", "Labels", stem + ".mat"), **arrays)
    return change


def corrupt_file(rel: str, content: bytes):
    def change(root):
        with open(os.path.join(root, rel), "wb") as f:
            f.write(content)
    return change


Z = np.zeros((64, 64), np.int32)
ONE = np.pad(np.ones((4, 4), np.int32), 30)

CASES = [
    # ---------------------------------------------------------------- gradmix.py
    Case("gradmix-missing-data", "gradmix", gradmix_argv(data=lambda e, t: e["missing"]), ["{missing}", "data_dir not found"]),
    Case("gradmix-out-is-file", "gradmix", lambda e, out, t: gradmix_argv()(e, e["file"], t), ["{file}", "--out_dir", "existing file"], out_kind="none"),
    Case("gradmix-out-under-file", "gradmix", lambda e, out, t: gradmix_argv()(e, e["file"] + "/sub", t), ["--out_dir", "is a file"], out_kind="none"),
    Case("gradmix-out-read-only", "gradmix", gradmix_argv(), ["{tmp}", "--out_dir", "not writable"],
         prepare=lambda e, out, tmp, mp: read_only(mp, str(tmp))),
    Case("gradmix-minor-absent", "gradmix",
         gradmix_argv("--dataset_mode", "custom", "--num_classes", "9", "--minor", "8"), ["--minor 8", "no donor"]),
    Case("gradmix-bad-kinds", "gradmix", gradmix_argv("--kinds", "shuffle"), ["--kinds", "shuffle"]),
    Case("gradmix-negative-maps", "gradmix", gradmix_argv("--num_maps", "-1"), ["--num_maps"]),
    Case("gradmix-labels-merged-yes-on-raw", "gradmix", gradmix_argv("--labels_merged", "yes"), ["--labels_merged", ".mat"]),
    Case("gradmix-bad-labels-merged", "gradmix", gradmix_argv("--labels_merged", "maybe"), ["--labels_merged", "maybe"]),
    Case("gradmix-unpaired-image", "gradmix",
         gradmix_argv(data=lambda e, t: dataset_with(e, t, lambda r: os.remove(os.path.join(r, "Train", "Labels", "toy_train_001.mat")))),
         ["toy_train_001", "image without a label"]),
    Case("gradmix-corrupt-mat", "gradmix",
         gradmix_argv(data=lambda e, t: dataset_with(e, t, corrupt_file("Train/Labels/toy_train_000.mat", b"garbage"))),
         ["toy_train_000.mat", "not a readable"]),
    Case("gradmix-type-outside-table", "gradmix",
         gradmix_argv(data=lambda e, t: dataset_with(e, t, replace_label("toy_train_000", inst_map=ONE, type_map=ONE * 9))),
         ["toy_train_000.mat", "[9]"]),
    Case("gradmix-empty-png", "gradmix",
         gradmix_argv("--write_images", "true",
                      data=lambda e, t: dataset_with(e, t, corrupt_file("Train/Images/toy_train_000.png", b""))),
         ["toy_train_000.png", "empty file"], out_kind="consistent"),
    Case("gradmix-disk-full", "gradmix", gradmix_argv(), ["No space left", "kept: 0 complete maps"],
         prepare=lambda e, out, tmp, mp: no_space(mp), out_kind="consistent"),
    # ---------------------------------------------------------------- dataset_stats.py
    Case("stats-both-sources", "stats", stats_argv("--label_dir", "x"), ["--data_dir", "--label_dir"]),
    Case("stats-before-without-label", "stats", stats_argv("--before_dir", "x"), ["--before_dir"]),
    Case("stats-missing-data", "stats", lambda e, out, t: ["--data_dir", e["missing"], "--out_dir", out], ["{missing}"]),
    Case("stats-out-is-file", "stats", lambda e, out, t: stats_argv()(e, e["file"], t), ["{file}", "--out_dir"], out_kind="none"),
    Case("stats-out-read-only", "stats", stats_argv(), ["--out_dir", "not writable"],
         prepare=lambda e, out, tmp, mp: read_only(mp, str(tmp))),
    Case("stats-empty-label-dir", "stats", lambda e, out, t: ["--label_dir", e["empty_run"], "--out_dir", out], ["{empty_run}", "no .mat"]),
    Case("stats-custom-without-classes", "stats", stats_argv("--dataset_mode", "custom"), ["num_classes"]),
    Case("stats-missing-type-map", "stats",
         lambda e, out, t: ["--data_dir", dataset_with(e, t, replace_label("toy_train_001", inst_map=Z)), "--out_dir", out],
         ["toy_train_001.mat", "type_map"]),
    Case("stats-disk-full", "stats", stats_argv(), ["No space left"],
         prepare=lambda e, out, tmp, mp: no_space(mp), out_kind="consistent"),
    Case("stats-bad-choice", "stats", stats_argv("--dataset_mode", "pannuke2"), ["--dataset_mode"]),
    # ---------------------------------------------------------------- evaluate.py
    Case("eval-missing-true", "evaluate",
         lambda e, out, t: ["--true_dir", e["missing"], "--pred_dir", e["empty_run"], "--out_dir", out], ["{missing}"]),
    Case("eval-unpaired", "evaluate", eval_argv(pred_stem="b"), ["only in true_dir: a"]),
    Case("eval-bad-match-iou", "evaluate", eval_argv("--match_iou", "1.5"), ["--match_iou"]),
    Case("eval-bad-radius", "evaluate", eval_argv("--radius", "0"), ["--radius"]),
    Case("eval-out-is-file", "evaluate", lambda e, out, t: eval_argv()(e, e["file"], t), ["{file}", "--out_dir"], out_kind="none"),
    Case("eval-raw-prediction", "evaluate", eval_argv("--dataset_mode", "consep", true_types=(1, 5), pred_types=(1, 7)),
         ["pred", "a.mat", "raw dataset ids"]),
    Case("eval-bad-npy", "evaluate", eval_argv(true_npy=np.zeros((16, 16, 3), np.int32)), ["a.npy", "shape"]),
    Case("eval-disk-full", "evaluate", eval_argv(), ["No space left"],
         prepare=lambda e, out, tmp, mp: no_space(mp), out_kind="consistent"),
    # ---------------------------------------------------------------- image_sample.py
    Case("sample-no-model-path", "sample", sample_argv(drop=("--model_path",)), ["--model_path is required"]),
    Case("sample-missing-model", "sample", sample_argv("--model_path", "{missing}"), ["{missing}", "not found"]),
    Case("sample-raw-pickle", "sample", sample_argv("--model_path", "{pickle}"), ["{pickle}", "plain Python pickle"]),
    Case("sample-empty-checkpoint", "sample", sample_argv("--model_path", "{empty_pt}"), ["{empty_pt}", "empty file"]),
    Case("sample-run-folder-without-checkpoint", "sample", sample_argv("--model_path", "{empty_run}"),
         ["{empty_run}", "without a complete checkpoint"]),
    Case("sample-results-is-file", "sample", lambda e, out, t: sample_argv("--results_path", e["file"])(e, out, t),
         ["{file}", "--results_path"], out_kind="none"),
    Case("sample-results-read-only", "sample", sample_argv(), ["--results_path", "not writable"],
         prepare=lambda e, out, tmp, mp: read_only(mp, str(tmp))),
    Case("sample-guidance-below-one", "sample", sample_argv("--s", "0.5"), ["--s 0.5"]),
    Case("sample-ddim-percent-zero", "sample", sample_argv("--ddim_percent", "0"), ["--ddim_percent"]),
    Case("sample-bad-labels-merged", "sample", sample_argv("--labels_merged", "maybe"), ["--labels_merged"]),
    Case("sample-bad-sampler", "sample", sample_argv("--sampler", "euler"), ["--sampler"]),
    Case("sample-missing-data", "sample", sample_argv("--data_dir", "{missing}"), ["{missing}"]),
    Case("sample-disk-full", "sample", sample_argv(), ["No space left", "kept: 0 complete patches"],
         prepare=lambda e, out, tmp, mp: no_space(mp, "guided_diffusion.infra.fileio.write_png"), out_kind="consistent"),
    Case("sample-folder-locked", "sample", sample_argv("--run_name", "r"), ["in use by", ".lock"],
         prepare=lambda e, out, tmp, mp: live_lock(os.path.join(out, "r")), out_kind="consistent"),
    # ---------------------------------------------------------------- image_train.py
    Case("train-missing-data", "train", train_argv("--data_dir", "{missing}"), ["{missing}", "--data_dir"]),
    Case("train-log-dir-is-file", "train", lambda e, out, t: train_argv("--log_dir", e["file"])(e, out, t),
         ["{file}", "--log_dir"], out_kind="none"),
    Case("train-log-dir-read-only", "train", train_argv(), ["--log_dir", "not writable"],
         prepare=lambda e, out, tmp, mp: read_only(mp, str(tmp))),
    Case("train-bad-lr", "train", train_argv("--lr", "0"), ["--lr"]),
    Case("train-bad-labels-merged", "train", train_argv("--labels_merged", "maybe"), ["--labels_merged"]),
    Case("train-missing-resume", "train", train_argv("--resume_checkpoint", "{missing}"), ["{missing}", "--resume_checkpoint"]),
    Case("train-folder-locked", "train", train_argv(), ["in use by", ".lock"],
         prepare=lambda e, out, tmp, mp: live_lock(out), out_kind="consistent"),
    Case("train-empty-png", "train",
         lambda e, out, t: train_argv("--data_dir", dataset_with(e, t, corrupt_file("Train/Images/toy_train_001.png", b"")))(e, out, t),
         ["toy_train_001.png", "empty file"]),
    # ---------------------------------------------------------------- datasets/make_toy.py
    Case("toy-root-is-file", "toy", lambda e, out, t: ["--root", e["file"]], ["{file}", "--root"], out_kind="none"),
    Case("toy-root-read-only", "toy", lambda e, out, t: ["--root", out], ["--root", "not writable"],
         prepare=lambda e, out, tmp, mp: read_only(mp, str(tmp))),
    Case("toy-bad-class-probs", "toy", lambda e, out, t: ["--root", out, "--class_probs", "1,2"], ["--class_probs"]),
    Case("toy-density-nan", "toy", lambda e, out, t: ["--root", out, "--density", "nan"], ["density nan", "finite"]),
    Case("toy-negative-scale", "toy", lambda e, out, t: ["--root", out, "--scale", "-1"], ["scale -1.0", "> 0"]),
    Case("toy-negative-seed", "toy", lambda e, out, t: ["--root", out, "--seed", "-3"], ["seed -3", ">= 0"]),
    Case("toy-tiny-size", "toy", lambda e, out, t: ["--root", out, "--size", "4"], ["size 4", "too small"]),
    Case("toy-disk-full", "toy", lambda e, out, t: ["--root", out, "--num_train", "1", "--num_test", "0", "--size", "32"],
         ["No space left"], prepare=lambda e, out, tmp, mp: no_space(mp), out_kind="consistent"),
    # ---------------------------------------------------------------- demo.py
    Case("demo-missing-data", "demo", lambda e, out, t: ["--data_dir", e["missing"], "--out_dir", out], ["{missing}", "--data_dir"]),
    Case("demo-out-is-file", "demo", lambda e, out, t: ["--out_dir", e["file"], "--preset", "quick"], ["{file}", "--out_dir"], out_kind="none"),
    # ---------------------------------------------------------------- image_sample.py: non-finite numbers
    Case("sample-eta-nan", "sample", sample_argv("--eta", "nan"), ["--eta nan", "finite"]),
    Case("sample-s-inf", "sample", sample_argv("--s", "inf"), ["--s inf", "finite"]),
    Case("sample-s-nan", "sample", sample_argv("--s", "nan"), ["--s nan", "finite"]),
    Case("sample-eta-ddpm", "sample", sample_argv("--sampler", "ddpm", "--eta", "1"), ["--eta", "ddim and dpmpp2m"]),
    Case("sample-eta-dpm-above-1", "sample", sample_argv("--sampler", "dpmpp2m", "--eta", "1.5"), ["--eta 1.5", "at most 1"]),
    # ---------------------------------------------------------------- an output folder over the inputs
    Case("hover-predict-into-labels", "hover_predict", predict_into("", "Train/Labels"),
         ["{tmp}/data/Train/Labels", "--out_dir is inside the input folder --data_dir"], out_kind="unchanged", extra=keep("data")),
    Case("hover-predict-out-contains-data", "hover_predict", predict_into("Train", ""),
         ["--out_dir contains the input folder --data_dir"], out_kind="unchanged", extra=keep("data")),
    Case("eval-out-is-pred-dir", "evaluate", eval_into("pred"), ["{tmp}/pred", "--out_dir is the input folder --pred_dir"],
         out_kind="unchanged", extra=keep("pred")),
    Case("eval-out-inside-true-dir", "evaluate", eval_into("true", "eval"), ["--out_dir is inside the input folder --true_dir"],
         out_kind="unchanged", extra=keep("true")),
    Case("convert-out-inside-data", "convert",
         lambda e, out, t: ["--data_dir", out, "--dataset_mode", "pannuke", "--out_dir", out + "/consep", "--progress", "false"],
         ["{out}/consep", "--out_dir is inside the input folder --data_dir"],
         prepare=lambda e, out, tmp, mp: copy_dataset(e["data"], out), out_kind="unchanged"),
    # ---------------------------------------------------------------- hovernet_train.py / utility_study.py
    Case("hover-train-negative-seed", "hover_train", hover_train_argv("--seed", "-1"), ["--seed -1", ">= 0"]),
    Case("hover-train-lr-nan", "hover_train", hover_train_argv("--lr", "nan"), ["--lr nan", "finite"]),
    Case("hover-train-weight-decay-nan", "hover_train", hover_train_argv("--weight_decay", "nan"), ["--weight_decay nan", "finite"]),
    Case("hover-train-weight-decay-negative", "hover_train", hover_train_argv("--weight_decay", "-1"), ["--weight_decay -1", ">= 0"]),
    Case("hover-train-data-twice", "hover_train", hover_train_argv("--data_dir", "{data},{data}/"),
         ["{data}/", "listed twice in --data_dir"]),
    Case("hover-train-synthetic-twice", "hover_train", hover_train_argv("--synthetic_dirs", "{data}/Train,{tmp}/link"),
         ["{tmp}/link", "listed twice in --synthetic_dirs", "{data}/Train"], prepare=symlink("{data}/Train", "{tmp}/link")),
    Case("study-negative-seed", "study", study_argv("--seeds", "-1"), ["--seeds -1", ">= 0"]),
    Case("study-synthetic-twice", "study", study_argv("--arms", "real,balance", "--balance_dirs", "{data}/Train,{data}/Train"),
         ["{data}/Train", "listed twice in --balance_dirs"]),
    # ---------------------------------------------------------------- label_fidelity.py
    Case("fidelity-negative-grid-rows", "fidelity",
         lambda e, out, t: ["--run_dir", e["empty_run"], "--synthetic_dirs", e["data"] + "/Train", "--real_dir", e["data"],
                            "--split", "Train", "--out_dir", out, "--grid_rows", "-2", "--progress", "false"],
         ["--grid_rows -2", ">= 0"]),
]


CASES += [
    # ---------------------------------------------------------------- export_model.py: stages out of order (issue 22 #4)
    Case("export-stages-reversed", "export", export_argv("{tmp}/fine,{tmp}/pre"),
         ["--run_dirs: {tmp}/pre does not continue {tmp}/fine", "started fresh", "first stage first"],
         prepare=sdm_stages()),
    Case("export-stage-resumed-elsewhere", "export", export_argv("{tmp}/pre,{tmp}/fine"),
         ["{tmp}/fine does not continue {tmp}/pre", "resumed from {tmp}/other/model000002.pt"],
         prepare=sdm_stages(fine_resume="{tmp}/other/model000002.pt")),
    Case("export-run-listed-twice", "export", export_argv("{tmp}/pre,{tmp}/pre/"),
         ["{tmp}/pre/", "listed twice in --run_dirs"], prepare=sdm_stages()),
    Case("export-segmenter-run", "export", export_argv("{seg}"),
         ["{seg}: holds a nuclei segmenter", "--run_dirs needs a diffusion model"]),
    # ---------------------------------------------------------------- an edited segmenter config.json (#7)
    Case("hover-predict-config-without-net", "hover_predict", predict_argv("--run_dir", "{tmp}/seg"),
         ["{tmp}/seg/config.json", '"net": missing'], prepare=edited_segmenter(lambda c: c.pop("net") and None)),
    Case("hover-predict-config-width-string", "hover_predict", predict_argv("--run_dir", "{tmp}/seg"),
         ["{tmp}/seg/config.json: net.width: expected an integer, got \"4\""],
         prepare=edited_segmenter(lambda c: c["net"].update(width="4"))),
    Case("hover-predict-config-unknown-key", "hover_predict", predict_argv("--run_dir", "{tmp}/seg"),
         ["{tmp}/seg/config.json: net.depth: unknown setting"],
         prepare=edited_segmenter(lambda c: c["net"].update(depth=3))),
    Case("hover-predict-config-list", "hover_predict", predict_argv("--run_dir", "{tmp}/seg"),
         ["{tmp}/seg/config.json", "expected a JSON object", "list"], prepare=edited_segmenter(lambda c: [c])),
    Case("hover-predict-net-list", "hover_predict", predict_argv("--run_dir", "{tmp}/seg"),
         ["{tmp}/seg/config.json", '"net": expected a JSON object'],
         prepare=edited_segmenter(lambda c: c.update(net=["small", 5, 4]))),
    Case("hover-predict-config-one-class", "hover_predict", predict_argv("--run_dir", "{tmp}/seg"),
         ["{tmp}/seg/config.json: net", "num_classes must be >= 2"],
         prepare=edited_segmenter(lambda c: c["net"].update(num_classes=1))),
    # ---------------------------------------------------------------- the wrong kind of model (#8)
    Case("hover-predict-sdm-folder", "hover_predict", predict_argv("--run_dir", "{sdm}"),
         ["{sdm}: holds a diffusion model", "--run_dir needs a nuclei segmenter"]),
    Case("diagnose-sdm-folder", "diagnose", diagnose_argv("--run_dir", "{sdm}"),
         ["{sdm}: holds a diffusion model", "--run_dir needs a nuclei segmenter"]),
    Case("fidelity-sdm-folder", "fidelity",
         lambda e, out, t: ["--run_dir", e["sdm"], "--synthetic_dirs", e["data"] + "/Train", "--real_dir", e["data"],
                            "--split", "Train", "--out_dir", out, "--progress", "false", "--device", "cpu"],
         ["{sdm}: holds a diffusion model", "--run_dir needs a nuclei segmenter"]),
    Case("sample-segmenter-model", "sample", sample_argv("--model_path", "{seg}/model.safetensors"),
         ["{seg}/model.safetensors: holds a nuclei segmenter", "--model_path needs a diffusion model"]),
    Case("demo-segmenter-model", "demo",
         lambda e, out, t: ["--model_path", e["seg"] + "/model.safetensors", "--out_dir", out, "--progress", "false"],
         ["{seg}/model.safetensors: holds a nuclei segmenter", "--model_path needs a diffusion model"]),
    # ---------------------------------------------------------------- images below the segmenter's minimum (#9)
    Case("hover-predict-1x1-image", "hover_predict",
         predict_argv(data=lambda e, t: dataset_with(e, t, tiny_image("toy_train_001", 1, 1))),
         ["toy_train_001.png", "image 1x1 (WxH)", "minimum of 16 px"]),
    Case("hover-predict-3x64-image", "hover_predict",
         predict_argv(data=lambda e, t: dataset_with(e, t, tiny_image("toy_train_001", 3, 64))),
         ["toy_train_001.png", "image 64x3 (WxH)", "minimum of 16 px"]),
    Case("diagnose-1x1-image", "diagnose",
         diagnose_argv(data=lambda e, t: dataset_with(e, t, tiny_image("toy_train_000", 1, 1))),
         ["toy_train_000.png", "image 1x1 (WxH)", "minimum of 16 px"]),
    # ---------------------------------------------------------------- a test split that is training data (#13)
    Case("study-test-split-is-train", "study", study_argv("--test_split", "Train"),
         ["--test_split Train", "is also training data (--train_split Train", "--allow_test_overlap True"]),
    Case("study-data-dir-is-a-split", "study", study_argv("--data_dir", "{data}/Train"),
         ["--test_split Test", "{data}/Train is also training data"]),
    Case("study-test-split-is-synthetic", "study",
         study_argv("--data_dir", "{tmp}/data", "--arms", "real,balance", "--balance_dirs", "{tmp}/data/Test/"),
         ["--test_split Test", "also training data (--balance_dirs: {tmp}/data/Test/)"], prepare=with_test_split),
    # ---------------------------------------------------------------- demo flags checked before --out_dir (#16)
    Case("demo-toy-size-1", "demo", lambda e, out, t: ["--preset", "quick", "--out_dir", out, "--toy_size", "1"],
         ["--toy_size 1", "at least the SDM's image size 32"]),
    Case("demo-toy-rare-share-2", "demo", lambda e, out, t: ["--preset", "quick", "--out_dir", out, "--toy_rare_share", "2"],
         ["--toy_rare_share 2.0", "in [0, 1]"]),
    Case("demo-toy-rare-share-nan", "demo",
         lambda e, out, t: ["--preset", "quick", "--out_dir", out, "--toy_rare_share", "nan"],
         ["--toy_rare_share nan", "finite"]),
    Case("demo-finetune-lr-negative", "demo",
         lambda e, out, t: ["--preset", "quick", "--out_dir", out, "--finetune_lr", "-1"], ["--finetune_lr -1.0", "> 0"]),
    Case("demo-guidance-below-one", "demo", lambda e, out, t: ["--preset", "quick", "--out_dir", out, "--s", "0.5"],
         ["--s 0.5", ">= 1"]),
    Case("demo-bad-channel-mult", "demo",
         lambda e, out, t: ["--preset", "quick", "--out_dir", out, "--channel_mult", "1,x"], ["channel_mult '1,x'"]),
    Case("demo-classifier-not-exported", "demo",  # a folder without heldout.json cannot give label fidelity
         lambda e, out, t: ["--preset", "quick", "--out_dir", out, "--classifier", e["empty_run"]],
         ["{empty_run}", "--classifier", "exported classifier folder (config.json missing"]),
    Case("demo-unknown-start", "demo", lambda e, out, t: ["--preset", "quick", "--out_dir", out, "--start", "noise"],
         ["--start 'noise'"]),
]


def pannuke_root(tmp, change: Optional[Callable[[np.ndarray], None]] = None) -> str:
    """tmp/pannuke: a one-fold PanNuke (two patches) whose images.npy is ``change``d in place."""
    from format_helpers import write_pannuke

    root = str(tmp / "pannuke")
    write_pannuke(root, {1: [[1, 2], [3]]})
    if change is not None:
        path = os.path.join(root, "Fold 1", "images", "fold1", "images.npy")
        images = np.load(path)
        change(images)
        np.save(path, images)
    return root


def npy_patches(change: Callable[[np.ndarray], None]):
    """Data: tmp/npy, the toy Train split as HoVer-Net .npy patches [H, W, 5] float32; the RGB
    (0..255) of the first (toy_train_000) is ``change``d in place."""
    def build(e, tmp):
        from guided_diffusion.data.readers import list_samples, read_rgb

        folder = tmp / "npy"
        folder.mkdir(exist_ok=True)
        for f in list_samples(e["data"]):
            mat = fileio.read_mat(f.label)
            rgb = read_rgb(f.image).astype(np.float32)
            if f.stem == "toy_train_000":
                change(rgb)
            np.save(folder / f"{f.stem}.npy", np.dstack([rgb, mat["inst_map"], mat["type_map"]]).astype(np.float32))
        return str(folder)
    return build


def set_nan(a):
    a.flat[5] = np.nan


def minus_one_to_one(a):
    """0..255 -> [-1, 1] (the model's range), both ends present."""
    a[:] = a / 127.5 - 1
    a.flat[:2] = -1, 1


def convert_argv(data: Callable, *extra):
    return lambda e, out, tmp: ["--data_dir", data(tmp), "--dataset_mode", "pannuke", "--out_dir", out,
                                "--splits", "Train", "--progress", "false", *fill(e, out, tmp, extra)]


def converted_conic(e, out, tmp, mp):
    """Prepare: ``out`` holds a finished conversion of a CoNIC dataset."""
    from format_helpers import write_conic
    from guided_diffusion.data.formats.export import convert_to_consep

    write_conic(str(tmp / "conic"))
    convert_to_consep(str(tmp / "conic"), "conic", out, ["Train"], progress=False)


def conic_run(e, out, tmp, mp):
    """Prepare: tmp/run, a (minimal) synthesis run made with --dataset_mode conic, and tmp/conic, a
    CoNIC dataset folder (images.npy, labels.npy, ...)."""
    from format_helpers import write_conic

    write_conic(str(tmp / "conic"))
    patch = np.zeros((32, 32, 5), np.uint8)
    np.save(tmp / "patch.npy", patch)
    fileio.write_json(str(tmp / "run" / "run.json"), {"dataset_mode": "conic", "data_dir": str(tmp / "conic")})
    fileio.write_json(str(tmp / "run" / "records" / "p-0000.json"), {"source_image": "x"})
    fileio.write_npy(str(tmp / "run" / "npy_patch" / "p-0000.npy"), patch)


def write_fault(path_of: Callable[[str], str]):
    """Prepare: writing ``path_of(tmp)`` fails as in a read-only folder once the temporary file is
    made (the rename is refused) -- the error must name that path, not the hidden temporary name."""
    def prepare(e, out, tmp, mp):
        real = os.replace

        def refuse(src, dst, *a, **k):
            if os.path.abspath(dst) == os.path.abspath(path_of(str(tmp))):
                raise PermissionError(errno.EACCES, "Permission denied", src, None, dst)
            return real(src, dst, *a, **k)
        mp.setattr(os, "replace", refuse)
    return prepare


CASES += [
    # ---------------------------------------------------------------- image values: [0, 1] floats, NaN (#3, #2)
    Case("convert-pannuke-nan-image", "convert", convert_argv(lambda t: pannuke_root(t, set_nan)),
         ["{tmp}/pannuke/Fold 1/images/fold1/images.npy: image values include NaN or infinity (float64)"]),
    Case("convert-pannuke-out-of-range", "convert",
         convert_argv(lambda t: pannuke_root(t, lambda a: a.__isub__(128))),
         ["images.npy: image values -128..", "(float64) are neither 0..255 nor floats in [0, 1]"]),
    Case("stats-npy-patch-minus-one-to-one", "stats",
         lambda e, out, t: ["--data_dir", npy_patches(minus_one_to_one)(e, t),
                            "--dataset_mode", "consep", "--out_dir", out],
         ["{tmp}/npy/toy_train_000.npy: image values -1..1 (float32) are neither 0..255 nor floats in [0, 1]"]),
    Case("train-npy-patch-nan", "train", train_argv("--data_dir", "{tmp}/npy"),
         ["toy_train_000.npy: image values include NaN or infinity"],
         prepare=lambda e, out, tmp, mp: npy_patches(set_nan)(e, tmp)),
    Case("gradmix-npy-patch-inf", "gradmix",
         gradmix_argv("--write_images", "true", data=npy_patches(lambda a: a.__setitem__((0, 0, 0), np.inf))),
         ["toy_train_000.npy: image values include NaN or infinity"], out_kind="consistent"),
    # ---------------------------------------------------------------- conversions: foreign output, lock (#5)
    Case("convert-into-other-conversion", "convert", convert_argv(pannuke_root),
         ["{out}: --out_dir holds another conversion (source", "dataset_mode 'conic', here 'pannuke'",
          "would mix the two"], prepare=converted_conic, out_kind="unchanged"),
    Case("convert-into-non-empty-folder", "convert", convert_argv(pannuke_root),
         ["{out}: --out_dir is not empty and holds no conversion (found notes.txt)"],
         prepare=lambda e, out, tmp, mp: (os.makedirs(out), open(os.path.join(out, "notes.txt"), "w").close()),
         out_kind="unchanged"),
    Case("convert-folder-locked", "convert", convert_argv(pannuke_root), ["{out}: in use by", ".lock"],
         prepare=lambda e, out, tmp, mp: live_lock(out), out_kind="unchanged"),
    Case("convert-export-into-dataset", "convert", lambda e, out, t: ["--from_run", str(t / "run"), "--out_dir", str(t / "conic")],
         ["{tmp}/conic: --out_dir is not empty and holds no export of a run (found images.npy"],
         prepare=conic_run, out_kind="unchanged", extra=keep("conic")),
    # ---------------------------------------------------------------- output locations up front, by flag (#11)
    Case("diagnose-out-json-is-folder", "diagnose", diagnose_argv("--out_json", "{tmp}"),
         ["{tmp}: --out_json is a folder, not a file"]),
    Case("diagnose-out-json-read-only", "diagnose", diagnose_argv(), ["{out}/diagnosis.json: --out_json is not writable"],
         prepare=lambda e, out, tmp, mp: read_only(mp, str(tmp))),
    Case("study-out-read-only", "study", study_argv(), ["{out}: --out_dir is not writable"],
         prepare=lambda e, out, tmp, mp: read_only(mp, str(tmp))),
    Case("hover-train-out-read-only", "hover_train", hover_train_argv(), ["{out}: --out_dir is not writable"],
         prepare=lambda e, out, tmp, mp: read_only(mp, str(tmp))),
    Case("hover-predict-out-read-only", "hover_predict", predict_argv(), ["{out}: --out_dir is not writable"],
         prepare=lambda e, out, tmp, mp: read_only(mp, str(tmp))),
    Case("stats-rename-refused-names-the-file", "stats", stats_argv(), ["{out}/", ": Permission denied"],
         prepare=write_fault(lambda t: t + "/out/stats_settings.json"), out_kind="consistent",
         extra={"absent": [".tmp"]}),
    # ---------------------------------------------------------------- misleading messages (#12)
    Case("hover-predict-config-arch-bogus", "hover_predict", predict_argv("--run_dir", "{tmp}/seg"),
         ["{tmp}/seg/config.json: net: arch 'bogus': expected one of small, hovernet"],
         prepare=edited_segmenter(lambda c: c["net"].update(arch="bogus")), extra={"absent": ["--arch"]}),
    Case("hover-predict-weights-do-not-fit", "hover_predict", predict_argv("--run_dir", "{tmp}/seg"),
         ["{tmp}/seg/model.safetensors: the checkpoint does not fit the network of {tmp}/seg/config.json:",
          "mis-shaped keys: ", "(checkpoint (4, 3, 3, 3), model (8, 3, 3, 3))"],
         prepare=edited_segmenter(lambda c: c["net"].update(width=8))),
    Case("gradmix-out-symlink-loop", "gradmix", lambda e, out, t: gradmix_argv()(e, str(t / "loop"), t),
         ["{tmp}/loop: --out_dir cannot be created: {tmp}/loop is a symbolic link to {tmp}/loop, which does not "
          "resolve (a missing target or a loop)"], prepare=symlink("{tmp}/loop", "{tmp}/loop")),
    Case("hover-train-out-under-symlink-loop", "hover_train", hover_train_argv("--out_dir", "{tmp}/loop/run"),
         ["{tmp}/loop/run: --out_dir cannot be created: {tmp}/loop is a symbolic link"],
         prepare=symlink("{tmp}/loop", "{tmp}/loop")),
    # ---------------------------------------------------------------- formats as distributed (#15)
    Case("study-pannuke-as-distributed", "study", study_argv("--dataset_mode", "pannuke"),
         ["--dataset_mode pannuke: utility_study.py reads datasets in the CoNSeP layout", "scripts/convert_dataset.py",
          "--dataset_mode custom --class_table D_consep/class_table.json"]),
    Case("diagnose-conic-as-distributed", "diagnose", diagnose_argv("--dataset_mode", "conic"),
         ["--dataset_mode conic: hovernet_diagnose.py reads datasets in the CoNSeP layout"]),
]


def files_under(path: str) -> set:
    return {os.path.relpath(os.path.join(d, n), path) for d, _, names in os.walk(path) for n in names}


def tree(path: str) -> dict:
    """Every folder (None) and file (its bytes) under ``path``, by relative path."""
    out = {}
    for d, dirs, names in os.walk(path):
        out.update({os.path.relpath(os.path.join(d, n), path): None for n in dirs})
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), path)] = f.read()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, env, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    argv = case.argv(env, out, tmp_path)
    if case.prepare:
        case.prepare(env, out, tmp_path, monkeypatch)
    before = files_under(out) if os.path.isdir(out) else None
    kept = case.extra.get("keep", lambda e, o, t: o)(env, out, tmp_path) if case.out_kind == "unchanged" else None
    kept_before = tree(kept) if kept else None
    mod = script(case.command)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: mod.main(argv))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    # One line: nothing of the error continues after it.
    assert err.rstrip().splitlines()[-1] == lines[0], err
    names = dict(env, out=out, tmp=str(tmp_path))
    for fragment in case.fragments:
        assert fragment.format(**names) in lines[0], lines[0]
    for fragment in case.extra.get("absent", ()):  # e.g. a flag the user never passed
        assert fragment not in lines[0], lines[0]
    if case.out_kind == "absent":
        assert not os.path.exists(out), files_under(out)
    elif case.out_kind == "consistent":
        now = files_under(out) if os.path.isdir(out) else set()
        new = now - (before or set())
        assert not [f for f in new if f.endswith(".tmp")], new
        records = {os.path.splitext(os.path.basename(f))[0] for f in now if f.endswith(".json")}
        outputs = [f for f in new if f.endswith((".png", ".mat", ".npy")) and "/" in f]
        assert all(os.path.splitext(os.path.basename(f))[0] in records for f in outputs), new
    elif case.out_kind == "unchanged":
        assert kept_before and tree(kept) == kept_before, set(tree(kept)) ^ set(kept_before)


def test_catalogue_size():
    assert len(CASES) >= 45
    assert {c.command for c in CASES} == set(SCRIPTS)


def test_failed_write_names_the_destination_not_the_temporary_file(tmp_path, monkeypatch):
    """fileio.atomic_open: a temporary file that cannot be made (read-only folder) is reported under
    the destination's name (issue 22 #11)."""
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, ".out.json.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as err:
        fileio.write_json(str(tmp_path / "out.json"), {})
    assert err.value.filename == str(tmp_path / "out.json") and ".tmp" not in str(err.value)
