"""``evaluate``: COCO box evaluation of a ``checkpoint.pt`` on a dataset's val split, outside a timed run."""
from __future__ import annotations

import argparse
import json
import os

__all__ = ["add_parser", "evaluate_checkpoint", "run"]


def add_parser(sub) -> None:
    from ..config import default_num_workers

    p = sub.add_parser(
        "evaluate", help="COCO AP of a checkpoint on the val split (12 COCO stats)",
        description="Evaluate a checkpoint.pt of `train` (COCOeval: pycocotools or faster-coco-eval, --coco-eval) "
                    "on the val split of a COCO-layout "
                    "folder, with the benchmark's post-processing, and print the 12 COCO stats.")
    p.add_argument("checkpoint", help="checkpoint.pt written by train / demo")
    p.add_argument("--data-dir", default=None, help="COCO-layout folder (default: the checkpoint's data_dir)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=default_num_workers(), help="data-loader worker processes")
    p.add_argument("--max-images", type=int, default=None, help="only the first N val images")
    p.add_argument("--all-images", action="store_true", help="also val images without annotations")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="evaluation precision (as train's --eval-amp): auto (= off, fp32) | off | bf16 | fp16")
    p.add_argument("--clip-boxes", action="store_true",
                   help="SSD presets: clip the detections to the image after NMS (NVIDIA v1.1); default: "
                        "never clipped, as the reference. YOLO presets always clip after NMS (darknet's "
                        "print_cocos), with or without this flag")
    p.add_argument("--data-backend", default="torch", choices=("torch", "dali", "auto"),
                   help="input pipeline reading the val split (both give the same AP; see docs/DALI.md)")
    p.add_argument("--input-sizes", type=int, nargs="+", default=None, metavar="SIZE",
                   help="evaluate at each of these input sides (multiples of 32; presets of a family with a "
                        "variable input size, YOLO) and print one row of AP, AP50, AP75, AP_S, AP_M, AP_L per "
                        "size (default: the checkpoint's input size only)")
    p.add_argument("--coco-eval", default="auto", choices=("auto", "pycocotools", "faster-coco-eval"),
                   help="COCO scorer (as train's --coco-eval): auto (faster-coco-eval when installed, else "
                        "pycocotools) | pycocotools | faster-coco-eval; both give the same stats")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def evaluate_checkpoint(checkpoint: str | os.PathLike | dict, data_dir: str | os.PathLike, *, batch_size: int = 32,
                        num_workers: int = 2, max_images: int | None = None, all_images: bool = False,
                        device: str = "auto", amp: str = "auto", clip_boxes: bool = False,
                        data_backend: str = "torch", input_size: int | None = None, val_loss: bool = False,
                        coco_eval: str = "auto"):
    """The :class:`~single_stage_detector.evaluation.EvalResult` of ``checkpoint`` on ``data_dir``'s val split.

    ``amp`` is the evaluation precision (``auto``: fp32, as ``train --eval-amp``);
    ``clip_boxes`` clips the detections to the image after NMS (default: the reference's
    unclipped boxes); ``input_size``: evaluate at this input side instead of the checkpoint's
    (ConfigError naming ``--input-sizes`` for a family with a fixed input size); ``val_loss``:
    also the training loss on the val images (``val_loss``, ``val_loss_terms`` of the result);
    ``coco_eval``: the COCO scorer, auto | pycocotools | faster-coco-eval (``backend`` of the result).
    """
    import torch

    from ..data.coco import COCO_CATEGORY_IDS
    from ..config import ConfigError, TrainConfig
    from ..data.pipeline import build_eval_input
    from ..distributed import DistInfo, select_device
    from ..engine import AmpSettings, evaluate
    from ..evaluation import CocoEvaluator
    from ..detectors.base import family_of
    from .show_detections import load_detector

    dev = select_device(device)
    detector, preset, _ = load_detector(checkpoint, device=str(dev))
    detector.clip_boxes = clip_boxes
    family = family_of(preset)
    if input_size is not None:
        _check_variable_input_size(preset)
        import dataclasses

        preset = dataclasses.replace(preset, input_size=int(input_size))
    if not family.supports_dali:
        if data_backend == "dali":
            raise ConfigError(f"--data-backend dali: preset {preset.name!r} ({family.name}) is read with the "
                              "torch path only")
        data_backend = "torch"
    # The val split exactly as a training run reads it (same image selection and checks).
    cfg = TrainConfig(data_dir=str(data_dir), data_backend=data_backend, eval_batch_size=batch_size,
                      num_workers=num_workers, max_eval_images=max_images, eval_all_images=all_images)
    val = build_eval_input(cfg, input_size=preset.input_size, device=dev, eval_transform=family.eval_transform(preset))
    label_to_category = torch.tensor([0] + list(COCO_CATEGORY_IDS), dtype=torch.int64)
    try:
        evaluator = CocoEvaluator(val.annotation_file, backend=coco_eval)
        result = evaluate(detector, val.loader, evaluator, label_to_category,
                          amp=AmpSettings.resolve_eval(amp, dev), info=DistInfo(device=dev), val_loss=val_loss)
        result.policy = getattr(detector, "eval_policy", None)
        return result
    finally:
        val.close()


