"""Safe checkpoint loading and saving, and strict weight loading with clear mismatch messages.

* ``.pt`` / ``.pth`` files are read with ``torch.load(..., weights_only=True)``: only tensors and
  plain containers are unpickled, never arbitrary code. ``.safetensors`` files go through
  safetensors. Paths may be local or remote (``gs://``, ``az://``).
* Official SDM/DiffMix files (``model*.pt``, ``ema_0.9999_*.pt``) are plain state dicts of fp16
  or fp32 tensors; wrapped dicts (``{"state_dict": ...}``, ``{"model": ...}``) and DDP
  ``module.`` prefixes are accepted too.
* :func:`load_model_weights` explains a mismatch in terms of the settings that cause it
  (condition width -> ``num_classes``/``no_instance``, 3 vs 6 outputs -> ``learn_sigma``, ...).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import warnings
import zipfile
from typing import Any, Mapping, Optional, Union

import torch
import safetensors.torch

from . import fileio
from .errors import DiffMixError

StateDict = dict[str, torch.Tensor]

_WRAPPER_KEYS = ("state_dict", "model")


def _is_safetensors(path: str) -> bool:
    return str(path).lower().endswith(".safetensors")


def load_state_dict(path: Union[str, os.PathLike], map_location: Any = "cpu") -> StateDict:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict.

    Args:
        path: ``.pt``/``.pth`` (torch, weights only) or ``.safetensors``; local or remote.
        map_location: device for the tensors (as in ``torch.load``).

    Raises:
        DiffMixError: the file is missing, unreadable, or not a plain tensor state dict.
    """
    path = str(path)
    # Local files are read in place (no extra in-memory copy of a multi-GB file); remote ones
    # are fetched whole first.
    local = not fileio.is_remote(path)
    if local and not os.path.isfile(path):
        raise DiffMixError(f"{path}: file not found")
    source = path if local else io.BytesIO(fileio.read_bytes(path))
    if _is_safetensors(path):
        try:
            if local:
                sd = safetensors.torch.load_file(path)
            else:
                sd = safetensors.torch.load(source.getvalue())
        except Exception as err:  # safetensors raises its own SafetensorError type
            raise DiffMixError(f"{path}: not a readable .safetensors file ({err})") from None
        if map_location is not None:
            sd = {k: v.to(map_location) for k, v in sd.items()}
    else:
        obj = load_torch_file(path, map_location=map_location, source=source)
        sd = _unwrap(obj, path)
    return _strip_prefix(sd)


# Reasons are cut to this length: the point is a one-line message, not torch's advice.
_REASON_MAX = 120


def load_torch_file(path: Union[str, os.PathLike], map_location: Any = "cpu", source: Any = None) -> Any:
    """``torch.load(..., weights_only=True)`` with one-line :class:`DiffMixError` messages naming ``path``.

    The one place where ``.pt`` files are unpickled (model weights, optimizer and training state).
    Returns whatever the file holds (tensors, numbers, strings, lists, dicts).

    Args:
        path: local or remote file; named in errors.
        map_location: device for the tensors (as in ``torch.load``).
        source: an already open binary file object or buffer to read instead of ``path``.

    Raises:
        DiffMixError: ``<path>: file not found``; ``<path>: holds pickled Python objects; refusing
            ...`` for a torch/pickle file that needs arbitrary classes; ``<path>: not a PyTorch
            checkpoint (unreadable as a weights-only torch file: <reason>)`` for anything else
            (text, truncated or foreign files). Never advises ``weights_only=False``.
    """
    path = str(path)
    if source is None:
        if fileio.is_remote(path):
            source = io.BytesIO(fileio.read_bytes(path))
        elif not os.path.isfile(path):
            raise DiffMixError(f"{path}: file not found")
        else:
            source = path
    try:
        with warnings.catch_warnings():
            # torch warns (several lines) before failing on a plain pickle of protocol > 2.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(source, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as err:  # the weights-only unpickler and the zip reader raise many types
        if isinstance(err, OSError) and not isinstance(err, zipfile.BadZipFile):
            raise DiffMixError(f"{path}: cannot read ({err.strerror or err})") from None
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            raise DiffMixError(
                f"{path}: holds pickled Python objects; refusing to unpickle it "
                "(only plain tensor checkpoints are loaded, for safety)"
            ) from None
        reason = _short_load_reason(err, _head(source))
        raise DiffMixError(f"{path}: not a PyTorch checkpoint (unreadable as a weights-only torch file: {reason})") from None


