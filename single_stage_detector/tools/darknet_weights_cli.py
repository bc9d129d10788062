"""``darknet-weights``: darknet ``.weights`` files in and out of the harness's checkpoints.

* ``darknet-weights import yolov3.weights --output yolov3.pt [--preset yolov3_darknet53]
  [--input-size 608]``: the published YOLOv3 weights (or ``yolov2.weights`` with ``--preset
  yolov2_darknet19``) as a ``checkpoint.pt`` that ``evaluate``, ``predict``,
  ``show-detections`` and ``train --init-checkpoint`` read (so the published model can be
  scored on COCO val with pycocotools and compared with its table). A backbone-only file
  (``darknet53.conv.74``, ``darknet19_448.conv.23``) is refused, naming ``train
  --pretrained-backbone``, which reads it;
* ``darknet-weights export checkpoint.pt --output model.weights``: a trained YOLO checkpoint
  back to darknet's format (version 0.2.0, ``seen`` = images trained on when known).

The file layout and its checks are :mod:`single_stage_detector.detectors.yolo.darknet_weights`.
"""
from __future__ import annotations

import argparse

__all__ = ["add_arguments", "main"]

DARKNET_FAMILIES = ("yolov3", "yolov2")
"""Families whose networks have darknet's layer layout (``darknet_conv_layers()``)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (imports nothing heavy)."""
    parser.add_argument("direction", choices=["import", "export"],
                        help="import: .weights -> checkpoint.pt; export: checkpoint.pt -> .weights")
    parser.add_argument("source", help="the .weights file (import) or the checkpoint.pt (export)")
    parser.add_argument("--output", "-o", required=True, help="the file to write (atomically)")
    parser.add_argument("--preset", default="yolov3_darknet53",
                        help="import: the YOLOv3 or YOLOv2 preset whose network the file holds "
                             "(yolov2_darknet19 for yolov2.weights)")
    parser.add_argument("--input-size", type=int, default=None,
                        help="import: the input side the checkpoint evaluates at (default: the preset's)")


def _check_darknet_layout(model, preset, where: str) -> None:
    """ConfigError when the preset's network has no darknet layer list (yolov2_resnet50's ResNet-50)."""
    from ..config import ConfigError

    try:
        model.darknet_conv_layers()
    except ValueError as e:
        raise ConfigError(f"{where}: {preset.name} has no darknet layout ({e})") from None


def _refuse_backbone_only(model, preset, path: str) -> None:
    """ConfigError when ``path`` holds exactly the backbone's conv layers (darknet53.conv.74, ...):
    such a file initialises training (``train --pretrained-backbone``), not a whole checkpoint."""
    import os

    from ..config import ConfigError
    from ..detectors.yolo.darknet_weights import darknet_weights_nbytes

    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "darknet_conv_layers"):
        return
    count = len(backbone.darknet_conv_layers())
    sizes = {darknet_weights_nbytes(model, max_conv_layers=count, version=v) for v in ((0, 1, 0), (0, 2, 0))}
    if os.path.getsize(path) in sizes:
        raise ConfigError(f"{path}: holds only the {count} backbone conv layers of {preset.name} (a backbone file, "
                          f"as darknet53.conv.74 or darknet19_448.conv.23): `train --pretrained-backbone` reads "
                          f"such files; `darknet-weights import` reads whole networks")


def main(args: argparse.Namespace) -> int:
    """Run the command; 0 on success. Bad input raises ConfigError / DarknetWeightsError naming the file."""
    import os

    from ..checkpoint import save_checkpoint
    from ..config import ConfigError
    from ..detectors.base import build_detector, get_preset
    from ..detectors.yolo.darknet_weights import read_darknet_weights, write_darknet_weights

    if os.path.abspath(args.output) == os.path.abspath(args.source):
        raise ConfigError(f"--output: {args.output} is the source file itself")
    if args.direction == "import":
        try:
            preset = get_preset(args.preset)
        except ValueError as e:
            raise ConfigError(f"--preset: {e}") from None
        if preset.family not in DARKNET_FAMILIES:
            raise ConfigError(f"--preset: {preset.name} ({preset.family}) has no darknet layout; "
                              f"darknet .weights files fit the {' and '.join(DARKNET_FAMILIES)} presets")
        if args.input_size is not None and (args.input_size < 32 or args.input_size % 32):
            raise ConfigError(f"--input-size: must be a positive multiple of 32, got {args.input_size}")
        if not os.path.isfile(args.source):
            raise ConfigError(f"{args.source}: no such file")
        detector = build_detector(preset)
        _check_darknet_layout(detector.model, preset, "--preset")
        _refuse_backbone_only(detector.model, preset, args.source)
        header = read_darknet_weights(detector.model, args.source)
        seen_buffer = getattr(detector.model, "images_seen", None)
        if seen_buffer is not None:  # YOLOv2: darknet's net.seen ends the prior warm-up
            seen_buffer.fill_(header["seen"])
        config = {"input_size": args.input_size} if args.input_size else {}
        save_checkpoint({"preset": preset.name, "model": detector.model.state_dict(), "config": config,
                         "darknet_header": header, "source": os.path.abspath(args.source)}, args.output)
        print(f"{args.source} (darknet {header['major']}.{header['minor']}.{header['revision']}, "
              f"{header['seen']} images seen) -> {args.output} (preset {preset.name}"
              f"{f', input {args.input_size}' if args.input_size else ''})")
        return 0

    from .cli import load_checkpoint_arg
    from .show_detections import load_detector

    ckpt = load_checkpoint_arg(args.source)
    detector, preset, _ = load_detector(ckpt)
    if preset.family not in DARKNET_FAMILIES:
        raise ConfigError(f"{args.source}: preset {preset.name} ({preset.family}) has no darknet layout")
    _check_darknet_layout(detector.model, preset, args.source)
    seen = int(ckpt.get("step", 0)) * int((ckpt.get("config") or {}).get("batch_size", 0) or 0)
    if getattr(detector.model, "images_seen", None) is not None:  # YOLOv2 counts them itself
        seen = int(detector.model.images_seen)
    write_darknet_weights(detector.model, args.output, seen=seen)
    print(f"{args.source} (preset {preset.name}) -> {args.output} ({os.path.getsize(args.output)} bytes, "
          f"seen {seen})")
    return 0
