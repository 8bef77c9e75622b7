"""Training run of the downstream network: settings, fixed step budget, resume, final weights.

A run folder holds

* ``config.json`` -- every setting (written first; a rerun with other settings is refused);
* ``train_state.pt`` -- model, optimizer and step, written atomically every ``save_interval``
  steps and at the end (loaded weights-only); a rerun resumes from it, and because each batch is a
  pure function of (seed, step) the resumed run sees the batches it would have seen;
* ``progress.csv`` -- step, loss, learning rate, synthetic share, seconds;
* ``model.safetensors`` -- the final weights;
* ``train.json`` -- the completion record (written last: its presence means "finished", and a
  finished run is never retrained).
"""

from __future__ import annotations

import dataclasses
import io
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data.classes import ClassTable, dataset_mode_flag, resolve_class_table
from ..data.readers import LabeledImage
from ..data.training import TrainCropDataset
from ..infra import fileio, runlock
from ..infra.checkpoints import load_state_dict, load_torch_file, mismatch_message, save_state_dict
from ..infra.config import SettingsCheck, check_model_kind, flag, load_config_for_checkpoint
from ..infra.errors import DiffMixError
from ..infra.precision import autocast_dtype, check_precision, resolve_precision
from . import data as ddata
from .nets import ARCHS, NetConfig, build_network, check_net_classes, check_input_size, load_encoder, parameter_count

# No fp16 for the segmenter: it trains without a loss scaler.
PRECISIONS = ("auto", "fp32", "bf16")
CONFIG, STATE, MODEL, RECORD, PROGRESS = "config.json", "train_state.pt", "model.safetensors", "train.json", "progress.csv"
# Settings that do not change the result: a resumed run may use other values.
_RUNTIME_FIELDS = ("out_dir", "progress", "save_interval", "num_threads", "device")


@dataclasses.dataclass
class HoverTrainConfig:
    """Settings of one downstream training run (the flags of ``scripts/hovernet_train.py``)."""

    data_dir: str = flag("", "real dataset root(s) in the CoNSeP layout, comma-separated")
    synthetic_dirs: str = flag("", "synthetic sources, comma-separated: image_sample.py run folders, .npy folders, "
                                 "or Images/+Labels/ folders (gradmix.py --write_images)")
    dataset_mode: str = dataset_mode_flag()
    num_classes: Optional[int] = flag(None, "classes incl. background (custom: required without --class_table)")
    class_table: str = flag("", "custom mode: class table JSON")
    split: str = flag("Train", "split of the real dataset roots to train on")
    out_dir: str = flag("", "run folder (config, checkpoints, final weights)")
    arch: str = flag("small", f"network: {' or '.join(ARCHS)} (MONAI HoVerNet fast mode, 256 px)")
    width: int = flag(16, "small network: base feature width")
    crop_size: int = flag(128, "training crop size in pixels (every source image must be at least this large)")
    batch_size: int = flag(8, "crops per step")
    steps: int = flag(2000, "training steps (the fixed budget that makes arms comparable)")
    lr: float = flag(1e-3, "Adam learning rate")
    lr_drop_at: float = flag(0.75, "multiply the learning rate by 0.1 after this fraction of the steps")
    weight_decay: float = flag(0.0, "Adam weight decay")
    synthetic_fraction: Optional[float] = flag(None, "share of each batch from synthetic sources "
                                                   "(default: by pool size, i.e. the union sampled uniformly)")
    seed: int = flag(0, "seed of the initial weights and of every crop")
    precision: str = flag("auto", "fp32 or bf16 autocast; auto: bf16 on a GPU that supports it, else fp32")
    device: str = flag("auto", "cpu, cuda, cuda:N; auto: cuda if available")
    encoder_checkpoint: str = flag("", "arch hovernet: local encoder weights (MONAI HoVerNet names, .pt or .safetensors)")
    save_interval: int = flag(200, "save the resumable state every this many steps")
    num_threads: int = flag(0, "torch CPU threads (0: torch's default)")
    progress: bool = flag(True, "show a progress bar")

    def net_config(self, num_classes: int) -> NetConfig:
        return NetConfig(arch=self.arch, num_classes=num_classes, width=self.width)

    def identity(self) -> Dict[str, Any]:
        """The settings that determine the result (compared when a run folder is reused)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RUNTIME_FIELDS}


def validate(cfg: HoverTrainConfig) -> None:
    """Raise :class:`DiffMixError` naming every setting of ``cfg`` that cannot work."""
    check = SettingsCheck(cfg)
    check.add(not cfg.out_dir, "--out_dir is required")
    check.add(cfg.arch not in ARCHS, f"--arch {cfg.arch!r}: expected one of {', '.join(ARCHS)}")
    for name in ("steps", "batch_size", "save_interval"):
        check.need(name, lambda v: v >= 1, ">= 1")
    check.need("lr", lambda v: v > 0, "> 0")
    check.need("lr_drop_at", lambda v: 0 < v <= 1, "in (0, 1]")
    check.rule(check_precision, cfg.precision, PRECISIONS)
    for name in ("weight_decay", "seed"):
        check.need(name, lambda v: v >= 0, ">= 0")
    check.add(cfg.encoder_checkpoint and cfg.arch != "hovernet", "--encoder_checkpoint is only used with --arch hovernet")
    check.done()
    if cfg.arch in ARCHS:
        check_input_size(cfg.net_config(2), cfg.crop_size, "--crop_size")


def resolve_table(cfg) -> ClassTable:
    return resolve_class_table(cfg.dataset_mode, cfg.class_table or None, cfg.num_classes)


@dataclasses.dataclass
class Pools:
    """Training images in memory: ``real`` (merged classes) and ``synthetic`` (may be empty)."""

    table: ClassTable
    real: List[LabeledImage]
    synthetic: List[LabeledImage]


def read_pools(cfg: HoverTrainConfig) -> Pools:
    """Read and validate every source of ``cfg`` (all problems of a source reported together)."""
    table = resolve_table(cfg)
    real = ddata.read_real(ddata.split_list(cfg.data_dir), table, cfg.split, cfg.crop_size, cfg.progress,
                           dataset_mode=cfg.dataset_mode)
    synth = ddata.read_synthetic(ddata.split_list(cfg.synthetic_dirs), table, cfg.crop_size, cfg.progress)
    return Pools(table, real, synth)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DiffMixError(f"--device {device!r}: not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffMixError(f"--device {device}: CUDA is not available")
    return dev


def segmenter_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The segmenter's autocast dtype under the shared policy (:mod:`guided_diffusion.infra.precision`;
    its half precision is bf16): bfloat16, or None for plain fp32."""
    return autocast_dtype(resolve_precision(precision, device, "bf16", PRECISIONS))


