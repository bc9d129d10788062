"""Detections from raw SSD outputs: decode, softmax, per-class NMS, top-k per image."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .box_coder import BoxCoder

__all__ = ["postprocess"]


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
) -> list[dict[str, Tensor]]:
    """Turn network outputs into detections (SPEC.md section 5).

    Args:
        loc_pred (Tensor[B, A, 4]): regression outputs.
        cls_logits (Tensor[B, A, C]): class logits, class 0 = background.
        default_boxes (Tensor[A, 4]): (cx, cy, w, h), in the order of the predictions.

    Returns:
        One dict per image: ``boxes`` (Tensor[K, 4], x1 y1 x2 y2 normalised to [0, 1]),
        ``scores`` (Tensor[K]) and ``labels`` (Tensor[K], 1..C-1), sorted by score,
        K <= ``max_detections``.
    """
    coder = box_coder or BoxCoder(default_boxes.to(loc_pred.device))
    batch, num_anchors, num_classes = cls_logits.shape
    boxes = coder.decode(loc_pred.float()).clamp_(0.0, 1.0)  # [B, A, 4]
    scores = torch.softmax(cls_logits.float(), dim=-1)[..., 1:]  # [B, A, C-1]

    # Per image and class: the top `max_per_class` default boxes by score...
    k = min(max_per_class, num_anchors)
    top_scores, top_idx = scores.transpose(1, 2).topk(k, dim=2)  # [B, C-1, k]
    top_boxes = torch.gather(
        boxes[:, None].expand(-1, num_classes - 1, -1, -1), 2, top_idx[..., None].expand(-1, -1, -1, 4)
    )  # [B, C-1, k, 4]
    img_ids = torch.arange(batch, device=boxes.device)[:, None, None].expand_as(top_scores)
    cls_ids = torch.arange(1, num_classes, device=boxes.device)[None, :, None].expand_as(top_scores)

    # ... of which those above the score threshold go to one NMS call in which every
    # (image, class) pair is its own group.
    keep_mask = top_scores > score_threshold
    cand_scores = top_scores[keep_mask]
    cand_boxes = top_boxes[keep_mask]
    cand_imgs = img_ids[keep_mask]
    cand_labels = cls_ids[keep_mask]
    keep = batched_nms(cand_boxes, cand_scores, cand_imgs * num_classes + cand_labels, nms_threshold)
    # batched_nms returns indices sorted by decreasing score; a stable sort by image keeps
    # that order inside each image.
    keep = keep[torch.sort(cand_imgs[keep], stable=True).indices]
    kept_imgs = cand_imgs[keep]
    counts = torch.bincount(kept_imgs, minlength=batch).tolist()

    results = []
    for chunk in keep.split(counts):
        chunk = chunk[:max_detections]
        results.append({"boxes": cand_boxes[chunk], "scores": cand_scores[chunk], "labels": cand_labels[chunk]})
    return results
