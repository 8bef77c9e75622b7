"""Launcher rank discovery: one reading of the environment for training, synthesis and data."""

from __future__ import annotations

import pytest

from guided_diffusion import dist_util
from guided_diffusion import synthesis as syn
from guided_diffusion.infra import launcher
from guided_diffusion.infra.errors import DiffMixError

_VARS = [v for family in launcher._FAMILIES for v in family[1:]] + ["MASTER_ADDR"]


@pytest.fixture
def clean_env(monkeypatch):
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_launcher_ranks(clean_env):
    monkeypatch = clean_env
    assert syn.launch_rank()[:3] == (0, 1, 0)
    monkeypatch.setenv("PMI_RANK", "2")
    monkeypatch.setenv("PMI_SIZE", "4")
    assert syn.launch_rank()[:3] == (2, 4, 2)  # mpiexec (MPICH) without a local rank: assume one node
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert syn.launch_rank()[:3] == (1, 3, 0)  # torchrun's variables win
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(syn.DiffMixError, match="RANK"):
        syn.launch_rank()


@pytest.mark.parametrize("prefix_vars", [
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),
    ("PMIX_SIZE", "PMIX_RANK", "PMIX_LOCAL_RANK"),
])
def test_every_mpi_family_is_seen_alike_by_training_synthesis_and_data(clean_env, prefix_vars):
    size, rank, local = prefix_vars
    clean_env.setenv(size, "4")
    clean_env.setenv(rank, "3")
    clean_env.setenv(local, "1")
    assert launcher.launch_rank() == (3, 4, 1, "mpi")
    assert dist_util.under_launcher()  # training would form a 4-rank group, not run alone
    clean_env.setattr(dist_util.dist, "is_initialized", lambda: False)  # no group formed yet
    assert dist_util.rank_world() == (3, 4)  # what the data pipeline shards by


def test_rank_outside_world_and_single_launch(clean_env):
    clean_env.setenv("PMIX_SIZE", "2")
    clean_env.setenv("PMIX_RANK", "2")
    with pytest.raises(DiffMixError, match="PMIX_RANK=2 is outside"):
        launcher.launch_rank()
    clean_env.setenv("PMIX_RANK", "0")
    clean_env.setenv("PMIX_SIZE", "1")
    assert launcher.launch_rank() == (0, 1, 0, "single") and not dist_util.under_launcher()
