"""YOLOv1 presets.

* ``yolov1_resnet34``: the YOLOv1 detector of the paper (arXiv:1506.02640: S 7, B 2, 448 input,
  the loss of section 2.2 with a confidence target of IoU(prediction, truth)) on an ImageNet
  ResNet-34 instead of the paper's own 20 pretrained conv layers, as seed 000 plans it:
  torchvision's ResNet-34 (``resnet34-333f7ec4.pth``, the file the SSD benchmark's
  ``get_resnet34_backbone.sh`` fetches) up to ``layer4`` (stride 32: 14x14 at 448), then the
  paper's last four conv layers (3x3 1024, 3x3 1024 stride 2 to reach 7x7, 3x3 1024, 3x3 1024)
  and its two fully connected layers (4096 with dropout 0.5, then 7 x 7 x 90). Its schedule
  (backbone frozen for the first epochs, then fine-tuned at a lower LR, seed 000) is
  ``configs/config_1xH100_YOLOV1.sh``.
* ``yolov1_coursework``: seed 001's model: the paper's 24-conv network (its table A, with
  BatchNorm and leaky ReLU 0.1), a 1,024-unit hidden fully connected layer instead of 4,096,
  128x128 input, confidence target 1, inverse class-frequency weights on the class term,
  horizontal flip and a random affine warp (translation, scale, rotation). Its optimiser
  recipe (AdamW, cosine annealing, gradient clipping, 35 epochs) is
  ``configs/config_1xA100_YOLOV1_COURSEWORK.sh``.
* ``yolov1_tiny_cpu``: a small network trained from scratch on 128-px inputs on a couple of CPU
  cores: the demo on the synthetic dataset (``make demo PRESET=yolov1_tiny_cpu``). Paper loss
  and decoding; a fully convolutional head (one 1x1 conv per cell) instead of the fully
  connected layers, on an 8x8 grid (stride 16).
"""
from __future__ import annotations

from dataclasses import dataclass

from ...data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["YOLOv1Preset", "YOLOV1_RESNET34", "YOLOV1_COURSEWORK", "YOLOV1_TINY_CPU", "YOLOV1_PRESETS",
           "BACKBONES", "HEADS", "CONFIDENCE_TARGETS", "CLASS_WEIGHTS", "DARKNET_RGB"]

BACKBONES = ("resnet34", "darknet24", "tiny")
"""Backbone kinds (``network.build_backbone``)."""

HEADS = ("fc", "conv")
"""``fc``: the paper's two fully connected layers over the whole map; ``conv``: a 1x1 conv per cell."""

CONFIDENCE_TARGETS = ("iou", "one")
"""Confidence target of a responsible predictor: ``iou`` = IoU(prediction, truth) (the paper,
section 2.2; darknet ``rescore=1``); ``one`` = 1 (seed 001)."""

CLASS_WEIGHTS = ("none", "inverse-frequency")
"""Weights of the class term: ``none`` (the paper) or inverse class frequency of the training
boxes (seed 001, section 2.4.3), computed at the start of a run (``loss.inverse_frequency_weights``)."""

DARKNET_RGB = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
"""Darknet's input normalisation: RGB / 255, no mean or std (``src/image.c`` load_image_color)."""


