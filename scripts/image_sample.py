"""DiffMix synthesis: synthetic H&E patches + HoVer-Net training patches from (virtual) label maps.

Example (the paper's CoNSeP setting; see scripts/scripts_ddim_sample/consep.sh)::

    python scripts/image_sample.py --data_dir datasets/consep --dataset_mode consep \\
        --label_dir RESULTS/consep-gradmix --model_path OUTPUT/consep-FINETUNE/ema_0.9999_010000.pt \\
        --results_path RESULTS/consep-grad_sdm --timestep_respacing ddim100 --ddim_percent 55 --s 1.5

Model settings come from ``config.json`` beside the checkpoint (written by training); model flags
given here override it, and an official checkpoint without one works from the flags alone (pass
them as the official recipe does). ``--ddim_percent`` is in percent, as in the official script.
Several GPUs: ``torchrun --nproc_per_node N -- scripts/image_sample.py ...`` (the ``--`` keeps torchrun from
reading ``--s`` as one of its own options; or ``mpiexec -n N``);
rank r synthesises patches r, r+N, ...; re-running skips finished patches.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from guided_diffusion.infra import fileio
from guided_diffusion.infra.config import ModelConfig, add_dataclass_args, dataclass_from_args
from guided_diffusion.infra.errors import run_cli
from guided_diffusion.synthesis import (
    DEFAULT_TIMESTEP_RESPACING,
    SAMPLING_ONLY_MODEL_KEYS,
    SampleConfig,
    resolve_model_config,
    resolve_model_path,
    run_synthesis,
)


def create_argparser() -> argparse.ArgumentParser:
    # allow_abbrev=False: which flags were given explicitly decides what overrides config.json.
    parser = argparse.ArgumentParser(
        description="DiffMix synthesis (SDEdit-style DDIM under virtual label maps with classifier-free guidance).",
        allow_abbrev=False,
    )
    add_dataclass_args(parser, SampleConfig)
    add_dataclass_args(parser, ModelConfig)
    parser.set_defaults(timestep_respacing=DEFAULT_TIMESTEP_RESPACING)
    return parser


def explicit_flags(parser: argparse.ArgumentParser, argv, keys) -> set:
    """The ``keys`` whose flags appear on the command line: ``argv`` parsed again with a marker as
    every default (the parser's defaults are restored afterwards)."""
    unset = object()  # not a string, so argparse does not convert it
    saved = {k: parser.get_default(k) for k in keys}
    parser.set_defaults(**{k: unset for k in keys})
    try:
        args = parser.parse_args(argv)
    finally:
        parser.set_defaults(**saved)
    return {k for k in keys if getattr(args, k) is not unset}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = create_argparser()
    args = parser.parse_args(argv)
    cfg = dataclass_from_args(SampleConfig, args)
    cfg.validate()
    fileio.check_output_dir(cfg.results_path, "--results_path")
    cfg.model_path = resolve_model_path(cfg.model_path)

    model_keys = [f.name for f in dataclasses.fields(ModelConfig)]
    explicit = explicit_flags(parser, argv, model_keys)
    defaults = {k: parser.get_default(k) for k in model_keys}
    overrides = {k: getattr(args, k) for k in model_keys if k in explicit}
    model_cfg, source = resolve_model_config(cfg.model_path, overrides, defaults)
    shown = sorted(k for k in overrides if k not in SAMPLING_ONLY_MODEL_KEYS)
    note = f" (overridden by flags: {', '.join(shown)})" if shown and source != "flags" else ""
    print(f"model settings: {source}{note}", file=sys.stderr)

    summary = run_synthesis(cfg, model_cfg, model_config_source=source)
    print(
        f"{len(summary.written)} patches written, {len(summary.skipped)} already complete "
        f"({summary.rank_jobs} of {summary.total_jobs} on this rank) in {summary.seconds:.1f} s -> {summary.out_dir}"
    )
    if summary.figure:
        print(f"figure: {summary.figure}")
    if summary.source_format:
        print(f"source-format arrays: {summary.source_format}")


if __name__ == "__main__":
    run_cli(main)
