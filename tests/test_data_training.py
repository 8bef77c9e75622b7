"""Training pipeline: crop/augmentation consistency, determinism, resume, sharding, batch layout."""

import dataclasses

import numpy as np
import pytest
import torch
from data_helpers import write_pair

from guided_diffusion.data.condition import build_condition
from guided_diffusion.data.readers import LabeledImage, SampleFiles
from guided_diffusion.data.training import (
    CropPlan,
    TrainCropDataset,
    augment,
    load_data,
    shard_indices,
)


def _coded_sample(h=40, w=48):
    """Every pixel its own instance id, written into the image (R = id % 256, G = id // 256) and
    the type map (id % 5): after any crop/rot/flip the three must still agree pixel by pixel."""
    ids = np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w)
    image = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1).astype(np.uint8)
    return LabeledImage(SampleFiles("coded", "coded.png", "coded.mat"), image, ids, ids % 5)


def test_augment_matches_numpy_dihedral_ops():
    a = np.arange(12).reshape(3, 4)
    assert np.array_equal(augment(a, 1, False, False), np.rot90(a))
    assert np.array_equal(augment(a, 0, True, False), a[:, ::-1])
    assert np.array_equal(augment(a, 2, False, True), np.rot90(a, 2)[::-1])
    rgb = np.random.default_rng(0).integers(0, 9, (3, 4, 3))
    for c in range(3):  # channels follow the spatial transform
        assert np.array_equal(augment(rgb, 3, True, True)[..., c], augment(rgb[..., c], 3, True, True))


