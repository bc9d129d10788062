"""Plain per-image implementations of box encoding, loss and post-processing: BENCHMARK BASELINE.

Not used by training or evaluation. ``python -m single_stage_detector benchmark --parts
components`` times the batched implementations (:mod:`.box_coder`, :mod:`.losses`,
:mod:`.postprocess`) next to these: the same maths written the straightforward way, one
image (and, for NMS, one class) at a time, as the MLPerf reference does
(mlcommons/training ``single_stage_detector/ssd``: ``Encoder.encode``, ``Loss``,
``Encoder.decode_single``). They are deliberately not tuned; the only concession is that NMS
uses ``torchvision.ops.nms`` per class instead of the reference's Python loop, which makes
the baseline faster, not slower.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from .box_coder import cxcywh_to_xyxy, xyxy_to_cxcywh

__all__ = ["plain_encode", "plain_multibox_loss", "plain_postprocess"]


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU ``[N, 4] x [M, 4] -> [N, M]`` (xyxy), expanded pairwise."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def plain_encode(default_boxes: Tensor, boxes: Sequence[Tensor], labels: Sequence[Tensor],
                 iou_threshold: float = 0.5, variances: tuple[float, float] = (0.1, 0.2)) -> tuple[Tensor, Tensor]:
    """One image at a time: ``(loc Tensor[B, A, 4], labels Tensor[B, A])`` as ``BoxCoder.encode``."""
    d_xyxy = cxcywh_to_xyxy(default_boxes)
    vc, vs = variances
    out_loc, out_lab = [], []
    for bx, lb in zip(boxes, labels):
        loc = torch.zeros_like(d_xyxy)
        lab = torch.zeros(d_xyxy.shape[0], dtype=torch.int64, device=d_xyxy.device)
        if len(bx):
            iou = _iou(bx, d_xyxy)  # [N, A]
            best_iou, best_gt = iou.max(dim=0)
            best_anchor = iou.argmax(dim=1)
            best_iou.index_fill_(0, best_anchor, 2.0)
            best_gt[best_anchor] = torch.arange(len(bx), device=bx.device)
            pos = best_iou > iou_threshold
            lab[pos] = lb[best_gt[pos]]
            g = xyxy_to_cxcywh(bx[best_gt[pos]])
            d = default_boxes[pos]
            loc[pos] = torch.cat([(g[:, :2] - d[:, :2]) / (vc * d[:, 2:]), torch.log(g[:, 2:] / d[:, 2:]) / vs], 1)
        out_loc.append(loc)
        out_lab.append(lab)
    return torch.stack(out_loc), torch.stack(out_lab)


def plain_multibox_loss(loc_pred: Tensor, cls_logits: Tensor, loc_target: Tensor, labels: Tensor,
                        neg_pos_ratio: int = 3) -> Tensor:
    """One image at a time: the value of ``MultiboxLoss()(loc_pred, cls_logits, loc_target, labels)``."""
    total = loc_pred.new_zeros(())
    num_anchors = labels.shape[1]
    # unbind (not indexing by b): its backward assembles the per-image gradients once.
    for lp, lg, lt, lb in zip(loc_pred.unbind(0), cls_logits.unbind(0), loc_target.unbind(0), labels.unbind(0)):
        pos = lb > 0
        n_pos = int(pos.sum())
        if n_pos == 0:
            continue
        loc = F.smooth_l1_loss(lp[pos], lt[pos], reduction="sum")
        ce = F.cross_entropy(lg, lb, reduction="none")  # [A]
        neg = ce.detach().masked_fill(pos, 0.0)
        rank = neg.argsort(descending=True, stable=True).argsort(stable=True)
        hard = rank < min(neg_pos_ratio * n_pos, num_anchors)
        total = total + (loc + ce[pos | hard].sum()) / n_pos
    return total / labels.shape[0]


@torch.no_grad()
def plain_postprocess(loc_pred: Tensor, cls_logits: Tensor, default_boxes: Tensor, *, score_threshold: float = 0.05,
                      nms_threshold: float = 0.5, max_per_class: int = 200,
                      max_detections: int = 200) -> list[dict[str, Tensor]]:
    """One image, then one class at a time: detections as ``postprocess(..., clip_boxes=False)``."""
    vc, vs = 0.1, 0.2
    results = []
    for b in range(loc_pred.shape[0]):
        loc = loc_pred[b].float()
        cxcy = loc[:, :2] * vc * default_boxes[:, 2:] + default_boxes[:, :2]
        wh = torch.exp(loc[:, 2:] * vs) * default_boxes[:, 2:]
        boxes = cxcywh_to_xyxy(torch.cat([cxcy, wh], 1))
        probs = torch.softmax(cls_logits[b].float(), dim=-1)
        out_b, out_s, out_l = [], [], []
        for c in range(1, probs.shape[1]):
            s = probs[:, c]
            idx = torch.nonzero(s > score_threshold).flatten()
            if idx.numel() == 0:
                continue
            idx = idx[s[idx].argsort(descending=True)[:max_per_class]]
            keep = idx[nms(boxes[idx], s[idx], nms_threshold)]
            out_b.append(boxes[keep])
            out_s.append(s[keep])
            out_l.append(torch.full_like(keep, c))
        if out_s:
            sb, ss, sl = torch.cat(out_b), torch.cat(out_s), torch.cat(out_l)
            top = ss.argsort(descending=True)[:max_detections]
            results.append({"boxes": sb[top], "scores": ss[top], "labels": sl[top]})
        else:
            results.append({"boxes": boxes.new_zeros(0, 4), "scores": boxes.new_zeros(0),
                            "labels": torch.zeros(0, dtype=torch.int64, device=boxes.device)})
    return results
