"""``evaluate``: COCO box evaluation of a ``checkpoint.pt`` on a dataset's val split, outside a timed run."""
from __future__ import annotations

import argparse
import json
import os

__all__ = ["add_parser", "evaluate_checkpoint", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="COCO AP of a checkpoint on the val split (all 12 COCO stats)",
        description="Evaluate a checkpoint.pt of `train` with pycocotools on the val split of a COCO-layout "
                    "folder, with the benchmark's post-processing, and print the 12 COCO stats.")
    p.add_argument("checkpoint", help="checkpoint.pt written by train / demo")
    p.add_argument("--data-dir", default=None, help="COCO-layout folder (default: the checkpoint's data_dir)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--max-images", type=int, default=None, help="only the first N val images")
    p.add_argument("--all-images", action="store_true", help="also val images without annotations")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", help="auto | off | bf16 | fp16")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def evaluate_checkpoint(checkpoint: str | os.PathLike | dict, data_dir: str | os.PathLike, *, batch_size: int = 32,
                        num_workers: int = 2, max_images: int | None = None, all_images: bool = False,
                        device: str = "auto", amp: str = "auto"):
    """The :class:`~single_stage_detector.evaluation.EvalResult` of ``checkpoint`` on ``data_dir``'s val split."""
    import torch

    from ..data.coco import COCO_CATEGORY_IDS
    from ..data.pipeline import build_torch_eval_loader
    from ..distributed import DistInfo, select_device
    from ..engine import AmpSettings, evaluate
    from ..evaluation import CocoEvaluator
    from .show_detections import load_detector

    dev = select_device(device)
    detector, preset, _ = load_detector(checkpoint, device=str(dev))
    loader, _, ann = build_torch_eval_loader(data_dir, preset.input_size, batch_size, num_workers=num_workers,
                                             max_images=max_images, all_images=all_images)
    label_to_category = torch.tensor([0] + list(COCO_CATEGORY_IDS), dtype=torch.int64)
    return evaluate(detector, loader, CocoEvaluator(ann), label_to_category,
                    amp=AmpSettings.resolve(amp, dev), info=DistInfo(device=dev))


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import checkpoint_data_dir, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    data_dir = checkpoint_data_dir(ckpt, args.checkpoint, args.data_dir)
    result = evaluate_checkpoint(ckpt, data_dir, batch_size=args.batch_size, num_workers=args.num_workers,
                                 max_images=args.max_images, all_images=args.all_images, device=args.device,
                                 amp=args.amp)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "data_dir": str(data_dir), "ap": result.ap,
                          "num_images": result.num_images, "num_detections": result.num_detections,
                          "seconds": result.seconds, "stats": result.stats}))
        return 0
    print(f"{args.checkpoint} on {data_dir}: {result.num_images} images, {result.num_detections} detections, "
          f"{result.seconds:.1f} s")
    for name, value in result.stats.items():
        print(f"  {name:<10} {value:.4f}")
    return 0
