"""A COCO-layout dataset of real photographs, for timing the input pipelines.

The synthetic dataset's images (smooth gradients and flat shapes) compress far better
than photographs and decode faster, so input-pipeline figures measured on them flatter
every decoder. COCO itself cannot be shipped with the harness; this module builds a
stand-in from the colour photographs that scikit-image distributes with its wheel
(``skimage.data``: astronaut, chelsea, coffee, rocket and the two stereo motorcycle
views, all photographs of ordinary scenes):

* each image is a random crop (50-100% of the area, aspect 3:4 to 16:9) of one of them,
  resized so that its longer side is 640 pixels (COCO 2017's usual size, 640x480 or
  640x427), possibly mirrored, and saved as a baseline JPEG at quality 90;
* each image gets the benchmark's COCO-like boxes (``benchmark.coco_like_counts`` and
  ``coco_like_boxes``: a geometric number of boxes averaging 5.8 over the split, the mean of
  COCO 2017 training images, capped at 60, sides log-uniform over 2-90% of the image) and
  random COCO categories. The boxes are not the objects in the photo: the dataset measures
  speed, not accuracy.

``scikit-image`` is needed only to build the dataset (``pip install scikit-image``, or the
``bench`` extra); the written files need nothing but the harness.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .coco import COCO_CATEGORIES, DatasetError

__all__ = ["PHOTO_NAMES", "load_sample_photos", "make_photo_coco", "ensure_photo_coco"]

# The colour photographs of ordinary scenes among scikit-image's bundled images.
PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")
# The cap of ``benchmark.coco_like_counts``: at most this many boxes per image.
MAX_BOXES = 60
LONG_SIDE = 640
JPEG_QUALITY = 90
_MARKER = "sample_photos.json"


def load_sample_photos() -> dict[str, np.ndarray]:
    """The photographs named in :data:`PHOTO_NAMES` as ``uint8 [H, W, 3]`` arrays.

    Raises:
        DatasetError: scikit-image is not installed.
    """
    try:
        import skimage.data as skdata
    except ImportError as e:
        raise DatasetError("the real-photo dataset is built from scikit-image's sample photographs: "
                           "pip install scikit-image (or the project's 'bench' extra)") from e
    left, right, _ = skdata.stereo_motorcycle()
    photos = {"motorcycle_left": left, "motorcycle_right": right}
    for name in PHOTO_NAMES[:4]:
        photos[name] = getattr(skdata, name)()
    return {name: np.ascontiguousarray(photos[name][..., :3]) for name in PHOTO_NAMES}


def _render(rng: np.random.Generator, photo: np.ndarray) -> Image.Image:
    h, w = photo.shape[:2]
    area = rng.uniform(0.5, 1.0) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(16 / 9)))  # width / height
    cw = int(min(w, round(math.sqrt(area * aspect))))
    ch = int(min(h, round(math.sqrt(area / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    im = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw])
    s = LONG_SIDE / max(cw, ch)
    im = im.resize((max(1, round(cw * s)), max(1, round(ch * s))), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im


def make_photo_coco(root: str | Path, num_images: int = 256, seed: int = 0,
                    splits: tuple[str, ...] = ("train2017", "val2017")) -> dict[str, Any]:
    """Write ``num_images`` photographs per split under ``root`` in the COCO 2017 layout.

    Returns a summary ``{"images": int, "boxes": int, "mean_boxes": float, "mean_bytes": float}``
    over all splits. Same arguments -> byte-identical files.

    Raises:
        DatasetError: scikit-image is missing, or ``num_images < 1``.
    """
    if num_images < 1:
        raise DatasetError(f"num_images must be >= 1, got {num_images}")
    import torch

    from ..benchmark import coco_like_boxes, coco_like_counts

    photos = load_sample_photos()
    names = list(PHOTO_NAMES)
    root = Path(root)
    cat_ids = [c["id"] for c in COCO_CATEGORIES]
    total_boxes = total_bytes = total_images = 0
    for s, split in enumerate(splits):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        gen = torch.Generator().manual_seed(seed * 1009 + s)
        counts = coco_like_counts(num_images, gen, cap=MAX_BOXES)
        for i in range(num_images):
            rng = np.random.default_rng([seed, s, i])
            im = _render(rng, photos[names[i % len(names)]])
            image_id = (s + 1) * 1_000_000 + i + 1
            file_name = f"{image_id:012d}.jpg"
            path = root / split / file_name
            im.save(path, quality=JPEG_QUALITY)
            total_bytes += path.stat().st_size
            images.append({"id": image_id, "file_name": file_name, "width": im.width, "height": im.height})
            size = torch.tensor([im.width, im.height, im.width, im.height], dtype=torch.float64)
            for x1, y1, x2, y2 in (coco_like_boxes(counts[i], gen).double() * size).tolist():
                box = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
                anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": box, "area": box[2] * box[3],
                             "iscrowd": 0, "category_id": int(cat_ids[int(rng.integers(len(cat_ids)))])})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": COCO_CATEGORIES}, f)
        total_boxes += len(anns)
        total_images += len(images)
    summary = {"images": total_images, "boxes": total_boxes, "mean_boxes": total_boxes / total_images,
               "mean_bytes": total_bytes / total_images, "num_images": num_images, "seed": seed,
               "photos": names}
    (root / _MARKER).write_text(json.dumps(summary, indent=1))
    return summary


def ensure_photo_coco(root: str | Path, num_images: int = 256, seed: int = 0) -> dict[str, Any]:
    """:func:`make_photo_coco` unless ``root`` already holds the same dataset (its marker file)."""
    marker = Path(root) / _MARKER
    if marker.is_file():
        summary = json.loads(marker.read_text())
        if summary.get("num_images") == num_images and summary.get("seed") == seed:
            return summary
    return make_photo_coco(root, num_images=num_images, seed=seed)
