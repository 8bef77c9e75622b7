"""The folder layouts of DiffMix's own outputs, each named once: a GradMix output folder and a
synthesis run folder. Writers and readers (synthesis, GradMix, statistics, the demo report, the
downstream readers, the dataset export) build their paths here. Names only: no torch, no reading.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..infra import fileio
from ..infra.completion import is_marked


@dataclass(frozen=True)
class _Layout:
    root: str

    def folder(self, part: str) -> str:
        return fileio.join(self.root, part)

    def _file(self, part: str, name: str, ext: str) -> str:
        return fileio.join(self.root, part, name + ext)


@dataclass(frozen=True)
class GradMixLayout(_Layout):
    """A GradMix ``--out_dir``: ``Labels/<name>.mat`` (the virtual label maps, CoNSeP layout),
    ``Records/<name>.json`` (one record per map, written last: a map without it is unfinished) and
    ``Images/<name>.png`` (the composed image of a balancing map, with ``--write_images``)."""

    LABELS = "Labels"
    RECORDS = "Records"
    IMAGES = "Images"

    def label(self, name: str) -> str:
        return self._file(self.LABELS, name, ".mat")

    def record(self, name: str) -> str:
        return self._file(self.RECORDS, name, ".json")

    def image(self, name: str) -> str:
        return self._file(self.IMAGES, name, ".png")


@dataclass(frozen=True)
class SynthesisLayout(_Layout):
    """A synthesis run folder (``<results_path>/<run_name>``): ``samples/<name>.png`` (the image),
    ``npy_patch/<name>.npy`` (the HoVer-Net patch, int32 [S, S, 5]), ``records/<name>.json`` (written
    last: it marks the patch complete), ``run.json`` (the run's settings) and the figure."""

    SAMPLES = "samples"
    PATCHES = "npy_patch"
    RECORDS = "records"
    RUN_RECORD = "run.json"

    def png(self, name: str) -> str:
        return self._file(self.SAMPLES, name, ".png")

    def npy(self, name: str) -> str:
        return self._file(self.PATCHES, name, ".npy")

    def record(self, name: str) -> str:
        return self._file(self.RECORDS, name, ".json")

    def is_complete(self, name: str) -> bool:
        # The record is written last (completion.write_marked): it means PNG and .npy are complete too.
        return is_marked(self.record(name))

    def figure(self, rank: int = 0, world_size: int = 1) -> str:
        return fileio.join(self.root, "figure.png" if world_size == 1 else f"figure_rank{rank}.png")

    def run_record(self) -> str:
        return fileio.join(self.root, self.RUN_RECORD)
