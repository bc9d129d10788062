"""The YOLOv1 loss (arXiv:1506.02640 section 2.2), vectorised over the batch.

Assignment. A ground truth belongs to the cell holding its centre (``i = floor(cx * S)``,
``j = floor(cy * S)``, clamped into the grid). The paper predicts one object per cell; when
several ground truths have their centre in the same cell, **the largest (by area) is the
cell's object, the first in the image's order on equal areas**, and the others are not
trained at all (deterministic; darknet keeps the first of its randomly shuffled boxes,
``fill_truth_region`` in ``src/data.c``). Of the cell's B predictors, the **responsible**
one is the one whose current prediction has the highest IoU with the object (the first on
ties); when every IoU is 0, the one with the smallest squared distance in (cx, cy, w, h)
(darknet's ``box_rmse`` fallback in ``forward_detection_layer``, ``src/detection_layer.c``).

Loss (sum of squared errors; each term summed over the batch and divided by the batch size):

* ``xy``: ``lambda_coord * [(x - x^)^2 + (y - y^)^2]`` of responsible predictors, x, y the
  centre's offsets in the cell;
* ``wh``: ``lambda_coord * [(sqrt(w) - sqrt(w^))^2 + (sqrt(h) - sqrt(h^))^2]`` of responsible
  predictors, w, h fractions of the image; the network predicts ``t = sqrt(w / prior_w)``
  (``network`` module docstring), so ``sqrt(w) = sqrt(prior_w) * t`` is linear in its output;
* ``obj``: ``(C - C^)^2`` of responsible predictors, weight 1, target ``C^`` = IoU(predicted
  box, ground truth), detached (the paper's definition; darknet ``rescore=1``), or 1
  (``confidence_target="one"``, seed 001);
* ``noobj``: ``lambda_noobj * C^2`` of **every predictor that is not responsible**, in cells
  without an object and the other predictors of object cells alike (the paper's
  ``1^noobj_ij``; skipping the second box of an object cell is a common tutorial bug);
* ``cls``: ``sum_c w_c (p(c) - p^(c))^2`` in cells holding an object, p^ one-hot of the
  cell's object, ``w_c = 1`` (the paper) or inverse class frequencies (seed 001,
  :func:`inverse_frequency_weights`).

``lambda_coord = 5``, ``lambda_noobj = 0.5``: the paper, section 2.2.

Normalisation: the paper's loss is a sum over one image's cells; summing over the batch and
dividing by the batch size keeps that per-image scale at any batch size, and equals darknet's
update, which sums the deltas of the batch and divides its learning rate by the batch.
(Darknet's deltas are ``scale * (target - output)``, the gradient of half of these squares:
the factor 2 is absorbed by the learning rate.)
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ...boxes import box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh
from .network import BOX_CHANNELS

__all__ = ["LOSS_TERMS", "CellObjects", "assign_cells", "decode_cell_boxes", "responsible_predictor",
           "YOLOv1Loss", "inverse_frequency_weights"]

LOSS_TERMS = ("xy", "wh", "obj", "noobj", "cls")
"""Names of the loss terms, in the order ``YOLOv1Loss`` returns them."""


class CellObjects(NamedTuple):
    """Per ground truth (``G``, flattened over the batch), its cell and whether it is the cell's object."""

    image: Tensor
    """int64 [G] image index in the batch."""
    cell_i: Tensor
    """int64 [G] column of the centre's cell."""
    cell_j: Tensor
    """int64 [G] row of the centre's cell."""
    is_object: Tensor
    """bool [G]: the cell's object (the largest of the truths centred in the cell, the first of equals)."""


def assign_cells(boxes_cxcywh: Tensor, image: Tensor, batch: int, grid_size: int) -> CellObjects:
    """The cell of every ground truth and the one object each cell keeps (module docstring).

    Args:
        boxes_cxcywh (Tensor[G, 4]): (cx, cy, w, h) normalised to [0, 1] of the input.
        image (Tensor[G]): int64 image index of each box.
        batch: number of images N.
        grid_size: S.

    Returns:
        :class:`CellObjects` on the device of ``boxes_cxcywh``.
    """
    s = grid_size
    dev = boxes_cxcywh.device
    cx, cy, w, h = boxes_cxcywh.float().unbind(-1)
    ci = torch.floor(cx * s).clamp(0, s - 1).long()
    cj = torch.floor(cy * s).clamp(0, s - 1).long()
    image = image.to(device=dev, dtype=torch.int64)
    cell = (image * s + cj) * s + ci
    area = w * h
    g = area.shape[0]
    # Largest area per cell (amax returns one of the values, so == is exact), then the first of equals.
    best_area = torch.full((batch * s * s,), -1.0, device=dev).scatter_reduce(0, cell, area, reduce="amax")
    index = torch.arange(g, device=dev)
    candidate = area == best_area[cell]
    first = torch.full((batch * s * s,), g, dtype=torch.int64, device=dev).scatter_reduce(
        0, cell, torch.where(candidate, index, g), reduce="amin")
    return CellObjects(image=image, cell_i=ci, cell_j=cj, is_object=first[cell] == index)


