"""COCO box evaluation with pycocotools, and gathering detections across ranks."""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "COCO_STAT_NAMES",
    "EvalResult",
    "to_coco_results",
    "CocoEvaluator",
    "gather_results",
]

# The 12 numbers of COCOeval.summarize() for bbox, in order.
COCO_STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)


@dataclass
class EvalResult:
    """Outcome of one evaluation: ``ap`` is COCO AP@[.5:.95] (the MLPerf ``eval_accuracy``)."""

    ap: float
    stats: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    num_detections: int = 0
    seconds: float = 0.0
    summary: str = ""


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


def gather_results(results: list[dict], image_ids: list[int]) -> tuple[list[dict], list[int], list[int]] | None:
    """Gather detections and evaluated image ids on rank 0 (None on other ranks).

    Returns ``(results, image_ids, images_per_rank)``: duplicates (images seen by two
    ranks, e.g. from a padded last batch) are dropped, so every image counts exactly once
    whatever the number of ranks; ``images_per_rank`` counts what each rank inferred.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        parts = [(results, image_ids)]
    else:
        gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((results, image_ids), gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        parts = gathered  # type: ignore[assignment]
    return (*_dedupe(parts), [len(ids) for _, ids in parts])


def _dedupe(parts: list[tuple[list[dict], list[int]]]) -> tuple[list[dict], list[int]]:
    seen: set[int] = set()
    out_results: list[dict] = []
    out_ids: list[int] = []
    for results, ids in parts:
        new_ids = [i for i in ids if i not in seen]
        new_set = set(new_ids)
        seen.update(new_set)
        out_ids.extend(new_ids)
        out_results.extend(r for r in results if r["image_id"] in new_set)
    return out_results, out_ids


class CocoEvaluator:
    """Runs ``pycocotools`` COCOeval (bbox) on a ground-truth annotation file."""

    def __init__(self, annotation_file: str | Path) -> None:
        from pycocotools.coco import COCO

        self.annotation_file = str(annotation_file)
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco_gt = COCO(self.annotation_file)

    def evaluate(self, results: list[dict], image_ids: Sequence[int] | None = None) -> EvalResult:
        """Evaluate COCO result dicts over ``image_ids`` (default: every image in the file)."""
        from pycocotools.cocoeval import COCOeval

        start = time.perf_counter()
        ids = sorted(set(image_ids)) if image_ids is not None else sorted(self.coco_gt.getImgIds())
        if not results:
            # loadRes rejects an empty list; no detection means AP 0 by definition.
            stats = {name: 0.0 for name in COCO_STAT_NAMES}
            return EvalResult(ap=0.0, stats=stats, num_images=len(ids), num_detections=0,
                              seconds=time.perf_counter() - start, summary="no detections")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            coco_dt = self.coco_gt.loadRes(results)
            ev = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = {name: float(v) for name, v in zip(COCO_STAT_NAMES, np.asarray(ev.stats).tolist())}
        return EvalResult(ap=stats["AP"], stats=stats, num_images=len(ids), num_detections=len(results),
                          seconds=time.perf_counter() - start, summary=buf.getvalue())
