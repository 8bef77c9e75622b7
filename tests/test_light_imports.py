"""Label-only commands (GradMix, dataset statistics, evaluation) run without importing torch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: imports the label-only modules, runs each command's main() on a tiny
# toy dataset, and reports whether torch (or anything under it) was imported along the way.
_SCRIPT = textwrap.dedent(
    """
    import runpy, sys
    out = sys.argv[1]
    import guided_diffusion.data, guided_diffusion.gradmix, guided_diffusion.metrics, guided_diffusion.data.stats
    from guided_diffusion.data import make_toy_dataset
    make_toy_dataset(out + "/ds", num_train=2, num_test=1, size=64, seed=0, progress=False)
    for name, argv in [
        ("gradmix", ["--data_dir", out + "/ds", "--out_dir", out + "/gm", "--progress", "false", "--margin", "0", "--minor", "4", "--major", "3"]),
        ("dataset_stats", ["--data_dir", out + "/ds", "--out_dir", out + "/st"]),
        ("evaluate", ["--true_dir", out + "/ds/Test/Labels", "--pred_dir", out + "/ds/Test/Labels",
                      "--no_progress"]),
    ]:
        module = runpy.run_path(f"{sys.argv[2]}/scripts/{name}.py", run_name="light_check")
        module["main"](argv)
    print("TORCH_LOADED", sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """
)


def test_label_only_commands_do_not_import_torch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path), str(REPO)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TORCH_LOADED")][-1]
    assert line == "TORCH_LOADED []", line
    assert (tmp_path / "gm" / "Labels").is_dir() and (tmp_path / "st" / "stats_settings.json").is_file()


def test_torch_names_of_the_data_package_still_resolve():
    from guided_diffusion import data

    assert callable(data.build_condition) and callable(data.load_data)
    assert "build_condition" in dir(data)


def test_help_of_the_demo_and_gradmix_commands_loads_no_torch():
    """--help of the two main commands starts at once: their settings modules are light."""
    check = textwrap.dedent(
        """
        import runpy, sys
        sys.argv = [sys.argv[1], "--help"]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit:
            pass
        print("HEAVY", sorted(m for m in ("torch", "scipy", "matplotlib") if m in sys.modules))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for script in ("scripts/demo.py", "scripts/gradmix.py"):
        proc = subprocess.run([sys.executable, "-c", check, str(REPO / script)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "--out_dir" in proc.stdout
        assert [ln for ln in proc.stdout.splitlines() if ln.startswith("HEAVY")] == ["HEAVY []"], (script, proc.stdout[-500:])
