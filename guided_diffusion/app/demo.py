"""DiffMix end to end: real (or toy) data -> statistics -> GradMix -> an SDM (the shipped pretrained one,
or trained here) -> synthesis -> HoVer-Net patches -> label fidelity -> a report.

This is the README's main command (``make demo`` runs ``scripts/demo.py``). Every stage calls the
same package functions as the individual scripts. Presets:

* ``demo`` (default): the 8 real CoNSeP patches shipped in ``datasets/sample/`` and the small SDM
  trained by us on real CoNSeP (``models/consep256_cpu/``, 128 px), synthesising with the recommended
  settings for rare nuclei (SDEdit from GradMix's composed images of the balancing maps at 55 %,
  DPM-Solver++ with 10 model calls), and the label fidelity of the result with the shipped nucleus
  classifier (``models/consep256_nuclei/``); about a minute on 2 CPU cores.
  ``--retrain True`` trains that SDM from scratch instead, exactly as its ``training.json`` records
  (every stage, about 3 h on one CPU core; pass ``--data_dir`` to train on more than the sample).
* ``quick``: procedural toy tiles, a tiny SDM trained for a handful of steps (the end-to-end test).
* ``paper``: the DiffMix settings (256 px, 256 channels, batch 16, lr 1e-4 then 2e-5 with drop
  rate 0.2, DDIM 100 with ddim_percent 55 and s 1.5) for a GPU and real CoNSeP/GLySAC paths.

Outputs (all inside ``out_dir``): ``toy_data/`` (quick preset), ``stats/``, ``gradmix/``, ``train/`` +
``finetune/`` (+ ``stage3/``...) (when training), ``synthesis/``, ``report.md`` + ``report/*.png`` and ``demo.json``
(settings, seed, timings, output paths). Re-running resumes: finished stages are kept.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..data.classes import resolve_class_table
from ..data.layouts import GradMixLayout, SynthesisLayout
from ..data.readers import read_dataset
from ..data.stats import dataset_statistics, write_statistics
from ..gradmix.settings import GradMixConfig
from ..infra import fileio
from ..infra.config import ModelConfig, check_model_kind, load_config_for_checkpoint
from ..infra.errors import DiffMixError
from ..script_util import create_model_and_diffusion
from ..synthesis import SampleConfig, run_synthesis
from ..train_util import TrainConfig, find_latest_checkpoint, train
from .demo_report import write_report
from .demo_settings import DemoConfig
from .pretrained import RECIPE_OPTIONS, describe

def _model_config(cfg: DemoConfig, num_classes: int):

    return ModelConfig(
        image_size=cfg.image_size, num_classes=num_classes, num_channels=cfg.num_channels,
        num_res_blocks=cfg.num_res_blocks, num_heads=4, num_head_channels=cfg.num_head_channels,
        attention_resolutions=cfg.attention_resolutions, channel_mult=cfg.channel_mult, dropout=0.0, class_cond=True,
        use_checkpoint=cfg.preset == "paper", use_scale_shift_norm=True, resblock_updown=True,
        use_fp16=False, no_instance=False, learn_sigma=True, diffusion_steps=1000, noise_schedule="linear",
        spade_hidden=cfg.spade_hidden,
    )


def _check_model_settings(model_cfg) -> None:
    """Build the SDM of ``model_cfg`` on torch's meta device (no memory, no weights): its own checks
    (channel multipliers, attention resolutions, head widths) run before anything is written."""
    import torch

    with torch.device("meta"):
        create_model_and_diffusion(**model_cfg.to_dict())


@dataclass
class _Stage:
    """One training stage (pre-training, or classifier-free fine-tuning from the previous stage, or a
    further stage continuing it)."""

    name: str
    folder: str
    lr: float
    drop_rate: float
    max_steps: int  # total steps at the end of the stage, counting earlier stages
    batch_size: int
    ema_rate: str
    options: Dict[str, float] = dataclasses.field(default_factory=dict)  # pretrained.RECIPE_OPTIONS set
    # Start from the previous stage's EMA weights with a fresh optimizer (a stage that continued an
    # exported model, training.json "continued_from"), not from its checkpoint.
    from_weights: bool = False


_STAGE_NAMES = (("train", "SDM training"), ("finetune", "classifier-free fine-tuning"))


def _stage_folder_and_name(out: str, k: int) -> tuple:
    folder, name = _STAGE_NAMES[k] if k < len(_STAGE_NAMES) else (f"stage{k + 1}", f"training stage {k + 1}")
    return fileio.join(out, folder), name


def _training_plan(cfg: DemoConfig, out: str, num_classes: int):
    """(model config, stages): from the preset's fields, or -- with ``--retrain`` of a shipped model --
    from the model's own ``config.json`` and ``training.json``, so a retrain repeats its recipe
    (every stage, with its recipe options)."""
    if cfg.model_path:
        config, record = load_config_for_checkpoint(cfg.model_path), describe(cfg.model_path)
        if config is None or record is None:
            raise DiffMixError(f"{cfg.model_path}: --retrain needs config.json and training.json beside the model")
        model_cfg = ModelConfig.from_dict(config, source=cfg.model_path)
        continued_at = record.get("continued_from", {}).get("step")
        stages: List[_Stage] = []
        for k, st in enumerate(record["stages"]):
            s = st["settings"]
            folder, name = _stage_folder_and_name(out, k)
            stages.append(_Stage(
                name, folder, float(s["lr"]), float(s["drop_rate"]), int(st["final_step"]), int(s["batch_size"]),
                str(s["ema_rate"]), {o: s[o] for o in RECIPE_OPTIONS if s.get(o)},
                from_weights=bool(stages) and stages[-1].max_steps == continued_at))
        return model_cfg, stages
    total = cfg.train_steps + cfg.finetune_steps
    (f0, n0), (f1, n1) = _stage_folder_and_name(out, 0), _stage_folder_and_name(out, 1)
    return _model_config(cfg, num_classes), [
        _Stage(n0, f0, cfg.lr, 0.0, cfg.train_steps, cfg.batch_size, cfg.ema_rate),
        _Stage(n1, f1, cfg.finetune_lr, cfg.drop_rate, total, cfg.batch_size, cfg.ema_rate),
    ]


def _train_stages(stages: List[_Stage], model_cfg, cfg: DemoConfig, data_dir: str, runner: "_Stages",
                  precision: str) -> str:
    """Run the stages (each resumes itself); returns the checkpoint to sample from.

    An EMA shorter-lived than its run (horizon 1 / (1 - rate) at most half the steps) is sampled from;
    otherwise the EMA still mostly holds the initial weights and the raw weights are used.
    """
    previous: Optional[_Stage] = None
    for stage in stages:
        start = ""
        if previous is not None:
            prefix = _ema_prefix(previous.ema_rate) if stage.from_weights else "model"
            start = _final_file(previous.folder, prefix, previous.max_steps)
        resume = "latest" if (not start or find_latest_checkpoint(stage.folder)) else start
        runner.run(stage.name, train, model_cfg, TrainConfig(
            data_dir=data_dir, dataset_mode=cfg.dataset_mode, batch_size=stage.batch_size, ema_rate=stage.ema_rate,
            log_interval=cfg.log_interval, seed=cfg.seed, progress=cfg.progress, keep_checkpoints=1,
            precision=precision, lr=stage.lr, drop_rate=stage.drop_rate, max_steps=stage.max_steps,
            save_interval=stage.max_steps, log_dir=stage.folder, resume_checkpoint=resume, **stage.options,
        ))
        previous = stage
    last = stages[-1]
    rate = float(last.ema_rate.split(",")[0])
    prefix = _ema_prefix(last.ema_rate) if 2.0 / (1.0 - rate) <= last.max_steps else "model"
    return _final_file(last.folder, prefix, last.max_steps)


def _ema_prefix(ema_rate: str) -> str:
    """The file-name prefix of a run's first EMA (``ema_0.995_``)."""
    return f"ema_{float(ema_rate.split(',')[0])}_"


