"""Default boxes and SSD box coding (matching, encode, decode).

Everything here is batched over images and vectorised over boxes, and runs on
whatever device its inputs live on. Conventions:

* default boxes are ``(cx, cy, w, h)`` normalised to [0, 1];
* ground-truth and decoded boxes are ``(x1, y1, x2, y2)`` normalised to [0, 1];
* regression targets are ``(10 * (g_xy - d_xy) / d_wh, 5 * log(g_wh / d_wh))``,
  i.e. centre-size offsets divided by the variances 0.1 and 0.2.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = [
    "DefaultBoxSpec",
    "SSD300_BOX_SPEC",
    "default_boxes",
    "default_boxes_300",
    "box_iou",
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "BoxCoder",
]


@dataclass(frozen=True)
class DefaultBoxSpec:
    """Geometry of the default (anchor) boxes of an SSD-style detector.

    ``scales`` are in input pixels and have one more entry than there are
    levels: level k uses ``scales[k]`` and ``scales[k + 1]`` (for the extra
    square box of size sqrt(s_k * s_{k+1})).
    """

    image_size: int
    feature_sizes: tuple[int, ...]
    steps: tuple[int, ...]
    scales: tuple[float, ...]
    aspect_ratios: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.feature_sizes)
        if not (len(self.steps) == len(self.aspect_ratios) == n and len(self.scales) == n + 1):
            raise ValueError(
                f"DefaultBoxSpec: need len(steps) == len(aspect_ratios) == len(feature_sizes) == {n} "
                f"and len(scales) == {n + 1}; got steps={len(self.steps)}, "
                f"aspect_ratios={len(self.aspect_ratios)}, scales={len(self.scales)}"
            )

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Boxes per feature-map cell at each level: 2 squares + 2 per aspect ratio."""
        return tuple(2 + 2 * len(ar) for ar in self.aspect_ratios)

    @property
    def num_boxes(self) -> int:
        return sum(f * f * b for f, b in zip(self.feature_sizes, self.boxes_per_location))


# SPEC.md section 3: the MLPerf SSD300 geometry (8732 boxes).
SSD300_BOX_SPEC = DefaultBoxSpec(
    image_size=300,
    feature_sizes=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    scales=(21, 45, 99, 153, 207, 261, 315),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)


def default_boxes(spec: DefaultBoxSpec) -> Tensor:
    """Default boxes of ``spec`` as ``Tensor[A, 4]`` (cx, cy, w, h), float32.

    Order: level, then row i, then column j, then box shape, the order in which
    :class:`~single_stage_detector.models.ssd.SSD` lays out its predictions.
    """
    size = float(spec.image_size)
    out = []
    for k, fsize in enumerate(spec.feature_sizes):
        fk = size / spec.steps[k]
        sk = spec.scales[k] / size
        sk1 = spec.scales[k + 1] / size
        shapes = [(sk, sk), (math.sqrt(sk * sk1),) * 2]
        for a in spec.aspect_ratios[k]:
            w, h = sk * math.sqrt(a), sk / math.sqrt(a)
            shapes += [(w, h), (h, w)]
        for i, j in itertools.product(range(fsize), repeat=2):
            cx, cy = (j + 0.5) / fk, (i + 0.5) / fk
            out.extend((cx, cy, w, h) for w, h in shapes)
    return torch.tensor(out, dtype=torch.float32).clamp_(0.0, 1.0)


