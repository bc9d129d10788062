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
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

# Shared by every family; re-exported here, where the SSD API has always had them.
from .boxes import box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh
from .distributed import to_device_async

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


def _run_length(flags: Tensor) -> int:
    """Number of leading True values of a 1-D bool tensor."""
    false = torch.nonzero(~flags)
    return int(false[0, 0]) if false.numel() else flags.numel()


def _grid_blocks(centres: Tensor, xyxy: Tensor, max_blocks: int = 64) -> list[tuple[int, int, int, int]] | None:
    """Split default boxes into grid blocks, or None if they do not form grids.

    A block ``(start, R, C, S)`` holds boxes ``start + (r * C + c) * S + s`` (r < R rows, c < C
    columns, s < S shapes) whose x-interval depends only on ``(c, s)`` and y-interval only on
    ``(r, s)``: the layout of :func:`default_boxes`, one block per feature map. The overlaps of
    a ground truth with a block are then an outer product of R x S heights and C x S widths.
    Checked exactly, so any set of default boxes is handled (None: no such structure).
    """
    num = xyxy.shape[0]
    blocks: list[tuple[int, int, int, int]] = []
    pos = 0
    while pos < num:
        if len(blocks) == max_blocks:
            return None
        shapes = _run_length((centres[pos:] == centres[pos]).all(dim=1))  # boxes sharing a centre
        row_cy = centres[pos::shapes, 1]
        cols = _run_length(row_cy == row_cy[0])  # cells in the first row
        rows_max = (num - pos) // (cols * shapes)
        blk = xyxy[pos:pos + rows_max * cols * shapes].view(rows_max, cols, shapes, 4)
        same_x = (blk[..., 0::2] == blk[:1, :, :, 0::2]).flatten(1).all(dim=1)  # x-interval by (c, s)
        same_y = (blk[..., 1::2] == blk[:, :1, :, 1::2]).flatten(1).all(dim=1)  # y-interval by (r, s)
        rows = _run_length(same_x & same_y)
        if rows == 0:
            return None
        blocks.append((pos, rows, cols, shapes))
        pos += rows * cols * shapes
    return blocks


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
        # Work buffers of the matching on CPU, per thread: reused across calls, so that the
        # [A, sum N_i] matrices do not cost fresh pages (page faults) on every batch.
        self._buffers: dict[tuple[int, str], Tensor] = {}
        self._prepare()

    def _prepare(self) -> None:
        """Per-default-box constants of the matching, on the default boxes' device."""
        d = self.default_boxes_xyxy
        dev = d.device
        # Same arithmetic as box_iou's area of its second argument.
        self._area = ((d[:, 2] - d[:, 0]).clamp(min=0) * (d[:, 3] - d[:, 1]).clamp(min=0))[:, None]  # [A, 1]
        # box_iou divides by union.clamp(min=1e-12). The union is never below the default
        # box's own area (up to rounding), so the clamp can only act on default boxes of
        # (almost) zero area; without those it is skipped, with the same result.
        self._union_clamp = bool(self._area.numel()) and float(self._area.min()) < 1e-9
        # Overlaps are computed once per distinct x-interval (and y-interval) of the default
        # boxes, few of them (SSD300: 372 of each for 8732 boxes). Laid out as by
        # default_boxes(), each feature map is a grid block whose overlaps with a ground truth
        # are an outer product (rows x shapes heights by columns x shapes widths), written in
        # one pass; otherwise they are gathered from the distinct intervals.
        blocks = _grid_blocks(self.default_boxes[:, :2].cpu(), d.cpu())
        if blocks is not None:
            xs, ys, self._blocks, ox, oy = [], [], [], 0, 0
            for start, rows, cols, shapes in blocks:
                blk = d[start:start + rows * cols * shapes].view(rows, cols, shapes, 4)
                xs.append(blk[0, :, :, 0::2].reshape(-1, 2))  # [C * S, 2]
                ys.append(blk[:, 0, :, 1::2].reshape(-1, 2))  # [R * S, 2]
                self._blocks.append((start, rows, cols, shapes, ox, oy))
                ox, oy = ox + cols * shapes, oy + rows * shapes
            self._x_intervals, self._y_intervals = torch.cat(xs), torch.cat(ys)
        else:
            self._blocks = None
            self._x_intervals, self._x_index = torch.unique(d[:, 0::2], dim=0, return_inverse=True)  # [Ux, 2], [A]
            self._y_intervals, self._y_index = torch.unique(d[:, 1::2], dim=0, return_inverse=True)
        # `iou > iou_threshold` compares in float32; for float32 IoUs it is `iou >= above_min`.
        threshold = torch.tensor(self.iou_threshold, dtype=torch.float32)
        self._above_min = torch.nextafter(threshold, torch.tensor(math.inf)).to(dev)
        self._forced_positive = bool(torch.tensor(2.0) > self.iou_threshold)  # forced boxes count as IoU 2

    @property
    def num_boxes(self) -> int:
        return self.default_boxes.shape[0]

    def to(self, device: torch.device | str) -> "BoxCoder":
        self.default_boxes = self.default_boxes.to(device)
        self.default_boxes_xyxy = self.default_boxes_xyxy.to(device)
        self._prepare()
        return self

    # -- matching ---------------------------------------------------------------------
    def _scratch(self, slot: str, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """An uninitialised ``[rows, cols]`` work tensor (on CPU reused per thread and slot)."""
        device = self.default_boxes.device
        if device.type != "cpu":  # the caching allocator already reuses device memory
            return torch.empty(rows, cols, dtype=dtype, device=device)
        key = (threading.get_ident(), slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < rows * cols or buf.dtype != dtype:
            buf = self._buffers[key] = torch.empty(rows * cols, dtype=dtype)
        return buf[:rows * cols].view(rows, cols)

    def _iou_t(self, gt: Tensor, columns: int) -> Tensor:
        """``box_iou(gt, default_boxes_xyxy).T`` bit for bit: ``[M, 4] -> [A, columns]``.

        Columns past M (padding) hold IoU 0. Laid out default box by ground truth, so that
        every operation runs along rows of M contiguous values. Overlap widths are computed
        once per distinct x-interval of the default boxes (heights likewise) and multiplied
        out per grid block, or gathered: one product, one union and one division over [A, M]
        instead of box_iou's eight [M, A, 2] temporaries. The float operations are box_iou's,
        in its order (w * h is h * w in IEEE arithmetic).
        """

        def area_of(x1: Tensor, y1: Tensor, x2: Tensor, y2: Tensor) -> Tensor:
            return (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)  # [M]

        if columns > gt.shape[0]:
            gt = torch.cat([gt, gt.new_zeros(columns - gt.shape[0], 4)])
        gx1, gy1, gx2, gy2 = gt.t()
        m = gt.shape[0]
        ux, uy = self._x_intervals, self._y_intervals
        w = (torch.minimum(gx2, ux[:, 1:]) - torch.maximum(gx1, ux[:, :1])).clamp_(min=0)  # [Ux, M]
        h = (torch.minimum(gy2, uy[:, 1:]) - torch.maximum(gy1, uy[:, :1])).clamp_(min=0)  # [Uy, M]
        inter = self._scratch("inter", self.num_boxes, m)  # [A, M]
        union = self._scratch("union", self.num_boxes, m)
        if self._blocks is not None:
            for start, rows, cols, shapes, ox, oy in self._blocks:
                torch.mul(h[oy:oy + rows * shapes].view(rows, 1, shapes, m),
                          w[ox:ox + cols * shapes].view(1, cols, shapes, m),
                          out=inter[start:start + rows * cols * shapes].view(rows, cols, shapes, m))
        else:
            torch.index_select(w, 0, self._x_index, out=inter)
            inter.mul_(torch.index_select(h, 0, self._y_index, out=union))
        torch.add(area_of(gx1, gy1, gx2, gy2), self._area, out=union).sub_(inter)
        if self._union_clamp:
            union.clamp_(min=1e-12)
        return inter.div_(union)

    def _gather_gt(self, boxes: Sequence[Tensor], labels: Sequence[Tensor]):
        if len(boxes) != len(labels):
            raise ValueError(f"got {len(boxes)} box tensors but {len(labels)} label tensors")
        device = self.default_boxes.device
        counts = [int(b.shape[0]) for b in boxes]
        if sum(counts) == 0:
            return None
        gt = torch.cat([b.to(device=device, dtype=torch.float32).reshape(-1, 4) for b in boxes])
        gt_labels = torch.cat([lb.to(device=device, dtype=torch.int64).reshape(-1) for lb in labels])
        # Built on the host (the counts are host ints), moved without a host sync.
        image = to_device_async(torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor(counts)), device)
        return gt, gt_labels, image

    def _match_sparse(self, gt: Tensor, image: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """The matching rules, listing positives only (uses ``nonzero``: a host sync on GPUs).

        Returns ``(keys [P], gt_index [P])``: the positive (image, default box) pairs as
        ``image * A + box``, sorted, and the ground truth each is matched to.
        """
        device = gt.device
        total, num_anchors = gt.shape[0], self.num_boxes
        cols = -(-total // 8) * 8  # a multiple of 8: rows can be tested 8 bytes at a time
        iou = self._iou_t(gt, cols)  # [A, cols]
        best = iou.amax(dim=0)  # per ground truth: its best IoU
        # The only pairs that matter: IoU above the threshold, and each ground truth's best.
        cut = torch.minimum(best, self._above_min)
        cut[total:] = math.inf
        cand = torch.ge(iou, cut, out=self._scratch("cand", iou.shape[0], cols, torch.bool))
        rows = torch.nonzero(cand.view(torch.int64).ne(0).any(dim=1)).flatten()
        r, gt_id = torch.nonzero(cand[rows], as_tuple=True)
        anchor = rows[r]
        value = iou[anchor, gt_id]

        # Per ground truth: the first default box of highest IoU.
        top = value == best[gt_id]
        best_anchor = torch.full((total,), num_anchors, dtype=torch.int64, device=device)
        best_anchor.scatter_reduce_(0, gt_id[top], anchor[top], reduce="amin")

        # Per (image, default box) with some IoU above the threshold: the highest IoU and,
        # among equal IoUs, the first ground truth.
        hit = value > self.iou_threshold
        gt_id, anchor, value = gt_id[hit], anchor[hit], value[hit]
        keys, inv = torch.unique(image[gt_id] * num_anchors + anchor, return_inverse=True)
        top_iou = torch.zeros(keys.numel(), device=device).scatter_reduce_(0, inv, value, "amax", include_self=False)
        win = value == top_iou[inv]
        winner = torch.full((keys.numel(),), total, dtype=torch.int64, device=device)
        winner.scatter_reduce_(0, inv[win], gt_id[win], reduce="amin")

        # Forced matches override: each ground truth takes its best default box; of several
        # ground truths sharing one, the last. Encoded above every IoU winner (total + 1 + m).
        ids = torch.arange(total, device=device)
        all_keys = torch.cat([keys, image * num_anchors + best_anchor])
        value = torch.cat([winner, ids + total + 1])
        keys, inv = torch.unique(all_keys, return_inverse=True)
        pick = torch.zeros(keys.numel(), dtype=torch.int64, device=device)
        pick.scatter_reduce_(0, inv, value, reduce="amax", include_self=False)
        forced = pick > total
        if not self._forced_positive:
            keys, pick, forced = keys[~forced], pick[~forced], forced[~forced]
        return keys, torch.where(forced, pick - total - 1, pick)

    def _match_dense(self, gt: Tensor, image: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """The matching rules with no host synchronisation (dense; for GPUs).

        Returns ``(gt_index [B * A], positive [B * A])``.
        """
        device = gt.device
        total, num_anchors = gt.shape[0], self.num_boxes
        iou = self._iou_t(gt, total)  # [A, M]
        best_anchor = iou.max(dim=0).indices  # per ground truth: the first default box of highest IoU
        # Per (image, default box): one segment reduction over the batch. IoU (>= 0, so its
        # float bits order like the values) in the high 32 bits, (M - 1 - index) in the low
        # ones: the max is the highest IoU and, among equal IoUs, the first ground truth.
        gt_id = torch.arange(total, device=device)
        key = iou.view(torch.int32).to(torch.int64).bitwise_left_shift_(32).bitwise_or_(total - 1 - gt_id)
        best = torch.zeros(num_anchors, batch, dtype=torch.int64, device=device)
        best.scatter_reduce_(1, image.expand(num_anchors, -1), key, reduce="amax", include_self=False)
        best = best.t().reshape(-1)  # [B * A]
        best_gt = (total - 1) - best.bitwise_and(0xFFFFFFFF)
        above = best.bitwise_right_shift(32).to(torch.int32).view(torch.float32) > self.iou_threshold
        # Forced matches: each ground truth takes its best default box; the last one wins.
        forced = torch.zeros(batch * num_anchors, dtype=torch.int64, device=device)
        forced.scatter_reduce_(0, image * num_anchors + best_anchor, gt_id + 1, reduce="amax")
        is_forced = forced > 0
        gt_index = torch.where(is_forced, forced - 1, best_gt)
        positive = (is_forced | above) if self._forced_positive else (above & ~is_forced)
        return gt_index, positive

    def match(self, boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Assign each default box a ground-truth box (the rules of :meth:`encode`).

        Returns ``(matched_boxes Tensor[B, A, 4] xyxy, labels Tensor[B, A] int64)``;
        background default boxes get label 0 (their matched box is meaningless).
        """
        batch, num_anchors = len(boxes), self.num_boxes
        device = self.default_boxes.device
        found = self._gather_gt(boxes, labels)
        if found is None:
            return (torch.zeros(batch, num_anchors, 4, device=device),
                    torch.zeros(batch, num_anchors, dtype=torch.int64, device=device))
        gt, gt_labels, image = found
        gt_index, positive = self._match_dense(gt, image, batch)
        matched_labels = torch.where(positive, gt_labels[gt_index], torch.zeros_like(gt_index))
        return gt[gt_index].view(batch, num_anchors, 4), matched_labels.view(batch, num_anchors)

    # -- coding -----------------------------------------------------------------------
    def encode_boxes(self, boxes_xyxy: Tensor) -> Tensor:
        """Regression targets of boxes ``[..., A, 4]`` (xyxy) against the default boxes."""
        return self._encode_boxes(boxes_xyxy, self.default_boxes)

    def _encode_boxes(self, boxes_xyxy: Tensor, d: Tensor) -> Tensor:
        g = xyxy_to_cxcywh(boxes_xyxy)
        vc, vs = self.variances
        txy = (g[..., :2] - d[..., :2]) / (vc * d[..., 2:])
        twh = torch.log(g[..., 2:] / d[..., 2:]) / vs
        return torch.cat([txy, twh], dim=-1)

    def encode(self, boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Match and encode a batch (SPEC.md section 4).

        Matching: each default box takes the ground truth of highest IoU, then each ground
        truth is forced onto its best default box; positives have IoU > ``iou_threshold``
        (forced ones count as IoU 2). Ties, exactly as the reference's ``max``/``argmax``:

        * a default box with equal IoU to several ground truths takes the first of them
          (lowest index in ``boxes[i]``);
        * a ground truth with equal IoU to several default boxes is forced onto the first
          (lowest default-box index);
        * when several ground truths are forced onto the same default box, the last of them
          (highest index) gets it.

        The whole batch is matched at once on its concatenated ground truth (one [A, sum N_i]
        IoU matrix, segment reductions over the images): work grows with the real number of
        boxes, never with the largest image times the batch. On CPU the positives are listed
        with ``nonzero``; elsewhere everything stays dense and needs no host synchronisation.
        Both give the same result (IoUs are bit for bit those of :func:`box_iou`).

        Args:
            boxes: per image ``Tensor[N_i, 4]`` (x1, y1, x2, y2) normalised, positive size.
            labels: per image ``Tensor[N_i]`` class labels in 1..num_classes-1.

        Returns:
            ``(loc Tensor[B, A, 4], labels Tensor[B, A])``: regression targets (zero for
            background default boxes) and per-default-box labels (0 = background).
        """
        return self._encode(boxes, labels)

    def _encode(self, boxes: Sequence[Tensor], labels: Sequence[Tensor], sparse: bool | None = None):
        batch, num_anchors = len(boxes), self.num_boxes
        device = self.default_boxes.device
        if sparse is None:
            sparse = device.type == "cpu"
        labels_t = torch.zeros(batch * num_anchors, dtype=torch.int64, device=device)
        loc = torch.zeros(batch * num_anchors, 4, device=device)
        found = self._gather_gt(boxes, labels)
        if found is not None:
            gt, gt_labels, image = found
            if sparse:
                # Targets of the positives only (a few per ground truth); same arithmetic per box.
                keys, gt_index = self._match_sparse(gt, image, batch)
                loc[keys] = self._encode_boxes(gt[gt_index], self.default_boxes[keys % num_anchors])
                labels_t[keys] = gt_labels[gt_index]
            else:
                # Background rows are replaced by the default box itself so that the log is finite.
                gt_index, positive = self._match_dense(gt, image, batch)
                safe = torch.where(positive[:, None], gt[gt_index], self.default_boxes_xyxy.repeat(batch, 1))
                loc = self._encode_boxes(safe.view(batch, num_anchors, 4), self.default_boxes).view(-1, 4)
                loc = torch.where(positive[:, None], loc, torch.zeros_like(loc))
                labels_t = torch.where(positive, gt_labels[gt_index], labels_t)
        return loc.view(batch, num_anchors, 4), labels_t.view(batch, num_anchors)

    def decode(self, loc: Tensor) -> Tensor:
        """Regression outputs ``[B, A, 4]`` -> boxes ``[B, A, 4]`` (x1, y1, x2, y2) normalised."""
        d = self.default_boxes.to(loc.dtype) if loc.dtype != self.default_boxes.dtype else self.default_boxes
        return self._decode(loc, d)

    def decode_rows(self, loc: Tensor, anchors: Tensor) -> Tensor:
        """Decode selected outputs: ``loc`` ``[N, 4]`` of default boxes ``anchors`` (``[N]`` indices).

        Same arithmetic as :meth:`decode`, so ``decode_rows(loc[b, idx], idx)`` equals
        ``decode(loc)[b, idx]`` bit for bit, at the cost of N boxes instead of A.
        """
        d = self.default_boxes[anchors]
        return self._decode(loc, d.to(loc.dtype) if loc.dtype != d.dtype else d)

    def _decode(self, loc: Tensor, d: Tensor) -> Tensor:
        vc, vs = self.variances
        cxcy = loc[..., :2] * vc * d[..., 2:] + d[..., :2]
        wh = torch.exp(loc[..., 2:] * vs) * d[..., 2:]
        return cxcywh_to_xyxy(torch.cat([cxcy, wh], dim=-1))
