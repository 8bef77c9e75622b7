"""The shipped pretrained SDM (models/consep256_cpu) and the shipped real sample (datasets/sample):
the model loads strictly with its own config, and the demo's synthesis path turns one real patch
into a synthetic patch with the right labels. Also the export that made the model folder."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch

from guided_diffusion.app.demo_settings import SAMPLE_DATA
from guided_diffusion.app.pretrained import DEFAULT_MODEL, describe, export_model
from guided_diffusion.data.classes import resolve_class_table
from guided_diffusion.data.readers import list_samples, read_samples
from guided_diffusion.infra import fileio
from guided_diffusion.infra.config import ModelConfig, load_config_for_checkpoint
from guided_diffusion.synthesis import SampleConfig, run_synthesis
from guided_diffusion.synthesis.settings import load_model_and_diffusion


def test_shipped_model_loads_strictly_with_its_config():
    config = load_config_for_checkpoint(DEFAULT_MODEL)
    assert config is not None, "config.json must sit beside the shipped weights"
    model_cfg = ModelConfig.from_dict(config)
    assert model_cfg.class_cond and model_cfg.num_classes == 5 and model_cfg.spade_hidden < 128
    model, _ = load_model_and_diffusion(DEFAULT_MODEL, model_cfg.to_dict(), torch.device("cpu"))  # strict
    weights = sum(p.numel() for p in model.parameters())
    record = describe(DEFAULT_MODEL)
    assert record["parameters"] == weights
    assert os.path.getsize(DEFAULT_MODEL) < 25 * 2**20
    # The record says how it was trained: pre-training, then classifier-free stages (a continued model
    # keeps the earlier stages and names the weights it continued).
    stages = record["stages"]
    assert stages[0]["settings"]["drop_rate"] == 0.0 and all(s["settings"]["drop_rate"] == 0.2 for s in stages[1:])
    ends = [s["final_step"] for s in stages]
    assert len(stages) >= 2 and ends == sorted(set(ends)) and ends[0] > 0 and ends[-1] == record["step"]
    assert record["total_wall_time_s"] > 0 and os.path.basename(record["recipe"]).startswith("consep256_cpu")
    if len(stages) > 2:
        assert record["continued_from"]["step"] == ends[-2]
    import hashlib

    assert hashlib.sha256(fileio.read_bytes(DEFAULT_MODEL)).hexdigest() == record["sha256"]


def test_shipped_sample_is_real_consep_in_the_layout_the_tools_read():
    table = resolve_class_table("custom", None, 5)
    samples = read_samples(list_samples(SAMPLE_DATA, "Train"), table)
    assert len(samples) == 8
    classes = np.concatenate([np.unique(s.type_map) for s in samples])
    assert set(classes.tolist()) == {0, 1, 2, 3, 4}  # every merged class, the rare one included
    assert all(s.image.shape == (256, 256, 3) for s in samples)


def test_demo_synthesis_path_with_the_shipped_model_on_one_shipped_patch(tmp_path):
    """One real patch, its own label map, a few DDIM steps: the demo's sampling call, shortened."""
    stem = "train_24_008"
    model_cfg = ModelConfig.from_dict(load_config_for_checkpoint(DEFAULT_MODEL)).to_dict()
    model_cfg["timestep_respacing"] = "ddim10"
    cfg = SampleConfig(
        data_dir=SAMPLE_DATA, dataset_mode="custom", model_path=DEFAULT_MODEL, results_path=str(tmp_path),
        run_name="one", s=1.5, ddim_percent=50, batch_size=1, num_samples=1, idx_img=stem, seed=3,
        progress=False, figure_rows=1,
    )
    summary = run_synthesis(cfg, model_cfg, model_config_source=DEFAULT_MODEL)
    assert len(summary.written) == 1
    rec = json.loads((tmp_path / "one" / "records" / f"{summary.written[0]}.json").read_text())
    patch = np.load(tmp_path / "one" / "npy_patch" / f"{rec['name']}.npy")
    size = model_cfg["image_size"]
    assert patch.shape == (size, size, 5) and patch.dtype == np.int32
    c = rec["crop"]
    label = fileio.read_mat(os.path.join(SAMPLE_DATA, "Train", "Labels", f"{stem}.mat"))
    np.testing.assert_array_equal(patch[..., 4], label["type_map"][c["y0"]: c["y0"] + size, c["x0"]: c["x0"] + size])
    real = fileio.read_image(os.path.join(SAMPLE_DATA, "Train", "Images", f"{stem}.jpg"))
    real = real[c["y0"]: c["y0"] + size, c["x0"]: c["x0"] + size].astype(np.float64)
    synth = patch[..., :3].astype(np.float64)
    # A new image (not the real one returned), yet the same tissue: SDEdit keeps the layout, so the
    # synthetic patch correlates with the real one it started from and keeps H&E colours (blue < red).
    assert np.abs(synth - real).mean() > 2
    assert np.corrcoef(synth.mean(-1).ravel(), real.mean(-1).ravel())[0, 1] > 0.3
    assert synth[..., 0].mean() > synth[..., 1].mean()
    nuclei = patch[..., 3] > 0
    assert synth[nuclei].mean() < synth[~nuclei].mean()  # nuclei (haematoxylin) are darker


