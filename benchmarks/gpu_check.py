"""The one prepared GPU check (issue 13 section 1): numerics, training, DDP, synthesis and HoVer-Net on CUDA.

    python benchmarks/gpu_check.py --out gpu_check_out            # on a CUDA machine, < 8 min on one H100/H200
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke   # the same code paths, tiny configs, CPU

Sections (each time-boxed and failure-isolated: on CUDA each runs in its own process with a hard
timeout, writes its measurements as it goes, and a failing, crashing or overrunning section records
its error while the others still run):

``numerics``    U-Net forward and one guided DDIM step (s = 1.5, fast path) of a small config on the
                device against the CPU float32 result, in fp32 (TF32 off), fp32 with the default
                TF32 convolutions (CUDA only) and bf16 autocast. Error = max |device - CPU| / max |CPU|;
                tolerances in ``TOLERANCES``.
``train``       paper config (256 px, 256 channels, batch 16, gradient checkpointing) through
                ``TrainLoop.run_step``: steps/s, peak memory and the loss in bf16 and in fp16 with the
                loss scaler; then one checkpoint save + resume of the fp16 run (step and weights restored
                bit for bit, one more step finite).
``torchrun``    ``torchrun --standalone --nproc_per_node <all GPUs>`` of ``scripts/image_train.py`` on a
                toy dataset: a few steps and a checkpoint; the backend (NCCL on CUDA) is read back from
                the run's log.
``synthesis``   paper settings (DDIM 100, ddim_percent 55, s 1.5, bf16) at the paper model size:
                patches/s of plain (two full forwards), fast, fast with both guidance branches batched,
                fast + ``torch.compile``; largest difference of each from plain.
``hovernet``    the downstream training step: MONAI ``HoVerNet(mode="fast")`` + ``HoVerNetLoss`` on a
                toy batch, steps/s and peak memory in fp32 and bf16. ``--hovernet_step module:function``
                swaps in another step factory with the signature of :func:`hovernet_monai_step`.

Outputs in ``--out``: ``gpu_check.json`` (machine, every measurement, statuses), ``gpu_check.md`` (a
Markdown table for benchmarks/RESULTS.md) and ``sections/<name>.json``. Large temporaries
(checkpoints, toy datasets) live in the system temporary folder, never under ``--out``.
Exit status 0 when every section passed, 1 otherwise.

``--cpu-smoke`` runs every section in this process with tiny configs (gloo instead of NCCL, bf16
autocast on the CPU, ddim10 so 5 guided steps, a stand-in network in place of the 256 px HoVer-Net)
so that the script is exercised by the test suite between GPU runs. Skipped there, with the reason
recorded: fp16 training (CPU fp16 autocast takes minutes per step) and ``torch.compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from guided_diffusion.infra import fileio  # noqa: E402
from guided_diffusion.infra.errors import DiffMixError, run_cli  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)

SECTIONS = ("numerics", "train", "torchrun", "synthesis", "hovernet")

# max |device - CPU fp32| / max |CPU fp32| allowed per precision. fp32 with TF32 off differs only by
# kernel order and fused ops (~1e-6); TF32 keeps 10 mantissa bits and bf16 7 (2^-8 ~ 4e-3 per
# rounding), accumulated over ~40 layers of random weights.
TOLERANCES = {"fp32": 1e-4, "fp32-tf32": 1e-2, "bf16": 5e-2}

# The DiffMix SDM at the paper's CoNSeP settings (see ModelConfig's docstring).
PAPER_MODEL = dict(image_size=256, num_channels=256, num_res_blocks=2, num_head_channels=64,
                   attention_resolutions="32,16,8", channel_mult="", learn_sigma=True, class_cond=True,
                   num_classes=5, resblock_updown=True, use_scale_shift_norm=True)
TINY_MODEL = dict(image_size=32, num_channels=32, num_res_blocks=1, num_head_channels=16,
                  attention_resolutions="16", channel_mult="1,2", learn_sigma=True, class_cond=True,
                  num_classes=5, resblock_updown=True, use_scale_shift_norm=True)
SMALL_MODEL = dict(TINY_MODEL, image_size=64, num_channels=64, channel_mult="1,2,2", attention_resolutions="32,16",
                   num_head_channels=32)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and time boxes of one run (:data:`GPU_PLAN` or :data:`SMOKE_PLAN`)."""

    numerics_model: dict
    numerics_batch: int
    train_model: dict
    train_batch: int
    train_warmup: int
    train_steps: int
    train_precisions: tuple
    ddp_model: dict
    ddp_batch: int
    ddp_steps: int
    synth_model: dict
    synth_respacing: str
    synth_batch: int
    hovernet_batch: int
    hovernet_warmup: int
    hovernet_steps: int
    hovernet_stand_in: bool
    budgets_s: Dict[str, float]  # per section; the whole GPU plan stays under 8 minutes


