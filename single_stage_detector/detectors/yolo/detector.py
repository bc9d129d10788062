"""YOLOv3 behind the harness's detector contract: network + darknet loss + darknet decoding.

* training mode: ``detector(images, {"boxes": [...], "labels": [...]}) -> dict`` of the loss
  terms ``xy``, ``wh``, ``obj``, ``noobj``, ``cls`` (``v3_loss.YOLOv3Loss``), whose sum is
  minimised;
* evaluation mode: ``detector(images) -> list[dict]`` per image with ``boxes`` (Tensor[K, 4]
  x1 y1 x2 y2 normalised, clamped to [0, 1]), ``scores`` (Tensor[K]) and ``labels``
  (Tensor[K] int64, 1..C) (``decode.postprocess_yolo``).

The input size is read from ``images.shape[-2:]`` at every call, so multi-scale training
(darknet: a new size from 320..608 every 10 batches) needs nothing else: the anchors stay in
pixels of the network input.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor, nn

from .anchors import YOLOV3_COCO_ANCHORS_PX, YOLOV3_MASKS
from .decode import postprocess_yolo
from .v3_loss import YOLOv3Loss

__all__ = ["YOLOv3Detector"]


class YOLOv3Detector(nn.Module):
    """A YOLOv3 network plus darknet's assignment, loss and COCO evaluation decoding.

    Args:
        network: maps ``images [B, 3, H, W]`` to a list of ``len(masks)`` raw outputs
            ``Tensor[B, A*(5+C), H/stride, W/stride]`` (strides 32, 16, 8; channels of anchor a:
            ``a*(5+C) + [tx, ty, tw, th, objectness, C class logits]``).
        anchors_px: all anchors (width, height), pixels of the network input
            (default: darknet's COCO anchors, ``cfg/yolov3.cfg``).
        masks: anchor indices per output (default 6,7,8 / 3,4,5 / 0,1,2, ``cfg/yolov3.cfg``).
        num_classes: C (80 for COCO).
        ignore_threshold: no objectness loss for predictions with IoU > this with a ground
            truth: 0.7 is darknet's ``cfg/yolov3.cfg`` (``ignore_thresh = .7``); the paper
            (arXiv:1804.02767 section 2.1) says 0.5.
        score_threshold, nms_threshold: darknet's COCO evaluation (``examples/detector.c``,
            ``validate_detector``: ``thresh = .005``, ``nms = .45``; NMS suppresses IoU > it).
        max_detections: best detections kept per image (COCO's ``maxDets`` 100); None: all, as
            darknet writes them.
        pre_nms_top_k: best (box, class) candidates per image kept before NMS; None (default):
            all, as darknet. A cap bounds evaluation time of an untrained network.
    """

    def __init__(self, network: nn.Module, anchors_px=YOLOV3_COCO_ANCHORS_PX,
                 masks: Sequence[Sequence[int]] = YOLOV3_MASKS, num_classes: int = 80,
                 ignore_threshold: float = 0.7, score_threshold: float = 0.005, nms_threshold: float = 0.45,
                 max_detections: int | None = 100, pre_nms_top_k: int | None = None) -> None:
        super().__init__()
        self.model = network  # the harness contract: `detector.model` is the network
        self.loss = YOLOv3Loss(anchors_px, masks, num_classes, ignore_threshold)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_detections = max_detections
        self.pre_nms_top_k = pre_nms_top_k

    @property
    def anchors_px(self) -> Tensor:
        """Tensor[N, 2] anchors (width, height), pixels of the network input."""
        return self.loss.anchors_px

    @property
    def masks(self) -> tuple[tuple[int, ...], ...]:
        return self.loss.masks

    @property
    def num_classes(self) -> int:
        return self.loss.num_classes

    @property
    def eval_policy(self) -> dict:
        """How detections are selected at evaluation, for the run's log and results."""
        return {
            "decode": "darknet yolo layer (src/yolo_layer.c get_yolo_box)",
            "score": "objectness * sigmoid(class logit), multi-label",
            "score_threshold": self.score_threshold,
            "objectness_threshold": self.score_threshold,
            "nms": "greedy per image and class, suppress IoU > threshold (darknet do_nms_sort)",
            "nms_threshold": self.nms_threshold,
            "pre_nms_top_k": self.pre_nms_top_k,
            "max_detections": self.max_detections,
            "clip_boxes": "to [0, 1] after NMS (darknet print_cocos)",
        }

    def forward(self, images: Tensor, targets: Mapping[str, Sequence[Tensor]] | None = None):
        """Training: the loss dict (see ``YOLOv3Loss``); evaluation: per-image detections, and with
        ``targets`` the pair ``(detections, loss dict)`` (the val loss of the same outputs).

        Raises:
            ValueError: ``targets`` missing (training) or without ``boxes`` and ``labels``.
        """
        input_size = (int(images.shape[-2]), int(images.shape[-1]))
        raw_outputs = self.model(images)
        if self.training or targets is not None:
            if targets is None or "boxes" not in targets or "labels" not in targets:
                raise ValueError("YOLOv3Detector needs targets {'boxes': [...], 'labels': [...]} for its loss")
            losses = self.loss(raw_outputs, targets["boxes"], targets["labels"], input_size)
            if self.training:
                return losses
        detections = postprocess_yolo(raw_outputs, self.loss.anchors_px, self.loss.masks, input_size,
                                      score_threshold=self.score_threshold, nms_threshold=self.nms_threshold,
                                      max_detections=self.max_detections, pre_nms_top_k=self.pre_nms_top_k)
        return detections if targets is None else (detections, losses)
