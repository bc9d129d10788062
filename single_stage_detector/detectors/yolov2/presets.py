"""YOLOv2 presets and anchor sets.

* ``yolov2_darknet19``: the paper/darknet model (arXiv:1612.08242; darknet ``cfg/yolov2.cfg``):
  Darknet-19, passthrough 64 -> darknet's reorg, 416 input (13 x 13; any multiple of 32 by
  ``--input-size`` / ``--multi-scale``: the anchors are in grid units), the ``yolov2.cfg`` COCO
  anchors, darknet's region loss (``loss_variant`` "darknet") and its COCO evaluation policy
  (score > 0.005, NMS IoU 0.45). Its schedule is ``configs/config_1xH100_YOLOV2.sh``.
* ``yolov2_resnet50``: seed 004 (yjh0410/PyTorch_YOLOv2): torchvision ResNet-50 (ImageNet
  weights from a file, ``--pretrained-backbone``), C5 -> 1x1 1024 -> 3x3 1024 -> 3x3 1024,
  passthrough from C4 (1x1 to 128, space-to-depth to 512), concat -> 3x3 1024 -> output; its
  anchors; its loss (``loss_variant`` "seed004": best anchor positive, other anchors of the cell
  with shape IoU > 0.5 ignored, objectness squared error on the sigmoid with target IoU and
  weight 5 / 1, BCE on tx, ty, squared error on tw, th, box terms x (2 - w h), softmax
  cross-entropy classes, no prior-matching warm-up); its evaluation (score > 0.001, NMS 0.6,
  the best class per box).
* ``yolov2_tiny_cpu``: the darknet design, narrow and shallow, for 128-px inputs (a 4 x 4 grid)
  on a couple of CPU cores: the demo on the synthetic dataset. Anchors: k-means (``kmeans-anchors
  --num 5 --input-size 128 --units grid``) of the synthetic training set, in grid units.

Anchors of every YOLOv2 preset are (width, height) **in grid cells** of the stride-32 output
(YOLO.md; darknet ``[region] anchors``): multiply by 32 for pixels of the network input. They do
not change with the input size: a 9.77-cell anchor is 313 px at 416 and 469 px at 608.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["YOLOV2_COCO_ANCHORS", "YOLOV2_PAPER_ANCHORS", "SEED004_ANCHORS", "LOSS_VARIANTS", "YOLOv2Preset",
           "YOLOV2_DARKNET19", "YOLOV2_RESNET50", "YOLOV2_TINY_CPU", "YOLOV2_PRESETS", "IMAGENET_MEAN", "IMAGENET_STD"]

YOLOV2_COCO_ANCHORS: tuple[tuple[float, float], ...] = (
    (0.57273, 0.677385), (1.87446, 2.06253), (3.33843, 5.47434), (7.88282, 3.52778), (9.77052, 9.16828))
"""darknet ``cfg/yolov2.cfg`` COCO anchors (since March 2017), grid units."""

YOLOV2_PAPER_ANCHORS: tuple[tuple[float, float], ...] = (
    (0.738768, 0.874946), (2.42204, 2.65704), (4.30971, 7.04493), (10.246, 4.59428), (12.6868, 11.8741))
"""The paper-era darknet COCO anchors (Nov 2016), grid units (YOLO.md); kept for reference."""

SEED004_ANCHORS: tuple[tuple[float, float], ...] = (
    (0.53, 0.79), (1.71, 2.36), (2.89, 6.44), (6.33, 3.79), (9.03, 9.74))
"""Seed 004's COCO anchors (yjh0410/PyTorch_YOLOv2), grid units."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""torchvision's ImageNet normalisation, which its ResNet-50 weights expect."""

LOSS_VARIANTS = ("darknet", "seed004")


@dataclass(frozen=True)
class YOLOv2Preset:
    """Everything needed to build a YOLOv2 detector.

    Attributes:
        name: registry key.
        input_size: default network input side S in pixels (a multiple of 32; grid S / 32).
        num_classes: object classes C (80 for COCO; no background class).
        backbone: ``"darknet19"`` or ``"resnet50"``.
        width, stage_convs: Darknet-19's first-conv width (32) and convs per stage
            ((1, 1, 3, 3, 5, 5)); smaller for the CPU preset. Unused for ResNet-50.
        neck_kernels, head_channels, passthrough_channels, reorg_order: the head
            (:class:`~.network.YOLOv2Network`).
        anchors: (width, height) per anchor, grid units (module docstring).
        loss_variant: ``"darknet"`` (``src/region_layer.c``: ignore by predicted-box IoU > 
            ``ignore_threshold`` with any truth; objectness, x, y as darknet's deltas (logistic
            form); w, h half squared error; the prior-matching warm-up) or ``"seed004"``
            (ignore: the cell's other anchors with shape IoU > ``ignore_threshold``; objectness
            squared error on the sigmoid; w, h full squared error; no warm-up). See
            :mod:`.region_loss`.
        ignore_threshold: 0.6 (``yolov2.cfg`` ``thresh = .6``) or 0.5 (seed 004).
        object_scale, noobject_scale, coord_scale, class_scale: loss weights (``yolov2.cfg``:
            5, 1, 1, 1; seed 004: 5, 1, 1, 1).
        prior_warmup_images, prior_scale: darknet's prior matching: while fewer than this many
            training images have been seen, every prediction's box is pulled toward its anchor
            at the cell centre with this scale (``src/region_layer.c``: 12800, .01); 0: never.
        score_threshold, nms_threshold, max_detections, pre_nms_top_k, multi_label: the
            evaluation policy (``eval_policy``): darknet ``validate_detector`` 0.005 / 0.45 with
            every class above the threshold (multi-label); seed 004 0.001 / 0.6 with the best
            class of each box only.
        mean, std: input normalisation ``(x / 255 - mean) / std`` (darknet: none, RGB / 255).
        objectness_prior: initial objectness probability of the output conv (None: plain init).
        quality_target: COCO AP@[.5:.95] at which a run stops.
        description: one line for ``--help`` / logs.
    """

    name: str
    input_size: int = 416
    num_classes: int = 80
    backbone: str = "darknet19"
    width: int = 32
    stage_convs: tuple[int, ...] = (1, 1, 3, 3, 5, 5)
    neck_kernels: tuple[int, ...] = (3, 3)
    head_channels: int = 1024
    passthrough_channels: int = 64
    reorg_order: str = "darknet"
    anchors: tuple[tuple[float, float], ...] = YOLOV2_COCO_ANCHORS
    loss_variant: str = "darknet"
    ignore_threshold: float = 0.6
    object_scale: float = 5.0
    noobject_scale: float = 1.0
    coord_scale: float = 1.0
    class_scale: float = 1.0
    prior_warmup_images: int = 12800
    prior_scale: float = 0.01
    score_threshold: float = 0.005
    nms_threshold: float = 0.45
    max_detections: int = 100
    pre_nms_top_k: int | None = 1000
    multi_label: bool = True
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    objectness_prior: float | None = None
    quality_target: float = 0.21
    description: str = ""
    family: str = "yolov2"
    is_benchmark: bool = False

    def __post_init__(self) -> None:
        if self.input_size % 32 or self.input_size < 32:
            raise ValueError(f"preset {self.name!r}: input_size {self.input_size} is not a positive multiple of 32")
        if self.backbone not in ("darknet19", "resnet50"):
            raise ValueError(f"preset {self.name!r}: backbone must be darknet19 or resnet50, got {self.backbone!r}")
        if self.loss_variant not in LOSS_VARIANTS:
            raise ValueError(f"preset {self.name!r}: loss_variant must be one of {LOSS_VARIANTS}, "
                             f"got {self.loss_variant!r}")
        if not self.anchors or any(len(a) != 2 or min(a) <= 0 for a in self.anchors):
            raise ValueError(f"preset {self.name!r}: anchors must be positive (width, height) pairs in grid units")

    @property
    def grid_size(self) -> int:
        """Cells per side of the output at the preset's input size (``input_size / 32``)."""
        return self.input_size // 32

    @property
    def anchors_px(self) -> tuple[tuple[float, float], ...]:
        """The anchors in pixels of the network input (grid units x 32), for reports."""
        return tuple((32 * w, 32 * h) for w, h in self.anchors)

    @property
    def eval_policy(self) -> dict:
        return {"score_threshold": self.score_threshold, "nms_threshold": self.nms_threshold,
                "max_detections": self.max_detections, "pre_nms_top_k": self.pre_nms_top_k,
                "multi_label": self.multi_label}

    @property
    def loss_settings(self) -> dict:
        """The keyword arguments of :class:`~.region_loss.RegionLoss` (besides anchors and classes)."""
        return {"variant": self.loss_variant, "ignore_threshold": self.ignore_threshold,
                "object_scale": self.object_scale, "noobject_scale": self.noobject_scale,
                "coord_scale": self.coord_scale, "class_scale": self.class_scale,
                "prior_warmup_images": self.prior_warmup_images if self.loss_variant == "darknet" else 0,
                "prior_scale": self.prior_scale}


