"""benchmarks/gpu_check.py --cpu-smoke: every section of the prepared GPU check runs on the CPU with
tiny configs, so the script cannot rot between GPU runs; a failing section is recorded, not fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_cpu_smoke_runs_every_section(tmp_path):
    proc = _run("--cpu-smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["numerics", "train", "torchrun", "synthesis", "hovernet"]
    assert all(s["status"] == "ok" for s in sections.values())
    rows = {(name, r["name"]): r for name, s in sections.items() for r in s["rows"]}
    # CPU against CPU: fp32 is exact, bf16 autocast within its tolerance.
    assert rows[("numerics", "U-Net forward, fp32")]["value"] == 0
    assert rows[("numerics", "guided DDIM step (fast), bf16")]["ok"] is True
    assert rows[("train", "resume restores step and weights bit for bit")]["ok"] is True
    assert rows[("train", "fp16: training")]["value"] == "skipped"  # with its reason in the note
    assert rows[("torchrun", "ranks formed the group over gloo")]["ok"] is True
    assert rows[("torchrun", "complete checkpoint written")]["ok"] is True
    for variant in ("fast", "fast, batched guidance"):
        assert rows[("synthesis", f"{variant}: patches/s")]["value"] > 0
        assert rows[("synthesis", f"{variant}: max |diff| vs plain")]["value"] < 0.1
    assert "CPU smoke" in rows[("synthesis", "fast + torch.compile")]["note"]
    assert rows[("hovernet", "bf16: |loss| finite")]["ok"] is True
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("| pass |") == sum(r["ok"] is True for r in rows.values()) and "FAIL" not in table


def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path):
    # A step factory that cannot be imported fails the hovernet section in its own process; the
    # run still writes its report and exits 1.
    proc = _run("--cpu-smoke", "--isolate", "yes", "--sections", "hovernet", "--hovernet_step", "json:no_such_fn",
                "--out", str(tmp_path))
    assert proc.returncode == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["sections"]["hovernet"]["status"] == "error"
    assert "no callable 'no_such_fn'" in report["sections"]["hovernet"]["error"]
    assert "**error**" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the full check would run")
def test_without_a_gpu_the_full_check_stops_with_a_clear_error(tmp_path):
    proc = _run("--out", str(tmp_path), "--sections", "numerics")
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
