"""YOLOv3 target assignment and loss, as darknet's yolo layer (``src/yolo_layer.c``, 2018 release).

Assignment (``forward_yolo_layer``, second loop; YOLOv3 paper arXiv:1804.02767 section 2.1):
each ground truth goes to the best of *all* anchors by shape-only IoU (boxes moved to the
origin; darknet ``box_iou`` of ``truth_shift`` against ``biases / net.w``), and is trained only
on the output scale whose ``mask`` holds that anchor (none if no mask does), at the cell of its
centre, ``i = (int)(x * grid_w)``, ``j = (int)(y * grid_h)``.

Loss: darknet does not compute a loss; it writes ``delta = target - output`` per channel and
passes ``delta`` straight back as minus the gradient w.r.t. the raw network output
(``backward_yolo_layer`` has no logistic gradient). The loss whose gradient is exactly that:

* ``xy``: ``box_scale * BCE-with-logits(raw, t)`` for x and y (``delta_yolo_box``:
  ``scale * (tx - sigmoid(raw))``), ``box_scale = 2 - w * h`` (w, h normalised);
* ``wh``: ``box_scale * 0.5 * (raw - t)^2`` for w and h (``scale * (tw - raw)``);
* ``obj``: BCE-with-logits, target 1, at each assigned (scale, anchor, cell);
* ``noobj``: BCE-with-logits, target 0, at every other prediction, except those whose
  decoded box has IoU > ``ignore_threshold`` with some ground truth of its image (any of
  them, also ones assigned to another scale or cell): those get no objectness loss;
* ``cls``: BCE-with-logits per class (independent logistics, multi-label; section 2.2),
  one-hot targets, only at assigned positions (``delta_yolo_class``).

BCE values include the entropy of the target (the x, y terms are not 0 at their optimum);
the gradients are darknet's deltas exactly. Each term is summed over the batch and divided by
the batch size ``B``: darknet sums the deltas of the whole batch and its SGD update uses
``learning_rate / batch`` (``update_convolutional_layer``), so the gradient of these terms
times the harness's learning rate is darknet's update.

Two ground truths on the same (scale, anchor, cell): the box targets and box scale are the
last one's (darknet overwrites ``delta`` in truth order), the objectness target is 1, and
every one of their classes has target 1 (the second ``delta_yolo_class`` call only sets its
own class). ``truth_thresh`` (darknet's extra positives above an IoU of ``truth_thresh``) is
1 in ``cfg/yolov3.cfg``, i.e. disabled, and not implemented.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...boxes import box_iou, cxcywh_to_xyxy, shape_iou, xyxy_to_cxcywh
from .anchors import YOLOV3_STRIDES
from .decode import decode_boxes, scale_view

__all__ = ["YOLOv3Assignment", "assign_targets", "best_truth_iou", "YOLOv3Loss", "LOSS_TERMS"]

LOSS_TERMS = ("xy", "wh", "obj", "noobj", "cls")
"""Names of the loss terms, in the order ``YOLOv3Loss`` returns them."""

# best_truth_iou works on at most this many (ground truth, prediction) pairs at a time; a pair
# costs about 64 bytes of temporaries (the gathered prediction box, corners, intersection,
# union), so a chunk needs ~130 MB whatever the batch, image size or boxes per image.
_MAX_PAIRS_PER_CHUNK = 1 << 21


class YOLOv3Assignment(NamedTuple):
    """Per ground truth (``G`` of them, flattened over the batch) targets; all ``Tensor[G]``
    unless stated. Fields of unassigned ground truths (``scale == -1``) are 0."""

    image: Tensor
    """int64 image index in the batch."""
    class_index: Tensor
    """int64 class index, 0..C-1."""
    best_anchor: Tensor
    """int64 index (0..N-1) of the best anchor over all ``N`` by shape IoU (first on ties)."""
    scale: Tensor
    """int64 index of the output scale whose mask holds ``best_anchor``; -1: none, or a box of
    zero width or height."""
    anchor: Tensor
    """int64 position of ``best_anchor`` in that scale's mask (0..A-1); -1 when unassigned."""
    cell_i: Tensor
    """int64 column of the centre's cell on that scale's grid."""
    cell_j: Tensor
    """int64 row of the centre's cell on that scale's grid."""
    target: Tensor
    """Tensor[G, 4] float32 (tx, ty, tw, th): centre offset in its cell (grid units, [0, 1])
    and log of the box size over the anchor size."""
    box_scale: Tensor
    """float32 ``2 - w * h`` (w, h normalised): the weight of the box terms."""

    @property
    def positive(self) -> Tensor:
        """Tensor[G] bool: the ground truth is trained on some scale."""
        return self.scale >= 0


