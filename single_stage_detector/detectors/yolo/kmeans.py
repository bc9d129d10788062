"""Anchor shapes from a dataset: k-means with the 1 - IoU distance, fitness, units, the start-up check.

YOLOv2 (arXiv:1612.08242, section 2 "Dimension clusters") picks its anchors by k-means on
the (width, height) of the training boxes with the distance ``d(box, centroid) = 1 -
IoU(box, centroid)``, both boxes centred at the same point (:func:`~single_stage_detector.boxes.shape_iou`),
so that large boxes do not dominate as they would under a Euclidean distance. YOLOv3
(arXiv:1804.02767, section 2.3) reuses the method with 9 clusters.

Units (the usual source of "my anchors are wrong"):

* YOLOv3 anchors are **pixels of the network input** (darknet ``cfg/yolov3.cfg``: 10,13 ...
  373,326 at any input size);
* YOLOv2 anchors are **grid units**: pixels / 32, the stride of its single output
  (darknet ``cfg/yolov2.cfg``: 0.57273,0.677385 ... 9.77052,9.16828).

:func:`box_shapes_from_coco` measures boxes in pixels of the network input;
:func:`convert_units` goes between the two unit systems. Every function here is vectorised
over the boxes and runs on the device of its inputs.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from ...boxes import shape_iou

__all__ = [
    "BPR_IOU_THRESHOLD",
    "AnchorFitness",
    "box_shapes_from_coco",
    "kmeans_anchors",
    "best_anchor_iou",
    "anchor_fitness",
    "convert_units",
    "check_anchor_recall",
    "round_anchors",
    "format_anchors",
]

BPR_IOU_THRESHOLD = 0.25
"""Shape IoU (box vs its best anchor) at or above which a box counts as covered by the anchors.

Rationale: for a box and an anchor of the same aspect ratio, a shape IoU of 1/4 means the
anchor is 2x larger or smaller in each side, i.e. the network must predict ``|tw|, |th| <=
ln 2`` (YOLOv2/v3 decode ``bw = pw * exp(tw)``); a box below it is more than a factor 2 per
side (4x in area) from every anchor, a wider gap than between neighbouring anchors of
YOLOv3's own set (10x13 ... 373x326 px, about 1.2-2x per side from one to the next). It is
deliberately lower than the 0.5 of PASCAL VOC matching: YOLOv3 trains every box with its
best anchor whatever their IoU, and many of COCO's small or thin boxes sit between 0.25 and
0.5 of their best published anchor (a 6x6 px box: 36 / 130 = 0.28 with 10x13), so 0.5 would
flag the reference configuration itself. Darknet's later ``cfg/yolov4.cfg`` uses a
comparable shape IoU, ``iou_thresh=0.213``, as the level above which an anchor still learns
a box.
"""

# Rows of box shapes per step of the [N, k] IoU (bounds memory at ~_CHUNK * k * 4 bytes per temporary).
_CHUNK = 1 << 18
# k-means runs on every box up to this many; above, on a log-grid summary of the boxes.
_EXACT_MAX = 1 << 16
_LOG_CELL = 1.0 / 64


class AnchorFitness(NamedTuple):
    """How well anchors fit a set of box shapes.

    * ``mean_iou``: the mean over the boxes of the shape IoU with their best anchor (YOLOv2
      paper, Table 1 and Figure 2 "Avg IoU");
    * ``bpr``: best possible recall, the fraction of boxes whose best-anchor shape IoU is at
      least the threshold (:data:`BPR_IOU_THRESHOLD` unless stated).
    """

    mean_iou: float
    bpr: float


# --------------------------------------------------------------------------------------
# Box shapes from a COCO file
# --------------------------------------------------------------------------------------


def _bad_entry(path: str, kind: str, entries: Sequence, keys: Sequence[str]) -> ValueError:
    """The error naming the first entry of ``entries`` that is not an object, lacks one of
    ``keys``, or holds a value of the wrong shape (a ``bbox`` not of 4 numbers, an id or a
    size that is not a number)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return ValueError(f"{path}: {kind}[{i}] is not an object")
        missing = [k for k in keys if k not in entry]
        if missing:
            return ValueError(f"{path}: {kind}[{i}] has no {', '.join(repr(k) for k in missing)}")
        name = f"{kind}[{i}] (id {entry.get('id', '?')})"
        for k in keys:
            v = entry[k]
            if k == "bbox" and not (isinstance(v, list) and len(v) == 4 and all(number(x) for x in v)):
                return ValueError(f"{path}: {name} has a malformed bbox {v!r} (expected [x, y, width, height])")
            if k != "bbox" and not number(v):
                return ValueError(f"{path}: {name} has a non-numeric {k!r}: {v!r}")
        if kind == "annotations" and "iscrowd" in entry and not number(entry["iscrowd"]):
            return ValueError(f"{path}: {name} has a non-numeric 'iscrowd': {entry['iscrowd']!r}")
    return ValueError(f"{path}: malformed {kind} entries (expected {', '.join(keys)})")


