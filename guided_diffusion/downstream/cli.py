"""Flags shared by the downstream inference commands (``hovernet_predict.py``, ``label_fidelity.py``,
``hovernet_diagnose.py``).

Light: no torch import until :func:`apply_threads` runs, so ``--help`` and flag errors stay fast.
"""

from __future__ import annotations

import argparse

from ..data.classes import DATASET_MODE_HELP, DEFAULT_DATASET_MODE
from ..infra.config import str2bool


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """``--tile``, ``--device``, ``--precision``, ``--num_threads`` and ``--progress``."""
    parser.add_argument("--tile", type=int, default=None, help="inference window in pixels (default 256)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto: cuda if available")
    parser.add_argument("--precision", default="auto", help="fp32 or bf16; auto: bf16 on a capable GPU")
    parser.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--progress", type=str2bool, default=True, help="show progress bars")


def add_run_flags(parser: argparse.ArgumentParser, data_help: str) -> None:
    """``--run_dir`` (a finished training run), ``--data_dir`` and ``--split`` (the images it reads)."""
    parser.add_argument("--run_dir", required=True, help="a finished scripts/hovernet_train.py run folder")
    parser.add_argument("--data_dir", required=True, help=data_help)
    parser.add_argument("--split", default="Test", help="split folder under --data_dir")


def add_class_flags(parser: argparse.ArgumentParser) -> None:
    """``--dataset_mode``, ``--num_classes`` and ``--class_table``: the class table of labelled data."""
    parser.add_argument("--dataset_mode", default=DEFAULT_DATASET_MODE, help=DATASET_MODE_HELP)
    parser.add_argument("--num_classes", type=int, default=None, help="classes incl. background (custom mode)")
    parser.add_argument("--class_table", default="", help="custom mode: class table JSON")


def apply_threads(num_threads: int) -> None:
    """``torch.set_num_threads`` when ``num_threads`` is set (0 keeps torch's default)."""
    if num_threads:
        import torch

        torch.set_num_threads(num_threads)