def _head(source: Any, n: int = 8) -> bytes:
    """The first ``n`` bytes of a path or seekable file object (b"" when unreadable)."""
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as f:
                return f.read(n)
        source.seek(0)
        return source.read(n)
    except (OSError, AttributeError, ValueError):
        return b""


def _short_load_reason(err: BaseException, head: bytes) -> str:
    """A short, advice-free description of why ``torch.load`` failed."""
    if not head:
        return "empty file"
    if not head.startswith((b"PK", b"\x80")):
        # Neither torch's zip container nor a protocol-2+ pickle: torch's own error (a KeyError on
        # the first byte for text) says nothing useful.
        return f"neither a zip archive nor a pickle stream (starts with {head!r})"
    if head.startswith(b"\x80") and (head[1:2] > b"\x02" or "magic number" in str(err)):
        # A pickle stream that is not torch's legacy format (which opens with its magic number).
        return f"a plain Python pickle (protocol {head[1]}, e.g. from pickle.dump), not a file written by torch.save"
    if isinstance(err, (EOFError, IndexError, struct.error)):
        # The unpickler ran off the end of its data.
        return "truncated or corrupt pickle stream"
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text[text.index(marker) + len(marker):]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    reason = lines[0] if lines else type(err).__name__
    reason = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", reason)
    # Keep the first sentence; drop torch's hints (internal miniz notes, weights_only advice).
    reason = re.split(r"(?<=[a-z0-9)])\. ", reason, maxsplit=1)[0].rstrip(".")
    if "weights_only" in reason or not reason:
        reason = type(err).__name__
    return reason if len(reason) <= _REASON_MAX else reason[: _REASON_MAX - 3] + "..."