def box_shapes_from_coco(annotation_file: str | os.PathLike, input_size: int, *,
                         letterbox: bool = False) -> Tensor:
    """The (width, height) of every usable box of a COCO-format annotation file, in pixels of
    the network input.

    Each image is taken as resized to ``input_size x input_size``: a box of ``w x h`` pixels in
    an image of ``W x H`` becomes ``(w * input_size / W, h * input_size / H)`` (the plain
    resize of darknet's training and of the harness's eval transform). With ``letterbox``
    the image keeps its aspect ratio and is padded: both sides scale by ``input_size /
    max(W, H)``. Crowd annotations (``iscrowd`` 1) and boxes of zero or negative width or
    height are left out.

    Args:
        annotation_file: a COCO ``instances_*.json`` (``images`` with ``id``, ``width``,
            ``height``; ``annotations`` with ``image_id``, ``bbox`` [x, y, w, h] pixels).
        input_size: the side of the square network input, pixels (e.g. 416).
        letterbox: aspect-preserving resize instead of the plain one.

    Returns:
        ``Tensor[N, 2]`` float32 (width, height), pixels of the network input.

    Raises:
        ValueError naming the file: unreadable or not JSON, missing keys, an annotation of an
        image that is not listed, an image without a positive width and height, or no usable
        box at all. ValueError also for ``input_size`` < 1.
    """
    path = os.fspath(annotation_file)
    if int(input_size) < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the annotation file ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON annotation file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO annotation object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: no {key!r} list (not a COCO instances file?)")
    images, anns = data["images"], data["annotations"]

    try:
        image_ids = np.array([im["id"] for im in images], dtype=np.int64)
        sizes = np.array([(im["width"], im["height"]) for im in images], dtype=np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError):
        raise _bad_entry(path, "images", images, ("id", "width", "height")) from None
    try:
        ann_image = np.array([a["image_id"] for a in anns], dtype=np.int64)
        bbox = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _bad_entry(path, "annotations", anns, ("image_id", "bbox")) from None
    if bbox.shape[0] != len(anns):
        raise ValueError(f"{path}: every annotation 'bbox' must be [x, y, width, height]")

    # Image size of each annotation, by a sorted-id look-up (no per-box Python work).
    order = np.argsort(image_ids, kind="stable")
    pos = np.searchsorted(image_ids[order], ann_image).clip(max=max(len(image_ids) - 1, 0))
    known = (image_ids[order][pos] == ann_image) if len(image_ids) else np.zeros(len(anns), dtype=bool)
    if not known.all():
        i = int(np.flatnonzero(~known)[0])
        raise ValueError(f"{path}: annotations[{i}] refers to image_id {int(ann_image[i])}, which is not in "
                         f"'images'")
    img_wh = sizes[order][pos] if len(anns) else np.zeros((0, 2))
    bad_size = ~(img_wh > 0).all(axis=1)
    if bad_size.any():
        i = int(np.flatnonzero(bad_size)[0])
        raise ValueError(f"{path}: image {int(ann_image[i])} has width x height {img_wh[i, 0]:g} x "
                         f"{img_wh[i, 1]:g}; both must be positive")

    wh = bbox[:, 2:]
    usable = ~crowd & np.isfinite(wh).all(axis=1) & (wh > 0).all(axis=1)
    if not usable.any():
        raise ValueError(f"{path}: no usable boxes ({len(anns)} annotations: {int(crowd.sum())} crowd, "
                         f"{int((~crowd & ~usable).sum())} of zero or negative size)")
    wh, img_wh = wh[usable], img_wh[usable]
    if letterbox:
        scale = input_size / img_wh.max(axis=1, keepdims=True)
    else:
        scale = input_size / img_wh
    return torch.from_numpy(wh * scale).float()


# --------------------------------------------------------------------------------------
# k-means with the 1 - IoU distance
# --------------------------------------------------------------------------------------


