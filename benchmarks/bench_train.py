"""Training throughput and peak memory, with and without gradient checkpointing, same run.

Each setting runs in its own subprocess (so peak-memory figures do not mix) that builds the SDM
U-Net at a small config, then times ``TrainLoop.run_step`` (forward, backward, AdamW, EMA) on
random in-memory batches after warm-up steps. Memory:

* CPU: peak resident set size of the subprocess (``resource.getrusage`` ``ru_maxrss``), and its
  growth over the RSS measured just before training (the activations, gradients and optimizer
  state; tracemalloc does not see torch's allocator);
* CUDA: ``torch.cuda.max_memory_allocated``.

Baseline: the same config without checkpointing (``--use_checkpoint False``). The printed ratios
are checkpointing / baseline: speed below 1 (recomputing activations costs time), memory below 1.

Usage:
    python benchmarks/bench_train.py                          # 64 px, 32 channels, batch 4, CPU
    python benchmarks/bench_train.py --image_size 256 --num_channels 256 --channel_mult '' \
        --attention_resolutions 32,16,8 --num_head_channels 64 --batch_size 4 --precision bf16   # paper size, GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _rss_kb() -> int:
    """Current resident set size (KiB) from /proc (Linux); 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError):
        return 0


def run_setting(args: argparse.Namespace, use_checkpoint: bool) -> dict:
    """Train in this process and return the measurements (called in the child)."""
    import torch

    from guided_diffusion import logger
    from guided_diffusion import train_util as tu
    from guided_diffusion.infra.config import ModelConfig
    from guided_diffusion.script_util import create_model_and_diffusion

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(
        image_size=args.image_size, num_classes=5, num_channels=args.num_channels, num_res_blocks=2,
        num_head_channels=args.num_head_channels, attention_resolutions=args.attention_resolutions, class_cond=True,
        channel_mult=args.channel_mult,
        learn_sigma=True, resblock_updown=True, use_checkpoint=use_checkpoint, diffusion_steps=1000,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, diffusion = create_model_and_diffusion(**cfg.to_dict())
    model.to(device)
    g = torch.Generator().manual_seed(1)
    s = args.image_size
    x = torch.rand(args.batch_size, 3, s, s, generator=g) * 2 - 1
    y = (torch.rand(args.batch_size, 6, s, s, generator=g) > 0.8).float()

    class Batches:
        def __next__(self):
            return x, {"y": y}

    with tempfile.TemporaryDirectory() as folder:
        logger.configure(folder, format_strs=())
        loop = tu.TrainLoop(model=model, diffusion=diffusion, data=Batches(), batch_size=args.batch_size,
                            lr=1e-4, ema_rate="0.9999", log_dir=folder, progress=False,
                            precision=args.precision, save_interval=10**9, log_interval=10**9)
        rss_before = _rss_kb()
        for _ in range(args.warmup):
            loop.run_step(x, {"y": y})
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loop.run_step(x, {"y": y})
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    out = {
        "use_checkpoint": use_checkpoint,
        "device": str(device),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "steps_per_sec": args.steps / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
    }
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--num_channels", type=int, default=32)
    p.add_argument("--channel_mult", default="1,2,2", help="'' for the official default of the size")
    p.add_argument("--attention_resolutions", default="16,8")
    p.add_argument("--num_head_channels", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs per setting (alternating); the fastest counts")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (CPU); 1 keeps timings stable on a shared machine")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        print(json.dumps(run_setting(args, args.child == "on")))
        return

    # Settings alternate (off, on, off, on, ...) and each keeps its fastest repeat, so a burst of
    # load from other processes on a shared machine does not decide the ratio.
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        for setting in ("off", "on"):
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", setting]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"setting use_checkpoint={setting} failed:\n{proc.stderr}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            if setting not in results or r["steps_per_sec"] > results[setting]["steps_per_sec"]:
                results[setting] = r
    base, ckpt = results["off"], results["on"]
    print(f"config: {args.image_size}px, {args.num_channels} channels, batch {args.batch_size}, "
          f"{base['params_m']:.1f} M params, {args.precision}, device {base['device']}, {args.threads} thread(s), "
          f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.repeats}")
    keys = ["steps_per_sec", "peak_rss_mib", "rss_growth_mib"] + (["cuda_peak_mib"] if "cuda_peak_mib" in base else [])
    print(f"{'':22s}{'baseline (no ckpt)':>20s}{'use_checkpoint':>18s}{'ratio':>9s}")
    for k in keys:
        print(f"{k:22s}{base[k]:20.3f}{ckpt[k]:18.3f}{ckpt[k] / base[k]:9.3f}")


if __name__ == "__main__":
    main()
