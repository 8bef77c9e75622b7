"""Data-parallel training: two CPU processes over gloo keep identical parameters."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    # The environment torchrun would give each process.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from guided_diffusion import dist_util, logger
    from guided_diffusion import train_util as tu
    from guided_diffusion.resample import LossSecondMomentResampler
    from train_helpers import MicroDenoiser, SeededBatches, micro_diffusion

    info = dist_util.setup_dist()
    assert (info.rank, info.world_size, info.backend, info.launcher) == (rank, world, "gloo", "torchrun")
    logger.configure(folder, format_strs=None)  # files on rank 0 only
    torch.manual_seed(100 + rank)  # different initial weights per rank: the loop must sync them
    model = MicroDenoiser(dropout=0.0)
    diffusion = micro_diffusion()
    initial = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    loop = tu.TrainLoop(model=model, diffusion=diffusion, data=SeededBatches(rank=rank), batch_size=4,
                        microbatch=2, lr=1e-2, ema_rate="0.9", log_interval=1, save_interval=2, max_steps=3,
                        log_dir=folder, progress=False, schedule_sampler=LossSecondMomentResampler(diffusion))
    loop.run_loop()
    final = torch.cat([p.detach().flatten() for p in model.parameters()])
    ema = torch.cat([e.flatten() for e in loop.ema_params[0]])
    torch.save({"initial": initial, "final": final, "ema": ema}, os.path.join(folder, f"rank{rank}.out"))
    logger.close()
    dist_util.cleanup()


def test_two_gloo_ranks_keep_identical_parameters(tmp_path):
    # spawn, not fork: a forked child of a process whose OpenMP thread pool is already running can
    # deadlock in its first parallel op (seen when this test ran after the rest of the suite).
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.out", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.out", weights_only=True)
    assert not torch.equal(r0["initial"], r1["initial"])  # they did start apart
    assert torch.equal(r0["final"], r1["final"]) and torch.equal(r0["ema"], r1["ema"])
    assert not torch.equal(r0["final"], r0["initial"])
    from guided_diffusion import train_util as tu

    assert tu.list_complete_checkpoints(str(tmp_path)) == [2, 3]
    state = torch.load(tmp_path / "train_state000003.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2  # each rank's random streams kept
    rows = (tmp_path / "progress.csv").read_text().splitlines()
    assert len(rows) == 4  # header + one row per step, written once (rank 0)
