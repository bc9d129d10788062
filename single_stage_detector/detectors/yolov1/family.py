"""The YOLOv1 family behind the harness's contract (presets in ``presets``).

Run options it takes (``TrainConfig`` fields, flags of ``train``/``demo``), applied to the
preset by :func:`configure` (also when a checkpoint is loaded, from its saved config):

* ``--anchors kmeans:N`` (B = N predictors per cell, their prior shapes from k-means with the
  1 - IoU distance on the training boxes at the start of the run, ``yolo.kmeans``; seed 000),
  ``--anchors W,H W,H ...`` (given prior shapes, fractions of the input side; B = their
  count) or ``--anchors none`` (the paper: no prior shapes);
* ``--confidence-target iou|one`` (the paper's IoU, or seed 001's 1);
* ``--class-weights none|inverse-frequency`` (seed 001's weights, from the training boxes).

The data-dependent parts (k-means anchors, class weights) are computed by :func:`prepare`
once the training set is read, before the first step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import nn

from ..base import DetectorFamily, register_family
from .presets import CLASS_WEIGHTS, CONFIDENCE_TARGETS, YOLOV1_PRESETS, YOLOv1Preset

__all__ = ["YOLOV1_FAMILY", "configure", "prepare", "parse_anchors", "load_imagenet_resnet34"]

OPTIONS = ("anchors", "confidence_target", "class_weights")


def load_imagenet_resnet34(backbone: nn.Module, path) -> None:
    """torchvision's ImageNet ResNet-34 (``resnet34-333f7ec4.pth``, the SSD benchmark's file
    before conversion) into a :class:`~.network.ResNet34Trunk`, ``conv1`` .. ``layer4`` (``fc``
    ignored), with the SSD loader's checks (``models.backbone_weights``).

    Raises:
        BackboneWeightsError: missing or unreadable file, or one that does not fit; the SSD
            ``.npz`` (no ``layer4``) gets a message naming the ``.pth`` to use instead.
    """
    from ...models.backbone_weights import BackboneWeightsError, load_backbone_into

    try:
        load_backbone_into(backbone, path, dropped_prefixes=("fc.",))
    except BackboneWeightsError as e:
        if "missing keys: layer4." in str(e):
            raise BackboneWeightsError(
                f"{path}: holds no layer4 (the .npz of scripts/get_resnet34_backbone.sh is SSD's truncated "
                f"ResNet-34); the YOLOv1 backbone needs torchvision's full resnet34-333f7ec4.pth, which the "
                f"script keeps next to the .npz") from None
        raise


def _build(preset: YOLOv1Preset, *, pretrained_backbone=None) -> nn.Module:
    import torch

    from .detector import YOLOv1Detector
    from .network import YOLOv1Network, build_backbone

    if pretrained_backbone is not None and preset.backbone != "resnet34":
        raise ValueError(f"preset {preset.name!r} has no ImageNet backbone; do not pass a pretrained backbone "
                         f"file ({pretrained_backbone})")
    backbone = build_backbone(preset.backbone, preset.tiny_widths)
    if pretrained_backbone is not None:
        load_imagenet_resnet34(backbone, pretrained_backbone)
    prior = None
    if preset.anchors:
        prior = preset.anchors
    elif preset.kmeans_anchors:  # placeholder until `prepare` (or a checkpoint) sets them
        prior = torch.ones(preset.boxes_per_cell, 2)
    network = YOLOv1Network(backbone, preset.num_classes, preset.grid_size, preset.boxes_per_cell,
                            head_convs=preset.head_convs, head=preset.head, fc_pool=preset.fc_pool,
                            fc_hidden=preset.fc_hidden, dropout=preset.dropout, prior_wh=prior)
    detector = YOLOv1Detector(network, lambda_coord=preset.lambda_coord, lambda_noobj=preset.lambda_noobj,
                              confidence_target=preset.confidence_target, score_threshold=preset.score_threshold,
                              nms_threshold=preset.nms_threshold, max_detections=preset.max_detections,
                              pre_nms_top_k=preset.pre_nms_top_k)
    detector.backbone_pretrained = pretrained_backbone is not None
    network.backbone_pretrained = detector.backbone_pretrained
    return detector


def _train_transform(preset: YOLOv1Preset, cfg):
    from ...data.yolo_transforms import YOLOTrainTransform

    return YOLOTrainTransform(preset.input_size, mean=preset.mean, std=preset.std, **dict(preset.augmentation))


def _eval_transform(preset: YOLOv1Preset):
    from ...data.yolo_transforms import YOLOEvalTransform

    return YOLOEvalTransform(preset.input_size, mean=preset.mean, std=preset.std)


def _describe(preset: YOLOv1Preset, detector: nn.Module) -> str:
    pretrained = getattr(detector, "backbone_pretrained", False)
    backbone = preset.backbone + (" (ImageNet)" if pretrained else " (random init)" if preset.backbone == "resnet34"
                                  else "")
    if preset.kmeans_anchors:
        anchors = f"k-means anchors ({preset.boxes_per_cell})"
    elif preset.anchors:
        anchors = "anchors " + " ".join(f"{w:g},{h:g}" for w, h in preset.anchors)
    else:
        anchors = "no anchors"
    policy = preset.eval_policy
    return (f"input {preset.input_size}, grid {preset.grid_size}x{preset.grid_size}, B {preset.boxes_per_cell}, "
            f"{backbone}, {preset.head} head, {anchors}, confidence target {preset.confidence_target}, "
            f"class weights {preset.class_weights}, eval score > {policy['score_threshold']} "
            f"NMS {policy['nms_threshold']} max {policy['max_detections']}")


def _backbone_weights(preset: YOLOv1Preset) -> str | None:
    return ("ImageNet ResNet-34 (torchvision's resnet34-333f7ec4.pth: conv1 .. layer4)"
            if preset.backbone == "resnet34" else None)


def parse_anchors(value) -> tuple[str, Any]:
    """``--anchors`` values -> ``("kmeans", N)``, ``("given", ((w, h), ...))`` or ``("none", None)``.

    Accepts ``kmeans:N`` (N >= 1), ``none``, or one ``W,H`` per predictor (fractions of the
    input side, in (0, 1]); a single string is split on spaces.

    Raises:
        ValueError: naming ``--anchors`` and the bad value.
    """
    items = value.split() if isinstance(value, str) else [str(v) for v in value]
    if not items:
        raise ValueError("--anchors: expected kmeans:N, none, or W,H pairs")
    if len(items) == 1 and items[0].startswith("kmeans:"):
        count = items[0].split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--anchors: kmeans:N needs a number of anchors N >= 1, got {items[0]!r}")
        return "kmeans", int(count)
    if items == ["none"]:
        return "none", None
    pairs = []
    for item in items:
        parts = item.split(",")
        try:
            w, h = (float(p) for p in parts)
        except ValueError:
            raise ValueError(f"--anchors: expected kmeans:N, none, or W,H pairs (fractions of the input side), "
                             f"got {item!r}") from None
        if not (0.0 < w <= 1.0 and 0.0 < h <= 1.0):
            raise ValueError(f"--anchors: {item!r} is not a width,height in (0, 1] (fractions of the input side)")
        pairs.append((w, h))
    return "given", tuple(pairs)


def configure(preset: YOLOv1Preset, options: Mapping[str, Any]) -> YOLOv1Preset:
    """``preset`` with the YOLOv1 run options set in ``options`` (module docstring).

    Raises:
        ValueError: naming the flag, for a bad value.
    """
    changes: dict[str, Any] = {}
    if options.get("anchors") is not None:
        kind, value = parse_anchors(options["anchors"])
        if kind == "kmeans":
            changes.update(kmeans_anchors=True, anchors=(), boxes_per_cell=value)
        elif kind == "given":
            changes.update(kmeans_anchors=False, anchors=value, boxes_per_cell=len(value))
        else:
            changes.update(kmeans_anchors=False, anchors=())
    for name, allowed in (("confidence_target", CONFIDENCE_TARGETS), ("class_weights", CLASS_WEIGHTS)):
        value = options.get(name)
        if value is not None:
            if value not in allowed:
                raise ValueError(f"--{name.replace('_', '-')}: expected {' | '.join(allowed)}, got {value!r}")
            changes[name] = value
    return dataclasses.replace(preset, **changes) if changes else preset


def prepare(preset: YOLOv1Preset, detector: nn.Module, train_set) -> str | None:
    """k-means anchors and class-frequency weights from the training set, set into ``detector``.

    Anchors: k-means (1 - IoU, k-means++ seeded with 0: deterministic) on the training boxes'
    (width, height) as fractions of their image, which a plain resize keeps as fractions of
    the network input; sorted by area. Class weights: :func:`~.loss.inverse_frequency_weights`
    of the training boxes' labels. Returns the report lines, or None when there is nothing to do.

    Raises:
        ConfigError: naming ``--anchors``, when k-means cannot find B anchors (fewer distinct boxes).
    """
    import torch

    from ...config import ConfigError
    from ..yolo.kmeans import anchor_fitness, kmeans_anchors
    from .loss import inverse_frequency_weights

    lines = []
    if preset.has_anchors:
        shapes = torch.as_tensor(train_set.box_sizes(), dtype=torch.float32)
        if preset.kmeans_anchors:
            try:
                anchors = kmeans_anchors(shapes, preset.boxes_per_cell, seed=0)
            except ValueError as e:
                raise ConfigError(f"--anchors kmeans:{preset.boxes_per_cell}: {e}") from None
            with torch.no_grad():
                detector.model.prior_wh.copy_(anchors)
            source = f"k-means on {shapes.shape[0]} training boxes"
        else:
            source = "given"
        prior = detector.model.prior_wh.detach().cpu()
        fit = anchor_fitness(shapes, prior) if shapes.shape[0] else None
        text = " ".join(f"{w:.4f},{h:.4f}" for w, h in prior.tolist())
        lines.append(f"anchors ({source}; width,height as fractions of the input): {text}"
                     + (f"; mean best shape IoU {fit.mean_iou:.4f}" if fit is not None else ""))
    if preset.class_weights == "inverse-frequency":
        labels = train_set.box_labels()
        weights = inverse_frequency_weights(labels, preset.num_classes)
        detector.loss.set_class_weights(weights)
        present = torch.bincount(torch.as_tensor(labels, dtype=torch.int64) - 1, minlength=preset.num_classes) > 0
        shown = weights[present]
        lines.append(f"class weights (inverse frequency of {len(labels)} training boxes, {int(present.sum())} "
                     f"classes): {float(shown.min()) if shown.numel() else 1.0:.3f} .. "
                     f"{float(shown.max()) if shown.numel() else 1.0:.3f}")
    return "\n".join(lines) or None


YOLOV1_FAMILY = DetectorFamily(name="yolov1", build=_build, train_transform=_train_transform,
                               eval_transform=_eval_transform, variable_input_size=True, supports_dali=True,
                               dali_graph="yolo", describe=_describe, backbone_weights=_backbone_weights, options=OPTIONS,
                               configure=configure, prepare=prepare)
register_family(YOLOV1_FAMILY, YOLOV1_PRESETS)
