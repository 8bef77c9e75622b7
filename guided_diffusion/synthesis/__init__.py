"""DiffMix synthesis: real patches + (virtual) label maps -> synthetic H&E patches for HoVer-Net.

For every grid patch of every label map (GradMix's balancing/enlarging maps, or the dataset's own
labels) and every requested sample, the real image patch is noised to the start step given by
``ddim_percent`` (SDEdit-style, DiffMix's partial start), then denoised under the label map with
classifier-free guidance ``s`` by DDIM (or DDPM / DPM-Solver++(2M)). Each result is written as

* ``samples/<name>.png`` -- the synthetic RGB patch, uint8;
* ``npy_patch/<name>.npy`` -- a HoVer-Net training patch, int32 ``[S, S, 5]``: R, G, B (0..255),
  instance id (contiguous 1..N, 0 = background; int32 so ids > 255 survive) and merged type;
* ``records/<name>.json`` -- provenance (source image, crop, label map, seeds, sampler, steps,
  guidance, checkpoint, settings). The record is written *last*: its existence means the patch is
  complete, which is what resuming checks.

``<name>`` is ``<map_name>_<patch index:03d>`` (the official naming) for the first sample of a patch
and ``..._k<k:02d>`` for further samples (``samples_per_map``).

Determinism: every sample draws its noise (start noise and, for DDPM / DDIM with eta > 0, every
step's noise) from its own ``torch.Generator`` seeded from ``(seed, map_name, patch index, sample
index)``, on the CPU, so results do not depend on batching, sharding, resuming or the device's RNG.

Speed (exact): :class:`FastGuidedDenoiser` computes every SPADE gamma/beta once per patch (and once
for the all-zero null condition) and runs the label-free encoder once per step; only the middle block
and decoder run per guidance branch. :class:`PlainGuidedDenoiser` is the official computation (two
full forwards) and gives the same samples to float rounding.

Modules: :mod:`.settings` (flags, step arithmetic, model config, ranks), :mod:`.outputs` (jobs,
seeds, file layout, HoVer-Net patches, figure), :mod:`.sampling` (noise, denoisers, the loop) and
:mod:`.pipeline` (:func:`run_synthesis`).
"""

from __future__ import annotations

from ..data.condition import image_to_tensor  # noqa: F401
from ..dist_util import local_device as default_device  # noqa: F401
from ..infra.errors import DiffMixError  # noqa: F401
from ..infra.launcher import launch_rank  # noqa: F401
from ..infra.precision import PRECISIONS, autocast_context  # noqa: F401
from ..samplers import start_steps  # noqa: F401
from .outputs import (  # noqa: F401
    Job,
    OutputLayout,
    hovernet_patch,
    label_overlay,
    noise_seed,
    output_name,
    plan_jobs,
    shard,
    to_uint8,
    write_figure,
    write_run_figure,
)
from .pipeline import SynthesisSummary, run_synthesis  # noqa: F401
from .sampling import (  # noqa: F401
    FastGuidedDenoiser,
    PerSampleNoise,
    PlainGuidedDenoiser,
    maybe_compiled,
    sample_batch,
    solver_plan,
    trained_schedule,
    with_autocast,
)
from .settings import (  # noqa: F401
    DEFAULT_TIMESTEP_RESPACING,
    SAMPLERS,
    SAMPLING_ONLY_MODEL_KEYS,
    SampleConfig,
    default_run_name,
    load_model_and_diffusion,
    resolve_model_config,
    resolve_model_path,
    run_size,
    sampling_precision,
)
