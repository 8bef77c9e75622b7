"""A small image classifier over arrays: the nucleus-type classifier, and the real-vs-synthetic
critic of the two-sample test (:mod:`.evidence`).

Network: MONAI's ``ResNet`` (2-D, basic blocks, one block per stage, widths ``w, 2w, 4w, 8w``,
batch norm) as a feature trunk, then one linear layer. For nucleus crops (32 px) the stem is a 3x3
convolution of stride 1 without max pooling, so the 4 px nuclei of a 32 px crop are not pooled
away; for whole patches (``stem_stride`` 2) a 7x7 stride-2 stem and max pooling shrink 128 px
patches 4x first. The penultimate features (``8w`` after global average pooling) are what KID uses.

Training (:func:`train_classifier`): Adam, cross-entropy, ``steps`` batches of ``batch_size``;
every batch is *class-balanced* (a class drawn uniformly among the classes present, then an item
uniformly within it; optionally with synthetic items capped at a share of their class's draws),
rotated by a multiple of 90 degrees, flipped, and colour-jittered (each RGB channel scaled by a
factor in ``[1 - j, 1 + j]`` and shifted by ``[-j, j]`` on the [-1, 1] scale).
A batch is a pure function of (seed, step), so a run resumed from its saved state sees the batches
the uninterrupted run would have seen. With ``out_dir`` the run folder holds ``config.json``
(written first; a rerun with other settings is refused), ``train_state.pt`` (every
``save_interval`` steps, weights-only), ``model.safetensors`` and ``train.json`` (written last: the
run is finished and is never retrained).

Inputs are uint8 crops [N, S, S, 3] scaled to [-1, 1]; with ``mask_channel`` the nucleus' own mask
(bool [N, S, S]) is a fourth channel in {-1, 1}. Classes are the merged classes ``1..C-1``; the
network's outputs are their logits in that order.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ...infra import fileio, runlock
from ...infra.checkpoints import load_state_dict, load_torch_file, mismatch_message, save_state_dict
from ...infra.config import SettingsCheck, flag
from ...infra.errors import DiffMixError
from ...infra.train_state import derive_seed

CONFIG, STATE, MODEL, RECORD = "config.json", "train_state.pt", "model.safetensors", "train.json"
# An exported classifier folder also holds its held-out predictions (what fidelity compares with).
HELDOUT = "heldout.json"
_TAG_BATCH = 31


@dataclasses.dataclass
class ClassifierConfig:
    """Settings of one classifier training run (every field is recorded in ``config.json``)."""

    width: int = flag(8, "base feature width w of the ResNet trunk (stages w, 2w, 4w, 8w; >= 8)")
    stem_stride: int = flag(1, "1: 3x3 stride-1 stem (nucleus crops); 2: 7x7 stride-2 stem + max pool (patches)")
    mask_channel: bool = flag(False, "add the nucleus' own mask as a 4th input channel (leaks the label's shape)")
    steps: int = flag(1500, "training steps")
    batch_size: int = flag(64, "items per step (class-balanced)")
    lr: float = flag(2e-3, "Adam learning rate")
    lr_drop_at: float = flag(0.7, "multiply the learning rate by 0.1 after this fraction of the steps")
    weight_decay: float = flag(1e-4, "Adam weight decay")
    jitter: float = flag(0.06, "colour jitter strength j (per-channel gain 1 +- j, shift +- j on [-1, 1])")
    seed: int = flag(0, "seed of the initial weights and of every batch")
    save_interval: int = flag(250, "save the resumable state every this many steps (with out_dir)")

    def validate(self) -> None:
        """Raise :class:`DiffMixError` naming every setting that cannot work."""
        check = SettingsCheck(self)
        for name in ("width", "steps", "batch_size", "save_interval"):
            check.need(name, lambda v: int(v) == v and v >= 1, "an integer >= 1")
        # Below 8 channels per stage, the CPU convolution kernels of torch 2.13 abort the process.
        check.need("width", lambda v: v >= 8, ">= 8")
        check.need("stem_stride", lambda v: v in (1, 2), "1 or 2")
        check.need("lr", lambda v: v > 0, "> 0")
        check.need("lr_drop_at", lambda v: 0 < v <= 1, "in (0, 1]")
        check.need("weight_decay", lambda v: v >= 0, ">= 0")
        check.need("jitter", lambda v: 0 <= v <= 1, "in [0, 1]")
        check.need("seed", lambda v: int(v) == v and v >= 0, "a non-negative integer")
        check.done()


class ImageClassifier(nn.Module):
    """MONAI ResNet trunk + linear head. ``forward``: float [B, C_in, S, S] in [-1, 1] -> logits
    [B, num_outputs]; ``features``: the same input -> float [B, 8w] penultimate features."""

    def __init__(self, in_channels: int, num_outputs: int, width: int = 16, stem_stride: int = 1):
        from monai.networks.nets import ResNet

        super().__init__()
        self.trunk = ResNet(
            block="basic", layers=[1, 1, 1, 1], block_inplanes=[width, 2 * width, 4 * width, 8 * width],
            spatial_dims=2, n_input_channels=in_channels, conv1_t_size=3 if stem_stride == 1 else 7,
            conv1_t_stride=stem_stride, no_max_pool=stem_stride == 1, feed_forward=False,
        )
        self.head = nn.Linear(8 * width, num_outputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def to_input(crops: np.ndarray, masks: Optional[np.ndarray] = None) -> torch.Tensor:
    """uint8 [N, S, S, 3] (+ bool [N, S, S]) -> float32 [N, 3 (+1), S, S] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if masks is not None:
        m = torch.from_numpy(np.ascontiguousarray(masks)).float().mul_(2).sub_(1).unsqueeze(1)
        x = torch.cat([x, m], 1)
    return x


