"""``kmeans-anchors``: YOLO anchors for a dataset, by k-means with the 1 - IoU distance.

Reads the boxes of a COCO-format annotation file, measures them in pixels of the network
input (``--input-size``, plain resize or ``--letterbox``), clusters their shapes into
``--num`` anchors (YOLOv2 paper, section 2 "Dimension clusters") and prints them in the
darknet cfg ``anchors=`` form, with the mean best-anchor IoU and the best possible recall
(BPR) of the new anchors next to those of a reference set (default: YOLOv3's COCO anchors;
``--compare yolov2``: YOLOv2's, darknet ``cfg/yolov2.cfg``).

Units: ``--units pixels`` (YOLOv3: pixels of the network input) or ``--units grid``
(YOLOv2: pixels / ``--stride``). The IoU of shapes does not depend on the unit as long as
boxes and anchors share it; the reference set is converted to ``--units`` before comparing.

Runs as ``python -m single_stage_detector kmeans-anchors ...`` or on its own as
``python -m single_stage_detector.tools.kmeans_anchors ...``; torch is imported only when the
command runs, so ``--help`` answers at once.
"""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = (
    "Anchors for a dataset: k-means on the (width, height) of its boxes with the distance 1 - IoU "
    "(YOLOv2 section 2), in pixels of the network input (YOLOv3) or grid units (YOLOv2: pixels / stride). "
    "Prints the anchors in darknet's cfg form, and the mean IoU of each box with its best anchor and the "
    "best possible recall (share of boxes whose best anchor has shape IoU >= --bpr-threshold) of the new "
    "anchors and of a reference set side by side.")

