"""Shared test fixtures: paths to the real H&E fixtures and small deterministic settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
SPEC = SHARED / "spec"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def fixtures_dir() -> Path:
    """``../shared/fixtures`` (real H&E patches); skips with a clear message if absent."""
    if not FIXTURES.is_dir():
        pytest.skip(f"real fixtures not found at {FIXTURES} (the ../shared folder beside the repo)")
    return FIXTURES


@pytest.fixture
def spec_dir() -> Path:
    if not SPEC.is_dir():
        pytest.skip(f"state-dict spec files not found at {SPEC}")
    return SPEC


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (tiny convolutions gain nothing from threads, and on a
    shared 2-core machine two threads mostly wait on each other); restored afterwards. Modules use it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_script(name: str):
    """``scripts/<name>.py`` as a module (its ``main(argv)`` runs a command in-process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
