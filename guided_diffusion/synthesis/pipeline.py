"""The synthesis pipeline: patches -> batches -> guided sampler -> PNG / HoVer-Net .npy / JSON record."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from .. import samplers as smp
from ..data.condition import build_condition, image_to_tensor
from ..data.formats.export import export_source_format
from ..data.patches import VIRTUAL_MAP_RE, sampling_patches
from ..data.readers import image_sources
from ..dist_util import local_device
from ..infra import fileio, runlock
from ..infra.completion import refuse_changed_settings, write_marked
from ..infra.config import load_config_for_checkpoint
from ..infra.errors import DiffMixError
from ..infra.launcher import launch_rank
from .outputs import Job, OutputLayout, hovernet_patch, plan_jobs, shard, to_uint8, write_run_figure
from .sampling import (
    FastGuidedDenoiser,
    PerSampleNoise,
    PlainGuidedDenoiser,
    autocast_context,
    maybe_compiled,
    sample_batch,
    solver_plan,
    with_autocast,
)
from .settings import (
    SampleConfig,
    default_run_name,
    load_model_and_diffusion,
    run_size,
    sampling_precision,
)


@dataclass
class SynthesisSummary:
    """What a run did: its folder, how many outputs this rank wrote / found complete, the figure."""

    out_dir: str
    total_jobs: int
    rank_jobs: int
    written: List[str]
    skipped: List[str]
    figure: Optional[str]
    seconds: float
    source_format: Optional[str] = None


def _selection(cfg: SampleConfig):
    """``--idx_img`` -> ``(stems for sampling_patches or None, patch filter or None)``.

    Entries may be indices into the sorted image stems (the official meaning), image stems, or
    label-map names (``<stem>__balance000``) to synthesise for single GradMix maps.
    """
    items = [p.strip() for p in cfg.idx_img.split(",") if p.strip()]
    if not items:
        return None, None
    if any(p.isdigit() for p in items):
        folder, images = image_sources(cfg.data_dir, cfg.split, "Images", cfg.dataset_mode)
        ordered = sorted(images)
        bad = [p for p in items if p.isdigit() and int(p) >= len(ordered)]
        if bad:
            raise DiffMixError(f"--idx_img {','.join(bad)}: {folder} holds only {len(ordered)} images "
                               f"(indices 0..{len(ordered) - 1})")
        items = [ordered[int(p)] if p.isdigit() else p for p in items]

    # A GradMix map name is <image stem>__<kind><k>; image stems may themselves contain "__".
    map_stem = {p: m.group("stem") for p in items if (m := VIRTUAL_MAP_RE.match(p))}
    stems = {p for p in items if p not in map_stem}
    wanted_stems = sorted(stems | set(map_stem.values()))
    if not map_stem:
        return wanted_stems, None

    def selected(patch) -> bool:
        m = VIRTUAL_MAP_RE.match(patch.map_name)
        return patch.map_name in map_stem or (m.group("stem") if m else patch.map_name) in stems

    return wanted_stems, selected


def _changed_in_window(p: Any, flag: str) -> np.ndarray:
    """bool [S, S]: the pixels of patch ``p`` inside nuclei its GradMix record lists as changed;
    ``flag`` names the option that needs the record when the map has none."""
    from ..gradmix import changed_mask  # lazy: gradmix's pipeline imports scipy

    kind, mask = changed_mask(p.label_source, (p.y0, p.x0, *p.inst_map.shape))
    if kind is None:
        raise DiffMixError(f"{p.label_source}: {flag} needs GradMix maps with their Records/ "
                           "(this label map has no record)")
    return mask


def _holding_changed(patches: Sequence[Any]) -> List[Any]:
    """The patches whose window holds a nucleus GradMix changed (its record lists which)."""
    return [p for p in patches if _changed_in_window(p, "--changed_only").any()]


class _GradMixImages:
    """GradMix's composed images (``<label_dir>/Images/``), read once each, cut to a patch's window."""

    def __init__(self, flag: str):
        self.flag, self.images = flag, {}

    def window(self, p: Any) -> np.ndarray:
        from ..gradmix import image_path  # lazy: gradmix's pipeline imports scipy

        path = image_path(p.label_source)
        if path not in self.images:
            if not fileio.exists(path):
                raise DiffMixError(f"{path}: {self.flag} needs the GradMix image of map {p.map_name} "
                                   "(balancing maps written by gradmix.py --write_images true)")
            self.images[path] = fileio.read_image(path)
        h, w = p.image.shape[:2]
        window = self.images[path][p.y0 : p.y0 + h, p.x0 : p.x0 + w]
        if window.shape != p.image.shape:
            raise DiffMixError(f"{path}: GradMix image size {self.images[path].shape[:2]} does not cover patch {p.name}")
        return np.ascontiguousarray(window)


def _gradmix_starts(patches: Sequence[Any]) -> List[Any]:
    """The patches with GradMix's composed image (same window) in place of the real one."""
    images = _GradMixImages("--start gradmix")
    return [dataclasses.replace(p, image=images.window(p)) for p in patches]