def _check_masks(masks: Sequence[Sequence[int]], num_anchors: int) -> tuple[tuple[int, ...], ...]:
    masks = tuple(tuple(int(n) for n in mask) for mask in masks)
    flat = [n for mask in masks for n in mask]
    if any(n < 0 or n >= num_anchors for n in flat):
        raise ValueError(f"anchor masks {masks} index outside the {num_anchors} anchors")
    if len(set(flat)) != len(flat):
        raise ValueError(f"anchor masks {masks} share an anchor (darknet would train it on each "
                         "scale that holds it); not supported")
    if len({len(mask) for mask in masks}) > 1:
        raise ValueError(f"anchor masks {masks} differ in length")
    return masks


def assign_targets(boxes: Tensor, image_index: Tensor, class_index: Tensor, input_size: tuple[int, int],
                   anchors_px: Tensor, masks: Sequence[Sequence[int]],
                   grid_sizes: Sequence[tuple[int, int]] | None = None) -> YOLOv3Assignment:
    """Darknet's YOLOv3 assignment of every ground truth of a batch at once.

    Best anchor: ``argmax`` over all anchors of the shape-only IoU between the box size in
    pixels of the input (``w * W, h * H``) and the anchor size (pixels). Ties go to the lowest
    anchor index (darknet keeps the first best, ``iou > best_iou``; ``torch.argmax`` returns
    the first maximum). Cell: ``i = floor(x * grid_w)``, ``j = floor(y * grid_h)``, clamped
    into the grid (a centre at x == 1 or y == 1 lies in the last cell; darknet would index
    past the grid). Targets: ``tx = x * grid_w - i``, ``ty = y * grid_h - j``,
    ``tw = log(w * W / anchor_w)``, ``th = log(h * H / anchor_h)``; box scale ``2 - w * h``.
    A box of zero width or height is not assigned (darknet's ``log(0)``; its data loader drops
    such boxes).

    Args:
        boxes (Tensor[G, 4]): (cx, cy, w, h) normalised to [0, 1] of the network input.
        image_index (Tensor[G]): int image of each box in the batch.
        class_index (Tensor[G]): int class index (0..C-1), passed through.
        input_size: (H, W) of the network input, pixels.
        anchors_px (Tensor[N, 2]): all anchors (width, height), pixels of the network input
            (``anchors.YOLOV3_COCO_ANCHORS_PX``: 9 anchors, not rescaled with the input).
        masks: anchor indices per output scale, in output order (``anchors.YOLOV3_MASKS``).
        grid_sizes: (grid_h, grid_w) per output scale (the raw outputs' spatial sizes);
            default ``ceil(H / stride), ceil(W / stride)`` for ``anchors.YOLOV3_STRIDES``.

    Returns:
        ``YOLOv3Assignment`` on the device of ``boxes``.

    Raises:
        ValueError: on masks that index outside the anchors, share an anchor or differ in
            length, or on a number of grid sizes different from the number of masks.
    """
    height, width = input_size
    masks = _check_masks(masks, anchors_px.shape[0])
    if grid_sizes is None:
        grid_sizes = [(math.ceil(height / s), math.ceil(width / s)) for s in YOLOV3_STRIDES]
    if len(grid_sizes) != len(masks):
        raise ValueError(f"got {len(grid_sizes)} grid sizes for {len(masks)} anchor masks")
    dev = boxes.device
    boxes = boxes.float().reshape(-1, 4)
    anchors = anchors_px.to(device=dev, dtype=torch.float32)
    wh_px = torch.stack([boxes[:, 2] * width, boxes[:, 3] * height], dim=1)  # pixels of the input
    best = shape_iou(wh_px, anchors).argmax(dim=1)  # [G]; first maximum on ties, as darknet

    # Scale and slot of the best anchor (a loop over the anchors of the masks, not the boxes).
    valid = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    minus_one = torch.full_like(best, -1)
    scale, anchor = minus_one, minus_one
    grid_w = torch.ones_like(boxes[:, 0])
    grid_h = torch.ones_like(boxes[:, 0])
    for s, mask in enumerate(masks):
        for slot, n in enumerate(mask):
            hit = (best == n) & valid
            scale = torch.where(hit, s, scale)
            anchor = torch.where(hit, slot, anchor)
        in_scale = scale == s
        grid_h = torch.where(in_scale, float(grid_sizes[s][0]), grid_h)
        grid_w = torch.where(in_scale, float(grid_sizes[s][1]), grid_w)
    positive = scale >= 0

    fx, fy = boxes[:, 0] * grid_w, boxes[:, 1] * grid_h  # float32 products, as darknet's floats
    ci = torch.minimum(torch.floor(fx), grid_w - 1).clamp(min=0)
    cj = torch.minimum(torch.floor(fy), grid_h - 1).clamp(min=0)
    tw = torch.log(wh_px[:, 0] / anchors[best, 0])
    th = torch.log(wh_px[:, 1] / anchors[best, 1])
    target = torch.stack([fx - ci, fy - cj, tw, th], dim=1)
    zero = torch.zeros((), device=dev)
    target = torch.where(positive[:, None], target, zero)  # no -inf from zero-size boxes
    box_scale = torch.where(positive, 2 - boxes[:, 2] * boxes[:, 3], zero)
    zero_i = torch.zeros((), dtype=torch.int64, device=dev)
    return YOLOv3Assignment(
        image=image_index.to(device=dev, dtype=torch.int64).reshape(-1),
        class_index=class_index.to(device=dev, dtype=torch.int64).reshape(-1),
        best_anchor=best, scale=scale, anchor=anchor,
        cell_i=torch.where(positive, ci.long(), zero_i), cell_j=torch.where(positive, cj.long(), zero_i),
        target=target, box_scale=box_scale)


