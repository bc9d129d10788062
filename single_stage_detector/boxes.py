"""Box utilities shared by every detector family: format conversions and IoU.

Conventions (all families): ``xyxy`` is (x1, y1, x2, y2), ``cxcywh`` is (centre x, centre y,
width, height); coordinates are in whatever unit the caller uses (normalised [0, 1] in the
harness's batches, pixels in the YOLO anchor tools). Every function is vectorised over
leading dimensions and runs on the device of its inputs.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_iou", "cxcywh_to_xyxy", "xyxy_to_cxcywh", "shape_iou"]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> ``[..., 4]`` (x1, y1, x2, y2)."""
    cxcy, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat([cxcy - 0.5 * wh, cxcy + 0.5 * wh], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (x1, y1, x2, y2) -> ``[..., 4]`` (cx, cy, w, h)."""
    x1y1, x2y2 = boxes[..., :2], boxes[..., 2:]
    return torch.cat([0.5 * (x1y1 + x2y2), x2y2 - x1y1], dim=-1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a`` (``[..., N, 4]``) against ``b`` (``[..., M, 4]``), xyxy -> ``[..., N, M]``.

    Degenerate boxes (zero or negative extent) have area 0; a pair whose union is 0 gets IoU 0.
    """
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union.clamp(min=1e-12)


def shape_iou(wh_a: Tensor, wh_b: Tensor) -> Tensor:
    """IoU of box shapes alone (both centred at the origin): ``[..., N, 2]`` x ``[..., M, 2]``
    (width, height, any one unit) -> ``[..., N, M]``.

    The distance of YOLO's anchor assignment and k-means (YOLOv2 paper, section 2 "Dimension
    clusters"; darknet's ``box_iou`` of boxes moved to the origin).
    """
    inter = torch.minimum(wh_a[..., :, None, 0], wh_b[..., None, :, 0]) * \
        torch.minimum(wh_a[..., :, None, 1], wh_b[..., None, :, 1])
    area_a = wh_a[..., 0] * wh_a[..., 1]
    area_b = wh_b[..., 0] * wh_b[..., 1]
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter).clamp(min=1e-12)
