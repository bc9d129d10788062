"""YOLOv1 decoding and detection selection.

Every predictor of every cell is a candidate box (arXiv:1506.02640 section 2: at test time
the class-specific confidence is ``Pr(Class_c | Object) * Pr(Object) * IoU = p(c) * C``):

* box: ``cx = (i + x) / S``, ``cy = (j + y) / S``, ``w = prior_w * t_w**2``,
  ``h = prior_h * t_h**2`` (fractions of the input; ``network`` module docstring);
* score of class c: ``max(C, 0) * max(p(c), 0)``. The outputs are linear (the paper's last
  layer), so either may be negative; each is clamped at 0 so that two negative values do not
  make a positive score (darknet's ``get_detection_boxes`` multiplies them unclamped).

Selection (:func:`~single_stage_detector.detectors.yolo.decode.select_detections`, shared
with YOLOv3): every (box, class) with score > ``score_threshold``; optionally the best
``pre_nms_top_k`` per image; greedy NMS per image and class suppressing IoU >
``nms_threshold``; the best ``max_detections`` per image; boxes clamped to [0, 1].
Defaults: darknet's YOLOv1 validation (``validate_yolo`` in ``src/yolo.c``: ``thresh = .001``,
``iou_thresh = .5``) and COCO's 100 detections per image.

Prediction order (``P`` axis): row j, column i, predictor b (``P = S * S * B``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...boxes import cxcywh_to_xyxy
from ..yolo.decode import select_detections
from .loss import decode_cell_boxes
from .network import BOX_CHANNELS

__all__ = ["decode_output", "postprocess_yolov1"]


@torch.no_grad()
def decode_output(output: Tensor, prior_wh: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Boxes and class-specific scores of every predictor.

    Args:
        output (Tensor[N, S, S, 5B + C]): the network's raw output.
        prior_wh (Tensor[B, 2]): the predictors' prior shapes (ones without anchors).
        num_classes: C.

    Returns:
        ``(boxes Tensor[N, P, 4] (x1, y1, x2, y2) normalised, not clipped,
        scores Tensor[N, P, C])``, float32, ``P = S * S * B`` in the module's order.

    Raises:
        ValueError: on an output that is not ``[N, S, S, 5B + C]`` for ``B = len(prior_wh)``.
    """
    b_ = int(prior_wh.shape[0])
    if output.dim() != 4 or output.shape[1] != output.shape[2] or output.shape[3] != BOX_CHANNELS * b_ + num_classes:
        raise ValueError(f"a YOLOv1 output must be [N, S, S, {BOX_CHANNELS}*{b_}+{num_classes}]; "
                         f"got {tuple(output.shape)}")
    n, s = output.shape[0], output.shape[1]
    out = output.float()
    boxes_raw = out[..., :BOX_CHANNELS * b_].reshape(n, s, s, b_, BOX_CHANNELS)
    dev = out.device
    col = torch.arange(s, device=dev).view(1, 1, s).expand(n, s, s)
    row = torch.arange(s, device=dev).view(1, s, 1).expand(n, s, s)
    boxes = cxcywh_to_xyxy(decode_cell_boxes(boxes_raw[..., :4], col, row, prior_wh, s))  # [N, S, S, B, 4]
    confidence = boxes_raw[..., 4].clamp(min=0)  # [N, S, S, B]
    class_scores = out[..., BOX_CHANNELS * b_:].clamp(min=0)  # [N, S, S, C]
    scores = confidence[..., None] * class_scores[..., None, :]  # [N, S, S, B, C]
    return boxes.reshape(n, -1, 4), scores.reshape(n, -1, num_classes)


@torch.no_grad()
def postprocess_yolov1(output: Tensor, prior_wh: Tensor, num_classes: int, *, score_threshold: float = 0.001,
                       nms_threshold: float = 0.5, max_detections: int | None = 100,
                       pre_nms_top_k: int | None = None) -> list[dict[str, Tensor]]:
    """Raw output -> per-image detections: :func:`decode_output`, then the shared selection.

    Returns:
        One dict per image: ``boxes`` (Tensor[K, 4] x1 y1 x2 y2 in [0, 1]), ``scores``
        (Tensor[K]), ``labels`` (Tensor[K] int64, 1..C), by decreasing score.
    """
    boxes, scores = decode_output(output, prior_wh, num_classes)
    # The scores are already class-specific: an objectness of 1 makes select_detections'
    # product objectness x class probability the score itself, bit for bit.
    ones = torch.ones(scores.shape[:2], device=scores.device)
    return select_detections(boxes, ones, scores, score_threshold=score_threshold, nms_threshold=nms_threshold,
                             max_detections=max_detections, pre_nms_top_k=pre_nms_top_k)
