"""Fewer sampling steps, same data (issue 13 section 2): DDIM-55 vs DPM-Solver++(2M) at 8-20 steps.

For N patches of a dataset (its own labels, or GradMix maps with ``--label_dir``), every method starts
from the SAME SDEdit state -- the real patch noised to the start step of ``--ddim_percent`` with the
pipeline's per-patch noise seeds -- and denoises over the same interval [0, t_start]:

* the reference: DDIM over the respaced steps (``--timestep_respacing ddim100 --ddim_percent 55``:
  the paper's 55 guided steps), computed by the synthesis pipeline's own ``sample_batch``, so it is
  exactly what ``image_sample.py`` writes for these patches;
* DPM-Solver++(2M) with K model calls (``--compare_steps 8,10,15,20``) at timesteps of the trained
  1000-step grid spaced evenly in log-SNR between t_start and 0, from the same start state: exactly
  what ``image_sample.py --sampler dpmpp2m --solver_steps K`` writes (``synthesis.solver_plan``);
* a noise floor: the same DDIM with the noise of ``--seed + 1`` (``--noise_floor True``), i.e. how
  far two equally valid samples of the same patch lie apart.

Reported per method: PSNR and SSIM to the DDIM result (MONAI's ``PSNRMetric`` / ``SSIMMetric`` on
the uint8 images the pipeline writes, scaled to [0, 1]; mean and standard deviation over patches),
wall time per patch (including the SPADE caches, built once per batch and shared by the methods) and
the speed-up over DDIM; and, with a fidelity scorer, its scores pooled over the patches, plus a row
for the unsampled real patches under the same maps (with the dataset's own labels, the ceiling; with
virtual maps, the score of not synthesising at all). A method is "within noise" when its PSNR and
SSIM to DDIM exceed the noise floor's (it is closer to DDIM-55 than a re-draw of the noise is). Its
label fidelity is within noise when, for every score, the mean over patches of |its per-patch score -
DDIM's| is no larger than the noise floor's: it changes what the segmenter finds no more than a
re-draw of the noise does. (Per patch and paired, because pooled scores over a dozen patches move by
a few nuclei either way, and one re-draw's pooled difference can be arbitrarily small.)

Label fidelity plugs in as a callable ``fidelity_fn(images, inst_maps, type_maps) -> dict[str, float]``
(images uint8 [N, H, W, 3]; inst_maps int32 [N, H, W] ids 0 = background; type_maps int32 [N, H, W]
merged classes): ``--fidelity package.module:function`` on the command line, or ``fidelity_fn=`` of
:func:`run_study`.

Every ``scripts/image_sample.py`` flag is accepted (model settings come from config.json beside the
checkpoint). Example (the CPU SDM of the real-data issue)::

    python benchmarks/bench_steps.py --model_path runs/sdm/consep256-cpu-FINETUNE/ema_0.995_001400.pt \\
        --data_dir ../shared/data/consep256 --dataset_mode custom --num_classes 5 --split Test \\
        --num_patches 16 --batch_size 4 --results_path runs/steps-study

Writes ``steps_study.json``, ``steps_study.md`` and ``steps_study.png`` (rows: real patch, DDIM, each
solver setting, for the first patches) to ``--results_path``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)
from guided_diffusion import samplers as smp  # noqa: E402
from guided_diffusion import synthesis as syn  # noqa: E402
from guided_diffusion.infra import fileio  # noqa: E402
from guided_diffusion.infra.config import ModelConfig, str2bool  # noqa: E402
from guided_diffusion.infra.errors import DiffMixError, run_cli  # noqa: E402

FidelityFn = Callable[[np.ndarray, np.ndarray, np.ndarray], Dict[str, float]]


# --------------------------------------------------------------------------------------------
# Sampling from one SDEdit start
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Image comparison
# --------------------------------------------------------------------------------------------


def psnr_ssim(images: np.ndarray, reference: np.ndarray) -> tuple:
    """Per-image PSNR (dB) and SSIM of uint8 images [N, H, W, 3] against ``reference`` (same shape).

    MONAI's metrics on images scaled to [0, 1] (SSIM: Gaussian window 11, sigma 1.5, k1 0.01,
    k2 0.03, averaged over the colour channels). Identical images give PSNR inf and SSIM 1.
    Returns two float64 arrays [N].
    """
    from monai.metrics import PSNRMetric, SSIMMetric

    a = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).double() / 255.0
    b = torch.from_numpy(np.asarray(reference)).permute(0, 3, 1, 2).double() / 255.0
    psnr = PSNRMetric(max_val=1.0, reduction="none")(a, b).reshape(-1).numpy()
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")(a, b).reshape(-1).numpy()
    return psnr.astype(np.float64), ssim.astype(np.float64)


def fidelity_change(per_patch: Sequence[Dict[str, float]], reference: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Per score, the mean over patches of |per-patch score - the reference's| (patches where either is
    NaN are left out; NaN when none is left)."""
    out = {}
    for k in reference[0]:
        d = np.array([abs(a.get(k, np.nan) - b[k]) for a, b in zip(per_patch, reference)], np.float64)
        out[k] = float(d[~np.isnan(d)].mean()) if (~np.isnan(d)).any() else float("nan")
    return out


