"""The run logger (progress.csv, log.txt) and the distributed set-up outside a launcher."""

from __future__ import annotations

import csv
import sys

import pytest
import torch

from guided_diffusion import dist_util, logger
from guided_diffusion.infra.errors import DiffMixError


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dump_averages_and_widens_the_csv_header(tmp_path):
    logger.configure(str(tmp_path), format_strs=("log", "csv"))
    try:
        logger.logkv("step", 1)
        logger.logkv_mean("loss", 1.0)
        logger.logkv_mean("loss", 3.0)
        assert logger.dumpkvs() == {"step": 1, "loss": 2.0}
        logger.logkv("step", 2)
        logger.logkv_mean("loss", 5.0)
        logger.logkv_mean("loss_q3", 7.0)  # a key seen for the first time
        logger.dumpkvs()
        logger.log("hello")
    finally:
        logger.close()
    rows = _rows(tmp_path / "progress.csv")
    assert rows == [{"loss": "2.0", "step": "1", "loss_q3": ""}, {"loss": "5.0", "step": "2", "loss_q3": "7.0"}]
    text = (tmp_path / "log.txt").read_text()
    assert "| loss_q3 | 7" in text and "hello" in text


def test_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    logger.configure(str(tmp_path), format_strs=("csv",))
    for step in (1, 2, 3, 4):
        logger.logkv("step", step)
        logger.dumpkvs()
    # The run saved at step 2 and died at 4; the resumed run logs steps 3, 4 again.
    logger.configure(str(tmp_path), format_strs=("csv",), resume_step=2)
    logger.logkv("step", 3)
    logger.dumpkvs()
    logger.close()
    assert [r["step"] for r in _rows(tmp_path / "progress.csv")] == ["1", "2", "3"]
    # Without resume_step a new run starts the file over.
    logger.configure(str(tmp_path), format_strs=("csv",))
    logger.close()
    assert _rows(tmp_path / "progress.csv") == []


def test_log_dir_comes_from_openai_logdir(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_LOGDIR", str(tmp_path / "from_env"))
    assert logger.default_dir() == str(tmp_path / "from_env")
    monkeypatch.delenv("OPENAI_LOGDIR")
    assert logger.default_dir().startswith("runs")


def test_single_process_setup_and_mpi_without_mpi4py(monkeypatch):
    dist_util.cleanup()
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_SIZE"):
        monkeypatch.delenv(var, raising=False)
    try:
        info = dist_util.setup_dist()
        assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")
        assert dist_util.setup_dist() is info  # idempotent
        assert dist_util.dev().type == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        dist_util.cleanup()
    # mpi4py is optional: without it, an mpiexec launch must say how to get it. Made missing here
    # (a None entry in sys.modules fails the import) so the check runs whether or not it is installed.
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(DiffMixError, match="mpi4py"):
        dist_util.setup_dist()
    assert not dist_util.dist.is_initialized()
