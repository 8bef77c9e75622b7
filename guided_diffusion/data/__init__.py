"""Data layer: readers, class tables, validation, pipelines, condition builder, toy data, stats."""

from .classes import CONSEP, GLYSAC, ClassTable, identity_table, load_class_table, resolve_class_table  # noqa: F401
from .condition import build_condition, condition_channels, instance_edges  # noqa: F401
from .labels import instance_table, relabel_contiguous, write_label_mat  # noqa: F401
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
from .sampling import Patch, grid_starts, list_virtual_maps, patch_grid, sampling_patches  # noqa: F401
from .stats import (  # noqa: F401
    LabelStats,
    dataset_statistics,
    label_dir_statistics,
    label_statistics,
    write_comparison,
    write_statistics,
)
from .toy import ToyConfig, make_toy_dataset, make_toy_tile  # noqa: F401
from .training import CropBatches, DataState, TrainCropDataset, load_data  # noqa: F401
