"""GradMix's settings: one typed dataclass that is both the ``scripts/gradmix.py`` flags and the
argument of :func:`~guided_diffusion.gradmix.pipeline.run_gradmix`. Light (no numpy work, no scipy),
so ``gradmix.py --help`` starts at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..data.classes import LABELS_MERGED_HELP, dataset_mode_flag
from ..infra.config import SettingsCheck, flag
from ..infra.errors import DiffMixError
from . import BALANCE_DEFAULTS, ENLARGE_DEFAULTS, KINDS, OFFICIAL_MEDIAN_RADII


@dataclass
class GradMixConfig:
    """Where the maps come from and go, how many, and the edit rules (official GradMix / DiffMix
    defaults from :data:`BALANCE_DEFAULTS` and :data:`ENLARGE_DEFAULTS`)."""

    data_dir: Optional[str] = flag(None, "dataset root (holding --split) or the split folder (required)")
    dataset_mode: str = dataset_mode_flag()
    labels_merged: str = flag("auto", LABELS_MERGED_HELP)
    class_table: Optional[str] = flag(None, "custom mode: class table JSON (raw id -> class)")
    num_classes: Optional[int] = flag(None, "custom mode: classes incl. background")
    split: str = flag("Train", "split folder under --data_dir (ignored if it is the split; "
                      "pannuke/conic/lizard: Train = folds 1,2, Test = fold 3, all, or fold1,fold3)")
    image_folder: str = flag("Images", "image subfolder of the split")
    label_folder: str = flag("Labels", "label subfolder of the split")
    stems: Optional[str] = flag(None, "comma-separated source stems; default: every stem of the split "
                                "(donors still come from the whole split)")
    out_dir: Optional[str] = flag(None, "output folder (Labels/, Records/, Images/); rerunning skips complete maps (required)")

    num_maps: int = flag(1, "maps per source image for each kind in --kinds")
    kinds: str = flag("balance", f"comma-separated subset of {','.join(KINDS)}")
    num_balance: Optional[int] = flag(None, "overrides --num_maps for balancing maps")
    num_enlarge: Optional[int] = flag(None, "overrides --num_maps for enlarging maps")
    seed: int = flag(0, "base seed; each map's generator is (seed, stem, kind, k)")
    write_images: bool = flag(False, "also write GradMix images (balance maps); without it the dataset's images "
                              "are never read, so a broken image file goes unnoticed")

    minor: Optional[str] = flag(None, "minor classes, e.g. 1 or 1,2; default: the dataset's rare classes "
                                "(pannuke 4 dead; conic/lizard 1,5 neutrophil, eosinophil), else 1")
    major: Optional[str] = flag(None, "major classes; default: every class not in --minor")
    margin: float = flag(float(BALANCE_DEFAULTS["margin"]), "border exclusion (px) for targets and donors")
    fraction: float = flag(BALANCE_DEFAULTS["fraction"], "share of eligible major nuclei replaced")
    size_ratio: float = flag(BALANCE_DEFAULTS["size_ratio"], "donor fits if ratio * area <= dilated target area")
    dilate: int = flag(BALANCE_DEFAULTS["dilate"], "target dilation (px) for the fit rule and blend region")
    max_tries: int = flag(BALANCE_DEFAULTS["max_tries"], "fitting donors tried per target")
    median_radii: str = flag(",".join(map(str, OFFICIAL_MEDIAN_RADII)), "R,G,B median radii for images")

    enlarge_fraction: float = flag(ENLARGE_DEFAULTS["enlarge_fraction"], "share of movable nuclei shifted")
    max_shift: int = flag(ENLARGE_DEFAULTS["max_shift"], "shifts drawn from [-max_shift, max_shift] px")

    stats: bool = flag(True, "print and save class counts before/after")
    progress: bool = flag(True, "show progress bars")
    verbose: bool = flag(True, "print notices and the class counts")
    cache_mb: float = flag(1024.0, "label maps read for the donor bank are kept up to this size for the edits")

    def validate(self) -> None:
        """Raise :class:`DiffMixError` naming every flag that cannot work (the class table's checks,
        which need the dataset's table, come in :func:`~guided_diffusion.gradmix.pipeline.run_gradmix`)."""
        check = SettingsCheck(self)
        counts = check.rule(self.counts)
        check.rule(self.radii)
        check.add(not self.data_dir or not self.out_dir, "--data_dir and --out_dir are required")
        for name in ("max_shift", "dilate"):
            check.need(name, lambda v: int(v) == v and v >= 0, "a non-negative integer")
        check.add(counts is not None and not any(counts.values()), "nothing to do: num_balance and num_enlarge are both 0")
        for name in ("fraction", "enlarge_fraction"):
            check.need(name, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        check.need("size_ratio", lambda v: v > 0, "> 0")
        check.need("margin", lambda v: v >= 0, ">= 0")
        check.need("max_tries", lambda v: int(v) == v and v >= 1, "an integer >= 1")
        check.done()

    def counts(self) -> Dict[str, int]:
        """Maps per source image of each kind: ``--num_maps`` for the ``--kinds`` named, unless
        ``--num_balance`` / ``--num_enlarge`` say otherwise."""
        kinds = [k for k in str(self.kinds).replace(" ", "").split(",") if k]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise DiffMixError(f"--kinds {self.kinds!r}: expected a comma-separated subset of {', '.join(KINDS)}")
        for name in ("num_maps", "num_balance", "num_enlarge"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 0):
                raise DiffMixError(f"--{name} must be >= 0, got {value}")
        counts = {k: (int(self.num_maps) if k in kinds else 0) for k in KINDS}
        for kind, value in (("balance", self.num_balance), ("enlarge", self.num_enlarge)):
            if value is not None:
                counts[kind] = int(value)
        return counts

    def stem_list(self) -> Optional[Tuple[str, ...]]:
        return tuple(s for s in self.stems.split(",") if s) if self.stems else None

    def radii(self) -> Tuple[int, ...]:
        try:
            radii = tuple(int(v) for v in str(self.median_radii).split(","))
        except ValueError:
            radii = ()
        if len(radii) != 3 or min(radii) < 0:
            raise DiffMixError(f"--median_radii {self.median_radii!r}: expected three non-negative integers like 1,1,5")
        return radii
