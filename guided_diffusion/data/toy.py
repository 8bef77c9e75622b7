"""Procedural H&E-like toy tiles in the CoNSeP layout (demo data and test data).

A tile is rendered from two stain concentration maps (hematoxylin, eosin) mixed with the
Ruifrok-Johnston optical-density vectors, so colours stay in the pink/purple H&E gamut. Nuclei are
filled irregular ellipses painted in their bounding boxes; four classes differ visibly:

============  ========  ====================================================  ==================
class         raw ids   look                                                  default share
============  ========  ====================================================  ==================
other         1         irregular, medium size, medium stain                  3 % (the rare one)
inflammatory  2         small, round, very dark                               30 %
epithelial    3 or 4    large, pale with coarse chromatin and a dark rim,      42 %
                        in touching clusters
spindle       5, 6, 7   elongated, aligned with a smooth orientation field    25 %
============  ========  ====================================================  ==================

Labels use RAW CoNSeP type ids so the CoNSeP merge (7 -> 4 classes) is exercised by the readers.
Nuclei may touch and overlap: a later nucleus covers an earlier one, which keeps its id on its
visible pixels (placements that would hide more than ``max_overlap`` of a nucleus are skipped).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

from ..infra import fileio
from ..infra.config import SettingsCheck
from ..infra.errors import DiffMixError
from .labels import write_label_mat
from .readers import is_dir

# Optical density of one unit of stain in R, G, B (Ruifrok & Johnston 2001), decadic.
_H_OD = np.array([0.650, 0.704, 0.286], np.float32)
_E_OD = np.array([0.072, 0.990, 0.105], np.float32)

CLASS_NAMES = ("other", "inflammatory", "epithelial", "spindle")  # merged classes 1..4
DEFAULT_CLASS_PROBS = (0.03, 0.30, 0.42, 0.25)


@dataclass(frozen=True)
class ToyConfig:
    """Settings of the generator (recorded in the dataset's ``toy_dataset.json``).

    Attributes:
        density: nuclei placed per 10,000 pixels (before overlap rejection).
        class_probs: shares of (other, inflammatory, epithelial, spindle); normalised.
        scale: nucleus size multiplier (1.0 ~ CoNSeP at 40x scaled to small demo tiles).
        cluster_size: mean epithelial nuclei per cluster.
        max_overlap: largest fraction of a new nucleus that may land on existing nuclei.
        lumen: fraction of the tile left as white space.
    """

    density: float = 7.0
    class_probs: Tuple[float, float, float, float] = DEFAULT_CLASS_PROBS
    scale: float = 1.0
    cluster_size: float = 7.0
    max_overlap: float = 0.35
    lumen: float = 0.08

    def validate(self) -> None:
        """Raise :class:`DiffMixError` naming every setting out of its range (NaN included)."""
        check = SettingsCheck(self, prefix="")
        check.need("density", lambda v: v >= 0, ">= 0")
        for name in ("scale", "cluster_size"):
            check.need(name, lambda v: v > 0, "> 0")
        for name in ("max_overlap", "lumen"):
            check.need(name, lambda v: 0 <= v <= 1, "in [0, 1]")
        probs = np.asarray(self.class_probs, np.float64)
        check.add(probs.shape != (4,) or not np.isfinite(probs).all() or probs.min() < 0 or probs.sum() <= 0,
                  f"class_probs must be 4 non-negative shares, got {self.class_probs}")
        check.done()


def _tile_shape(size) -> Tuple[int, int]:
    """``(height, width)`` of a tile ``size`` (side, or (height, width)); refused below 8 px."""
    h, w = (size, size) if np.isscalar(size) else tuple(size)
    if h < 8 or w < 8:
        raise DiffMixError(f"toy tile size {h}x{w} is too small (minimum 8)")
    return h, w


def smooth_noise(shape: Tuple[int, int], cell: float, rng: np.random.Generator, aniso: float = 1.0) -> np.ndarray:
    """Smooth noise float32 [H, W], roughly unit variance: Gaussian noise on a coarse grid (one
    value per ``cell`` pixels, ``cell * aniso`` along y) upsampled bicubically (PIL: fast)."""
    h, w = shape
    gy = max(2, int(np.ceil(h / (cell * aniso))) + 1)
    gx = max(2, int(np.ceil(w / cell)) + 1)
    low = rng.standard_normal((gy, gx), dtype=np.float32)
    up = Image.fromarray(low, mode="F").resize((w, h), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32)


def _draw_class_params(cls: int, rng: np.random.Generator, scale: float):
    """(semi-axis a, semi-axis b, harmonic amplitudes [3], hematoxylin level, texture, rim)."""
    if cls == 1:  # other: irregular
        a = rng.uniform(7, 12)
        return a, a * rng.uniform(0.5, 0.85), rng.uniform(0.08, 0.2, 3), rng.uniform(0.7, 0.95), 0.35, 0.0
    if cls == 2:  # inflammatory: small, round, dark
        a = rng.uniform(4.5, 6.5)
        return a, a * rng.uniform(0.85, 1.0), rng.uniform(0.0, 0.04, 3), rng.uniform(1.15, 1.45), 0.15, 0.0
    if cls == 3:  # epithelial: large, pale, chromatin texture, dark rim
        a = rng.uniform(10, 14)
        return a, a * rng.uniform(0.65, 0.9), rng.uniform(0.0, 0.06, 3), rng.uniform(0.45, 0.62), 0.8, 0.35
    a = rng.uniform(11, 17)  # spindle: elongated
    return a, rng.uniform(2.6, 4.0), rng.uniform(0.0, 0.05, 3), rng.uniform(0.8, 1.0), 0.25, 0.0


def _raw_id(cls: int, rng: np.random.Generator) -> int:
    """A raw CoNSeP id for a merged class (so every raw id of a group occurs)."""
    return {1: 1, 2: 2, 3: int(rng.choice([3, 4])), 4: int(rng.choice([5, 6, 7]))}[cls]


def _positions(n_cls: np.ndarray, shape, cfg: ToyConfig, rng: np.random.Generator) -> np.ndarray:
    """Centres float [N, 2] (y, x): epithelial nuclei in clusters, the rest uniform."""
    h, w = shape
    centres = rng.uniform((0, 0), (h, w), size=(len(n_cls), 2))
    epi = np.flatnonzero(n_cls == 3)
    if epi.size:
        n_clusters = max(1, int(round(epi.size / cfg.cluster_size)))
        cluster_of = rng.integers(0, n_clusters, epi.size)
        cluster_xy = rng.uniform((0, 0), (h, w), size=(n_clusters, 2))
        spread = 12.0 * cfg.scale * np.sqrt(cfg.cluster_size) / 2
        centres[epi] = cluster_xy[cluster_of] + rng.normal(0, spread, (epi.size, 2))
        centres[epi] = np.clip(centres[epi], 0, (h - 1, w - 1))
    return centres


_PLACEMENT_TRIES = 4


def _nucleus_mask(shape, cy, cx, a, b, theta, amps, phases):
    """Pixels of one irregular ellipse, computed in its bounding box only.

    Returns ``(box slices, inside bool [bh, bw], rel float [n_inside])`` (rel = radius relative to
    the boundary, 1 at the edge) or None when nothing falls inside the image.
    """
    h, w = shape
    reach = a * (1 + amps.sum()) + 1
    y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 2)
    x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 2)
    if y1 <= y0 or x1 <= x0:
        return None
    dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy -= cy
    dx -= cx
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
    rho = np.sqrt(u * u + v * v)
    phi = np.arctan2(v, u)
    edge = 1 + sum(amps[i] * np.cos((i + 2) * phi + phases[i]) for i in range(3))
    inside = rho <= edge
    if not inside.any():
        return None
    return (slice(y0, y1), slice(x0, x1)), inside, rho[inside] / edge[inside]


def make_toy_tile(
    size: Union[int, Tuple[int, int]],
    seed: int,
    config: ToyConfig = ToyConfig(),
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one tile.

    Args:
        size: side (square) or (height, width) in pixels.
        seed: RNG seed; the same seed and config give identical arrays.

    Returns:
        ``(image uint8 [H, W, 3], inst_map int32 [H, W] (ids 1..N, 0 = background),
        type_map int32 [H, W] raw CoNSeP ids 0..7)``.
    """
    h, w = _tile_shape(size)
    config.validate()
    probs = np.asarray(config.class_probs, np.float64)
    rng = np.random.default_rng(seed)

    # Stroma: fibrous eosin texture (stretched noise), white lumen where a smooth field is high.
    eosin = 0.30 + 0.06 * smooth_noise((h, w), 48, rng) + 0.05 * smooth_noise((h, w), 5, rng, aniso=4.0)
    lumen_field = smooth_noise((h, w), 64, rng)
    lumen_cut = np.quantile(lumen_field, 1 - config.lumen) if config.lumen > 0 else np.inf
    lumen = np.clip((lumen_field - lumen_cut) * 4, 0, 1)
    eosin = eosin * (1 - 0.9 * lumen)
    hema = 0.13 + 0.03 * smooth_noise((h, w), 16, rng)
    chromatin = smooth_noise((h, w), 2.5, rng)
    angle_field = smooth_noise((h, w), 96, rng) * 1.2 + rng.uniform(0, np.pi)

    n = rng.poisson(config.density * h * w / 1e4)
    classes = rng.choice(4, size=n, p=probs / probs.sum()) + 1
    centres = _positions(classes, (h, w), config, rng)
    inst = np.zeros((h, w), np.int32)
    types = np.zeros((h, w), np.int32)
    next_id = 1
    for k in rng.permutation(n):
        cls = int(classes[k])
        a, b, amps, level, texture, rim = _draw_class_params(cls, rng, config.scale)
        a, b = a * config.scale, b * config.scale
        phases = rng.uniform(0, 2 * np.pi, 3)
        jitter = rng.normal(0, 1.2 * a, (_PLACEMENT_TRIES, 2))
        jitter[0] = 0
        for cy, cx in np.clip(centres[k] + jitter, 0, (h - 1, w - 1)):
            if lumen[int(cy), int(cx)] > 0.5:  # no nuclei floating in white space
                continue
            theta = angle_field[int(cy), int(cx)] if cls == 4 else rng.uniform(0, np.pi)
            found = _nucleus_mask((h, w), cy, cx, a, b, theta, amps, phases)
            if found is None:
                continue
            box, inside, rel = found
            box_inst = inst[box]
            if (box_inst[inside] != 0).mean() > config.max_overlap:
                continue  # hidden too much: try a nearby spot (keeps clusters touching, not stacked)
            box_inst[inside] = next_id
            types[box][inside] = _raw_id(cls, rng)
            stain = level * (1 + texture * 0.5 * chromatin[box][inside] + rim * (rel > 0.78))
            hema[box][inside] = stain
            eosin[box][inside] *= 0.45
            next_id += 1
            break

    # Slight optical blur, then Beer-Lambert mixing and sensor noise.
    hema = ndimage.gaussian_filter(hema, 0.7)
    eosin = ndimage.gaussian_filter(np.clip(eosin, 0, None), 0.7)
    od = hema[..., None] * _H_OD + eosin[..., None] * _E_OD
    img = 255.0 * np.power(np.float32(10.0), -od) + rng.standard_normal((h, w, 3), dtype=np.float32) * 2.5
    image = np.clip(img, 0, 255).astype(np.uint8)
    return image, inst, types


def _settings_record(num_train, num_test, size, seed, config: ToyConfig) -> dict:
    """The JSON record of a toy dataset (without writing anything), in its JSON form."""
    jobs = {"Train": num_train, "Test": num_test}
    files = {split: [f"toy_{split.lower()}_{i:03d}" for i in range(n)] for split, n in jobs.items() if n}
    record = {
        "generator": "guided_diffusion.data.toy",
        "layout": "CoNSeP (raw type ids 1..7; use dataset_mode consep)",
        "seed": int(seed),
        "size": list(size) if not np.isscalar(size) else int(size),
        "num_train": int(num_train),
        "num_test": int(num_test),
        "config": asdict(config),
        "files": files,
    }
    # JSON round trip (tuples -> lists) so it compares equal to a record read back from disk.
    return json.loads(json.dumps(record))


def _tile_paths(root: str, split: str, stem: str) -> Tuple[str, str]:
    return (fileio.join(root, split, "Images", stem + ".png"), fileio.join(root, split, "Labels", stem + ".mat"))


def _check_root(root: str, record: dict) -> Optional[dict]:
    """Refuse to write into an existing dataset, unless it is this very dataset, complete.

    Returns the existing record when ``root`` already holds exactly the dataset ``record``
    describes (same settings, every file present), None when ``root`` holds no dataset yet.
    Anything else raises: writing into it would silently mix tiles of two settings.
    """
    json_path = fileio.join(root, "toy_dataset.json")
    busy = [s + "/" for s in ("Train", "Test") if is_dir(fileio.join(root, s)) and fileio.listdir(fileio.join(root, s))]
    if not fileio.exists(json_path):
        if not busy:
            return None
        problem = f"it already holds {' and '.join(busy)} content but no toy_dataset.json"
    else:
        old = fileio.read_json(json_path)
        diff = sorted(k for k in record if not isinstance(old, dict) or old.get(k) != record[k])
        if len(diff) > 1 and "files" in diff:
            diff.remove("files")  # the file list follows from num_train/num_test: name the cause
        stems = [(split, stem) for split, names in record["files"].items() for stem in names]
        expected = [path for split, stem in stems for path in _tile_paths(root, split, stem)]
        missing = [p for p in expected if not fileio.exists(p)]
        if not diff and not missing:
            return old
        if diff:
            problem = f"its toy_dataset.json records other settings ({', '.join(diff)} differ)"
        else:
            problem = f"{len(missing)} of its files are missing (e.g. {missing[0]})"
    raise DiffMixError(
        f"{root}: {problem}; refusing to write a toy dataset into it (it would mix old and new tiles). "
        f"Choose a new --root or delete {root}"
    )


def make_toy_dataset(
    root: str,
    num_train: int = 4,
    num_test: int = 2,
    size: Union[int, Tuple[int, int]] = 256,
    seed: int = 0,
    config: ToyConfig = ToyConfig(),
    progress: bool = True,
) -> dict:
    """Write a toy dataset in the CoNSeP layout.

    Writes ``<root>/{Train,Test}/Images/toy_<split>_<i:03d>.png`` and ``Labels/<same>.mat`` (raw
    CoNSeP ids, keys inst_map/type_map/inst_type/inst_centroid) and, last, ``<root>/toy_dataset.json``
    with the seed and settings. Tile ``i`` of a split is seeded from ``(seed, split, i)``, so adding
    tiles never changes the existing ones. Returns the JSON record.

    ``root`` must not hold a dataset already (``Train/`` or ``Test/`` content or a
    ``toy_dataset.json``): that raises :class:`DiffMixError`. The one exception is a complete
    toy dataset made with exactly these settings, which is kept as it is (a no-op returning its
    record), so a finished run can be repeated safely.
    """
    if num_train < 0 or num_test < 0:
        raise DiffMixError(f"num_train ({num_train}) and num_test ({num_test}) must be >= 0")
    if seed < 0:
        raise DiffMixError(f"seed {seed}: must be >= 0")
    _tile_shape(size)
    config.validate()  # before anything is written
    record = _settings_record(num_train, num_test, size, seed, config)
    existing = _check_root(root, record)
    if existing is not None:
        return existing
    jobs = [("Train", 0, i) for i in range(num_train)] + [("Test", 1, i) for i in range(num_test)]
    for split, split_id, i in tqdm(jobs, desc="toy tiles", unit="tile", disable=not progress or len(jobs) < 4):
        tile_seed = int(np.random.SeedSequence([int(seed), split_id, i]).generate_state(1)[0])
        image, inst, types = make_toy_tile(size, tile_seed, config)
        image_path, label_path = _tile_paths(root, split, f"toy_{split.lower()}_{i:03d}")
        fileio.write_png(image_path, image)
        write_label_mat(label_path, inst, types)
    fileio.write_json(fileio.join(root, "toy_dataset.json"), record)  # last: marks the dataset complete
    return record
