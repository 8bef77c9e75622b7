"""Data-layer benchmarks, each a ratio against a baseline measured in the same run.

1. Toy tile generation: nuclei drawn in their bounding boxes (the generator) vs the same number of
   nuclei drawn with full-frame masks (the naive vectorisation), on a tile of the same size.
2. Training crops: crops from tiles read once into memory (TrainCropDataset) vs the official
   loader's pattern of reading the image and .mat again for every item.

Usage: python benchmarks/bench_toy.py [--size 1000] [--tiles 4] [--crops 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from guided_diffusion.data.classes import CONSEP
from guided_diffusion.data.readers import list_samples, read_dataset, read_label_file, read_rgb
from guided_diffusion.data.toy import make_toy_dataset, make_toy_tile
from guided_diffusion.data.training import TrainCropDataset, augment, image_to_tensor


def full_frame_paint(size: int, seed: int) -> float:
    """Seconds to paint the nuclei of ``make_toy_tile(size, seed)`` with full-frame masks."""
    _, inst, _ = make_toy_tile(size, seed)
    ids = np.unique(inst)[1:]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, size, (ids.size, 2))
    radii = rng.uniform(5, 12, (ids.size, 2))
    out = np.zeros((size, size), np.int32)
    t0 = time.perf_counter()
    for k, ((cy, cx), (a, b)) in enumerate(zip(centres, radii)):
        u, v = (xs - cx) / a, (ys - cy) / b
        rho = np.sqrt(u * u + v * v)
        phi = np.arctan2(v, u)
        out[rho <= 1 + 0.05 * np.cos(2 * phi)] = k + 1
    return time.perf_counter() - t0


def bench_generator(size: int) -> None:
    make_toy_tile(64, 0)  # warm-up
    times = []
    for _ in range(3):  # best of 3: the machine is shared
        t0 = time.perf_counter()
        _, inst, _ = make_toy_tile(size, 1)
        times.append(time.perf_counter() - t0)
    ours = min(times)
    base = full_frame_paint(size, 1)
    print(f"toy tile {size}x{size}: {np.unique(inst).size - 1} nuclei, generator {ours:.3f} s (whole tile), "
          f"full-frame painting alone {base:.3f} s -> {base / ours:.1f}x faster")


def bench_crops(size: int, tiles: int, crops: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        make_toy_dataset(root, num_train=tiles, num_test=0, size=size, seed=0, progress=False)
        t0 = time.perf_counter()
        ds = TrainCropDataset(read_dataset(root, CONSEP, progress=False), 256)
        for i in range(crops):
            ds[(i % tiles, i)]
        ours = time.perf_counter() - t0
        files = list_samples(root)
        t0 = time.perf_counter()
        for i in range(crops):  # official pattern: read both files for every item
            f = files[i % tiles]
            img = read_rgb(f.image)
            inst, types = read_label_file(f.label, CONSEP)
            x0, y0, rot, lr, ud = ds.crop_params(i % tiles, i)
            win = (slice(y0, y0 + 256), slice(x0, x0 + 256))
            image_to_tensor(augment(img[win], rot, lr, ud))
            augment(inst[win], rot, lr, ud), augment(types[win], rot, lr, ud)
        base = time.perf_counter() - t0
    print(f"{crops} training crops 256 from {tiles} tiles {size}x{size}: read-once {ours:.2f} s (reading included), "
          f"re-read per item {base:.2f} s -> {base / ours:.1f}x faster")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--tiles", type=int, default=4)
    p.add_argument("--crops", type=int, default=64)
    args = p.parse_args()
    bench_generator(args.size)
    bench_crops(args.size, args.tiles, args.crops)


if __name__ == "__main__":
    main()
