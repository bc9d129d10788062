"""YOLOv2 target assignment and loss: darknet's region layer (``src/region_layer.c``,
``forward_region_layer``, the ``cfg/yolov2.cfg`` settings), and seed 004's variant.

The paper (arXiv:1612.08242) gives no loss formula; darknet's region layer defines it. With
``[region] bias_match=1 softmax=1 rescore=1 object_scale=5 noobject_scale=1 class_scale=1
coord_scale=1 thresh=.6`` (``yolov2.cfg``):

Assignment: a ground truth (cx, cy, w, h normalised) belongs to the cell of its centre,
``i = (int)(cx * grid_w)``, ``j = (int)(cy * grid_h)``; of that cell's A anchors the one with
the best *shape-only* IoU with it (boxes moved to the origin; ``bias_match=1`` uses the anchor
size, not the current prediction) is responsible, ties to the lowest index (darknet keeps the
first best, ``iou > best_iou``). Its targets: ``tx = cx * grid_w - i``, ``ty = cy * grid_h -
j``, ``tw = log(w * grid_w / anchor_w)``, ``th = log(h * grid_h / anchor_h)`` (anchors in grid
units).

Darknet computes no loss: it writes ``delta = scale * (target - output)`` per channel, where
``output`` is the logistic of x, y and objectness and the softmax of the classes, and passes
``delta`` back unchanged as minus the gradient w.r.t. the raw network output
(``backward_region_layer`` has the logistic gradient commented out). The loss whose gradient is
exactly that delta, term by term (``variant="darknet"``):

* ``xy``: ``coord_scale * (2 - w h) * BCE-with-logits(raw, t)`` for x and y of each responsible
  prediction (``delta_region_box``: ``scale * (tx - sigmoid(raw))``; the ``2 - w h`` factor, w, h
  normalised, since March 2017);
* ``wh``: ``coord_scale * (2 - w h) * 0.5 * (raw - t)^2`` for w and h (``scale * (tw - raw)``);
* ``obj``: ``object_scale * BCE-with-logits(raw, IoU)`` at each responsible prediction, the
  target being the IoU of its current decoded box with the truth, not differentiated
  (``rescore=1``: ``object_scale * (iou - sigmoid(raw))``);
* ``noobj``: ``noobject_scale * BCE-with-logits(raw, 0)`` at every other prediction, except
  those whose decoded box has IoU > ``ignore_threshold`` (``thresh``, 0.6) with some ground truth
  of the image (any of them): those get no objectness loss;
* ``cls``: ``class_scale * cross-entropy(class logits, class)`` at each responsible prediction
  (softmax; ``delta_region_class``: ``scale * (onehot - softmax)``);
* ``prior``: the prior-matching warm-up: while the count of training images seen (darknet's
  ``net.seen``, incremented by the batch *before* the forward pass) is below
  ``prior_warmup_images`` (12,800), every prediction that no truth is assigned to gets
  ``prior_scale`` (.01) times the box terms toward its own anchor at the centre of its cell, i.e.
  targets tx = ty = 0.5, tw = th = 0: ``0.01 * (BCE(raw_x, .5) + BCE(raw_y, .5) + 0.5 raw_w^2 +
  0.5 raw_h^2)``. Assigned predictions are excluded: darknet overwrites their box deltas with
  the truth's. After that many images the term is 0 (and has no gradient).

``variant="seed004"`` (yjh0410/PyTorch_YOLOv2, YOLO.md): the same assignment and targets;
the cell's *other* anchors whose shape IoU with the truth is > ``ignore_threshold`` (0.5) get
no objectness loss (instead of darknet's predicted-box rule); ``obj`` and ``noobj`` are squared
errors on the sigmoid, ``object_scale * (sigmoid(raw) - IoU)^2`` and ``noobject_scale *
sigmoid(raw)^2``; ``wh`` is the full squared error ``(2 - w h) * (raw - t)^2``; ``xy`` (BCE),
``cls`` (softmax cross-entropy) as darknet's; no ``prior`` term (it is returned as 0).

BCE values include the entropy of the target (x, y and the prior are not 0 at their optimum);
the gradients are the deltas. Each term is summed over the batch and divided by the batch size
``B``: darknet sums the deltas of its batch and its SGD step uses ``learning_rate / batch``.

Two truths on the same (image, anchor, cell): the last one (in the batch's order) sets the box
targets, box scale, objectness target and class (darknet overwrites the deltas in truth order;
with softmax classes ``delta_region_class`` rewrites every class). A prediction that is both
responsible for one truth and ignored for another is responsible. Darknet reads at most 30
truths per image and stops at a truth with x == 0; neither limit is kept here. A truth of zero
width or height is not assigned (darknet's ``log(0)``; the data path drops such boxes).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...boxes import box_iou, cxcywh_to_xyxy, shape_iou, xyxy_to_cxcywh
from ..yolo.decode import decode_boxes, scale_view
from ..yolo.v3_loss import best_truth_iou

__all__ = ["LOSS_TERMS", "RegionAssignment", "assign_region_targets", "RegionLoss"]

LOSS_TERMS = ("xy", "wh", "obj", "noobj", "cls", "prior")
"""Names of the loss terms, in the order ``RegionLoss`` returns them."""


class RegionAssignment(NamedTuple):
    """Per ground truth (``G``, flattened over the batch) targets; ``Tensor[G]`` unless stated.
    Fields of unassigned truths (``valid`` False) are 0."""

    image: Tensor
    """int64 image index in the batch."""
    class_index: Tensor
    """int64 class index, 0..C-1."""
    anchor: Tensor
    """int64 responsible anchor (0..A-1): best shape IoU, first on ties."""
    cell_i: Tensor
    """int64 column of the centre's cell."""
    cell_j: Tensor
    """int64 row of the centre's cell."""
    target: Tensor
    """Tensor[G, 4] float32 (tx, ty, tw, th): offset in the cell (grid units, [0, 1]) and log of
    the box size over the anchor size."""
    box_scale: Tensor
    """float32 ``coord_scale * (2 - w * h)`` (w, h normalised): the weight of the box terms."""
    anchor_iou: Tensor
    """Tensor[G, A] float32 shape-only IoU of the truth with every anchor."""
    valid: Tensor
    """bool: the truth has positive width and height (and is assigned)."""


