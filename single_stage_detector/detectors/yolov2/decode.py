"""YOLOv2 decoding and detection selection, as darknet's region layer and COCO evaluation.

Raw network output: ``Tensor[B, A*(5+C), gh, gw]`` (stride 32); the channels of anchor ``a``
are ``a*(5+C) + [tx, ty, tw, th, objectness logit, C class logits]``. A prediction at cell
(i, j) with anchor (anchor_w, anchor_h) **in grid units** decodes as (arXiv:1612.08242 section
2 "Direct location prediction"; darknet ``get_region_box``, ``src/region_layer.c``)::

    cx = (i + sigmoid(tx)) / gw        w = anchor_w * exp(tw) / gw
    cy = (j + sigmoid(ty)) / gh        h = anchor_h * exp(th) / gh

normalised to [0, 1] of the network input; objectness = sigmoid(logit); class probabilities =
softmax over the C class logits of the anchor (``[region] softmax=1``); score of (box, class) =
objectness x class probability (``get_region_detections``).

Detection selection (``select_detections`` of the YOLOv3 decoder, shared): every (prediction,
class) with score > ``score_threshold``, optionally the best ``pre_nms_top_k`` per image,
greedy NMS per image and class suppressing IoU > ``nms_threshold`` (``do_nms_sort``), the best
``max_detections`` per image, boxes clamped to [0, 1]. Darknet's COCO evaluation
(``validate_detector``, ``examples/detector.c``): threshold .005, NMS .45, every class above the
threshold (multi-label). Seed 004 keeps only each box's best class (``multi_label=False``),
threshold .001, NMS .6.

Prediction order (``P`` axis): anchor, then row j, then column i (darknet's
``n*l.w*l.h + j*l.w + i``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...boxes import cxcywh_to_xyxy
from ..yolo.decode import decode_boxes, scale_view, select_detections

__all__ = ["decode_region", "postprocess_region"]


@torch.no_grad()
def decode_region(raw: Tensor, anchors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Decode every prediction of a YOLOv2 output.

    Args:
        raw (Tensor[B, A*(5+C), gh, gw]): the network's output.
        anchors (Tensor[A, 2]): (width, height) in grid units (not rescaled with the input size).

    Returns:
        ``(boxes, objectness, class_probs)``: ``Tensor[B, P, 4]`` (x1, y1, x2, y2) normalised,
        not clipped; ``Tensor[B, P]`` sigmoid of the objectness logit; ``Tensor[B, P, C]`` softmax
        of the class logits; float32, ``P = A * gh * gw`` in the module's prediction order.

    Raises:
        ValueError: ``raw`` is not 4-D or its channels are not ``A * (5 + C)`` with C >= 1.
    """
    num_anchors = anchors.shape[0]
    if raw.dim() != 4 or raw.shape[1] % num_anchors or raw.shape[1] // num_anchors < 6:
        raise ValueError(f"a YOLOv2 output must be [B, {num_anchors}*(5+C), gh, gw] with C >= 1; "
                         f"got {tuple(raw.shape)}")
    view = scale_view(raw, num_anchors).float()  # [B, A, gh, gw, 5+C]
    batch, _, gh, gw, _ = view.shape
    # Anchors in grid units: decode_boxes divides them by its "input size", here the grid.
    boxes = cxcywh_to_xyxy(decode_boxes(view[..., :4], anchors, (gh, gw)))
    objectness = torch.sigmoid(view[..., 4])
    class_probs = F.softmax(view[..., 5:], dim=-1)
    num_classes = view.shape[-1] - 5
    return boxes.reshape(batch, -1, 4), objectness.reshape(batch, -1), class_probs.reshape(batch, -1, num_classes)


@torch.no_grad()
def postprocess_region(raw: Tensor, anchors: Tensor, *, score_threshold: float = 0.005, nms_threshold: float = 0.45,
                       max_detections: int | None = 100, pre_nms_top_k: int | None = None,
                       multi_label: bool = True) -> list[dict[str, Tensor]]:
    """Raw YOLOv2 output -> per-image detections: :func:`decode_region`, then (``multi_label``
    False: each box's best class only, ties to the lowest class) ``select_detections``.

    Defaults: darknet's COCO evaluation (``validate_detector``: ``thresh = .005``, ``nms = .45``);
    ``max_detections`` 100 is COCO's ``maxDets``.

    Returns:
        One dict per image: ``boxes`` (Tensor[K, 4] x1 y1 x2 y2 in [0, 1]), ``scores``
        (Tensor[K]), ``labels`` (Tensor[K] int64, 1..C), by decreasing score.
    """
    boxes, objectness, class_probs = decode_region(raw, anchors)
    if not multi_label:
        best = class_probs.argmax(dim=-1, keepdim=True)
        class_probs = torch.zeros_like(class_probs).scatter_(-1, best, class_probs.gather(-1, best))
    return select_detections(boxes, objectness, class_probs, score_threshold=score_threshold,
                             nms_threshold=nms_threshold, max_detections=max_detections, pre_nms_top_k=pre_nms_top_k)