def balanced_indices(labels: np.ndarray, n: int, rng: np.random.Generator,
                     synthetic: Optional[np.ndarray] = None, synthetic_share: float = 1.0) -> np.ndarray:
    """``n`` indices into ``labels`` (int [N]): each draws a class uniformly among the classes
    present, then an item of that class uniformly.

    With ``synthetic`` (bool [N], the item is synthetic) and ``synthetic_share`` s < 1, a class whose
    synthetic items are more than s of its items is drawn from them with probability s and from its
    real items otherwise (each uniformly), so synthetic items cannot outweigh real ones beyond s;
    other classes draw as above. s = 1 gives the plain draw, the same indices for the same ``rng``."""
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    picks = rng.integers(0, classes.size, n)
    if synthetic is None or synthetic_share >= 1:
        return np.array([members[p][rng.integers(0, members[p].size)] for p in picks], np.int64)
    split = [(m[~synthetic[m]], m[synthetic[m]]) for m in members]
    out = np.empty(n, np.int64)
    for i, p in enumerate(picks):
        real, synth = split[p]
        pool = members[p]
        if real.size and synth.size > synthetic_share * pool.size:
            pool = synth if rng.random() < synthetic_share else real
        out[i] = pool[rng.integers(0, pool.size)]
    return out


def augment(x: torch.Tensor, rng: np.random.Generator, jitter: float) -> torch.Tensor:
    """Per item: rot90 k, a horizontal flip, colour jitter on the RGB channels (module docstring)."""
    out = torch.empty_like(x)
    ks, flips = rng.integers(0, 4, len(x)), rng.integers(0, 2, len(x))
    gains = 1 + rng.uniform(-jitter, jitter, (len(x), 3)).astype(np.float32)
    shifts = rng.uniform(-jitter, jitter, (len(x), 3)).astype(np.float32)
    for i in range(len(x)):
        item = torch.rot90(x[i], int(ks[i]), (1, 2))
        out[i] = torch.flip(item, (2,)) if flips[i] else item
    out[:, :3] = (out[:, :3] * torch.from_numpy(gains)[:, :, None, None]
                  + torch.from_numpy(shifts)[:, :, None, None]).clamp_(-1, 1)
    return out


