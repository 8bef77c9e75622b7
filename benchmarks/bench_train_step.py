"""Training step against the official computation (issue 13 section 3), FLOPs, profile, SPADE width.

Measured in one process on the same model weights, batch and thread count (fp32, CPU by default):

* ours: ``TrainLoop.run_step`` (forward, loss, backward, gradient norm, AdamW, EMA, logging);
* the official computation pattern, re-created here: the same U-Net but every attention block
  checkpointed (the official ``AttentionBlock`` always recomputes in backward, whatever
  ``use_checkpoint`` says) and computed with two einsums and a float32 softmax (``QKVAttentionLegacy``);
  gradients zeroed in place; gradient and parameter norms logged every step with one ``.item()``
  per tensor (the official ``MixedPrecisionTrainer``); EMA as a
  Python loop of ``mul_``/``add_`` per parameter; the same ``AdamW``, ``training_losses`` and
  ``log_loss_dict``.

Both compute the same numbers (the script checks the loss and the gradients on one batch). Rounds
alternate between the two and the best time of each counts. FLOPs of forward + backward come from
``torch.utils.flop_counter.FlopCounterMode``. ``--profile`` adds where our step's time goes: the parts
timed alone at the step's shapes (SPADE label branches, attention blocks, optimizer, EMA, logging)
and the torch.profiler table of the top operators. ``--spade_widths 128,32`` compares SPADE hidden
widths (steps/s and FLOPs of our step).

    python benchmarks/bench_train_step.py --profile        # the issue-11 config, batch 4, 1 thread
    python benchmarks/bench_train_step.py --spade_widths 128,32
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.utils.checkpoint  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)
from guided_diffusion import logger  # noqa: E402
from guided_diffusion import train_util as tu  # noqa: E402
from guided_diffusion.infra.config import ModelConfig  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion  # noqa: E402
from guided_diffusion.unet import AttentionBlock  # noqa: E402

# The SDM of issue 11 (the CPU real-data model), trained at batch 4.
DEFAULT_MODEL = dict(image_size=128, num_channels=32, channel_mult="1,2,2,2", num_res_blocks=1,
                     attention_resolutions="16", num_head_channels=32, learn_sigma=True, resblock_updown=True,
                     use_scale_shift_norm=True, num_classes=5, class_cond=True)


# --------------------------------------------------------------------------------------------
# The official computation pattern
# --------------------------------------------------------------------------------------------


def legacy_attention(qkv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Official-form multi-head attention of a packed qkv [N, 3 * heads * ch, T] -> [N, heads * ch, T]:
    per head split into q, k, v, both q and k scaled by ch^-1/4, weights by einsum, float32 softmax,
    output by einsum."""
    bs, width, length = qkv.shape
    ch = width // (3 * n_heads)
    q, k, v = qkv.reshape(bs * n_heads, 3 * ch, length).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def _official_attention_body(self: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    h = legacy_attention(self.qkv(self.norm(x)), self.num_heads)
    return (x + self.proj_out(h)).reshape(b, c, *spatial)


def _official_attention_forward(self: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    # The official block passes flag=True to its checkpoint helper unconditionally: the forward is
    # recomputed in backward. (Its helper is re-entrant; torch's non-reentrant form does the same
    # recomputation and, unlike the re-entrant one, lets FlopCounterMode see it.)
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(_official_attention_body, self, x, use_reentrant=False)
    return _official_attention_body(self, x)


def officialize(model: torch.nn.Module) -> torch.nn.Module:
    """Switch every attention block of ``model`` to the official computation (in place)."""
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.forward = types.MethodType(_official_attention_forward, m)
    return model


class OfficialStep:
    """One official-form training step (see the module docstring) of ``model`` (already officialized)."""

    def __init__(self, model, diffusion, lr: float, ema_rate: float, seed: int = 0):
        self.model, self.diffusion = model, diffusion
        self.params = list(model.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.params]
        self.rate = ema_rate
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for p in self.params:  # the official zero_grad zeroes in place
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()
        n = x.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (n,), generator=self.gen)
        weights = torch.ones(n)
        losses = self.diffusion.training_losses(self.model, x, t, model_kwargs={"y": y})
        loss = (losses["loss"] * weights).mean()
        tu.log_loss_dict(self.diffusion.num_timesteps, t, {k: v * weights for k, v in losses.items()})
        loss.backward()
        grad_sq = param_sq = 0.0  # the official norms: one .item() per parameter and per gradient
        with torch.no_grad():
            for p in self.params:
                param_sq += torch.norm(p, p=2, dtype=torch.float32).item() ** 2
                grad_sq += torch.norm(p.grad, p=2, dtype=torch.float32).item() ** 2
        logger.logkv_mean("grad_norm", math.sqrt(grad_sq))
        logger.logkv_mean("param_norm", math.sqrt(param_sq))
        self.opt.step()
        with torch.no_grad():
            for targ, src in zip(self.ema, self.params):
                targ.mul_(self.rate).add_(src, alpha=1 - self.rate)
        self.step += 1
        logger.logkv("step", self.step)
        logger.logkv("samples", self.step * n)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def build(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    model, diffusion = create_model_and_diffusion(**ModelConfig(**cfg).to_dict())
    common.perturb_weights(model, seed=seed)  # non-zero output convs, so every gradient is non-trivial
    return model.train(), diffusion


def batch(cfg: dict, n: int, seed: int = 1):
    from gpu_check import sdm_inputs  # toy H&E tiles and their condition

    y, x = sdm_inputs(n, cfg["image_size"], "cpu", seed=seed)
    return x, y


def forward_backward_flops(model, diffusion, x, y) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    t = torch.full((x.shape[0],), diffusion.num_timesteps // 2)
    with FlopCounterMode(display=False) as fc:
        diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=torch.randn_like(x))["loss"].mean().backward()
    model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def same_computation(cfg: dict, x, y) -> dict:
    """Loss and gradients of ours and of the official form on one batch (same weights, t, noise)."""
    ours, diffusion = build(cfg)
    official, _ = build(cfg)
    officialize(official)
    t = torch.arange(x.shape[0]) * (diffusion.num_timesteps // x.shape[0])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    out = {}
    for name, model in (("ours", ours), ("official", official)):
        loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y}, noise=noise)["loss"].mean()
        loss.backward()
        out[name] = (loss.detach(), [p.grad for p in model.parameters()])
    grad_diff = max(float((a - b).abs().max()) for a, b in zip(out["ours"][1], out["official"][1]))
    return {"loss_equal": bool(torch.equal(out["ours"][0], out["official"][0])), "max_grad_diff": grad_diff,
            "grads_bitwise_equal": grad_diff == 0.0}


def make_loop(model, diffusion, x, y, folder):
    class Batches:
        def __next__(self):
            return x, {"y": y}

    return tu.TrainLoop(model=model, diffusion=diffusion, data=Batches(), batch_size=x.shape[0], lr=1e-4,
                        ema_rate="0.9999", log_dir=folder, progress=False, precision="fp32",
                        save_interval=10**9, log_interval=10**9)


def best_times(variants: dict, rounds: int, warmup: int = 1) -> dict:
    """Best wall time and best CPU time (s) per call of each ``fn()``: ``{name: (wall, cpu)}``.

    Rounds are interleaved, so load bursts hit every variant alike. On a shared, oversubscribed
    machine the process CPU time (one thread: the time this process actually computed) is the
    steadier figure; wall time also counts waiting for a core.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    best = {k: (math.inf, math.inf) for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[k] = (min(best[k][0], wall), min(best[k][1], cpu))
    return best


def compare_official(cfg: dict, n: int, rounds: int) -> None:
    x, y = batch(cfg, n)
    check = same_computation(cfg, x, y)
    ours, diffusion = build(cfg)
    official, _ = build(cfg)
    officialize(official)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    flops_ours = forward_backward_flops(ours, diffusion, x, y)
    flops_off = forward_backward_flops(official, diffusion, x, y)
    with tempfile.TemporaryDirectory() as folder:
        logger.configure(folder, format_strs=())
        loop = make_loop(ours, diffusion, x, y, folder)
        off = OfficialStep(official, diffusion, lr=1e-4, ema_rate=0.9999)
        best = best_times({"ours": lambda: loop.run_step(x, {"y": y}), "official": lambda: off(x, y)}, rounds)
        logger.dumpkvs()
        logger.close()
    print(f"config: {cfg['image_size']} px, {cfg['num_channels']} ch, mult {cfg['channel_mult']}, spade_hidden "
          f"{cfg.get('spade_hidden', 128)}, batch {n}, {params:.2f} M params, fp32, {torch.get_num_threads()} thread(s), "
          f"best of {rounds} interleaved rounds")
    print(f"same computation: loss equal {check['loss_equal']}, max |grad diff| {check['max_grad_diff']:.3g}")
    print(f"{'':28s}{'official form':>16s}{'ours':>12s}{'ratio':>9s}")
    for i, what in enumerate(("wall", "CPU")):
        off, ours_t = best["official"][i], best["ours"][i]
        print(f"{'step, ' + what + ' time (s)':28s}{off:16.3f}{ours_t:12.3f}{off / ours_t:9.3f}")
        print(f"{'steps/s (' + what + ')':28s}{1 / off:16.3f}{1 / ours_t:12.3f}")
    print(f"{'fwd+bwd GFLOP per step':28s}{flops_off / 1e9:16.2f}{flops_ours / 1e9:12.2f}{flops_off / flops_ours:9.3f}")


def width_comparison(cfg: dict, n: int, rounds: int, widths) -> None:
    x, y = batch(cfg, n)
    loops, rows = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        logger.configure(folder, format_strs=())
        for w in widths:
            model, diffusion = build(dict(cfg, spade_hidden=w))
            rows[w] = (sum(p.numel() for p in model.parameters()) / 1e6, forward_backward_flops(model, diffusion, x, y))
            loops[w] = make_loop(model, diffusion, x, y, os.path.join(folder, str(w)))
        best = best_times({w: (lambda lp=lp: lp.run_step(x, {"y": y})) for w, lp in loops.items()}, rounds)
        logger.close()
    base = widths[0]
    print(f"SPADE hidden width, {cfg['image_size']} px, {cfg['num_channels']} ch, batch {n}, fp32, "
          f"{torch.get_num_threads()} thread(s), best of {rounds} interleaved rounds")
    print(f"{'spade_hidden':>12s}{'params (M)':>12s}{'GFLOP/step':>12s}{'wall (s)':>10s}{'CPU (s)':>9s}"
          f"{'steps/s (CPU)':>15s}{'speed-up (CPU)':>16s}")
    for w in widths:
        wall, cpu = best[w]
        print(f"{w:12d}{rows[w][0]:12.2f}{rows[w][1] / 1e9:12.2f}{wall:10.3f}{cpu:9.3f}{1 / cpu:15.3f}"
              f"{best[base][1] / cpu:16.2f}")


def profile(cfg: dict, n: int, rounds: int) -> None:
    """Where our step's time goes: its parts timed alone at the step's shapes, then torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x, y = batch(cfg, n)
    model, diffusion = build(cfg)
    with tempfile.TemporaryDirectory() as folder:
        logger.configure(folder, format_strs=())
        loop = make_loop(model, diffusion, x, y, folder)
        # Inputs of every attention block in one training forward.
        attn_inputs = []
        hooks = [m.register_forward_pre_hook(lambda m, a: attn_inputs.append((m, a[0].detach())))
                 for m in model.modules() if isinstance(m, AttentionBlock)]
        loop.run_step(x, {"y": y})
        for h in hooks:
            h.remove()

        def spade_branches():
            # Every SPADE gamma/beta of the model at the step's sizes: the label-branch convs of training.
            sum(t.sum() for p in model.spade_cache(y).params for t in p).backward()

        def attention(official: bool):
            def run():
                for m, a in attn_inputs:
                    a = a.clone().requires_grad_(True)
                    out = _official_attention_forward(m, a) if official else m(a)
                    out.sum().backward()
            return run

        ema = loop.ema_params[0]
        parts = {
            "whole step (ours)": lambda: loop.run_step(x, {"y": y}),
            "SPADE label branches, fwd+bwd": spade_branches,
            "attention blocks, fwd+bwd (ours)": attention(False),
            "attention blocks, fwd+bwd (official form)": attention(True),
            "AdamW step": loop.opt.step,
            "EMA update": lambda: tu.update_ema(ema, loop.params, 0.9999),
            "gradient norm (ours)": lambda: torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in loop.params])),
            "loss logging": lambda: tu.log_loss_dict(diffusion.num_timesteps, torch.arange(n),
                                                     {"loss": torch.rand(n), "mse": torch.rand(n), "vb": torch.rand(n)}),
        }
        best = best_times(parts, rounds)
        whole = best["whole step (ours)"][1]
        print(f"where the time goes: {cfg['image_size']} px, {cfg['num_channels']} ch, spade_hidden "
              f"{cfg.get('spade_hidden', 128)}, batch {n}, fp32, {torch.get_num_threads()} thread(s), best of {rounds}")
        print(f"  {'':45s}{'CPU ms':>10s}{'share':>8s}{'wall ms':>10s}")
        for k, (wall, cpu) in best.items():
            print(f"  {k:45s}{cpu * 1000:10.1f}{100 * cpu / whole:7.1f}%{wall * 1000:10.1f}")
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            loop.run_step(x, {"y": y})
        logger.close()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--image_size", type=int, default=DEFAULT_MODEL["image_size"])
    p.add_argument("--num_channels", type=int, default=DEFAULT_MODEL["num_channels"])
    p.add_argument("--channel_mult", default=DEFAULT_MODEL["channel_mult"])
    p.add_argument("--num_res_blocks", type=int, default=DEFAULT_MODEL["num_res_blocks"])
    p.add_argument("--attention_resolutions", default=DEFAULT_MODEL["attention_resolutions"])
    p.add_argument("--num_head_channels", type=int, default=DEFAULT_MODEL["num_head_channels"])
    p.add_argument("--spade_hidden", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best counts")
    p.add_argument("--threads", type=int, default=1, help="1 keeps timings stable on a shared machine")
    p.add_argument("--profile", action="store_true", help="also show where our step's time goes")
    p.add_argument("--spade_widths", default="", help="compare SPADE hidden widths instead, e.g. 128,32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dict(DEFAULT_MODEL, **{k: getattr(args, k) for k in ("image_size", "num_channels", "channel_mult",
               "num_res_blocks", "attention_resolutions", "num_head_channels", "spade_hidden")})
    print(f"machine: {common.machine()}")
    if args.spade_widths:
        width_comparison(cfg, args.batch_size, args.rounds, [int(w) for w in args.spade_widths.split(",")])
        return
    compare_official(cfg, args.batch_size, args.rounds)
    if args.profile:
        profile(cfg, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