def fidelity_shortfalls(change: Dict[str, float], floor_change: Dict[str, float]) -> List[str]:
    """The scores a method changes more than the noise floor does (see :func:`fidelity_change`);
    an empty list means its label fidelity is within noise. NaN scores are skipped."""
    return [k for k, v in change.items()
            if not np.isnan(v) and not np.isnan(floor_change.get(k, np.nan)) and v > floor_change[k] + 1e-12]


def _stats(values: Sequence[float]) -> Dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min())}


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    """One sampler setting of the study and what it produced."""

    name: str
    model_calls: int
    images: List[np.ndarray] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def pick_patches(patches: Sequence[Any], n: int) -> List[Any]:
    """``n`` patches spread evenly over the list (all when there are fewer)."""
    if n <= 0 or n >= len(patches):
        return list(patches)
    return [patches[i] for i in np.linspace(0, len(patches) - 1, n).round().astype(int)]


def run_study(
    cfg: "syn.SampleConfig",
    model_cfg: Dict[str, Any],
    solver_steps: Sequence[int],
    num_patches: int,
    *,
    noise_floor: bool = True,
    fidelity_fn: Optional[FidelityFn] = None,
    model: Optional[torch.nn.Module] = None,
    diffusion: Any = None,
    patches: Optional[Sequence[Any]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run the comparison (see the module docstring) and return the report dict (also what is written).

    ``model``/``diffusion``/``patches`` replace loading from ``cfg`` (tests).
    """
    from tqdm.auto import tqdm

    from guided_diffusion.data import build_condition
    from guided_diffusion.data.patches import sampling_patches

    device = torch.device(cfg.device) if cfg.device else syn.default_device()
    precision = syn.sampling_precision(cfg, model_cfg, device)
    if model is None or diffusion is None:
        model, diffusion = syn.load_model_and_diffusion(cfg.model_path, model_cfg, device)
    model = model.to(device).eval()
    image_size, num_classes = int(model_cfg["image_size"]), int(model_cfg["num_classes"])
    if patches is None:
        patches = sampling_patches(
            data_dir=cfg.data_dir, dataset_mode=cfg.dataset_mode, image_size=image_size,
            label_dir=cfg.label_dir or None, stride=cfg.stride or None, split=cfg.split,
            class_table=cfg.class_table or None, num_classes=num_classes, progress=progress)
    jobs = syn.plan_jobs(pick_patches(patches, num_patches), seed=cfg.seed)
    if not jobs:
        raise DiffMixError(f"{cfg.label_dir or cfg.data_dir}: no patches to sample")

    sched = smp.as_schedule(diffusion)
    steps = syn.start_steps(sched.num_timesteps, cfg.ddim_percent)
    if steps >= sched.num_timesteps:
        raise DiffMixError(f"--ddim_percent {cfg.ddim_percent}: the study compares SDEdit starts (< 100 percent)")
    t_start = int(sched.timestep_map[steps - 1])
    reference_name = f"DDIM-{steps}"
    methods = [Method(reference_name, steps)]
    if noise_floor:
        methods.append(Method(f"{reference_name}, other noise (noise floor)", steps))
    plans = {}
    for k in solver_steps:
        plan = syn.solver_plan(model_cfg, sched, steps, k)  # what image_sample.py --solver_steps k runs
        name = f"DPM-Solver++(2M), {len(plan[1])} steps"
        plans[name] = plan
        methods.append(Method(name, len(plan[1])))
    by_name = {m.name: m for m in methods}
    cache_seconds = 0.0

    bar = tqdm(total=len(jobs), unit="patch", desc="steps study", disable=not progress)
    for b in range(0, len(jobs), cfg.batch_size):
        batch = jobs[b : b + cfg.batch_size]
        ps = [j.patch for j in batch]
        y = build_condition(np.stack([p.type_map for p in ps]), np.stack([p.inst_map for p in ps]),
                            num_classes, bool(model_cfg["no_instance"])).to(device)
        ref = syn.image_to_tensor([p.image for p in ps]).to(device)
        seeds = [j.noise_seed for j in batch]
        with torch.no_grad():
            with syn.autocast_context(precision, device):  # as the pipeline builds them
                denoiser, seconds = common.timed(lambda: syn.FastGuidedDenoiser(model, y, cfg.s), device)
            cache_seconds += seconds
            den = syn.with_autocast(denoiser, precision, device)

            def ddim(noise_seeds):
                return syn.sample_batch(den, sched, ref, steps, syn.PerSampleNoise(noise_seeds), sampler="ddim",
                                        eta=0.0, clip=cfg.clip_denoised)

            runs = {reference_name: lambda: ddim(seeds)}
            if noise_floor:
                runs[methods[1].name] = lambda: ddim([syn.noise_seed(cfg.seed + 1, j.patch.map_name, j.patch_index,
                                                                     j.sample_index) for j in batch])
            for name, plan in plans.items():
                runs[name] = (lambda plan=plan: syn.sample_batch(den, sched, ref, steps, syn.PerSampleNoise(seeds),
                                                                 sampler="dpmpp2m", clip=cfg.clip_denoised, solver=plan))
            for name, fn in runs.items():
                sample, seconds = common.timed(fn, device)
                by_name[name].seconds += seconds
                by_name[name].images.extend(syn.to_uint8(sample))
        bar.update(len(batch))
    bar.close()

    inst = np.stack([j.patch.inst_map for j in jobs]).astype(np.int32)
    types = np.stack([j.patch.type_map for j in jobs]).astype(np.int32)
    ref_images = np.stack(by_name[reference_name].images)
    n = len(jobs)
    base_time = (by_name[reference_name].seconds + cache_seconds) / n
    rows = []
    floor = None
    per_patch: Dict[str, List[Dict[str, float]]] = {}  # method -> fidelity of each patch
    for m in methods:
        images = np.stack(m.images)
        seconds = (m.seconds + cache_seconds) / n
        row: Dict[str, Any] = {"method": m.name, "model_calls": m.model_calls,
                               "seconds_per_patch": seconds, "speedup_vs_reference": base_time / seconds}
        if m.name != reference_name:
            psnr, ssim = psnr_ssim(images, ref_images)
            row.update(psnr_db=_stats(psnr), ssim=_stats(ssim))
        if m.name in plans:
            row["timesteps"] = plans[m.name][1]
        if fidelity_fn is not None:
            row["fidelity"] = {k: float(v) for k, v in fidelity_fn(images, inst, types).items()}
            per_patch[m.name] = [fidelity_fn(images[i : i + 1], inst[i : i + 1], types[i : i + 1]) for i in range(n)]
        if m.name.endswith("(noise floor)"):
            floor = row
        rows.append(row)
    if fidelity_fn is not None:
        real_fid = {k: float(v) for k, v in fidelity_fn(np.stack([j.patch.image for j in jobs]), inst, types).items()}
        rows.insert(0, {"method": "real patch (no sampling)", "model_calls": 0, "fidelity": real_fid})
        for row in rows:
            if row["method"] in per_patch and row["method"] != reference_name:
                row["fidelity_change"] = fidelity_change(per_patch[row["method"]], per_patch[reference_name])
    for row in rows:
        if floor is not None and row["method"] in plans:
            row["within_noise_psnr_ssim"] = bool(row["psnr_db"]["mean"] > floor["psnr_db"]["mean"]
                                                 and row["ssim"]["mean"] > floor["ssim"]["mean"])
            if fidelity_fn is not None:
                row["fidelity_beyond_noise"] = fidelity_shortfalls(row["fidelity_change"], floor["fidelity_change"])
    return {
        "machine": common.machine(),
        "checkpoint": cfg.model_path,
        "data_dir": cfg.data_dir,
        "label_dir": cfg.label_dir,
        "split": cfg.split,
        "patches": [j.name for j in jobs],
        "settings": {"timestep_respacing": model_cfg.get("timestep_respacing"), "ddim_percent": cfg.ddim_percent,
                     "reference_steps": steps, "t_start": t_start, "guidance_scale": cfg.s, "precision": precision,
                     "clip_denoised": cfg.clip_denoised, "seed": cfg.seed, "batch_size": cfg.batch_size,
                     "device": str(device), "spade_cache_seconds_per_patch": cache_seconds / n,
                     "model_config": model_cfg},
        "fidelity_scorer": getattr(fidelity_fn, "__qualname__", None) if fidelity_fn else None,
        "results": rows,
        "_images": {m.name: np.stack(m.images) for m in methods},
        "_real": np.stack([j.patch.image for j in jobs]),
    }


def markdown(report: Dict[str, Any]) -> str:
    s = report["settings"]
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu_count']}-core CPU, load {m.get('load_average')}"
    lines = [
        f"Steps study: {len(report['patches'])} patches of {report['label_dir'] or report['data_dir']} "
        f"({report['split']}), checkpoint {report['checkpoint']}; {s['timestep_respacing']}, ddim_percent "
        f"{s['ddim_percent']:g} (t_start {s['t_start']}), s {s['guidance_scale']:g}, {s['precision']}, batch "
        f"{s['batch_size']}, {s['device']} ({where}), {m['date']}.",
        "",
        "| method | model calls | PSNR to DDIM (dB) | SSIM to DDIM | s / patch | speed-up | within noise |"
        + (" fidelity |" if report["fidelity_scorer"] else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if report["fidelity_scorer"] else ""),
    ]
    for r in report["results"]:
        psnr = (f"{r['psnr_db']['mean']:.2f} ± {r['psnr_db']['std']:.2f}" if "psnr_db" in r
                else "(reference)" if r["model_calls"] else "")
        ssim = f"{r['ssim']['mean']:.4f} ± {r['ssim']['std']:.4f}" if "ssim" in r else ""
        within = {True: "yes", False: "no"}.get(r.get("within_noise_psnr_ssim"), "")
        if "fidelity_beyond_noise" in r:
            short = r["fidelity_beyond_noise"]
            within += "; fidelity " + ("yes" if not short else "no (" + ", ".join(short) + ")")
        timing = (f"{r['seconds_per_patch']:.3g} | {r['speedup_vs_reference']:.2f}x" if "seconds_per_patch" in r
                  else " | ")
        line = f"| {r['method']} | {r['model_calls']} | {psnr} | {ssim} | {timing} | {within} |"
        if report["fidelity_scorer"]:
            line += " " + ", ".join(f"{k} {v:.4g}" for k, v in r.get("fidelity", {}).items()) + " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def contact_sheet(report: Dict[str, Any], rows: int = 4) -> np.ndarray:
    """uint8 image: one column per patch (first ``rows``), one row per method (real patch first)."""
    images = [report["_real"][:rows]] + [v[:rows] for v in report["_images"].values()]
    return np.concatenate([np.concatenate(list(group), axis=1) for group in images], axis=0)


def write_report(report: Dict[str, Any], out_dir: str) -> None:
    fileio.makedirs(out_dir)
    fileio.write_json(os.path.join(out_dir, "steps_study.json"), {k: v for k, v in report.items() if not k.startswith("_")})
    fileio.write_bytes(os.path.join(out_dir, "steps_study.md"), markdown(report).encode())
    fileio.write_png(os.path.join(out_dir, "steps_study.png"), contact_sheet(report))


def main(argv=None) -> None:
    from image_sample import create_argparser, explicit_flags  # scripts/: the same flags as image_sample.py

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = create_argparser()
    parser.description = __doc__.splitlines()[0]
    parser.set_defaults(ddim_percent=55.0, s=1.5, results_path="", progress=True)
    study = parser.add_argument_group("steps study")
    study.add_argument("--num_patches", type=int, default=16, help="patches compared (spread over the dataset)")
    study.add_argument("--compare_steps", default="8,10,15,20", help="DPM-Solver++(2M) model-call counts compared")
    study.add_argument("--noise_floor", type=str2bool, default=True, help="also run DDIM with other noise seeds")
    study.add_argument("--fidelity", default="", help="label-fidelity scorer 'package.module:function' "
                       "(images, inst_maps, type_maps) -> dict of floats; '' = none")
    study.add_argument("--segmenter", default="", help="label fidelity with this finished hovernet_train.py run "
                       "(scored against the patches' label maps); replaces --fidelity")
    args = parser.parse_args(argv)
    if args.fidelity and args.segmenter:
        raise DiffMixError("--fidelity and --segmenter both set: give one label-fidelity scorer")
    cfg = syn.SampleConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(syn.SampleConfig)})
    cfg.validate()
    try:
        solver_steps = [int(k) for k in args.compare_steps.split(",") if k.strip()]
    except ValueError:
        raise DiffMixError(f"--compare_steps {args.compare_steps!r}: expected comma-separated integers") from None
    if not solver_steps or min(solver_steps) < 1:
        raise DiffMixError(f"--compare_steps {args.compare_steps!r}: need step counts >= 1")
    fidelity_fn = common.load_callable(args.fidelity, "--fidelity") if args.fidelity else None

    model_keys = [f.name for f in dataclasses.fields(ModelConfig)]
    explicit = explicit_flags(parser, argv, model_keys)
    defaults = {k: parser.get_default(k) for k in model_keys}
    model_cfg, _ = syn.resolve_model_config(cfg.model_path, {k: getattr(args, k) for k in model_keys if k in explicit},
                                            defaults)
    if args.segmenter:
        from guided_diffusion.data.classes import resolve_class_table
        from guided_diffusion.downstream.fidelity import segmenter_scorer

        table = resolve_class_table(cfg.dataset_mode, cfg.class_table or None, int(model_cfg["num_classes"]))
        fidelity_fn = segmenter_scorer(args.segmenter, table, device=cfg.device or "auto")
    t0 = time.time()
    report = run_study(cfg, model_cfg, solver_steps, args.num_patches, noise_floor=args.noise_floor,
                       fidelity_fn=fidelity_fn, progress=cfg.progress)
    write_report(report, cfg.results_path)
    print(markdown(report))
    print(f"{time.time() - t0:.0f} s; written to {cfg.results_path}/steps_study.{{json,md,png}}")


if __name__ == "__main__":
    run_cli(main)