def forward(model: torch.nn.Module, x: torch.Tensor, dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    """Model outputs as float32, under bf16 autocast when ``dtype`` is given."""
    if dtype is None:
        out = model(x)
    else:
        with torch.autocast(device_type=x.device.type, dtype=dtype):
            out = model(x)
    return {k: v.float() for k, v in out.items()}


def _check_run_folder(cfg: HoverTrainConfig) -> Optional[dict]:
    """The completion record of a finished run in ``cfg.out_dir`` (None if unfinished or new).

    Raises if the folder holds a run with other settings.
    """
    path = fileio.join(cfg.out_dir, CONFIG)
    if not fileio.exists(path):
        if fileio.exists(fileio.join(cfg.out_dir, STATE)):
            raise DiffMixError(f"{cfg.out_dir}: holds {STATE} but no {CONFIG}; use an empty --out_dir")
        return None
    saved = fileio.read_json(path).get("settings", {})
    mine = cfg.identity()
    changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if changed:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in changed[:4])
        raise DiffMixError(f"{cfg.out_dir}: holds a run with other settings ({detail}); use another --out_dir")
    record = fileio.join(cfg.out_dir, RECORD)
    return fileio.read_json(record) if fileio.exists(record) else None


def _lr_at(cfg: HoverTrainConfig, step: int) -> float:
    return cfg.lr * (0.1 if step >= int(round(cfg.lr_drop_at * cfg.steps)) else 1.0)


def _write_progress(out_dir: str, rows: List[dict]) -> None:
    buf = io.StringIO()
    buf.write("step,loss,lr,synthetic,seconds\n")
    for r in rows:
        buf.write(f"{r['step']},{r['loss']:.6f},{r['lr']:.3g},{r['synthetic']},{r['seconds']:.2f}\n")
    fileio.write_bytes(fileio.join(out_dir, PROGRESS), buf.getvalue().encode())


def _save_state(out_dir: str, model, opt, step: int, rows: List[dict]) -> None:
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "progress": rows}
    with fileio.atomic_open(fileio.join(out_dir, STATE), "wb") as f:
        torch.save(state, f)
    _write_progress(out_dir, rows)