def _tiny_training(tmp_path):
    """(model config, common TrainConfig settings) of a tiny SDM trained on a 2-tile toy dataset."""
    from guided_diffusion.data import make_toy_dataset

    data = tmp_path / "toy"
    make_toy_dataset(str(data), num_train=2, num_test=0, size=64, seed=0, progress=False)
    model_cfg = ModelConfig(image_size=32, num_classes=5, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                            attention_resolutions="16", num_head_channels=16, class_cond=True, learn_sigma=True,
                            spade_hidden=16, diffusion_steps=50)
    common = dict(data_dir=str(data), dataset_mode="consep", batch_size=2, ema_rate="0.9", log_interval=1,
                  progress=False, seed=0)
    return model_cfg, common


def test_export_writes_a_model_folder_that_sampling_loads(tmp_path):
    """export_model on a tiny two-stage run: safetensors EMA weights equal the run's EMA file, the
    config and the record sit beside them, and sampling loads the folder strictly."""
    from guided_diffusion.infra.checkpoints import load_state_dict
    from guided_diffusion.train_util import TrainConfig, train

    model_cfg, common = _tiny_training(tmp_path)
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    train(model_cfg, TrainConfig(lr=1e-4, max_steps=2, save_interval=2, log_dir=str(pre), **common))
    train(model_cfg, TrainConfig(lr=1e-4, drop_rate=0.2, max_steps=3, save_interval=3, log_dir=str(fine),
                                 resume_checkpoint=str(pre / "model000002.pt"), **common))
    # Stage 1 trains on after stage 2 left it at step 2: those steps are not the model's.
    train(model_cfg, TrainConfig(lr=1e-4, max_steps=4, save_interval=2, log_dir=str(pre), resume_checkpoint="latest",
                                 **common))
    out = tmp_path / "model"
    record = export_model([str(pre), str(fine)], str(out), recipe="recipe.sh", command="cmd")
    assert record["step"] == 3 and [s["final_step"] for s in record["stages"]] == [2, 3]
    assert record["stages"][0]["first_logged_step"] == 1 and record["stages"][1]["first_logged_step"] == 3
    assert [s["settings"]["drop_rate"] for s in record["stages"]] == [0.0, 0.2]
    assert (out / "loss.png").exists() and json.loads((out / "training.json").read_text()) == record
    exported = load_state_dict(str(out / "model.safetensors"))
    ema = load_state_dict(str(fine / "ema_0.9_000003.pt"))
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k].float()) for k in ema)
    model, _ = load_model_and_diffusion(str(out / "model.safetensors"),
                                        ModelConfig.from_dict(load_config_for_checkpoint(str(out / "model.safetensors"))).to_dict(),
                                        torch.device("cpu"))
    assert model.output_blocks[0][0].in_norm.mlp_shared[0].out_channels == 16