GPU_PLAN = Plan(
    numerics_model=SMALL_MODEL, numerics_batch=2,
    train_model=dict(PAPER_MODEL, use_checkpoint=True), train_batch=16, train_warmup=2, train_steps=6,
    train_precisions=("bf16", "fp16"),
    ddp_model=SMALL_MODEL, ddp_batch=4, ddp_steps=4,
    synth_model=PAPER_MODEL, synth_respacing="ddim100", synth_batch=8,
    hovernet_batch=16, hovernet_warmup=2, hovernet_steps=10, hovernet_stand_in=False,
    budgets_s={"numerics": 40, "train": 140, "torchrun": 60, "synthesis": 150, "hovernet": 40},
)
SMOKE_PLAN = Plan(
    numerics_model=TINY_MODEL, numerics_batch=1,
    train_model=dict(TINY_MODEL, use_checkpoint=True), train_batch=2, train_warmup=0, train_steps=1,
    train_precisions=("bf16",),  # fp16 autocast on the CPU runs reference kernels: minutes per step
    ddp_model=TINY_MODEL, ddp_batch=2, ddp_steps=2,
    synth_model=TINY_MODEL, synth_respacing="ddim10", synth_batch=1,
    hovernet_batch=1, hovernet_warmup=1, hovernet_steps=1, hovernet_stand_in=True,
    budgets_s={"numerics": 60, "train": 60, "torchrun": 120, "synthesis": 150, "hovernet": 60},  # bf16 on a 2-core CPU: ~30 s a plain batch,
)
GUIDANCE = 1.5
DDIM_PERCENT = 55.0
SYNTH_PRECISION = "bf16"


# --------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------


class Section:
    """Measurements of one section, written to ``path`` after every change (so a killed section's
    finished measurements survive). ``rows`` hold ``{name, value, unit, note, ok}``; ``ok`` is None
    for plain measurements and a bool for checks."""

    def __init__(self, name: str, path: str, budget_s: float):
        self.name, self.path = name, path
        self.t0 = time.monotonic()
        self.cpu0 = _cpu_seconds()
        self.deadline = self.t0 + budget_s
        self.data: Dict[str, Any] = {"name": name, "status": "running", "budget_s": budget_s, "rows": []}
        self.flush()

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def put(self, name: str, value: Any, unit: str = "", note: str = "", ok: Optional[bool] = None) -> None:
        if isinstance(value, float):
            value = float(f"{value:.4g}") if math.isfinite(value) else str(value)
        self.data["rows"].append({"name": name, "value": value, "unit": unit, "note": note, "ok": ok})
        self.flush()

    def check(self, name: str, value: float, limit: float, unit: str = "", note: str = "") -> None:
        """A measurement that must be finite and <= ``limit``."""
        ok = bool(math.isfinite(value) and value <= limit)
        self.put(name, value, unit, f"<= {limit:g}" + (f"; {note}" if note else ""), ok)

    def finish(self, status: str, error: str = "") -> None:
        self.data["status"] = status
        self.data["seconds"] = round(time.monotonic() - self.t0, 1)
        self.data["cpu_seconds"] = round(_cpu_seconds() - self.cpu0, 1)
        if error:
            self.data["error"] = error
        self.flush()

    def flush(self) -> None:
        fileio.write_json(self.path, self.data)


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class TimeBox(Exception):
    """Raised inside a section when its time box does not leave room for the next measurement."""


def need(sec: Section, seconds: float, what: str) -> None:
    if sec.time_left() < seconds:
        raise TimeBox(f"time box: {sec.time_left():.0f} s left, {what} needs about {seconds:.0f} s")


# --------------------------------------------------------------------------------------------
# Shared inputs
# --------------------------------------------------------------------------------------------


