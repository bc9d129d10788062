"""``predict``: a checkpoint's detections on image files, as JSON and as pictures.

Inputs are image files or folders (their ``.jpg``/``.jpeg``/``.png`` files, sorted by
name, not recursive). Each image goes through the evaluation transform of the checkpoint's
preset (:func:`eval_transform`), batches run through the detector, and the boxes are mapped
back to the pixels of the original image and clipped to it. Written to ``--output``:

* ``detections.json``: a list in the style of COCO results, one entry per detection:
  ``{"file_name", "category_id" (COCO id), "category_name", "bbox" [x, y, w, h] pixels of
  the original image, "score"}``, images in input order, each image's detections by
  decreasing score;
* ``<stem>.jpg`` per image: the image with its detections drawn (class and score).

An unreadable image is named on stderr and skipped; the others go on. ``--score-threshold``
(default 0.3, as ``show-detections``) keeps the JSON readable: for a mAP use ``evaluate``,
whose low threshold (0.05) is what COCO AP needs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "add_arguments", "main", "collect_images", "eval_transform", "boxes_to_image",
           "predict"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Files of a folder that ``predict`` reads (case-insensitive)."""

DESCRIPTION = (
    "Run a checkpoint.pt of `train` on image files or folders (.jpg/.jpeg/.png) and write DIR/detections.json "
    "(COCO-results style: file_name, category_id, category_name, bbox [x, y, w, h] in pixels of the original "
    "image, score) and DIR/<stem>.jpg with the detections drawn.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's flags (imports nothing heavy)."""
    parser.add_argument("images", nargs="+", metavar="IMAGES",
                        help="image files and/or folders of .jpg/.jpeg/.png images")
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train / demo")
    parser.add_argument("--output", "-o", default="predictions", help="output folder")
    parser.add_argument("--score-threshold", type=float, default=0.3,
                        help="keep detections with at least this score (as show-detections; default: 0.3)")
    parser.add_argument("--max-detections", type=int, default=100, help="per image, best scores first")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def collect_images(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs`` (files as given; folders: their .jpg/.jpeg/.png files
    sorted by name), in order, each once.

    Raises:
        ConfigError: an input that does not exist, or a folder without such images.
    """
    from ..config import ConfigError

    files: list[Path] = []
    seen: set[Path] = set()
    for text in inputs:
        path = Path(text)
        if not path.exists():
            raise ConfigError(f"{text} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ConfigError(f"{text}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in this folder")
        else:
            found = [path]
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                files.append(p)
    return files


def eval_transform(preset):
    """The evaluation transform of ``preset``'s detector family: ``(PIL image, boxes, labels) ->
    (Tensor[3, S, S], boxes, labels)``.

    The family's (``DetectorFamily.eval_transform``), the one ``evaluate`` uses: a plain resize
    to ``preset.input_size`` x ``preset.input_size`` and the family's normalisation.
    """
    from ..detectors.base import family_of

    return family_of(preset).eval_transform(preset)


def boxes_to_image(transform, boxes, width: int, height: int):
    """Detections ``Tensor[K, 4]`` (x1, y1, x2, y2 normalised to the network input) -> pixels of the
    original ``width x height`` image, clipped to it.

    A transform with a ``boxes_to_image(boxes, width, height)`` method (one that pads or crops)
    maps them itself; for a plain resize, normalised coordinates of the input are normalised
    coordinates of the image.
    """
    import torch

    inverse = getattr(transform, "boxes_to_image", None)
    if callable(inverse):
        pixels = inverse(boxes, width, height)
    else:
        pixels = boxes * torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    upper = torch.tensor([width, height, width, height], dtype=pixels.dtype, device=pixels.device)
    return torch.minimum(pixels.clamp(min=0), upper)


def _read_image(path: Path):
    """(RGB PIL image, None) or (None, reason) for a file Pillow cannot decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            return im.convert("RGB"), None
    except UnidentifiedImageError:
        return None, "not an image Pillow can read"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return None, str(e) or type(e).__name__


def _picture_names(files: list[Path], output: Path) -> list[Path]:
    """``output/<stem>.jpg`` per image; a stem seen before gets ``-2``, ``-3``, ... Raises ConfigError
    when a picture would overwrite one of the input images."""
    from ..config import ConfigError

    names, used = [], set()
    inputs = {p.resolve() for p in files}
    for p in files:
        stem, n = p.stem, 1
        while stem.lower() in used:
            n += 1
            stem = f"{p.stem}-{n}"
        used.add(stem.lower())
        target = output / f"{stem}.jpg"
        if target.resolve() in inputs:
            raise ConfigError(f"--output {output}: writing {target.name} would overwrite the input image {target}; "
                              f"choose another output folder")
        names.append(target)
    return names


def predict(detector, preset, files: list[Path], output: str | os.PathLike, *, score_threshold: float = 0.3,
            max_detections: int = 100, batch_size: int = 8, device: str = "cpu") -> dict:
    """Detections of ``detector`` (eval mode, on ``device``) on ``files``; writes
    ``output/detections.json`` and one picture per readable image (unreadable ones are named on
    stderr and skipped).

    Returns:
        ``{"json": path, "pictures": [paths], "detections": list of the JSON entries,
        "skipped": [(file, reason)]}``.

    Raises:
        ConfigError: no file could be read, or a picture would overwrite an input image.
    """
    import torch
    from PIL import ImageDraw

    from ..checkpoint import atomic_write
    from ..config import ConfigError
    from ..data.coco import LABEL_NAMES, labels_to_coco_ids
    from .show_detections import PRED_COLOR, _draw_box, _font

    output = Path(output)
    pictures = _picture_names(files, output)
    transform = eval_transform(preset)
    # The detector's own floor must not hide detections the user asked for.
    if getattr(detector, "score_threshold", None) is not None and detector.score_threshold > score_threshold:
        detector.score_threshold = score_threshold
    empty_boxes, empty_labels = torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)

    results, written, skipped = [], [], []
    output.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(files), batch_size):
        batch = []  # (file, picture path, PIL image, input tensor)
        for path, picture in zip(files[start:start + batch_size], pictures[start:start + batch_size]):
            image, reason = _read_image(path)
            if image is None:
                skipped.append((str(path), reason))
                print(f"warning: {path}: unreadable image ({reason}); skipped", file=sys.stderr, flush=True)
                continue
            tensor, _, _ = transform(image, empty_boxes, empty_labels)
            batch.append((path, picture, image, tensor))
        if not batch:
            continue
        with torch.inference_mode():
            dets = detector(torch.stack([b[3] for b in batch]).to(device))
        for (path, picture, image, _), det in zip(batch, dets):
            scores = det["scores"].float()
            keep = (scores >= score_threshold).nonzero().flatten()
            keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][:max_detections]
            width, height = image.size
            boxes = boxes_to_image(transform, det["boxes"][keep].float(), width, height).cpu()
            scores = scores[keep].cpu()
            labels = det["labels"][keep].cpu()
            visible = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # not clipped away entirely
            boxes, scores, labels = boxes[visible], scores[visible], labels[visible]
            category_ids = labels_to_coco_ids(labels)
            draw, font = ImageDraw.Draw(image), _font(max(11, round(max(width, height) / 50)))
            line = max(2, round(max(width, height) / 300))
            for box, score, label, cid in zip(boxes.tolist(), scores.tolist(), labels.tolist(),
                                              category_ids.tolist()):
                name = LABEL_NAMES[label]
                x1, y1, x2, y2 = box
                results.append({"file_name": str(path), "category_id": int(cid), "category_name": name,
                                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                                "score": round(float(score), 5)})
                _draw_box(draw, box, PRED_COLOR, f"{name} {score:.2f}", font, line)
            image.save(picture, quality=90)
            written.append(str(picture))
    if not written:
        raise ConfigError(f"none of the {len(files)} image(s) could be read: "
                          + "; ".join(f"{f} ({r})" for f, r in skipped[:3]) + ("; ..." if len(skipped) > 3 else ""))
    json_path = output / "detections.json"

    def dump(tmp: str) -> None:  # one detection per line: readable, and diff-able between checkpoints
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("[\n" + ",\n".join(json.dumps(r) for r in results) + ("\n]\n" if results else "]\n"))

    atomic_write(json_path, dump)
    return {"json": str(json_path), "pictures": written, "detections": results, "skipped": skipped}