def test_export_of_a_continued_model_keeps_the_earlier_stages_and_retrain_repeats_them(tmp_path):
    """A run started from an exported model folder's weights (a copy named with its step, its
    training.json beside it, as consep256_cpu_continue.sh makes) exports with the earlier stages
    first and ``continued_from`` naming the weights; a record whose SHA-256 is another file's is
    refused. ``demo --retrain`` plans every stage of such a record with its recipe options."""
    import shutil

    import pytest

    from guided_diffusion.app.demo import DemoConfig, _Stages, _train_stages, _training_plan
    from guided_diffusion.infra.errors import DiffMixError
    from guided_diffusion.train_util import TrainConfig, train

    model_cfg, common = _tiny_training(tmp_path)
    first = tmp_path / "first"
    # Stage 1 sets its 16 px crops through the model's size (attention at the same depth: the same
    # U-Net); the record calls that crop_size 16, so the retrain at 32 px repeats the crops.
    small = dataclasses.replace(model_cfg, image_size=16, attention_resolutions="8")
    train(small, TrainConfig(lr=1e-4, max_steps=1, save_interval=1, log_dir=str(first), **common))
    shipped = tmp_path / "shipped"
    earlier = export_model([str(first)], str(shipped), recipe="first.sh")
    init = tmp_path / "cont.init"
    init.mkdir()
    shutil.copy(shipped / "model.safetensors", init / "model000001.safetensors")
    shutil.copy(shipped / "training.json", init)
    cont = tmp_path / "cont"
    train(model_cfg, TrainConfig(lr=5e-5, drop_rate=0.2, snr_gamma=5.0, crop_size=16, max_steps=2, save_interval=2, log_dir=str(cont),
                                 resume_checkpoint=str(init / "model000001.safetensors"), **common))
    record = export_model([str(cont)], str(tmp_path / "model"), recipe="continue.sh")
    assert [s["final_step"] for s in record["stages"]] == [1, 2]
    assert record["stages"][0] == earlier["stages"][0]
    assert record["stages"][1]["settings"]["snr_gamma"] == 5.0 and record["stages"][0]["settings"]["snr_gamma"] == 0.0
    assert record["continued_from"]["sha256"] == earlier["sha256"] and record["continued_from"]["recipe"] == "first.sh"
    assert record["total_wall_time_s"] == pytest.approx(sum(s["wall_time_s"] for s in record["stages"]), abs=0.2)

    _, stages = _training_plan(DemoConfig(model_path=str(tmp_path / "model" / "model.safetensors")),
                               str(tmp_path / "retrain"), 5)
    assert [(st.max_steps, st.drop_rate, st.options, st.from_weights) for st in stages] == [
        (1, 0.0, {"crop_size": 16}, False),
        (2, 0.2, {"crop_size": 16, "snr_gamma": 5.0}, True)]  # stage 2 starts from stage 1's EMA weights
    assert len({st.folder for st in stages}) == 2
    # The retrain runs them so: stage 2 from stage 1's EMA file (weights only), min-SNR on.
    runner = _Stages()
    demo_cfg = DemoConfig(dataset_mode="consep", log_interval=1, progress=False)
    final = _train_stages(stages, model_cfg, demo_cfg, common["data_dir"], runner, "fp32")
    assert final.endswith("finetune/model000002.pt") and list(runner.timings) == [st.name for st in stages]
    log = open(os.path.join(stages[1].folder, "log.txt")).read()
    assert f"resumed from {stages[0].folder}/ema_0.9_000001.pt at step 1" in log
    retrained = [json.loads(open(os.path.join(st.folder, "config.json")).read()) for st in stages]
    assert retrained[1]["snr_gamma"] == 5.0
    assert [(c["image_size"], c["crop_size"]) for c in retrained] == [(32, 16), (32, 16)]

    (init / "training.json").write_text(json.dumps({**earlier, "sha256": "0" * 64}))
    with pytest.raises(DiffMixError, match="records weights with SHA-256 0+, but .*model000001.safetensors"):
        export_model([str(cont)], str(tmp_path / "model2"))


def test_stage_order_follows_the_log_and_paths_recorded_elsewhere(tmp_path):
    """A restarted stage records resume_checkpoint "latest"; its log.txt still names the checkpoint of
    the stage before. Paths recorded relative to another working directory match by the recorded
    log_dir. Stages that do not chain are refused naming both folders."""
    import pytest

    from guided_diffusion.infra.errors import DiffMixError
    from guided_diffusion.app.pretrained import check_stage_order

    pre, fine = str(tmp_path / "pre"), str(tmp_path / "fine")
    os.makedirs(fine)
    with open(os.path.join(fine, "log.txt"), "w") as f:
        f.write(f"resumed from {pre}/model000002.pt at step 2\nresumed from {fine}/model000003.pt at step 3\n")
    assert check_stage_order([pre, fine], [{"resume_checkpoint": ""}, {"resume_checkpoint": "latest"}]) == [2]
    check_stage_order([pre, fine], [{"resume_checkpoint": "", "log_dir": "runs/sdm/pre"},
                                    {"resume_checkpoint": "runs/sdm/pre/model000002.pt"}])
    check_stage_order([pre, fine], [{}, {"resume_checkpoint": pre}])  # a folder: its newest checkpoint
    with pytest.raises(DiffMixError, match=f"{pre} does not continue {fine}"):
        check_stage_order([fine, pre], [{"resume_checkpoint": "latest"}, {"resume_checkpoint": ""}])
