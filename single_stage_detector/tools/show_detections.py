"""``show-detections``: predictions (red, class and score) and ground truth (green) of a checkpoint on
validation images, drawn on the original images and laid out in a grid PNG.

The grid is ``cols x rows`` cells of ``--cell`` pixels square (cols = min(N, --cols),
rows = ceil(N / cols)); each image is scaled to fit its cell, keeping its aspect ratio.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

PRED_COLOR = (230, 30, 30)
GT_COLOR = (30, 200, 60)
BACKGROUND = (255, 255, 255)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def load_detector(checkpoint: str | os.PathLike | dict, device: str = "cpu"):
    """(detector in eval mode, preset, the checkpoint dict) from a ``checkpoint.pt`` of ``train``
    (its path, or the dict :func:`~single_stage_detector.checkpoint.load_checkpoint` returned)."""
    import dataclasses

    from ..checkpoint import load_checkpoint
    from ..detectors.base import build_detector, configure_preset, get_preset

    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    preset = get_preset(ckpt["preset"])
    input_size = (ckpt.get("config") or {}).get("input_size")
    if input_size:  # a run trained at --input-size evaluates at it
        preset = dataclasses.replace(preset, input_size=int(input_size))
    preset = configure_preset(preset, ckpt.get("config") or {})  # family options (YOLOv1: --anchors, ...)
    detector = build_detector(preset)
    detector.model.load_state_dict(ckpt["model"])
    detector = detector.to(device).eval()
    return detector, preset, ckpt


def _draw_box(draw, box, color, text, font, width: int) -> None:
    x1, y1, x2, y2 = box
    draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
    if text:
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l, b - t
        ty = y1 - th - 3 if y1 - th - 3 >= 0 else y1 + 1
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th + 3], fill=color)
        draw.text((x1 + 2 - l, ty + 1 - t), text, fill=(255, 255, 255), font=font)


def render_grid(checkpoint: str | os.PathLike | dict, data_dir: str | os.PathLike, output: str | os.PathLike, *,
                num_images: int = 8, cols: int = 4, cell: int = 320, min_score: float = 0.3,
                max_detections: int = 20, split: str = "val", device: str = "cpu", start: int = 0) -> dict:
    """Draw and save the grid; returns ``{"path", "size", "images", "predictions", "ground_truth"}``."""
    import torch
    from PIL import Image, ImageDraw

    from ..data.coco import LABEL_NAMES, CocoDetection
    from ..detectors.base import family_of

    detector, preset, _ = load_detector(checkpoint, device)
    dataset = CocoDetection.from_dir(data_dir, split, transform=family_of(preset).eval_transform(preset))
    indices = list(range(start, min(len(dataset), start + num_images)))
    if not indices:
        from ..config import ConfigError

        raise ConfigError(f"--start {start}: the {split} split of {data_dir} has {len(dataset)} images "
                          f"(first index 0, last {len(dataset) - 1})")
    cols = max(1, min(cols, len(indices)))
    rows = math.ceil(len(indices) / cols)
    grid = Image.new("RGB", (cols * cell, rows * cell), BACKGROUND)
    n_pred = n_gt = 0
    for k, idx in enumerate(indices):
        sample = dataset[idx]
        if sample is None:
            continue
        with torch.no_grad():
            det = detector(sample.image.unsqueeze(0).to(device))[0]
        with Image.open(dataset.image_path(idx)) as im:
            img = im.convert("RGB")
        # The original image, scaled (up or down) to fit its cell; boxes are normalised, so they follow.
        fit = (cell - 4) / max(img.size)  # a 2-pixel margin between cells
        img = img.resize((max(1, round(img.width * fit)), max(1, round(img.height * fit))),
                         Image.Resampling.LANCZOS)
        w, h = img.size
        font = _font(11)
        line = 2
        draw = ImageDraw.Draw(img)
        gt_boxes, gt_labels = dataset.targets(idx)
        for box, label in zip(gt_boxes.tolist(), gt_labels.tolist()):
            _draw_box(draw, (box[0] * w, box[1] * h, box[2] * w, box[3] * h), GT_COLOR, LABEL_NAMES[label], font,
                      line)
            n_gt += 1
        keep = (det["scores"] >= min_score).nonzero().flatten()[:max_detections]
        for i in keep.tolist():
            x1, y1, x2, y2 = det["boxes"][i].clamp(0, 1).tolist()
            label, score = int(det["labels"][i]), float(det["scores"][i])
            name = LABEL_NAMES[label] if 0 <= label < len(LABEL_NAMES) else str(label)
            _draw_box(draw, (x1 * w, y1 * h, x2 * w, y2 * h), PRED_COLOR, f"{name} {score:.2f}", font, line)
            n_pred += 1
        r, c = divmod(k, cols)
        grid.paste(img, (c * cell + (cell - img.width) // 2, r * cell + (cell - img.height) // 2))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output, optimize=True)
    return {"path": str(output), "size": grid.size, "images": len(indices), "predictions": n_pred,
            "ground_truth": n_gt}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "show-detections", help="a checkpoint's detections and the ground truth in a PNG grid",
        description="Run a checkpoint.pt of `train` on N validation images and draw predictions (red, class "
                    "and score) and ground truth (green) on the original images, in a grid PNG of "
                    "cols*CELL x rows*CELL pixels.")
    p.add_argument("checkpoint", help="checkpoint.pt written by train / demo")
    p.add_argument("--data-dir", default=None,
                   help="COCO-layout folder (default: data_dir recorded in the checkpoint's config)")
    p.add_argument("--output", "-o", default=None,
                   help="PNG path (default: detections.png next to the checkpoint)")
    p.add_argument("--num-images", "-n", type=int, default=8, help="images in the grid")
    p.add_argument("--start", type=int, default=0, help="index of the first val image")
    p.add_argument("--cols", type=int, default=4, help="grid columns")
    p.add_argument("--cell", type=int, default=320, help="cell size in pixels")
    p.add_argument("--min-score", type=float, default=0.3, help="draw predictions with at least this score")
    p.add_argument("--max-detections", type=int, default=20, help="per image")
    p.add_argument("--split", default="val", choices=("val", "train"), help="dataset split")
    p.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import checkpoint_data_dir
    from ..config import check_device
    from .cli import load_checkpoint_arg, require_positive

    require_positive(args, "--num-images", "--cols")
    require_positive(args, "--cell", minimum=32)
    require_positive(args, "--start", "--max-detections", minimum=0)
    check_device(args.device)
    ckpt = load_checkpoint_arg(args.checkpoint)
    data_dir = checkpoint_data_dir(ckpt, args.checkpoint, args.data_dir)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "detections.png")
    info = render_grid(ckpt, data_dir, output, num_images=args.num_images, cols=args.cols,
                       cell=args.cell, min_score=args.min_score, max_detections=args.max_detections,
                       split=args.split, device=args.device, start=args.start)
    w, h = info["size"]
    print(f"wrote {info['path']} ({w}x{h} px): {info['images']} images, {info['predictions']} predictions "
          f"(red, score >= {args.min_score}), {info['ground_truth']} ground-truth boxes (green)")
    return 0