def _check_shapes(shapes: Tensor, name: str = "shapes") -> Tensor:
    shapes = torch.as_tensor(shapes)
    if shapes.dim() != 2 or shapes.shape[-1] != 2:
        raise ValueError(f"{name} must be Tensor[N, 2] (width, height), got shape {tuple(shapes.shape)}")
    shapes = shapes.float() if not shapes.is_floating_point() else shapes
    if shapes.numel() and not bool(((shapes > 0) & torch.isfinite(shapes)).all()):
        raise ValueError(f"{name}: every width and height must be positive and finite")
    return shapes


def best_anchor_iou(shapes: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor]:
    """For each box shape, the shape IoU with its best anchor and that anchor's index.

    Args:
        shapes: ``Tensor[N, 2]`` (width, height).
        anchors: ``Tensor[A, 2]`` (width, height), same units as ``shapes``.

    Returns:
        ``(iou Tensor[N], index Tensor[N] int64)``; ties go to the lowest anchor index.
        Computed in chunks of rows so that N in the millions stays within memory.
    """
    anchors = anchors.to(device=shapes.device, dtype=shapes.dtype)
    ious, idxs = [], []
    for chunk in shapes.split(_CHUNK):
        best, idx = shape_iou(chunk, anchors).max(dim=1)
        ious.append(best)
        idxs.append(idx)
    if not ious:
        return shapes.new_zeros(0), torch.zeros(0, dtype=torch.int64, device=shapes.device)
    return torch.cat(ious), torch.cat(idxs)


def _compress(shapes: Tensor) -> tuple[Tensor, Tensor]:
    """(points ``[M, 2]``, weights ``[M]`` float64): the shapes, or for more than
    :data:`_EXACT_MAX` of them the mean shape and count of each occupied cell of a grid of
    :data:`_LOG_CELL` in log width and log height (a 1.6% step in each side)."""
    n = shapes.shape[0]
    if n <= _EXACT_MAX:
        return shapes, torch.ones(n, dtype=torch.float64, device=shapes.device)
    cell = torch.floor(shapes.log() / _LOG_CELL).long()
    cell = cell - cell.min(dim=0).values
    key = cell[:, 0] * (int(cell[:, 1].max()) + 1) + cell[:, 1]
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.shape[0], 2, dtype=torch.float64, device=shapes.device)
    sums.index_add_(0, inverse, shapes.double())
    weights = counts.double()
    return (sums / weights[:, None]).to(shapes.dtype), weights