YOLOV2_DARKNET19 = YOLOv2Preset(
    name="yolov2_darknet19",
    # Published COCO test-dev AP 21.6 (arXiv:1612.08242 Table 5; YOLO.md).
    quality_target=0.21,
    description="YOLOv2 with Darknet-19 at 416 (darknet yolov2.cfg: region loss, eval 0.005 / 0.45 / 100)",
)

YOLOV2_RESNET50 = YOLOv2Preset(
    name="yolov2_resnet50",
    backbone="resnet50",
    neck_kernels=(1, 3, 3),
    passthrough_channels=128,
    reorg_order="space_to_depth",
    anchors=SEED004_ANCHORS,
    loss_variant="seed004",
    ignore_threshold=0.5,
    score_threshold=0.001,
    nms_threshold=0.6,
    multi_label=False,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    # Seed 004's COCO val2017 AP at 416: 29.0 (YOLO.md).
    quality_target=0.28,
    description="YOLOv2 with an ImageNet ResNet-50 at 416 (seed 004: its head, anchors, loss and eval 0.001 / 0.6)",
)

YOLOV2_TINY_CPU = YOLOv2Preset(
    name="yolov2_tiny_cpu",
    input_size=128,
    width=8,
    stage_convs=(1, 1, 1, 1, 3, 3),
    head_channels=256,
    passthrough_channels=32,
    reorg_order="space_to_depth",
    # `kmeans-anchors data/synthetic/annotations/instances_train2017.json --num 5 --input-size 128
    # --units grid` (seed 0, the 5,828 boxes of the default synthetic training set): mean IoU 0.68,
    # BPR 1.0.
    anchors=((0.6031, 0.5251), (0.7108, 1.0263), (1.5394, 0.9872), (1.0402, 1.8223), (2.0875, 1.8793)),
    objectness_prior=0.01,
    quality_target=0.23,
    description="small YOLOv2 for 128x128 inputs that trains on a few CPU cores (demo, not the benchmark)",
)

YOLOV2_PRESETS = (YOLOV2_DARKNET19, YOLOV2_RESNET50, YOLOV2_TINY_CPU)
