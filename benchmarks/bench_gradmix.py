"""GradMix speed: this implementation vs the official per-nucleus whole-image approach, same run.

Data: toy tiles of 1000x1000 px with 300-560 nuclei (the data layer's generator, CoNSeP layout;
'other' = class 1 raised to 15 % so that many nuclei get replaced), written to a temporary folder.

Timed, per tile:
* ours, labels only: ``run_gradmix`` end to end (read every label once, donor bank, one balancing
  map per tile, .mat + JSON writes), total time / tiles;
* ours, labels + images: the same with ``write_images=True`` (image reads and PNG writes included);
* baseline: a re-implementation of the official GradMix script's per-target work (hvcl/DiffMix
  ``GradMix/grad_mix.py``): whole-image dilation, mask and size computations per target, every
  pool label file re-read while searching a donor, the donor image re-read per paste, whole-image
  chessboard distance transform, two whole-image blends and three whole-image median filters
  (disk 1, 1, 5) per pasted nucleus, then a whole-image pass per nucleus to rebuild the type map.
  ``skimage.filters.median``, which the official code calls, runs ``scipy.ndimage.median_filter``
  by default (skimage >= 0.19), so the baseline uses that filter directly. It runs on ONE tile;
  with ``--baseline_targets K`` (default 12; 0 = all) only K targets spread evenly over the
  processing order are run and the tile's time is extrapolated (said so in the output). The pool
  here has only ``--tiles`` label files (CoNSeP has 27), which makes the baseline's donor search
  cheaper than the official one's.

Usage:
    python benchmarks/bench_gradmix.py                     # 4 tiles, baseline on 12 targets
    python benchmarks/bench_gradmix.py --baseline_targets 0  # baseline on the whole tile (minutes)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from guided_diffusion.data.classes import CONSEP  # noqa: E402
from guided_diffusion.data.labels import instance_table  # noqa: E402
from guided_diffusion.data.readers import list_samples, read_label_file  # noqa: E402
from guided_diffusion.data.toy import ToyConfig, make_toy_dataset  # noqa: E402
from guided_diffusion.gradmix import GradMixConfig, run_gradmix  # noqa: E402
from guided_diffusion.gradmix.image import disk  # noqa: E402
from guided_diffusion.infra import fileio  # noqa: E402

TOY = ToyConfig(density=6.0, class_probs=(0.15, 0.30, 0.30, 0.25))


# ----------------------------------------------------------------------------- baseline


def _bbox(mask: np.ndarray):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def _paste(dst: np.ndarray, r0: int, c0: int, src: np.ndarray) -> None:
    """Copy ``src`` into ``dst`` at (r0, c0), clipped (the official script simply crashes there)."""
    h, w = src.shape[:2]
    rr0, cc0 = max(r0, 0), max(c0, 0)
    rr1, cc1 = min(r0 + h, dst.shape[0]), min(c0 + w, dst.shape[1])
    if rr1 > rr0 and cc1 > cc0:
        dst[rr0:rr1, cc0:cc1] = src[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0]


def official_like_tile(samples, index: int, seed: int, margin=30, fraction=0.8, max_targets=None) -> dict:
    """The official per-target, whole-image algorithm on tile ``index`` (see module docstring)."""
    rng = np.random.default_rng(seed)
    files = samples[index]
    t0 = time.perf_counter()
    img = fileio.read_image(files.image)
    inst, _types = read_label_file(files.label, CONSEP)
    ids, classes, cents = instance_table(inst, _types)
    h, w = inst.shape

    def eligible(cls_arr, cent, shape):
        ok = (cent[:, 0] >= margin) & (cent[:, 0] <= shape[1] - margin)
        ok &= (cent[:, 1] >= margin) & (cent[:, 1] <= shape[0] - margin)
        return np.where(ok, cls_arr, 0)

    cls_ok = eligible(classes, cents, inst.shape)
    major = np.flatnonzero(np.isin(cls_ok, (2, 3, 4)))
    picked = list(rng.choice(major, int(fraction * major.size), replace=False))
    picked.sort(key=lambda i: int((inst == ids[i]).sum()))  # whole-image size per target, as official
    # Pool: same tile first, then the others in random order; each other label file read once here.
    order = [index] + [int(j) for j in rng.permutation([j for j in range(len(samples)) if j != index])]
    pool = {}
    for j in order:
        if j == index:
            pool[j] = list(ids[cls_ok == 1])
        else:
            inst2, types2 = read_label_file(samples[j].label, CONSEP)
            ids2, cls2, cent2 = instance_table(inst2, types2)
            pool[j] = list(ids2[eligible(cls2, cent2, inst2.shape) == 1])
    fg = inst > 0
    mean_colour = np.array([img[..., c][fg].mean() for c in range(3)])
    final = img.copy()
    inst_out = inst.copy()
    new_class = dict(zip(ids.tolist(), classes.tolist()))
    foot = [disk(1), disk(1), disk(5)]
    run = picked
    if max_targets and max_targets < len(picked):
        # Evenly spread over the smallest-first order: the first targets are the smallest, which
        # rarely fit a donor and so are not representative of the tile.
        run = [picked[p] for p in np.unique(np.linspace(0, len(picked) - 1, max_targets).round().astype(int))]
    done = pasted = 0
    median_s = 0.0
    paste_seconds = []
    for i in run:
        done += 1
        t_target = time.perf_counter()
        tid = int(ids[i])
        mask0 = inst == tid
        mask = ndimage.binary_dilation(mask0, iterations=2)
        r0, r1, c0, c1 = _bbox(mask)
        size1 = int(mask.sum())
        found = None
        for j, cand in pool.items():  # official: loadmat of each pool file, per target
            inst2, _ = read_label_file(samples[j].label, CONSEP)
            for did in cand:
                if size1 >= 2.3 * int((inst2 == did).sum()):
                    cand.remove(did)
                    found = (j, inst2, did)
                    break
            if found:
                break
        if found is None:
            continue
        j, inst2, did = found
        pasted += 1
        img2 = fileio.read_image(samples[j].image).copy()  # re-read per paste, as official
        img2_orig = img2.copy()
        mask2 = inst2 == did
        ys, xs = np.nonzero(mask2)
        dcy, dcx = ys.mean(), xs.mean()
        b2 = _bbox(mask2)
        for c in range(3):
            img2[..., c][mask2] = (img2_orig[..., c][mask2] + mean_colour[c]) / 2
        new_class[tid] = 1
        inst_out[mask0] = 0
        img_copy = img.copy()
        _frame = img.copy()  # the official script also builds an uncoloured frame copy
        hh, ww = r1 - r0, c1 - c0
        sr, sc = int(round(dcy) - hh / 2), int(round(dcx) - ww / 2)
        crop = img2[max(sr, 0) : max(sr, 0) + hh, max(sc, 0) : max(sc, 0) + ww]
        _paste(img_copy, r0, c0, crop)
        translated = np.zeros_like(mask)
        ty, tx = cents[i, 1], cents[i, 0]
        h2, w2 = b2[1] - b2[0], b2[3] - b2[2]
        _paste(translated, int(round(ty) - h2 / 2), int(round(tx) - w2 / 2), mask2[b2[0] : b2[1], b2[2] : b2[3]])
        inst_out[translated] = tid
        union = mask | translated
        ring = union & ~translated
        cdt = ndimage.distance_transform_cdt(~translated, metric="chessboard").astype(np.float32)
        cdt[~union] = 0
        if ring.any():
            cdt[ring] -= 1
            top = cdt[ring].max()
            cdt[ring] = 1 - cdt[ring] / top if top > 0 else 1
        cdt[translated] = 1
        cw = cdt[..., None]
        final = (final * (1 - union[..., None]) + img_copy * translated[..., None]
                 + (img_copy * (cdt * ring)[..., None]).astype(np.uint8)
                 + (final * ((1 - cdt) * ring)[..., None]).astype(np.uint8)).astype(np.uint8)
        final = ((img_copy * cw).astype(np.uint8) + (final * (1 - cw)).astype(np.uint8))
        tm = time.perf_counter()
        smooth = np.stack([ndimage.median_filter(final[..., c], footprint=foot[c], mode="nearest") for c in range(3)], 2)
        median_s += time.perf_counter() - tm
        final = np.where(ring[..., None], smooth, final).astype(np.uint8)
        paste_seconds.append(time.perf_counter() - t_target)
    type_map = np.zeros_like(inst_out)
    for nid in np.unique(inst_out)[1:]:  # official: one whole-image pass per nucleus
        type_map[inst_out == nid] = new_class[int(nid)]
    return {"seconds": time.perf_counter() - t0, "targets_run": done, "targets_total": len(picked), "pasted": pasted,
            "median_seconds": median_s, "paste_seconds": paste_seconds}


# ----------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", type=int, default=4)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="runs of ours (best is reported)")
    p.add_argument("--baseline_targets", type=int, default=12, help="K targets spread over the tile, extrapolated; 0 = all")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "toy")
        make_toy_dataset(root, num_train=args.tiles, num_test=0, size=args.size, seed=args.seed, config=TOY, progress=False)
        samples = list_samples(root, "Train")
        counts = [instance_table(*read_label_file(s.label, CONSEP))[0].size for s in samples]
        print(f"{args.tiles} toy tiles {args.size}x{args.size}, nuclei per tile: {counts}")

        timings = {}
        for label, images in (("labels only", False), ("labels + images", True)):
            best = np.inf
            for rep in range(args.repeats):  # best of a few: the machine is shared and noisy
                out = os.path.join(tmp, f"out_{int(images)}_{rep}")
                t0 = time.perf_counter()
                summary = run_gradmix(GradMixConfig(data_dir=root, dataset_mode="consep", out_dir=out, num_balance=1, write_images=images, seed=args.seed, stats=False, progress=False, verbose=False))
                best = min(best, time.perf_counter() - t0)
            timings[label] = best / args.tiles
            replaced = [fileio.read_json(os.path.join(out, "Records", n + ".json"))["summary"]["replaced"] for n in summary["written"]]
        print(f"ours: nuclei replaced per tile: {replaced}")

        base = official_like_tile(samples, 0, args.seed, max_targets=args.baseline_targets or None)
        per_tile = base["seconds"]
        note = "measured on the whole tile"
        if base["targets_run"] < base["targets_total"]:
            # Lower bound: only pasted targets are counted (the tile's paste count taken from our
            # run on the same tile, same fit rule); targets without a donor add more in reality.
            per_tile = float(np.mean(base["paste_seconds"])) * replaced[0]
            note = (f"EXTRAPOLATED (lower bound) from {base['targets_run']} of {base['targets_total']} targets spread "
                    f"evenly over the order: {np.mean(base['paste_seconds']):.2f} s per pasted nucleus x "
                    f"{replaced[0]} pastes in this tile, targets without a donor not counted")
        print(f"baseline (official per-nucleus whole-image approach), tile 0: {per_tile:.1f} s per tile, {note}; "
              f"median filters {100 * base['median_seconds'] / base['seconds']:.0f}% of the baseline's time")
        for label, sec in timings.items():
            print(f"ours, {label:<16}: {sec:.3f} s per tile   speed-up vs baseline x{per_tile / sec:.0f}")


if __name__ == "__main__":
    main()
