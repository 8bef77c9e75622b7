"""Guided sampling step: plain (two full forwards) vs fast (shared encoder + cached SPADE modulation).

Both are measured in this process on the same model and inputs; the ratio plain / fast is the
speed-up of one classifier-free-guided denoiser call. The SPADE caches are built once per
condition (not per step), so their cost is printed separately and amortised over ``--steps``.
Also compares channels_last memory format.

    python benchmarks/bench_unet_fast.py            # 128 px, 64 channels, batch 2 (defaults)
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from guided_diffusion.script_util import create_model
from guided_diffusion.synthesis import FastGuidedDenoiser, PlainGuidedDenoiser


def timed(variants: dict, repeats: int) -> dict:
    """Best wall time (s) of each ``fn()`` in ``variants`` over ``repeats`` interleaved rounds.

    Rounds alternate between the variants and the minimum is kept, so background load on a shared
    machine biases neither side (the minimum is the run least disturbed by other processes).
    """
    for fn in variants.values():  # warm-up
        fn()
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--num_channels", type=int, default=64)
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--attention_resolutions", default="16,8")
    p.add_argument("--num_classes", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=55, help="sampling steps that share one SPADE cache")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_channels_last", action="store_true")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = create_model(
        image_size=args.image_size, num_classes=args.num_classes, num_channels=args.num_channels,
        num_res_blocks=args.num_res_blocks, attention_resolutions=args.attention_resolutions,
        num_head_channels=64, class_cond=True, learn_sigma=True, use_scale_shift_norm=True,
        resblock_updown=True,
    ).eval()
    with torch.no_grad():  # the official init zeroes output convs; random weights make the check meaningful
        for prm in model.parameters():
            prm.normal_(0, 0.02)
    n, c, size = args.batch, model.num_classes, args.image_size
    x = torch.randn(n, 3, size, size)
    t = torch.full((n,), 500)
    y = torch.zeros(n, c, size, size)
    y[:, 0] = 1
    y[:, 0, size // 4: size // 2, size // 4: size // 2] = 0
    y[:, 1, size // 4: size // 2, size // 4: size // 2] = 1
    null = torch.zeros(1, c, size, size)
    s = args.scale

    plain_denoiser = PlainGuidedDenoiser(model, y, s)

    def plain():
        return plain_denoiser(x, t)

    print(f"model: {size} px, {args.num_channels} ch, num_res_blocks {args.num_res_blocks}, "
          f"attention {args.attention_resolutions}, batch {n}, threads {torch.get_num_threads()}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    with torch.no_grad():
        fast, fast_batched = FastGuidedDenoiser(model, y, s), FastGuidedDenoiser(model, y, s, batched=True)
        err = (fast(x, t) - plain()).abs().max().item()
        variants = {
            "plain": plain,
            "fast": lambda: fast(x, t),
            "fast_batched": lambda: fast_batched(x, t),
            "cache": lambda: (model.spade_cache(y), model.spade_cache(null)),
        }
        best = timed(variants, args.repeats)
        t_plain, t_fast, t_fast_b, t_cache = (best[k] for k in ("plain", "fast", "fast_batched", "cache"))
        print(f"max |fast - plain| = {err:.2e} (outputs up to {plain().abs().max().item():.2f})")
        print(f"plain guided step (2 full forwards):        {t_plain * 1e3:8.1f} ms")
        print(f"fast guided step (1 encoder, 2 decoders):   {t_fast * 1e3:8.1f} ms   ratio {t_plain / t_fast:.2f}x")
        print(f"fast guided step, branches batched:         {t_fast_b * 1e3:8.1f} ms   ratio {t_plain / t_fast_b:.2f}x")
        amortised = t_fast + t_cache / args.steps
        print(f"SPADE caches (cond + null), once per sample: {t_cache * 1e3:8.1f} ms -> "
              f"{args.steps}-step amortised ratio {t_plain / amortised:.2f}x")

        if not args.no_channels_last:
            model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # .to() is in place
            x_cl = x.contiguous(memory_format=torch.channels_last)
            y_cl = y.contiguous(memory_format=torch.channels_last)
            plain_denoiser_cl = PlainGuidedDenoiser(model_cl, y_cl, s)
            fast_cl = FastGuidedDenoiser(model_cl, y_cl, s)

            def plain_cl():
                return plain_denoiser_cl(x_cl, t)

            best_cl = timed(
                {
                    "plain": plain,
                    "plain_cl": plain_cl,
                    "fast": lambda: fast(x, t),
                    "fast_cl": lambda: fast_cl(x_cl, t),
                },
                args.repeats,
            )
            print(f"channels_last plain:                        {best_cl['plain_cl'] * 1e3:8.1f} ms   "
                  f"({best_cl['plain'] / best_cl['plain_cl']:.2f}x vs contiguous plain in the same rounds)")
            print(f"channels_last fast:                         {best_cl['fast_cl'] * 1e3:8.1f} ms   "
                  f"({best_cl['fast'] / best_cl['fast_cl']:.2f}x vs contiguous fast in the same rounds)")


if __name__ == "__main__":
    main()