_PIXEL_UNITS = ("pixels", "grid")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (imports nothing heavy)."""
    parser.add_argument("annotations", metavar="ANNOTATIONS",
                        help="COCO-format annotation file (e.g. annotations/instances_train2017.json)")
    parser.add_argument("--num", "-n", type=int, default=9,
                        help="number of anchors (YOLOv3: 9, YOLOv2: 5)")
    parser.add_argument("--input-size", type=int, default=416,
                        help="side of the square network input, pixels")
    parser.add_argument("--units", choices=_PIXEL_UNITS, default="pixels",
                        help="pixels of the network input (YOLOv3) or grid units, pixels / --stride (YOLOv2)")
    parser.add_argument("--stride", type=int, default=32,
                        help="input pixels per grid cell for --units grid (YOLOv2: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-means++ start")
    parser.add_argument("--letterbox", action="store_true",
                        help="measure boxes after an aspect-preserving resize (longest side = --input-size) "
                             "instead of the plain resize to input-size x input-size")
    parser.add_argument("--iterations", type=int, default=300, help="most k-means iterations")
    parser.add_argument("--bpr-threshold", type=float, default=None,
                        help="shape IoU at or above which a box counts as covered by its best anchor "
                             "(default: 0.25: an anchor within a factor 2 of the box in each side)")
    parser.add_argument("--compare", default="yolov3", metavar="ANCHORS",
                        help="reference anchors: 'yolov3' (darknet cfg/yolov3.cfg COCO anchors, pixels), 'yolov2' "
                             "(cfg/yolov2.cfg COCO anchors, grid units of stride 32), each converted to --units, "
                             "or a list 'w,h, w,h, ...' in --units")


def _parse_anchor_list(text: str):
    """``"w,h, w,h ..."`` (commas and/or spaces) -> ``Tensor[A, 2]``; ConfigError when malformed."""
    import re

    import torch

    from ..config import ConfigError

    fields = [f for f in re.split(r"[\s,]+", text.strip()) if f]
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise ConfigError(f"--compare: expected 'yolov3', 'yolov2' or numbers 'w,h, w,h, ...', got {text!r}") from None
    if not values or len(values) % 2 or any(not v > 0 for v in values):
        raise ConfigError(f"--compare: expected an even count of positive numbers 'w,h, w,h, ...', got {text!r}")
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 2)


def main(args: argparse.Namespace) -> int:
    """Run the command; 0 on success. Bad input raises :class:`~single_stage_detector.config.ConfigError`
    naming the flag or file."""
    from ..config import ConfigError
    from .cli import require_positive

    require_positive(args, "--num", "--input-size", "--stride", "--iterations")
    threshold = args.bpr_threshold
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--bpr-threshold: must be in (0, 1], got {threshold}")

    import time

    from ..detectors.yolo.anchors import YOLOV3_COCO_ANCHORS_PX, anchors_tensor
    from ..detectors.yolo.kmeans import BPR_IOU_THRESHOLD, anchor_fitness, box_shapes_from_coco, convert_units, \
        format_anchors, kmeans_anchors, round_anchors

    threshold = BPR_IOU_THRESHOLD if threshold is None else threshold
    if args.compare.strip().lower() == "yolov3":
        reference = anchors_tensor(YOLOV3_COCO_ANCHORS_PX)
        if args.units == "grid":
            reference = convert_units(reference, to="grid", stride=args.stride)
        reference_name = "YOLOv3 COCO anchors"
    elif args.compare.strip().lower() == "yolov2":
        from ..detectors.yolov2.presets import YOLOV2_COCO_ANCHORS

        # Grid units of YOLOv2's stride-32 output: x 32 for pixels, then to --units.
        reference = convert_units(anchors_tensor(YOLOV2_COCO_ANCHORS), to="pixels", stride=32)
        if args.units == "grid":
            reference = convert_units(reference, to="grid", stride=args.stride)
        reference_name = "YOLOv2 COCO anchors"
    else:
        reference = _parse_anchor_list(args.compare)
        reference_name = "--compare anchors"

    try:
        shapes = box_shapes_from_coco(args.annotations, args.input_size, letterbox=args.letterbox)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if shapes.shape[0] < args.num:
        raise ConfigError(f"{args.annotations}: {shapes.shape[0]} usable box(es), fewer than --num {args.num}")
    if args.units == "grid":
        shapes = convert_units(shapes, to="grid", stride=args.stride)

    start = time.perf_counter()
    try:
        anchors = kmeans_anchors(shapes, args.num, iterations=args.iterations, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"{args.annotations}: {e}") from None
    seconds = time.perf_counter() - start
    anchors = round_anchors(anchors, args.units)  # the numbers a cfg gets, and the ones scored below
    ours = anchor_fitness(shapes, anchors, threshold=threshold)
    theirs = anchor_fitness(shapes, reference, threshold=threshold)

    unit_text = (f"pixels of the {args.input_size}x{args.input_size} input" if args.units == "pixels"
                 else f"grid units (pixels / {args.stride}) of the {args.input_size}x{args.input_size} input")
    resize = "letterbox" if args.letterbox else "plain resize"
    name_width = max(len("k-means anchors"), len(reference_name))
    lines = [
        f"clustered {shapes.shape[0]} boxes of {args.annotations} ({resize}) into {args.num} anchors, "
        f"k-means with distance 1 - IoU, seed {args.seed}: {seconds:.1f} s",
        f"anchors ({unit_text}, smallest first):",
        f"  {format_anchors(anchors, args.units)}",
        f"{'':{name_width}}  mean IoU  BPR (IoU >= {threshold:g})",
        f"{'k-means anchors':{name_width}}  {ours.mean_iou:8.4f}  {ours.bpr:.4f}",
        f"{reference_name:{name_width}}  {theirs.mean_iou:8.4f}  {theirs.bpr:.4f}   "
        f"({format_anchors(round_anchors(reference, args.units), args.units)})",
    ]
    print("\n".join(lines), flush=True)
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    """``python -m single_stage_detector.tools.kmeans_anchors``: the same command outside the main CLI."""
    from .cli import run_standalone

    return run_standalone("single_stage_detector.tools.kmeans_anchors", DESCRIPTION, add_arguments, main, argv)


if __name__ == "__main__":
    sys.exit(_standalone())
