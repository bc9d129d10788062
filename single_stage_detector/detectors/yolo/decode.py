"""YOLOv3 decoding and detection selection, as darknet's yolo layer and COCO evaluation.

Raw network output (one tensor per scale, strides 32, 16, 8): ``Tensor[B, A*(5+C), gh, gw]``;
the channels of anchor ``a`` are ``a*(5+C) + [tx, ty, tw, th, objectness logit, C class
logits]`` (darknet ``src/yolo_layer.c``, ``entry_index``). A prediction at cell (i, j) of a
``gh x gw`` grid, with anchor (anchor_w, anchor_h) in pixels of the ``H x W`` network input,
decodes as (``get_yolo_box``; YOLOv3 paper arXiv:1804.02767 section 2.1)::

    cx = (i + sigmoid(tx)) / gw        w = exp(tw) * anchor_w / W
    cy = (j + sigmoid(ty)) / gh        h = exp(th) * anchor_h / H

normalised to [0, 1] of the network input; objectness and class probabilities are
independent logistics (section 2.2: multi-label, no softmax).

Detection selection follows darknet's COCO evaluation (``validate_detector`` in
``examples/detector.c`` with ``thresh = .005``, ``nms = .45``; ``get_yolo_detections``,
``do_nms_sort`` in ``src/box.c``, ``print_cocos``): predictions with objectness > threshold;
per class the score objectness x class probability, kept when > threshold (one prediction
may give several (box, class) pairs); greedy NMS per image and class, suppressing IoU >
threshold; boxes clamped to the image when written.

Prediction order (``P`` axis): scale (output order), then anchor of its mask, then row j,
then column i (darknet's ``n*l.w*l.h + j*l.w + i``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ...boxes import cxcywh_to_xyxy
from ...postprocess import grouped_nms

__all__ = ["scale_view", "decode_boxes", "decode_outputs", "select_detections", "postprocess_yolo"]


def scale_view(raw: Tensor, num_anchors: int) -> Tensor:
    """One scale's raw output ``Tensor[B, A*(5+C), gh, gw]`` as a view ``Tensor[B, A, gh, gw, 5+C]``.

    Raises:
        ValueError: if ``raw`` is not 4-D or its channels are not a multiple of ``num_anchors``
            leaving at least 5 per anchor.
    """
    if raw.dim() != 4 or raw.shape[1] % num_anchors or raw.shape[1] // num_anchors < 5:
        raise ValueError(f"a YOLO output must be [B, A*(5+C), gh, gw] with A={num_anchors}; "
                         f"got shape {tuple(raw.shape)}")
    b, ch, gh, gw = raw.shape
    return raw.view(b, num_anchors, ch // num_anchors, gh, gw).permute(0, 1, 3, 4, 2)


def decode_boxes(box_raw: Tensor, anchors_px: Tensor, input_size: tuple[int, int]) -> Tensor:
    """Decode ``(tx, ty, tw, th)`` of one scale into normalised boxes (darknet ``get_yolo_box``).

    Args:
        box_raw (Tensor[B, A, gh, gw, 4]): raw tx, ty, tw, th (e.g. ``scale_view(raw, A)[..., :4]``).
        anchors_px (Tensor[A, 2]): this scale's anchors (width, height), pixels of the input.
        input_size: (H, W) of the network input, pixels.

    Returns:
        Tensor[B, A, gh, gw, 4] float32 (cx, cy, w, h), normalised to the input.
    """
    height, width = input_size
    gh, gw = box_raw.shape[2], box_raw.shape[3]
    box_raw = box_raw.float()
    dev = box_raw.device
    col = torch.arange(gw, device=dev, dtype=torch.float32).view(1, 1, 1, gw)
    row = torch.arange(gh, device=dev, dtype=torch.float32).view(1, 1, gh, 1)
    anchors = anchors_px.to(device=dev, dtype=torch.float32)
    cx = (col + torch.sigmoid(box_raw[..., 0])) / gw
    cy = (row + torch.sigmoid(box_raw[..., 1])) / gh
    w = torch.exp(box_raw[..., 2]) * (anchors[:, 0] / width).view(1, -1, 1, 1)
    h = torch.exp(box_raw[..., 3]) * (anchors[:, 1] / height).view(1, -1, 1, 1)
    return torch.stack([cx, cy, w, h], dim=-1)


def _check_outputs(raw_outputs: Sequence[Tensor], masks: Sequence[Sequence[int]]) -> None:
    if len(raw_outputs) != len(masks):
        raise ValueError(f"got {len(raw_outputs)} YOLO outputs for {len(masks)} anchor masks")


@torch.no_grad()
def decode_outputs(raw_outputs: Sequence[Tensor], anchors_px: Tensor, masks: Sequence[Sequence[int]],
                   input_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Decode every prediction of every scale.

    Args:
        raw_outputs: per scale ``Tensor[B, A*(5+C), gh, gw]``, in the order of ``masks``.
        anchors_px (Tensor[N, 2]): all anchors (width, height), pixels of the network input
            (``anchors.YOLOV3_COCO_ANCHORS_PX``); not rescaled with the input size.
        masks: anchor indices of each scale (``anchors.YOLOV3_MASKS``).
        input_size: (H, W) of the network input, pixels.

    Returns:
        ``(boxes, objectness, class_probs)``: ``Tensor[B, P, 4]`` (x1, y1, x2, y2) normalised,
        not clipped; ``Tensor[B, P]`` sigmoid of the objectness logit; ``Tensor[B, P, C]``
        sigmoid of the class logits; float32, ``P = sum(A * gh * gw)`` in the module's
        prediction order.

    Raises:
        ValueError: on a number of outputs different from the number of masks, or a bad shape.
    """
    _check_outputs(raw_outputs, masks)
    boxes, objectness, classes = [], [], []
    for raw, mask in zip(raw_outputs, masks):
        view = scale_view(raw, len(mask))
        b = view.shape[0]
        anchors = anchors_px[list(mask)]
        boxes.append(cxcywh_to_xyxy(decode_boxes(view[..., :4], anchors, input_size)).reshape(b, -1, 4))
        objectness.append(torch.sigmoid(view[..., 4].float()).reshape(b, -1))
        classes.append(torch.sigmoid(view[..., 5:].float()).reshape(b, -1, view.shape[-1] - 5))
    return torch.cat(boxes, 1), torch.cat(objectness, 1), torch.cat(classes, 1)


