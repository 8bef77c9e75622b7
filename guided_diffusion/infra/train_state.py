"""Random-stream and timestep-sampler state of a training run, in a ``weights_only`` form.

Everything here is tensors, numbers, strings, lists and dicts, so the ``train_state%06d.pt`` file
that holds it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Optional

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, purpose tag), independent streams per tuple."""
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def capture_global_rng() -> dict[str, Any]:
    """The process-wide random states (torch CPU and CUDA, numpy, python) in a weights_only form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_global_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]), float(n["cached_gaussian"]))
    )
    p = state["python"]
    random.setstate((int(p["version"]), tuple(int(v) for v in p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def sampler_state(sampler: Any) -> Optional[dict[str, Any]]:
    """Resume state of a timestep sampler: its ``state_dict()``, else the official loss-aware fields."""
    if sampler is None:
        return None
    if hasattr(sampler, "state_dict"):
        return sampler.state_dict()
    if hasattr(sampler, "_loss_history"):
        return {
            "loss_history": torch.as_tensor(np.asarray(sampler._loss_history)),
            "loss_counts": torch.as_tensor(np.asarray(sampler._loss_counts)),
        }
    return None


def load_sampler_state(sampler: Any, state: Optional[Mapping[str, Any]]) -> None:
    if sampler is None or state is None:
        return
    if hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state)
    elif hasattr(sampler, "_loss_history") and "loss_history" in state:
        sampler._loss_history = np.asarray(state["loss_history"].numpy(), dtype=np.asarray(sampler._loss_history).dtype)
        sampler._loss_counts = np.asarray(state["loss_counts"].numpy(), dtype=np.asarray(sampler._loss_counts).dtype)
