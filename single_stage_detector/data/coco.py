"""COCO 2017 detection reader: category map, dataset layout, and a torch ``Dataset``.

Layout (the standard one)::

    <data_dir>/train2017/000000xxxxxx.jpg
    <data_dir>/val2017/000000xxxxxx.jpg
    <data_dir>/annotations/instances_{train,val}2017.json
    <data_dir>/annotations/bbox_only_instances_{train,val}2017.json   (optional, preferred)

``data_dir`` may also be a parent folder that contains ``coco2017/``.

Choices (SPEC.md section 1):

* Images without (valid) annotations are dropped when ``skip_empty`` is True (COCO train
  keeps 117,266 of 118,287 images).
* Crowd annotations (``iscrowd=1``) are training targets, as in the MLPerf reference
  reader and NVIDIA's submissions (about 1.2% of train2017's boxes; they decide which
  images are "empty" and so ``train_samples``). ``include_crowd=False`` drops them, an
  open-division option. The evaluation side (pycocotools) handles crowd regions on its own.
* Boxes are clipped to the image (the annotation's width/height); boxes with
  zero/negative width or height, non-finite values, or nothing left after clipping are
  dropped, counted in ``stats`` and reported by one warning. This is the only place that
  cleans boxes: the DALI reader gets exactly these boxes (:meth:`write_reader_annotations`).
* Ids (image, annotation, category) must be JSON integers; anything else is an error
  naming the file and the entry, because pycocotools would later fail to match them.
* Image geometry comes from the annotation file (as the reference); :meth:`check_images`
  compares every file's stored size with it (see ``image_check.py``).

Annotations are stored in flat numpy arrays (boxes of all images concatenated plus
per-image offsets) rather than per-image Python objects: building them is vectorised
and forked DataLoader workers do not touch (and so copy) millions of refcounts.
"""
from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "COCO_CATEGORIES",
    "COCO_CATEGORY_IDS",
    "NUM_CLASSES",
    "LABEL_NAMES",
    "coco_id_to_label",
    "label_to_coco_id",
    "coco_ids_to_labels",
    "labels_to_coco_ids",
    "DatasetError",
    "DataWarning",
    "find_annotation_file",
    "find_coco_split",
    "Sample",
    "CocoDetection",
    "read_rgb",
]

# --------------------------------------------------------------------------------------
# Category map
# --------------------------------------------------------------------------------------

