"""The SSD family behind the harness's contract: presets ``ssd300_resnet34`` (the MLPerf
benchmark) and ``ssd_tiny`` (the CPU demo)."""
from __future__ import annotations

from torch import nn

from ...data.transforms import SSDEvalTransform, SSDTrainTransform
from ...detector import SSDDetector
from ...models.presets import PRESETS as SSD_PRESETS
from ...models.presets import ModelPreset, build_model
from ..base import DetectorFamily, register_family

__all__ = ["SSD_FAMILY"]


def _build(preset: ModelPreset, *, pretrained_backbone=None) -> nn.Module:
    detector = SSDDetector(build_model(preset, pretrained_backbone=pretrained_backbone), preset.box_spec)
    detector.backbone_pretrained = detector.model.backbone_pretrained
    return detector


def _train_transform(preset: ModelPreset, cfg) -> SSDTrainTransform:
    # uint8 out: the loader normalises the batch on the training device (data/pipeline.train_collate).
    return SSDTrainTransform(preset.input_size, cfg.max_samples, fused_color=cfg.color_jitter == "fused",
                             normalize=False)


def _eval_transform(preset: ModelPreset) -> SSDEvalTransform:
    return SSDEvalTransform(preset.input_size)


def _describe(preset: ModelPreset, detector: nn.Module) -> str:
    return f"input {preset.input_size}, {preset.box_spec.num_boxes} default boxes"


def _backbone_weights(preset: ModelPreset) -> str | None:
    return "ImageNet ResNet-34 (.npz of scripts/get_resnet34_backbone.sh, or torchvision's .pth)" \
        if preset.backbone == "resnet34" else None


SSD_FAMILY = DetectorFamily(name="ssd", build=_build, train_transform=_train_transform,
                            eval_transform=_eval_transform, variable_input_size=False, supports_dali=True, describe=_describe,
                            backbone_weights=_backbone_weights, dali_graph="ssd")
register_family(SSD_FAMILY, tuple(SSD_PRESETS.values()))
