"""GradMix label-map edits used by DiffMix: balancing maps, enlarging maps, optional GradMix images.

Public API:

* :func:`collect_donors` -> :class:`DonorBank` -- every minor-class nucleus, read once.
* :func:`balance_map` -- replace major-class nuclei by minor-class donors (label maps).
* :func:`enlarge_map` -- shift a random subset of nuclei by small offsets (label maps).
* :func:`compose_gradmix_image` -- paint balancing edits into the source image (GradMix proper).
* :func:`run_gradmix` (:class:`GradMixConfig`) -- the whole dataset: outputs, JSON records, resume, class statistics.
* :func:`map_rng` -- the per-map random generator derived from (seed, stem, kind, k).

Modules: ``nuclei`` (per-nucleus geometry), ``donors``, ``balance``, ``enlarge``, ``image``,
``pipeline``. They load on first use (scipy takes a second to import), so ``gradmix.py --help``
starts at once.
"""

from ..infra.lazy import lazy_attributes

KINDS = ("balance", "enlarge")

# The edit rules' settings and their defaults (the official GradMix / DiffMix values), in one place:
# balance_map, enlarge_map, run_gradmix and gradmix.py all take their defaults from here.
BALANCE_DEFAULTS = {"margin": 30, "fraction": 0.8, "size_ratio": 2.3, "dilate": 2, "max_tries": 64}
ENLARGE_DEFAULTS = {"enlarge_fraction": 0.5, "max_shift": 3}
OFFICIAL_MEDIAN_RADII = (1, 1, 5)  # R, G, B median-filter radii (px) of GradMix images

__getattr__, __dir__ = lazy_attributes(__name__, globals(), {
    "balance_map": "balance",
    "check_minor_major": "balance",
    "DonorBank": "donors",
    "collect_donors": "donors",
    "enlarge_map": "enlarge",
    "compose_gradmix_image": "image",
    "NucleusTable": "nuclei",
    "nucleus_table": "nuclei",
    "default_classes": "pipeline",
    "map_name": "pipeline",
    "map_rng": "pipeline",
    "run_gradmix": "pipeline",
    "GradMixConfig": "settings",
    "read_map_record": "pipeline",
    "changed_ids": "pipeline",
    "changed_mask": "pipeline",
    "image_path": "pipeline",
})