def _kmeanspp_init(points: Tensor, weights: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii, 2007) with the 1 - IoU distance: the first
    centre drawn in proportion to the weights, each next one in proportion to weight x the
    squared distance to the nearest centre chosen so far. Draws by inverse CDF (one uniform
    number from ``gen`` each, no limit on the number of points)."""
    weights_cpu = weights.cpu()

    def draw(w: Tensor) -> int:
        cdf = w.cumsum(0)
        u = torch.rand(1, generator=gen, dtype=torch.float64) * cdf[-1]
        return int(torch.searchsorted(cdf, u).clamp(max=w.shape[0] - 1))

    pick = draw(weights_cpu)
    centres = points[pick:pick + 1]
    dist = 1.0 - shape_iou(points, centres)[:, 0]
    for _ in range(1, k):
        w = weights_cpu * dist.double().clamp(min=0).square().cpu()
        if not float(w.sum()) > 0:
            distinct = torch.unique(points, dim=0).shape[0]
            raise ValueError(f"k-means: {distinct} distinct box shape(s), fewer than k={k} anchors")
        pick = draw(w)
        centres = torch.cat([centres, points[pick:pick + 1]])
        dist = torch.minimum(dist, 1.0 - shape_iou(points, points[pick:pick + 1])[:, 0])
    return centres


def _lloyd(points: Tensor, weights: Tensor, centres: Tensor, iterations: int) -> Tensor:
    """Weighted Lloyd iterations: each point joins the centre of highest shape IoU, each centre
    becomes the weighted mean (width, height) of its points; a centre left without points moves
    to the point worst fitted by the others. Stops when no point changes centre."""
    k = centres.shape[0]
    weighted = points.double() * weights[:, None]  # cluster sums in float64: no drift over millions of boxes
    assign = None
    for _ in range(iterations):
        best, new_assign = best_anchor_iou(points, centres)
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        mass = torch.zeros(k, dtype=torch.float64, device=points.device).index_add_(0, assign, weights)
        sums = torch.zeros(k, 2, dtype=torch.float64, device=points.device).index_add_(0, assign, weighted)
        empty = mass == 0
        centres = torch.where(empty[:, None], centres.double(), sums / mass.clamp(min=1e-300)[:, None])
        centres = centres.to(points.dtype)
        n_empty = int(empty.sum())
        if n_empty:
            centres[empty] = points[torch.topk(best, n_empty, largest=False).indices]
    return centres


def kmeans_anchors(shapes: Tensor, k: int, *, iterations: int = 300, seed: int = 0) -> Tensor:
    """``k`` anchor shapes from box shapes by k-means with the distance 1 - shape IoU.

    YOLOv2 paper, section 2 "Dimension clusters". Seeding is k-means++ (drawn from a
    ``torch.Generator`` seeded with ``seed``: the same inputs and seed give the same anchors);
    then Lloyd iterations: each box joins the anchor of highest shape IoU, each anchor becomes
    the mean width and height of its boxes (an anchor left without boxes moves to the box
    worst fitted by the others), until no box changes anchor or after ``iterations``.

    Speed (COCO train2017 has ~860k boxes): above 65,536 boxes the iterations run on a
    summary of the boxes, one point per occupied cell of a 1/64 grid in log width and log
    height (a 1.6% step in each side) at the mean shape of its boxes, weighted by their
    count. The anchors stay exact means of their boxes; only boxes of one cell always share
    an anchor (their shape IoUs with any anchor differ by a few percent at most).

    Args:
        shapes: ``Tensor[N, 2]`` (width, height) of the boxes, positive, N >= k; any one unit
            (pixels of the network input from :func:`box_shapes_from_coco`).
        k: number of anchors (YOLOv2: 5, YOLOv3: 9).
        iterations: the most Lloyd iterations.
        seed: seed of the k-means++ draws.

    Returns:
        ``Tensor[k, 2]`` float32 (width, height) in the units of ``shapes``, sorted by
        increasing area (YOLOv3's order: masks 0,1,2 are the smallest, for stride 8).

    Raises:
        ValueError: ``shapes`` not ``[N, 2]`` positive, k < 1, N < k, fewer distinct shapes
        than k, or iterations < 1.
    """
    shapes = _check_shapes(shapes)
    k, n = int(k), shapes.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if n < k:
        raise ValueError(f"k-means: {n} box shape(s), fewer than k={k} anchors")
    gen = torch.Generator().manual_seed(int(seed))
    points, weights = _compress(shapes)
    if points.shape[0] < k:  # fewer occupied cells than anchors: cluster the boxes themselves
        points, weights = shapes, torch.ones(n, dtype=torch.float64, device=shapes.device)
    centres = _lloyd(points, weights, _kmeanspp_init(points, weights, k, gen), int(iterations))
    area = centres[:, 0] * centres[:, 1]
    return centres[torch.argsort(area, stable=True)].float()


# --------------------------------------------------------------------------------------
# Fitness, units, the start-up check
# --------------------------------------------------------------------------------------


def anchor_fitness(shapes: Tensor, anchors: Tensor, *, threshold: float = BPR_IOU_THRESHOLD) -> AnchorFitness:
    """Mean best-anchor shape IoU and best possible recall of ``anchors`` on ``shapes``.

    Args:
        shapes: ``Tensor[N, 2]`` (width, height) of the boxes, N >= 1.
        anchors: ``Tensor[A, 2]`` (width, height), **the same units as** ``shapes``.
        threshold: a box is covered when its best-anchor shape IoU is ``>= threshold``
            (default :data:`BPR_IOU_THRESHOLD`, 0.25; see there for the rationale).

    Returns:
        :class:`AnchorFitness` ``(mean_iou, bpr)``, both in [0, 1].

    Raises:
        ValueError: empty or malformed shapes or anchors, threshold outside [0, 1].
    """
    shapes = _check_shapes(shapes)
    anchors = _check_shapes(anchors, "anchors")
    if shapes.shape[0] == 0 or anchors.shape[0] == 0:
        raise ValueError("anchor_fitness needs at least one box shape and one anchor")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    best, _ = best_anchor_iou(shapes, anchors)
    return AnchorFitness(mean_iou=float(best.double().mean()), bpr=float((best >= threshold).double().mean()))


def convert_units(anchors: Tensor | Sequence[Sequence[float]], *, to: str, stride: float = 32) -> Tensor:
    """Anchors between pixels of the network input (YOLOv3) and grid units (YOLOv2).

    A grid unit is one cell of an output of ``stride`` pixels per cell (YOLOv2: 32), so
    ``pixels = grid * stride``.

    Args:
        anchors: ``Tensor[A, 2]`` (or nested sequence) (width, height) in the other unit.
        to: ``"pixels"`` (the input is grid units) or ``"grid"`` (the input is pixels).
        stride: input pixels per grid cell, > 0.

    Returns:
        ``Tensor[A, 2]`` float32 in the unit ``to``.

    Raises:
        ValueError: unknown ``to``, or stride <= 0.
    """
    if not stride > 0:
        raise ValueError(f"stride must be > 0, got {stride}")
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    if to == "pixels":
        return anchors * float(stride)
    if to == "grid":
        return anchors / float(stride)
    raise ValueError(f"to must be 'pixels' or 'grid', got {to!r}")


def check_anchor_recall(shapes: Tensor, anchors_px: Tensor, *, warn_below: float = 0.9,
                        threshold: float = BPR_IOU_THRESHOLD, stride: float = 32) -> tuple[float, float, str]:
    """The start-up report of a YOLO run: how well the anchors fit the training boxes.

    Args:
        shapes: ``Tensor[N, 2]`` (width, height) of the training boxes, pixels of the network
            input (:func:`box_shapes_from_coco`).
        anchors_px: ``Tensor[A, 2]`` the anchors, pixels of the network input (YOLOv3 units).
        warn_below: the message is a warning when the best possible recall is below this.
        threshold: shape IoU of a covered box (:data:`BPR_IOU_THRESHOLD`).
        stride: pixels per grid unit, for the diagnosis of anchors in the wrong unit (YOLOv2: 32).

    Returns:
        ``(bpr, mean_iou, message)``: a one-line report; below ``warn_below`` it starts with
        ``WARNING`` and names the likely cause: anchors in grid units where pixels are
        expected (they fit once multiplied by ``stride``), anchors converted to pixels twice
        (they fit once divided by it), or else anchors that do not suit this dataset.
    """
    fit = anchor_fitness(shapes, anchors_px, threshold=threshold)
    anchors_px = _check_shapes(anchors_px, "anchors")
    report = (f"anchors: best possible recall {fit.bpr:.4f} (share of {shapes.shape[0]} boxes whose best of "
              f"{anchors_px.shape[0]} anchors has shape IoU >= {threshold:g}), mean best IoU {fit.mean_iou:.4f}")
    if fit.bpr >= warn_below:
        return fit.bpr, fit.mean_iou, report
    up = anchor_fitness(shapes, anchors_px * stride, threshold=threshold)
    down = anchor_fitness(shapes, anchors_px / stride, threshold=threshold)
    if up.bpr > fit.bpr and up.mean_iou > max(fit.mean_iou, down.mean_iou):
        cause = (f"the anchors look like grid units (YOLOv2 style, pixels / {stride:g}) where pixels of the network "
                 f"input are expected (YOLOv3): x{stride:g} they reach BPR {up.bpr:.4f}, mean IoU {up.mean_iou:.4f}")
    elif down.bpr > fit.bpr and down.mean_iou > fit.mean_iou:
        cause = (f"the anchors look {stride:g}x too large (converted from grid units to pixels twice?): "
                 f"/{stride:g} they reach BPR {down.bpr:.4f}, mean IoU {down.mean_iou:.4f}")
    else:
        cause = ("the anchors do not suit these boxes (another dataset or input size?); compute anchors for them "
                 "with `python -m single_stage_detector kmeans-anchors ANNOTATIONS --num N --input-size S`")
    message = f"WARNING: {report}, below {warn_below:g}: {cause}"
    return fit.bpr, fit.mean_iou, message


def round_anchors(anchors: Tensor, units: str) -> Tensor:
    """``Tensor[A, 2]`` rounded as darknet cfg files write anchors: whole pixels (at least 1) for
    ``units`` "pixels" (YOLOv3), 4 decimals of a grid cell (at least 0.0001) for "grid" (YOLOv2)."""
    if units == "pixels":
        return anchors.round().clamp(min=1.0)
    return (anchors * 1e4).round().clamp(min=1.0) / 1e4


def format_anchors(anchors: Tensor, units: str) -> str:
    """``"w,h,  w,h, ..."`` the darknet cfg ``anchors=`` form (integers for pixels, 4 decimals
    for grid units, trailing zeros dropped)."""
    def num(v: float) -> str:
        if units == "pixels":
            return str(int(round(v)))
        text = f"{v:.4f}".rstrip("0").rstrip(".")
        return text if text else "0"

    return ",  ".join(f"{num(w)},{num(h)}" for w, h in anchors.tolist())

