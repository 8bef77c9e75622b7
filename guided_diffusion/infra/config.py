"""Typed settings that generate command-line flags, and the config JSON saved beside checkpoints.

One source of truth: a dataclass lists each setting with its type, default and help text;
:func:`add_dataclass_args` turns it into ``--flag`` arguments and :func:`dataclass_from_args`
back into the dataclass. :class:`ModelConfig` holds the official SDM model + diffusion keyword
names with the official defaults, so ``--num_channels 256 --learn_sigma True ...`` command lines
written for the official scripts work unchanged.

Training writes the resolved settings to ``config.json`` in the log folder; sampling finds them
with :func:`load_config_for_checkpoint` so a checkpoint can be used without repeating its flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from typing import Any, Callable, Mapping, Optional, Type, TypeVar

from . import fileio
from .errors import DiffMixError

CONFIG_NAME = "config.json"

T = TypeVar("T")


def flag(default: Any, help: str) -> Any:
    """A dataclass field that becomes ``--name`` with this default and help (:func:`add_dataclass_args`)."""
    return dataclasses.field(default=default, metadata={"help": help})


def nonfinite_flags(cfg: Any, prefix: str = "--") -> list:
    """One ``--name value: must be a finite number`` message per float field of the dataclass
    ``cfg`` holding NaN or inf (NaN passes every comparison such as ``lr <= 0``)."""
    import math

    return [f"{prefix}{f.name} {getattr(cfg, f.name)}: must be a finite number" for f in dataclasses.fields(cfg)
            if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name))]


class SettingsCheck:
    """The one way a settings dataclass is validated: every problem is collected, then all are raised
    together in one :class:`DiffMixError`, joined with "; " (one line, as every command-line error:
    docs/BAD_INPUT.md).

    The float fields of ``cfg`` holding NaN or inf are reported first (:func:`nonfinite_flags`);
    :meth:`need` then skips them, so one bad value gives one message. ``prefix`` is what names a
    field in the messages ("--" for flags, "" for API-only settings). Typical use::

        check = SettingsCheck(cfg)
        check.need("lr", lambda v: v > 0, "> 0")              # --lr -1.0: must be > 0
        check.add(cfg.eta and cfg.sampler == "ddpm", "--eta applies to the ddim and dpmpp2m samplers")
        check.rule(check_precision, cfg.precision)             # a check that raises DiffMixError
        check.done()                                           # raises when anything was recorded
    """

    def __init__(self, cfg: Any = None, prefix: str = "--"):
        self.cfg = cfg
        self.prefix = prefix
        self.problems: list[str] = nonfinite_flags(cfg, prefix) if cfg is not None else []

    def add(self, bad: Any, message: str) -> None:
        """Record ``message`` when ``bad`` is true."""
        if bad:
            self.problems.append(message)

    def need(self, name: str, ok: Callable[[Any], bool], rule: str) -> None:
        """Record ``<prefix><name> <value>: must be <rule>`` unless ``ok(value)``. An unset (None)
        value is not checked (unused by this run), nor a non-finite float (reported already)."""
        import math

        value = getattr(self.cfg, name)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return
        if not ok(value):
            self.problems.append(f"{self.prefix}{name} {value}: must be {rule}")

    def rule(self, check: Callable[..., T], *args: Any) -> Optional[T]:
        """Run ``check(*args)``, a function that raises :class:`DiffMixError` on a problem: its
        result, or None with its message recorded."""
        try:
            return check(*args)
        except DiffMixError as err:
            self.problems.append(str(err))
            return None

    def done(self) -> None:
        """Raise every recorded problem in one :class:`DiffMixError` (each once: a nested check such
        as :meth:`rule` may report a value again); nothing when there is none."""
        if self.problems:
            raise DiffMixError("; ".join(dict.fromkeys(self.problems)))


def str2bool(v: Any) -> bool:
    """Parse a boolean flag value: yes/true/t/y/1 or no/false/f/n/0 (any case), as officially."""
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false), got {v!r}")


@dataclasses.dataclass
class ModelConfig:
    """Model and diffusion settings: the official SDM keyword names and defaults.

    Note the official defaults are not a usable DiffMix model (``class_cond`` False,
    ``num_classes`` 151 for ADE20K); the CoNSeP/GLySAC settings of the paper are 256 px,
    num_channels 256, num_res_blocks 2, num_head_channels 64, attention_resolutions "32,16,8",
    resblock_updown, use_scale_shift_norm, learn_sigma, class_cond True, num_classes 5 (CoNSeP)
    or 4 (GLySAC).
    """

    image_size: int = flag(64, "the model's patch size in px: sampling size, and training crop size unless --crop_size")
    num_classes: int = flag(151, "classes incl. background; the condition adds 1 instance-edge channel")
    num_channels: int = flag(128, "base width of the U-Net")
    num_res_blocks: int = flag(2, "residual blocks per level")
    num_heads: int = flag(4, "attention heads (if num_head_channels is -1)")
    num_heads_upsample: int = flag(-1, "decoder heads; -1: num_heads")
    num_head_channels: int = flag(-1, "channels per head; overrides num_heads")
    attention_resolutions: str = flag("16,8", "feature-map sizes with attention, e.g. 32,16,8")
    channel_mult: str = flag("", "width multipliers, e.g. 1,1,2,2,4,4; '' by size")
    dropout: float = flag(0.0, "dropout rate in residual blocks")
    class_cond: bool = flag(False, "condition on the label map (must be true)")
    use_checkpoint: bool = flag(False, "gradient checkpointing")
    use_scale_shift_norm: bool = flag(True, "timestep FiLM scale+shift")
    resblock_updown: bool = flag(False, "residual blocks resample")
    use_fp16: bool = flag(False, "mixed precision (autocast)")
    use_new_attention_order: bool = flag(False, "split qkv before heads")
    no_instance: bool = flag(False, "omit the instance-edge channel")
    spade_hidden: int = flag(128, "hidden width of the SPADE label branches (official 128; smaller for cheap CPU models)")
    learn_sigma: bool = flag(False, "predict the variance (6 outputs)")
    diffusion_steps: int = flag(1000, "diffusion steps T")
    noise_schedule: str = flag("linear", "linear or cosine")
    timestep_respacing: str = flag("", "e.g. 250, ddim100; '' for all")
    use_kl: bool = flag(False, "train on the KL (rescaled) loss")
    predict_xstart: bool = flag(False, "predict x0 instead of the noise")
    rescale_timesteps: bool = flag(False, "feed t scaled to 0..1000")
    rescale_learned_sigmas: bool = flag(False, "rescaled MSE loss")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> "ModelConfig":
        """Build from a mapping, ignoring keys that are not model/diffusion settings.

        Values are coerced to the field types (so JSON ``"True"``/``1`` work for booleans);
        a value that cannot be coerced raises :class:`DiffMixError` naming ``source``.
        """
        hints = _field_types(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                kwargs[f.name] = _coerce(values[f.name], hints[f.name], f"{source}: {f.name}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(underlying type, is_optional) of a field annotation such as ``Optional[int]``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else str), True
    return tp, False


def _parser_for(tp: Any):
    base, _ = _base_type(tp)
    if base is bool:
        return str2bool
    if base in (int, float, str):
        return base
    raise TypeError(f"unsupported field type {tp!r} for a command-line flag")


def _coerce(value: Any, tp: Any, what: str) -> Any:
    base, optional = _base_type(tp)
    if value is None and optional:
        return None
    try:
        if base is bool:
            return str2bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        return base(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise DiffMixError(f"{what}: cannot read {value!r} as {base.__name__} ({err})") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The scripts' ``--help`` layout: the description as written, and "(default: X)" only where there
    is a default to show (not for None or required flags)."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def add_dataclass_args(parser: argparse.ArgumentParser, cls_or_instance: Any) -> argparse.ArgumentParser:
    """Add one ``--name`` flag per dataclass field, typed, with the field (or instance) value as default.

    Booleans take a value (``--learn_sigma True``), like the official ``str2bool`` flags.
    Passing an instance uses its values as the defaults.
    """
    cls = cls_or_instance if isinstance(cls_or_instance, type) else type(cls_or_instance)
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if isinstance(cls_or_instance, type):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = None
        else:
            default = getattr(cls_or_instance, f.name)
        help_text = f.metadata.get("help", "")
        parser.add_argument(
            f"--{f.name}",
            type=_parser_for(hints[f.name]),
            default=default,
            # A None default means "decided elsewhere" (e.g. a preset); the field's help says by what.
            # "%(default)r" rather than the value: argparse fills it in, and ArgumentDefaultsHelpFormatter
            # then sees a default already shown and does not add a second one.
            help=help_text if default is None else f"{help_text} (default: %(default)r)".lstrip(),
        )
    return parser


def dataclass_from_args(cls: Type[T], args: Any) -> T:
    """Build ``cls`` from an argparse namespace (or mapping); fields absent there keep their defaults."""
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    hints = _field_types(cls)
    kwargs = {
        f.name: _coerce(values[f.name], hints[f.name], f"--{f.name}")
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name in values
    }
    return cls(**kwargs)


def save_config(path: str, config: Mapping[str, Any]) -> None:
    """Atomically write the resolved settings as JSON (dataclasses are converted)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    fileio.write_json(path, dict(config))


