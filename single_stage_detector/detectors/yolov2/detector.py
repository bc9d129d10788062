"""YOLOv2 behind the harness's detector contract: network + region loss + region decoding.

* training mode: ``detector(images, {"boxes": [...], "labels": [...]}) -> dict`` of the loss
  terms ``xy``, ``wh``, ``obj``, ``noobj``, ``cls``, ``prior`` (``region_loss.RegionLoss``),
  whose sum is minimised; each call first adds the batch to the network's ``images_seen``
  (darknet's ``net.seen``, all processes' images);
* evaluation mode: ``detector(images) -> list[dict]`` per image with ``boxes`` (Tensor[K, 4]
  x1 y1 x2 y2 normalised, clamped to [0, 1]), ``scores`` (Tensor[K]) and ``labels``
  (Tensor[K] int64, 1..C) (``decode.postprocess_region``).

The grid is read from the output at every call and the anchors are in grid units, so any input
side that is a multiple of 32 works unchanged: multi-scale training (darknet: a new size from
320..608 every 10 batches) needs nothing else.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .decode import postprocess_region
from .region_loss import RegionLoss

__all__ = ["YOLOv2Detector"]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class YOLOv2Detector(nn.Module):
    """A YOLOv2 network plus its region loss and COCO evaluation decoding.

    Args:
        network: maps ``images [B, 3, H, W]`` to ``Tensor[B, A*(5+C), H/32, W/32]`` and holds a
            0-d int64 buffer ``images_seen`` (:class:`~.network.YOLOv2Network`).
        loss: the :class:`~.region_loss.RegionLoss` (its anchors are the decoder's).
        score_threshold, nms_threshold: the evaluation's score threshold and NMS IoU (darknet's
            ``validate_detector``: .005 and .45; seed 004: .001 and .6).
        max_detections: best detections kept per image (COCO's ``maxDets`` 100); None: all.
        pre_nms_top_k: best (box, class) candidates per image kept before NMS; None: all.
        multi_label: every class above the threshold per box (darknet) or the best one (seed 004).
    """

    def __init__(self, network: nn.Module, loss: RegionLoss, *, score_threshold: float = 0.005,
                 nms_threshold: float = 0.45, max_detections: int | None = 100, pre_nms_top_k: int | None = None,
                 multi_label: bool = True) -> None:
        super().__init__()
        self.model = network  # the harness contract: `detector.model` is the network
        self.loss = loss
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_detections = max_detections
        self.pre_nms_top_k = pre_nms_top_k
        self.multi_label = bool(multi_label)

    @property
    def anchors(self) -> Tensor:
        """Tensor[A, 2] anchors (width, height), grid units."""
        return self.loss.anchors

    @property
    def num_classes(self) -> int:
        return self.loss.num_classes

    @property
    def images_seen(self) -> int:
        """Training images seen so far (darknet's ``net.seen``), read from the network's buffer."""
        return int(self.model.images_seen)

    @property
    def eval_policy(self) -> dict:
        """How detections are selected at evaluation, for the run's log and results."""
        return {
            "decode": "darknet region layer (src/region_layer.c get_region_box), anchors in grid units",
            "score": "objectness * softmax class probability, " + (
                "every class above the threshold" if self.multi_label else "the best class per box"),
            "score_threshold": self.score_threshold,
            "nms": "greedy per image and class, suppress IoU > threshold (darknet do_nms_sort)",
            "nms_threshold": self.nms_threshold,
            "pre_nms_top_k": self.pre_nms_top_k,
            "max_detections": self.max_detections,
            "multi_label": self.multi_label,
            "clip_boxes": "to [0, 1] after NMS (darknet print_cocos)",
        }

    def forward(self, images: Tensor, targets: Mapping[str, Sequence[Tensor]] | None = None):
        """Training: the loss dict (see ``RegionLoss``); evaluation: per-image detections, and with
        ``targets`` the pair ``(detections, loss dict)``: the val loss of the same outputs, with the
        prior warm-up term as training has it now (``images_seen`` is not advanced).

        Raises:
            ValueError: ``targets`` missing (training) or without ``boxes`` and ``labels``.
        """
        raw = self.model(images)
        if self.training or targets is not None:
            if targets is None or "boxes" not in targets or "labels" not in targets:
                raise ValueError("YOLOv2Detector needs targets {'boxes': [...], 'labels': [...]} for its loss")
            seen = self.model.images_seen
            if self.training:
                with torch.no_grad():  # darknet: net.seen += batch before the forward pass
                    seen += images.shape[0] * _world_size()
            losses = self.loss(raw, targets["boxes"], targets["labels"], images_seen=seen)
            if self.training:
                return losses
        detections = postprocess_region(raw, self.loss.anchors, score_threshold=self.score_threshold,
                                        nms_threshold=self.nms_threshold, max_detections=self.max_detections,
                                        pre_nms_top_k=self.pre_nms_top_k, multi_label=self.multi_label)
        return detections if targets is None else (detections, losses)
