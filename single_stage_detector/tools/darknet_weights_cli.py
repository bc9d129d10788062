"""``darknet-weights``: darknet ``.weights`` files in and out of the harness's checkpoints.

* ``darknet-weights import yolov3.weights --output yolov3.pt [--preset yolov3_darknet53]
  [--input-size 608]``: the published YOLOv3 weights as a ``checkpoint.pt`` that ``evaluate``,
  ``predict``, ``show-detections`` and ``train --init-checkpoint`` read (so the published
  model can be scored on COCO val with pycocotools and compared with its table);
* ``darknet-weights export checkpoint.pt --output model.weights``: a trained YOLO checkpoint
  back to darknet's format (version 0.2.0, ``seen`` = images trained on when known).

The file layout and its checks are :mod:`single_stage_detector.detectors.yolo.darknet_weights`.
"""
from __future__ import annotations

import argparse

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (imports nothing heavy)."""
    parser.add_argument("direction", choices=["import", "export"],
                        help="import: .weights -> checkpoint.pt; export: checkpoint.pt -> .weights")
    parser.add_argument("source", help="the .weights file (import) or the checkpoint.pt (export)")
    parser.add_argument("--output", "-o", required=True, help="the file to write (atomically)")
    parser.add_argument("--preset", default="yolov3_darknet53",
                        help="import: the YOLO preset whose network the file holds")
    parser.add_argument("--input-size", type=int, default=None,
                        help="import: the input side the checkpoint evaluates at (default: the preset's)")


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
        if preset.family != "yolov3":
            raise ConfigError(f"--preset: {preset.name} is not a YOLOv3 preset (darknet files hold YOLO networks)")
        if args.input_size is not None and (args.input_size < 32 or args.input_size % 32):
            raise ConfigError(f"--input-size: must be a positive multiple of 32, got {args.input_size}")
        if not os.path.isfile(args.source):
            raise ConfigError(f"{args.source}: no such file")
        detector = build_detector(preset)
        header = read_darknet_weights(detector.model, args.source)
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
    if preset.family != "yolov3":
        raise ConfigError(f"{args.source}: preset {preset.name} ({preset.family}) has no darknet layout")
    seen = int(ckpt.get("step", 0)) * int((ckpt.get("config") or {}).get("batch_size", 0) or 0)
    write_darknet_weights(detector.model, args.output, seen=seen)
    print(f"{args.source} (preset {preset.name}) -> {args.output} ({os.path.getsize(args.output)} bytes, "
          f"seen {seen})")
    return 0
