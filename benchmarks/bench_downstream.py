"""Downstream network cost: the CPU-sized HoVer-Net variant vs MONAI's full HoVer-Net (fast mode), same run.

Timed (wall and process CPU seconds; on a busy shared machine CPU seconds at --threads 1 are the
stable figure, roughly the wall time one idle core would take):

1. a full training step of the small network as the cpu preset runs it: seeded crops with rot90/flips,
   HV/NP/NC targets (MONAI ComputeHoVerMaps), forward, HoVerNetLoss, backward, Adam;
2. forward + backward at 256 px of the small network and of MONAI's HoVerNet (fast mode, 256 px,
   decoder padding) on the same batch: the ratio is the baseline comparison;
3. prediction of real 256 px images: sliding-window forward + MONAI HoVer-Net post-processing;
4. parameter counts.

    python benchmarks/bench_downstream.py --data_dir ../shared/data/consep256 --dataset_mode custom \\
        --num_classes 5 --threads 1
    (without --data_dir: toy tiles of 256 px in a temporary folder)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch


def timed(fn, repeat: int):
    """(median wall s, median CPU s) over ``repeat`` calls after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default="")
    p.add_argument("--dataset_mode", default="consep")
    p.add_argument("--num_classes", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--crop_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed small-network training steps")
    p.add_argument("--images", type=int, default=4, help="timed predictions")
    p.add_argument("--hovernet_batch", type=int, default=1)
    p.add_argument("--hovernet_repeat", type=int, default=1, help="0 skips the HoVer-Net baseline")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from monai.apps.pathology.losses import HoVerNetLoss

    from guided_diffusion.data.classes import resolve_class_table
    from guided_diffusion.data.readers import read_dataset
    from guided_diffusion.data.toy import make_toy_dataset
    from guided_diffusion.data.training import TrainCropDataset
    from guided_diffusion.downstream.data import MixedBatches
    from guided_diffusion.downstream.nets import NetConfig, build_network, parameter_count
    from guided_diffusion.downstream.predict import postprocess, predict_image
    from guided_diffusion.downstream.targets import HV, NC, NP, hovernet_targets

    data_dir = args.data_dir
    if not data_dir:
        data_dir = tempfile.mkdtemp()
        make_toy_dataset(data_dir, num_train=4, num_test=args.images, size=256, seed=0, progress=False)
        args.dataset_mode = "consep"
    table = resolve_class_table(args.dataset_mode, None, args.num_classes)
    train = read_dataset(data_dir, table, "Train", progress=False)
    test = read_dataset(data_dir, table, "Test", progress=False)[: args.images]
    n = table.num_classes
    loss_fn = HoVerNetLoss()
    print(f"threads {args.threads}; data {data_dir}: {len(train)} train, {len(test)} test images")

    torch.manual_seed(0)
    small = build_network(NetConfig("small", n, args.width))
    opt = torch.optim.Adam(small.parameters(), lr=1e-3)
    batches = MixedBatches(TrainCropDataset(train, args.crop_size), None, args.batch_size, 0.0, 0, n)
    step = [0]

    def train_step(model, optim, batch):
        x, targets, _ = batch
        loss = loss_fn(model(x), targets)
        optim.zero_grad()
        loss.backward()
        optim.step()

    def small_step():
        train_step(small, opt, batches.batch(step[0]))
        step[0] += 1

    w, c = timed(small_step, args.steps)
    print(f"small (width {args.width}, {parameter_count(small):,} parameters): training step, batch "
          f"{args.batch_size} x {args.crop_size} px incl. crops and targets: {w:.2f} s wall, {c:.2f} s CPU")
    x_only = timed(lambda: batches.batch(0), 2)
    print(f"  of which crops + targets: {x_only[0]:.2f} s wall, {x_only[1]:.2f} s CPU")

    big_batch = MixedBatches(TrainCropDataset(train, 256), None, args.hovernet_batch, 0.0, 0, n).batch(0)
    ws, cs = timed(lambda: train_step(small, opt, big_batch), 2)
    print(f"small: forward+backward batch {args.hovernet_batch} x 256 px: {ws:.2f} s wall, {cs:.2f} s CPU")
    hover = build_network(NetConfig("hovernet", n))
    print(f"MONAI HoVerNet fast mode: {parameter_count(hover):,} parameters")
    if args.hovernet_repeat:
        hopt = torch.optim.Adam(hover.parameters(), lr=1e-4)
        wh, ch = timed(lambda: train_step(hover, hopt, big_batch), args.hovernet_repeat)
        print(f"HoVerNet: forward+backward batch {args.hovernet_batch} x 256 px: {wh:.2f} s wall, {ch:.2f} s CPU")
        print(f"ratio HoVerNet / small at 256 px: {wh / ws:.1f}x wall, {ch / cs:.1f}x CPU")

    small.eval()
    dev = torch.device("cpu")
    net = NetConfig("small", n, args.width)
    fw, fc, pw, pc = [], [], [], []
    for s in test:
        t, c0 = time.perf_counter(), time.process_time()
        out = predict_image(small, net, s.image, 256, dev)
        t1, c1 = time.perf_counter(), time.process_time()
        postprocess(out)
        fw.append(t1 - t), fc.append(c1 - c0)
        pw.append(time.perf_counter() - t1), pc.append(time.process_time() - c1)
    print(f"prediction per {test[0].shape[0]} px image (small, after {args.steps + 1} training steps): forward "
          f"{np.median(fw):.2f} s wall / {np.median(fc):.2f} s CPU, post-processing {np.median(pw):.2f} s wall / "
          f"{np.median(pc):.2f} s CPU")
    # A trained network finds about the true nuclei; post-processing cost grows with their number.
    cw, cc, counts = [], [], []
    for s in test:
        t = hovernet_targets(torch.from_numpy(s.inst_map.astype(np.int64))[None],
                             torch.from_numpy(s.type_map.astype(np.int64))[None], n)
        clean = {NP: t[NP][0] * 20 - 10, HV: t[HV][0], NC: t[NC][0] * 20 - 10}
        w0, c0 = time.perf_counter(), time.process_time()
        inst, _ = postprocess(clean)
        cw.append(time.perf_counter() - w0), cc.append(time.process_time() - c0), counts.append(int(inst.max()))
    print(f"post-processing of the true maps ({int(np.median(counts))} nuclei per image, median): "
          f"{np.median(cw):.2f} s wall / {np.median(cc):.2f} s CPU per image")


if __name__ == "__main__":
    main()