def toy_batch(n: int, size: int, num_classes: int = 5, seed: int = 0):
    """n toy H&E tiles: ``(images uint8 [n,S,S,3], inst int32 [n,S,S], merged types int32 [n,S,S])``."""
    import numpy as np

    from guided_diffusion.data import CONSEP, make_toy_tile

    if num_classes != CONSEP.num_classes:
        raise ValueError(f"toy tiles carry CoNSeP classes ({CONSEP.num_classes}), not {num_classes}")
    tiles = [make_toy_tile(size, seed + k) for k in range(n)]
    return (np.stack([t[0] for t in tiles]), np.stack([t[1] for t in tiles]),
            np.stack([CONSEP.merge(t[2]) for t in tiles]))


def sdm_inputs(n: int, size: int, device, seed: int = 0):
    """``(y float [n, 6, S, S] condition, reference float [n, 3, S, S] in [-1, 1])`` from toy tiles."""
    from guided_diffusion.data import build_condition
    from guided_diffusion.synthesis import image_to_tensor

    images, inst, types = toy_batch(n, size, seed=seed)
    return build_condition(types, inst, 5).to(device), image_to_tensor(list(images)).to(device)


def build_sdm(cfg: dict, device, seed: int = 0, perturb: bool = True):
    """The SDM U-Net + diffusion of ``cfg`` built directly on ``device`` (a 650 M-parameter model
    initialises in seconds on a GPU), weights perturbed unless ``perturb`` is False."""
    import torch

    from guided_diffusion.infra.config import ModelConfig
    from guided_diffusion.script_util import create_model_and_diffusion

    torch.manual_seed(seed)
    with torch.device(device):
        model, diffusion = create_model_and_diffusion(**ModelConfig(**cfg).to_dict())
    if perturb:
        common.perturb_weights(model, seed=seed)
    return model, diffusion


