"""Named model configurations and the model factory.

* ``ssd300_resnet34``: the MLPerf benchmark model (SPEC.md sections 2 and 3).
* ``ssd_tiny``: a small detector for 128x128 inputs that trains in minutes on a couple of
  CPU cores (demo on the synthetic coloured-shapes dataset): 0.33 M backbone parameters,
  about 0.28 GFLOP per image forward with a handful of classes (0.50 GFLOP with 81, where
  the class heads dominate). Every number that defines it is in its preset below, so it
  can be tuned in one place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from ..box_coder import SSD300_BOX_SPEC, DefaultBoxSpec
from .backbone_weights import load_backbone_into
from .resnet import build_backbone
from .ssd import SSD, ExtraBlockSpec

__all__ = [
    "ModelPreset",
    "PRESETS",
    "get_preset",
    "build_model",
    "count_parameters",
]


@dataclass(frozen=True)
class ModelPreset:
    """Everything needed to build a detector.

    Attributes:
        name: registry key.
        backbone: backbone name in :data:`single_stage_detector.models.resnet.BACKBONES`.
        input_size: S, images are ``Tensor[B, 3, S, S]``; must equal ``box_spec.image_size``.
        box_spec: default-box geometry (its feature sizes must match the model's maps).
        extra_blocks: extra feature blocks after the backbone, one per further level.
        num_classes: classes including background (81 = 80 COCO classes + background).
        description: one line for ``--help`` / logs.
        is_benchmark: True for the MLPerf benchmark model (closed-division rules apply).
        backbone_kwargs: keyword arguments of the backbone factory (treat as read-only).
        family: the detector family (``single_stage_detector.detectors``): always ``ssd`` here.
        quality_target: COCO AP@[.5:.95] at which a run stops (0.23: SPEC.md, the benchmark's).
    """

    name: str
    backbone: str
    input_size: int
    box_spec: DefaultBoxSpec
    extra_blocks: tuple[ExtraBlockSpec, ...]
    num_classes: int = 81
    description: str = ""
    is_benchmark: bool = False
    backbone_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)
    family: str = "ssd"
    quality_target: float = 0.23

    def __post_init__(self) -> None:
        if self.input_size != self.box_spec.image_size:
            raise ValueError(
                f"preset {self.name!r}: input_size {self.input_size} != box_spec.image_size "
                f"{self.box_spec.image_size}"
            )
        # A private plain-dict copy (not a MappingProxyType: presets must stay picklable).
        object.__setattr__(self, "backbone_kwargs", dict(self.backbone_kwargs))
        object.__setattr__(self, "extra_blocks", tuple(self.extra_blocks))


_E = ExtraBlockSpec

SSD300_RESNET34 = ModelPreset(
    name="ssd300_resnet34",
    backbone="resnet34",
    input_size=300,
    box_spec=SSD300_BOX_SPEC,
    # SPEC.md section 2: 38 -> 19 -> 10 -> 5 -> 3 -> 1.
    extra_blocks=(
        _E(256, 256, 512, stride=2, padding=1),
        _E(512, 256, 512, stride=2, padding=1),
        _E(512, 128, 256, stride=2, padding=1),
        _E(256, 128, 256, stride=1, padding=0),
        _E(256, 128, 256, stride=1, padding=0),
    ),
    num_classes=81,
    description="MLPerf SSD300 with a truncated ResNet-34 backbone, 8732 default boxes (benchmark)",
    is_benchmark=True,
)

SSD_TINY = ModelPreset(
    name="ssd_tiny",
    backbone="tiny_resnet",
    input_size=128,
    box_spec=DefaultBoxSpec(
        image_size=128,
        feature_sizes=(16, 8, 4, 2, 1),
        steps=(8, 16, 32, 64, 128),
        # ~10% .. 100% of the image side, for objects of ~10% .. ~70% of it.
        scales=(12, 26, 48, 72, 98, 128),
        aspect_ratios=((2,), (2, 3), (2, 3), (2,), (2,)),
    ),
    # 16 -> 8 -> 4 -> 2 -> 1 (3x3, stride 2, pad 1 halves, rounding up).
    extra_blocks=(
        _E(96, 64, 128, stride=2, padding=1),
        _E(128, 64, 128, stride=2, padding=1),
        _E(128, 64, 128, stride=2, padding=1),
        _E(128, 64, 128, stride=2, padding=1),
    ),
    num_classes=81,
    description="small SSD for 128x128 inputs that trains on a few CPU cores (demo, not the benchmark)",
    is_benchmark=False,
    backbone_kwargs={"stem_channels": 32, "stage_channels": (48, 96), "stage_blocks": (1, 2)},
)

PRESETS: dict[str, ModelPreset] = {p.name: p for p in (SSD300_RESNET34, SSD_TINY)}


def get_preset(name: str) -> ModelPreset:
    """The preset registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def build_model(
    preset: str | ModelPreset,
    num_classes: int | None = None,
    pretrained_backbone: str | os.PathLike[str] | None = None,
) -> SSD:
    """Build the detector of ``preset``.

    Args:
        preset: a preset name or a :class:`ModelPreset`.
        num_classes: overrides ``preset.num_classes`` (including background).
        pretrained_backbone: ResNet-34 ImageNet weights (torchvision ``.pth`` or the
            converted ``.npz``), loaded strictly into the backbone. None: random init (the
            caller decides whether and how to report it).

    Returns:
        The :class:`SSD` with attributes ``preset`` (the ModelPreset) and
        ``backbone_pretrained`` (bool).

    Raises:
        ValueError: unknown preset, or weights given for a backbone without ImageNet weights.
        BackboneWeightsError: the weights file is missing, unreadable or does not fit.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    backbone = build_backbone(preset.backbone, **preset.backbone_kwargs)
    if pretrained_backbone is not None:
        if not getattr(backbone, "supports_imagenet_weights", False):
            raise ValueError(
                f"preset {preset.name!r} uses backbone {preset.backbone!r}, which has no ImageNet "
                f"weights; do not pass a pretrained backbone file ({os.fspath(pretrained_backbone)})"
            )
        load_backbone_into(backbone, pretrained_backbone)
    model = SSD(
        backbone,
        preset.extra_blocks,
        preset.box_spec,
        num_classes=preset.num_classes if num_classes is None else num_classes,
    )
    model.preset = preset
    model.backbone_pretrained = pretrained_backbone is not None
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``model`` (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