def default_boxes_300() -> Tensor:
    """The 8732 default boxes of SSD300, ``Tensor[8732, 4]`` (cx, cy, w, h) in [0, 1]."""
    return default_boxes(SSD300_BOX_SPEC)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cxcy, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat([cxcy - 0.5 * wh, cxcy + 0.5 * wh], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1y1, x2y2 = boxes[..., :2], boxes[..., 2:]
    return torch.cat([0.5 * (x1y1 + x2y2), x2y2 - x1y1], dim=-1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a`` (``[..., N, 4]``) against ``b`` (``[..., M, 4]``), xyxy -> ``[..., N, M]``."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter / union.clamp(min=1e-12)


class BoxCoder:
    """Matches ground truth to default boxes and converts boxes to/from regression targets.

    Args:
        default_boxes (Tensor[A, 4]): (cx, cy, w, h) in [0, 1].
        iou_threshold: a default box is positive when its best IoU is > this (0.5).
        variances: (centre, size) variances, (0.1, 0.2) for SSD.
    """

    def __init__(
        self,
        default_boxes: Tensor,
        iou_threshold: float = 0.5,
        variances: tuple[float, float] = (0.1, 0.2),
    ) -> None:
        if default_boxes.ndim != 2 or default_boxes.shape[1] != 4:
            raise ValueError(f"default_boxes must be [A, 4], got {tuple(default_boxes.shape)}")
        self.default_boxes = default_boxes.float()
        self.default_boxes_xyxy = cxcywh_to_xyxy(self.default_boxes)
        self.iou_threshold = iou_threshold
        self.variances = variances

    @property
    def num_boxes(self) -> int:
        return self.default_boxes.shape[0]

    def to(self, device: torch.device | str) -> "BoxCoder":
        self.default_boxes = self.default_boxes.to(device)
        self.default_boxes_xyxy = self.default_boxes_xyxy.to(device)
        return self

    # -- matching ---------------------------------------------------------------------
    def match(self, boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Assign each default box a ground-truth box.

        Returns ``(matched_boxes Tensor[B, A, 4] xyxy, labels Tensor[B, A] int64)``;
        background default boxes get label 0 (their matched box is meaningless).
        """
        if len(boxes) != len(labels):
            raise ValueError(f"got {len(boxes)} box tensors but {len(labels)} label tensors")
        device = self.default_boxes.device
        batch = len(boxes)
        num_anchors = self.num_boxes
        max_gt = max((int(b.shape[0]) for b in boxes), default=0)
        if max_gt == 0:
            return (
                torch.zeros(batch, num_anchors, 4, device=device),
                torch.zeros(batch, num_anchors, dtype=torch.int64, device=device),
            )
        # Pad to [B, G, 4] in one op; padded rows get an empty box far outside the image
        # (IoU 0) and are also masked out explicitly below.
        gt = pad_sequence([b.to(device=device, dtype=torch.float32) for b in boxes], batch_first=True,
                          padding_value=-2.0)
        gt_labels = pad_sequence([lb.to(device=device, dtype=torch.int64) for lb in labels], batch_first=True)
        counts = torch.tensor([int(b.shape[0]) for b in boxes], device=device)
        valid = torch.arange(max_gt, device=device)[None, :] < counts[:, None]

        iou = box_iou(gt, self.default_boxes_xyxy)  # [B, G, A]
        iou = iou.masked_fill(~valid[..., None], -1.0)

        best_gt_iou, best_gt = iou.max(dim=1)  # per default box: [B, A]
        best_anchor = iou.argmax(dim=2)  # per ground truth: [B, G]

        # Force each real ground truth onto its best default box (IoU := 2). When two
        # ground truths share a best default box, the later one wins, as in the reference.
        # scatter_reduce(amax) keeps this deterministic and avoids a [B, G, A] temporary.
        gt_ids = torch.arange(1, max_gt + 1, device=device).expand(batch, -1)
        gt_ids = torch.where(valid, gt_ids, torch.zeros_like(gt_ids))
        forced_gt = torch.zeros(batch, num_anchors, dtype=torch.int64, device=device)
        forced_gt.scatter_reduce_(1, best_anchor, gt_ids, reduce="amax")  # 0 = not forced, else gt index + 1
        is_forced = forced_gt > 0
        best_gt = torch.where(is_forced, forced_gt - 1, best_gt)
        best_gt_iou = torch.where(is_forced, torch.full_like(best_gt_iou, 2.0), best_gt_iou)

        positive = best_gt_iou > self.iou_threshold
        matched_boxes = torch.gather(gt, 1, best_gt[..., None].expand(-1, -1, 4))
        matched_labels = torch.gather(gt_labels, 1, best_gt)
        matched_labels = torch.where(positive, matched_labels, torch.zeros_like(matched_labels))
        return matched_boxes, matched_labels

    # -- coding -----------------------------------------------------------------------
    def encode_boxes(self, boxes_xyxy: Tensor) -> Tensor:
        """Regression targets of boxes ``[..., A, 4]`` (xyxy) against the default boxes."""
        d = self.default_boxes
        g = xyxy_to_cxcywh(boxes_xyxy)
        vc, vs = self.variances
        txy = (g[..., :2] - d[:, :2]) / (vc * d[:, 2:])
        twh = torch.log(g[..., 2:] / d[:, 2:]) / vs
        return torch.cat([txy, twh], dim=-1)

    def encode(self, boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Match and encode a batch.

        Args:
            boxes: per image ``Tensor[N_i, 4]`` (x1, y1, x2, y2) normalised, positive size.
            labels: per image ``Tensor[N_i]`` class labels in 1..num_classes-1.

        Returns:
            ``(loc Tensor[B, A, 4], labels Tensor[B, A])``: regression targets (zero for
            background default boxes) and per-default-box labels (0 = background).
        """
        matched_boxes, matched_labels = self.match(boxes, labels)
        positive = matched_labels > 0
        # Background rows are replaced by the default box itself so that the log is finite.
        safe = torch.where(positive[..., None], matched_boxes, self.default_boxes_xyxy.expand_as(matched_boxes))
        loc = self.encode_boxes(safe)
        loc = torch.where(positive[..., None], loc, torch.zeros_like(loc))
        return loc, matched_labels

    def decode(self, loc: Tensor) -> Tensor:
        """Regression outputs ``[B, A, 4]`` -> boxes ``[B, A, 4]`` (x1, y1, x2, y2) normalised."""
        d = self.default_boxes.to(loc.dtype) if loc.dtype != self.default_boxes.dtype else self.default_boxes
        vc, vs = self.variances
        cxcy = loc[..., :2] * vc * d[:, 2:] + d[:, :2]
        wh = torch.exp(loc[..., 2:] * vs) * d[:, 2:]
        return cxcywh_to_xyxy(torch.cat([cxcy, wh], dim=-1))