def _with_donors(patches: Sequence[Any], ring: int) -> List[Any]:
    """The patches with ``known`` = (GradMix image window, its placed nuclei grown by ``ring`` px)."""
    from scipy import ndimage

    images = _GradMixImages("--keep_donors")
    out = []
    for p in patches:
        mask = _changed_in_window(p, "--keep_donors")
        if ring and mask.any():
            mask = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=ring)
        out.append(dataclasses.replace(p, known=(images.window(p), mask)))
    return out


def _known_region(batch: Sequence[Job], device: torch.device) -> Optional[smp.Keep]:
    """The samplers' ``keep`` for a batch whose patches carry ``known`` donors (None otherwise). Its
    noise comes from its own per-sample generators, so the plain noise stream is unchanged."""
    if batch[0].patch.known is None:
        return None
    reference = image_to_tensor(np.stack([j.patch.known[0] for j in batch])).to(device)
    mask = torch.from_numpy(np.stack([j.patch.known[1] for j in batch]))[:, None].to(device)
    seeds = [int(np.random.SeedSequence([j.noise_seed, _TAG_KEEP]).generate_state(1)[0]) for j in batch]
    return smp.known_region(reference, mask, PerSampleNoise(seeds).randn(reference.shape[1:], device))


def _record(job: Job, cfg: SampleConfig, layout: OutputLayout, settings: Dict[str, Any], inst: np.ndarray, types: np.ndarray) -> dict:
    p = job.patch
    counts = {str(int(c)): int(n) for c, n in zip(*np.unique(types[inst > 0], return_counts=True))}
    return {
        "name": job.name,
        "image": layout.png(job.name),
        "hovernet_patch": layout.npy(job.name),
        "source_image": p.source_image,
        "label_source": p.label_source,
        "map_name": p.map_name,
        "patch_index": job.patch_index,
        "sample_index": job.sample_index,
        "crop": {"x0": int(p.x0), "y0": int(p.y0), "width": int(inst.shape[1]), "height": int(inst.shape[0])},
        "num_instances": int(inst.max()) if inst.size else 0,
        "type_pixel_counts": counts,
        "seed": int(cfg.seed),
        "noise_seed": int(job.noise_seed),
        **settings,
    }


# Tags the donor-keeping noise stream, kept apart from the sample's own noise (derived from the same seed).
_TAG_KEEP = 7

# Settings that change what a finished output contains: resuming into a folder made with other
# values would mix two runs, so it is refused. (batch_size, num_samples, fast, devices do not.)
_IDENTITY_KEYS = ("seed", "sampler", "solver_steps", "eta", "guidance_scale", "timestep_respacing", "ddim_percent",
                  "clip_denoised", "patch_size", "checkpoint", "precision", "data_dir", "label_dir", "stride", "changed_only", "start_image", "keep_donors", "model_config",
                  "dataset_mode", "class_table", "split")


def _class_table_identity(path: str) -> Optional[str]:
    """The custom class table's content hash: editing the file in place changes the labels too."""
    if not path:
        return None

    return f"{path} sha256:{hashlib.sha256(fileio.read_bytes(path)).hexdigest()[:16]}"


