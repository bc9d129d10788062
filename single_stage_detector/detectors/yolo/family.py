"""The YOLOv3 family behind the harness's contract (presets in ``presets``)."""
from __future__ import annotations

from torch import nn

from ..base import DetectorFamily, register_family
from .presets import YOLO_PRESETS, YOLOv3Preset

__all__ = ["YOLOV3_FAMILY", "YOLO_MEAN", "YOLO_STD"]

# Darknet feeds RGB / 255 without mean/std normalisation (src/image.c load_image_color): the
# published weights expect it, so every YOLO preset uses it.
YOLO_MEAN = (0.0, 0.0, 0.0)
YOLO_STD = (1.0, 1.0, 1.0)


def _build(preset: YOLOv3Preset, *, pretrained_backbone=None) -> nn.Module:
    from .anchors import anchors_tensor
    from .darknet_weights import read_backbone_file
    from .detector import YOLOv3Detector
    from .network import YOLOv3Network

    network = YOLOv3Network(preset.num_classes, width=preset.width, stage_blocks=preset.stage_blocks,
                            objectness_prior=preset.objectness_prior)
    if pretrained_backbone is not None:
        # darknet53.conv.74: the 52 convolutional layers of the backbone.
        read_backbone_file(network, pretrained_backbone, max_conv_layers=52, backbone_file="darknet53.conv.74")
    detector = YOLOv3Detector(network, anchors_tensor(preset.anchors_px), preset.masks,
                              num_classes=preset.num_classes, ignore_threshold=preset.ignore_threshold,
                              score_threshold=preset.score_threshold, nms_threshold=preset.nms_threshold,
                              max_detections=preset.max_detections, pre_nms_top_k=preset.pre_nms_top_k)
    detector.backbone_pretrained = pretrained_backbone is not None
    return detector


def _train_transform(preset: YOLOv3Preset, cfg):
    from ...data.yolo_transforms import YOLOTrainTransform

    return YOLOTrainTransform(preset.input_size, mean=YOLO_MEAN, std=YOLO_STD)


def _eval_transform(preset: YOLOv3Preset):
    from ...data.yolo_transforms import YOLOEvalTransform

    return YOLOEvalTransform(preset.input_size, mean=YOLO_MEAN, std=YOLO_STD)


def _describe(preset: YOLOv3Preset, detector: nn.Module) -> str:
    policy = preset.eval_policy
    return (f"input {preset.input_size}, anchors (px) {' '.join(f'{w:g},{h:g}' for w, h in preset.anchors_px)}, "
            f"ignore {preset.ignore_threshold}, eval score > {policy['score_threshold']} "
            f"NMS {policy['nms_threshold']} max {policy['max_detections']}")


def _backbone_weights(preset: YOLOv3Preset) -> str | None:
    full = preset.width == 32 and tuple(preset.stage_blocks) == (1, 2, 8, 8, 4)
    return "darknet53.conv.74 (darknet's ImageNet Darknet-53, 52 convolutional layers)" if full else None


def _check_data(preset: YOLOv3Preset, box_sizes) -> str:
    """The anchors' best-possible recall on the training boxes at the preset's input size."""
    import torch

    from .kmeans import check_anchor_recall

    shapes = torch.as_tensor(box_sizes, dtype=torch.float32) * preset.input_size
    return check_anchor_recall(shapes, torch.tensor(preset.anchors_px, dtype=torch.float32))[2]


YOLOV3_FAMILY = DetectorFamily(name="yolov3", build=_build, train_transform=_train_transform,
                               eval_transform=_eval_transform, variable_input_size=True, supports_dali=True, describe=_describe,
                               backbone_weights=_backbone_weights, check_data=_check_data, dali_graph="yolo")
register_family(YOLOV3_FAMILY, YOLO_PRESETS)