def decode_cell_boxes(box_raw: Tensor, cell_i: Tensor, cell_j: Tensor, prior_wh: Tensor, grid_size: int) -> Tensor:
    """(cx, cy, w, h) normalised of raw predictions ``(x, y, t_w, t_h)`` in cells (i, j).

    ``cx = (i + x) / S``, ``cy = (j + y) / S``, ``w = prior_w * t_w**2``, ``h = prior_h * t_h**2``
    (``network`` module docstring).

    Args:
        box_raw (Tensor[..., B, 4]): raw x, y, t_w, t_h.
        cell_i, cell_j (Tensor[...]): the cell's column and row (broadcast against ``box_raw[..., 0, 0]``).
        prior_wh (Tensor[B, 2]): the predictors' prior shapes (ones without anchors).
        grid_size: S.

    Returns:
        Tensor[..., B, 4] float32 (cx, cy, w, h), fractions of the input.
    """
    box_raw = box_raw.float()
    prior = prior_wh.to(device=box_raw.device, dtype=torch.float32)
    cx = (cell_i.to(box_raw.dtype)[..., None] + box_raw[..., 0]) / grid_size
    cy = (cell_j.to(box_raw.dtype)[..., None] + box_raw[..., 1]) / grid_size
    w = prior[:, 0] * box_raw[..., 2].square()
    h = prior[:, 1] * box_raw[..., 3].square()
    return torch.stack([cx, cy, w, h], dim=-1)


def responsible_predictor(pred_cxcywh: Tensor, truth_cxcywh: Tensor) -> tuple[Tensor, Tensor]:
    """The responsible predictor of each object and the IoU of every predictor with it.

    Args:
        pred_cxcywh (Tensor[K, B, 4]): the B decoded predictions of each object's cell.
        truth_cxcywh (Tensor[K, 4]): the objects.

    Returns:
        ``(index Tensor[K] int64, iou Tensor[K, B] float32)``: highest IoU (first on ties), or
        the smallest squared (cx, cy, w, h) distance when every IoU is 0 (darknet).
    """
    iou = box_iou(cxcywh_to_xyxy(pred_cxcywh), cxcywh_to_xyxy(truth_cxcywh)[:, None, :])[..., 0]
    distance = (pred_cxcywh - truth_cxcywh[:, None, :]).square().sum(-1)
    best = torch.where(iou.amax(1) > 0, iou.argmax(1), distance.argmin(1))
    return best, iou


