"""Detections from raw SSD outputs: decode, softmax, per-class NMS, top-k per image.

The order of operations is the MLPerf reference's (``decode_batch`` / ``decode_single`` of
mlcommons/training ``single_stage_detector/ssd/utils.py``): softmax over the classes, decode
with the variances, then per image and class (no background) the scores above the threshold,
the best ``max_per_class`` of them, greedy NMS, and finally the best ``max_detections`` of the
image. The reference never clips boxes to the image; ``clip_boxes=True`` clips the output
*after* NMS (as NVIDIA's v1.1 submission does), so NMS always sees the decoded boxes.

NMS runs on the exact float32 coordinates of each box: no per-class coordinate offsets
(torchvision's ``batched_nms`` shifts every class by about ``class id x (max coordinate + 1)``,
which with thousands of (image, class) groups rounds coordinates to ~1e-3 and flips
keep/suppress decisions of small boxes).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .box_coder import BoxCoder

__all__ = ["postprocess", "grouped_nms"]

# Groups of one size class are padded to a common size K and their K x K IoUs computed at
# once; a chunk holds at most this many IoUs (2 MB per temporary: stays in cache, and bounds
# the memory of pathological outputs).
_MAX_IOUS_PER_CHUNK = 1 << 19
# Size classes of groups: a group of n boxes is padded to the largest group of its class
# (the first of these >= n): at most 4x the IoUs it needs, in a handful of classes.
_PAD_SIZES = tuple(2 ** k for k in range(2, 31))
# score_c > t implies logit_c - logit_0 > log t exactly; the margin covers the rounding of the
# softmax and of the comparison (~1e-6 relative), far below it.
_LOG_MARGIN = 0.05


def _pairwise_iou(bx: Tensor, area: Tensor) -> Tensor:
    """IoU of every pair of boxes within each padded group: ``[4, G, K]`` (x1, y1, x2, y2) -> ``[G, K, K]``.

    The float operations, in order, are those of the reference's ``calc_iou_tensor`` and of
    torchvision's NMS kernel: ``inter / (area_i + area_j - inter)`` with
    ``inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))`` and
    ``area = (x2 - x1) * (y2 - y1)``, so the decisions are bit for bit those of a plain loop.
    """
    x1, y1, x2, y2 = bx  # one coordinate at a time: contiguous K-long rows vectorise well
    w = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_(min=0)
    h = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_(min=0)
    inter = w.mul_(h)
    return inter / (area[:, :, None] + area[:, None, :] - inter)


def _suppression_edges(boxes: Tensor, groups: Tensor, iou_threshold: float) -> tuple[Tensor, Tensor]:
    """Pairs ``(i, j)``, ``i < j`` in the same group, with IoU >= ``iou_threshold``.

    ``groups`` is sorted. Work is proportional to the sum over groups of (group size)^2, not to
    the square of the largest group times the number of groups.
    """
    n = groups.numel()
    dev = boxes.device
    first = torch.ones(n, dtype=torch.bool, device=dev)
    first[1:] = groups[1:] != groups[:-1]
    starts = torch.nonzero(first).flatten()
    sizes = torch.diff(starts, append=torch.tensor([n], device=dev))
    multi = sizes > 1
    starts, sizes = starts[multi], sizes[multi]
    src, dst = [torch.empty(0, dtype=torch.int64, device=dev)], [torch.empty(0, dtype=torch.int64, device=dev)]
    if starts.numel() == 0:
        return src[0], dst[0]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    coords = boxes.t().contiguous()  # [4, N]
    pad = torch.tensor(_PAD_SIZES, device=dev)
    size_class = torch.searchsorted(pad, sizes)
    for cls in torch.unique(size_class).tolist():
        in_class = size_class == cls
        c_starts, c_sizes = starts[in_class], sizes[in_class]
        k = int(c_sizes.max())
        per_chunk = max(1, _MAX_IOUS_PER_CHUNK // (k * k))
        col = torch.arange(k, device=dev)
        upper = torch.ones(k, k, dtype=torch.bool, device=dev).triu_(1)  # j after i
        for lo in range(0, c_starts.numel(), per_chunk):
            st, sz = c_starts[lo:lo + per_chunk], c_sizes[lo:lo + per_chunk]
            valid = col < sz[:, None]  # [G, K]
            idx = torch.where(valid, st[:, None] + col, st[:, None])  # padding repeats the first box
            iou = _pairwise_iou(coords[:, idx], area[idx])
            # The reference keeps the boxes with IoU < threshold: suppression at IoU >= threshold.
            hit = (iou >= iou_threshold) & upper & valid[:, None, :]
            g, i, j = torch.nonzero(hit, as_tuple=True)
            src.append(idx[g, i])
            dst.append(idx[g, j])
    return torch.cat(src), torch.cat(dst)


def _greedy_keep(n: int, src: Tensor, dst: Tensor) -> Tensor:
    """Resolve greedy NMS from its suppression edges (``src`` before ``dst``): ``Tensor[n]`` bool kept.

    Rounds: a box whose remaining suppressors are all suppressed is kept; a box with a kept
    suppressor is suppressed. Every round decides at least the first undecided box, so the
    result is exactly the sequential greedy one; chains of overlapping boxes are short, so a
    handful of rounds suffice in practice (at most the longest chain, <= the group size).
    """
    dev = src.device
    undecided, kept, suppressed = 0, 1, 2
    state = torch.zeros(n, dtype=torch.int8, device=dev)
    while True:
        live = (state[dst] == undecided) & (state[src] != suppressed)
        src, dst = src[live], dst[live]
        blocked = torch.zeros(n, dtype=torch.bool, device=dev)
        blocked[dst] = True
        state = torch.where((state == undecided) & ~blocked, torch.full_like(state, kept), state)
        state[dst[state[src] == kept]] = suppressed
        if src.numel() == 0 or not bool((state == undecided).any()):
            break
    return state == kept


def _order_by_group_then_score(scores: Tensor, groups: Tensor) -> Tensor:
    """Permutation sorting by group, then decreasing score, then position (two stable sorts)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[torch.sort(groups[order], stable=True).indices]