def train_segmenter(cfg: HoverTrainConfig, pools: Optional[Pools] = None) -> dict:
    """Train (or resume, or find finished) the run of ``cfg``; returns its completion record.

    Every source is read and validated before anything is written; ``pools`` lets a caller that
    trains several runs on the same data read it once. A second process on the same run folder is
    refused while the first holds its lock (``<out_dir>/.lock``).
    """
    validate(cfg)
    runlock.check_available(cfg.out_dir, flag="--out_dir")  # writable and free, before the sources are read
    finished = _check_run_folder(cfg)
    if finished is not None:
        return finished
    pools = pools or read_pools(cfg)
    lock = runlock.acquire(cfg.out_dir, "downstream training", flag="--out_dir")  # one writer per run folder
    try:
        return _train(cfg, pools)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: HoverTrainConfig, pools: Pools) -> dict:
    """The training loop of :func:`train` (lock held, sources read)."""
    from monai.apps.pathology.losses import HoVerNetLoss
    from tqdm.auto import tqdm

    table = pools.table
    fraction = ddata.resolve_fraction(cfg.synthetic_fraction, len(pools.real), len(pools.synthetic))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    dtype = segmenter_dtype(cfg.precision, device)
    net_cfg = cfg.net_config(table.num_classes)
    batches = ddata.MixedBatches(
        real=TrainCropDataset(pools.real, cfg.crop_size),
        synthetic=TrainCropDataset(pools.synthetic, cfg.crop_size) if pools.synthetic else None,
        batch_size=cfg.batch_size, fraction=fraction, seed=cfg.seed, num_classes=table.num_classes,
    )

    torch.manual_seed(cfg.seed)
    model = build_network(net_cfg)
    if cfg.encoder_checkpoint:
        load_encoder(model, cfg.encoder_checkpoint)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, rows = 0, []
    state_path = fileio.join(cfg.out_dir, STATE)
    if fileio.exists(state_path):
        state = load_torch_file(state_path, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, rows = int(state["step"]), list(state["progress"])
    else:
        fileio.makedirs(cfg.out_dir)
        fileio.write_json(fileio.join(cfg.out_dir, CONFIG), {
            "settings": cfg.identity(), "net": net_cfg.to_dict(), "class_table": table.to_json(),
            "synthetic_fraction_used": fraction, "parameters": parameter_count(model),
            "sources": {"real": ddata.pool_summary(pools.real, table.num_classes),
                        "synthetic": ddata.pool_summary(pools.synthetic, table.num_classes)},
        })

    loss_fn = HoVerNetLoss()
    model.train()
    t0 = time.perf_counter() - (rows[-1]["seconds"] if rows else 0.0)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.arch} seed {cfg.seed}", unit="step",
               disable=not cfg.progress, dynamic_ncols=True)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, step)
        x, targets, n_syn = batches.batch(step)
        x = x.to(device, non_blocking=True)
        targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
        loss = loss_fn(forward(model, x, dtype), targets)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_value = loss.detach().item()
        rows.append({"step": step, "loss": loss_value, "lr": _lr_at(cfg, step - 1), "synthetic": n_syn,
                     "seconds": time.perf_counter() - t0})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if step % cfg.save_interval == 0 or step == cfg.steps:
            _save_state(cfg.out_dir, model, opt, step, rows)
    bar.close()
    save_state_dict(fileio.join(cfg.out_dir, MODEL), model.state_dict())
    tail = rows[-max(1, len(rows) // 10):]
    record = {
        "steps": step, "seconds": rows[-1]["seconds"], "device": str(device),
        "precision": "bf16" if dtype is not None else "fp32",
        "first_loss": rows[0]["loss"], "final_loss_mean_last_10pct": sum(r["loss"] for r in tail) / len(tail),
        "synthetic_items": sum(r["synthetic"] for r in rows), "items": step * cfg.batch_size,
    }
    fileio.write_json(fileio.join(cfg.out_dir, RECORD), record)
    return record


def load_trained(run_dir: str, device: Any = "cpu") -> Tuple[torch.nn.Module, NetConfig, dict]:
    """A finished run's network (eval mode, on ``device``), its checked network settings and its
    ``config.json``.

    Raises DiffMixError naming the folder or file: no config.json or weights, another kind of model
    (an SDM folder), or a ``"net"`` entry that is missing or edited (:meth:`NetConfig.from_dict`).
    """
    cfg_path, model_path = fileio.join(run_dir, CONFIG), fileio.join(run_dir, MODEL)
    config = load_config_for_checkpoint(model_path)  # the config.json beside the weights; a non-object is refused
    if config is None:
        raise DiffMixError(f"{run_dir}: not a finished downstream run ({cfg_path} missing)")
    check_model_kind(config, run_dir, "segmenter", "--run_dir")  # before "net": an SDM folder has none
    if "net" not in config:
        raise DiffMixError(f'{cfg_path}: "net": missing (the network settings hovernet_train.py writes)')
    net = NetConfig.from_dict(config["net"], cfg_path)
    if not fileio.exists(model_path):
        raise DiffMixError(f"{run_dir}: not a finished downstream run ({model_path} missing)")
    model = build_network(net)
    weights = load_state_dict(model_path)
    mismatch = mismatch_message(model_path, weights, model.state_dict(), target=f"the network of {cfg_path}")
    if mismatch:  # one line with the counts and first keys (torch's own message spans many lines)
        raise DiffMixError(mismatch)
    model.load_state_dict(weights)
    return model.to(device).eval(), net, config


def load_segmenter(run_dir: str, device: str = "auto", precision: str = "auto", table=None):
    """A finished run's network ready for inference: ``(model, net, device, dtype)`` (``dtype``: the
    autocast dtype of ``precision`` on that device, or None). With ``table``, its classes are checked."""
    dev = resolve_device(device)
    model, net, _ = load_trained(run_dir, dev)
    if table is not None:
        check_net_classes(net, table, run_dir)
    return model, net, dev, segmenter_dtype(precision, dev)
