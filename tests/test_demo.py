"""The end-to-end demo (the README's main command), shortened to tiny sizes, on CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from guided_diffusion.app.demo import DemoConfig, run_demo
from guided_diffusion.infra import fileio
from guided_diffusion.infra.checkpoints import load_model_weights
from guided_diffusion.script_util import create_model_and_diffusion


def test_quick_demo_writes_every_output(tmp_path):
    out = tmp_path / "run"
    figures = tmp_path / "figure"
    record = run_demo(DemoConfig(out_dir=str(out), preset="quick", progress=False, figure_dir=str(figures)))

    # Run record: settings, seed, a timing for every stage, outputs that exist.
    saved = json.loads((out / "demo.json").read_text())
    assert saved["seed"] == 0 and saved["settings"]["preset"] == "quick"
    # Every stage timed, nothing else, and the stages fit in the run's total.
    assert set(saved["timings_s"]) == {"toy dataset", "data check", "class statistics", "GradMix", "SDM training",
                                       "classifier-free fine-tuning", "synthesis", "label fidelity", "report"}
    assert sum(saved["timings_s"].values()) <= saved["total_s"] + 0.1
    for path in saved["outputs"].values():
        assert Path(path).exists(), path

    # Statistics and GradMix: the rare class never shrinks, maps are in the CoNSeP layout.
    assert (out / "stats" / "real_train.csv").exists() and (out / "stats" / "real_train.png").exists()
    counts = saved["gradmix"]["counts"]
    assert counts["after"][1] > counts["before"][1]  # the rare class gains nuclei
    maps = sorted((out / "gradmix" / "Labels").glob("*.mat"))
    assert {m.stem.split("__")[1][:7] for m in maps} == {"balance", "enlarge"}
    assert sorted(p.stem for p in (out / "gradmix" / "Images").glob("*.png")) == [m.stem for m in maps if "__balance" in m.stem]
    mat = fileio.read_mat(str(maps[0]))
    assert {"inst_map", "type_map", "inst_type", "inst_centroid"} <= set(mat)

    # Training: official checkpoint names, config beside them, loadable strictly.
    ckpt = Path(saved["outputs"]["checkpoint"])
    assert re.fullmatch(r"model\d{6}\.pt", ckpt.name)
    assert (ckpt.parent / "config.json").exists() and (ckpt.parent / "progress.csv").exists()
    config = json.loads((ckpt.parent / "config.json").read_text())
    assert config["drop_rate"] == 0.2
    model, _ = create_model_and_diffusion(**{k: config[k] for k in _model_keys()})
    load_model_weights(model, str(ckpt))

    # Synthesis: PNG + HoVer-Net patch + record per patch, labels equal the virtual map's.
    synth = Path(saved["outputs"]["synthesis"])
    records = sorted((synth / "records").glob("*.json"))
    assert records
    for rec_path in records:
        rec = json.loads(rec_path.read_text())
        patch = np.load(synth / "npy_patch" / f"{rec['name']}.npy")
        size = saved["settings"]["image_size"]
        assert patch.shape == (size, size, 5) and patch.dtype == np.int32
        inst = patch[..., 3]
        assert sorted(np.unique(inst[inst > 0]).tolist()) == list(range(1, int(inst.max()) + 1))
        png = fileio.read_image(str(synth / "samples" / f"{rec['name']}.png"))
        np.testing.assert_array_equal(png.astype(np.int32), patch[..., :3])  # no wrap-around: RGB in 0..255
        virtual = fileio.read_mat(rec["label_source"])
        c = rec["crop"]
        crop_types = virtual["type_map"][c["y0"] : c["y0"] + size, c["x0"] : c["x0"] + size]
        np.testing.assert_array_equal(patch[..., 4], crop_types)

    # Synthesis started from GradMix's composed images (the recommended start), with the fast sampler.
    run = json.loads((synth / "run.json").read_text())
    assert run["start_image"] == "gradmix" and run["sampler"] == "dpmpp2m" and run["model_calls"] == 3

    # Label fidelity with the shipped classifier: every synthetic nucleus of the records is scored.
    fid = saved["fidelity"]
    n_nuclei = sum(len(np.unique(np.load(synth / "npy_patch" / f"{json.loads(r.read_text())['name']}.npy")[..., 3])) - 1
                   for r in records)
    assert sum(fid["nuclei"]["synthetic"]) == n_nuclei > 0
    assert fid["fidelity"]["1"]["real"]["n"] == 114  # the classifier's held-out "other" nuclei (heldout.json)

    # Report: every image it links exists; the README figures were refreshed.
    report = (out / "report.md").read_text()
    assert "### Label fidelity" in report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) >= 4
    for link in links:
        assert (out / link).exists(), link
    for name in ("pipeline.png", "demo_grid.png"):
        assert fileio.read_image(str(figures / name)).shape[0] > 100

    # Re-running resumes: no output of a finished stage is rewritten (modification times stay).
    kept = [p for folder in ("toy_data", "gradmix", "train", "finetune", "synthesis") for p in (out / folder).rglob("*")
            if p.is_file() and p.suffix in (".npy", ".mat", ".pt", ".png", ".jpg") and not p.name.startswith(("figure", "class_counts"))]
    assert len(kept) > 10
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    again = run_demo(DemoConfig(out_dir=str(out), preset="quick", progress=False))
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes
    assert again["gradmix"]["maps_written"] == 0 and again["gradmix"]["maps_kept"] == record["gradmix"]["maps_written"]


def _model_keys():
    from guided_diffusion.infra.config import ModelConfig
    import dataclasses

    return [f.name for f in dataclasses.fields(ModelConfig)]