def _check_resume(layout: OutputLayout, identity: Dict[str, Any]) -> None:
    """Refuse to add to a run folder whose ``run.json`` was written with other output-changing settings."""
    path = layout.run_record()
    if fileio.exists(path):
        refuse_changed_settings(
            path, fileio.read_json(path), identity, _IDENTITY_KEYS, "this run folder",
            "resuming would mix two runs. Use another --results_path or --run_name, or the original settings.",
        )


def _check_trained_range(saved: Optional[Dict[str, Any]], model_path: str, start_timestep: int) -> None:
    """Refuse a start above the ``t_max`` the model was trained to (``image_train.py --t_max``);
    ``saved``: the checkpoint's ``config.json`` (None when absent)."""
    t_max = int((saved or {}).get("t_max") or 0)
    if t_max and start_timestep > t_max:
        raise DiffMixError(
            f"{model_path}: this model was trained on timesteps 0..{t_max} only (--t_max {t_max}), but synthesis "
            f"would start at t = {start_timestep}; lower --ddim_percent (pure noise is out of its range)")


def _warn_untrained_guidance(saved: Optional[Dict[str, Any]], model_path: str, s: float) -> None:
    """Warn when guidance (s > 1) runs on a checkpoint whose ``config.json`` says it was trained with
    ``drop_rate`` 0: its branch for the all-zero null map was never trained, so guidance pushes away
    from an untrained prediction (docs/REAL_DATA.md section 0g: more rare-class fidelity, much less
    realism than ``--s 1`` with such a model)."""
    if smp.guidance_active(s) and (saved or {}).get("drop_rate") == 0:
        print(f"warning: {model_path}: trained with --drop_rate 0 (its config.json), so the unconditional branch that "
              f"guidance --s {s} uses never saw the null label map (docs/REAL_DATA.md 0g: less realistic patches than --s 1); "
              "fine-tune it with label dropout (stage 2 of scripts/scripts_train/consep256_cpu.sh) or sample with --s 1",
              file=sys.stderr)


def _check_patches(patches: Sequence[Any], image_size: int, num_classes: int) -> None:
    for p in patches:
        if p.image.shape[:2] != (image_size, image_size):
            raise DiffMixError(f"{p.label_source}: patch {p.image.shape[:2]} does not match the patch size {image_size} "
                               "(the model's image_size, or --patch_size)")
        if p.type_map.size and int(p.type_map.max()) >= num_classes:
            raise DiffMixError(
                f"{p.label_source}: type values up to {int(p.type_map.max())} do not fit the model's "
                f"num_classes {num_classes} (check --dataset_mode / --num_classes against the checkpoint)"
            )


def _check_finite(sample: torch.Tensor, batch: Sequence[Job], model_path: str, kept) -> None:
    """Refuse a sampled batch float [N, 3, H, W] holding NaN or inf: it would be written as black or
    white patches that look like outputs. ``kept()`` says what earlier batches left complete."""
    bad = (~torch.isfinite(sample)).flatten(1).any(1).nonzero()
    if len(bad):
        raise DiffMixError(
            f"{model_path or 'the model'}: the model produced non-finite values (NaN or inf) for output "
            f"{batch[int(bad[0])].name}; nothing written for this batch (check the checkpoint's weights, or try "
            f"--precision fp32); {kept()}")


def _write_outputs(layout: OutputLayout, job: Job, image: np.ndarray, cfg: SampleConfig, settings: Dict[str, Any],
                   hint=None) -> None:
    """PNG, then the HoVer-Net .npy, then the record (last: it marks the output complete); ``hint``
    as in :func:`guided_diffusion.infra.completion.write_marked`."""
    p = job.patch
    npy = hovernet_patch(image, p.inst_map, p.type_map)
    write_marked(
        [(layout.png(job.name), lambda path: fileio.write_png(path, image)),
         (layout.npy(job.name), lambda path: fileio.write_npy(path, npy))],
        layout.record(job.name), _record(job, cfg, layout, settings, npy[..., 3], npy[..., 4]), what=f"output {job.name}",
        hint=hint,
    )