@torch.no_grad()
def best_truth_iou(pred_boxes: Tensor, gt_boxes: Tensor, gt_image: Tensor) -> Tensor:
    """Per prediction, its best IoU with the ground truths of its own image (0 if none).

    The ignore test of ``forward_yolo_layer`` (first loop: ``best_iou`` over every truth of the
    image). Works on (ground truth, prediction of the same image) pairs, ``P`` per ground
    truth, no padding to the largest image: ``P x G`` pairs in all, in chunks of at most
    2^21 pairs (~130 MB of temporaries). At 608 px (``P`` = 17,328 at stride 8), batch 64
    with 100 boxes per image that is 53 chunks; at COCO's ~7 boxes per image, 4.

    Args:
        pred_boxes (Tensor[B, P, 4]): (x1, y1, x2, y2) normalised.
        gt_boxes (Tensor[G, 4]): (x1, y1, x2, y2) normalised.
        gt_image (Tensor[G]): int64 image index of each ground truth.

    Returns:
        Tensor[B, P] float32.
    """
    batch, num_pred = pred_boxes.shape[:2]
    pred_boxes = pred_boxes.float()
    gt_boxes = gt_boxes.float()
    best = torch.zeros(batch, num_pred, device=pred_boxes.device)
    per_chunk = max(1, _MAX_PAIRS_PER_CHUNK // max(num_pred, 1))
    for lo in range(0, gt_boxes.shape[0], per_chunk):
        img = gt_image[lo:lo + per_chunk]
        iou = box_iou(pred_boxes[img], gt_boxes[lo:lo + per_chunk, None, :])[..., 0]  # [g, P]
        best.scatter_reduce_(0, img[:, None].expand_as(iou), iou, reduce="amax")
    return best


class YOLOv3Loss(nn.Module):
    """Darknet's YOLOv3 loss (see the module docstring for the terms and their sources).

    Args:
        anchors_px (Tensor[N, 2] or sequence of (w, h)): all anchors, pixels of the network
            input (``anchors.YOLOV3_COCO_ANCHORS_PX``).
        masks: anchor indices per output scale, in output order (``anchors.YOLOV3_MASKS``).
        num_classes: C (80 for COCO).
        ignore_threshold: predictions with IoU > this with a ground truth get no objectness
            loss: darknet ``cfg/yolov3.cfg`` ``ignore_thresh = .7`` (the paper, section 2.1: .5).

    Raises:
        ValueError: on bad masks (see ``assign_targets``).
    """

    def __init__(self, anchors_px, masks: Sequence[Sequence[int]], num_classes: int,
                 ignore_threshold: float) -> None:
        super().__init__()
        anchors = torch.as_tensor(anchors_px, dtype=torch.float32).reshape(-1, 2)
        self.register_buffer("anchors_px", anchors, persistent=False)
        self.masks = _check_masks(masks, anchors.shape[0])
        self.num_classes = int(num_classes)
        self.ignore_threshold = float(ignore_threshold)

    def forward(self, raw_outputs: Sequence[Tensor], gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                input_size: tuple[int, int]) -> dict[str, Tensor]:
        """The loss terms of a batch.

        Args:
            raw_outputs: per scale ``Tensor[B, A*(5+C), gh, gw]``, in the order of ``masks``
                (channels of anchor a: ``a*(5+C) + [tx, ty, tw, th, objectness, classes]``).
            gt_boxes: per image ``Tensor[N_i, 4]`` (x1, y1, x2, y2) normalised to the input.
            gt_labels: per image ``Tensor[N_i]`` int64 labels 1..C (class index + 1).
            input_size: (H, W) of the network input, pixels.

        Returns:
            ``{"xy", "wh", "obj", "noobj", "cls"}``: float32 scalars, each the sum over the batch
            divided by ``B``; their sum is the loss to minimise.

        Raises:
            ValueError: on a number of outputs other than the number of masks, a channel count
                other than ``A * (5 + C)``, or ground-truth lists of another length than ``B``.
        """
        if len(raw_outputs) != len(self.masks):
            raise ValueError(f"got {len(raw_outputs)} YOLO outputs for {len(self.masks)} anchor masks")
        batch = raw_outputs[0].shape[0]
        for raw, mask in zip(raw_outputs, self.masks):
            if raw.dim() != 4 or raw.shape[0] != batch or raw.shape[1] != len(mask) * (5 + self.num_classes):
                raise ValueError(f"a YOLO output must be [B={batch}, {len(mask)}*(5+{self.num_classes}), gh, gw]; "
                                 f"got {tuple(raw.shape)}")
        if len(gt_boxes) != batch or len(gt_labels) != batch:
            raise ValueError(f"got {len(gt_boxes)} box and {len(gt_labels)} label tensors for a batch of {batch}")
        dev = raw_outputs[0].device
        counts = [int(b.shape[0]) for b in gt_boxes]
        gt_xyxy = torch.cat([b.to(device=dev, dtype=torch.float32).reshape(-1, 4) for b in gt_boxes])
        labels = torch.cat([lb.to(device=dev, dtype=torch.int64).reshape(-1) for lb in gt_labels])
        image = torch.repeat_interleave(torch.arange(batch), torch.tensor(counts, dtype=torch.int64)).to(dev)
        anchors = self.anchors_px.to(dev)
        grid_sizes = [(int(r.shape[2]), int(r.shape[3])) for r in raw_outputs]
        assignment = assign_targets(xyxy_to_cxcywh(gt_xyxy), image, labels - 1, input_size, anchors,
                                    self.masks, grid_sizes)
        totals = [torch.zeros((), device=dev) for _ in LOSS_TERMS]
        for s, (raw, mask) in enumerate(zip(raw_outputs, self.masks)):
            terms = self._scale_terms(scale_view(raw, len(mask)).float(), s, anchors[list(mask)], assignment,
                                      gt_xyxy, input_size)
            totals = [t + u for t, u in zip(totals, terms)]
        return {name: t / batch for name, t in zip(LOSS_TERMS, totals)}

    def _scale_terms(self, view: Tensor, s: int, anchors: Tensor, asg: YOLOv3Assignment, gt_xyxy: Tensor,
                     input_size: tuple[int, int]) -> tuple[Tensor, ...]:
        """Summed (xy, wh, obj, noobj, cls) of one scale; ``view`` is ``Tensor[B, A, gh, gw, 5+C]``."""
        batch, num_anchors, gh, gw, _ = view.shape
        dev = view.device
        num_gt = asg.scale.shape[0]
        in_scale = asg.scale == s
        zero_i = torch.zeros((), dtype=torch.int64, device=dev)
        a = torch.where(in_scale, asg.anchor, zero_i)
        i = torch.where(in_scale, asg.cell_i, zero_i)
        j = torch.where(in_scale, asg.cell_j, zero_i)
        flat = ((asg.image * num_anchors + a) * gh + j) * gw + i  # [G] prediction of each truth
        gid = torch.arange(num_gt, device=dev)
        # Per prediction, the last ground truth of this scale assigned to it (darknet's box
        # target is the last one written); a dense map the size of the objectness map, no sync.
        last = torch.full((batch * num_anchors * gh * gw,), -1, dtype=torch.int64, device=dev)
        last.scatter_reduce_(0, flat, torch.where(in_scale, gid, -1), reduce="amax")
        owner = last[flat]
        winner = in_scale & (owner == gid)  # one per assigned prediction

        pred = view[asg.image, a, j, i]  # [G, 5+C] raw outputs at each truth's prediction
        zero = torch.zeros((), device=dev)
        t = asg.target
        xy = F.binary_cross_entropy_with_logits(pred[:, :2], t[:, :2], reduction="none").sum(1)
        wh = 0.5 * (pred[:, 2:4] - t[:, 2:4]).square().sum(1)
        xy = torch.where(winner, asg.box_scale * xy, zero).sum()
        wh = torch.where(winner, asg.box_scale * wh, zero).sum()

        # Class targets of a prediction: the union of the classes of its ground truths.
        cls_target = torch.zeros(num_gt, self.num_classes, device=dev)
        cls_target.index_put_((torch.where(in_scale, owner, gid), asg.class_index), in_scale.float(), accumulate=True)
        cls_target.clamp_(max=1.0)
        cls = F.binary_cross_entropy_with_logits(pred[:, 5:], cls_target, reduction="none").sum(1)
        cls = torch.where(winner, cls, zero).sum()

        positive = torch.zeros(batch * num_anchors * gh * gw, device=dev).index_add_(0, flat, in_scale.float()) > 0
        positive = positive.view(batch, num_anchors, gh, gw)
        with torch.no_grad():
            boxes = cxcywh_to_xyxy(decode_boxes(view[..., :4], anchors, input_size)).reshape(batch, -1, 4)
            best = best_truth_iou(boxes, gt_xyxy, asg.image).view(batch, num_anchors, gh, gw)
            # NaN IoUs (overflowed boxes) are not > threshold: not ignored, as darknet.
            negative = ~positive & ~(best > self.ignore_threshold)
        logit = view[..., 4]
        obj = torch.where(positive, F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit),
                                                                       reduction="none"), zero).sum()
        noobj = torch.where(negative, F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit),
                                                                         reduction="none"), zero).sum()
        return xy, wh, obj, noobj, cls