def main(args: argparse.Namespace) -> int:
    """Run the command; 0 on success (unreadable images skipped with a warning). Bad input raises
    :class:`~single_stage_detector.config.ConfigError` naming the flag or file."""
    from ..config import ConfigError, check_device
    from .cli import load_checkpoint_arg, require_positive

    require_positive(args, "--max-detections", "--batch-size")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ConfigError(f"--score-threshold: must be in [0, 1], got {args.score_threshold}")
    check_device(args.device)
    files = collect_images(args.images)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ConfigError(f"--output {args.output} is a file, not a folder")

    import torch

    from .show_detections import load_detector

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint_arg(args.checkpoint)
    detector, preset, _ = load_detector(ckpt, device)
    info = predict(detector, preset, files, args.output, score_threshold=args.score_threshold,
                   max_detections=args.max_detections, batch_size=args.batch_size, device=device)
    images = len(info["pictures"])
    skipped = f", {len(info['skipped'])} unreadable skipped" if info["skipped"] else ""
    print(f"wrote {info['json']}: {len(info['detections'])} detections (score >= {args.score_threshold:g}) on "
          f"{images} image(s){skipped}; pictures {args.output}/<stem>.jpg", flush=True)
    return 0


def _standalone(argv: list[str] | None = None) -> int:
    """``python -m single_stage_detector.tools.predict``: the same command outside the main CLI."""
    from .cli import run_standalone

    return run_standalone("single_stage_detector.tools.predict", DESCRIPTION, add_arguments, main, argv)


if __name__ == "__main__":
    sys.exit(_standalone())