def _check_variable_input_size(preset) -> None:
    from ..config import ConfigError
    from ..detectors.base import family_of

    family = family_of(preset)
    if not family.variable_input_size:
        raise ConfigError(f"--input-sizes: preset {preset.name!r} ({family.name}) has a fixed input size "
                          f"({preset.input_size}); only presets of families with a variable input size (YOLO) "
                          "can be evaluated at other sizes")


SIZE_TABLE_STATS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
"""The columns of ``--input-sizes``' table (seed 004's layout), COCO stats in percent."""


def format_size_table(rows: list[tuple[int, dict]]) -> str:
    """``[(input size, COCO stats)]`` -> the table ``evaluate --input-sizes`` prints: one line per
    size with AP, AP50, AP75, AP_S, AP_M, AP_L in percent (one decimal)."""
    short = {"AP_small": "AP_S", "AP_medium": "AP_M", "AP_large": "AP_L"}
    header = f"{'size':>6}" + "".join(f"{short.get(name, name):>8}" for name in SIZE_TABLE_STATS)
    lines = [header]
    for size, stats in rows:
        lines.append(f"{size:>6}" + "".join(f"{100.0 * stats[name]:>8.1f}" for name in SIZE_TABLE_STATS))
    return "\n".join(lines)


def _run_sizes(args: argparse.Namespace, ckpt: dict, data_dir: str) -> int:
    """``evaluate --input-sizes``: one evaluation per size, then the table (or one JSON object)."""
    import contextlib
    import sys

    from ..detectors.base import get_preset

    _check_variable_input_size(get_preset(ckpt["preset"]))
    results = []
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        from ..distributed import select_device

        device = str(select_device(args.device))  # once: its CPU-fallback warning is not repeated per size
        for size in args.input_sizes:
            results.append((size, evaluate_checkpoint(
                ckpt, data_dir, batch_size=args.batch_size, num_workers=args.num_workers, max_images=args.max_images,
                all_images=args.all_images, device=device, amp=args.amp, clip_boxes=args.clip_boxes,
                data_backend=args.data_backend, input_size=size, coco_eval=args.coco_eval)))
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "data_dir": str(data_dir),
                          "sizes": [{"input_size": size, "ap": r.ap, "num_images": r.num_images,
                                     "num_detections": r.num_detections, "seconds": r.seconds, "stats": r.stats}
                                    for size, r in results],
                          "policy": results[0][1].policy}))
        return 0
    first = results[0][1]
    print(f"{args.checkpoint} on {data_dir}: {first.num_images} images, preset {ckpt['preset']}, "
          f"{sum(r.seconds for _, r in results):.1f} s; COCO box AP (%) per input size:")
    print(format_size_table([(size, r.stats) for size, r in results]))
    if first.policy:
        print("policy: " + ", ".join(f"{k} {v}" for k, v in first.policy.items()
                                     if isinstance(v, (int, float, bool)) or v is None))
    return 0


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import checkpoint_data_dir
    from ..config import ConfigError, check_device
    from .cli import load_checkpoint_arg, require_positive

    require_positive(args, "--batch-size", "--max-images")
    require_positive(args, "--num-workers", minimum=0)
    check_device(args.device)
    for size in args.input_sizes or ():
        if size < 32 or size % 32:
            raise ConfigError(f"--input-sizes: each size must be a positive multiple of 32, got {size}")
    ckpt = load_checkpoint_arg(args.checkpoint)
    data_dir = checkpoint_data_dir(ckpt, args.checkpoint, args.data_dir)
    if args.input_sizes:
        return _run_sizes(args, ckpt, data_dir)
    import contextlib
    import sys

    # With --json, stdout holds the JSON object alone: notes (the device warning) go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = evaluate_checkpoint(ckpt, data_dir, batch_size=args.batch_size, num_workers=args.num_workers,
                                     max_images=args.max_images, all_images=args.all_images, device=args.device,
                                     amp=args.amp, clip_boxes=args.clip_boxes, data_backend=args.data_backend,
                                     val_loss=True, coco_eval=args.coco_eval)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "data_dir": str(data_dir), "ap": result.ap,
                          "num_images": result.num_images, "num_detections": result.num_detections,
                          "seconds": result.seconds, "coco_eval": result.backend, "stats": result.stats,
                          "policy": result.policy,
                          "val_loss": result.val_loss, "val_loss_terms": result.val_loss_terms}))
        return 0
    print(f"{args.checkpoint} on {data_dir}: {result.num_images} images, {result.num_detections} detections, "
          f"{result.seconds:.1f} s (scored by {result.backend})")
    for name, value in result.stats.items():
        print(f"  {name:<10} {value:.4f}")
    if result.val_loss is not None:
        terms = ", ".join(f"{k} {v:.4f}" for k, v in result.val_loss_terms.items())
        print(f"  val loss   {result.val_loss:.4f} ({terms})")
    if result.policy:
        print("policy: " + ", ".join(f"{k} {v}" for k, v in result.policy.items()
                                     if isinstance(v, (int, float, bool)) or v is None))
    return 0