def inverse_frequency_weights(labels: np.ndarray | Tensor, num_classes: int) -> Tensor:
    """Seed 001's class weights, ``w_c`` inverse to class c's frequency among the training boxes.

    ``w_c = N / (K * n_c)`` with ``n_c`` the boxes of class c, ``N`` all boxes and ``K`` the
    classes that have boxes: proportional to 1 / frequency (the seed's definition), scaled so
    that the average weight of a training box is 1 (``sum_c (n_c / N) w_c = 1``), which keeps
    the class term at the scale of the unweighted one. A class without training boxes gets 1.

    Args:
        labels: int labels 1..C of every training box.
        num_classes: C.

    Returns:
        Tensor[C] float32, index c = label - 1.

    Raises:
        ValueError: on a label outside 1..C.
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
    if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > num_classes):
        raise ValueError(f"class labels must be in 1..{num_classes}, got {int(labels.min())}..{int(labels.max())}")
    counts = torch.bincount(labels - 1, minlength=num_classes).double()
    present = counts > 0
    k = int(present.sum())
    weights = torch.ones(num_classes, dtype=torch.float64)
    if k:
        weights[present] = counts.sum() / (k * counts[present])
    return weights.float()


class YOLOv1Loss(nn.Module):
    """The paper's loss (module docstring) on the network's ``Tensor[N, S, S, 5B + C]`` output.

    Args:
        num_classes: C.
        boxes_per_cell: B.
        lambda_coord, lambda_noobj: the paper's 5 and 0.5.
        confidence_target: ``iou`` (the paper) or ``one`` (seed 001).

    The class weights are the buffer ``class_weights`` (Tensor[C], ones: the paper), set by
    :meth:`set_class_weights`.

    Raises:
        ValueError: an unknown ``confidence_target``.
    """

    def __init__(self, num_classes: int, boxes_per_cell: int, *, lambda_coord: float = 5.0,
                 lambda_noobj: float = 0.5, confidence_target: str = "iou") -> None:
        super().__init__()
        if confidence_target not in ("iou", "one"):
            raise ValueError(f"confidence_target must be iou or one, got {confidence_target!r}")
        self.num_classes, self.boxes_per_cell = int(num_classes), int(boxes_per_cell)
        self.lambda_coord, self.lambda_noobj = float(lambda_coord), float(lambda_noobj)
        self.confidence_target = confidence_target
        self.register_buffer("class_weights", torch.ones(self.num_classes), persistent=False)

    @torch.no_grad()
    def set_class_weights(self, weights: Tensor) -> None:
        """Use ``weights`` (Tensor[C], >= 0) on the class term; ValueError on a wrong shape or a negative value."""
        weights = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if weights.shape[0] != self.num_classes or bool((weights < 0).any()):
            raise ValueError(f"class weights must be {self.num_classes} values >= 0, got {tuple(weights.shape)}")
        self.class_weights.copy_(weights.to(self.class_weights.device))

    def forward(self, output: Tensor, gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                prior_wh: Tensor) -> dict[str, Tensor]:
        """The loss terms of a batch.

        Args:
            output (Tensor[N, S, S, 5B + C]): the network's raw output.
            gt_boxes: per image ``Tensor[N_i, 4]`` (x1, y1, x2, y2) normalised to the input.
            gt_labels: per image ``Tensor[N_i]`` int64 labels 1..C.
            prior_wh (Tensor[B, 2]): the predictors' prior shapes (``network.prior_wh``).

        Returns:
            ``{"xy", "wh", "obj", "noobj", "cls"}``: float32 scalars, weighted, each the sum over
            the batch divided by N; their sum is the loss to minimise.

        Raises:
            ValueError: on an output that is not ``[N, S, S, 5B + C]`` or ground-truth lists of
                another length than N.
        """
        b_, c_ = self.boxes_per_cell, self.num_classes
        if output.dim() != 4 or output.shape[1] != output.shape[2] or output.shape[3] != BOX_CHANNELS * b_ + c_:
            raise ValueError(f"a YOLOv1 output must be [N, S, S, {BOX_CHANNELS}*{b_}+{c_}]; got {tuple(output.shape)}")
        batch, s = output.shape[0], output.shape[1]
        if len(gt_boxes) != batch or len(gt_labels) != batch:
            raise ValueError(f"got {len(gt_boxes)} box and {len(gt_labels)} label tensors for a batch of {batch}")
        dev = output.device
        out = output.float()
        boxes_raw = out[..., :BOX_CHANNELS * b_].reshape(batch, s, s, b_, BOX_CHANNELS)
        class_scores = out[..., BOX_CHANNELS * b_:]
        counts = torch.tensor([int(b.shape[0]) for b in gt_boxes], dtype=torch.int64)
        gt_xyxy = torch.cat([b.to(device=dev, dtype=torch.float32).reshape(-1, 4) for b in gt_boxes])
        labels = torch.cat([lb.to(device=dev, dtype=torch.int64).reshape(-1) for lb in gt_labels])
        image = torch.repeat_interleave(torch.arange(batch), counts).to(dev)
        gt = xyxy_to_cxcywh(gt_xyxy)
        cells = assign_cells(gt, image, batch, s)

        # The objects (one per cell): K of them, gathered with index ops (no loop over boxes).
        keep = cells.is_object
        img, ci, cj, truth, cls = cells.image[keep], cells.cell_i[keep], cells.cell_j[keep], gt[keep], labels[keep] - 1
        k = truth.shape[0]
        pred = boxes_raw[img, cj, ci]  # [K, B, 5]
        prior = prior_wh.to(device=dev, dtype=torch.float32)
        with torch.no_grad():
            decoded = decode_cell_boxes(pred[..., :4], ci, cj, prior, s)
            best, iou = responsible_predictor(decoded, truth)
        rows = torch.arange(k, device=dev)
        resp = pred[rows, best]  # [K, 5]
        zero = out.new_zeros(())

        tx, ty = truth[:, 0] * s - ci, truth[:, 1] * s - cj
        xy = ((resp[:, 0] - tx).square() + (resp[:, 1] - ty).square()).sum()
        sqrt_prior = prior[best].sqrt()  # [K, 2]
        wh = ((sqrt_prior[:, 0] * resp[:, 2] - truth[:, 2].clamp(min=0).sqrt()).square()
              + (sqrt_prior[:, 1] * resp[:, 3] - truth[:, 3].clamp(min=0).sqrt()).square()).sum()
        target = iou[rows, best] if self.confidence_target == "iou" else torch.ones(k, device=dev)
        obj = (resp[:, 4] - target).square().sum()

        responsible = torch.zeros(batch, s, s, b_, dtype=torch.bool, device=dev)
        responsible[img, cj, ci, best] = True
        noobj = torch.where(responsible, zero, boxes_raw[..., 4].square()).sum()

        one_hot = torch.zeros(k, c_, device=dev)
        one_hot[rows, cls] = 1.0
        cls_term = (self.class_weights.to(dev) * (class_scores[img, cj, ci] - one_hot).square()).sum()
        terms = (self.lambda_coord * xy, self.lambda_coord * wh, obj, self.lambda_noobj * noobj, cls_term)
        return {name: t / batch for name, t in zip(LOSS_TERMS, terms)}
