"""Deterministic synthetic detection dataset in the exact COCO 2017 layout.

Writes::

    root/train2017/000000000001.jpg ...
    root/val2017/000000900001.jpg ...
    root/annotations/instances_train2017.json
    root/annotations/instances_val2017.json

Each image is a smooth colour gradient with mild noise and 1..``max_objects`` solid,
mildly shaded shapes. Every class is one shape in one colour with a typical aspect
ratio (:data:`SYNTHETIC_CLASSES`), mapped to a real COCO category id, so the files go
through the same reader, label map and pycocotools evaluation as COCO itself. Shapes
overlap little so boxes stay learnable; sizes span about 12%..70% of the shorter image
side, so AP over sizes is non-trivial. A few training images have no objects
(exercising ``skip_empty``). Boxes are the tight pixel bounds of the drawn mask.

Same parameters and seed -> byte-identical files (each image has its own RNG derived from
(seed, split, index); Pillow's JPEG encoder is deterministic).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .coco import COCO_CATEGORIES, LABEL_NAMES, DatasetError, coco_id_to_label
from .synthetic_params import DEFAULT_PARAMS, MARKER_FILE, SyntheticParams

__all__ = [
    "ShapeClass",
    "SYNTHETIC_CLASSES",
    "SyntheticParams",
    "DEFAULT_PARAMS",
    "MARKER_FILE",
    "make_synthetic_coco",
    "ensure_synthetic_coco",
]


@dataclass(frozen=True)
class ShapeClass:
    """One synthetic class: a COCO category drawn as ``shape`` in ``color`` with width/height ``aspect``."""

    coco_id: int
    shape: str
    color: tuple[int, int, int]
    aspect: float

    @property
    def name(self) -> str:
        return LABEL_NAMES[coco_id_to_label(self.coco_id)]


# Hues roughly 35-60 degrees apart (colour jitter shifts hue by up to +-18 degrees), and
# shape/aspect differ too, so every class is separable by more than one cue.
SYNTHETIC_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass(1, "ellipse", (205, 40, 45), 0.55),      # person: tall red ellipse
    ShapeClass(3, "rectangle", (35, 75, 205), 1.8),     # car: wide blue rectangle
    ShapeClass(17, "triangle", (240, 140, 25), 1.1),    # cat: orange triangle
    ShapeClass(18, "diamond", (45, 165, 60), 1.0),      # dog: green diamond
    ShapeClass(44, "rectangle", (30, 185, 195), 0.4),   # bottle: tall cyan bar
    ShapeClass(53, "ellipse", (225, 205, 35), 1.0),     # apple: yellow disc
    ShapeClass(85, "hexagon", (195, 55, 185), 1.0),     # clock: magenta hexagon
    ShapeClass(28, "semicircle", (115, 60, 200), 2.0),  # umbrella: purple dome
)

_IN_PROGRESS_FILE = ".synthetic_coco.incomplete"
_FORMAT_VERSION = 1
_VAL_ID_OFFSET = 900_000  # val image ids 900001.. so train and val ids never collide
_FILE_RE = re.compile(r"^\d{12}\.jpg$")




# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def _polygon(shape: str, x0: float, y0: float, w: float, h: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` inscribed in the box (x0, y0, w, h); curves become 32-gons."""
    x1, y1, cx, cy = x0 + w, y0 + h, x0 + w / 2, y0 + h / 2
    if shape == "rectangle":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "hexagon":
        return [(x0 + w / 4, y0), (x0 + 3 * w / 4, y0), (x1, cy), (x0 + 3 * w / 4, y1), (x0 + w / 4, y1), (x0, cy)]
    if shape == "ellipse":
        t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return list(zip((cx + w / 2 * np.cos(t)).tolist(), (cy + h / 2 * np.sin(t)).tolist()))
    if shape == "semicircle":  # dome: upper half of an ellipse standing on its flat side
        t = np.linspace(math.pi, 2 * math.pi, 17)
        return list(zip((cx + w / 2 * np.cos(t)).tolist(), (y1 + h * np.sin(t)).tolist()))
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth gradient (bilinear upsampling of a 3x3 grid of muted colours) plus mild noise."""
    grey = rng.uniform(70, 190, size=(3, 3, 1))
    grid = np.clip(grey + rng.uniform(-30, 30, size=(3, 3, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR)
    noisy = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _shaded_fill(rng: np.random.Generator, color: tuple[int, int, int], w: int, h: int) -> Image.Image:
    """``w x h`` patch of ``color`` (jittered by a few levels) with a mild linear shading."""
    base = np.asarray(color, dtype=np.float32) + rng.uniform(-12, 12, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = (math.cos(angle) * (xs / max(w - 1, 1) - 0.5) + math.sin(angle) * (ys / max(h - 1, 1) - 0.5))
    shade = 1.0 + 0.3 * ramp  # +-15% brightness across the object
    patch = np.clip(base[None, None, :] * shade[..., None], 0, 255).astype(np.uint8)
    return Image.fromarray(patch)


def _draw_image(rng: np.random.Generator, p: SyntheticParams, empty: bool) -> tuple[Image.Image, list[dict[str, Any]]]:
    """One image and its objects ``{"category_id", "bbox", "area", "segmentation"}``."""
    width = int(rng.integers(p.min_size, p.max_size + 1))
    height = int(rng.integers(p.min_size, p.max_size + 1))
    img = _background(rng, width, height)
    objects: list[dict[str, Any]] = []
    if empty:
        return img, objects
    placed: list[tuple[int, int, int, int]] = []  # (l, t, r, b) of drawn objects
    for _ in range(int(rng.integers(1, p.max_objects + 1))):
        cls = SYNTHETIC_CLASSES[int(rng.integers(len(SYNTHETIC_CLASSES)))]
        for _try in range(20):
            longer = rng.uniform(p.min_object_frac, p.max_object_frac) * min(width, height)
            aspect = cls.aspect * math.exp(rng.uniform(-0.15, 0.15))
            w, h = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
            w, h = min(w, width - 1.0), min(h, height - 1.0)
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            # Limited overlap: at most 20% of the smaller of two boxes may be covered.
            cand = (x0, y0, x0 + w, y0 + h)
            if all(_overlap_frac(cand, q) <= 0.2 for q in placed):
                break
        else:
            continue
        pts = _polygon(cls.shape, x0, y0, w, h)
        mask = Image.new("L", (width, height), 0)
        ImageDraw.Draw(mask).polygon(pts, fill=255)
        box = mask.getbbox()  # tight pixel bounds of what is actually drawn
        if box is None or box[2] - box[0] < 3 or box[3] - box[1] < 3:
            continue
        l, t, r, b = box
        region = mask.crop(box)
        img.paste(_shaded_fill(rng, cls.color, r - l, b - t), (l, t), region)
        placed.append(box)
        objects.append({
            "category_id": cls.coco_id,
            "bbox": [float(l), float(t), float(r - l), float(b - t)],
            "area": float(region.histogram()[255]),
            "segmentation": [[round(v, 2) for xy in pts for v in xy]],
        })
    return img, objects


def _overlap_frac(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection of boxes a and b (l, t, r, b) over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(smaller, 1e-9)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _write_split(root: Path, split: str, count: int, p: SyntheticParams, split_code: int,
                 id_offset: int, ann_id_offset: int, empty_fraction: float) -> dict[str, int]:
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    n_empty = 0 if empty_fraction <= 0 or count < 2 else max(1, round(empty_fraction * count))
    empties = set(np.random.default_rng([p.seed, split_code, 2**31]).choice(count, n_empty, replace=False).tolist()) \
        if n_empty else set()
    images, annotations = [], []
    ann_id = ann_id_offset
    for i in range(count):
        rng = np.random.default_rng([p.seed, split_code, i])
        img, objects = _draw_image(rng, p, empty=i in empties)
        image_id = id_offset + i + 1
        file_name = f"{image_id:012d}.jpg"
        img.save(image_dir / file_name, format="JPEG", quality=p.jpeg_quality)
        images.append({"id": image_id, "file_name": file_name, "height": img.height, "width": img.width,
                       "license": 1, "date_captured": "2017-01-01 00:00:00"})
        for obj in objects:
            ann_id += 1
            annotations.append({"id": ann_id, "image_id": image_id, "iscrowd": 0, **obj})
    data = {
        "info": {"description": "single_stage_detector synthetic shapes (COCO 2017 layout)",
                 "version": str(_FORMAT_VERSION), "year": 2017, "contributor": "single_stage_detector",
                 "date_created": "2017-01-01"},
        "licenses": [{"id": 1, "name": "synthetic, no restrictions", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": COCO_CATEGORIES,
    }
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    with open(ann_dir / f"instances_{split}.json", "w") as f:
        json.dump(data, f, separators=(",", ":"))
    return {"images": count, "images_empty": len(empties), "annotations": len(annotations)}


def _owned_or_empty(root: Path) -> bool:
    """True if ``root`` holds no COCO files, or ones this generator wrote (marker present)."""
    if (root / MARKER_FILE).exists() or (root / _IN_PROGRESS_FILE).exists():
        return True
    ann = root / "annotations"
    has_ann = ann.is_dir() and any(ann.iterdir())
    has_images = any((root / s).is_dir() and any((root / s).iterdir()) for s in ("train2017", "val2017"))
    return not (has_ann or has_images)


def _clear_generated(root: Path) -> None:
    for split in ("train2017", "val2017"):
        d = root / split
        if d.is_dir():
            for f in d.iterdir():
                if _FILE_RE.match(f.name):
                    f.unlink()
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").unlink(missing_ok=True)


def make_synthetic_coco(root: str | Path, **params: Any) -> dict[str, Any]:
    """Write the synthetic dataset under ``root`` and return a summary dict.

    Keyword arguments are the fields of :class:`SyntheticParams` (num_train, num_val,
    seed, min_size, max_size, max_objects, min_object_frac, max_object_frac,
    empty_fraction, jpeg_quality). Refuses (:class:`DatasetError`) to write into a folder
    holding a COCO dataset it did not generate. Files of a previous synthetic dataset
    there are replaced; the marker file is written last, so it marks a complete dataset.
    """
    p = SyntheticParams(**params)
    if p.min_size < 16 or p.max_size < p.min_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {p.min_size}, {p.max_size}")
    if not 0 < p.min_object_frac <= p.max_object_frac <= 1:
        raise ValueError("need 0 < min_object_frac <= max_object_frac <= 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not _owned_or_empty(root):
        raise DatasetError(f"{root} already holds a COCO dataset that was not generated here "
                           f"(no {MARKER_FILE}); refusing to overwrite it")
    start = time.perf_counter()
    (root / _IN_PROGRESS_FILE).touch()
    (root / MARKER_FILE).unlink(missing_ok=True)
    _clear_generated(root)
    train = _write_split(root, "train2017", p.num_train, p, 0, 0, 0, p.empty_fraction)
    val = _write_split(root, "val2017", p.num_val, p, 1, _VAL_ID_OFFSET, 10_000_000, 0.0)
    summary = {
        "root": str(root),
        "params": asdict(p),
        "train_images": train["images"],
        "train_images_empty": train["images_empty"],
        "train_annotations": train["annotations"],
        "val_images": val["images"],
        "val_annotations": val["annotations"],
        "classes": {c.coco_id: c.name for c in SYNTHETIC_CLASSES},
        "seconds": round(time.perf_counter() - start, 3),
    }
    marker = {"format_version": _FORMAT_VERSION, "params": asdict(p), "summary": summary}
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=1, sort_keys=True))
    (root / _IN_PROGRESS_FILE).unlink()
    return {**summary, "generated": True}


def ensure_synthetic_coco(root: str | Path, **params: Any) -> dict[str, Any]:
    """Generate the dataset unless ``root`` already holds a complete one with the same parameters.

    Returns the summary (``generated`` says whether files were written this time).
    """
    root = Path(root)
    p = SyntheticParams(**params)
    marker_path = root / MARKER_FILE
    if marker_path.is_file():
        try:
            marker = json.loads(marker_path.read_text())
        except (OSError, json.JSONDecodeError):
            marker = None
        files_ok = all((root / "annotations" / f"instances_{s}.json").is_file() for s in ("train2017", "val2017"))
        if (marker and files_ok and marker.get("format_version") == _FORMAT_VERSION
                and marker.get("params") == asdict(p) and not (root / _IN_PROGRESS_FILE).exists()):
            summary = dict(marker["summary"])
            summary["classes"] = {int(k): v for k, v in summary["classes"].items()}
            return {**summary, "generated": False}
    return make_synthetic_coco(root, **params)
