"""Data layer: readers, class tables, validation, pipelines, condition builder, toy data, stats.

The label-only parts (readers, class tables, label maps, patches, statistics, toy data) import
without torch, so GradMix, dataset statistics and evaluation start fast. The names that need torch
(the condition builder and the training pipeline) or scipy.ndimage (toy data) are resolved on first
access (PEP 562).
"""

from ..infra.lazy import lazy_attributes
from .classes import CONSEP, GLYSAC, ClassTable, identity_table, load_class_table, resolve_class_table  # noqa: F401
from .labels import instance_table, relabel_contiguous, write_label_mat  # noqa: F401
from .patches import Patch, grid_starts, list_virtual_maps, patch_grid, sampling_patches  # noqa: F401
from .readers import (  # noqa: F401
    LabeledImage,
    SampleFiles,
    list_images,
    list_samples,
    read_dataset,
    read_label_file,
    read_rgb,
    read_samples,
    resolve_split_dir,
)
from .stats import (  # noqa: F401
    LabelStats,
    dataset_statistics,
    label_dir_statistics,
    label_statistics,
    write_comparison,
    write_statistics,
)

# Names whose modules import torch (condition, training) or scipy.ndimage (toy): loaded on first use.
__getattr__, __dir__ = lazy_attributes(__name__, globals(), {
    "build_condition": "condition",
    "condition_channels": "condition",
    "image_to_tensor": "condition",
    "instance_edges": "condition",
    "CropBatches": "training",
    "DataSettings": "training",
    "DataState": "training",
    "TrainCropDataset": "training",
    "load_data": "training",
    "open_batches": "training",
    "ToyConfig": "toy",
    "make_toy_dataset": "toy",
    "make_toy_tile": "toy",
})
