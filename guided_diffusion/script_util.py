"""Official-style entry points for building the SDM model and diffusion from flat keyword settings.

Keeps the openai/guided-diffusion + SDM public names (``model_and_diffusion_defaults``,
``create_model``, ``create_model_and_diffusion``, ``add_dict_to_argparser``, ``args_to_dict``,
``str2bool``) with the same keyword names and defaults; the defaults themselves live in
:class:`guided_diffusion.infra.config.ModelConfig`.
"""

from __future__ import annotations

import argparse
from typing import Any, Iterable, Mapping

from .data.condition import condition_channels
from .infra.config import ModelConfig, str2bool
from .infra.errors import DiffMixError
from .respace import create_gaussian_diffusion
from .unet import UNetModel

__all__ = [
    "model_and_diffusion_defaults",
    "create_model",
    "create_model_and_diffusion",
    "add_dict_to_argparser",
    "args_to_dict",
    "str2bool",
    "default_channel_mult",
    "parse_channel_mult",
    "parse_attention_resolutions",
]

_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}


def model_and_diffusion_defaults() -> dict[str, Any]:
    """The official SDM defaults for every model and diffusion keyword (a fresh dict)."""
    return ModelConfig().to_dict()


def default_channel_mult(image_size: int) -> tuple:
    """Official width multipliers for an image size (512, 256, 128 or 64)."""
    if image_size not in _DEFAULT_CHANNEL_MULT:
        raise DiffMixError(
            f"no default channel_mult for image_size {image_size} (defaults exist for 512, 256, 128, 64); "
            "give --channel_mult, e.g. 1,2,3,4"
        )
    return _DEFAULT_CHANNEL_MULT[image_size]


def parse_channel_mult(channel_mult: Any, image_size: int) -> tuple:
    """``""`` -> default for the size; ``"1,2,3,4"`` (or a sequence) -> tuple of numbers."""
    if channel_mult in ("", None):
        return default_channel_mult(image_size)
    parts = channel_mult.split(",") if isinstance(channel_mult, str) else list(channel_mult)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise DiffMixError(f"channel_mult {channel_mult!r}: expected comma-separated numbers, e.g. 1,2,3,4") from None
    if not values or any(v <= 0 for v in values):
        raise DiffMixError(f"channel_mult {channel_mult!r}: expected positive numbers")
    return tuple(int(v) if v.is_integer() else v for v in values)


def parse_attention_resolutions(attention_resolutions: Any, image_size: int) -> tuple[int, ...]:
    """Feature-map sizes with attention ("32,16,8") -> down-sampling factors (image_size // size)."""
    if attention_resolutions in ("", None):
        return ()
    parts = attention_resolutions.split(",") if isinstance(attention_resolutions, str) else attention_resolutions
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise DiffMixError(
            f"attention_resolutions {attention_resolutions!r}: expected comma-separated sizes, e.g. 32,16,8"
        ) from None
    if any(r <= 0 or image_size % r for r in sizes):
        raise DiffMixError(
            f"attention_resolutions {attention_resolutions!r}: each size must divide image_size {image_size}"
        )
    return tuple(image_size // r for r in sizes)


def create_model(
    image_size: int,
    num_classes: int,
    num_channels: int,
    num_res_blocks: int,
    channel_mult: Any = "",
    learn_sigma: bool = False,
    class_cond: bool = False,
    use_checkpoint: bool = False,
    attention_resolutions: str = "16",
    num_heads: int = 1,
    num_head_channels: int = -1,
    num_heads_upsample: int = -1,
    use_scale_shift_norm: bool = False,
    dropout: float = 0,
    resblock_updown: bool = False,
    use_fp16: bool = False,
    use_new_attention_order: bool = False,
    no_instance: bool = False,
    spade_hidden: int = 128,
) -> UNetModel:
    """Build the SDM :class:`~guided_diffusion.unet.UNetModel` from official keyword settings."""
    if not class_cond:
        raise DiffMixError(
            "class_cond is False, but the SDM U-Net is always conditioned on the label map: "
            "pass --class_cond True"
        )
    if num_classes < 1:
        raise DiffMixError(f"num_classes must be >= 1 (classes incl. background), got {num_classes}")
    if spade_hidden < 1:
        raise DiffMixError(f"spade_hidden must be >= 1, got {spade_hidden}")
    mult = parse_channel_mult(channel_mult, image_size)
    attention_ds = parse_attention_resolutions(attention_resolutions, image_size)
    widths = sorted({int(m * num_channels) for m in mult})
    bad = [w for w in widths if w % 32]
    if bad:
        raise DiffMixError(
            f"num_channels {num_channels} with channel_mult {mult} gives widths {bad} that are not "
            "multiples of 32 (GroupNorm uses 32 groups)"
        )
    if num_head_channels > 0:
        bad = [w for w in widths if w % num_head_channels]
        if bad:
            raise DiffMixError(f"widths {bad} are not divisible by num_head_channels {num_head_channels}")
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=6 if learn_sigma else 3,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=dropout,
        channel_mult=mult,
        num_classes=condition_channels(num_classes, no_instance),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        spade_hidden=spade_hidden,
    )


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_classes,
    no_instance,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    spade_hidden=128,
):
    """(model, diffusion) from the official flat settings (see :class:`~guided_diffusion.infra.config.ModelConfig`)."""
    model = create_model(
        image_size,
        num_classes,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        no_instance=no_instance,
        spade_hidden=spade_hidden,
    )
    # Imported here: the diffusion modules are independent of the network and heavier to load.
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Mapping[str, Any]) -> None:
    """Add ``--key`` flags typed by their default values (booleans via :func:`str2bool`)."""
    for k, v in default_dict.items():
        v_type = str if v is None else (str2bool if isinstance(v, bool) else type(v))
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """``{k: args.k}`` for the given keys."""
    return {k: getattr(args, k) for k in keys}
