"""Distributed set-up for data-parallel training (torchrun, mpiexec + mpi4py, or one process).

How a run is launched decides how the process group is formed:

- ``torchrun --nproc_per_node N [--nnodes M ...] scripts/image_train.py ...``: torchrun exports
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; we join with ``env://``.
- ``mpiexec -n N python scripts/image_train.py ...`` (any launcher of :mod:`guided_diffusion.infra.launcher`): ranks come from mpi4py (an optional import; the
  ``mpich`` PyPI package provides an MPI), rank 0 picks a free TCP port and broadcasts it.
- a plain ``python ...``: a one-process group over an in-memory store, so code that calls
  ``torch.distributed`` collectives (the loss-aware timestep sampler, the logger) works unchanged.

The backend is NCCL when CUDA is available and gloo otherwise. The device of a rank comes from the
launcher's local rank; this module never sets ``CUDA_VISIBLE_DEVICES`` (choose GPUs with the launcher
or by exporting it yourself).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from .infra.checkpoints import load_state_dict  # noqa: F401  (guided-diffusion's dist_util.load_state_dict name)
from .infra.errors import DiffMixError
from .infra.launcher import LaunchRank, launch_rank


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: ``rank`` in [0, world_size), ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    launcher: str  # "torchrun", "mpi" or "single"


_INFO: Optional[DistInfo] = None


def _torchrun(job: LaunchRank) -> bool:
    return job.launcher == "torchrun" and "MASTER_ADDR" in os.environ


def under_launcher() -> bool:
    """True when torchrun or an MPI launcher started this process (before any set-up)."""
    job = launch_rank()
    return _torchrun(job) or job.world_size > 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def setup_dist(backend: Optional[str] = None) -> DistInfo:
    """Join (or form) the process group once per process and pin this rank's CUDA device.

    Idempotent: later calls return the same :class:`DistInfo`. ``backend`` overrides the automatic
    choice ("nccl" with CUDA, else "gloo").
    """
    global _INFO
    if _INFO is not None and dist.is_initialized():
        return _INFO
    backend = backend or default_backend()
    job = launch_rank()
    if dist.is_initialized():
        # Someone else (a test harness, a notebook) formed the group; adopt it.
        _INFO = DistInfo(dist.get_rank(), dist.get_world_size(), job.local_rank, dist.get_backend(), "external")
    elif _torchrun(job):
        _INFO = _setup_torchrun(backend, job)
    elif job.world_size > 1:
        _INFO = _setup_mpi(backend)
    else:
        # A one-rank group without any network port: collectives become no-ops.
        dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
        _INFO = DistInfo(0, 1, 0, "gloo", "single")
    if torch.cuda.is_available() and _INFO.backend == "nccl":
        torch.cuda.set_device(dev())
    return _INFO


def _setup_torchrun(backend: str, job: LaunchRank) -> DistInfo:
    rank, world, local = job.rank, job.world_size, job.local_rank
    if torch.cuda.is_available() and backend == "nccl":
        # NCCL needs the device pinned before the first collective.
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local, backend, "torchrun")


def _setup_mpi(backend: str) -> DistInfo:
    try:
        from mpi4py import MPI  # optional: only mpiexec launches need it
    except ImportError:
        raise DiffMixError(
            "launched under mpiexec (MPI world size > 1) but mpi4py is not installed; "
            "install it with `pip install mpi4py mpich`, or launch with torchrun instead"
        ) from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    addr = os.environ.get("MASTER_ADDR") or (socket.gethostbyname(socket.getfqdn()) if rank == 0 else None)
    port = os.environ.get("MASTER_PORT") or (_free_port() if rank == 0 else None)
    addr, port = comm.bcast((addr, port), root=0)
    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(backend=backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world)
    return DistInfo(rank, world, local, backend, "mpi")


def cleanup() -> None:
    """Leave the process group (call at the end of a run; safe to call twice)."""
    global _INFO
    if dist.is_initialized():
        # Every rank reaches this point before any tears its group down: destroying a gloo group while
        # a peer still has traffic in flight aborts the process ("terminate called ...") at exit.
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _INFO = None


def info() -> DistInfo:
    """The current :class:`DistInfo`; a single-process view when :func:`setup_dist` was not called."""
    if _INFO is not None and dist.is_initialized():
        return _INFO
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), launch_rank().local_rank, dist.get_backend(), "external")
    return DistInfo(0, 1, 0, "none", "none")


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``: the process group's once formed, else the launcher's (for sharding
    work without a group; collectives still need :func:`setup_dist`)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    job = launch_rank()
    return job.rank, job.world_size


def local_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank mod device count>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def dev() -> torch.device:
    """This rank's device (:func:`local_device` of its local rank)."""
    return local_device(info().local_rank)


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def sync_params(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` (in place) to every rank."""
    if get_world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data if isinstance(p, torch.nn.Parameter) else p, 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable Python objects only; small data)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over ranks (a new tensor on the same device; float64 keeps log sums exact)."""
    out = values.clone()
    if get_world_size() > 1:
        # gloo cannot reduce CUDA tensors on every build; NCCL needs them on the GPU.
        if info().backend == "gloo" and out.is_cuda:
            host = out.cpu()
            dist.all_reduce(host)
            return host.to(out.device)
        dist.all_reduce(out)
    return out