def _unwrap(obj: Any, path: str) -> StateDict:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(torch.is_tensor(v) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise DiffMixError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise DiffMixError(
            f"{path}: expected a state dict of tensors; {len(bad)} entries are not tensors "
            f"(e.g. {', '.join(map(repr, bad[:3]))})"
        )
    return dict(obj)


def _strip_prefix(sd: StateDict) -> StateDict:
    # DistributedDataParallel saves parameters as "module.<name>".
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def save_state_dict(path: Union[str, os.PathLike], state_dict: Mapping[str, torch.Tensor]) -> None:
    """Atomically write a state dict: safetensors for ``.safetensors``, else ``torch.save``.

    Tensors are detached and moved to the CPU first (safetensors also needs them contiguous).
    """
    path = str(path)
    bad = [k for k, v in state_dict.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"state dict entries are not tensors: {bad[:3]}")
    cpu = {k: v.detach().cpu() for k, v in state_dict.items()}
    if _is_safetensors(path):
        # clone() also breaks storage sharing, which safetensors refuses to write.
        fileio.write_bytes(path, safetensors.torch.save({k: v.contiguous().clone() for k, v in cpu.items()}))
    else:
        with fileio.atomic_open(path, "wb") as f:
            torch.save(cpu, f)


# --------------------------------------------------------------------------------------------
# Inferring settings from shapes
# --------------------------------------------------------------------------------------------


def infer_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Model settings implied by an SDM state dict's shapes (best effort; absent keys are skipped).

    Returns a dict with some of: ``num_channels``, ``cond_channels``,
    ``num_classes_with_instance`` (cond_channels - 1, for ``no_instance`` False),
    ``num_classes_no_instance`` (= cond_channels), ``learn_sigma``, ``num_res_blocks``,
    ``channel_mult`` (tuple), ``resblock_updown``, ``attention_ds`` (down-sampling factors with
    attention; ``attention_resolutions`` = image_size // factor).
    """
    info: dict[str, Any] = {}
    if "time_embed.0.weight" in sd:
        info["num_channels"] = int(sd["time_embed.0.weight"].shape[1])
    shared = [v for k, v in sd.items() if k.endswith("mlp_shared.0.weight")]
    if shared:
        c = int(shared[0].shape[1])
        info.update(cond_channels=c, num_classes_with_instance=c - 1, num_classes_no_instance=c)
    if "out.2.weight" in sd:
        info["learn_sigma"] = int(sd["out.2.weight"].shape[0]) == 6

    out_blocks: dict[int, set[int]] = {}
    for k in sd:
        m = re.match(r"output_blocks\.(\d+)\.(\d+)\.", k)
        if m:
            out_blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not out_blocks:
        return info
    n_out = max(out_blocks) + 1
    # The first decoder block holding a resampler (a second SPADE block, or an Upsample conv) ends
    # the deepest level; its index equals num_res_blocks.
    up_index = None
    for i in range(n_out):
        if f"output_blocks.{i}.1.in_norm.mlp_shared.0.weight" in sd or f"output_blocks.{i}.2.in_norm.mlp_shared.0.weight" in sd:
            up_index, info["resblock_updown"] = i, True
            break
        if f"output_blocks.{i}.1.conv.weight" in sd or f"output_blocks.{i}.2.conv.weight" in sd:
            up_index, info["resblock_updown"] = i, False
            break
    if up_index is None:  # a single-level U-Net has no resampler
        up_index = n_out - 1
    nrb = up_index
    info["num_res_blocks"] = nrb
    levels = n_out // (nrb + 1)
    if "num_channels" in info:
        mult = []
        for level in range(levels):
            key = f"output_blocks.{(levels - 1 - level) * (nrb + 1)}.0.out_layers.2.weight"
            if key not in sd:
                break
            w = int(sd[key].shape[0]) / info["num_channels"]
            mult.append(int(w) if w.is_integer() else w)
        if len(mult) == levels:
            info["channel_mult"] = tuple(mult)
    info["attention_ds"] = tuple(
        2**level
        for level in range(levels)
        if any(f"input_blocks.{1 + level * (nrb + 1) + b}.1.qkv.weight" in sd for b in range(nrb))
        or f"output_blocks.{(levels - 1 - level) * (nrb + 1)}.1.qkv.weight" in sd
    )
    return info


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------


def _examples(keys: list[str], kind: str, n: int = 2) -> str:
    """``"<count> <kind> keys: k1, k2, ..."``: the count and the first ``n`` keys, on one line."""
    shown = ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
    return f"{len(keys)} {kind} key{'s' if len(keys) != 1 else ''}: {shown}"


def key_differences(sd: Mapping[str, torch.Tensor], msd: Mapping[str, torch.Tensor]) -> tuple[list, list, list]:
    """``(missing, unexpected, mis-shaped)`` keys of the state dict ``sd`` against the model's ``msd``."""
    missing = [k for k in msd if k not in sd]
    unexpected = [k for k in sd if k not in msd]
    mismatched = [k for k in msd if k in sd and tuple(sd[k].shape) != tuple(msd[k].shape)]
    return missing, unexpected, mismatched


def mismatch_message(source: str, sd: Mapping[str, torch.Tensor], msd: Mapping[str, torch.Tensor],
                     strict: bool = True, target: str = "the model", diff: Optional[tuple] = None) -> Optional[str]:
    """One line saying how the state dict ``sd`` (from ``source``) does not fit the model's ``msd``:
    the count and first keys of each kind (mis-shaped with both shapes, missing, unexpected);
    None when it fits (missing / unexpected keys count only with ``strict``). ``diff``: the
    :func:`key_differences` of the two when the caller has them already."""
    missing, unexpected, mismatched = diff or key_differences(sd, msd)
    if not (mismatched or (strict and (missing or unexpected))):
        return None
    parts = []
    if mismatched:
        parts.append(_examples([f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(msd[k].shape)})"
                                for k in mismatched], "mis-shaped", n=1))
    if strict and missing:
        parts.append(_examples(missing, "missing"))
    if strict and unexpected:
        parts.append(_examples(unexpected, "unexpected"))
    return f"{source}: the checkpoint does not fit {target}: " + "; ".join(parts)


