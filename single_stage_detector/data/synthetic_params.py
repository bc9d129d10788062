"""Parameters and marker file of the embedded synthetic dataset, without the image code.

Kept apart from :mod:`single_stage_detector.data.synthetic` (numpy, Pillow, torch) so that
the command line can show its defaults and tell a synthetic folder from COCO in milliseconds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SyntheticParams", "DEFAULT_PARAMS", "MARKER_FILE", "is_synthetic_dataset"]

# Written last by the generator: its presence marks a complete synthetic dataset.
MARKER_FILE = ".synthetic_coco.json"


@dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines the generated files (recorded in the marker file)."""

    num_train: int = 2000
    num_val: int = 250
    seed: int = 0
    min_size: int = 120           # image side lengths ~ U[min_size, max_size], independently
    max_size: int = 200
    max_objects: int = 5          # objects per non-empty image ~ U{1..max_objects}
    min_object_frac: float = 0.12  # object's longer side / image's shorter side
    max_object_frac: float = 0.7
    empty_fraction: float = 0.02  # training images without objects (at least one if > 0)
    jpeg_quality: int = 90


DEFAULT_PARAMS = SyntheticParams()


def is_synthetic_dataset(data_dir: str | os.PathLike | None) -> bool:
    """True when ``data_dir`` (or its ``coco2017/`` subfolder) holds the generated synthetic dataset."""
    if data_dir is None:
        return False
    root = Path(data_dir)
    return (root / MARKER_FILE).is_file() or (root / "coco2017" / MARKER_FILE).is_file()