def _pick_maps(gradmix_dir: str, limit: int, kinds: Sequence[str] = ("balance", "enlarge")) -> List[str]:
    """GradMix maps to synthesise for: the balancing maps that placed the most rare nuclei and the
    enlarging maps that moved the most, alternating (all maps of ``kinds`` when ``limit`` is 0)."""
    rec_dir = GradMixLayout(gradmix_dir).folder(GradMixLayout.RECORDS)
    ranked: Dict[str, List[tuple]] = {kind: [] for kind in kinds}
    for name in sorted(fileio.listdir(rec_dir)):
        if name.endswith(".json"):
            rec = fileio.read_json(fileio.join(rec_dir, name))
            if rec["kind"] in ranked:
                summary = rec.get("summary", {})
                ranked[rec["kind"]].append((-summary.get("replaced", summary.get("moved", 0)), rec["name"]))
    queues = [[n for _, n in sorted(v)] for v in ranked.values()]
    if not limit:
        return [n for q in queues for n in q]
    picked: List[str] = []
    while len(picked) < limit and any(queues):
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    return picked


class _Stages:
    """Runs named stages, timing each and recording what it wrote."""

    def __init__(self) -> None:
        self.timings: Dict[str, float] = {}
        self.outputs: Dict[str, str] = {}

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n== {name} ==", flush=True)
        t0 = time.time()
        result = fn(*args, **kwargs)
        self.timings[name] = round(time.time() - t0, 2)
        print(f"== {name}: {self.timings[name]:.1f} s", flush=True)
        return result


