"""Detector models: backbones, the generic SSD, named presets, backbone weights, MLPerf names.

Typical use::

    from single_stage_detector.models import build_model
    model = build_model("ssd300_resnet34", pretrained_backbone="resnet34-backbone.npz")
    loc, cls_logits = model(images)  # [B, 8732, 4], [B, 8732, 81]
"""
from .backbone_weights import (
    NPZ_FORMAT,
    BackboneWeightsError,
    load_backbone_into,
    load_backbone_state_dict,
    save_backbone_npz,
)
from .mlperf_names import MLPERF_SSD_TENSOR_NAMES, mlperf_tensor_names
from .presets import PRESETS, ModelPreset, build_model, count_parameters, get_preset
from .resnet import BACKBONES, ResNet34Backbone, TinyResNetBackbone, build_backbone
from .ssd import SSD, ExtraBlockSpec

__all__ = [
    "BACKBONES",
    "BackboneWeightsError",
    "ExtraBlockSpec",
    "MLPERF_SSD_TENSOR_NAMES",
    "ModelPreset",
    "NPZ_FORMAT",
    "PRESETS",
    "ResNet34Backbone",
    "SSD",
    "TinyResNetBackbone",
    "build_backbone",
    "build_model",
    "count_parameters",
    "get_preset",
    "load_backbone_into",
    "load_backbone_state_dict",
    "mlperf_tensor_names",
    "save_backbone_npz",
]
