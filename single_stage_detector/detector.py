"""The detector contract the training loop relies on, and its SSD implementation.

* training mode: ``detector(images, targets) -> dict[str, Tensor]`` of named, already
  weighted loss terms (their sum is what is minimised);
* evaluation mode: ``detector(images) -> list[dict]`` with per-image ``boxes``
  (Tensor[K, 4], x1 y1 x2 y2 normalised), ``scores`` (Tensor[K]), ``labels`` (Tensor[K]);
  ``detector(images, targets) -> (detections, loss terms)``: the same detections plus the
  training loss of the same forward pass (the val loss), nothing updated.

A new detector family (YOLO) is a new class with the same two modes; the loop is shared.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .box_coder import BoxCoder, DefaultBoxSpec, default_boxes
from .losses import MultiboxLoss
from .postprocess import postprocess

__all__ = ["SSDDetector", "Targets"]

# Either raw ground truth {"boxes": [Tensor[N_i, 4]], "labels": [Tensor[N_i]]} (encoded here,
# on the model's device) or targets already encoded by the input pipeline
# {"loc": Tensor[B, A, 4], "labels": Tensor[B, A]}.
Targets = Mapping[str, "Tensor | Sequence[Tensor]"]


class SSDDetector(nn.Module):
    """An SSD network plus its box coder, loss and post-processing.

    Args:
        model: maps ``images [B, 3, S, S]`` to ``(loc [B, A, 4], cls_logits [B, A, C])``.
        box_spec: the default-box geometry the model's outputs follow.
        clip_boxes: evaluation output boxes clipped to the image after NMS (NVIDIA v1.1);
            default False, the reference: boxes never clipped (see ``postprocess``).
    """

    def __init__(self, model: nn.Module, box_spec: DefaultBoxSpec, *, iou_threshold: float = 0.5,
                 neg_pos_ratio: int = 3, score_threshold: float = 0.05, nms_threshold: float = 0.5,
                 max_detections: int = 200, clip_boxes: bool = False) -> None:
        super().__init__()
        self.model = model
        self.box_spec = box_spec
        # A buffer, so that .to(device) moves the default boxes with the weights.
        self.register_buffer("default_boxes", default_boxes(box_spec), persistent=False)
        self.iou_threshold = iou_threshold
        self.loss = MultiboxLoss(neg_pos_ratio=neg_pos_ratio)
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections
        self.clip_boxes = clip_boxes
        self._coder: BoxCoder | None = None

    @property
    def eval_policy(self) -> dict:
        """The evaluation's post-processing settings (the MLPerf reference's), as reported with results."""
        return {"score_threshold": self.score_threshold, "nms_threshold": self.nms_threshold,
                "max_per_class": 200, "max_detections": self.max_detections, "clip_boxes": self.clip_boxes}

    @property
    def box_coder(self) -> BoxCoder:
        if self._coder is None or self._coder.default_boxes.device != self.default_boxes.device:
            self._coder = BoxCoder(self.default_boxes, iou_threshold=self.iou_threshold)
        return self._coder

    def encode_targets(self, boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return self.box_coder.encode(boxes, labels)

    def forward(self, images: Tensor, targets: Targets | None = None):
        """Training: the loss terms (``MultiboxLoss.terms``); evaluation: per-image detections, and
        with ``targets`` the pair ``(detections, loss terms)`` (the val loss of the same outputs).

        Raises:
            ValueError: in training mode without ``targets``.
        """
        loc, cls_logits = self.model(images)
        if self.training:
            if targets is None:
                raise ValueError("SSDDetector in training mode needs targets")
            return self._loss_terms(loc, cls_logits, targets)
        detections = postprocess(loc, cls_logits, self.default_boxes, box_coder=self.box_coder,
                                 score_threshold=self.score_threshold, nms_threshold=self.nms_threshold,
                                 max_per_class=200, max_detections=self.max_detections, clip_boxes=self.clip_boxes)
        if targets is None:
            return detections
        return detections, self._loss_terms(loc, cls_logits, targets)

    def _loss_terms(self, loc: Tensor, cls_logits: Tensor, targets: Targets) -> dict[str, Tensor]:
        if "loc" in targets:
            loc_t, labels_t = targets["loc"], targets["labels"]
        else:
            with torch.no_grad():
                loc_t, labels_t = self.encode_targets(targets["boxes"], targets["labels"])
        return self.loss.terms(loc, cls_logits, loc_t, labels_t)
