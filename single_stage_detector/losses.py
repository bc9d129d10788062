"""SSD multibox loss: smooth L1 on positives + cross entropy with 3:1 hard-negative mining."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiboxLoss", "NonFiniteLossError", "check_finite"]


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term becomes NaN or infinite; the message lists every term."""


class MultiboxLoss(nn.Module):
    """The SSD loss of SPEC.md section 4, vectorised over the batch.

    For each image: smooth L1 (beta 1) summed over the 4 coordinates of the positive
    default boxes, plus cross entropy summed over the positives and the
    ``neg_pos_ratio`` x (number of positives) hardest negatives (at most all default
    boxes); the sum is divided by the image's number of positives (an image with no
    positive counts 0). The result is the mean over the batch.

    Call: ``loss(loc_pred, cls_logits, loc_target, labels) -> Tensor[]`` with
    ``loc_pred``/``loc_target`` ``[B, A, 4]``, ``cls_logits`` ``[B, A, C]``,
    ``labels`` ``[B, A]`` (0 = background).
    """

    def __init__(self, neg_pos_ratio: int = 3) -> None:
        super().__init__()
        self.neg_pos_ratio = neg_pos_ratio

    def terms(self, loc_pred: Tensor, cls_logits: Tensor, loc_target: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """The two normalised terms, ``{"loc": Tensor[], "cls": Tensor[]}``; their sum is the loss."""
        if loc_pred.shape != loc_target.shape or loc_pred.shape[:2] != labels.shape or cls_logits.shape[:2] != labels.shape:
            raise ValueError(
                "MultiboxLoss: shapes do not agree: "
                f"loc_pred {tuple(loc_pred.shape)}, cls_logits {tuple(cls_logits.shape)}, "
                f"loc_target {tuple(loc_target.shape)}, labels {tuple(labels.shape)}"
            )
        # Losses are computed in float32 even under autocast: the sums run over 8732 boxes.
        loc_pred = loc_pred.float()
        cls_logits = cls_logits.float()
        loc_target = loc_target.float()
        num_anchors = labels.shape[1]

        positive = labels > 0  # [B, A]
        num_pos = positive.sum(dim=1)  # [B]

        loc_loss = F.smooth_l1_loss(loc_pred, loc_target, reduction="none", beta=1.0).sum(dim=2)
        loc_loss = (loc_loss * positive).sum(dim=1)  # [B]

        # cross_entropy wants the class dimension second: [B, C, A].
        ce = F.cross_entropy(cls_logits.transpose(1, 2), labels, reduction="none")  # [B, A]

        # Hard negatives: rank the background boxes by their loss, keep the top 3 x positives.
        neg_loss = ce.detach().masked_fill(positive, 0.0)
        order = neg_loss.argsort(dim=1, descending=True, stable=True)
        rank = order.argsort(dim=1, stable=True)
        num_neg = torch.clamp(self.neg_pos_ratio * num_pos, max=num_anchors)
        negative = rank < num_neg[:, None]
        cls_loss = (ce * (positive | negative)).sum(dim=1)  # [B]

        # Per-image normalisation by the positives; images without positives contribute 0.
        has_pos = (num_pos > 0).float()
        denom = num_pos.float().clamp(min=1.0)
        return {
            "loc": (loc_loss * has_pos / denom).mean(),
            "cls": (cls_loss * has_pos / denom).mean(),
        }

    def forward(self, loc_pred: Tensor, cls_logits: Tensor, loc_target: Tensor, labels: Tensor) -> Tensor:
        t = self.terms(loc_pred, cls_logits, loc_target, labels)
        return t["loc"] + t["cls"]


def check_finite(losses: dict[str, Tensor], where: str = "") -> None:
    """Raise :class:`NonFiniteLossError` listing every term if any loss term is NaN/inf."""
    values = {k: float(v.detach()) for k, v in losses.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        terms = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise NonFiniteLossError(
            f"non-finite loss {'at ' + where + ' ' if where else ''}({', '.join(bad)}): {terms}. "
            "Try a lower learning rate, a longer warm-up, or --amp off to rule out overflow."
        )
