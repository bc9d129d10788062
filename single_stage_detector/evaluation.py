"""COCO box evaluation (pycocotools or faster-coco-eval), and gathering detections across ranks.

Two scorers give the same 13 numbers (exactly equal on the test suite's datasets): pycocotools,
the reference, and faster-coco-eval, whose C++ matching and accumulation are several times
faster on a full val set (:data:`COCO_EVAL_BACKENDS`, :class:`CocoEvaluator`).

The scorer is given a ground truth normalised in memory (:func:`load_ground_truth`), not
the raw file, so that every annotation file the reader accepts can be evaluated: many
converters write files without ``iscrowd`` or ``area``, on which pycocotools fails with a
``KeyError`` at the first evaluation, hours into a run.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .data.coco import COCO_CATEGORIES, DatasetError

__all__ = [
    "COCO_STAT_NAMES",
    "VOC_STAT_NAME",
    "voc_map50",
    "EvalResult",
    "to_coco_results",
    "to_coco_array",
    "CocoEvaluator",
    "UndefinedAPError",
    "gather_results",
    "load_ground_truth",
    "COCO_EVAL_BACKENDS",
    "resolve_coco_eval_backend",
]

# ``--coco-eval`` choices: "auto" is faster-coco-eval when it is importable, else pycocotools.
COCO_EVAL_BACKENDS = ("auto", "pycocotools", "faster-coco-eval")

# The 12 numbers of COCOeval.summarize() for bbox, in order.
COCO_STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)
# Reported beside them (``EvalResult.stats``): the PASCAL VOC metric, see :func:`voc_map50`.
VOC_STAT_NAME = "VOC_mAP50"


def voc_map50(evaluated) -> float:
    """PASCAL VOC-style mAP@0.5 from a pycocotools ``COCOeval`` after ``evaluate()``.

    The matches are COCOeval's at IoU 0.5 (greedy by score, each ground truth once, area
    "all", at most ``maxDets[-1]`` detections per image and class); a detection matched to a
    crowd box is ignored, as VOC ignores "difficult" objects. Per class, the precision-recall
    curve is interpolated at every recall point (VOC2010 onwards: the area under the
    monotone precision envelope, ``VOCdevkit`` ``VOCevaldet``), not COCO's 101 points; the
    mean is over the classes with at least one non-crowd ground truth (0.0 if none).
    :func:`_voc_map50_from_matches` computes the same number from faster-coco-eval's matches.
    """
    params = evaluated.params
    t50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    max_det = params.maxDets[-1]
    n_images, n_areas = len(params.imgIds), len(params.areaRng)
    aps = []
    for k in range(len(params.catIds)):
        # evalImgs is ordered category, area range, image; area range 0 is "all".
        entries = [e for e in evaluated.evalImgs[k * n_areas * n_images:k * n_areas * n_images + n_images]
                   if e is not None]
        npos = sum(int(np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)) for e in entries)
        if npos == 0:
            continue
        scores = np.concatenate([np.asarray(e["dtScores"][:max_det]) for e in entries] or [np.zeros(0)])
        matched = np.concatenate([np.asarray(e["dtMatches"])[t50, :max_det] for e in entries] or [np.zeros(0)])
        ignored = np.concatenate([np.asarray(e["dtIgnore"])[t50, :max_det] for e in entries] or [np.zeros(0)])
        order = np.argsort(-scores, kind="mergesort")
        aps.append(_voc_ap(matched[order] > 0, ignored[order].astype(bool), npos))
    return float(np.mean(aps)) if aps else 0.0


def _voc_ap(matched: np.ndarray, ignored: np.ndarray, npos: int) -> float:
    """All-point interpolated AP of one class: ``matched``/``ignored`` (bool[D]) per detection in
    descending score order, ``npos`` (> 0) the non-ignored ground truths."""
    tp = np.cumsum(matched & ~ignored)
    fp = np.cumsum(~matched & ~ignored)
    recall = np.concatenate([[0.0], tp / npos, [1.0]])
    precision = np.concatenate([[0.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the monotone envelope
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _ranked_detections(coco_dt, image_ids: Sequence[int], cat_ids: Sequence[int], max_det: int) -> dict:
    """The detections COCOeval scores, in its order, as arrays (``id``, ``image``, ``category``,
    ``score``, ``area``, ``rank``: the position in its image's list for its class).

    As pycocotools: per image and class the ``max_det`` best (stable sort on descending score,
    ties in id order); per class those of every image in image order, stable-sorted again by
    descending score. Returned sorted by class, then that order (descending score, image, id).
    """
    wanted_images = np.asarray(sorted(set(image_ids)), dtype=np.int64)
    dts = list(coco_dt.anns.values())
    cols = {"id": np.fromiter((d["id"] for d in dts), np.int64, len(dts)),
            "image": np.fromiter((d["image_id"] for d in dts), np.int64, len(dts)),
            "category": np.fromiter((d["category_id"] for d in dts), np.int64, len(dts)),
            "score": np.fromiter((d["score"] for d in dts), np.float64, len(dts)),
            "area": np.fromiter((d["area"] for d in dts), np.float64, len(dts))}
    keep = np.isin(cols["image"], wanted_images) & np.isin(cols["category"], np.asarray(list(cat_ids), np.int64))
    order = np.lexsort((cols["id"][keep], -cols["score"][keep], cols["category"][keep], cols["image"][keep]))
    cols = {k: v[keep][order] for k, v in cols.items()}
    n = len(order)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (cols["image"][1:] != cols["image"][:-1]) | (cols["category"][1:] != cols["category"][:-1])
    starts = np.flatnonzero(new_group)
    cols["rank"] = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    top = cols["rank"] < max_det
    cols = {k: v[top] for k, v in cols.items()}
    order = np.lexsort((cols["id"], cols["image"], -cols["score"], cols["category"]))
    return {k: v[order] for k, v in cols.items()}


def _ground_truth_arrays(coco_gt) -> dict:
    anns = list(coco_gt.anns.values())
    return {"id": np.fromiter((a["id"] for a in anns), np.int64, len(anns)),
            "image": np.fromiter((a["image_id"] for a in anns), np.int64, len(anns)),
            "category": np.fromiter((a["category_id"] for a in anns), np.int64, len(anns)),
            "area": np.fromiter((a["area"] for a in anns), np.float64, len(anns)),
            "crowd": np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, len(anns))}


def _voc_map50_from_matches(coco_gt, image_ids: Sequence[int], cat_ids: Sequence[int], dets: dict,
                            matches: dict, area_range: Sequence[float]) -> float:
    """:func:`voc_map50` from faster-coco-eval, which keeps no per-image ``evalImgs``.

    ``dets``: :func:`_ranked_detections` with ``maxDets[-1]``; ``matches``: ``eval["matched"]``
    ("dtId_gtId" -> IoU) of a faster-coco-eval run with the single IoU threshold 0.5, the single
    area range ``area_range`` ("all") and that ``maxDets``: then it holds exactly pycocotools'
    IoU-0.5 matches, crowd boxes included. As pycocotools, a detection matched to an ignored
    ground truth (crowd, or area outside ``area_range``), or unmatched with its area outside
    it, is ignored.
    """
    lo, hi = float(area_range[0]), float(area_range[1])
    gt = _ground_truth_arrays(coco_gt)
    g_ignored = gt["crowd"] | (gt["area"] < lo) | (gt["area"] > hi)
    g_counted = ~g_ignored & np.isin(gt["image"], np.asarray(sorted(set(image_ids)), dtype=np.int64))
    ignored_gt = set(gt["id"][g_ignored].tolist())

    matched_gt = {int(k.split("_", 1)[0]): int(k.split("_", 1)[1]) for k in matches}
    gt_of = np.fromiter((matched_gt.get(i, 0) for i in dets["id"].tolist()), np.int64, len(dets["id"]))
    matched = gt_of > 0
    on_ignored_gt = np.fromiter((g in ignored_gt for g in gt_of.tolist()), bool, len(gt_of))
    ignored = np.where(matched, on_ignored_gt, (dets["area"] < lo) | (dets["area"] > hi))
    aps = []
    for cat in sorted(cat_ids):
        npos = int(np.count_nonzero(g_counted & (gt["category"] == cat)))
        if npos == 0:
            continue
        a, b = np.searchsorted(dets["category"], cat, "left"), np.searchsorted(dets["category"], cat, "right")
        aps.append(_voc_ap(matched[a:b], ignored[a:b], npos))
    return float(np.mean(aps)) if aps else 0.0


def _match_precision_of_first_detection(ev, coco_gt, coco_dt, dets: dict) -> None:
    """Make faster-coco-eval's ``eval["precision"]`` pycocotools' to the last bit (in place).

    pycocotools' precision after its first true positive is ``1 / (1 + eps)`` (its
    ``tp / (fp + tp + np.spacing(1))``), faster-coco-eval's 1.0; after two true positives both
    give 1.0. So the two differ exactly where a class's first non-ignored detection is a true
    positive and the second is not (or absent): pycocotools' precision is then ``1 / (1 + eps)``
    wherever faster-coco-eval's is 1.0. That needs the first two non-ignored detections of each
    class, area range, IoU threshold and ``maxDets``; pycocotools' own per-image matching is run
    on the images they are in, walking each class's detections in COCOeval's order.
    """
    from pycocotools.cocoeval import COCOeval

    p = ev.params
    precision = ev.eval["precision"]  # [T, R, K, A, M]
    candidate = precision[:, 0] == 1.0  # [T, K, A, M]: the first non-ignored detection is a true positive
    if not candidate.any():
        return
    with contextlib.redirect_stdout(io.StringIO()):
        ref = COCOeval(coco_gt, coco_dt, iouType="bbox")
    ref.params.iouThrs, ref.params.areaRng, ref.params.maxDets = p.iouThrs, p.areaRng, p.maxDets
    ref.params.catIds = list(p.catIds)
    area_lo = np.asarray([a[0] for a in p.areaRng], dtype=np.float64)
    area_hi = np.asarray([a[1] for a in p.areaRng], dtype=np.float64)
    max_dets = np.asarray(p.maxDets)
    n_t, n_a = len(p.iouThrs), len(p.areaRng)
    one_tp = np.float64(1.0) / (np.float64(0.0) + np.float64(1.0) + np.spacing(1))
    for k, cat in enumerate(p.catIds):
        need = candidate[:, k]  # [T, A, M]
        if not need.any():
            continue
        a, b = np.searchsorted(dets["category"], cat, "left"), np.searchsorted(dets["category"], cat, "right")
        found = np.zeros((2,) + need.shape, dtype=np.int8)  # per slot: 0 none, 1 true positive, 2 false positive
        count = np.zeros(need.shape, dtype=np.int64)
        evaluated: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i in range(a, b):
            img, rank, area = int(dets["image"][i]), int(dets["rank"][i]), float(dets["area"][i])
            if img not in evaluated:
                evaluated[img] = _pycocotools_image(ref, coco_gt, coco_dt, img, cat)
            matches, ignores = evaluated[img]  # [A, T, D] or None: no ground truth of the class here
            if matches is None:
                is_tp = np.zeros((n_a, n_t), dtype=bool)
                is_ignored = np.repeat(((area < area_lo) | (area > area_hi))[:, None], n_t, axis=1)
            else:
                is_tp, is_ignored = matches[:, :, rank] > 0, ignores[:, :, rank]
            counts = (~is_ignored).T[:, :, None] & (rank < max_dets)[None, None, :] & (count < 2)  # [T, A, M]
            if counts.any():
                kind = np.where(is_tp.T, 1, 2)[:, :, None].repeat(len(max_dets), axis=2)
                for slot in (0, 1):
                    here = counts & (count == slot)
                    found[slot][here] = kind[here]
                count += counts
                if np.all(count[need] >= 2):
                    break
        first_tp = found[0] == 1
        if not np.array_equal(first_tp & need, need):
            raise _BackendsDisagree(f"category {cat}: faster-coco-eval's first match is not pycocotools'")
        for t, ai, m in zip(*np.nonzero(need & (found[1] != 1))):
            row = precision[t, :, k, ai, m]
            row[row == 1.0] = one_tp


class _BackendsDisagree(RuntimeError):
    """faster-coco-eval's matches are not pycocotools' (never seen on the tests): score with pycocotools."""


def _pycocotools_image(ref, coco_gt, coco_dt, img: int, cat: int):
    """pycocotools' evaluateImg of one image and class for every area range: (dtMatches,
    dtIgnore) as arrays [A, T, D], or (None, None) when the image has no ground truth of it."""
    gts = [g for g in coco_gt.imgToAnns.get(img, ()) if g["category_id"] == cat]
    if not gts:
        return None, None
    for g in gts:  # as COCOeval._prepare does for boxes
        g["ignore"] = int(bool(g.get("iscrowd", 0)))
    ref._gts = {(img, cat): gts}
    ref._dts = {(img, cat): [d for d in coco_dt.imgToAnns.get(img, ()) if d["category_id"] == cat]}
    ref.ious = {(img, cat): ref.computeIoU(img, cat)}
    entries = [ref.evaluateImg(img, cat, a, ref.params.maxDets[-1]) for a in ref.params.areaRng]
    return (np.stack([np.asarray(e["dtMatches"]) for e in entries]),
            np.stack([np.asarray(e["dtIgnore"], dtype=bool) for e in entries]))


@dataclass
class EvalResult:
    """Outcome of one evaluation: ``ap`` is COCO AP@[.5:.95] (the MLPerf ``eval_accuracy``)."""

    ap: float
    stats: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0
    seconds: float = 0.0
    summary: str = ""
    policy: dict | None = None  # the detector's post-processing settings (``eval_policy``), when known
    backend: str = ""  # the scorer: "pycocotools" or "faster-coco-eval" (or why pycocotools replaced it)


def to_coco_results(
    detections: Sequence[dict[str, Tensor]],
    image_ids: Iterable[int],
    orig_sizes: Tensor,
    label_to_category: Tensor,
) -> list[dict]:
    """Convert per-image detections to COCO result dicts.

    Args:
        detections: per image ``boxes`` (Tensor[K, 4] xyxy normalised), ``scores``, ``labels`` (1..80).
        image_ids: COCO image id of each image.
        orig_sizes (Tensor[B, 2]): original (height, width), to rescale the boxes to pixels.
        label_to_category (Tensor[81]): contiguous label -> original COCO category id.
    """
    results: list[dict] = []
    lut = label_to_category.cpu()
    for det, image_id, (h, w) in zip(detections, image_ids, orig_sizes.tolist()):
        boxes = det["boxes"].float().cpu()
        if boxes.numel() == 0:
            continue
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        xyxy = boxes * scale
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
        cats = lut[det["labels"].cpu().long()].tolist()
        scores = det["scores"].float().cpu().tolist()
        for box, cat, score in zip(xywh.tolist(), cats, scores):
            results.append({"image_id": int(image_id), "category_id": int(cat),
                            "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
    return results


def to_coco_array(
    detections: Sequence[dict[str, Tensor]],
    image_ids: Sequence[int],
    orig_sizes: Tensor,
    label_to_category: Tensor,
) -> np.ndarray:
    """Per-image detections as one ``float64[K, 7]`` array of COCO results, the MLPerf reference's
    layout for ``COCO.loadRes``: rows ``(image_id, x, y, w, h, score, category_id)``, boxes in
    pixels of the original image.

    As the reference's ``coco_eval``: x = x1 * W, y = y1 * H, w = (x2 - x1) * W, h = (y2 - y1) * H
    in float32, scores as float32, no rounding. One vectorised pass per batch (no per-detection
    Python), and one array to gather across ranks instead of K dicts.

    Args:
        detections: per image ``boxes`` (Tensor[K_i, 4] xyxy normalised), ``scores`` (Tensor[K_i]),
            ``labels`` (Tensor[K_i], contiguous 1..80).
        image_ids: COCO image id of each image.
        orig_sizes (Tensor[B, 2]): original (height, width) in pixels.
        label_to_category (Tensor[81]): contiguous label -> original COCO category id.
    """
    counts = np.array([int(d["boxes"].shape[0]) for d in detections], dtype=np.int64)
    if counts.sum() == 0:
        return np.zeros((0, 7), dtype=np.float64)
    boxes = torch.cat([d["boxes"].detach().float() for d in detections]).cpu().numpy()
    scores = torch.cat([d["scores"].detach().float() for d in detections]).cpu().numpy()
    labels = torch.cat([d["labels"].detach().long() for d in detections]).cpu().numpy()
    hw = np.repeat(orig_sizes.cpu().numpy().astype(np.float32), counts, axis=0)  # [K, 2] (H, W)
    h, w = hw[:, 0], hw[:, 1]
    out = np.empty((len(boxes), 7), dtype=np.float64)
    out[:, 0] = np.repeat(np.asarray(list(image_ids), dtype=np.float64), counts)
    out[:, 1] = boxes[:, 0] * w
    out[:, 2] = boxes[:, 1] * h
    out[:, 3] = (boxes[:, 2] - boxes[:, 0]) * w
    out[:, 4] = (boxes[:, 3] - boxes[:, 1]) * h
    out[:, 5] = scores
    out[:, 6] = label_to_category.cpu().numpy()[labels]
    return out


def gather_results(results: "np.ndarray | list[dict]", image_ids: list[int], extra: object = None
                   ) -> tuple["np.ndarray | list[dict]", list[int], list[int], list] | None:
    """Gather detections and evaluated image ids on rank 0 (None on other ranks).

    ``results``: this rank's :func:`to_coco_array` rows (or COCO result dicts). ``extra``: any
    picklable per-rank summary that travels in the same collective (the val-loss sums).
    Returns ``(results, image_ids, images_per_rank, extras)``: duplicates (images seen by two
    ranks, e.g. from a padded last batch) are dropped, so every image counts exactly once
    whatever the number of ranks; ``images_per_rank`` counts what each rank inferred and
    ``extras`` holds each rank's ``extra``, in rank order.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        parts = [(results, image_ids, extra)]
    else:
        gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((results, image_ids, extra), gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        parts = gathered  # type: ignore[assignment]
    return (*_dedupe([(r, ids) for r, ids, _ in parts]), [len(ids) for _, ids, _ in parts],
            [x for _, _, x in parts])


def _dedupe(parts: list[tuple["np.ndarray | list[dict]", list[int]]]) -> tuple["np.ndarray | list[dict]", list[int]]:
    seen: set[int] = set()
    arrays: list[np.ndarray] = []
    out_results: list[dict] = []
    out_ids: list[int] = []
    for results, ids in parts:
        new_ids = [i for i in ids if i not in seen]
        new_set = set(new_ids)
        seen.update(new_set)
        out_ids.extend(new_ids)
        if isinstance(results, np.ndarray):
            arrays.append(results[np.isin(results[:, 0], np.asarray(new_ids, dtype=np.float64))])
        else:
            out_results.extend(r for r in results if r["image_id"] in new_set)
    if arrays:
        return np.concatenate(arrays), out_ids
    return out_results, out_ids


class UndefinedAPError(DatasetError):
    """COCO AP cannot be computed: the evaluated images have no (non-crowd) ground truth.

    pycocotools would report its "no ground truth" sentinel -1, which must never be logged
    as an ``eval_accuracy``. The message names the annotation file.
    """


def _as_int(value, what: str) -> int:
    # As the reader's numpy int64 conversion: ints, floats (truncated), numeric strings.
    if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
        try:
            return int(value)
        except (ValueError, OverflowError):
            pass
    raise ValueError(f"{what} {value!r} is not an integer")


def _as_number(value, what: str) -> float:
    if isinstance(value, (bool, int, float, np.integer, np.floating)) and math.isfinite(float(value)):
        return float(value)
    raise ValueError(f"{what} {value!r} is not a finite number")


def load_ground_truth(annotation_file: str | Path) -> dict:
    """The COCO ``dataset`` dict pycocotools needs for bbox evaluation, from ``annotation_file``.

    Normalised so that every file the reader (:class:`~single_stage_detector.data.coco.CocoDetection`)
    accepts evaluates:

    * image and category ids become ints (as the reader makes them, so that detections,
      which carry the reader's ids, match);
    * annotations get ``iscrowd`` 0 when absent (a bool becomes 0/1) and ``area`` = box
      ``w * h`` when absent (the file's own value, a mask area in COCO, is kept otherwise);
    * annotation ids are renumbered 1..N: pycocotools keys its index by them (duplicates
      would silently drop boxes) and treats a match with ground-truth id 0 as no match;
    * ``categories`` is the 80 COCO categories plus any other id used, so no ground truth
      is skipped because the file's list is short (categories without ground truth do not
      enter the mean AP);
    * segmentations are left out (bbox evaluation does not read them).

    Raises:
        DatasetError: the file is missing or not JSON, or an entry lacks a key the reader
            also requires or holds a non-numeric value; the message names the file and entry.
    """
    from .data.coco import _load_json

    path = Path(annotation_file)
    data = _load_json(path)
    images: list[dict] = []
    for i, im in enumerate(data["images"]):
        try:
            entry = {"id": _as_int(im["id"], "id"), "height": _as_int(im["height"], "height"),
                     "width": _as_int(im["width"], "width")}
            if "file_name" in im:
                entry["file_name"] = str(im["file_name"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: image entry #{i} (id {_get(im, 'id')}): {_why(e)}") from None
        images.append(entry)
    annotations: list[dict] = []
    for i, a in enumerate(data["annotations"]):
        try:
            bbox = a["bbox"]
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ValueError(f"bbox {bbox!r} is not [x, y, w, h]")
            bbox = [_as_number(v, "bbox value") for v in bbox]
            area = a.get("area")
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": _as_int(a["image_id"], "image_id"),
                "category_id": _as_int(a["category_id"], "category_id"),
                "bbox": bbox,
                "area": bbox[2] * bbox[3] if area is None else _as_number(area, "area"),
                "iscrowd": int(bool(a.get("iscrowd", 0))),
            })
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{path}: annotation entry #{i} (id {_get(a, 'id')}): {_why(e)}") from None
    names = {c["id"]: c["name"] for c in COCO_CATEGORIES}
    for c in data["categories"]:
        try:
            names.setdefault(_as_int(c["id"], "id"), str(c.get("name", c["id"])))
        except (KeyError, TypeError, ValueError, AttributeError):
            continue  # the categories list is not used by the reader either
    for a in annotations:
        names.setdefault(a["category_id"], str(a["category_id"]))
    categories = [{"id": k, "name": names[k]} for k in sorted(names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _get(entry, key):
    return entry.get(key, "?") if isinstance(entry, dict) else "?"


def _why(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"misses key {e.args[0]!r}"
    if isinstance(e, TypeError):
        return "is not a JSON object with the expected keys"
    return str(e)


@contextlib.contextmanager
def _cyclic_gc_paused():
    # loadRes makes one dict per detection (500,000 on a full val set); the cyclic collector would
    # scan them again and again while they are made (a third of loadRes' time), and they hold no cycles.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def resolve_coco_eval_backend(backend: str = "auto") -> str:
    """The scorer ``backend`` names: "pycocotools" or "faster-coco-eval" ("auto": faster-coco-eval
    when it is importable, else pycocotools).

    Raises:
        ValueError: ``backend`` is not one of :data:`COCO_EVAL_BACKENDS`.
        ImportError: "faster-coco-eval" was asked for and is not installed.
    """
    if backend not in COCO_EVAL_BACKENDS:
        raise ValueError(f"COCO eval backend: expected {'|'.join(COCO_EVAL_BACKENDS)}, got {backend!r}")
    if backend == "pycocotools":
        return backend
    try:
        importlib.import_module("faster_coco_eval")
    except ImportError:
        if backend == "faster-coco-eval":
            raise ImportError("--coco-eval faster-coco-eval: the faster-coco-eval package is not installed "
                              "(pip install faster-coco-eval, or choose pycocotools)") from None
        return "pycocotools"
    return "faster-coco-eval"


class CocoEvaluator:
    """COCO box evaluation (COCOeval, bbox) of detections against an annotation file.

    The ground truth is :func:`load_ground_truth` of the file (normalised in memory). The
    scorer is pycocotools or faster-coco-eval (``backend``, see
    :func:`resolve_coco_eval_backend`); both give the same :class:`EvalResult`.

    Attributes:
        annotation_file (str): the file, for messages.
        backend (str): the resolved scorer, "pycocotools" or "faster-coco-eval".
        coco_gt: the scorer's ``COCO`` index of the ground truth.
        num_annotations (int): non-crowd ground-truth boxes in the file (what AP is computed on).

    Raises (constructor): as :func:`load_ground_truth` and :func:`resolve_coco_eval_backend`.
    """

    def __init__(self, annotation_file: str | Path, backend: str = "auto") -> None:
        self.backend = resolve_coco_eval_backend(backend)
        if self.backend == "faster-coco-eval":
            from faster_coco_eval import COCO
        else:
            from pycocotools.coco import COCO

        self.annotation_file = str(annotation_file)
        dataset = load_ground_truth(annotation_file)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco_gt = COCO()
            self.coco_gt.dataset = dataset
            self.coco_gt.createIndex()
        self.num_annotations = sum(1 for a in dataset["annotations"] if not a["iscrowd"])

    def _count_ground_truth(self, ids: Sequence[int]) -> int:
        return sum(1 for i in ids for a in self.coco_gt.imgToAnns.get(i, ()) if not a["iscrowd"])

    def evaluate(self, results: "np.ndarray | list[dict]", image_ids: Sequence[int] | None = None) -> EvalResult:
        """Evaluate COCO results over ``image_ids`` (default: every image in the file): a
        :func:`to_coco_array` array ``float64[K, 7]`` or a list of COCO result dicts.

        Returns the 12 COCOeval numbers and ``VOC_mAP50`` in ``stats``, ``ap`` = AP@[.5:.95];
        ``backend`` names the scorer, ``seconds`` the wall time.

        Raises:
            UndefinedAPError: none of the evaluated images has a non-crowd ground-truth box
                (COCOeval would give AP -1).
        """
        start = time.perf_counter()
        ids = sorted(set(image_ids)) if image_ids is not None else sorted(self.coco_gt.getImgIds())
        if self._count_ground_truth(ids) == 0:
            raise UndefinedAPError(f"val annotation file {self.annotation_file} has no annotations for the "
                                   f"{len(ids)} evaluated image(s): AP is undefined")
        if len(results) == 0:
            # loadRes rejects an empty list; no detection means AP 0 by definition.
            stats = {name: 0.0 for name in (*COCO_STAT_NAMES, VOC_STAT_NAME)}
            return EvalResult(ap=0.0, stats=stats, num_images=len(ids), num_detections=0,
                              seconds=time.perf_counter() - start, summary="no detections", backend=self.backend)
        backend = self.backend
        with _cyclic_gc_paused():
            if backend == "faster-coco-eval":
                try:
                    stats, summary = self._score_faster(results, ids)
                except _BackendsDisagree as e:  # the reference's numbers rather than others
                    backend = f"pycocotools (faster-coco-eval disagreed: {e})"
                    stats, summary = self._score_pycocotools(results, ids, self._pycocotools_index())
            else:
                stats, summary = self._score_pycocotools(results, ids, self.coco_gt)
        if not stats["AP"] >= 0.0:  # -1 (no ground truth) or NaN: never an accuracy
            raise UndefinedAPError(f"COCO AP is undefined ({stats['AP']}) on {len(ids)} image(s) of "
                                   f"{self.annotation_file}")
        return EvalResult(ap=stats["AP"], stats=stats, num_images=len(ids), num_detections=len(results),
                          seconds=time.perf_counter() - start, summary=summary, backend=backend)

    def _pycocotools_index(self):
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            index = COCO()
            index.dataset = self.coco_gt.dataset
            index.createIndex()
        return index

    @staticmethod
    def _score_pycocotools(results, ids: list[int], coco_gt) -> tuple[dict[str, float], str]:
        from pycocotools.cocoeval import COCOeval

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = coco_gt.loadRes(results)
            ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = {name: float(v) for name, v in zip(COCO_STAT_NAMES, np.asarray(ev.stats).tolist())}
        stats[VOC_STAT_NAME] = voc_map50(ev)
        return stats, buf.getvalue()

    def _score_faster(self, results, ids: list[int]) -> tuple[dict[str, float], str]:
        from faster_coco_eval import COCOeval_faster

        lines: list[str] = []
        quiet = lambda *args, **kwargs: None  # noqa: E731 (its progress lines; the summary is kept)
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = self.coco_gt.loadRes(results)
            ev = COCOeval_faster(self.coco_gt, coco_dt, iouType="bbox", print_function=quiet)
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            # faster-coco-eval keeps no per-image matches at one IoU and area range (pycocotools'
            # evalImgs); a second run with only IoU 0.5 and area "all" gives exactly those.
            area_all, max_det = ev.params.areaRng[0], ev.params.maxDets[-1]
            ev50 = COCOeval_faster(self.coco_gt, coco_dt, iouType="bbox", print_function=quiet)
            ev50.params.imgIds = ids
            ev50.params.iouThrs = np.array([0.5])
            ev50.params.areaRng, ev50.params.areaRngLbl = [list(area_all)], ["all"]
            ev50.params.maxDets = [max_det]
            # The same boxes, classes and maxDets[-1]: the first run's IoU matrices serve.
            ev50.computeIoU = lambda image_id, cat_id: ev.ious[image_id, cat_id]
            ev50.evaluate()
            ev50.accumulate()
        dets = _ranked_detections(coco_dt, ids, ev.params.catIds, max_det)
        _match_precision_of_first_detection(ev, self.coco_gt, coco_dt, dets)
        ev.print_function = lambda line, *args, **kwargs: lines.append(str(line))
        ev.summarize()
        stats = {name: float(v) for name, v in zip(COCO_STAT_NAMES, np.asarray(ev.stats)[:12].tolist())}
        stats[VOC_STAT_NAME] = _voc_map50_from_matches(self.coco_gt, ids, ev.params.catIds, dets,
                                                       ev50.eval["matched"], area_all)
        return stats, "\n".join(lines) + "\n"
