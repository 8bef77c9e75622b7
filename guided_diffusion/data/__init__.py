"""Data layer: readers, class tables, validation, pipelines, condition builder, toy data, stats."""

from .condition import build_condition, condition_channels, instance_edges  # noqa: F401
from .labels import instance_table, relabel_contiguous, write_label_mat  # noqa: F401
