"""Outputs of a synthesis run: job planning (names, seeds, shards), the file layout, HoVer-Net
patches, image conversions and the real | label | synthetic figure."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..data.condition import instance_edges
from ..data.labels import relabel_contiguous
from ..data.layouts import SynthesisLayout as OutputLayout  # noqa: F401  (the run layout, named once)
from ..infra import fileio
from ..infra.errors import DiffMixError


def output_name(map_name: str, patch_index: int, sample_index: int) -> str:
    """``<map_name>_<patch:03d>`` (official) for sample 0, ``..._k<k:02d>`` for later samples."""
    base = f"{map_name}_{patch_index:03d}"
    return base if sample_index == 0 else f"{base}_k{sample_index:02d}"


def noise_seed(seed: int, map_name: str, patch_index: int, sample_index: int) -> int:
    """A 63-bit seed for one sample, a pure function of its identity (not of batching or order)."""
    digest = hashlib.sha256(map_name.encode("utf-8")).digest()[:16]
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    entropy = [int(seed) & 0xFFFFFFFF, (int(seed) >> 32) & 0xFFFFFFFF, *words, int(patch_index), int(sample_index)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclass
class Job:
    """One output: a patch (``guided_diffusion.data.Patch``), which sample of it, its name and seed."""

    patch: Any
    patch_index: int
    sample_index: int
    name: str
    noise_seed: int


def plan_jobs(patches: Sequence[Any], samples_per_map: int = 1, num_samples: int = 0, seed: int = 0) -> List[Job]:
    """Every (patch, sample) output in patch-major order, capped at ``num_samples`` (0 = no cap).

    The patch index is the patch's grid index on its label map (``Patch.index``).
    """
    jobs = []
    for patch in patches:
        idx = int(getattr(patch, "index", 0))
        for k in range(samples_per_map):
            jobs.append(Job(patch, idx, k, output_name(patch.map_name, idx, k), noise_seed(seed, patch.map_name, idx, k)))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise DiffMixError(f"two patches share the output name(s) {dup}: label map names must be unique")
    return jobs[:num_samples] if num_samples else jobs


def shard(jobs: Sequence[Job], rank: int, world_size: int) -> List[Job]:
    """Rank ``rank`` of ``world_size`` takes jobs ``rank::world_size`` (N ranks make N times the patches)."""
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(jobs[rank::world_size])


def hovernet_patch(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """HoVer-Net training patch: int32 ``[S, S, 5]`` = R, G, B (0..255), instance id, type.

    Instance ids are renumbered contiguously 1..N (0 = background); int32 keeps ids > 255 (the
    official sampler's uint8 concatenation happens to upcast too, but silently).
    """
    if image.shape[:2] != inst_map.shape or inst_map.shape != type_map.shape or image.shape[-1] != 3:
        raise ValueError(f"shapes differ: image {image.shape}, inst {inst_map.shape}, type {type_map.shape}")
    inst = relabel_contiguous(inst_map).astype(np.int32)
    return np.concatenate([image.astype(np.int32), inst[..., None], type_map.astype(np.int32)[..., None]], axis=-1)


def to_uint8(sample: torch.Tensor) -> np.ndarray:
    """float ``[N, 3, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, 3]``, rounded as the official sampler
    (``((x + 1) / 2 * 255 + 0.5)`` clamped and truncated)."""
    x = ((sample.float() + 1) / 2).mul(255).add_(0.5).clamp_(0, 255)
    return x.permute(0, 2, 3, 1).to("cpu", torch.uint8).numpy()


# Class colours (index = merged class; 0 = background is left uncoloured).
_PALETTE = np.array(
    [[0, 0, 0], [255, 215, 0], [220, 20, 60], [30, 144, 255], [50, 205, 50], [255, 140, 0], [148, 0, 211],
     [0, 206, 209], [255, 105, 180], [139, 69, 19], [128, 128, 128]],
    dtype=np.float32,
)


def label_overlay(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 ``[S, S, 3]``: ``image`` with each nucleus tinted by its class and outlined in black."""
    out = image.astype(np.float32).copy()
    colours = _PALETTE[np.asarray(type_map) % len(_PALETTE)]
    fg = np.asarray(inst_map) > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    edges = instance_edges(torch.from_numpy(np.asarray(inst_map).astype(np.int64))).numpy() & fg
    out[edges] = 0
    return out.clip(0, 255).astype(np.uint8)


def write_figure(path: str, rows: Sequence[tuple], title: str = "", min_size: int = 128) -> None:
    """Write a grid PNG: one row per ``(real, overlay, synthetic, caption)``; images uint8 ``[S, S, 3]``.

    Patches smaller than ``min_size`` are enlarged (nearest neighbour) so captions stay legible.
    """
    if not rows:
        return
    s0 = rows[0][0].shape[0]
    zoom = max(1, -(-min_size // s0))
    s = s0 * zoom
    pad, line = 6, 14
    head = 2 * line if title else line
    width = 3 * s + 4 * pad
    height = head + pad + len(rows) * (s + line + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(90, 90, 90))
    for col, label in enumerate(("real patch", "label map", "synthetic")):
        draw.text((pad + col * (s + pad), head - line + 2), label, fill=(0, 0, 0))
    for r, (real, overlay, synth, caption) in enumerate(rows):
        y = head + pad + r * (s + line + pad)
        for col, img in enumerate((real, overlay, synth)):
            tile = Image.fromarray(np.ascontiguousarray(img))
            if zoom > 1:
                tile = tile.resize((s, s), Image.NEAREST)
            canvas.paste(tile, (pad + col * (s + pad), y))
        draw.text((pad, y + s + 1), caption, fill=(0, 0, 0))
    fileio.write_png(path, np.asarray(canvas))


def write_run_figure(layout: OutputLayout, jobs: Sequence[Job], rows: int, rank: int = 0, world_size: int = 1, title: str = "") -> Optional[str]:
    """Figure of the first ``rows`` complete outputs of ``jobs``: real | label overlay | synthetic."""
    entries = []
    for job in jobs:
        if len(entries) >= rows:
            break
        if not layout.is_complete(job.name):
            continue
        p = job.patch
        synth = fileio.read_image(layout.png(job.name))
        entries.append((p.image, label_overlay(p.image, p.inst_map, p.type_map), synth, job.name))
    if not entries:
        return None
    path = layout.figure(rank, world_size)
    write_figure(path, entries, title)
    return path
