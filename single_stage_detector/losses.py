"""SSD multibox loss: smooth L1 on positives + cross entropy with 3:1 hard-negative mining."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MultiboxLoss", "NonFiniteLossError", "check_finite", "FiniteLossMonitor"]

# Rows of logits per log_softmax call on CPU: ~1 MB chunks stay in cache, and no [N, C]
# temporary is written at all.
_CE_CHUNK_ELEMENTS = 1 << 18


def _allow_host_sync(t: Tensor) -> bool:
    """Whether data-dependent shapes (``nonzero``, ``topk`` of a computed k) are cheap here:
    on CPU yes; on GPUs they would stall the stream, so the dense paths are used."""
    return t.device.type == "cpu"


class NonFiniteLossError(FloatingPointError):
    """Raised when a loss term becomes NaN or infinite; the message lists every term."""


class _RowCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy(logits, labels, reduction="none")`` for ``logits [N, C]``, lighter.

    Forward: log_softmax of cache-sized chunks of rows, only the label's entry kept.
    Backward: row n's gradient is ``(softmax(logits_n) - onehot(label_n)) * g_n``. With hard
    negative mining only a few % of the rows have ``g_n != 0`` (positives and mined
    negatives); on CPU only those rows are computed (``nonzero``), elsewhere all rows, with
    no host synchronisation.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, labels)
        n, c = logits.shape
        if logits.device.type != "cpu":
            return torch.log_softmax(logits, dim=1).gather(1, labels[:, None]).view(n).neg_()
        step = max(1, _CE_CHUNK_ELEMENTS // max(c, 1))
        out = torch.empty(n, 1, dtype=logits.dtype)
        buf = torch.empty(min(step, n), c, dtype=logits.dtype)
        for s in range(0, n, step):
            e = min(n, s + step)
            logp = torch.log_softmax(logits[s:e], dim=1, out=buf[:e - s])
            torch.gather(logp, 1, labels[s:e, None], out=out[s:e])
        return out.view(n).neg_()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        logits, labels = ctx.saved_tensors
        if _allow_host_sync(logits):
            rows = torch.nonzero(grad).flatten()
            g = grad[rows, None]
            part = torch.softmax(logits[rows], dim=1).mul_(g)
            part.scatter_add_(1, labels[rows, None], -g)
            out = torch.zeros_like(logits)
            out[rows] = part
        else:
            out = torch.softmax(logits, dim=1).mul_(grad[:, None])
            out.scatter_add_(1, labels[:, None], -grad[:, None])
        return out, None


def _hard_negatives(neg_loss: Tensor, num_neg: Tensor, host_sync: bool) -> Tensor:
    """``rank < num_neg`` per row, rank = position in a stable sort by decreasing ``neg_loss``.

    That is the ``num_neg[b]`` largest entries of row b, equal values taken in index order.
    With ``host_sync`` (CPU): one ``topk`` of the largest ``num_neg`` gives each row's cut
    value, the ties at the cut are resolved by index. Otherwise (GPU): a full stable sort
    and a scatter of the ranks, with no host synchronisation. Same mask either way.
    """
    batch, num_anchors = neg_loss.shape
    if host_sync:
        k = int(num_neg.max()) if batch else 0
        if k == 0:
            return torch.zeros_like(neg_loss, dtype=torch.bool)
        top = neg_loss.topk(k, dim=1).values  # [B, k], decreasing
        cut = top.gather(1, (num_neg - 1).clamp(min=0)[:, None])  # the num_neg-th largest value
        above = neg_loss > cut
        at_cut = neg_loss == cut
        need = num_neg[:, None] - above.sum(dim=1, keepdim=True)  # ties to take, in index order
        take = at_cut & (torch.cumsum(at_cut, dim=1) <= need)
        return (above | take) & (num_neg > 0)[:, None]
    order = torch.sort(neg_loss, dim=1, descending=True, stable=True).indices
    in_top = torch.arange(num_anchors, device=neg_loss.device)[None, :] < num_neg[:, None]
    return torch.zeros_like(in_top).scatter_(1, order, in_top)


class MultiboxLoss(nn.Module):
    """The SSD loss of SPEC.md section 4, vectorised over the batch.

    For each image: smooth L1 (beta 1) summed over the 4 coordinates of the positive
    default boxes, plus cross entropy summed over the positives and the
    ``neg_pos_ratio`` x (number of positives) hardest negatives (at most all default
    boxes; among equal losses the lower default-box index first); the sum is divided by the
    image's number of positives (an image with no positive counts 0). The result is the mean
    over the batch.

    Call: ``loss(loc_pred, cls_logits, loc_target, labels) -> Tensor[]`` with
    ``loc_pred``/``loc_target`` ``[B, A, 4]``, ``cls_logits`` ``[B, A, C]``,
    ``labels`` ``[B, A]`` (0 = background).

    Cost: the cross entropy reads the logits once in their own [B, A, C] layout (no
    transposed copy, no [B, A, C] temporary) and its backward computes only the rows that
    carry a gradient (on CPU); on CPU the positives and mined negatives are found with
    ``nonzero``/``topk`` (host synchronisation), elsewhere with dense operations only.
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
        batch, num_anchors, num_classes = cls_logits.shape
        host_sync = _allow_host_sync(cls_logits)

        positive = labels > 0  # [B, A]
        num_pos = positive.sum(dim=1)  # [B]

        if host_sync:
            # Only the positives' rows (a few % of the default boxes).
            rows = torch.nonzero(positive.view(-1)).flatten()
            per_box = F.smooth_l1_loss(loc_pred.reshape(-1, 4)[rows], loc_target.reshape(-1, 4)[rows],
                                       reduction="none", beta=1.0).sum(dim=1)
            loc_loss = per_box.new_zeros(batch).index_add_(0, rows // num_anchors, per_box)  # [B]
        else:
            loc_loss = F.smooth_l1_loss(loc_pred, loc_target, reduction="none", beta=1.0).sum(dim=2)
            loc_loss = (loc_loss * positive).sum(dim=1)  # [B]

        ce = _RowCrossEntropy.apply(cls_logits.reshape(-1, num_classes), labels.reshape(-1)).view(batch, num_anchors)

        # Hard negatives: rank the background boxes by their loss, keep the top 3 x positives.
        neg_loss = ce.detach().masked_fill(positive, 0.0)
        num_neg = torch.clamp(self.neg_pos_ratio * num_pos, max=num_anchors)
        negative = _hard_negatives(neg_loss, num_neg, host_sync)
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


# "No non-finite step yet" in FiniteLossMonitor's device-side record.
_NO_STEP = 2**62


class FiniteLossMonitor:
    """Detects a NaN/inf loss without a host synchronisation in every step.

    ``immediate`` (the CPU, where reading a value costs nothing): :meth:`update` checks each
    step at once, as :func:`check_finite`. Otherwise (GPU): :meth:`update` only records, on
    the device, the first step whose loss is not finite; :meth:`check`, called at logging
    steps and at the end of an epoch, reads that record (one synchronisation) and raises
    :class:`NonFiniteLossError` naming the first bad step and the steps since the last check.
    Steps are optimiser-step numbers (1-based, as in the progress lines).
    """

    def __init__(self, immediate: bool) -> None:
        self.immediate = immediate
        self._first_bad: Tensor | None = None
        self._losses: dict[str, Tensor] = {}
        self._from_step: int | None = None
        self._to_step: int | None = None

    def update(self, losses: dict[str, Tensor], step: int, where: str = "") -> None:
        """Record (or, when ``immediate``, check) the loss terms of optimiser step ``step``."""
        if self.immediate:
            check_finite(losses, where=f"{where}, step {step}" if where else f"step {step}")
            return
        total = sum(v.detach().float() for v in losses.values())
        candidate = torch.where(torch.isfinite(total), _NO_STEP, step)
        self._first_bad = candidate if self._first_bad is None else torch.minimum(self._first_bad, candidate)
        self._losses = losses
        if self._from_step is None:
            self._from_step = step
        self._to_step = step

    def check(self, where: str = "") -> None:
        """Raise :class:`NonFiniteLossError` if a step recorded since the last check was not finite."""
        if self._first_bad is None:
            return
        first, span = int(self._first_bad), (self._from_step, self._to_step)
        self._first_bad, self._from_step, self._to_step = None, None, None
        if first == _NO_STEP:
            return
        values = {k: float(v.detach()) for k, v in self._losses.items()}
        terms = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise NonFiniteLossError(
            f"non-finite loss {'in ' + where + ' ' if where else ''}at step {first} (checked steps "
            f"{span[0]}..{span[1]}; terms at step {span[1]}: {terms}). "
            "Try a lower learning rate, a longer warm-up, or --amp off to rule out overflow."
        )