def config_path_for_checkpoint(ckpt_path: str) -> str:
    """``config.json`` in the checkpoint's folder."""
    folder = os.path.dirname(str(ckpt_path))
    return fileio.join(folder, CONFIG_NAME) if folder else CONFIG_NAME


def load_config_for_checkpoint(ckpt_path: str) -> Optional[dict[str, Any]]:
    """The settings saved beside a checkpoint (``config.json`` in its folder), or None if absent."""
    path = config_path_for_checkpoint(ckpt_path)
    if not fileio.exists(path):
        return None
    config = fileio.read_json(path)
    if not isinstance(config, dict):
        raise DiffMixError(f"{path}: expected a JSON object of settings, got {type(config).__name__}")
    return config


# The two kinds of model folder, told apart by their config.json (see model_kind).
KINDS = {
    "sdm": "a diffusion model (SDM: an image_train.py run or export_model.py folder)",
    "segmenter": "a nuclei segmenter (a hovernet_train.py run)",
}


def model_kind(config: Mapping[str, Any]) -> Optional[str]:
    """Which model a ``config.json`` describes: ``"segmenter"`` (a ``hovernet_train.py`` run: its
    settings under ``"settings"`` and ``"net"``), ``"sdm"`` (model settings at the top level or under
    ``"model"``, as training and :func:`~guided_diffusion.app.pretrained.export_model` write them), or None when it says neither."""
    if "net" in config or "settings" in config:
        return "segmenter"
    model = config["model"] if isinstance(config.get("model"), dict) else config
    if any(f.name in model for f in dataclasses.fields(ModelConfig)):
        return "sdm"
    return None


def check_model_kind(config: Mapping[str, Any], path: str, need: str, flag: str) -> None:
    """Refuse a model folder (or file) ``path`` whose ``config.json`` describes the other kind of
    model than ``need`` ("sdm" or "segmenter"), which ``flag`` needs."""
    kind = model_kind(config)
    if kind is not None and kind != need:
        raise DiffMixError(f"{path}: holds {KINDS[kind]}, but {flag} needs {KINDS[need]}")


def dataclass_to_argv(instance: Any, skip_defaults: bool = True) -> list[str]:
    """The ``--flag value`` list that :func:`add_dataclass_args` parses back into ``instance``
    (fields equal to their defaults left out with ``skip_defaults``; None values never written)."""
    argv: list[str] = []
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if value is None or (skip_defaults and value == default):
            continue
        argv += [f"--{f.name}", str(value)]
    return argv