@dataclass(frozen=True)
class YOLOv1Preset:
    """Everything needed to build a YOLOv1 detector.

    Attributes:
        name: registry key.
        input_size: default network input side in pixels (a multiple of 32; ``--input-size``
            may change it: the grid stays S x S, see ``network.YOLOv1Network``).
        num_classes: C (80 for COCO).
        grid_size: S, cells per side (paper: 7).
        boxes_per_cell: B, box predictors per cell (paper: 2; darknet's ``yolov1.cfg``: 3).
        backbone: one of :data:`BACKBONES`.
        tiny_widths: channels of the ``tiny`` backbone's conv layers (a 2x2 max-pool after each
            but the last): ``len - 1`` pools, stride ``2 ** (len - 1)``.
        head_convs: the (channels, stride) of the 3x3 conv layers between the backbone and the
            output layers (paper: (1024, 1), (1024, 2), (1024, 1), (1024, 1)).
        head: one of :data:`HEADS`.
        fc_pool: side the last conv map is average-pooled to before the fully connected head
            (7 for the paper at 448; identity when the map already has that side).
        fc_hidden: units of the first fully connected layer (paper: 4096; seed 001: 1024).
        dropout: dropout after the first fully connected layer (paper: 0.5).
        lambda_coord, lambda_noobj: the paper's loss weights (section 2.2: 5 and 0.5).
        confidence_target: one of :data:`CONFIDENCE_TARGETS`.
        class_weights: one of :data:`CLASS_WEIGHTS`.
        anchors: prior shapes (width, height) of the B predictors, fractions of the input side;
            empty: none (the paper: w, h predicted as fractions of the image).
        kmeans_anchors: the B prior shapes come from k-means (1 - IoU distance, YOLOv2 section
            2) on the training boxes at the start of a run (seed 000's anchors).
        mean, std: input normalisation ``(x / 255 - mean) / std``.
        augmentation: keyword arguments of ``data.yolo_transforms.YOLOTrainTransform``.
        score_threshold, nms_threshold, max_detections, pre_nms_top_k: the evaluation policy.
        quality_target: COCO AP@[.5:.95] at which a run stops.
        description: one line for logs.

    Raises:
        ValueError: on a field outside its allowed values (naming the preset and the field).
    """

    name: str
    input_size: int = 448
    num_classes: int = 80
    grid_size: int = 7
    boxes_per_cell: int = 2
    backbone: str = "resnet34"
    tiny_widths: tuple[int, ...] = ()
    head_convs: tuple[tuple[int, int], ...] = ((1024, 1), (1024, 2), (1024, 1), (1024, 1))
    head: str = "fc"
    fc_pool: int = 7
    fc_hidden: int = 4096
    dropout: float = 0.5
    lambda_coord: float = 5.0
    lambda_noobj: float = 0.5
    confidence_target: str = "iou"
    class_weights: str = "none"
    anchors: tuple[tuple[float, float], ...] = ()
    kmeans_anchors: bool = False
    mean: tuple[float, float, float] = DARKNET_RGB[0]
    std: tuple[float, float, float] = DARKNET_RGB[1]
    augmentation: tuple[tuple[str, object], ...] = ()
    score_threshold: float = 0.001
    nms_threshold: float = 0.5
    max_detections: int = 100
    pre_nms_top_k: int | None = 1000
    quality_target: float = 0.2
    description: str = ""
    family: str = "yolov1"
    is_benchmark: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"preset {self.name!r}: {field} {getattr(self, field)!r} {why}")

        if self.input_size < 32 or self.input_size % 32:
            raise bad("input_size", "is not a positive multiple of 32")
        for field in ("num_classes", "grid_size", "boxes_per_cell", "fc_pool", "fc_hidden"):
            if int(getattr(self, field)) < 1:
                raise bad(field, "must be >= 1")
        for field, allowed in (("backbone", BACKBONES), ("head", HEADS), ("confidence_target", CONFIDENCE_TARGETS),
                               ("class_weights", CLASS_WEIGHTS)):
            if getattr(self, field) not in allowed:
                raise bad(field, f"is not one of {', '.join(allowed)}")
        if self.backbone == "tiny" and len(self.tiny_widths) < 1:
            raise bad("tiny_widths", "must list the tiny backbone's channels")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if self.lambda_coord < 0 or self.lambda_noobj < 0:
            raise ValueError(f"preset {self.name!r}: loss weights must be >= 0")
        if self.anchors:
            if self.kmeans_anchors:
                raise bad("anchors", "cannot be combined with kmeans_anchors")
            if len(self.anchors) != self.boxes_per_cell:
                raise bad("anchors", f"must give one (width, height) per predictor (B = {self.boxes_per_cell})")
            if any(len(a) != 2 or not all(0.0 < float(v) <= 1.0 for v in a) for a in self.anchors):
                raise bad("anchors", "must be (width, height) pairs in (0, 1] (fractions of the input side)")

    @property
    def has_anchors(self) -> bool:
        """Whether each predictor has a prior shape (given or from k-means)."""
        return bool(self.anchors) or self.kmeans_anchors

    @property
    def eval_policy(self) -> dict:
        return {"score_threshold": self.score_threshold, "nms_threshold": self.nms_threshold,
                "max_detections": self.max_detections, "pre_nms_top_k": self.pre_nms_top_k}


YOLOV1_RESNET34 = YOLOv1Preset(
    name="yolov1_resnet34",
    input_size=448,
    backbone="resnet34",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    # The paper (section 2.2): random scaling and translations of up to 20% of the image size,
    # exposure and saturation up to a factor 1.5 in HSV; darknet's loader also flips.
    augmentation=(("translate", 0.2), ("scale", (0.8, 1.2)), ("hue", 0.0), ("saturation", 1.5),
                  ("exposure", 1.5)),
    # No published COCO figure for YOLOv1 (VOC 2007: 63.4 mAP@0.5); a first goal, not a reproduction.
    quality_target=0.15,
    description="YOLOv1 (S 7, B 2, paper loss) on an ImageNet ResNet-34 at 448 (seed 000)",
)

YOLOV1_COURSEWORK = YOLOv1Preset(
    name="yolov1_coursework",
    input_size=128,
    backbone="darknet24",
    fc_pool=2,  # the 24-conv network maps 128 px to 2x2 (stride 64)
    fc_hidden=1024,
    confidence_target="one",
    class_weights="inverse-frequency",
    # Seed 001: horizontal flip and random affine transformations (translation, scaling,
    # rotation); it gives no magnitudes: these are ours. No colour jitter.
    augmentation=(("translate", 0.2), ("scale", (0.8, 1.2)), ("degrees", 10.0), ("hue", 0.0),
                  ("saturation", 1.0), ("exposure", 1.0)),
    # The seed reports mAP@0.5 of about 0.30 on a 5-class COCO subset; no AP@[.5:.95] on COCO: our guess.
    quality_target=0.05,
    description="seed 001's YOLOv1: 24 conv + FC 1024, 128 input, confidence target 1, class weights",
)

YOLOV1_TINY_CPU = YOLOv1Preset(
    name="yolov1_tiny_cpu",
    input_size=128,
    grid_size=8,
    boxes_per_cell=2,
    backbone="tiny",
    tiny_widths=(16, 32, 64, 128, 256),
    head_convs=((256, 1),),
    head="conv",
    augmentation=(("translate", 0.2), ("scale", (0.8, 1.2)), ("hue", 0.0), ("saturation", 1.5),
                  ("exposure", 1.5)),
    quality_target=0.15,
    description="small YOLOv1 for 128x128 inputs that trains on a few CPU cores (demo, not the benchmark)",
)

YOLOV1_PRESETS = (YOLOV1_RESNET34, YOLOV1_COURSEWORK, YOLOV1_TINY_CPU)
