"""Guided DDIM synthesis: the official computation (two full U-Net forwards per step) vs the exact
fast path (SPADE gamma/beta cached per patch, encoder shared by both guidance branches).

Both run in this process on the same model, inputs and noise, interleaved, and the script prints
the per-batch times, their ratio and the largest difference between the two samples (the fast path
is exact: same arithmetic, float rounding only). The fast timing includes building the two SPADE
caches, which happens once per batch of patches.

    python benchmarks/bench_sampling.py                 # 128 px, 64 channels, batch 2, 4 DDIM steps, s=1.5
    python benchmarks/bench_sampling.py --channels_last true --precision bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from guided_diffusion import samplers as smp
from guided_diffusion import synthesis as syn
from guided_diffusion.data import build_condition
from guided_diffusion.infra.config import ModelConfig, str2bool
from guided_diffusion.script_util import create_model_and_diffusion


def build(args):
    cfg = ModelConfig(
        image_size=args.image_size, num_classes=5, num_channels=args.num_channels, num_res_blocks=2,
        num_head_channels=32, attention_resolutions="16,8", class_cond=True, learn_sigma=True,
        resblock_updown=True, use_scale_shift_norm=True, timestep_respacing=f"ddim{args.respaced}",
    ).to_dict()
    model, diffusion = create_model_and_diffusion(**cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # official init zeroes some convs; perturb so every branch matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval(), diffusion


def inputs(args):
    n, s = args.batch, args.image_size
    gen = torch.Generator().manual_seed(1)
    inst = torch.zeros(n, s, s, dtype=torch.long)
    types = torch.zeros(n, s, s, dtype=torch.long)
    for k in range(12):  # a few rectangular "nuclei" per patch
        y0, x0 = (torch.randint(0, s - 20, (2,), generator=gen)).tolist()
        inst[:, y0 : y0 + 14, x0 : x0 + 18] = k + 1
        types[:, y0 : y0 + 14, x0 : x0 + 18] = 1 + k % 4
    y = build_condition(types, inst, 5)
    ref = torch.rand(n, 3, s, s, generator=gen) * 2 - 1
    return y, ref


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--num_channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--respaced", type=int, default=10, help="ddimN respacing")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps run (partial start)")
    parser.add_argument("--s", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--channels_last", type=str2bool, default=False, help="also time the fast path in channels_last")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="autocast for an extra fast-path timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, diffusion = build(args)
    sched = smp.as_schedule(diffusion)
    y, ref = inputs(args)
    seeds = list(range(args.batch))

    def plain():
        return syn.sample_batch(syn.PlainGuidedDenoiser(model, y, args.s), sched, ref, args.steps, syn.PerSampleNoise(seeds))

    def fast(m=model, yy=y, rr=ref, autocast=False):
        den = syn.FastGuidedDenoiser(m, yy, args.s)
        if autocast:
            den = syn.with_autocast(den, "bf16", torch.device("cpu"))
        return syn.sample_batch(den, sched, rr, args.steps, syn.PerSampleNoise(seeds))

    variants = {"plain (official: 2 full forwards/step)": plain, "fast (cached SPADE + shared encoder)": fast}
    if args.channels_last:
        model_cl = build(args)[0].to(memory_format=torch.channels_last)
        model_cl.load_state_dict(model.state_dict())
        y_cl, ref_cl = y.contiguous(memory_format=torch.channels_last), ref.contiguous(memory_format=torch.channels_last)
        variants["fast + channels_last"] = lambda: fast(model_cl, y_cl, ref_cl)
    if args.precision == "bf16":
        variants["fast + bf16 autocast"] = lambda: fast(autocast=True)

    outputs, times = {}, {k: [] for k in variants}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up (allocator, first-call overheads)
            outputs[name] = fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():  # interleaved, so machine load affects all alike
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

    print(f"config: {args.image_size} px, {args.num_channels} channels, batch {args.batch}, "
          f"{args.steps} DDIM steps (ddim{args.respaced}), s={args.s}, threads {args.threads}, "
          f"median of {args.repeats} (after a warm-up)")
    names = list(variants)
    base = statistics.median(times[names[0]])
    for name in names:
        med = statistics.median(times[name])
        diff = (outputs[name] - outputs[names[0]]).abs().max().item()
        print(f"  {name:42s} {med:7.2f} s/batch  {base / med:5.2f}x  max|diff| vs plain {diff:.2e}")
    ratio = base / statistics.median(times[names[1]])
    print(f"speed-up fast vs plain: {ratio:.2f}x")


if __name__ == "__main__":
    main()