def _mismatch_hints(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], mismatched: list[str]) -> list[str]:
    msd = model.state_dict()
    hints = []
    spade = [k for k in mismatched if k.endswith("mlp_shared.0.weight") and sd[k].shape[1] != msd[k].shape[1]]
    if spade:
        c_ckpt, c_model = int(sd[spade[0]].shape[1]), int(msd[spade[0]].shape[1])
        hints.append(
            f"the condition width differs: the checkpoint takes {c_ckpt} condition channels, this model "
            f"{c_model}. The checkpoint implies num_classes {c_ckpt - 1} with no_instance False "
            f"(classes + instance-edge channel) or num_classes {c_ckpt} with no_instance True"
        )
    # the output count (learn_sigma) is the head's first dimension; other head mismatches are widths
    head = [k for k in mismatched if k in ("out.2.weight", "out.2.bias") and sd[k].shape[0] != msd[k].shape[0]]
    if head:
        n_ckpt = int(sd["out.2.weight"].shape[0])
        hints.append(
            f"the checkpoint predicts {n_ckpt} output channels, this model {int(msd['out.2.weight'].shape[0])}: "
            f"use learn_sigma {'True' if n_ckpt == 6 else 'False'}"
        )
    other = [k for k in mismatched if k not in spade and k not in head]
    if other:
        info = infer_config_from_state_dict(sd)
        implied = {k: info[k] for k in ("num_channels", "channel_mult") if k in info}
        hints.append(
            "layer widths differ: check num_channels / channel_mult"
            + (f" (the checkpoint implies {implied})" if implied else "")
        )
    return hints


def load_model_weights(
    model: torch.nn.Module,
    path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    strict: bool = True,
) -> tuple[list[str], list[str]]:
    """Load weights into ``model``, casting floating tensors (e.g. fp16 EMA files) to the model's dtypes.

    Args:
        model: the target module.
        path_or_state_dict: a checkpoint path (see :func:`load_state_dict`) or a state dict.
        strict: if True, missing or unexpected keys are errors; mis-shaped keys always are.

    Returns:
        (missing_keys, unexpected_keys) -- both empty when ``strict``.

    Raises:
        DiffMixError: naming the file, the missing / unexpected / mis-shaped keys and the settings
            that most likely differ.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, sd = "state dict", _strip_prefix(dict(path_or_state_dict))
    else:
        source = str(path_or_state_dict)
        sd = load_state_dict(source)
    msd = model.state_dict()
    missing, unexpected, mismatched = diff = key_differences(sd, msd)
    message = mismatch_message(source, sd, msd, strict, diff=diff)
    if message:
        hints = _mismatch_hints(model, sd, mismatched)
        if (missing or unexpected) and not hints:
            info = infer_config_from_state_dict(sd)
            hints.append(
                "the block layout differs: check num_res_blocks / channel_mult / attention_resolutions / "
                f"resblock_updown (the checkpoint implies {info})"
            )
        raise DiffMixError(message + "".join(f"; hint: {h}" for h in hints))
    cast = {
        k: (v.to(msd[k].dtype) if k in msd and v.is_floating_point() and msd[k].is_floating_point() else v)
        for k, v in sd.items()
        if k in msd
    }
    model.load_state_dict(cast, strict=strict)
    return missing, unexpected
