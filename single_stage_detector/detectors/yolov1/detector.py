"""YOLOv1 behind the harness's detector contract: network + the paper's loss + decoding.

* training mode: ``detector(images, {"boxes": [...], "labels": [...]}) -> dict`` of the loss
  terms ``xy``, ``wh``, ``obj``, ``noobj``, ``cls`` (``loss.YOLOv1Loss``), whose sum is minimised;
* evaluation mode: ``detector(images) -> list[dict]`` per image with ``boxes`` (Tensor[K, 4]
  x1 y1 x2 y2 normalised, clamped to [0, 1]), ``scores`` (Tensor[K]) and ``labels``
  (Tensor[K] int64, 1..C) (``decode.postprocess_yolov1``).
"""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor, nn

from .decode import postprocess_yolov1
from .loss import YOLOv1Loss

__all__ = ["YOLOv1Detector"]


class YOLOv1Detector(nn.Module):
    """A :class:`~.network.YOLOv1Network` plus the paper's loss and the evaluation policy.

    Args:
        network: maps images to ``Tensor[N, S, S, 5B + C]`` and holds ``prior_wh`` (Tensor[B, 2]).
        lambda_coord, lambda_noobj, confidence_target: see :class:`~.loss.YOLOv1Loss`.
        score_threshold, nms_threshold: darknet's YOLOv1 validation (``validate_yolo``,
            ``src/yolo.c``: ``thresh = .001``, ``iou_thresh = .5``).
        max_detections: best detections kept per image (COCO's ``maxDets`` 100); None: all.
        pre_nms_top_k: best (box, class) candidates per image kept before NMS (None: all).
    """

    def __init__(self, network: nn.Module, *, lambda_coord: float = 5.0, lambda_noobj: float = 0.5,
                 confidence_target: str = "iou", score_threshold: float = 0.001, nms_threshold: float = 0.5,
                 max_detections: int | None = 100, pre_nms_top_k: int | None = None) -> None:
        super().__init__()
        self.model = network  # the harness contract: `detector.model` is the network
        self.loss = YOLOv1Loss(network.num_classes, network.boxes_per_cell, lambda_coord=lambda_coord,
                               lambda_noobj=lambda_noobj, confidence_target=confidence_target)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_detections = max_detections
        self.pre_nms_top_k = pre_nms_top_k

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def prior_wh(self) -> Tensor:
        """Tensor[B, 2] prior shapes (fractions of the input side; ones without anchors)."""
        return self.model.prior_wh

    @property
    def eval_policy(self) -> dict:
        """How detections are selected at evaluation, for the run's log and results."""
        return {
            "decode": "YOLOv1 (arXiv:1506.02640): x, y in the cell, w = prior_w * t^2 of the image",
            "score": "max(confidence, 0) * max(class score, 0), every class of every predictor",
            "score_threshold": self.score_threshold,
            "nms": "greedy per image and class, suppress IoU > threshold (darknet do_nms_sort)",
            "nms_threshold": self.nms_threshold,
            "pre_nms_top_k": self.pre_nms_top_k,
            "max_detections": self.max_detections,
            "clip_boxes": "to [0, 1] after NMS",
        }

    def forward(self, images: Tensor, targets: Mapping[str, Sequence[Tensor]] | None = None):
        """Training: the loss dict (see ``YOLOv1Loss``); evaluation: per-image detections, and with
        ``targets`` the pair ``(detections, loss dict)`` (the val loss of the same outputs).

        Raises:
            ValueError: ``targets`` missing (training) or without ``boxes`` and ``labels``.
        """
        output = self.model(images)
        if self.training or targets is not None:
            if targets is None or "boxes" not in targets or "labels" not in targets:
                raise ValueError("YOLOv1Detector needs targets {'boxes': [...], 'labels': [...]} for its loss")
            losses = self.loss(output, targets["boxes"], targets["labels"], self.model.prior_wh)
            if self.training:
                return losses
        detections = postprocess_yolov1(output, self.model.prior_wh, self.num_classes,
                                        score_threshold=self.score_threshold, nms_threshold=self.nms_threshold,
                                        max_detections=self.max_detections, pre_nms_top_k=self.pre_nms_top_k)
        return detections if targets is None else (detections, losses)
