"""How well an SDM denoises held-out patches in one call: the validation loss of a training recipe.

At each fixed timestep t, every patch x_0 (float [3, S, S] in [-1, 1]) is noised with its own seeded
noise, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the conditional model predicts eps once.
Reported per t: the MSE of that prediction (the training objective's ``mse`` term, unweighted) and
the PSNR (dB, peak-to-peak 2 over [-1, 1]) of the implied clean patch, clipped to [-1, 1], against
x_0. DiffMix synthesis starts part-way (ddim_percent 55 starts at t = 540 of 1000) and always ends
at small t, so both ends matter: a recipe that starves the low-noise steps (min-SNR-gamma weighting
in a short run) scores well at 200..540 and still ends every synthesis in noise. The noise for patch ``k`` at timestep ``t`` is a pure
function of ``(seed, k, t)``: two models are compared on identical inputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .. import samplers as smp
from ..data.classes import dataset_mode_flag
from ..infra.config import SettingsCheck, flag


@dataclasses.dataclass
class DenoisingConfig:
    """Flags of ``scripts/sdm_validate.py``."""

    model_paths: str = flag("", "checkpoints or training run folders, comma-separated")
    data_dir: str = flag("", "dataset root (the split's Images/ and Labels/)")
    dataset_mode: str = dataset_mode_flag()
    class_table: str = flag("", "custom mode: class mapping JSON")
    split: str = flag("Test", "the held-out split")
    timesteps: str = flag("10,50,200,340,540", "trained timesteps, comma-separated (ddim_percent 55 starts at 540; "
                                                        "the low ones are the last steps of every synthesis)")
    num_patches: int = flag(0, "use the first N grid patches (0: all)")
    patch_size: int = flag(0, "patch size in px (0: each model's own --image_size); the U-Net is convolutional, so "
                              "a model trained on smaller crops can be scored on the same patches as the others")
    seed: int = flag(0, "seed of the per-patch noise")
    batch_size: int = flag(8, "patches per model call")
    out_json: str = flag("", "also write the scores here (JSON)")

    def resolve(self) -> Tuple[List[str], List[int]]:
        """``(checkpoint paths, timesteps)``; raises :class:`DiffMixError` for unusable flags."""
        check = SettingsCheck(self)
        paths = [s.strip() for s in self.model_paths.split(",") if s.strip()]
        try:
            timesteps = [int(t) for t in self.timesteps.split(",") if t.strip()]
        except ValueError:
            timesteps = None
            check.add(True, f"--timesteps {self.timesteps!r}: expected comma-separated integers")
        check.add(not paths, "--model_paths is required")
        check.add(not self.data_dir, "--data_dir is required")
        check.add(timesteps == [], "--timesteps is empty")
        check.add(self.num_patches < 0, "--num_patches must be >= 0")
        check.add(self.patch_size < 0, "--patch_size must be >= 0")
        check.add(self.seed < 0, "--seed must be >= 0")
        check.add(self.batch_size < 1, "--batch_size must be >= 1")
        check.done()
        return paths, timesteps


def noise_for(seed: int, index: int, t: int, shape: Sequence[int]) -> torch.Tensor:
    """float32 standard normal ``shape`` for patch ``index`` at timestep ``t``."""
    state = np.random.SeedSequence([int(seed), int(index), int(t)]).generate_state(1)[0]
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(state)))


@torch.no_grad()
def denoising_scores(
    model: torch.nn.Module,
    diffusion,
    images: torch.Tensor,
    conditions: torch.Tensor,
    timesteps: Sequence[int],
    seed: int = 0,
    batch_size: int = 8,
) -> List[Dict[str, float]]:
    """One-call denoising quality of ``model`` at each of ``timesteps``.

    Args:
        model: the SDM U-Net, ``model(x, t, y=...)`` -> float ``[N, 3 or 6, S, S]`` (epsilon first).
        diffusion: the *un-respaced* diffusion the model was trained with (``timesteps`` index it).
        images: float32 ``[N, 3, S, S]`` clean patches in [-1, 1].
        conditions: float32 ``[N, C, S, S]`` label-map conditions (``build_condition``).
        timesteps: trained timesteps (0 .. T-1).

    Returns:
        One dict per timestep: ``t``, ``eps_mse`` (mean over patches and pixels), ``psnr_db``
        (mean over patches of the x_0 prediction's PSNR) and ``n`` patches.
    """
    sched = smp.as_schedule(diffusion)
    device = next(model.parameters()).device
    out = []
    for t in timesteps:
        t = int(t)
        if not 0 <= t < sched.num_timesteps:
            raise ValueError(f"timestep {t} outside 0..{sched.num_timesteps - 1}")
        abar = float(sched.alphas_cumprod[t])
        mse, psnr = [], []
        for b in range(0, len(images), batch_size):
            x0 = images[b : b + batch_size].to(device)
            eps = torch.stack([noise_for(seed, b + j, t, x0.shape[1:]) for j in range(len(x0))]).to(device)
            x_t = x0 * math.sqrt(abar) + eps * math.sqrt(1 - abar)
            ts = sched.model_timesteps(torch.full((len(x0),), t, dtype=torch.long, device=device))
            pred = model(x_t, ts, y=conditions[b : b + batch_size].to(device)).float()[:, :3]
            mse += ((pred - eps) ** 2).flatten(1).mean(1).tolist()
            x0_hat = smp.predict_xstart_from_eps(x_t, pred, abar).clamp(-1, 1)
            err = ((x0_hat - x0) ** 2).flatten(1).mean(1).clamp_min(1e-12)
            psnr += (10 * torch.log10(4.0 / err)).tolist()
        out.append({"t": t, "eps_mse": float(np.mean(mse)), "psnr_db": float(np.mean(psnr)), "n": len(mse)})
    return out