def assign_region_targets(boxes: Tensor, image_index: Tensor, class_index: Tensor, anchors: Tensor,
                          grid_size: tuple[int, int], coord_scale: float = 1.0) -> RegionAssignment:
    """Darknet's region-layer assignment of every ground truth of a batch at once (module docstring).

    The cell is clamped into the grid (a centre at x == 1 or y == 1 lies in the last cell; darknet
    would index past it).

    Args:
        boxes (Tensor[G, 4]): (cx, cy, w, h) normalised to [0, 1] of the network input.
        image_index (Tensor[G]): int image of each box in the batch.
        class_index (Tensor[G]): int class index (0..C-1), passed through.
        anchors (Tensor[A, 2]): (width, height) in grid units (``yolov2.cfg``: 5 COCO anchors).
        grid_size: (grid_h, grid_w) of the output (input / 32).
        coord_scale: ``coord_scale`` of ``yolov2.cfg`` (1).

    Returns:
        ``RegionAssignment`` on the device of ``boxes``.
    """
    grid_h, grid_w = grid_size
    dev = boxes.device
    boxes = boxes.float().reshape(-1, 4)
    anchors = anchors.to(device=dev, dtype=torch.float32)
    wh_grid = torch.stack([boxes[:, 2] * grid_w, boxes[:, 3] * grid_h], dim=1)
    ious = shape_iou(wh_grid, anchors)  # [G, A]
    best = ious.argmax(dim=1)  # first maximum on ties, as darknet
    valid = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    fx, fy = boxes[:, 0] * grid_w, boxes[:, 1] * grid_h
    ci = torch.floor(fx).clamp(0, grid_w - 1)
    cj = torch.floor(fy).clamp(0, grid_h - 1)
    target = torch.stack([fx - ci, fy - cj, torch.log(wh_grid[:, 0] / anchors[best, 0]),
                          torch.log(wh_grid[:, 1] / anchors[best, 1])], dim=1)
    zero = torch.zeros((), device=dev)
    zero_i = torch.zeros((), dtype=torch.int64, device=dev)
    return RegionAssignment(
        image=image_index.to(device=dev, dtype=torch.int64).reshape(-1),
        class_index=class_index.to(device=dev, dtype=torch.int64).reshape(-1),
        anchor=torch.where(valid, best, zero_i),
        cell_i=torch.where(valid, ci.long(), zero_i), cell_j=torch.where(valid, cj.long(), zero_i),
        target=torch.where(valid[:, None], target, zero),  # no -inf from zero-size boxes
        box_scale=torch.where(valid, coord_scale * (2 - boxes[:, 2] * boxes[:, 3]), zero),
        anchor_iou=ious, valid=valid)