def run_synthesis(
    cfg: SampleConfig,
    model_cfg: Dict[str, Any],
    *,
    model: Optional[torch.nn.Module] = None,
    diffusion: Any = None,
    patches: Optional[Sequence[Any]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    device: Optional[torch.device] = None,
    model_config_source: str = "flags",
) -> SynthesisSummary:
    """Run DiffMix synthesis (see the package docstring) and return a :class:`SynthesisSummary`.

    Args:
        cfg: the sampling settings (validated here).
        model_cfg: resolved model + diffusion settings (``ModelConfig`` keys; see
            :func:`resolve_model_config`); ``timestep_respacing`` selects the sampling steps.
        model, diffusion: already-built objects (tests); built from ``model_cfg`` and
            ``cfg.model_path`` when None.
        patches: precomputed ``Patch`` records (tests); read with ``sampling_patches`` when None.
        rank, world_size: this process's shard (default: :func:`launch_rank`).
        device: default device when ``cfg.device`` is empty (else this rank's CUDA device or the CPU).
    """
    t_start = time.time()
    cfg.validate()
    job = launch_rank()
    if rank is None or world_size is None:
        rank, world_size = job.rank, job.world_size
    device = torch.device(cfg.device) if cfg.device else (device or local_device(job.local_rank))
    precision = sampling_precision(cfg, model_cfg, device)

    if model is None or diffusion is None:
        model, diffusion = load_model_and_diffusion(cfg.model_path, model_cfg, device)
    model = model.to(device).eval()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    num_classes, no_instance = int(model_cfg["num_classes"]), bool(model_cfg["no_instance"])
    image_size = run_size(model_cfg, cfg.patch_size, cfg.model_path)

    if patches is None:
        stems, keep = _selection(cfg)
        patches = sampling_patches(
            data_dir=cfg.data_dir, dataset_mode=cfg.dataset_mode, image_size=image_size,
            label_dir=cfg.label_dir or None, stride=cfg.stride or None, split=cfg.split,
            class_table=cfg.class_table or None, num_classes=num_classes, stems=stems,
            progress=cfg.progress and rank == 0, labels_merged=cfg.labels_merged,
        )
        if keep is not None:
            patches = [p for p in patches if keep(p)]
            if not patches:
                raise DiffMixError(f"--idx_img {cfg.idx_img}: no label map of that name in {cfg.label_dir or cfg.data_dir}")
        if cfg.changed_only:
            patches = _holding_changed(patches)
            if not patches:
                raise DiffMixError(f"--changed_only: no patch of the selected maps in {cfg.label_dir} holds a changed nucleus")
        if cfg.start == "gradmix":
            patches = _gradmix_starts(patches)
        if cfg.keep_donors >= 0:
            patches = _with_donors(patches, cfg.keep_donors)
    _check_patches(patches, image_size, num_classes)

    sched = smp.as_schedule(diffusion)
    respacing = model_cfg.get("timestep_respacing") or ""
    steps = smp.start_steps(sched.num_timesteps, cfg.ddim_percent)
    pure_noise = float(cfg.ddim_percent) >= 100
    solver = solver_plan(model_cfg, sched, steps, cfg.solver_steps) if cfg.solver_steps else None
    settings = {
        "sampler": cfg.sampler,
        "solver_steps": int(cfg.solver_steps),
        "model_calls": len(solver[1]) if solver else steps,
        "eta": float(cfg.eta),
        "guidance_scale": float(cfg.s),
        "timestep_respacing": respacing,
        "respaced_steps": sched.num_timesteps,
        "ddim_percent": float(cfg.ddim_percent),
        "steps": steps,
        "start": "pure noise" if pure_noise else f"noised {'GradMix image' if cfg.start == 'gradmix' else 'real patch'} (SDEdit)",
        "start_image": cfg.start,
        "start_timestep": int(sched.timestep_map[steps - 1]),
        "keep_donors": int(cfg.keep_donors),
        "clip_denoised": bool(cfg.clip_denoised),
        "patch_size": image_size,
        "checkpoint": cfg.model_path,
        "model_config_source": model_config_source,
        "precision": precision,
        "fast": bool(cfg.fast),
        "version": __version__,
    }
    saved = load_config_for_checkpoint(cfg.model_path) if cfg.model_path and fileio.exists(cfg.model_path) else None
    _check_trained_range(saved, cfg.model_path, settings["start_timestep"])
    if rank == 0:
        _warn_untrained_guidance(saved, cfg.model_path, cfg.s)
    layout = OutputLayout(fileio.join(cfg.results_path, cfg.run_name or default_run_name(cfg, respacing)))
    identity = {**settings, "seed": int(cfg.seed), "data_dir": cfg.data_dir, "label_dir": cfg.label_dir,
                "stride": int(cfg.stride), "changed_only": bool(cfg.changed_only), "model_config": model_cfg, "dataset_mode": cfg.dataset_mode,
                "class_table": _class_table_identity(cfg.class_table), "split": cfg.split}
    _check_resume(layout, identity)
    jobs = plan_jobs(patches, cfg.samples_per_map, cfg.num_samples, cfg.seed)
    mine = shard(jobs, rank, world_size)
    run_lock = runlock.acquire(layout.root, "synthesis", rank, "--results_path")
    if rank == 0:
        fileio.write_json(layout.run_record(), {
            **identity, "settings": dataclasses.asdict(cfg), "total_outputs": len(jobs), "world_size": world_size,
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        })

    pending = [j for j in mine if not layout.is_complete(j.name)]
    pending_ids = {id(j) for j in pending}
    skipped = [j.name for j in mine if id(j) not in pending_ids]
    written: List[str] = []
    forward = maybe_compiled(model, cfg.compile) if cfg.fast else None
    bar = tqdm(total=len(mine), initial=len(skipped), unit="patch", desc=f"synthesis [rank {rank}/{world_size}]",
               disable=not cfg.progress, dynamic_ncols=True)
    try:
        for b in range(0, len(pending), cfg.batch_size):
            batch = pending[b : b + cfg.batch_size]
            ps = [j.patch for j in batch]
            y = build_condition(np.stack([p.type_map for p in ps]), np.stack([p.inst_map for p in ps]),
                                num_classes, no_instance).to(device)
            reference = None if pure_noise else image_to_tensor(np.stack([p.image for p in ps])).to(device)
            if cfg.channels_last:
                y = y.contiguous(memory_format=torch.channels_last)
                if reference is not None:
                    reference = reference.contiguous(memory_format=torch.channels_last)
            with autocast_context(precision, device):  # the SPADE caches are built here, once per batch
                if cfg.fast:
                    denoiser = FastGuidedDenoiser(model, y, cfg.s, batched=cfg.batched_guidance, forward=forward)
                else:
                    denoiser = PlainGuidedDenoiser(model, y, cfg.s)
            sample = sample_batch(
                with_autocast(denoiser, precision, device), sched, reference, steps,
                PerSampleNoise([j.noise_seed for j in batch]), sampler=cfg.sampler, eta=cfg.eta,
                clip=cfg.clip_denoised, shape=(len(batch), 3, image_size, image_size), device=device, solver=solver,
                keep=_known_region(batch, device),
            )
            _check_finite(sample, batch, cfg.model_path, lambda: (
                f"kept: {len(written) + len(skipped)} complete patches of this rank in {layout.root}"))
            for job, image in zip(batch, to_uint8(sample)):
                _write_outputs(layout, job, image, cfg, settings, hint=lambda: (
                    f"kept: {len(written) + len(skipped)} complete patches of this rank in {layout.root} "
                    "(rerun the same command to continue)"))
                written.append(job.name)
            bar.update(len(batch))
    finally:
        bar.close()
        if run_lock is not None:
            run_lock.release()

    figure = None
    if cfg.figure_rows:
        figure = write_run_figure(layout, mine, cfg.figure_rows, rank, world_size,
                                  title=f"s={cfg.s} {cfg.sampler} {settings['model_calls']} steps")
    source_dir = None
    if cfg.source_format:
        if world_size == 1:
            source_dir = fileio.join(layout.root, "source_format")
            export_source_format(layout.root, source_dir, progress=cfg.progress)
        elif rank == 0:
            print(f"--source_format: after every rank has finished, run scripts/convert_dataset.py --from_run {layout.root}",
                  file=sys.stderr)
    return SynthesisSummary(layout.root, len(jobs), len(mine), written, skipped, figure, time.time() - t_start,
                            source_dir)