def run_demo(cfg: DemoConfig) -> Dict[str, Any]:
    """Run the whole pipeline; returns the run record (also saved as ``<out_dir>/demo.json``)."""
    # lazy: data.toy and gradmix.pipeline import scipy, the evidence torch and MONAI; demo.py --help skips them
    from ..data.toy import ToyConfig, make_toy_dataset
    from ..downstream.nuclei.classifier import check_classifier_folder
    from ..downstream.nuclei.evidence import run_fidelity
    from ..gradmix.pipeline import run_gradmix

    cfg = cfg.resolved()
    out = cfg.out_dir
    stages = _Stages()
    t_all = time.time()

    # Everything that can be wrong with the inputs is checked before anything is written.
    pretrained = bool(cfg.model_path) and not cfg.retrain
    if cfg.data_dir and not fileio.exists(cfg.data_dir):
        raise DiffMixError(f"{cfg.data_dir}: --data_dir not found")
    if cfg.model_path:
        if not fileio.exists(cfg.model_path):
            raise DiffMixError(f"{cfg.model_path}: pretrained model not found (pass --model_path, or --model_path '' to train one)")
        saved = load_config_for_checkpoint(cfg.model_path)
        if saved is None:
            raise DiffMixError(f"{cfg.model_path}: no config.json beside the model")
        check_model_kind(saved, cfg.model_path, "sdm", "--model_path")
    table = resolve_class_table(cfg.dataset_mode, None, cfg.num_classes or None)
    if cfg.classifier:
        check_classifier_folder(cfg.classifier, table.num_classes - 1, "--classifier")
    # The fixed CoNSeP/GLySAC tables are looked up by mode; only custom data passes its table on.
    table_arg = table if cfg.dataset_mode == "custom" else None
    if cfg.model_path:
        image_size = int(ModelConfig.from_dict(saved, source=cfg.model_path).image_size)
    else:
        image_size = int(cfg.image_size)
        _check_model_settings(_model_config(cfg, table.num_classes))
    if not cfg.data_dir and cfg.toy_size < image_size:
        # Training and synthesis crop image_size px from every tile (the data check below would fail).
        raise DiffMixError(f"--toy_size {cfg.toy_size}: must be at least the SDM's image size {image_size} px")

    def check_data(folder: str) -> None:
        # Every file is checked (pairing, keys, sizes >= the crop, class table) before a stage writes.
        stages.run("data check", read_dataset, folder, table, "Train", min_size=image_size, progress=False,
                   dataset_mode=cfg.dataset_mode)

    if cfg.data_dir:
        check_data(cfg.data_dir)
    fileio.check_output_dir(out, "--out_dir")
    fileio.makedirs(out)

    # 1. Data: the real dataset, or the procedural toy dataset in the CoNSeP layout.
    if cfg.data_dir:
        data_dir = cfg.data_dir
    else:
        data_dir = fileio.join(out, "toy_data")
        if not fileio.exists(fileio.join(data_dir, "toy_dataset.json")):
            if os.path.isdir(data_dir):
                shutil.rmtree(data_dir)  # an interrupted toy stage of this run folder: start it again
            toy_cfg = ToyConfig()
            if cfg.toy_rare_share:
                rest = np.asarray(toy_cfg.class_probs[1:], np.float64)
                rest = rest / rest.sum() * (1 - cfg.toy_rare_share)
                toy_cfg = dataclasses.replace(toy_cfg, class_probs=(cfg.toy_rare_share, *rest.tolist()))
            stages.run(
                "toy dataset", make_toy_dataset, data_dir, num_train=cfg.toy_train, num_test=cfg.toy_test,
                size=cfg.toy_size, seed=cfg.seed, config=toy_cfg, progress=cfg.progress,
            )
        check_data(data_dir)
    stages.outputs["dataset"] = data_dir

    # 2. Class statistics of the real labels.
    stats_dir = fileio.join(out, "stats")
    before = stages.run(
        "class statistics", dataset_statistics, data_dir=data_dir, dataset_mode=cfg.dataset_mode,
        class_table=table_arg, progress=cfg.progress,
    )
    write_statistics(before, stats_dir, prefix="real_train", title="real training labels")
    stages.outputs["statistics"] = stats_dir

    # 3. GradMix: balancing and enlarging virtual label maps.
    gradmix_dir = fileio.join(out, "gradmix")
    gm = stages.run(
        "GradMix", run_gradmix, GradMixConfig(
            data_dir=data_dir, dataset_mode=cfg.dataset_mode, out_dir=gradmix_dir, num_classes=cfg.num_classes or None,
            num_balance=cfg.num_balance, num_enlarge=cfg.num_enlarge, margin=cfg.margin, seed=cfg.seed,
            write_images=cfg.start == "gradmix", progress=cfg.progress),
    )
    stages.outputs["gradmix"] = gradmix_dir

    # 4. The SDM: the shipped pretrained model, or pre-training + classifier-free fine-tuning here.
    precision = cfg.precision  # "auto" is resolved by training and sampling (guided_diffusion/infra/precision.py)
    training: List[_Stage] = []
    if pretrained:
        checkpoint = cfg.model_path
        model_cfg = ModelConfig.from_dict(load_config_for_checkpoint(checkpoint), source=checkpoint)
    else:
        model_cfg, training = _training_plan(cfg, out, table.num_classes)
        checkpoint = _train_stages(training, model_cfg, cfg, data_dir, stages, precision)
    stages.outputs["checkpoint"] = checkpoint

    # 5. Synthesis from the virtual maps.
    # GradMix composes images for its balancing maps only: a GradMix start synthesises those.
    map_names = _pick_maps(gradmix_dir, cfg.max_synthesis_maps, ("balance",) if cfg.start == "gradmix" else
                           ("balance", "enlarge"))
    synth_cfg = SampleConfig(
        data_dir=data_dir, dataset_mode=cfg.dataset_mode, label_dir=fileio.join(gradmix_dir, "Labels"),
        model_path=checkpoint, results_path=out, run_name="synthesis", s=cfg.s, ddim_percent=cfg.ddim_percent,
        start=cfg.start, sampler=cfg.sampler, solver_steps=cfg.solver_steps, batch_size=cfg.sample_batch_size, seed=cfg.seed, progress=cfg.progress, figure_rows=6, precision=precision,
        idx_img=",".join(map_names), class_table="",
    )
    model_dict = model_cfg.to_dict()
    model_dict["timestep_respacing"] = cfg.timestep_respacing
    summary = stages.run("synthesis", run_synthesis, synth_cfg, model_dict,
                         model_config_source=checkpoint if pretrained else "demo settings")
    stages.outputs["synthesis"] = summary.out_dir
    stages.outputs["hovernet_patches"] = SynthesisLayout(summary.out_dir).folder(SynthesisLayout.PATCHES)

    # 6. Do the synthesised nuclei read as their class? (label fidelity with the shipped classifier)
    fidelity = None
    if cfg.classifier:
        fidelity = stages.run("label fidelity", run_fidelity, summary.out_dir, cfg.classifier, table, n_boot=200,
                              seed=cfg.seed)
        stages.outputs["classifier"] = cfg.classifier

    # 7. Report.
    record = {
        "settings": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "model": model_cfg.to_dict(),
        "pretrained": pretrained,
        "training": [dataclasses.asdict(st) for st in training],
        "timings_s": stages.timings,
        "total_s": round(time.time() - t_all, 2),
        "outputs": stages.outputs,
        "gradmix": {
            "maps_written": len(gm["written"]),
            "maps_kept": len(gm["skipped"]),
            "counts": {k: np.asarray(v).tolist() if k in ("before", "after") else v for k, v in gm.get("counts", {}).items()},
        },
        "class_names": list(table.names),
        **({"fidelity": fidelity} if fidelity is not None else {}),
    }
    report = stages.run("report", write_report, out, record, summary, cfg.figure_dir)
    record["outputs"]["report"] = report
    record["timings_s"] = stages.timings
    record["total_s"] = round(time.time() - t_all, 2)
    fileio.write_json(fileio.join(out, "demo.json"), record)
    print(f"\nDone in {time.time() - t_all:.0f} s. Report: {report}")
    return record


def _final_file(folder: str, prefix: str, step: int) -> str:
    path = fileio.join(folder, f"{prefix}{step:06d}.pt")
    if not fileio.exists(path):
        raise DiffMixError(f"{folder}: expected checkpoint {prefix}{step:06d}.pt after training, not found")
    return path