def rel_err(a, ref) -> float:
    """max |a - ref| / max |ref| (both moved to the CPU in float32)."""
    a, ref = a.detach().float().cpu(), ref.detach().float().cpu()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def peak_mib(device) -> Optional[float]:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def reset_peak(device) -> None:
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 for CUDA matmuls and convolutions on/off for the block, restored after."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def section_numerics(sec: Section, plan: Plan, device) -> None:
    import torch

    from guided_diffusion import samplers as smp
    from guided_diffusion.synthesis import FastGuidedDenoiser, PlainGuidedDenoiser, autocast_context, with_autocast

    cfg = dict(plan.numerics_model, timestep_respacing="ddim100")
    model, diffusion = build_sdm(cfg, "cpu")
    model.eval()
    n, size = plan.numerics_batch, cfg["image_size"]
    y, ref_image = sdm_inputs(n, size, "cpu")
    sched = smp.as_schedule(diffusion)
    start = int(sched.num_timesteps * DDIM_PERCENT / 100) - 1  # the paper's first guided step
    x = smp.q_sample(sched, ref_image, torch.full((n,), start), torch.randn(ref_image.shape, generator=torch.Generator().manual_seed(1)))
    t = sched.model_timesteps(torch.full((n,), start))
    zeros = torch.zeros_like

    def ddim_step(denoiser, xs):
        return smp.sample_ddim(denoiser, xs, sched, [start], eta=0.0, noise_fn=zeros)

    with torch.no_grad():
        ref_out = model(x, t, y=y)
        ref_step = ddim_step(PlainGuidedDenoiser(model, y, GUIDANCE), x)
    sec.put("config", f"{size} px, {cfg['num_channels']} ch, batch {n}, t = {int(t[0])}, s = {GUIDANCE}")
    model.to(device)
    xd, td, yd = x.to(device), t.to(device), y.to(device)
    variants = ["fp32", "fp32-tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    for variant in variants:
        precision = "bf16" if variant == "bf16" else "fp32"
        with torch.no_grad(), tf32(variant == "fp32-tf32"):
            forward = with_autocast(lambda a, b: model(a, b, y=yd), precision, device)
            out = forward(xd, td)
            with autocast_context(precision, device):  # caches built as the pipeline builds them
                denoiser = FastGuidedDenoiser(model, yd, GUIDANCE)
            step = ddim_step(with_autocast(denoiser, precision, device), xd)
        sec.check(f"U-Net forward, {variant}", rel_err(out, ref_out), TOLERANCES[variant], note="rel. to CPU fp32")
        sec.check(f"guided DDIM step (fast), {variant}", rel_err(step, ref_step), TOLERANCES[variant],
                  note="rel. to CPU fp32 plain")


class _Batches:
    """An endless stream of one fixed training batch (in memory: measures the step, not the loader)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __next__(self):
        return self.x, {"y": self.y}


def _fingerprint(model):
    import torch

    return torch.stack([p.detach().double().sum() for p in model.parameters()])


def section_train(sec: Section, plan: Plan, device) -> None:
    import torch

    from guided_diffusion import logger
    from guided_diffusion import train_util as tu

    cfg = plan.train_model
    model, diffusion = build_sdm(cfg, device, perturb=False)
    n, size = plan.train_batch, cfg["image_size"]
    y, x = sdm_inputs(n, size, device)
    sec.put("config", f"{size} px, {cfg['num_channels']} ch, batch {n}, use_checkpoint "
            f"{cfg.get('use_checkpoint', False)}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params")
    with tempfile.TemporaryDirectory(prefix="gpu_check_train_") as tmp:
        logger.configure(tmp, format_strs=())
        for precision in ("bf16", "fp16"):
            if precision not in plan.train_precisions:
                sec.put(f"{precision}: training", "skipped",
                        note="CPU smoke: fp16 autocast on the CPU takes minutes per step (reference kernels)")
                continue
            # The last precision also saves and resumes (with fp16 that includes the loss scaler's state).
            last = precision == plan.train_precisions[-1]
            need(sec, 10, f"{precision} training")
            folder = os.path.join(tmp, precision)
            loop = tu.TrainLoop(model=model, diffusion=diffusion, data=_Batches(x, y), batch_size=n, lr=1e-5,
                                ema_rate="0.9999", log_dir=folder, progress=False, precision=precision,
                                save_interval=10**9, log_interval=10**9)
            reset_peak(device)
            t0 = time.perf_counter()
            for _ in range(plan.train_warmup):
                loop.run_step(x, {"y": y})
            common.sync(device)
            warm = time.perf_counter() - t0
            per_step = warm / max(1, plan.train_warmup)
            done, t0 = 0, time.perf_counter()
            reserve = 40 if last else 60  # for the save/resume, or for the next precision and it
            while done < plan.train_steps and (done == 0 or sec.time_left() > per_step * 1.5 + reserve):
                loop.run_step(x, {"y": y})
                done += 1
            common.sync(device)
            elapsed = time.perf_counter() - t0
            kvs = logger.dumpkvs()
            loss = float(kvs.get("loss", float("nan")))
            sec.put(f"{precision}: steps/s", done / elapsed, "steps/s", f"{done} steps after {plan.train_warmup} warm-up")
            mem = peak_mib(device)
            if mem is not None:
                sec.put(f"{precision}: peak memory", mem / 1024, "GiB", "torch.cuda.max_memory_allocated")
            sec.check(f"{precision}: |loss| finite", abs(loss), 1e6, note=f"mean loss {loss:.4g}")
            if precision == "fp16":
                sec.put("fp16: loss scale", kvs.get("loss_scale", float("nan")), "",
                        f"skipped-step share {kvs.get('skipped_steps', float('nan')):.2f} (the initial 2^20 "
                        "scale halves at each overflow, that step skipped: expected in the first steps)")
            if last:
                _save_and_resume(sec, loop, model, diffusion, x, y, folder, precision, device)
            del loop
            reset_peak(device)
        logger.close()


def _save_and_resume(sec, loop, model, diffusion, x, y, folder, precision, device) -> None:
    from guided_diffusion import train_util as tu

    need(sec, 30, "checkpoint save/resume")
    saved = _fingerprint(model)
    (_, seconds) = common.timed(loop.save, device)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".pt"))
    sec.put("checkpoint save", seconds, "s", f"{size / 2**30:.2f} GiB (model, EMA, optimizer, state)")
    loop.run_step(x, {"y": y})  # move the weights on, so the resume has something to restore
    t0 = time.perf_counter()
    resumed = tu.TrainLoop(model=model, diffusion=diffusion, data=_Batches(x, y), batch_size=x.shape[0], lr=1e-5,
                           ema_rate="0.9999", log_dir=folder, progress=False, precision=precision,
                           resume_checkpoint="latest", save_interval=10**9, log_interval=10**9)
    sec.put("checkpoint resume", time.perf_counter() - t0, "s")
    same = bool((_fingerprint(model) == saved).all()) and resumed.step == loop.step - 1
    sec.put("resume restores step and weights bit for bit", same, ok=same)
    resumed.run_step(x, {"y": y})  # raises on a non-finite loss
    sec.put("step after resume finite", True, ok=True)
    del resumed


@contextlib.contextmanager
def _environ(**values: str):
    """Environment variables set for the block (the launcher's workers inherit them), then restored."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def section_torchrun(sec: Section, plan: Plan, device) -> None:
    import csv

    import torch

    from guided_diffusion.data import make_toy_dataset
    from guided_diffusion.train_util import list_complete_checkpoints

    cuda = device.type == "cuda"
    nproc = torch.cuda.device_count() if cuda else 1
    precision = "bf16" if cuda else "fp32"
    cfg = plan.ddp_model
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        data, run = os.path.join(tmp, "toy"), os.path.join(tmp, "run")
        make_toy_dataset(data, num_train=2, num_test=0, size=max(64, cfg["image_size"]), progress=False)
        flags = {**cfg, "data_dir": data, "dataset_mode": "consep", "batch_size": plan.ddp_batch,
                 "max_steps": plan.ddp_steps, "save_interval": plan.ddp_steps, "log_interval": 1,
                 "log_dir": run, "progress": False, "precision": precision}
        # The launcher runs in this process (its own interpreter would cost another torch import);
        # the workers are fresh processes, their output kept in files under tmp.
        logs = os.path.join(tmp, "torchrun_logs")
        argv = ["--standalone", f"--nproc_per_node={nproc}", "--redirects", "3", "--log-dir", logs,
                os.path.join(REPO, "scripts", "image_train.py")]
        for key, value in flags.items():
            argv += [f"--{key}", str(value)]
        from torch.distributed import run as torchrun

        t0 = time.perf_counter()
        try:
            with _environ(PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                          OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")):
                torchrun.main(argv)
        except (Exception, SystemExit) as err:  # ChildFailedError, or SystemExit from its argument parser
            import glob

            tails = [f"{os.path.relpath(f, logs)}: {_tail(open(f).read(), 800)}"
                     for f in sorted(glob.glob(os.path.join(logs, "**", "std*.log"), recursive=True)) if os.path.getsize(f)]
            raise RuntimeError(f"torchrun failed ({type(err).__name__}: {_tail(str(err), 300)}); " + " | ".join(tails)) from None
        sec.put("torchrun wall time", time.perf_counter() - t0, "s", f"{nproc} process(es), {plan.ddp_steps} steps, "
                f"{cfg['image_size']} px, batch {plan.ddp_batch} per rank, {precision}")
        log = open(os.path.join(run, "log.txt")).read()
        expected = f"({'torchrun'}, {'nccl' if cuda else 'gloo'})"
        found = expected in log
        sec.put(f"ranks formed the group over {'NCCL' if cuda else 'gloo'}", found, ok=found,
                note="from log.txt" if found else _tail(log, 300))
        with open(os.path.join(run, "progress.csv")) as f:
            rows = list(csv.DictReader(f))
        if rows and rows[-1].get("steps_per_sec"):
            sec.put("steps/s (last step)", float(rows[-1]["steps_per_sec"]), "steps/s")
        ckpts = list_complete_checkpoints(run)
        ok = ckpts == [plan.ddp_steps]
        sec.put("complete checkpoint written", str(ckpts), ok=ok)


def section_synthesis(sec: Section, plan: Plan, device) -> None:
    import torch

    from guided_diffusion import samplers as smp
    from guided_diffusion import synthesis as syn

    cfg = dict(plan.synth_model, timestep_respacing=plan.synth_respacing)
    model, diffusion = build_sdm(cfg, device)
    model.eval()
    n, size = plan.synth_batch, cfg["image_size"]
    y, ref = sdm_inputs(n, size, device)
    sched = smp.as_schedule(diffusion)
    steps = syn.start_steps(sched.num_timesteps, DDIM_PERCENT)
    sec.put("config", f"{size} px, {cfg['num_channels']} ch, batch {n}, {plan.synth_respacing}, ddim_percent "
            f"{DDIM_PERCENT:g} ({steps} steps), s {GUIDANCE}, {SYNTH_PRECISION}")

    def run(make_denoiser: Callable, num_steps: int):
        with syn.autocast_context(SYNTH_PRECISION, device):  # SPADE caches built once per batch, as the pipeline does
            denoiser = make_denoiser()
        return syn.sample_batch(syn.with_autocast(denoiser, SYNTH_PRECISION, device), sched, ref, num_steps,
                                syn.PerSampleNoise(range(n)), sampler="ddim", clip=True)

    variants: Dict[str, Callable] = {
        "plain": lambda: syn.PlainGuidedDenoiser(model, y, GUIDANCE),
        "fast": lambda: syn.FastGuidedDenoiser(model, y, GUIDANCE),
        "fast, batched guidance": lambda: syn.FastGuidedDenoiser(model, y, GUIDANCE, batched=True),
    }
    if device.type == "cuda":
        compiled = {}

        def make_compiled():
            if "fn" not in compiled:
                compiled["fn"] = syn.maybe_compiled(model, True)
            return syn.FastGuidedDenoiser(model, y, GUIDANCE, forward=compiled["fn"])

        variants["fast + torch.compile"] = make_compiled
    else:
        sec.put("fast + torch.compile", "skipped", note="CPU smoke: compiling takes minutes on the CPU; measured on CUDA")
    plain = None
    per_run = None
    for name, make in variants.items():
        need(sec, (per_run or 5) * 1.2 + (60 if "compile" in name else 0), name)
        stderr = io.StringIO()
        with torch.no_grad(), contextlib.redirect_stderr(stderr):
            graphs0 = _compiled_graphs()
            _, warm = common.timed(lambda: run(make, 1), device)  # cuDNN autotuning, compilation
            graphs1 = _compiled_graphs()
            sample, seconds = common.timed(lambda: run(make, steps), device)
            graphs2 = _compiled_graphs()
        per_run = seconds
        note = f"{seconds:.2f} s per batch of {n}; first call {warm:.1f} s"
        if "compile" in name:
            fell_back = "running eagerly" in stderr.getvalue()
            note += f"; graphs compiled: {graphs1 - graphs0} at warm-up, {graphs2 - graphs1} in the timed run"
            if fell_back:
                note += "; COMPILE FAILED, ran eagerly: " + _tail(stderr.getvalue(), 300)
        sec.put(f"{name}: patches/s", n / seconds, "patches/s", note)
        if plain is None:
            plain = (sample, seconds)
        else:
            sec.put(f"{name}: speed-up vs plain", plain[1] / seconds, "x")
            sec.put(f"{name}: max |diff| vs plain", float((sample - plain[0]).abs().max()), "",
                    "output in [-1, 1]; bf16 rounding differs between the paths")


def _compiled_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 (a diagnostic only)
        return -1


def hovernet_targets(inst, types, num_types: int, out_size: int, device):
    """HoVer-Net training targets for a batch of label maps (int [N, S, S]), centre-cropped to ``out_size``.

    Returns the dict ``HoVerNetLoss`` takes: ``nucleus_prediction`` one-hot float [N, 2, s, s],
    ``horizontal_vertical`` float [N, 2, s, s] in [-1, 1] (MONAI ``ComputeHoVerMaps``) and
    ``type_prediction`` one-hot float [N, num_types, s, s].
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from monai.transforms import ComputeHoVerMaps

    off = (inst.shape[-1] - out_size) // 2
    crop = (slice(None), slice(off, off + out_size), slice(off, off + out_size))
    inst_c, types_c = torch.as_tensor(np.asarray(inst)[crop]), torch.as_tensor(np.asarray(types)[crop]).long()
    hv = torch.stack([torch.as_tensor(ComputeHoVerMaps()(m[None])) for m in inst_c]).float()
    return {
        "nucleus_prediction": F.one_hot((inst_c > 0).long(), 2).permute(0, 3, 1, 2).float().to(device),
        "horizontal_vertical": hv.to(device),
        "type_prediction": F.one_hot(types_c, num_types).permute(0, 3, 1, 2).float().to(device),
    }


def hovernet_monai_step(device, batch_size: int, precision: str, num_types: int = 5, model=None):
    """One HoVer-Net training step on a fixed toy batch, as a callable.

    Default network: MONAI ``HoVerNet(mode="fast", out_classes=num_types)`` (input 256 px, outputs
    164 px) trained with MONAI ``HoVerNetLoss`` and Adam (lr 1e-4), the forward under autocast
    (``precision`` "fp32" or "bf16"). ``model`` replaces the network (same output dict).

    Returns ``(step, info)``: ``step()`` runs forward, loss, backward and the optimiser update and
    returns the loss (0-dim float tensor on ``device``); ``info`` is a dict describing the setup.
    Another step factory with this signature can be given as ``--hovernet_step module:function``.
    """
    import torch
    from monai.apps.pathology.losses import HoVerNetLoss
    from monai.networks.nets import HoVerNet

    from guided_diffusion.synthesis import autocast_context, image_to_tensor

    net = (model if model is not None else HoVerNet(mode="fast", out_classes=num_types)).to(device).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = HoVerNetLoss()
    images, inst, types = toy_batch(batch_size, 256)
    x = image_to_tensor(list(images)).to(device)
    with torch.no_grad():
        out_size = net.eval()(x[:1])["nucleus_prediction"].shape[-1]
    net.train()
    targets = hovernet_targets(inst, types, num_types, out_size, device)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_context(precision, torch.device(device)):
            out = net(x)
        loss = loss_fn({k: v.float() for k, v in out.items()}, targets)
        loss.backward()
        opt.step()
        return loss.detach()

    info = {"model": type(net).__name__, "params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
            "input": "256 px", "output": f"{out_size} px"}
    return step, info


def _stand_in_hovernet(num_types: int):
    """A few convolutions with HoVer-Net fast mode's interface (256 px in, 164 px out, the three
    branches): the CPU smoke run's network, since one real HoVer-Net step takes minutes on a busy CPU."""
    import torch.nn as nn

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.heads = nn.ModuleDict({"nucleus_prediction": nn.Conv2d(8, 2, 1), "horizontal_vertical": nn.Conv2d(8, 2, 1),
                                        "type_prediction": nn.Conv2d(8, num_types, 1)})

        def forward(self, x):
            h = self.body(x)[..., 46:-46, 46:-46]
            return {k: head(h) for k, head in self.heads.items()}

    return StandIn()


def section_hovernet(sec: Section, plan: Plan, device, step_factory: Optional[Callable] = None) -> None:
    import torch

    precisions = ["fp32", "bf16"]
    for precision in precisions:
        need(sec, 10, f"HoVer-Net {precision}")
        reset_peak(device)
        kwargs = {}
        if step_factory is None:
            factory = hovernet_monai_step
            if plan.hovernet_stand_in:
                kwargs["model"] = _stand_in_hovernet(5)
        else:
            factory = step_factory
        step, info = factory(device, plan.hovernet_batch, precision, 5, **kwargs)
        if precision == precisions[0]:
            sec.put("config", ", ".join(f"{k} {v}" for k, v in info.items()) + f", batch {plan.hovernet_batch}"
                    + (" (stand-in network: CPU smoke)" if plan.hovernet_stand_in and step_factory is None else ""))
        for _ in range(plan.hovernet_warmup):
            step()
        common.sync(device)
        done, t0 = 0, time.perf_counter()
        while done < plan.hovernet_steps and (done == 0 or sec.time_left() > 5):
            loss = step()
            done += 1
        common.sync(device)
        elapsed = time.perf_counter() - t0
        sec.put(f"{precision}: steps/s", done / elapsed, "steps/s", f"{done} steps after {plan.hovernet_warmup} warm-up")
        mem = peak_mib(device)
        if mem is not None:
            sec.put(f"{precision}: peak memory", mem / 1024, "GiB")
        sec.check(f"{precision}: |loss| finite", abs(float(loss)), 1e6, note=f"loss {float(loss):.4g}")
        del step
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Running sections
# --------------------------------------------------------------------------------------------


def _tail(text: str, n: int = 1500) -> str:
    text = (text or "").strip()
    return text if len(text) <= n else "..." + text[-n:]


def _device(smoke: bool):
    import torch

    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DiffMixError("no CUDA device: run on a GPU machine, or pass --cpu-smoke for the CPU smoke run")
    return torch.device("cuda", 0)


def execute(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Run one section in this process; every exception is caught and recorded."""
    import torch

    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny configs; on a shared 2-core machine threads only wait on each other
    sec = Section(name, os.path.join(args.out, "sections", f"{name}.json"), plan.budgets_s[name])
    try:
        device = _device(args.cpu_smoke)
        fn = globals()[f"section_{name}"]
        if name == "hovernet":
            hook = common.load_callable(args.hovernet_step, "--hovernet_step") if args.hovernet_step else None
            fn(sec, plan, device, hook)
        else:
            fn(sec, plan, device)
    except TimeBox as err:
        sec.finish("timeout", str(err))
    except Exception as err:  # noqa: BLE001  (failure isolation: recorded, the other sections still run)
        sec.finish("error", f"{type(err).__name__}: {err}\n{_tail(traceback.format_exc(), 2000)}")
    else:
        failed = [r["name"] for r in sec.data["rows"] if r["ok"] is False]
        sec.finish("failed" if failed else "ok", ("checks failed: " + "; ".join(failed)) if failed else "")
    return sec.data


def run_isolated(name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Run one section in a child process with a hard timeout (CUDA errors and hangs stay there)."""
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    path = os.path.join(args.out, "sections", f"{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--section", name]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    if args.hovernet_step:
        cmd += ["--hovernet_step", args.hovernet_step]
    t0 = time.monotonic()
    limit = plan.budgets_s[name] + 30
    # A session of its own, so a timeout also ends what the section started (torchrun's workers).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=limit)
        problem = "" if proc.returncode == 0 else f"process exit {proc.returncode}: {_tail(stderr)}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        problem = f"killed after the hard time box ({limit:.0f} s): {_tail(stderr, 500)}"
    data = fileio.read_json(path) if os.path.exists(path) else {"name": name, "rows": []}
    if problem and data.get("status") in (None, "running"):
        data.update(status="error", error=problem, seconds=round(time.monotonic() - t0, 1))
        fileio.write_json(path, data)
    return data


def markdown(report: Dict[str, Any]) -> str:
    m = report["machine"]
    device = m.get("gpu", "CPU") + (f" x{m['gpu_count']}" if m.get("gpu_count", 1) > 1 else "")
    lines = [
        f"### `benchmarks/gpu_check.py`{' --cpu-smoke' if report['cpu_smoke'] else ''}: {device}, "
        f"torch {m['torch']}{', CUDA ' + m['cuda'] if m.get('cuda') else ''}, {m['date']}",
        f"Total {report['seconds']:.0f} s; statuses: "
        + ", ".join(f"{name} {s['status']}" for name, s in report["sections"].items()) + ".",
        "",
        "| section | measurement | value | note | check |",
        "|---|---|---|---|---|",
    ]
    for name, sec in report["sections"].items():
        for r in sec.get("rows", []):
            value = f"{r['value']}" + (f" {r['unit']}" if r["unit"] else "")
            check = "" if r["ok"] is None else ("pass" if r["ok"] else "**FAIL**")
            lines.append(f"| {name} | {r['name']} | {value} | {r['note'].replace('|', '/')} | {check} |")
        if sec.get("status") != "ok":
            first = (sec.get("error") or "").strip().splitlines()[:1]
            lines.append(f"| {name} | **{sec.get('status')}** | | {(first[0] if first else '').replace('|', '/')[:300]} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and sections/")
    p.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true", help="tiny configs on the CPU (the test suite's run)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list out of {','.join(SECTIONS)}")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="each section in its own process (auto: yes on CUDA, no with --cpu-smoke)")
    p.add_argument("--hovernet_step", default="", help="module:function replacing hovernet_monai_step (same signature)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # a child's single section
    args = p.parse_args(argv)
    fileio.makedirs(os.path.join(args.out, "sections"))
    if args.section:
        return 0 if execute(args.section, args)["status"] == "ok" else 1

    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise DiffMixError(f"--sections: unknown {', '.join(unknown)} (choose from {', '.join(SECTIONS)})")
    if not args.cpu_smoke:
        _device(False)  # a clear error before any section when there is no GPU
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.cpu_smoke)
    t0 = time.monotonic()
    report = {"cpu_smoke": bool(args.cpu_smoke), "machine": common.machine(), "sections": {}}
    for name in names:
        print(f"[gpu_check] {name} ...", flush=True)
        data = run_isolated(name, args) if isolate else execute(name, args)
        report["sections"][name] = data
        print(f"[gpu_check] {name}: {data['status']} ({data.get('seconds', 0):.0f} s)"
              + (f" -- {data['error'].splitlines()[0]}" if data.get("error") else ""), flush=True)
    report["seconds"] = round(time.monotonic() - t0, 1)
    fileio.write_json(os.path.join(args.out, "gpu_check.json"), report)
    table = markdown(report)
    fileio.write_bytes(os.path.join(args.out, "gpu_check.md"), table.encode())
    print(table)
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
