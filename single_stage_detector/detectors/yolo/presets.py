"""YOLOv3 presets.

* ``yolov3_darknet53``: the paper/darknet model (arXiv:1804.02767; darknet ``cfg/yolov3.cfg``):
  Darknet-53, 416 input (320 and 608 by ``--input-size``: the pixel anchors stay), the COCO
  anchors, darknet's ignore threshold 0.7 (the cfg since May 2018; the paper says 0.5) and its
  COCO evaluation policy (score > 0.005, NMS IoU 0.45; at most 100 detections per image, the
  COCO metric's limit). Its darknet schedule is ``configs/config_1xH100_YOLOV3.sh``.
* ``yolov3_tiny_cpu``: the same design, narrow (width 8) and shallow (one residual block per
  stage), for 128-px inputs on a couple of CPU cores: the demo on the synthetic dataset. Its
  anchors are k-means anchors (``kmeans-anchors --num 9 --input-size 128``) of the synthetic
  training set, in pixels of the 128-px input.
"""
from __future__ import annotations

from dataclasses import dataclass

from .anchors import YOLOV3_COCO_ANCHORS_PX, YOLOV3_MASKS

__all__ = ["YOLOv3Preset", "YOLOV3_DARKNET53", "YOLOV3_TINY_CPU", "YOLO_PRESETS"]


@dataclass(frozen=True)
class YOLOv3Preset:
    """Everything needed to build a YOLOv3 detector.

    Attributes:
        name: registry key.
        input_size: default network input side S in pixels (a multiple of 32).
        num_classes: object classes C (80 for COCO; no background class in YOLO).
        width, stage_blocks: Darknet-53's base width (32) and residual blocks per stage
            ((1, 2, 8, 8, 4)); smaller for the CPU preset.
        anchors_px: 9 anchors (width, height) in pixels of the network input.
        masks: anchor indices per output scale (strides 32, 16, 8).
        ignore_threshold: IoU above which an unassigned prediction gets no objectness loss.
        score_threshold, nms_threshold, max_detections: the evaluation policy.
        pre_nms_top_k: at most this many (box, class) candidates per image enter NMS, the
            best-scored (mmdetection's YOLOv3 test setting ``nms_pre=1000``); darknet has no
            cap (None), which makes an early, untrained evaluation take hours: nearly every
            prediction passes 0.005 for every class.
        objectness_prior: initial objectness probability of the output convs (None: plain init).
        quality_target: COCO AP@[.5:.95] at which a run stops.
        description: one line for ``--help`` / logs.
    """

    name: str
    input_size: int = 416
    num_classes: int = 80
    width: int = 32
    stage_blocks: tuple[int, ...] = (1, 2, 8, 8, 4)
    anchors_px: tuple[tuple[float, float], ...] = YOLOV3_COCO_ANCHORS_PX
    masks: tuple[tuple[int, ...], ...] = YOLOV3_MASKS
    ignore_threshold: float = 0.7
    score_threshold: float = 0.005
    nms_threshold: float = 0.45
    max_detections: int = 100
    pre_nms_top_k: int | None = 1000
    objectness_prior: float | None = None
    quality_target: float = 0.23
    description: str = ""
    family: str = "yolov3"
    is_benchmark: bool = False
    backbone: str = "darknet53"

    def __post_init__(self) -> None:
        if self.input_size % 32:
            raise ValueError(f"preset {self.name!r}: input_size {self.input_size} is not a multiple of 32")
        if sorted(i for m in self.masks for i in m) != list(range(len(self.anchors_px))):
            raise ValueError(f"preset {self.name!r}: masks {self.masks} must use each of the "
                             f"{len(self.anchors_px)} anchors once")

    @property
    def eval_policy(self) -> dict:
        return {"score_threshold": self.score_threshold, "nms_threshold": self.nms_threshold,
                "max_detections": self.max_detections, "pre_nms_top_k": self.pre_nms_top_k}


YOLOV3_DARKNET53 = YOLOv3Preset(
    name="yolov3_darknet53",
    # Below what a from-scratch run of darknet's schedule reaches at 416 (YOLO.md: mmdetection,
    # 273 epochs, 30.9 AP on val2017; darknet's own weights re-scored: 31.2), so that a
    # reproduction of configs/config_1xH100_YOLOV3.sh can stop instead of ending "aborted".
    quality_target=0.30,
    description="YOLOv3 with Darknet-53 at 416 (darknet cfg: ignore 0.7, eval 0.005 / 0.45 / 100)",
)

YOLOV3_TINY_CPU = YOLOv3Preset(
    name="yolov3_tiny_cpu",
    input_size=128,
    width=8,
    stage_blocks=(1, 1, 1, 1, 1),
    # `kmeans-anchors data/synthetic/annotations/instances_train2017.json --num 9 --input-size 128`
    # (seed 0, the 5,828 boxes of the default synthetic training set): mean IoU 0.74, BPR 1.0.
    anchors_px=((12, 23), (22, 14), (28, 26), (20, 46), (48, 26), (42, 45), (32, 69), (69, 40), (66, 67)),
    objectness_prior=0.01,
    quality_target=0.23,
    description="small YOLOv3 for 128x128 inputs that trains on a few CPU cores (demo, not the benchmark)",
)

YOLO_PRESETS = (YOLOV3_DARKNET53, YOLOV3_TINY_CPU)