def batch_at(cfg: ClassifierConfig, crops: np.ndarray, masks: Optional[np.ndarray], labels: np.ndarray,
             step: int, synthetic: Optional[np.ndarray] = None,
             synthetic_share: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of a run: ``(x float32 [B, C_in, S, S], target int64 [B] = class index)``;
    a pure function of (cfg.seed, step) and the data. ``labels`` are output indices 0..K-1;
    ``synthetic`` / ``synthetic_share``: see :func:`balanced_indices`."""
    rng = np.random.default_rng(derive_seed(cfg.seed, _TAG_BATCH, step))
    idx = balanced_indices(labels, cfg.batch_size, rng, synthetic, synthetic_share)
    x = to_input(crops[idx], None if masks is None else masks[idx])
    return augment(x, rng, cfg.jitter), torch.from_numpy(labels[idx])


def _lr_at(cfg: ClassifierConfig, step: int) -> float:
    return cfg.lr * (0.1 if step >= int(round(cfg.lr_drop_at * cfg.steps)) else 1.0)


def _identity(cfg: ClassifierConfig, meta: Dict[str, Any]) -> Dict[str, Any]:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "save_interval"}
    return {"settings": settings, **meta}


def _finished(out_dir: str, identity: Dict[str, Any]) -> Optional[dict]:
    """The record of a finished run in ``out_dir`` (None if new or unfinished); other settings are refused."""
    path = fileio.join(out_dir, CONFIG)
    if not fileio.exists(path):
        if fileio.exists(fileio.join(out_dir, STATE)):
            raise DiffMixError(f"{out_dir}: holds {STATE} but no {CONFIG}; use an empty output folder")
        return None
    saved = fileio.read_json(path)
    saved_id = {k: saved.get(k) for k in identity}
    if saved_id != identity:
        changed = sorted(k for k in identity if saved.get(k) != identity[k])
        detail = ", ".join(changed)
        if "settings" in changed:
            detail = ", ".join(f"{k}: {saved['settings'].get(k)!r} -> {v!r}"
                               for k, v in identity["settings"].items() if saved["settings"].get(k) != v) or detail
        raise DiffMixError(f"{out_dir}: holds a classifier run with other settings or data ({detail}); "
                           "use another output folder")
    record = fileio.join(out_dir, RECORD)
    return fileio.read_json(record) if fileio.exists(record) else None


def train_classifier(cfg: ClassifierConfig, crops: np.ndarray, labels: np.ndarray, num_outputs: int, *,
                     masks: Optional[np.ndarray] = None, synthetic: Optional[np.ndarray] = None,
                     synthetic_share: float = 1.0, out_dir: str = "", meta: Optional[Dict[str, Any]] = None,
                     device: str = "cpu", progress: bool = True, desc: str = "classifier"):
    """Train (or resume, or load finished) a classifier; returns ``(model in eval mode, record)``.

    Args:
        crops: uint8 [N, S, S, 3]; labels: int [N] output indices in ``0..num_outputs-1``.
        masks: bool [N, S, S] when ``cfg.mask_channel``.
        synthetic, synthetic_share: bool [N] which items are synthetic, and the largest share of a
            class's draws they may take (:func:`balanced_indices`; recorded when it applies).
        out_dir: run folder ('' = in memory only, nothing written).
        meta: JSON-able description of the data (classes, sources, counts): part of the run's
            identity, so a rerun on other data into the same folder is refused.
    """
    from tqdm.auto import tqdm

    cfg.validate()
    labels = np.asarray(labels, np.int64)
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8 or len(crops) != labels.size:
        raise DiffMixError(f"{desc}: expected uint8 crops [N, S, S, 3] and N labels, got {crops.dtype} "
                           f"{crops.shape} and {labels.shape}")
    if labels.size == 0:
        raise DiffMixError(f"{desc}: no training items")
    if labels.min() < 0 or labels.max() >= num_outputs:
        raise DiffMixError(f"{desc}: labels must lie in 0..{num_outputs - 1}")
    if cfg.mask_channel and (masks is None or masks.shape != crops.shape[:3]):
        raise DiffMixError(f"{desc}: mask_channel needs masks [N, S, S]")
    use_masks = masks if cfg.mask_channel else None
    meta = {**(meta or {}), "num_outputs": int(num_outputs), "crop_size": int(crops.shape[1]),
            "train_items": int(labels.size)}
    if not 0 < synthetic_share <= 1:
        raise DiffMixError(f"{desc}: synthetic_share must lie in (0, 1], got {synthetic_share}")
    if synthetic is not None:
        synthetic = np.asarray(synthetic, bool)
        if synthetic.shape != labels.shape:
            raise DiffMixError(f"{desc}: synthetic must be bool [N] like labels, got {synthetic.shape}")
        if synthetic_share < 1 and synthetic.any():  # the plain draw keeps the identity of earlier runs
            meta["synthetic_share"] = float(synthetic_share)
    identity = _identity(cfg, meta)
    torch.manual_seed(cfg.seed)
    model = ImageClassifier(3 + int(cfg.mask_channel), num_outputs, cfg.width, cfg.stem_stride).to(device)
    lock = None
    if out_dir:
        finished = _finished(out_dir, identity)
        if finished is not None:
            model.load_state_dict(load_state_dict(fileio.join(out_dir, MODEL)))
            return model.eval(), finished
        lock = runlock.acquire(out_dir, "classifier training", flag="the classifier folder")
    try:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        step, losses, seconds = 0, [], 0.0
        state_path = fileio.join(out_dir, STATE) if out_dir else ""
        if out_dir and fileio.exists(state_path):
            state = load_torch_file(state_path, map_location=device)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            step, losses, seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])
        elif out_dir:
            fileio.write_json(fileio.join(out_dir, CONFIG), identity)
        model.train()
        t0 = time.perf_counter() - seconds
        bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
        while step < cfg.steps:
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step)
            x, y = batch_at(cfg, crops, use_masks, labels, step, synthetic, synthetic_share)
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            if not torch.isfinite(loss):
                raise DiffMixError(f"{desc}: the loss became {loss.item()} at step {step} (try a lower --lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if out_dir and (step % cfg.save_interval == 0 or step == cfg.steps):
                with fileio.atomic_open(state_path, "wb") as f:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "losses": losses, "seconds": time.perf_counter() - t0}, f)
        bar.close()
        tail = losses[-max(1, len(losses) // 10):]
        record = {"steps": step, "seconds": time.perf_counter() - t0, "first_loss": losses[0],
                  "final_loss_mean_last_10pct": float(np.mean(tail)),
                  "parameters": int(sum(p.numel() for p in model.parameters()))}
        if out_dir:
            save_state_dict(fileio.join(out_dir, MODEL), model.state_dict())
            fileio.write_json(fileio.join(out_dir, RECORD), record)
    finally:
        if lock is not None:
            lock.release()
    return model.eval(), record


def load_classifier(run_dir: str, device: str = "cpu") -> Tuple[ImageClassifier, dict]:
    """A finished classifier run's network (eval mode) and its ``config.json``."""
    cfg_path, model_path = fileio.join(run_dir, CONFIG), fileio.join(run_dir, MODEL)
    for p in (cfg_path, model_path, fileio.join(run_dir, RECORD)):
        if not fileio.exists(p):
            raise DiffMixError(f"{run_dir}: not a finished classifier run ({p} missing)")
    config = fileio.read_json(cfg_path)
    try:
        s = config["settings"]
        model = ImageClassifier(3 + int(bool(s["mask_channel"])), int(config["num_outputs"]), int(s["width"]),
                                int(s["stem_stride"]))
    except (KeyError, TypeError, ValueError) as err:
        raise DiffMixError(f"{cfg_path}: not a classifier config ({type(err).__name__}: {err})") from None
    weights = load_state_dict(model_path)
    mismatch = mismatch_message(model_path, weights, model.state_dict(), target=f"the network of {cfg_path}")
    if mismatch:
        raise DiffMixError(mismatch)
    model.load_state_dict(weights)
    return model.to(device).eval(), config


def check_classifier(path: str, config: dict, num_outputs: int, crop_size: Optional[int], what: str) -> None:
    """Refuse a classifier (``config.json`` read from ``path``) that predicts another number of
    classes than ``what`` has, or was trained on another crop size (None: any)."""
    if int(config.get("num_outputs", -1)) != num_outputs:
        raise DiffMixError(f"{path}: the classifier predicts {config.get('num_outputs')} classes, {what} has {num_outputs}")
    if crop_size is not None and int(config.get("crop_size", -1)) != crop_size:
        raise DiffMixError(f"{path}: the classifier was trained on {config.get('crop_size')} px crops, not {crop_size} px")


def check_classifier_folder(path: str, num_outputs: int, flag: str) -> dict:
    """Refuse ``path`` unless it is an exported classifier folder (:func:`export_classifier`) for
    ``num_outputs`` classes; returns its ``config.json``. Cheap: reads no weights."""
    for name in (CONFIG, MODEL, RECORD, HELDOUT):
        if not fileio.exists(fileio.join(path, name)):
            raise DiffMixError(f"{path}: {flag} needs an exported classifier folder ({name} missing; "
                               "scripts/export_classifier.py writes one)")
    config = fileio.read_json(fileio.join(path, CONFIG))
    check_classifier(path, config, num_outputs, None, f"{flag}'s data")
    return config


def export_classifier(run_dir: str, test_crops: np.ndarray, test_labels: np.ndarray, num_classes: int, out_dir: str,
                      source: str, command: str = "") -> Dict[str, Any]:
    """Copy a finished classifier run into a model folder (``config.json``, ``model.safetensors``,
    ``train.json``) with its predictions on real held-out nuclei (``heldout.json``: ``true`` and
    ``pred`` class ids 1..C-1, per nucleus, and where they came from), so that label fidelity can
    be computed later without the held-out data. Returns the held-out record.

    Args:
        test_crops: uint8 [N, S, S, 3] held-out nucleus crops; test_labels: int [N] their classes 1..C-1.
        num_classes: the classes of the held-out data (1..C-1: C - 1 of them); a classifier predicting
            another number is refused.
        source: what the held-out nuclei are (recorded), e.g. ``consep256 (Test)``.
    """
    model, config = load_classifier(run_dir)
    if uses_masks(config):
        raise DiffMixError(f"{run_dir}: a mask-channel classifier reads the label's shape; export an RGB-only one")
    check_classifier(run_dir, config, num_classes, int(test_crops.shape[1]), "the held-out data")
    probs, _ = predict(model, test_crops)
    true = np.asarray(test_labels, np.int64)
    pred = probs.argmax(1) + 1
    record = {"source": source, "classifier_run": run_dir, "command": command, "n": int(true.size),
              "accuracy": float(np.mean(pred == true)) if true.size else None,
              "true": true.tolist(), "pred": pred.tolist()}
    fileio.makedirs(out_dir)
    for name in (CONFIG, MODEL, RECORD):
        fileio.write_bytes(fileio.join(out_dir, name), fileio.read_bytes(fileio.join(run_dir, name)))
    fileio.write_json(fileio.join(out_dir, HELDOUT), record)
    return record


@torch.no_grad()
def predict(model: ImageClassifier, crops: np.ndarray, masks: Optional[np.ndarray] = None, batch_size: int = 512,
            device: str = "cpu") -> Tuple[np.ndarray, np.ndarray]:
    """``(probabilities float32 [N, K], features float32 [N, 8w])`` of uint8 crops [N, S, S, 3]
    (masks bool [N, S, S] for a mask-channel model), without augmentation."""
    model.eval()
    probs: List[np.ndarray] = []
    feats: List[np.ndarray] = []
    for b in range(0, len(crops), batch_size):
        x = to_input(crops[b : b + batch_size], None if masks is None else masks[b : b + batch_size]).to(device)
        f = model.features(x)
        probs.append(torch.softmax(model.head(f), 1).float().cpu().numpy())
        feats.append(f.float().cpu().numpy())
    k, d = model.head.out_features, model.head.in_features
    return (np.concatenate(probs) if probs else np.zeros((0, k), np.float32),
            np.concatenate(feats) if feats else np.zeros((0, d), np.float32))


def uses_masks(config: dict) -> bool:
    return bool(config.get("settings", {}).get("mask_channel"))