# The 80 COCO 2017 detection categories: (id, name, supercategory). Ids run 1..90 with
# gaps (12, 26, 29, 30, 45, 66, 68, 69, 71, 83 are unused).
_CATEGORY_TABLE: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"), (5, "airplane", "vehicle"), (6, "bus", "vehicle"),
    (7, "train", "vehicle"), (8, "truck", "vehicle"), (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"),
    (19, "horse", "animal"), (20, "sheep", "animal"), (21, "cow", "animal"),
    (22, "elephant", "animal"), (23, "bear", "animal"), (24, "zebra", "animal"),
    (25, "giraffe", "animal"), (27, "backpack", "accessory"), (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"), (32, "tie", "accessory"), (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"),
    (42, "surfboard", "sports"), (43, "tennis racket", "sports"), (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"), (47, "cup", "kitchen"), (48, "fork", "kitchen"),
    (49, "knife", "kitchen"), (50, "spoon", "kitchen"), (51, "bowl", "kitchen"),
    (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"),
    (58, "hot dog", "food"), (59, "pizza", "food"), (60, "donut", "food"),
    (61, "cake", "food"), (62, "chair", "furniture"), (63, "couch", "furniture"),
    (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"), (79, "oven", "appliance"), (80, "toaster", "appliance"),
    (81, "sink", "appliance"), (82, "refrigerator", "appliance"), (84, "book", "indoor"),
    (85, "clock", "indoor"), (86, "vase", "indoor"), (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"), (90, "toothbrush", "indoor"),
)

COCO_CATEGORY_IDS: tuple[int, ...] = tuple(c[0] for c in _CATEGORY_TABLE)
"""The 80 COCO category ids in increasing order; label k (1..80) is ``COCO_CATEGORY_IDS[k-1]``."""

COCO_CATEGORIES: list[dict[str, Any]] = [
    {"id": i, "name": n, "supercategory": s} for i, n, s in _CATEGORY_TABLE
]
"""COCO ``categories`` entries (id, name, supercategory) for all 80 classes."""

NUM_CLASSES = len(COCO_CATEGORY_IDS) + 1
"""81: 80 object classes plus background (label 0)."""

LABEL_NAMES: tuple[str, ...] = ("__background__",) + tuple(c[1] for c in _CATEGORY_TABLE)
"""Name of every label 0..80 (index 0 is background)."""

_MAX_COCO_ID = COCO_CATEGORY_IDS[-1]
# id -> label lookup (0 marks "not a COCO category"); label -> id lookup (0 for background).
_ID_TO_LABEL_NP = np.zeros(_MAX_COCO_ID + 1, dtype=np.int64)
_ID_TO_LABEL_NP[list(COCO_CATEGORY_IDS)] = np.arange(1, len(COCO_CATEGORY_IDS) + 1)
_ID_TO_LABEL = torch.from_numpy(_ID_TO_LABEL_NP.copy())
_LABEL_TO_ID = torch.tensor((0,) + COCO_CATEGORY_IDS, dtype=torch.int64)
_ID_TO_LABEL_DICT = {cid: k + 1 for k, cid in enumerate(COCO_CATEGORY_IDS)}


def coco_id_to_label(category_id: int) -> int:
    """COCO category id (1..90 with gaps) -> contiguous label 1..80. ``KeyError`` if unknown."""
    try:
        return _ID_TO_LABEL_DICT[int(category_id)]
    except KeyError:
        raise KeyError(f"{category_id!r} is not one of the 80 COCO 2017 category ids") from None


def label_to_coco_id(label: int) -> int:
    """Contiguous label 1..80 -> COCO category id. ``KeyError`` for 0 or out of range."""
    label = int(label)
    if not 1 <= label <= len(COCO_CATEGORY_IDS):
        raise KeyError(f"label {label} is not in 1..{len(COCO_CATEGORY_IDS)}")
    return COCO_CATEGORY_IDS[label - 1]


def coco_ids_to_labels(category_ids: Tensor) -> Tensor:
    """Vectorised :func:`coco_id_to_label`: ``Tensor[...]`` of ids -> ``Tensor[...]`` int64 labels.

    Raises ``ValueError`` if any id is not a COCO category.
    """
    ids = category_ids.long()
    table = _ID_TO_LABEL.to(ids.device)
    in_range = (ids >= 0) & (ids <= _MAX_COCO_ID)
    labels = table[ids.clamp(0, _MAX_COCO_ID)]
    bad = ~in_range | (labels == 0)
    if bool(bad.any()):
        raise ValueError(f"not COCO category ids: {ids[bad].unique().tolist()}")
    return labels


def labels_to_coco_ids(labels: Tensor) -> Tensor:
    """Vectorised :func:`label_to_coco_id`: ``Tensor[...]`` labels 1..80 -> int64 COCO ids.

    Raises ``ValueError`` for labels outside 1..80.
    """
    lab = labels.long()
    bad = (lab < 1) | (lab > len(COCO_CATEGORY_IDS))
    if bool(bad.any()):
        raise ValueError(f"labels outside 1..{len(COCO_CATEGORY_IDS)}: {lab[bad].unique().tolist()}")
    return _LABEL_TO_ID.to(lab.device)[lab]


# --------------------------------------------------------------------------------------
# Errors and layout
# --------------------------------------------------------------------------------------


class DatasetError(Exception):
    """A dataset file or folder is missing or malformed. The message names the file."""


class DataWarning(UserWarning):
    """Recoverable data problems: dropped boxes, unreadable images that were skipped."""


_SPLIT_ALIASES = {"train": "train2017", "val": "val2017"}


def _split_name(split: str) -> str:
    return _SPLIT_ALIASES.get(split, split)


def _dataset_root(data_dir: str | Path, split: str) -> Path:
    """The folder holding ``<split>/`` and ``annotations/``: ``data_dir`` or ``data_dir/coco2017``."""
    data_dir = Path(data_dir)
    candidates = [data_dir, data_dir / "coco2017"]
    for root in candidates:
        if (root / split).is_dir() or (root / "annotations").is_dir():
            return root
    looked = ", ".join(str(c / split) for c in candidates)
    if not data_dir.exists():
        raise DatasetError(f"dataset folder {data_dir} does not exist (looked for {looked})")
    raise DatasetError(f"no COCO 2017 layout under {data_dir}: looked for {looked}")


def find_annotation_file(data_dir: str | Path, split: str) -> Path:
    """Path of the annotation json of ``split`` ("train2017"/"val2017", or "train"/"val").

    Prefers ``annotations/bbox_only_instances_<split>.json`` (the stripped file
    ``prepare-json`` writes) over ``annotations/instances_<split>.json``.
    Raises :class:`DatasetError` naming every path looked for.
    """
    split = _split_name(split)
    root = _dataset_root(data_dir, split)
    candidates = [
        root / "annotations" / f"bbox_only_instances_{split}.json",
        root / "annotations" / f"instances_{split}.json",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetError(
        f"no annotation file for {split}: looked for {', '.join(str(c) for c in candidates)}"
    )


def find_coco_split(data_dir: str | Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, annotation_file)`` of ``split`` under ``data_dir``; :class:`DatasetError` if missing."""
    split = _split_name(split)
    annotation_file = find_annotation_file(data_dir, split)
    image_dir = annotation_file.parent.parent / split
    if not image_dir.is_dir():
        raise DatasetError(f"image folder {image_dir} does not exist (annotations: {annotation_file})")
    return image_dir, annotation_file


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


def read_rgb(path: str | Path) -> Tensor:
    """Decode an image file to RGB: ``Tensor[3, H, W]`` uint8 (stored H, W, 3: a channels-last view).

    JPEGs with one or three channels are decoded by ``torchvision.io.decode_jpeg``
    (libjpeg-turbo, as Pillow: the same pixels bit for bit with torchvision 0.29 and Pillow 13,
    tested on baseline, progressive, grey and 4:4:4 files; on the ``--photos`` images about
    1.8 ms against 2.6-3.2 ms for Pillow's decode on one core); grey is repeated into R, G
    and B as Pillow's ``convert("RGB")`` does. Every other file (PNG, CMYK JPEG, ...) and every JPEG
    that torchvision cannot decode (truncated, corrupt) goes to Pillow's ``convert("RGB")``,
    so a bad file raises Pillow's error (``OSError``, ...), as before; so does a JPEG whose
    frame header declares more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` (its
    decompression-bomb guard). EXIF orientation is ignored by both, as COCO's boxes refer to
    the stored pixels. A torchvision without ``decode_jpeg`` (deprecated since 0.29 in favour
    of TorchCodec) leaves every file to Pillow.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    size = _jpeg_frame_size(data)
    limit = Image.MAX_IMAGE_PIXELS
    decode_jpeg = _torchvision_decode_jpeg()
    if decode_jpeg is not None and size is not None and (limit is None or size[0] * size[1] <= limit):
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError:
            image = None  # Pillow decodes it, or raises its own error
        if image is not None and image.shape[0] == 3:
            return image
        if image is not None and image.shape[0] == 1:
            return image.permute(1, 2, 0).expand(-1, -1, 3).contiguous().permute(2, 0, 1)
    with Image.open(path) as im:
        rgb = np.array(im.convert("RGB"))  # forces the full decode, so truncation shows here
    return torch.from_numpy(rgb).permute(2, 0, 1)


@functools.cache
def _torchvision_decode_jpeg():
    """torchvision's ``decode_jpeg`` with the channel count of the file (``ImageReadMode.UNCHANGED``),
    or None when this torchvision has none. torchvision 0.29 warns on every call that its image
    codecs are deprecated (in favour of TorchCodec): one warning per decoded image, in every
    loader worker, about an API whose removal only sends the files to Pillow, so it is
    silenced here, for that message only."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None

    def decode(data: Tensor) -> Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                    category=DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.UNCHANGED)

    return decode


def _jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header (ITU-T T.81, B.2.2), or None when
    ``data`` does not start like a JPEG or its markers do not lead to a frame header."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        # SOF0..SOF15 but DHT (C4), JPG (C8) and DAC (CC): height, then width, after the precision byte.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if length < 2:
            return None
        i += 2 + length
    return None


@dataclass
class Sample:
    """One training/eval example.

    Attributes:
        image (Tensor[3, H, W]): float normalised after a transform, else uint8 RGB.
        boxes (Tensor[N, 4]): float32 (x1, y1, x2, y2) normalised to [0, 1] (after the transform).
        labels (Tensor[N]): int64 labels 1..80.
        image_id: COCO image id.
        orig_size: original (height, width) from the annotation file.
    """

    image: Tensor
    boxes: Tensor
    labels: Tensor
    image_id: int
    orig_size: tuple[int, int]


Transform = Callable[[Image.Image, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]

_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"invalid JSON in {path}: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read annotation file {path}: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level is {_json_kind(data)}, expected an object")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetError(f"{path}: missing top-level key(s) {missing}")
    for k in ("images", "annotations", "categories"):
        if not isinstance(data[k], list):
            raise DatasetError(f"{path}: '{k}' is {_json_kind(data[k])}, expected an array")
    return data


def _json_kind(value: Any) -> str:
    """``value``'s JSON type, with its article, for messages about a JSON file: "an object",
    "an array", "a string", "an integer", "a non-integer number", "a boolean", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a non-integer number" if not value.is_integer() else "a number written with a decimal point"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), f"a {type(value).__name__}")


def _entry_error(path: Path, kind: str, entries: Sequence[Any], keys: Sequence[str]) -> DatasetError:
    """Find the first malformed entry (slow path, only after the fast path failed)."""
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            return DatasetError(f"{path}: {kind} entry #{i} is {_json_kind(e)}, not an object")
        missing = [k for k in keys if k not in e]
        if missing:
            return DatasetError(f"{path}: {kind} entry #{i} (id {e.get('id', '?')}) misses key(s) {missing}")
        if kind == "annotation":
            bbox = e["bbox"]
            if not (isinstance(bbox, list) and len(bbox) == 4
                    and all(isinstance(v, (int, float)) for v in bbox)):
                return DatasetError(f"{path}: annotation {e['id']} has a malformed bbox {bbox!r}")
        for k in keys:
            if k in ("id", "image_id", "category_id", "height", "width") and not isinstance(e[k], (int, float)):
                return DatasetError(f"{path}: {kind} {e.get('id', '?')} has a non-numeric '{k}': {e[k]!r}")
    return DatasetError(f"{path}: malformed {kind} entries")


def _check_integer_ids(path: Path, images: Sequence[Any], anns: Sequence[Any]) -> None:
    """Every id must be a JSON integer (not a string such as ``"1001"``, a float or a bool).

    numpy would silently convert ``"1001"`` to 1001 and the run would go on until
    pycocotools, at the first evaluation, finds that results and ground truth disagree.
    """
    for kind, entries, keys in (("image", images, ("id",)),
                                ("annotation", anns, ("id", "image_id", "category_id"))):
        for key in keys:
            try:
                types = {type(e[key]) for e in entries}
            except (KeyError, TypeError):
                continue  # missing keys are reported by the per-field pass with the entry named
            if types <= {int}:
                continue
            for i, e in enumerate(entries):
                v = e[key]
                if type(v) is not int:
                    raise DatasetError(f"{path}: {kind} entry #{i} (id {e.get('id', '?')!r}) has '{key}' = {v!r} "
                                       f"({_json_kind(v)}); COCO ids must be JSON integers")


class CocoDetection(Dataset):
    """COCO-format detection dataset.

    Args:
        image_dir: folder with the image files named by ``file_name``.
        annotation_file: COCO instances json (or the bbox-only variant).
        transform: ``(PIL RGB image, boxes Tensor[N, 4], labels Tensor[N]) -> (image, boxes, labels)``;
            boxes in and out are normalised xyxy. A transform whose ``tensor_input`` is True gets
            the image as :func:`read_rgb` decodes it, uint8 ``Tensor[3, H, W]``, instead of a PIL
            image. ``None``: the image becomes a uint8 ``Tensor[3, H, W]``.
        skip_empty: drop images that have no usable annotation.
        include_crowd: keep ``iscrowd=1`` annotations as targets (default, as the MLPerf
            reference); False drops them (open division only).

    Attributes:
        image_ids (list[int]): COCO ids of the kept images, sorted increasingly.
        stats (dict[str, int]): ``images`` (kept), ``images_skipped_empty``, ``boxes`` (kept),
            ``boxes_dropped_degenerate``, ``boxes_clipped`` (past the image border, clipped),
            ``boxes_crowd`` (crowd annotations dropped), and after :meth:`apply_image_checks`
            ``images_skipped_<reason>`` per skip reason and ``images_exif_orientation``.
        label_names (tuple[str, ...]): name of labels 0..80 (0 = background).
    """

    label_names = LABEL_NAMES

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        *,
        transform: Transform | None = None,
        skip_empty: bool = True,
        include_crowd: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transform = transform
        self.skip_empty = skip_empty
        self.include_crowd = include_crowd
        self._build(_load_json(self.annotation_file))

    @classmethod
    def from_dir(cls, data_dir: str | Path, split: str, **kwargs: Any) -> "CocoDetection":
        """Dataset of ``split`` in the standard layout under ``data_dir`` (see :func:`find_coco_split`)."""
        image_dir, annotation_file = find_coco_split(data_dir, split)
        return cls(image_dir, annotation_file, **kwargs)

    # -- index building ----------------------------------------------------------------

    def _build(self, data: dict[str, Any]) -> None:
        path = self.annotation_file
        images, anns = data["images"], data["annotations"]

        _check_integer_ids(path, images, anns)
        # Images: 118k entries, a plain loop is fine.
        try:
            img_ids = np.array([im["id"] for im in images], dtype=np.int64)
            sizes = np.array([(im["height"], im["width"]) for im in images], dtype=np.int64).reshape(-1, 2)
            names = [str(im["file_name"]) for im in images]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise _entry_error(path, "image", images, _IMAGE_KEYS) from None
        order = np.argsort(img_ids, kind="stable")
        img_ids, sizes = img_ids[order], sizes[order]
        names = [names[i] for i in order]
        dup = np.flatnonzero(img_ids[1:] == img_ids[:-1])
        if dup.size:
            raise DatasetError(f"{path}: duplicate image id {int(img_ids[dup[0]])}")
        bad = np.flatnonzero((sizes <= 0).any(axis=1))
        if bad.size:
            raise DatasetError(f"{path}: image {int(img_ids[bad[0]])} has non-positive height/width "
                               f"{sizes[bad[0]].tolist()}")

        # Annotations: up to ~860k entries; one pass per field, then numpy.
        try:
            ann_ids = np.array([a["id"] for a in anns], dtype=np.int64)
            ann_img = np.array([a["image_id"] for a in anns], dtype=np.int64)
            ann_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)
            bbox = np.array([a["bbox"] for a in anns], dtype=np.float64)
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
            if bbox.size == 0:
                bbox = bbox.reshape(0, 4)
            elif bbox.ndim != 2 or bbox.shape[1] != 4:
                raise ValueError("bbox is not [x, y, w, h]")
        except (KeyError, TypeError, ValueError, AttributeError):
            raise _entry_error(path, "annotation", anns, _ANNOTATION_KEYS) from None

        # Every category must be one of the 80.
        in_range = (ann_cat >= 0) & (ann_cat <= _MAX_COCO_ID)
        labels = _ID_TO_LABEL_NP[np.clip(ann_cat, 0, _MAX_COCO_ID)]
        bad = np.flatnonzero(~in_range | (labels == 0))
        if bad.size:
            i = bad[0]
            raise DatasetError(f"{path}: annotation {int(ann_ids[i])} has unknown category id "
                               f"{int(ann_cat[i])} (not one of the 80 COCO 2017 categories)")

        # Every annotation must refer to a listed image.
        img_idx = np.searchsorted(img_ids, ann_img)
        found = img_idx < len(img_ids)
        found[found] = img_ids[img_idx[found]] == ann_img[found]
        bad = np.flatnonzero(~found)
        if bad.size:
            i = bad[0]
            raise DatasetError(f"{path}: annotation {int(ann_ids[i])} refers to image id "
                               f"{int(ann_img[i])}, which is not in 'images'")

        # [x, y, w, h] pixels -> xyxy clipped to the image -> normalised by (w, h).
        h_img = sizes[img_idx, 0].astype(np.float64)
        w_img = sizes[img_idx, 1].astype(np.float64)
        finite = np.isfinite(bbox).all(axis=1)
        x1 = np.clip(bbox[:, 0], 0.0, w_img)
        y1 = np.clip(bbox[:, 1], 0.0, h_img)
        x2 = np.clip(bbox[:, 0] + bbox[:, 2], 0.0, w_img)
        y2 = np.clip(bbox[:, 1] + bbox[:, 3], 0.0, h_img)
        with np.errstate(invalid="ignore"):
            ok_geom = finite & (bbox[:, 2] > 0) & (bbox[:, 3] > 0) & (x2 > x1) & (y2 > y1)
            clipped = ok_geom & ((bbox[:, 0] < 0) | (bbox[:, 1] < 0) | (bbox[:, 0] + bbox[:, 2] > w_img)
                                 | (bbox[:, 1] + bbox[:, 3] > h_img))
        n_crowd = int((crowd & ok_geom).sum()) if not self.include_crowd else 0
        keep = ok_geom if self.include_crowd else ok_geom & ~crowd
        n_degenerate = int((~ok_geom).sum())
        if n_degenerate:
            examples = ann_ids[~ok_geom][:5].tolist()
            msg = (f"{path}: dropped {n_degenerate} degenerate box(es) (zero/negative width or "
                   f"height, non-finite, or outside the image), e.g. annotation ids {examples}")
            warnings.warn(msg, DataWarning, stacklevel=3)

        n_clipped = int((clipped & keep).sum())
        if n_clipped:
            examples = ann_ids[clipped & keep][:5].tolist()
            warnings.warn(f"{path}: clipped {n_clipped} box(es) past the image border to the image, e.g. "
                          f"annotation ids {examples}", DataWarning, stacklevel=3)

        norm = np.stack([x1 / w_img, y1 / h_img, x2 / w_img, y2 / h_img], axis=1)[keep]
        k_img, k_lab = img_idx[keep], labels[keep]

        # Group by image: stable sort keeps the file's annotation order within an image.
        order = np.argsort(k_img, kind="stable")
        counts = np.bincount(k_img, minlength=len(img_ids))
        kept_images = np.flatnonzero(counts > 0) if self.skip_empty else np.arange(len(img_ids))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

        self._boxes = norm[order].astype(np.float32)  # [K, 4], all kept boxes
        self._labels = k_lab[order].astype(np.int64)  # [K]
        self._starts = starts[kept_images].astype(np.int64)  # per kept image
        self._counts = counts[kept_images].astype(np.int64)
        self._ids = img_ids[kept_images]
        self._sizes = sizes[kept_images]  # [M, 2] (h, w)
        # Fixed-width numpy strings instead of Python str objects (see module docstring).
        self._names = np.array([names[i] for i in kept_images], dtype=str) if len(kept_images) else \
            np.zeros(0, dtype="<U1")
        self.image_ids: list[int] = self._ids.tolist()
        self.stats: dict[str, int] = {
            "images": int(len(kept_images)),
            "images_skipped_empty": int(len(img_ids) - len(kept_images)),
            "boxes": int(self._counts.sum()),
            "boxes_dropped_degenerate": n_degenerate,
            "boxes_clipped": n_clipped,
            "boxes_crowd": n_crowd,
        }

    # -- access ------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(len(self._ids))

    # -- selection and image checks ----------------------------------------------------

    def restrict(self, positions: Sequence[int] | np.ndarray) -> None:
        """Keep only the images at ``positions`` (indices into this dataset), in increasing order.

        Used for ``--max-train-images`` and to drop the images :meth:`check_images` rejects;
        ``stats["images"]`` and ``stats["boxes"]`` follow.
        """
        pos = np.unique(np.asarray(positions, dtype=np.int64))
        if pos.size and (pos[0] < 0 or pos[-1] >= len(self)):
            raise IndexError(f"positions out of range 0..{len(self) - 1}")
        self._starts, self._counts = self._starts[pos], self._counts[pos]
        self._ids, self._sizes, self._names = self._ids[pos], self._sizes[pos], self._names[pos]
        self.image_ids = self._ids.tolist()
        self.stats["images"] = int(len(pos))
        self.stats["boxes"] = int(self._counts.sum())

    def check_images(self, positions: Sequence[int] | None = None, *, num_threads: int = 8) -> list[tuple[int, Any]]:
        """Run :func:`~single_stage_detector.data.image_check.check_image` on the images at
        ``positions`` (default: all) with ``num_threads`` threads (the work is file I/O).

        Returns ``[(position, ImageCheck)]`` for every image that is skipped or noted
        (EXIF orientation); usable images without notes are left out.
        """
        from concurrent.futures import ThreadPoolExecutor

        from .image_check import check_image

        pos = list(range(len(self))) if positions is None else [int(p) for p in positions]

        def one(p: int):
            h, w = self._sizes[p].tolist()
            return p, check_image(self.image_path(p), w, h)

        if num_threads <= 1 or len(pos) < 64:
            results = [one(p) for p in pos]
        else:
            with ThreadPoolExecutor(max_workers=num_threads) as pool:
                results = list(pool.map(one, pos, chunksize=256))
        return [(p, c) for p, c in results if not c.ok or c.exif_orientation is not None]

    def apply_image_checks(self, findings: Sequence[tuple[int, Any]]) -> dict[str, int]:
        """Drop the images that ``findings`` (from :meth:`check_images`) reject, count every
        reason in ``stats`` and warn once per reason, naming the first files.

        Returns the counts added to ``stats`` (``images_skipped_<reason>``, ``images_exif_orientation``).
        """
        from .image_check import REASON_TEXT, SKIP_REASONS

        by_reason: dict[str, list[tuple[int, Any]]] = {}
        for p, check in findings:
            by_reason.setdefault(check.reason or "exif_orientation", []).append((p, check))
        counts: dict[str, int] = {f"images_skipped_{r}": len(by_reason.get(r, ())) for r in SKIP_REASONS}
        counts["images_exif_orientation"] = sum(1 for _, c in findings if c.exif_orientation is not None)
        for reason, items in by_reason.items():
            examples = "; ".join(c.message(self.image_path(p)) if c.reason else
                                 f"{self.image_path(p)} (orientation {c.exif_orientation})" for p, c in items[:3])
            action = "kept, orientation ignored" if reason == "exif_orientation" else "skipped"
            warnings.warn(f"{len(items)} image(s) of {self.annotation_file} {action}: {REASON_TEXT[reason]}; "
                          f"e.g. {examples}", DataWarning, stacklevel=2)
        bad = {p for p, c in findings if not c.ok}
        if bad:
            self.restrict([p for p in range(len(self)) if p not in bad])
        self.stats.update(counts)
        return counts

    @property
    def file_names(self) -> list[str]:
        """File names of the kept images, in dataset order."""
        return [str(n) for n in self._names]

    def box_sizes(self) -> np.ndarray:
        """``float32[K, 2]`` (width, height) of every kept box of the kept images, normalised by
        its image's width and height (the anchor statistics of YOLO's start-up check)."""
        if not len(self._starts):
            return np.zeros((0, 2), np.float32)
        index = np.concatenate([np.arange(s, s + c) for s, c in zip(self._starts.tolist(), self._counts.tolist())])
        boxes = self._boxes[index.astype(np.int64)] if index.size else np.zeros((0, 4), np.float32)
        return (boxes[:, 2:] - boxes[:, :2]).astype(np.float32)

    def box_labels(self) -> np.ndarray:
        """``int64[K]`` contiguous label (1..80) of every kept box of the kept images, in the
        order of :meth:`box_sizes` (the class statistics of YOLOv1's class weights)."""
        index = [np.arange(s, s + c) for s, c in zip(self._starts.tolist(), self._counts.tolist())]
        return self._labels[np.concatenate(index).astype(np.int64)] if index else np.zeros(0, np.int64)

    def image_sizes(self) -> dict[int, tuple[int, int]]:
        """Image id -> (height, width) in pixels from the annotation file, for every kept image."""
        return {int(i): (int(h), int(w)) for i, (h, w) in zip(self._ids.tolist(), self._sizes.tolist())}

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) in pixels of image ``index``, from the annotation file."""
        h, w = self._sizes[index].tolist()
        return int(h), int(w)

    def write_reader_annotations(self, path: str | Path) -> Path:
        """Write the cleaned ground truth of the kept images as a COCO json for the DALI reader.

        The file holds exactly the boxes this dataset trains on (clipped, degenerate and
        optionally crowd boxes removed), already normalised to [0, 1]: every image is
        declared 1 x 1 pixel, so that DALI's ``ratio=True`` division is exact and both
        backends get bit-identical box coordinates. ``category_id`` is the COCO id.
        Returns ``path``.
        """
        path = Path(path)
        images = [{"id": int(i), "file_name": str(n), "width": 1, "height": 1}
                  for i, n in zip(self._ids.tolist(), self._names)]
        annotations = []
        ann_id = 1
        for k in range(len(self)):
            s, n = int(self._starts[k]), int(self._counts[k])
            image_id = int(self._ids[k])
            for (x1, y1, x2, y2), lab in zip(self._boxes[s:s + n].tolist(), self._labels[s:s + n].tolist()):
                # x + w must give back x2 in float32 as DALI adds them: store the float32 width.
                w = float(np.float32(x2) - np.float32(x1))
                h = float(np.float32(y2) - np.float32(y1))
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORY_IDS[lab - 1],
                                    "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
                ann_id += 1
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}, f,
                      separators=(",", ":"))
        tmp.replace(path)
        return path

    def _index_of(self, image_id: int) -> int:
        i = int(np.searchsorted(self._ids, image_id))
        if i >= len(self._ids) or int(self._ids[i]) != int(image_id):
            raise KeyError(f"image id {image_id} is not in this dataset ({self.annotation_file})")
        return i

    def image_info(self, image_id: int) -> dict[str, Any]:
        """``{"id", "file_name", "height", "width"}`` of a kept image (``KeyError`` if absent)."""
        i = self._index_of(image_id)
        h, w = self._sizes[i].tolist()
        return {"id": int(image_id), "file_name": str(self._names[i]), "height": h, "width": w}

    def image_path(self, index: int) -> Path:
        return self.image_dir / str(self._names[index])

    def targets(self, index: int) -> tuple[Tensor, Tensor]:
        """Ground truth of image ``index``: (boxes Tensor[N, 4] normalised xyxy, labels Tensor[N])."""
        s, n = int(self._starts[index]), int(self._counts[index])
        return torch.from_numpy(self._boxes[s:s + n].copy()), torch.from_numpy(self._labels[s:s + n].copy())

    def __getitem__(self, index: int) -> Sample | None:
        """The sample at ``index``, or ``None`` (after a :class:`DataWarning`) if its image is unreadable."""
        path = self.image_path(index)
        h, w = self._sizes[index].tolist()
        try:
            image = read_rgb(path)
        except Exception as e:  # any decode failure (OSError, DecompressionBombError, ...) is a counted skip
            msg = f"skipping unreadable image {path}: {type(e).__name__}: {e}"
            warnings.warn(msg, DataWarning, stacklevel=2)
            return None
        if tuple(image.shape[1:]) != (h, w):
            # Normally caught before the run by check_images(); boxes are in the annotation's frame.
            warnings.warn(f"skipping image {path}: decoded size {image.shape[2]}x{image.shape[1]}, annotation says "
                          f"{w}x{h}", DataWarning, stacklevel=2)
            return None
        boxes, labels = self.targets(index)
        if self.transform is not None:
            if not getattr(self.transform, "tensor_input", False):
                image = Image.fromarray(image.permute(1, 2, 0).numpy())  # the transform works on Pillow images
            image, boxes, labels = self.transform(image, boxes, labels)
        return Sample(image=image, boxes=boxes, labels=labels, image_id=int(self._ids[index]),
                      orig_size=(h, w))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.annotation_file}, images={len(self)}, "
                f"boxes={self.stats['boxes']})")
