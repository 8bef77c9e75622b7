"""Checkpoint I/O: weights-only loading, fp16 files, safetensors, clear mismatch errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from guided_diffusion.infra import checkpoints
from guided_diffusion.infra.errors import DiffMixError
from guided_diffusion.script_util import create_model


def make_model(num_classes=3, no_instance=False, learn_sigma=True, num_channels=32, seed=0):
    torch.manual_seed(seed)
    model = create_model(image_size=32, num_classes=num_classes, num_channels=num_channels, num_res_blocks=1,
                         channel_mult="1,2", attention_resolutions="16", num_head_channels=16, class_cond=True,
                         learn_sigma=learn_sigma, no_instance=no_instance, use_scale_shift_norm=True,
                         resblock_updown=True)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
    return model.eval()


def inputs(cond=4):
    g = torch.Generator().manual_seed(5)
    y = (torch.rand(2, cond, 32, 32, generator=g) > 0.7).float()
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([20, 600]), y


class NotATensor:
    pass


def test_fp16_pt_file_loads_into_fp32_model(tmp_path):
    src = make_model()
    half = {k: v.half() for k, v in src.state_dict().items()}  # as official fp16 EMA files
    torch.save(half, tmp_path / "ema_0.9999_000010.pt")
    dst = make_model(seed=1)
    assert checkpoints.load_model_weights(dst, str(tmp_path / "ema_0.9999_000010.pt")) == ([], [])
    for k, v in dst.state_dict().items():
        assert v.dtype == torch.float32
        assert torch.equal(v, half[k].float()), k
    x, t, y = inputs()
    with torch.no_grad():
        a, b = src(x, t, y=y), dst(x, t, y=y)
    assert a.abs().max() > 0.1
    torch.testing.assert_close(b, a, atol=2e-2, rtol=2e-2)  # fp16 rounding of the weights only
    assert not torch.equal(a, b)


def test_safetensors_round_trip(tmp_path):
    src = make_model()
    path = tmp_path / "w.safetensors"
    checkpoints.save_state_dict(str(path), src.state_dict())
    sd = checkpoints.load_state_dict(str(path))
    assert sorted(sd) == sorted(src.state_dict())  # safetensors stores keys sorted
    assert all(torch.equal(sd[k], v) for k, v in src.state_dict().items())
    dst = make_model(seed=2)
    checkpoints.load_model_weights(dst, str(path))
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(src(x, t, y=y), dst(x, t, y=y))


def test_pt_save_is_atomic_and_wrappers_and_ddp_prefix_are_accepted(tmp_path):
    src = make_model()
    checkpoints.save_state_dict(str(tmp_path / "m.pt"), src.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary files left behind
    wrapped = {"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "step": 3}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    sd = checkpoints.load_state_dict(str(tmp_path / "wrapped.pth"))
    assert list(sd) == list(src.state_dict())


def test_unsafe_or_non_tensor_files_are_refused(tmp_path):
    torch.save({"w": NotATensor()}, tmp_path / "pickled.pt")
    with pytest.raises(DiffMixError, match=r"pickled\.pt: holds pickled Python objects; refusing"):
        checkpoints.load_state_dict(str(tmp_path / "pickled.pt"))
    torch.save({"w": torch.zeros(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(DiffMixError, match=r"mixed\.pt.*not tensors"):
        checkpoints.load_state_dict(str(tmp_path / "mixed.pt"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DiffMixError, match=r"junk\.safetensors"):
        checkpoints.load_state_dict(str(tmp_path / "junk.safetensors"))
    with pytest.raises(DiffMixError, match="not found"):
        checkpoints.load_state_dict(str(tmp_path / "missing.pt"))


def test_wrong_num_classes_hint():
    ckpt = make_model(num_classes=3).state_dict()  # condition width 4
    with pytest.raises(DiffMixError) as err:
        checkpoints.load_model_weights(make_model(num_classes=5), ckpt)
    msg = str(err.value)
    assert "mis-shaped keys" in msg and "mlp_shared.0.weight" in msg
    assert "4 condition channels" in msg and "this model 6" in msg
    assert "num_classes 3 with no_instance False" in msg and "num_classes 4 with no_instance True" in msg


def test_no_instance_mismatch_hint():
    ckpt = make_model(num_classes=3, no_instance=True).state_dict()  # condition width 3
    with pytest.raises(DiffMixError, match="num_classes 2 with no_instance False.*num_classes 3 with no_instance True"):
        checkpoints.load_model_weights(make_model(num_classes=3), ckpt)


def test_learn_sigma_and_width_hints(tmp_path):
    torch.save(make_model(learn_sigma=False).state_dict(), tmp_path / "m.pt")
    with pytest.raises(DiffMixError, match=r"(?s)m\.pt.*3 output channels.*learn_sigma False"):
        checkpoints.load_model_weights(make_model(learn_sigma=True), str(tmp_path / "m.pt"))
    with pytest.raises(DiffMixError, match="num_channels / channel_mult.*'num_channels': 64") as err:
        checkpoints.load_model_weights(make_model(), make_model(num_channels=64).state_dict())
    # issue 22 #12: the head differs in width only, so no learn_sigma hint ("predicts 6 ..., this model 6");
    # one line with the count and the first mis-shaped key and shapes
    msg = str(err.value)
    assert "output channels" not in msg and "learn_sigma" not in msg and "\n" not in msg
    assert re.search(r"the checkpoint does not fit the model: \d+ mis-shaped keys: \S+ \(checkpoint \(\d+, ", msg), msg


def test_missing_and_unexpected_keys():
    sd = make_model().state_dict()
    sd.pop("out.2.bias")
    sd["extra.weight"] = torch.zeros(1)
    model = make_model()
    with pytest.raises(DiffMixError, match=r"1 missing key: out\.2\.bias; 1 unexpected key: extra\.weight"):
        checkpoints.load_model_weights(model, sd)
    missing, unexpected = checkpoints.load_model_weights(model, sd, strict=False)
    assert missing == ["out.2.bias"] and unexpected == ["extra.weight"]


@pytest.mark.parametrize("name", ["tiny", "consep"])
def test_infer_config_from_official_shapes(spec_dir, name):
    spec = json.loads((spec_dir / f"sdm_state_dict_{name}.json").read_text())
    sd = {k: torch.empty(shape, device="meta") for k, shape in spec["state_dict"]}
    info = checkpoints.infer_config_from_state_dict(sd)
    cfg, derived = spec["config"], spec["derived"]
    assert info["num_channels"] == cfg["num_channels"]
    assert info["num_res_blocks"] == cfg["num_res_blocks"]
    assert list(info["channel_mult"]) == derived["channel_mult"]
    assert sorted(info["attention_ds"]) == sorted(derived["attention_downsample_rates"])
    assert info["cond_channels"] == derived["cond_channels"]
    assert info["num_classes_with_instance"] == cfg["num_classes"]
    assert info["learn_sigma"] is True and info["resblock_updown"] is True


def _loaders():
    from guided_diffusion import dist_util

    # guided-diffusion's dist_util.load_state_dict is the same reader, not a second copy.
    assert dist_util.load_state_dict is checkpoints.load_state_dict
    return [checkpoints.load_state_dict, checkpoints.load_torch_file]


def _one_line_error(loader, path) -> str:
    with pytest.raises(DiffMixError) as info:
        loader(str(path))
    msg = str(info.value)
    # torch's own message is many lines long and advises weights_only=False (unsafe): neither here.
    assert "\n" not in msg and "weights_only" not in msg and "trust" not in msg, msg
    return msg


@pytest.mark.parametrize("content", [b"model weights, honest\n", b"", b"\x80\x02\x8a"])
def test_non_torch_files_get_a_one_line_error(tmp_path, content):
    path = tmp_path / "model000100.pt"
    path.write_bytes(content)
    for loader in _loaders():
        msg = _one_line_error(loader, path)
        assert msg.startswith(f"{path}: not a PyTorch checkpoint (unreadable as a weights-only torch file: "), msg
    if not content:
        assert "empty file" in msg
    elif content.startswith(b"model"):
        assert "neither a zip archive nor a pickle" in msg
    else:
        assert "truncated or corrupt pickle" in msg


def test_truncated_torch_file_gets_a_one_line_error(tmp_path):
    torch.save({"w": torch.zeros(64)}, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    for loader in _loaders():
        msg = _one_line_error(loader, tmp_path / "cut.pt")
        assert msg.startswith(f"{tmp_path / 'cut.pt'}: not a PyTorch checkpoint"), msg


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickled_objects_are_refused_by_every_loader(tmp_path, zip_format):
    path = tmp_path / "objects.pt"
    torch.save({"w": NotATensor()}, path, _use_new_zipfile_serialization=zip_format)
    for loader in _loaders():
        msg = _one_line_error(loader, path)
        assert msg == (f"{path}: holds pickled Python objects; refusing to unpickle it "
                       "(only plain tensor checkpoints are loaded, for safety)")
    # A plain tensor file still loads through the same helper (nested containers included).
    torch.save({"step": 3, "t": [torch.ones(2)]}, tmp_path / "ok.pt")
    obj = checkpoints.load_torch_file(str(tmp_path / "ok.pt"))
    assert obj["step"] == 3 and torch.equal(obj["t"][0], torch.ones(2))
