"""The YOLOv2 family behind the harness's contract (presets in ``presets``)."""
from __future__ import annotations

from torch import nn

from ..base import DetectorFamily, register_family
from .presets import YOLOV2_PRESETS, YOLOv2Preset

__all__ = ["YOLOV2_FAMILY", "build_network"]

DARKNET19_BACKBONE_FILE = "darknet19_448.conv.23 (darknet's ImageNet Darknet-19, 18 convolutional layers)"
RESNET50_BACKBONE_FILE = "torchvision's ImageNet ResNet-50 state dict (resnet50-0676ba61.pth or resnet50-11ad3fa6.pth)"


def _full_darknet19(preset: YOLOv2Preset) -> bool:
    return preset.backbone == "darknet19" and preset.width == 32 and tuple(preset.stage_convs) == (1, 1, 3, 3, 5, 5)


def build_network(preset: YOLOv2Preset) -> nn.Module:
    """The :class:`~.network.YOLOv2Network` of ``preset``, randomly initialised."""
    from .network import YOLOv2Network

    if preset.backbone == "resnet50":
        from .resnet50 import ResNet50Backbone

        backbone: nn.Module = ResNet50Backbone()
    else:
        from ...backbones.darknet19 import Darknet19

        backbone = Darknet19(preset.width, preset.stage_convs)
    return YOLOv2Network(backbone, preset.num_classes, len(preset.anchors), neck_kernels=preset.neck_kernels,
                         head_channels=preset.head_channels, passthrough_channels=preset.passthrough_channels,
                         reorg_order=preset.reorg_order, objectness_prior=preset.objectness_prior)


def _build(preset: YOLOv2Preset, *, pretrained_backbone=None) -> nn.Module:
    from .detector import YOLOv2Detector
    from .region_loss import RegionLoss

    network = build_network(preset)
    if pretrained_backbone is not None:
        if preset.backbone == "resnet50":
            from .resnet50 import load_resnet50_weights

            load_resnet50_weights(network.backbone, pretrained_backbone)
        elif _full_darknet19(preset):
            from ..yolo.darknet_weights import read_backbone_file

            # darknet19_448.conv.23: the 18 convolutional layers of the backbone.
            read_backbone_file(network, pretrained_backbone, max_conv_layers=18, backbone_file="darknet19_448.conv.23")
        else:
            raise ValueError(f"preset {preset.name!r} has no pretrained backbone")
    detector = YOLOv2Detector(network, RegionLoss(preset.anchors, preset.num_classes, **preset.loss_settings),
                              score_threshold=preset.score_threshold, nms_threshold=preset.nms_threshold,
                              max_detections=preset.max_detections, pre_nms_top_k=preset.pre_nms_top_k,
                              multi_label=preset.multi_label)
    detector.backbone_pretrained = pretrained_backbone is not None
    return detector


def _train_transform(preset: YOLOv2Preset, cfg):
    from ...data.yolo_transforms import YOLOTrainTransform

    # yolov2.cfg's augmentation is yolov3.cfg's (jitter .3, hue .1, saturation and exposure 1.5).
    return YOLOTrainTransform(preset.input_size, mean=preset.mean, std=preset.std)


def _eval_transform(preset: YOLOv2Preset):
    from ...data.yolo_transforms import YOLOEvalTransform

    return YOLOEvalTransform(preset.input_size, mean=preset.mean, std=preset.std)


def _describe(preset: YOLOv2Preset, detector: nn.Module) -> str:
    policy = preset.eval_policy
    return (f"input {preset.input_size} (grid {preset.grid_size}), anchors (grid units) "
            f"{' '.join(f'{w:g},{h:g}' for w, h in preset.anchors)}, {preset.loss_variant} loss "
            f"(ignore {preset.ignore_threshold}), reorg {preset.reorg_order}, eval score > {policy['score_threshold']} "
            f"NMS {policy['nms_threshold']} max {policy['max_detections']}")


def _backbone_weights(preset: YOLOv2Preset) -> str | None:
    if preset.backbone == "resnet50":
        return RESNET50_BACKBONE_FILE
    return DARKNET19_BACKBONE_FILE if _full_darknet19(preset) else None


def _check_data(preset: YOLOv2Preset, box_sizes) -> str:
    """The anchors' best-possible recall on the training boxes at the preset's input size."""
    import torch

    from ..yolo.kmeans import check_anchor_recall

    shapes = torch.as_tensor(box_sizes, dtype=torch.float32) * preset.input_size
    return check_anchor_recall(shapes, torch.tensor(preset.anchors_px, dtype=torch.float32))[2]


YOLOV2_FAMILY = DetectorFamily(name="yolov2", build=_build, train_transform=_train_transform,
                               eval_transform=_eval_transform, variable_input_size=True, supports_dali=True,
                               dali_graph="yolo", describe=_describe, backbone_weights=_backbone_weights,
                               check_data=_check_data)
register_family(YOLOV2_FAMILY, YOLOV2_PRESETS)