def test_crop_and_augmentation_keep_image_and_maps_aligned():
    sample = _coded_sample()
    ds = TrainCropDataset([sample], image_size=16)
    seen = set()
    for seed in range(40):
        item = ds[(0, seed)]
        x0, y0, rot, flip_lr, flip_ud = item["crop"]
        seen.add((rot, flip_lr, flip_ud))
        img = np.round((item["image"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.int64)
        decoded = img[..., 0] + 256 * img[..., 1]
        inst = item["inst"].numpy()
        assert np.array_equal(decoded, inst)  # image and instance map moved together
        assert np.array_equal(item["type"].numpy(), inst % 5)  # and the type map
        expected = augment(sample.inst_map[y0 : y0 + 16, x0 : x0 + 16], rot, flip_lr, flip_ud)
        assert np.array_equal(inst, expected)  # the window is the one reported
        assert item["image"].dtype == torch.float32 and -1 <= item["image"].min() and item["image"].max() <= 1
    assert len(seen) >= 6  # rotations and flips are all exercised


def test_flags_disable_augmentation_and_crop_equal_to_image():
    sample = _coded_sample(16, 16)
    ds = TrainCropDataset([sample], image_size=16, random_flip=False, random_rotate=False)
    for seed in range(5):
        item = ds[(0, seed)]
        assert item["crop"] == (0, 0, 0, False, False)
        assert np.array_equal(item["inst"].numpy(), sample.inst_map)
    with pytest.raises(Exception, match="smaller than the crop size"):
        TrainCropDataset([sample], image_size=17)


def test_plan_is_pure_and_visits_each_file_once_per_epoch():
    plan = CropPlan(list(range(5)), batch_size=2, seed=3)
    keys = [k for step in range(5) for k in plan.batch_keys(step)]  # 10 items = 2 epochs
    # pure function of (seed, step, item): a fresh plan asked out of order gives the same keys
    fresh = CropPlan(list(range(5)), batch_size=2, seed=3)
    assert [fresh.batch_keys(s) for s in (4, 1, 3, 0, 2)] == [keys[2 * s : 2 * s + 2] for s in (4, 1, 3, 0, 2)]
    assert sorted(k[0] for k in keys[:5]) == list(range(5))
    assert sorted(k[0] for k in keys[5:]) == list(range(5))
    assert len({k[1] for k in keys}) == 10  # every item has its own crop seed
    det = CropPlan(list(range(5)), batch_size=2, seed=3, deterministic=True)
    assert [k[0] for s in range(3) for k in det.batch_keys(s)] == [0, 1, 2, 3, 4, 0]


def test_shard_indices():
    assert shard_indices(5, 1, 2) == [1, 3]
    assert shard_indices(5, 0, 2) == [0, 2, 4]
    assert shard_indices(2, 1, 4) == [0, 1]  # fewer files than ranks: all files, rank-seeded crops
    a = CropPlan([0, 1], 1, seed=0, rank=0).batch_keys(0)[0][1]
    b = CropPlan([0, 1], 1, seed=0, rank=1).batch_keys(0)[0][1]
    assert a != b


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for i in range(3):
        write_pair(str(root), "Train", f"t{i}", h=24, w=28, seed=i)
    return str(root)


def _take(data, n):
    return [next(data) for _ in range(n)]


def test_load_data_batches(tiny_root):
    data = load_data(data_dir=tiny_root, batch_size=2, image_size=16, dataset_mode="consep", progress=False)
    x, cond = next(data)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert cond["y"].shape == (2, 6, 16, 16) and cond["y"].dtype == torch.float32
    assert cond["inst"].dtype == torch.int64 and cond["type"].dtype == torch.int64
    assert torch.equal(cond["y"], build_condition(cond["type"], cond["inst"], 5))
    assert int(cond["type"].max()) <= 4 and len(cond["path"]) == 2
    no_inst = load_data(
        data_dir=tiny_root, batch_size=1, image_size=16, dataset_mode="consep", no_instance=True, progress=False
    )
    assert next(no_inst)[1]["y"].shape == (1, 5, 16, 16)


def test_load_data_determinism_and_resume(tiny_root):
    kw = dict(data_dir=tiny_root, batch_size=2, image_size=16, dataset_mode="consep", progress=False)
    a = _take(load_data(seed=5, **kw), 4)
    b = _take(load_data(seed=5, **kw), 4)
    c = _take(load_data(seed=6, **kw), 4)
    for (xa, ca), (xb, cb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ca["inst"], cb["inst"]) and ca["path"] == cb["path"]
    assert any(not torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    # resume: a fresh loader restored to step 2 continues with batches 2 and 3
    first = load_data(seed=5, **kw)
    _take(first, 2)
    state = first.state_dict()
    assert state == {"seed": 5, "step": 2}
    resumed = load_data(seed=5, **kw)
    resumed.load_state_dict(state)
    for (xa, _), (xr, _) in zip(a[2:], _take(resumed, 2)):
        assert torch.equal(xa, xr)
    started = load_data(seed=5, start_step=3, **kw)
    assert torch.equal(next(started)[0], a[3][0])
    with pytest.raises(Exception, match="seed"):
        resumed.load_state_dict({"seed": 1, "step": 0})


def test_workers_give_the_same_stream(tiny_root):
    kw = dict(data_dir=tiny_root, batch_size=2, image_size=16, dataset_mode="consep", progress=False, seed=2)
    plain = _take(load_data(**kw), 3)
    workers = load_data(num_workers=1, **kw)
    got = _take(workers, 2)
    workers.load_state_dict({"seed": 2, "step": 2})  # restart mid-stream with workers
    got += _take(workers, 1)
    for (xa, ca), (xb, cb) in zip(plain, got):
        assert torch.equal(xa, xb) and torch.equal(ca["y"], cb["y"])


def test_fixtures_train_custom(fixtures_dir):
    data = load_data(
        data_dir=str(fixtures_dir / "real_he_patches"),
        batch_size=2,
        image_size=64,
        dataset_mode="custom",
        num_classes=6,
        image_folder="imgs",
        label_folder="masks",
        progress=False,
    )
    x, cond = next(data)
    assert x.shape == (2, 3, 64, 64) and cond["y"].shape == (2, 7, 64, 64)


def test_load_data_reports_small_images(tmp_path):
    write_pair(str(tmp_path), "Train", "a", h=20, w=30)
    with pytest.raises(Exception, match=r"a\.png: image 30x20 \(WxH\) is smaller than the crop size 24"):
        load_data(data_dir=str(tmp_path), batch_size=1, image_size=24, dataset_mode="consep", progress=False)


def test_data_settings_of_a_training_run(tiny_root):
    """The typed path (DataSettings -> open_batches, what train() uses) and the official keyword
    form give the same stream; a run's settings come from its TrainConfig and ModelConfig."""
    from guided_diffusion.data.training import DataSettings, open_batches
    from guided_diffusion.infra.config import ModelConfig
    from guided_diffusion.infra.train_config import TrainConfig

    train_cfg = TrainConfig(data_dir=tiny_root, dataset_mode="consep", batch_size=2, seed=3)
    model_cfg = ModelConfig(image_size=16, num_classes=5, no_instance=True)
    settings = DataSettings.from_config(train_cfg, model_cfg, progress=False)
    assert (settings.split, settings.image_size, settings.num_classes, settings.no_instance, settings.seed) == \
        ("Train", 16, 5, True, 3)
    assert DataSettings.from_config(TrainConfig(is_train=False), model_cfg).split == "Test"
    typed = _take(open_batches(settings), 2)
    official = _take(load_data(data_dir=tiny_root, batch_size=2, image_size=16, dataset_mode="consep", num_classes=5,
                               no_instance=True, seed=3, progress=False), 2)
    for (xa, ca), (xb, cb) in zip(typed, official):
        assert torch.equal(xa, xb) and torch.equal(ca["y"], cb["y"])
    with pytest.raises(TypeError):
        load_data(data_dir=tiny_root, batch_size=2, image_size=16, dataset_mode="consep", bogus=1)
    # --crop_size: smaller training crops than the model's image_size
    cropped = DataSettings.from_config(dataclasses.replace(train_cfg, crop_size=8), model_cfg, progress=False)
    x, cond = next(iter(open_batches(cropped)))
    assert cropped.image_size == 8 and x.shape == (2, 3, 8, 8) and cond["y"].shape == (2, 5, 8, 8)
