"""GradMix label-map edits used by DiffMix: balancing maps, enlarging maps, optional GradMix images.

Public API:

* :func:`collect_donors` -> :class:`DonorBank` -- every minor-class nucleus, read once.
* :func:`balance_map` -- replace major-class nuclei by minor-class donors (label maps).
* :func:`enlarge_map` -- shift a random subset of nuclei by small offsets (label maps).
* :func:`compose_gradmix_image` -- paint balancing edits into the source image (GradMix proper).
* :func:`run_gradmix` -- the whole dataset: outputs, JSON records, resume, class statistics.
* :func:`map_rng` -- the per-map random generator derived from (seed, stem, kind, k).

Modules: ``nuclei`` (per-nucleus geometry), ``donors``, ``balance``, ``enlarge``, ``image``,
``pipeline``.
"""

from .balance import balance_map, check_classes  # noqa: F401
from .donors import DonorBank, collect_donors  # noqa: F401
from .enlarge import enlarge_map  # noqa: F401
from .image import compose_gradmix_image  # noqa: F401
from .nuclei import NucleusTable, nucleus_table  # noqa: F401
from .pipeline import KINDS, default_classes, map_name, map_rng, run_gradmix  # noqa: F401