def _strictly_above(threshold: float, dtype: torch.dtype) -> float:
    """The smallest value of ``dtype`` above ``threshold`` (as ``dtype``): ``iou >= it`` is
    ``iou > threshold`` for IoUs of that dtype (``grouped_nms`` suppresses IoU >= its
    threshold; darknet's ``do_nms_sort`` suppresses ``box_iou > thresh``)."""
    t = torch.tensor(threshold, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(math.inf, dtype=dtype)))


def _best_per_image(img: Tensor, score: Tensor, k: int | None) -> Tensor:
    """Indices ordering ``(img, score)`` by image, then decreasing score (stable: equal
    scores keep their order), keeping the first ``k`` of each image (None: all)."""
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(img[order], stable=True).indices]
    if k is None or order.numel() == 0:
        return order
    img = img[order]
    pos = torch.arange(img.numel(), device=img.device)
    first = torch.ones_like(img, dtype=torch.bool)
    first[1:] = img[1:] != img[:-1]
    start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), 0).values
    return order[pos - start < k]


@torch.no_grad()
def select_detections(boxes: Tensor, objectness: Tensor, class_probs: Tensor, *,
                      score_threshold: float = 0.005, nms_threshold: float = 0.45,
                      max_detections: int | None = 100, pre_nms_top_k: int | None = None) -> list[dict[str, Tensor]]:
    """Darknet's COCO detection selection on decoded predictions, vectorised over the batch.

    1. predictions with objectness > ``score_threshold`` (``get_yolo_detections``; implied by
       step 2 since class probabilities are <= 1, it only skips work);
    2. every (prediction, class) with score = objectness x class probability >
       ``score_threshold`` (multi-label: one box may be kept for several classes);
    3. optionally, the best ``pre_nms_top_k`` of them per image (None, the default: all, as
       darknet; a cap bounds the NMS work of an untrained network, whose 0.5-ish
       probabilities make every pair a candidate);
    4. greedy NMS per image and class on exact coordinates, suppressing IoU >
       ``nms_threshold`` (``do_nms_sort``: strictly greater; an IoU equal to the threshold,
       in float32, does not suppress);
    5. the best ``max_detections`` per image (None: all; darknet writes all, and pycocotools'
       ``maxDets`` then caps each (image, category) separately);
    6. boxes clamped to [0, 1] (``print_cocos`` clamps to the image when writing results).

    Args:
        boxes (Tensor[B, P, 4]): (x1, y1, x2, y2) normalised (``decode_outputs``).
        objectness (Tensor[B, P]): objectness probabilities.
        class_probs (Tensor[B, P, C]): class probabilities (independent logistics).

    Returns:
        One dict per image: ``boxes`` (Tensor[K, 4] x1 y1 x2 y2 in [0, 1]), ``scores``
        (Tensor[K]), ``labels`` (Tensor[K] int64, class index + 1, i.e. 1..C), sorted by
        decreasing score (equal scores: prediction order, then class).
    """
    batch, _, num_classes = class_probs.shape
    img, pred = torch.nonzero(objectness > score_threshold, as_tuple=True)
    scores = objectness[img, pred, None] * class_probs[img, pred]  # [N, C], as darknet: float product
    row, cls = torch.nonzero(scores > score_threshold, as_tuple=True)
    img, pred, score = img[row], pred[row], scores[row, cls]
    if pre_nms_top_k is not None:
        top = _best_per_image(img, score, pre_nms_top_k)
        img, pred, cls, score = img[top], pred[top], cls[top], score[top]
    cand = boxes[img, pred]
    keep = grouped_nms(cand, score, img * num_classes + cls, _strictly_above(nms_threshold, cand.dtype))
    img, cls, score, cand = img[keep], cls[keep], score[keep], cand[keep]

    order = _best_per_image(img, score, max_detections)
    counts = torch.bincount(img[order], minlength=batch).tolist()
    out_boxes = cand[order].clamp(0.0, 1.0)
    out_scores, out_labels = score[order], cls[order] + 1
    return [{"boxes": b, "scores": s, "labels": lb} for b, s, lb in
            zip(out_boxes.split(counts), out_scores.split(counts), out_labels.split(counts))]


@torch.no_grad()
def postprocess_yolo(raw_outputs: Sequence[Tensor], anchors_px: Tensor, masks: Sequence[Sequence[int]],
                     input_size: tuple[int, int], *, score_threshold: float = 0.005,
                     nms_threshold: float = 0.45, max_detections: int | None = 100,
                     pre_nms_top_k: int | None = None) -> list[dict[str, Tensor]]:
    """Raw YOLOv3 outputs -> per-image detections: ``decode_outputs`` then ``select_detections``.

    Defaults: darknet's COCO evaluation (``examples/detector.c``, ``validate_detector``:
    ``thresh = .005``, ``nms = .45``); ``max_detections`` 100 is COCO's ``maxDets``.
    Arguments and returns as those two functions.
    """
    boxes, objectness, class_probs = decode_outputs(raw_outputs, anchors_px, masks, input_size)
    return select_detections(boxes, objectness, class_probs, score_threshold=score_threshold,
                             nms_threshold=nms_threshold, max_detections=max_detections,
                             pre_nms_top_k=pre_nms_top_k)
