"""Helpers shared by the benchmarks (not part of the package): random-weight models, plug-in callables,
machine description, timing.

A benchmark run as ``python benchmarks/<name>.py`` has ``benchmarks/`` first on ``sys.path`` and
imports this module as ``common``.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import time
from typing import Any, Callable

from guided_diffusion.infra.errors import DiffMixError


def perturb_weights(model: Any, std: float = 0.02, seed: int = 0) -> Any:
    """Add N(0, std^2) noise to every parameter (in place; returns ``model``).

    The official init zeroes the residual output convs and the output head, so an untrained U-Net
    returns zeros and guidance, the fast path and mixed precision would all agree trivially.
    The noise is drawn on the CPU from ``seed``, so the weights do not depend on the device.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=gen) * std).to(p.device, p.dtype))
    return model


def load_callable(spec: str, what: str) -> Callable:
    """``"package.module:function"`` -> the function (for plug-in hooks given on the command line).

    Raises :class:`DiffMixError` (one line, exit 2 through ``run_cli``) when the module or the name
    is missing; ``what`` names the flag in the message.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise DiffMixError(f"{what} {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise DiffMixError(f"{what} {spec!r}: cannot import {module_name} ({err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DiffMixError(f"{what} {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def machine() -> dict:
    """Where a benchmark ran: host, CPU count, load, torch build, accelerator (name, count, memory)."""
    import torch

    info = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def sync(device: Any) -> None:
    """Wait for queued kernels on a CUDA device (timings must not stop at the launch)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[Any, float]:
    """``(fn(), seconds)`` with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0