def _nms_sorted(boxes: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of boxes already ordered by group and decreasing score: ``Tensor[N]`` bool kept."""
    n = groups.numel()
    src, dst = _suppression_edges(boxes, groups, iou_threshold)
    if src.numel() == 0:
        return torch.ones(n, dtype=torch.bool, device=boxes.device)
    return _greedy_keep(n, src, dst)


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS within each group, vectorised over all groups, on exact coordinates.

    Within a group, boxes are visited by decreasing score (equal scores: the earlier box
    first); a box is kept unless a kept, earlier box overlaps it with IoU >= ``iou_threshold``
    (the MLPerf reference's rule; torchvision's ``nms`` suppresses only IoU > threshold,
    which differs when an IoU is exactly the threshold). IoUs are computed in the boxes'
    dtype with the reference's arithmetic, pairs only within a group.

    Args:
        boxes (Tensor[N, 4]): (x1, y1, x2, y2), any range (not clipped), float.
        scores (Tensor[N]): scores.
        groups (Tensor[N]): int group of each box; boxes of different groups never suppress
            each other.

    Returns:
        int64 indices of the kept boxes, sorted by group, then decreasing score.
    """
    if scores.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = _order_by_group_then_score(scores, groups)
    return order[_nms_sorted(boxes[order], groups[order], iou_threshold)]


def _any_last(mask: Tensor) -> Tensor:
    """``mask.any(-1)`` for a contiguous bool tensor; 8 bytes at a time when the size allows."""
    if mask.is_contiguous() and mask.shape[-1] % 8 == 0 and mask.shape[-1] > 0:
        return mask.view(torch.uint8).view(torch.int64).ne(0).any(-1)
    return mask.any(-1)


def _candidates(cls_logits: Tensor, score_threshold: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All (image, default box, class) whose softmax score is above the threshold.

    Returns ``(image, anchor, label, score)``, ordered by image, anchor, label. The softmax
    is taken only over the rows (default boxes) that can have such a score: with
    ``lse >= logit_0``, ``score_c > t`` needs ``logit_c - logit_0 > log t``, a comparison that
    needs no exp. Softmax rows are independent, so the scores equal those of the full
    softmax bit for bit.
    """
    batch, num_anchors, num_classes = cls_logits.shape
    logits = cls_logits.float()
    if score_threshold > 0:
        bound = logits[..., :1] + (math.log(score_threshold) - _LOG_MARGIN)
        rows_b, rows_a = torch.nonzero(_any_last(logits[..., 1:] > bound), as_tuple=True)
        probs = torch.softmax(logits[rows_b, rows_a], dim=-1)[:, 1:]  # [R, C-1]
    else:
        probs = torch.softmax(logits, dim=-1)[..., 1:].reshape(batch * num_anchors, num_classes - 1)
        rows = torch.arange(batch * num_anchors, device=logits.device)
        rows_b, rows_a = rows // num_anchors, rows % num_anchors
    r, c = torch.nonzero(probs > score_threshold, as_tuple=True)
    return rows_b[r], rows_a[r], c + 1, probs[r, c]


@torch.no_grad()
def postprocess(
    loc_pred: Tensor,
    cls_logits: Tensor,
    default_boxes: Tensor,
    *,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.5,
    max_per_class: int = 200,
    max_detections: int = 200,
    box_coder: BoxCoder | None = None,
    clip_boxes: bool = False,
) -> list[dict[str, Tensor]]:
    """Turn network outputs into detections (SPEC.md section 5).

    Per image and class (no background): softmax scores > ``score_threshold``, the best
    ``max_per_class`` of them, greedy NMS at IoU ``nms_threshold`` (suppressing IoU >=
    threshold, as the reference), then the best ``max_detections`` of the image. Only the
    candidates above the threshold are decoded, sorted and compared, so sparse outputs cost
    less. Equal scores are ordered by default-box index (within a class) and by class (within
    an image).

    Args:
        loc_pred (Tensor[B, A, 4]): regression outputs.
        cls_logits (Tensor[B, A, C]): class logits, class 0 = background.
        default_boxes (Tensor[A, 4]): (cx, cy, w, h), in the order of the predictions.
        clip_boxes: False (default, the MLPerf reference): boxes are neither clipped before
            NMS nor in the output, so they may extend past the image. True: NMS on the
            unclipped boxes, then the kept boxes are clipped to [0, 1].

    Returns:
        One dict per image: ``boxes`` (Tensor[K, 4], x1 y1 x2 y2 normalised), ``scores``
        (Tensor[K]) and ``labels`` (Tensor[K], 1..C-1), sorted by decreasing score,
        K <= ``max_detections``.
    """
    coder = box_coder or BoxCoder(default_boxes.to(loc_pred.device))
    batch, num_anchors, num_classes = cls_logits.shape
    dev = cls_logits.device
    img, anchor, label, score = _candidates(cls_logits, score_threshold)

    # Per (image, class) group: best first, then at most max_per_class of them.
    group = img * num_classes + label
    order = _order_by_group_then_score(score, group)
    group = group[order]
    pos = torch.arange(group.numel(), device=dev)
    first = torch.ones_like(group, dtype=torch.bool)
    first[1:] = group[1:] != group[:-1]
    group_start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values if pos.numel() else pos
    within = pos - group_start < max_per_class
    order, group = order[within], group[within]
    img, anchor, label, score = img[order], anchor[order], label[order], score[order]

    boxes = coder.decode_rows(loc_pred[img, anchor].float(), anchor)  # [N, 4], only the candidates
    kept = _nms_sorted(boxes, group, nms_threshold) if group.numel() else torch.zeros(0, dtype=torch.bool, device=dev)
    img, label, score, boxes = img[kept], label[kept], score[kept], boxes[kept]

    # Best first within each image (stable: equal scores keep the class order).
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(img[order], stable=True).indices]
    counts = torch.bincount(img, minlength=batch).tolist()
    if clip_boxes:
        boxes = boxes.clamp(0.0, 1.0)
    results = []
    for chunk in order.split(counts):
        chunk = chunk[:max_detections]
        results.append({"boxes": boxes[chunk], "scores": score[chunk], "labels": label[chunk]})
    return results