class RegionLoss(nn.Module):
    """The YOLOv2 loss (module docstring for the terms and their sources).

    Args:
        anchors (Tensor[A, 2] or sequence of (w, h)): anchors in grid units.
        num_classes: C (80 for COCO).
        variant: ``"darknet"`` (``src/region_layer.c``) or ``"seed004"``.
        ignore_threshold: darknet: predicted-box IoU above which a prediction gets no no-object
            loss (``yolov2.cfg`` ``thresh = .6``); seed004: anchor shape IoU above which the
            cell's other anchors are ignored (0.5).
        object_scale, noobject_scale, coord_scale, class_scale: ``yolov2.cfg`` 5, 1, 1, 1.
        prior_warmup_images: the prior-matching term is on while fewer training images than
            this have been seen (darknet: 12800); 0: never. The seed004 variant has none.
        prior_scale: its weight (darknet: .01).

    Raises:
        ValueError: unknown ``variant``, anchors not ``[A, 2]`` positive, ``num_classes`` < 1.
    """

    def __init__(self, anchors, num_classes: int, *, variant: str = "darknet", ignore_threshold: float = 0.6,
                 object_scale: float = 5.0, noobject_scale: float = 1.0, coord_scale: float = 1.0,
                 class_scale: float = 1.0, prior_warmup_images: int = 12800, prior_scale: float = 0.01) -> None:
        super().__init__()
        if variant not in ("darknet", "seed004"):
            raise ValueError(f"loss variant must be 'darknet' or 'seed004', got {variant!r}")
        # Checked on the host: the model may be built on the meta device (shapes only).
        values = torch.as_tensor(anchors, dtype=torch.float32, device="cpu").tolist()
        if not values or any(not isinstance(a, list) or len(a) != 2 or min(a) <= 0 for a in values):
            raise ValueError(f"anchors must be [A, 2] positive (width, height) in grid units, got {values}")
        anchors = torch.tensor(values, dtype=torch.float32)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.register_buffer("anchors", anchors, persistent=False)
        self.num_classes = int(num_classes)
        self.variant = variant
        self.ignore_threshold = float(ignore_threshold)
        self.object_scale = float(object_scale)
        self.noobject_scale = float(noobject_scale)
        self.coord_scale = float(coord_scale)
        self.class_scale = float(class_scale)
        self.prior_warmup_images = int(prior_warmup_images) if variant == "darknet" else 0  # seed004: none
        self.prior_scale = float(prior_scale)

    @property
    def num_anchors(self) -> int:
        return int(self.anchors.shape[0])

    def forward(self, raw: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor], *,
                images_seen: Tensor | int = 0) -> dict[str, Tensor]:
        """The loss terms of a batch.

        Args:
            raw (Tensor[B, A*(5+C), gh, gw]): the network's output (channels of anchor a:
                ``a*(5+C) + [tx, ty, tw, th, objectness, C class logits]``).
            gt_boxes: per image ``Tensor[N_i, 4]`` (x1, y1, x2, y2) normalised to the input.
            gt_labels: per image ``Tensor[N_i]`` int64 labels 1..C (class index + 1).
            images_seen: training images seen including this batch (darknet's ``net.seen`` at
                this forward pass; a 0-d tensor keeps the step free of host synchronisation);
                the ``prior`` term is on while it is below ``prior_warmup_images``.

        Returns:
            ``{"xy", "wh", "obj", "noobj", "cls", "prior"}``: float32 scalars, each the sum over
            the batch divided by ``B``; their sum is the loss to minimise.

        Raises:
            ValueError: ``raw`` not ``[B, A*(5+C), gh, gw]``, or ground-truth lists of another
                length than ``B``.
        """
        num_anchors, num_classes = self.num_anchors, self.num_classes
        if raw.dim() != 4 or raw.shape[1] != num_anchors * (5 + num_classes):
            raise ValueError(f"a YOLOv2 output must be [B, {num_anchors}*(5+{num_classes}), gh, gw]; "
                             f"got {tuple(raw.shape)}")
        batch, _, gh, gw = raw.shape
        if len(gt_boxes) != batch or len(gt_labels) != batch:
            raise ValueError(f"got {len(gt_boxes)} box and {len(gt_labels)} label tensors for a batch of {batch}")
        view = scale_view(raw, num_anchors).float()  # [B, A, gh, gw, 5+C]
        dev = view.device
        anchors = self.anchors.to(dev)
        counts = torch.tensor([int(b.shape[0]) for b in gt_boxes], dtype=torch.int64)
        gt_xyxy = torch.cat([b.to(device=dev, dtype=torch.float32).reshape(-1, 4) for b in gt_boxes])
        labels = torch.cat([lb.to(device=dev, dtype=torch.int64).reshape(-1) for lb in gt_labels])
        image = torch.repeat_interleave(torch.arange(batch), counts).to(dev)
        asg = assign_region_targets(xyxy_to_cxcywh(gt_xyxy), image, labels - 1, anchors, (gh, gw), self.coord_scale)

        num_pred = batch * num_anchors * gh * gw
        num_gt = asg.image.shape[0]
        flat = ((asg.image * num_anchors + asg.anchor) * gh + asg.cell_j) * gw + asg.cell_i  # [G]
        gid = torch.arange(num_gt, device=dev)
        # The last truth assigned to each prediction sets its targets (darknet's overwrites).
        last = torch.full((num_pred,), -1, dtype=torch.int64, device=dev)
        last.scatter_reduce_(0, flat, torch.where(asg.valid, gid, -1), reduce="amax")
        winner = asg.valid & (last[flat] == gid)
        positive = torch.zeros(num_pred, device=dev).index_add_(0, flat, asg.valid.float()) > 0

        pred = view[asg.image, asg.anchor, asg.cell_j, asg.cell_i]  # [G, 5+C] raw outputs
        with torch.no_grad():
            boxes = cxcywh_to_xyxy(decode_boxes(view[..., :4], anchors, (gh, gw)))  # [B, A, gh, gw, 4]
            pred_box = boxes[asg.image, asg.anchor, asg.cell_j, asg.cell_i]
            iou = box_iou(pred_box[:, None, :], gt_xyxy[:, None, :])[:, 0, 0]  # [G] rescore target
        zero = torch.zeros((), device=dev)
        t = asg.target
        xy = F.binary_cross_entropy_with_logits(pred[:, :2], t[:, :2], reduction="none").sum(1)
        wh_factor = 0.5 if self.variant == "darknet" else 1.0
        wh = wh_factor * (pred[:, 2:4] - t[:, 2:4]).square().sum(1)
        xy = torch.where(winner, asg.box_scale * xy, zero).sum()
        wh = torch.where(winner, asg.box_scale * wh, zero).sum()
        cls = F.cross_entropy(pred[:, 5:], asg.class_index, reduction="none")
        cls = self.class_scale * torch.where(winner, cls, zero).sum()

        logit = view[..., 4].reshape(-1)  # [B*A*gh*gw]
        with torch.no_grad():
            if self.variant == "darknet":
                best = best_truth_iou(boxes.reshape(batch, -1, 4), gt_xyxy, asg.image).reshape(-1)
                ignored = best > self.ignore_threshold  # NaN IoUs (overflowed boxes) are not ignored
            else:
                # The cell's other anchors whose shape IoU with a truth is above the threshold.
                others = (asg.anchor_iou > self.ignore_threshold) & asg.valid[:, None]
                others &= torch.arange(num_anchors, device=dev) != asg.anchor[:, None]
                cells = ((asg.image[:, None] * num_anchors + torch.arange(num_anchors, device=dev)) * gh
                         + asg.cell_j[:, None]) * gw + asg.cell_i[:, None]  # [G, A]
                ignored = torch.zeros(num_pred, device=dev).index_add_(0, cells.reshape(-1),
                                                                       others.reshape(-1).float()) > 0
            negative = ~positive & ~ignored
        if self.variant == "darknet":
            obj = F.binary_cross_entropy_with_logits(pred[:, 4], iou, reduction="none")
            noobj = F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit), reduction="none")
        else:
            obj = (torch.sigmoid(pred[:, 4]) - iou).square()
            noobj = torch.sigmoid(logit).square()
        obj = self.object_scale * torch.where(winner, obj, zero).sum()
        noobj = self.noobject_scale * torch.where(negative, noobj, zero).sum()

        if self.prior_warmup_images > 0:
            seen = torch.as_tensor(images_seen, device=dev)
            active = (seen < self.prior_warmup_images) & ~positive  # [B*A*gh*gw]
            box_raw = view[..., :4].reshape(-1, 4)
            prior = (F.binary_cross_entropy_with_logits(box_raw[:, :2], torch.full_like(box_raw[:, :2], 0.5),
                                                        reduction="none").sum(1)
                     + 0.5 * box_raw[:, 2:].square().sum(1))
            prior = self.prior_scale * torch.where(active, prior, zero).sum()
        else:
            prior = zero
        terms = (xy, wh, obj, noobj, cls, prior)
        return {name: value / batch for name, value in zip(LOSS_TERMS, terms)}
