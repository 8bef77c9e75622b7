"""Where this process sits among the ranks a launcher started, read from its environment.

The one place that knows the launchers' variables; training (:mod:`guided_diffusion.dist_util`, which
then forms the process group), synthesis (which shards without one) and the data pipeline all ask
here, so they always agree on the rank and world size. No torch import: this is read before CUDA
starts and by light commands.

Families, first match wins (a family counts when its world-size variable is set):

=========  ==========================  ========================  ================================
launcher   world size                  rank                      local rank
=========  ==========================  ========================  ================================
torchrun   ``WORLD_SIZE``              ``RANK``                  ``LOCAL_RANK``
Open MPI   ``OMPI_COMM_WORLD_SIZE``    ``OMPI_COMM_WORLD_RANK``  ``OMPI_COMM_WORLD_LOCAL_RANK``
MVAPICH    ``MV2_COMM_WORLD_SIZE``     ``MV2_COMM_WORLD_RANK``   ``MV2_COMM_WORLD_LOCAL_RANK``
MPICH      ``PMI_SIZE``                ``PMI_RANK``              ``MPI_LOCALRANKID``
PMIx       ``PMIX_SIZE``               ``PMIX_RANK``             ``PMIX_LOCAL_RANK``
=========  ==========================  ========================  ================================

Without a local-rank variable the job is taken to run on one node (local rank = rank).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

from .errors import DiffMixError

# (launcher kind, world-size variable, rank variable, local-rank variable)
_FAMILIES = (
    ("torchrun", "WORLD_SIZE", "RANK", "LOCAL_RANK"),
    ("mpi", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpi", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
    ("mpi", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"),
    ("mpi", "PMIX_SIZE", "PMIX_RANK", "PMIX_LOCAL_RANK"),
)


class LaunchRank(NamedTuple):
    """``rank`` in [0, world_size), ``local_rank`` on its node, and the launcher kind:
    "torchrun", "mpi" or "single" (a plain ``python`` run, rank 0 of 1)."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str = "single"


def env_int(name: str) -> Optional[int]:
    """The integer value of environment variable ``name`` (None when unset or empty)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DiffMixError(f"environment variable {name}={value!r} is not an integer") from None


def launch_rank() -> LaunchRank:
    """This process's place in the job, from the launcher's variables (see the module table)."""
    for kind, size_var, rank_var, local_var in _FAMILIES:
        world = env_int(size_var)
        if world is None:
            continue
        rank = env_int(rank_var) or 0
        if not (0 <= rank < world):
            raise DiffMixError(f"launcher rank {rank_var}={rank} is outside its world size {size_var}={world}")
        local = env_int(local_var)
        # A one-process torchrun still forms its group through env:// (the code path of N processes).
        return LaunchRank(rank, world, rank if local is None else local, kind if world > 1 or kind == "torchrun" else "single")
    return LaunchRank(0, 1, 0, "single")
