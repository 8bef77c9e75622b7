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
