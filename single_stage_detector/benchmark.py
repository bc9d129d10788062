"""``python -m single_stage_detector benchmark``: images/s of training steps, inference and the input pipeline.

Each part is timed on its own so that a slow part is easy to spot: ``train`` and
``eval`` feed the model random images with realistic targets (no data loading);
``data`` runs the training input pipeline alone (decode, augmentation, collation), once per
backend (``--data-backends torch dali``; DALI is skipped with a note when not installed).
Figures are medians over timed iterations after warm-up iterations.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

__all__ = ["add_benchmark_arguments", "run_benchmark"]


def add_benchmark_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="ssd300_resnet34", help="model preset")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 32 on CUDA, 8 on CPU)")
    p.add_argument("--parts", nargs="+", default=["train", "eval", "data"], choices=["train", "eval", "data"])
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", help="auto | off | bf16 | fp16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--data-dir", default="data/synthetic",
                   help="dataset for the data part (the synthetic one is generated if missing)")
    p.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--max-samples", type=int, default=1)
    p.add_argument("--data-backends", nargs="+", default=["torch", "dali"], choices=["torch", "dali"],
                   help="input pipelines timed by the data part (dali is skipped with a note when not installed)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_targets(batch: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, 8, (1,), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * 0.6
        wh = 0.05 + torch.rand(n, 2, generator=gen) * 0.35
        boxes.append(torch.cat([xy, xy + wh], dim=1))
        labels.append(torch.randint(1, 81, (n,), generator=gen))
    return boxes, labels


def _time(fn, warmup: int, iters: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _benchmark_data(args: argparse.Namespace, preset, batch: int, device: torch.device) -> list[dict]:
    """Images/s of the training input pipeline alone, per backend (decode, augmentation, batching).

    torch: the DataLoader with ``--num-workers`` worker processes (targets encoded later,
    on the model's device, so not timed here). dali: the DALI pipeline with
    ``--num-workers`` threads, on the GPU when the device is CUDA, else CPU-only, including
    the box encoding of the targets (BoxCoder on the pipeline's device).
    """
    from .box_coder import default_boxes
    from .data.coco import CocoDetection, find_coco_split
    from .data.loader import build_train_loader
    from .data.synthetic import ensure_synthetic_coco
    from .data.transforms import SSDTrainTransform

    if not os.path.isdir(os.path.join(args.data_dir, "annotations")) and "synthetic" in args.data_dir:
        ensure_synthetic_coco(args.data_dir)
    img_dir, ann = find_coco_split(args.data_dir, "train2017")
    needed = args.warmup + args.iters
    rows = []
    for backend in getattr(args, "data_backends", ["torch"]):
        if backend == "torch":
            ds = CocoDetection(img_dir, ann, transform=SSDTrainTransform(preset.input_size, args.max_samples))
            loader = build_train_loader(ds, batch, num_workers=args.num_workers, seed=0)
            part = f"data pipeline (torch, {args.num_workers} workers)"
        else:
            from .data.dali import DaliTrainLoader, dali_import_error

            err = dali_import_error()
            if err is not None:
                print(f"data pipeline (dali): skipped, DALI not importable ({err})", flush=True)
                continue
            index = CocoDetection(img_dir, ann)
            files = [index.image_info(i)["file_name"] for i in index.image_ids]
            device_id = None
            if device.type == "cuda":
                device_id = device.index if device.index is not None else torch.cuda.current_device()
            loader = DaliTrainLoader(img_dir, ann, files, batch_size=batch, input_size=preset.input_size, seed=0,
                                     device_id=device_id, num_threads=args.num_workers,
                                     max_samples=args.max_samples, default_boxes=default_boxes(preset.box_spec),
                                     fp16=device.type == "cuda")
            where = "gpu" if device_id is not None else "cpu"
            part = f"data pipeline (dali {where}, {max(1, args.num_workers)} threads)"
        if len(loader) < needed:
            raise SystemExit(f"benchmark data: {len(loader)} batches of {batch} in {args.data_dir}, need {needed}")
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(1)
        it = iter(loader)
        t = _time(lambda: next(it), args.warmup, args.iters, device if backend == "dali" else torch.device("cpu"))
        rows.append({"part": part, "batch": batch, "median_s": statistics.median(t)})
        if hasattr(loader, "close"):  # DALI: stop its threads before the next backend is timed
            loader.close()
    return rows


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    from .detector import SSDDetector
    from .distributed import select_device
    from .engine import AmpSettings, backward, optimizer_step
    from .models import build_model, get_preset

    device = select_device(args.device)
    preset = get_preset(args.preset)
    batch = args.batch_size or (32 if device.type == "cuda" else 8)
    amp = AmpSettings.resolve(args.amp, device)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    amp_name = str(amp.dtype).replace("torch.", "") if amp.enabled else "fp32"
    print(f"device: {name}; preset {preset.name} (input {preset.input_size}); batch {batch}; "
          f"precision {amp_name}; channels_last {channels_last}; torch {torch.__version__}", flush=True)

    detector = None
    if "train" in args.parts or "eval" in args.parts:
        detector = SSDDetector(build_model(preset), preset.box_spec).to(device)
        if channels_last:
            detector = detector.to(memory_format=fmt)
        images = torch.randn(batch, 3, preset.input_size, preset.input_size, device=device).to(memory_format=fmt)

    if "train" in args.parts:
        opt = torch.optim.SGD(detector.parameters(), lr=1e-3, momentum=0.9, foreach=True)
        boxes, labels = _random_targets(batch, gen)
        boxes = [b.to(device) for b in boxes]
        labels = [lb.to(device) for lb in labels]
        scaler = torch.amp.GradScaler(device.type) if amp.needs_scaler else None
        detector.train()

        def train_step() -> None:
            with amp.autocast():
                losses = detector(images, {"boxes": boxes, "labels": labels})
            backward(sum(losses.values()), scaler)
            optimizer_step(opt, scaler)

        t = _time(train_step, args.warmup, args.iters, device)
        rows.append({"part": "train step (fwd+loss+bwd+SGD)", "batch": batch, "median_s": statistics.median(t)})

    if "eval" in args.parts:
        detector.eval()

        @torch.no_grad()
        def eval_step() -> None:
            with amp.autocast():
                detector(images)

        t = _time(eval_step, args.warmup, args.iters, device)
        rows.append({"part": "inference (fwd+decode+NMS)", "batch": batch, "median_s": statistics.median(t)})

    if "data" in args.parts:
        rows.extend(_benchmark_data(args, preset, batch, device))

    print(f"{'part':<40} {'batch':>5} {'ms/batch':>10} {'images/s':>10}")
    for r in rows:
        r["images_per_s"] = r["batch"] / r["median_s"]
        print(f"{r['part']:<40} {r['batch']:>5} {1000 * r['median_s']:>10.1f} {r['images_per_s']:>10.1f}")
    return rows
