"""Typed config -> flags, config JSON beside checkpoints, and the official script_util helpers."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Optional

import pytest

from guided_diffusion import script_util
from guided_diffusion.infra import config
from guided_diffusion.infra.errors import DiffMixError

# The official SDM model_and_diffusion_defaults() (semantic-diffusion-model/guided_diffusion/script_util.py),
# written out by hand so a changed default fails here.
OFFICIAL_DEFAULTS = dict(
    image_size=64, num_classes=151, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0, class_cond=False,
    use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
    use_new_attention_order=False, no_instance=False, learn_sigma=False, diffusion_steps=1000,
    noise_schedule="linear", timestep_respacing="", use_kl=False, predict_xstart=False,
    rescale_timesteps=False, rescale_learned_sigmas=False,
)

CONSEP_FLAGS = (
    "--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True "
    "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True --num_classes 5 "
    "--class_cond True --no_instance False --timestep_respacing ddim100"
).split()


def test_defaults_are_the_official_ones():
    defaults = script_util.model_and_diffusion_defaults()
    # spade_hidden is ours (the official code fixes the SPADE hidden width at 128).
    assert defaults.pop("spade_hidden") == 128
    assert defaults == OFFICIAL_DEFAULTS
    # The official flag order (as `--help` lists it): dict equality above ignores order.
    assert list(defaults) == list(OFFICIAL_DEFAULTS)


@pytest.mark.parametrize("text,value", [("True", True), ("yes", True), ("1", True), ("F", False), ("no", False)])
def test_str2bool(text, value):
    assert config.str2bool(text) is value


def test_str2bool_rejects_other_words():
    with pytest.raises(argparse.ArgumentTypeError):
        config.str2bool("maybe")


def test_dataclass_flags_parse_official_command_line():
    parser = config.add_dataclass_args(argparse.ArgumentParser(), config.ModelConfig)
    cfg = config.dataclass_from_args(config.ModelConfig, parser.parse_args(CONSEP_FLAGS))
    assert cfg.image_size == 256 and isinstance(cfg.image_size, int)
    assert cfg.learn_sigma is True and cfg.no_instance is False and cfg.class_cond is True
    assert cfg.attention_resolutions == "32,16,8" and cfg.timestep_respacing == "ddim100"
    assert cfg.dropout == 0.0 and cfg.num_heads == 4  # untouched defaults
    with pytest.raises(SystemExit):  # argparse reports a bad bool value itself
        parser.parse_args(["--learn_sigma", "perhaps"])


def test_instance_defaults_and_optional_fields():
    @dataclasses.dataclass
    class Small:
        steps: int = 3
        name: Optional[str] = None
        flag: bool = False

    parser = config.add_dataclass_args(argparse.ArgumentParser(), Small(steps=7, flag=True))
    args = parser.parse_args([])
    assert (args.steps, args.name, args.flag) == (7, None, True)
    got = config.dataclass_from_args(Small, parser.parse_args(["--name", "x", "--flag", "false"]))
    assert got == Small(steps=7, name="x", flag=False)


def test_model_config_from_dict_coerces_and_ignores_extras():
    cfg = config.ModelConfig.from_dict({"learn_sigma": "True", "num_classes": 5.0, "batch_size": 8})
    assert cfg.learn_sigma is True and cfg.num_classes == 5
    with pytest.raises(DiffMixError, match="num_classes"):
        config.ModelConfig.from_dict({"num_classes": "five"}, source="run/config.json")


def test_config_beside_checkpoint_round_trip(tmp_path):
    ckpt = tmp_path / "logs" / "ema_0.9999_000100.pt"
    assert config.load_config_for_checkpoint(str(ckpt)) is None
    cfg = config.ModelConfig(image_size=32, class_cond=True)
    config.save_config(str(tmp_path / "logs" / "config.json"), cfg)
    loaded = config.load_config_for_checkpoint(str(ckpt))
    assert loaded == cfg.to_dict()
    assert config.ModelConfig.from_dict(loaded) == cfg
    (tmp_path / "logs" / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(DiffMixError, match="config.json"):
        config.load_config_for_checkpoint(str(ckpt))


def test_add_dict_to_argparser_and_args_to_dict():
    parser = argparse.ArgumentParser()
    script_util.add_dict_to_argparser(parser, dict(a=1, b=False, c="x", d=None, e=0.5))
    args = parser.parse_args(["--a", "4", "--b", "true", "--d", "y", "--e", "2"])
    assert script_util.args_to_dict(args, ["a", "b", "c", "d", "e"]) == dict(a=4, b=True, c="x", d="y", e=2.0)


def test_channel_mult_and_attention_parsing():
    assert script_util.parse_channel_mult("", 256) == (1, 1, 2, 2, 4, 4)
    assert script_util.parse_channel_mult("", 512) == (0.5, 1, 1, 2, 2, 4, 4)
    assert script_util.parse_channel_mult("1,2,3,4", 100) == (1, 2, 3, 4)
    assert script_util.parse_attention_resolutions("32,16,8", 256) == (8, 16, 32)
    with pytest.raises(DiffMixError, match="image_size 100"):
        script_util.parse_channel_mult("", 100)
    with pytest.raises(DiffMixError, match="channel_mult"):
        script_util.parse_channel_mult("1,two", 64)
    with pytest.raises(DiffMixError, match="divide"):
        script_util.parse_attention_resolutions("24", 64)


def test_create_model_errors():
    base = dict(image_size=32, num_classes=3, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                attention_resolutions="16")
    with pytest.raises(DiffMixError, match="class_cond"):
        script_util.create_model(**base)
    with pytest.raises(DiffMixError, match="multiples of 32"):
        script_util.create_model(**{**base, "num_channels": 48}, class_cond=True)
    model = script_util.create_model(**base, class_cond=True, no_instance=True, learn_sigma=True)
    assert model.num_classes == 3 and model.out_channels == 6


def test_create_model_and_diffusion_with_official_keywords():
    kw = dict(OFFICIAL_DEFAULTS, image_size=32, num_classes=3, num_channels=32, num_res_blocks=1,
              channel_mult="1,2", attention_resolutions="16", class_cond=True, learn_sigma=True,
              timestep_respacing="ddim10")
    model, diffusion = script_util.create_model_and_diffusion(**kw)
    assert model.num_classes == 4 and model.out_channels == 6
    assert diffusion.num_timesteps == 10


def test_settings_are_validated_in_one_style_every_problem_in_one_line():
    """Every settings dataclass reports all its problems in one DiffMixError, joined with "; "; a
    non-finite value is named once (as not finite), not again by its range rule."""
    from guided_diffusion.gradmix.settings import GradMixConfig
    from guided_diffusion.synthesis.settings import SampleConfig
    from guided_diffusion.infra.train_config import TrainConfig, validate_train_config

    cases = [
        (lambda: validate_train_config(TrainConfig(batch_size=0, lr=float("nan"), drop_rate=2.0)),
         ["--batch_size 0: must be >= 1", "--lr nan: must be a finite number", "--drop_rate 2.0: must be in [0, 1]"]),
        (lambda: SampleConfig(data_dir="", results_path="r", s=0.5, eta=float("inf")).validate(),
         ["--s 0.5: the guidance scale must be >= 1", "--eta inf: must be a finite number", "--data_dir is required"]),
        (lambda: GradMixConfig(data_dir="d", out_dir="o", kinds="shuffle", fraction=1.5, dilate=-1).validate(),
         ["--kinds 'shuffle'", "--fraction 1.5: must be in [0, 1]", "--dilate -1: must be a non-negative integer"]),
    ]
    for run, fragments in cases:
        with pytest.raises(DiffMixError) as err:
            run()
        message = str(err.value)
        assert "\n" not in message and message.count("; ") == len(fragments) - 1, message
        for fragment in fragments:
            assert fragment in message, message
        assert message.count("--lr nan") <= 1 and message.count("--eta inf") <= 1
    check = config.SettingsCheck(TrainConfig())
    check.need("batch_size", lambda v: v >= 1, ">= 1")
    check.done()  # nothing recorded: no error
