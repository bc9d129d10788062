"""``python -m single_stage_detector benchmark``: images/s of training steps, inference and the input pipeline.

Each part is timed on its own so that a slow part is easy to spot: ``train`` and
``eval`` feed the model random images with realistic targets (no data loading);
``data`` runs the training input pipeline alone (decode, augmentation, collation), once per
backend (``--data-backends torch dali``; DALI is skipped with a note when not installed);
``components`` times box encoding, the loss (forward + backward) and decode + NMS on
realistic box statistics, each next to the plain per-image implementation of the same
maths (:mod:`.reference_impl`), interleaved in one process.
Figures are medians over timed iterations after warm-up iterations.

Training fast-path modes (``--mode``, one per process so that each starts cold): ``fp32``
(the baseline: fp32, NCHW, foreach SGD, eager), ``bf16``, ``bf16-cl`` (+ channels-last),
``fp16-cl`` (fp16 with the gradient scaler), ``bf16-cl-compile`` (+ ``torch.compile``),
``bf16-cl-graphs`` (+ the whole step as one CUDA graph; CUDA only). Every mode but ``fp32``
uses fused SGD where the device supports it. Without ``--mode`` the individual flags
apply; their CUDA defaults are bf16, channels-last, fused SGD, eager. In every mode the
targets are encoded on the device in each step, outside the captured/compiled part, as in
training. ``--json`` writes the rows and the settings for scripts (``gpu_check``).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import time

import torch

from .config import ConfigError

__all__ = ["add_benchmark_arguments", "run_benchmark"]


def add_benchmark_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="ssd300_resnet34", help="model preset")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 32 on CUDA, 8 on CPU)")
    p.add_argument("--parts", nargs="+", default=None,
                   choices=["train", "eval", "data", "components"],
                   help="what to time (default: train eval data; train eval for YOLO presets); components: encoding, loss and decode+NMS against plain per-image code "
                        "(batches 32, 8 and 8 unless --batch-size is given)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="auto", help="auto | off | bf16 | fp16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format (default: on for CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the detector (train part)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the training step as one CUDA graph (CUDA only; eager fallback on other shapes)")
    p.add_argument("--fused-sgd", action=argparse.BooleanOptionalAction, default=None,
                   help="fused SGD kernel (default: on where supported on CUDA)")
    p.add_argument("--mode", choices=sorted(MODES), default=None,
                   help="a named fast-path mode; sets --amp, --channels-last, --fused-sgd, --compile, --cuda-graphs")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows and settings as JSON")
    p.add_argument("--data-dir", default=None,
                   help="dataset for the data part (default: data/synthetic; the synthetic dataset is "
                        "generated into it when missing or empty; data/photos with --photos)")
    p.add_argument("--photos", action="store_true",
                   help="time the data part on real photographs: scikit-image's sample photos cropped and "
                        "re-encoded as 640-pixel COCO-like JPEGs with COCO-like boxes (needs scikit-image)")
    p.add_argument("--color-jitter", default="torchvision", choices=["torchvision", "fused"],
                   help="colour jitter of the torch data pipeline (as train --color-jitter)")
    p.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="data part: DataLoader workers / DALI threads")
    p.add_argument("--max-samples", type=int, default=1, help="data part: SSD random-crop tries (1 or 50)")
    p.add_argument("--data-backends", nargs="+", default=["torch", "dali"], choices=["torch", "dali"],
                   help="input pipelines timed by the data part (dali is skipped with a note when not installed)")


# Training fast-path modes: (amp, channels_last, fused_sgd (None: where supported), compile, cuda_graphs).
MODES: dict[str, tuple[str, bool, bool | None, bool, bool]] = {
    "fp32": ("off", False, False, False, False),
    "bf16": ("bf16", False, None, False, False),
    "bf16-cl": ("bf16", True, None, False, False),
    "fp16-cl": ("fp16", True, None, False, False),
    "bf16-cl-compile": ("bf16", True, None, True, False),
    "bf16-cl-graphs": ("bf16", True, None, False, True),
}


def apply_mode(args: argparse.Namespace) -> None:
    """Set the individual fast-path flags from ``args.mode`` (no-op without one)."""
    mode = getattr(args, "mode", None)
    if mode is None:
        return
    args.amp, args.channels_last, args.fused_sgd, args.compile, args.cuda_graphs = MODES[mode]


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
    """Images/s of the training input pipeline alone, per backend, targets encoded included.

    torch: the DataLoader with ``--num-workers`` worker processes (read, decode, crop,
    flip, colour jitter ``--color-jitter``, collate and, on the CPU, encode the batch's
    targets, as training does: ``pipeline.train_collate``), then the move to ``device``,
    where the uint8 images are normalised (and, on a GPU, the targets encoded).
    dali: the DALI pipeline with ``--num-workers`` threads, on the GPU when the device is
    CUDA, else CPU-only, its targets encoded on the pipeline's device. The rate is the
    timed batches over their total wall time (batches arrive in bursts from parallel
    workers, so a median of single-batch times would mislead).

    YOLO presets: the family's augmentation (affine warp + HSV, ``YOLOTrainTransform``) in
    both backends (``data/dali_yolo.py`` for DALI) and no encoding (YOLO assigns its targets
    in the forward pass).
    """
    from .box_coder import BoxCoder, default_boxes
    from .data.coco import CocoDetection, find_coco_split
    from .data.loader import build_train_loader
    from .data.pipeline import train_collate
    from .detectors.base import family_of

    needed = args.warmup + args.iters
    data_dir = _data_part_dataset(args, needed * batch)
    img_dir, ann = find_coco_split(data_dir, "train2017")
    family = family_of(preset)
    rows = []
    for backend in getattr(args, "data_backends", ["torch"]):
        if family.dali_graph == "yolo":
            loader, part, fetch = _yolo_data_loader(args, preset, batch, device, backend, img_dir, ann)
            if loader is None:
                continue
        elif backend == "torch":
            # The training input exactly: the family's transform (uint8 out) and collate (on the
            # CPU, targets encoded in the workers), then the move to the device, which normalises
            # the images; on a GPU the detector encodes there, as in training.
            transform = family.train_transform(preset, args)
            ds = CocoDetection(img_dir, ann, transform=transform)
            loader = build_train_loader(ds, batch, num_workers=args.num_workers, seed=0,
                                        collate_fn=train_collate(preset.name, transform, device))
            part = f"data pipeline (torch, {args.num_workers} workers, {args.color_jitter} jitter) + encoding"

            coder = BoxCoder(default_boxes(preset.box_spec).to(device))

            def fetch(it) -> None:
                b = next(it).to(device)
                if b.encoded is None:
                    coder.encode(b.boxes, b.labels)
        else:
            from .data.dali import DaliTrainLoader, dali_import_error

            err = dali_import_error()
            if err is not None:
                print(f"data pipeline (dali): skipped, DALI not importable ({err})", flush=True)
                continue
            index = CocoDetection(img_dir, ann)
            device_id = None
            if device.type == "cuda":
                device_id = device.index if device.index is not None else torch.cuda.current_device()
            loader = DaliTrainLoader(img_dir, ann, index.file_names, batch_size=batch, input_size=preset.input_size,
                                     seed=0, device_id=device_id, num_threads=args.num_workers,
                                     max_samples=args.max_samples, default_boxes=default_boxes(preset.box_spec),
                                     fp16=device.type == "cuda")
            where = "gpu" if device_id is not None else "cpu"
            part = f"data pipeline (dali {where}, {max(1, args.num_workers)} threads) + encoding"

            def fetch(it) -> None:
                next(it)
        if len(loader) < needed:
            raise SystemExit(f"benchmark data: {len(loader)} batches of {batch} in {data_dir}, need {needed}")
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(1)
        it = iter(loader)
        timing_device = device if backend == "dali" or device.type == "cuda" else torch.device("cpu")
        for _ in range(args.warmup):
            fetch(it)
        _sync(timing_device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            fetch(it)
        _sync(timing_device)
        rows.append({"part": part, "batch": batch, "median_s": (time.perf_counter() - t0) / args.iters})
        del it
        if hasattr(loader, "close"):  # DALI: stop its threads before the next backend is timed
            loader.close()
    return rows


def _yolo_data_loader(args: argparse.Namespace, preset, batch: int, device: torch.device, backend: str, img_dir,
                      ann) -> tuple:
    """``(loader, row name, fetch)`` of the YOLO family's training input for ``backend``; ``(None, ...)``
    (after a note) when DALI is not importable."""
    from .data.coco import CocoDetection
    from .data.loader import build_train_loader
    from .detectors.base import family_of

    transform = family_of(preset).train_transform(preset, args)

    def fetch(it) -> None:
        next(it)

    if backend == "torch":
        loader = build_train_loader(CocoDetection(img_dir, ann, transform=transform), batch,
                                    num_workers=args.num_workers, seed=0)
        return loader, f"data pipeline (torch, {args.num_workers} workers, YOLO affine + HSV)", fetch
    from .data.dali import dali_import_error

    err = dali_import_error()
    if err is not None:
        print(f"data pipeline (dali): skipped, DALI not importable ({err})", flush=True)
        return None, "", fetch
    from .data.dali_yolo import DaliYoloTrainLoader

    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    index = CocoDetection(img_dir, ann)
    loader = DaliYoloTrainLoader(img_dir, ann, index.file_names, transform=transform, batch_size=batch, seed=0,
                                 device_id=device_id, num_threads=args.num_workers, fp16=device.type == "cuda")
    where = "gpu" if device_id is not None else "cpu"
    return loader, f"data pipeline (dali {where}, {max(1, args.num_workers)} threads, YOLO affine + HSV)", fetch


def _data_part_dataset(args: argparse.Namespace, images: int) -> str:
    """The folder the data part reads: ``--data-dir``, or the real-photo dataset with ``--photos``
    (built once under ``--data-dir``), or the synthetic dataset (generated if missing)."""
    if args.photos:
        from .data.sample_photos import ensure_photo_coco

        root = args.data_dir if args.data_dir is not None else "data/photos"
        num = max(256, -(-images // 256) * 256)
        summary = ensure_photo_coco(root, num_images=num)
        print(f"real photographs: {root}, {summary['num_images']} train images ({', '.join(summary['photos'])} "
              f"from scikit-image), {summary['mean_boxes']:.1f} boxes and {summary['mean_bytes'] / 1e3:.0f} kB "
              "per image, longer side 640", flush=True)
        return root
    root = args.data_dir if args.data_dir is not None else "data/synthetic"
    # Generated into a folder named "synthetic" without annotations, and into a missing or empty
    # --data-dir (gpu_check's, when its training run did not get as far as generating it there).
    fresh = not os.path.isdir(root) or not any(os.scandir(root))
    if not os.path.isdir(os.path.join(root, "annotations")) and ("synthetic" in str(root) or fresh):
        from .data.synthetic import ensure_synthetic_coco

        ensure_synthetic_coco(root)
    return root


# -- components: realistic box statistics --------------------------------------------------
# Boxes per image: geometric with mean 5.8 (the mean of real COCO training batches), 1..60.
COCO_LIKE_MEAN_BOXES = 5.8
# Class-score noise of the synthetic network outputs: ~400 candidates (score > 0.05) per image.
_OUTPUT_NOISE = 0.73


def coco_like_counts(n: int, gen: torch.Generator, mean: float = COCO_LIKE_MEAN_BOXES, cap: int = 60,
                     draws: int = 64) -> list[int]:
    """Boxes per image for ``n`` images: geometric on 1, 2, ... with the given mean, capped at ``cap``.

    Of ``draws`` batches drawn, the one whose mean is closest to ``mean`` (so that a batch of
    32 really averages 5.8 boxes, as the benchmark says).
    """
    u = torch.rand(draws, n, generator=gen)
    k = (torch.floor(torch.log1p(-u) / math.log(1 - 1 / mean)).long() + 1).clamp(max=cap)
    best = (k.float().mean(dim=1) - mean).abs().argmin()
    return k[best].tolist()


def coco_like_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """``Tensor[n, 4]`` xyxy in [0, 1]: sides log-uniform in 2%..90% of the image, aspect log-normal."""
    side = torch.exp(torch.empty(n, 1).uniform_(math.log(0.02), math.log(0.9), generator=gen))
    aspect = torch.exp(torch.randn(n, 1, generator=gen) * 0.5)
    wh = torch.cat([side * aspect.sqrt(), side / aspect.sqrt()], 1).clamp(0.01, 1.0)
    xy = torch.rand(n, 2, generator=gen) * (1 - wh)
    return torch.cat([xy, xy + wh], 1)


def _coco_like_targets(counts: list[int], gen: torch.Generator, num_classes: int = 81):
    boxes = [coco_like_boxes(n, gen) for n in counts]
    labels = [torch.randint(1, num_classes, (n,), generator=gen) for n in counts]
    return boxes, labels


def realistic_outputs(coder, boxes, labels, gen: torch.Generator, num_classes: int = 81,
                      noise: float = _OUTPUT_NOISE) -> tuple[torch.Tensor, torch.Tensor]:
    """Network-like outputs ``(loc [B, A, 4], logits [B, A, C])`` for images with these objects.

    Default boxes overlapping an object (IoU > 0.3) score its class and one confusable class
    in proportion to the overlap and regress towards it (plus noise), so NMS sees clusters;
    elsewhere background dominates, with class-score noise that leaves scattered low-score
    candidates, as a trained SSD does.
    """
    from .box_coder import box_iou

    batch, num_anchors = len(boxes), coder.num_boxes
    logits = torch.randn(batch, num_anchors, num_classes, generator=gen) * noise - 1.0
    logits[..., 0] = 5.0 + torch.randn(batch, num_anchors, generator=gen)
    loc = torch.randn(batch, num_anchors, 4, generator=gen) * 0.5
    d = coder.default_boxes.cpu()
    for b, (bx, lb) in enumerate(zip(boxes, labels)):
        if len(bx) == 0:
            continue
        best, g = box_iou(bx, coder.default_boxes_xyxy.cpu()).max(dim=0)
        near = torch.nonzero(best > 0.3).flatten()
        strength = (best[near] - 0.3) / 0.7
        logits[b, near, lb[g[near]]] = 5.0 + 6.0 * strength + torch.randn(len(near), generator=gen)
        other = torch.randint(1, num_classes, (len(near),), generator=gen)
        logits[b, near, other] = 3.0 + 4.0 * strength + torch.randn(len(near), generator=gen)
        obj = bx[g[near]]
        cxcy, wh, dn = (obj[:, :2] + obj[:, 2:]) / 2, obj[:, 2:] - obj[:, :2], d[near]
        target = torch.cat([(cxcy - dn[:, :2]) / (0.1 * dn[:, 2:]), torch.log(wh / dn[:, 2:]) / 0.2], 1)
        loc[b, near] = target + 0.3 * torch.randn(len(near), 4, generator=gen)
    return loc, logits


def _time_interleaved(fns: dict, warmup: int, iters: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns (same machine load)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _benchmark_components(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """ms per image of encoding, loss forward + backward and decode + NMS, ours vs plain per-image code."""
    from .box_coder import BoxCoder, default_boxes_300
    from .losses import MultiboxLoss
    from .postprocess import postprocess
    from .reference_impl import plain_encode, plain_multibox_loss, plain_postprocess

    gen = torch.Generator().manual_seed(0)
    dboxes = default_boxes_300().to(device)
    coder = BoxCoder(dboxes)
    rows = []

    def add(part: str, workload: str, batch: int, t: dict[str, float]) -> None:
        rows.append({"part": part, "workload": workload, "batch": batch, "ours_ms_per_image": 1e3 * t["ours"] / batch,
                     "plain_ms_per_image": 1e3 * t["plain"] / batch, "median_s": t["ours"]})

    # Box matching + encoding: COCO-like box counts, then the same batch with one 60-box image.
    batch = args.batch_size or 32
    counts = coco_like_counts(batch, gen)
    boxes, labels = _coco_like_targets(counts, gen)
    boxes, labels = [b.to(device) for b in boxes], [lb.to(device) for lb in labels]
    t = _time_interleaved({"ours": lambda: coder.encode(boxes, labels),
                           "plain": lambda: plain_encode(dboxes, boxes, labels)}, args.warmup, args.iters, device)
    add("encode (match + targets)", f"COCO-like counts, mean {sum(counts) / batch:.1f} boxes/image", batch, t)
    b60, l60 = _coco_like_targets([60], gen)
    boxes60 = [b60[0].to(device)] + boxes[1:]
    labels60 = [l60[0].to(device)] + labels[1:]
    t = _time_interleaved({"ours": lambda: coder.encode(boxes60, labels60),
                           "plain": lambda: plain_encode(dboxes, boxes60, labels60)}, args.warmup, args.iters, device)
    add("encode (match + targets)", "same batch, one image with 60 boxes", batch, t)

    # Loss forward + backward on realistic targets (SSD300: A = 8732, C = 81).
    batch = args.batch_size or 8
    boxes, labels = _coco_like_targets(coco_like_counts(batch, gen), gen)
    loc_t, labels_t = coder.encode([b.to(device) for b in boxes], [lb.to(device) for lb in labels])
    loc_p = torch.randn(batch, coder.num_boxes, 4, generator=gen).to(device).requires_grad_()
    logits = torch.randn(batch, coder.num_boxes, 81, generator=gen).to(device).requires_grad_()
    loss = MultiboxLoss()

    def step(fn) -> None:
        loc_p.grad = logits.grad = None
        fn(loc_p, logits, loc_t, labels_t).backward()

    t = _time_interleaved({"ours": lambda: step(loss), "plain": lambda: step(plain_multibox_loss)},
                          args.warmup, args.iters, device)
    add("loss forward + backward", f"A=8732, C=81, {int((labels_t > 0).sum()) / batch:.0f} positives/image",
        batch, t)

    # Decode + softmax + per-class NMS + top 200 on network-like outputs.
    batch = args.batch_size or 8
    boxes, labels = _coco_like_targets(coco_like_counts(batch, gen), gen)
    loc, logits = realistic_outputs(coder, boxes, labels, gen)
    loc, logits = loc.to(device), logits.to(device)
    candidates = float((torch.softmax(logits, -1)[..., 1:] > 0.05).sum()) / batch
    t = _time_interleaved({"ours": lambda: postprocess(loc, logits, dboxes, box_coder=coder),
                           "plain": lambda: plain_postprocess(loc, logits, dboxes)}, args.warmup, args.iters, device)
    add("decode + NMS", f"{candidates:.0f} candidates/image (score > 0.05)", batch, t)
    return rows


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    """Time the requested parts, print the table, return its rows (and write ``--json``).

    Raises:
        ConfigError: ``--cuda-graphs`` (or a ``--mode`` with it) on a device other than CUDA or
            for a preset without pre-encoded targets; ``--parts components`` for a non-SSD preset.
    """
    from .detectors.base import build_detector, get_preset
    from .distributed import select_device
    from .engine import AmpSettings
    from .fast_path import CudaGraphTrainStep, TrainStep, compile_for_training, enable_cudnn_autotune, make_sgd

    apply_mode(args)
    device = select_device(args.device)
    preset = get_preset(args.preset)
    if args.parts is None:
        args.parts = ["train", "eval", "data"] if hasattr(preset, "box_spec") else ["train", "eval"]
    if "components" in args.parts and not hasattr(preset, "box_spec"):
        raise ConfigError(f"--parts components: measures the SSD box coding; preset {preset.name} "
                          f"({preset.family}) has train, eval and data parts only")
    batch = args.batch_size or (32 if device.type == "cuda" else 8)
    amp = AmpSettings.resolve(args.amp, device)
    channels_last = args.channels_last if args.channels_last is not None else device.type == "cuda"
    use_compile, cuda_graphs = getattr(args, "compile", False), getattr(args, "cuda_graphs", False)
    # Named as the user gave it: --mode sets --cuda-graphs.
    graphs_flag = f"--mode {args.mode}" if getattr(args, "mode", None) else "--cuda-graphs"
    if cuda_graphs and device.type != "cuda":
        raise ConfigError(f"{graphs_flag}: CUDA graphs need a CUDA device, not {device}")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    enable_cudnn_autotune(device)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {platform.machine()}, {torch.get_num_threads()} threads)"
    amp_name = str(amp.dtype).replace("torch.", "") if amp.enabled else "fp32"
    print(f"device: {name}; preset {preset.name} (input {preset.input_size}); batch {batch}; "
          f"precision {amp_name}; channels_last {channels_last}; compile {use_compile}; "
          f"cuda_graphs {cuda_graphs}; torch {torch.__version__}", flush=True)
    settings = {"device": name, "preset": preset.name, "batch": batch, "precision": amp_name,
                "channels_last": channels_last, "compile": use_compile, "cuda_graphs": cuda_graphs,
                "mode": getattr(args, "mode", None), "torch": torch.__version__}

    detector = None
    if "train" in args.parts or "eval" in args.parts:
        detector = build_detector(preset).to(device)
        if channels_last:
            detector = detector.to(memory_format=fmt)
        images = torch.randn(batch, 3, preset.input_size, preset.input_size, device=device).to(memory_format=fmt)

    if "train" in args.parts:
        opt = make_sgd(detector.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4, device=device,
                       fused=getattr(args, "fused_sgd", None))
        settings["fused_sgd"] = bool(opt.defaults.get("fused"))
        boxes, labels = _random_targets(batch, gen)
        boxes = [b.to(device) for b in boxes]
        labels = [lb.to(device) for lb in labels]
        scaler = torch.amp.GradScaler(device.type) if amp.needs_scaler else None
        detector.train()
        module = compile_for_training(detector, detector, device) if use_compile else detector
        # Families whose targets are encoded inside the forward (YOLO) train on raw boxes; SSD's
        # are encoded outside the captured/compiled part (as DALI would hand them over).
        pre_encoded = hasattr(detector, "encode_targets")
        if cuda_graphs and not pre_encoded:
            raise ConfigError(f"{graphs_flag}: CUDA graphs need pre-encoded targets (SSD presets), not {preset.name}")
        if cuda_graphs:
            # Autocast's weight-cast cache must be off while capturing (the graph owns the casts).
            # Eager warm-up steps, then the capture, all within the benchmark's --warmup calls.
            step = CudaGraphTrainStep(module, opt, functools.partial(amp.autocast, cache_enabled=False), scaler,
                                      warmup=max(args.warmup - 1, 1))
        else:
            step = TrainStep(module, opt, amp.autocast, scaler)

        def train_step() -> None:
            if not pre_encoded:
                with amp.autocast():
                    losses = module(images, {"boxes": boxes, "labels": labels})
                loss = sum(losses.values())
                (scaler.scale(loss) if scaler is not None else loss).backward()
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                return
            with torch.no_grad():
                loc_t, labels_t = detector.encode_targets(boxes, labels)
            step(images, loc_t, labels_t)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = _time(train_step, args.warmup, args.iters, device)
        row = {"part": "train step (fwd+loss+bwd+SGD)", "batch": batch, "median_s": statistics.median(t)}
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if cuda_graphs:
            row["graph_replays"], row["graph_fallbacks"] = step.replays, step.fallbacks
        rows.append(row)

    if "eval" in args.parts:
        detector.eval()

        @torch.no_grad()
        def eval_step() -> None:
            with amp.autocast():
                detector(images)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = _time(eval_step, args.warmup, args.iters, device)
        row = {"part": "inference (fwd+decode+NMS)", "batch": batch, "median_s": statistics.median(t)}
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)

    if "data" in args.parts:
        rows.extend(_benchmark_data(args, preset, batch, device))

    component_rows = _benchmark_components(args, device) if "components" in args.parts else []

    width = max([40] + [len(r["part"]) for r in rows])
    if rows:
        print(f"{'part':<{width}} {'batch':>5} {'ms/batch':>10} {'images/s':>10}")
    for r in rows:
        r["images_per_s"] = r["batch"] / r["median_s"]
        print(f"{r['part']:<{width}} {r['batch']:>5} {1000 * r['median_s']:>10.1f} {r['images_per_s']:>10.1f}")
    if component_rows:
        print(f"components, fp32, ms per image (median of {args.iters}, ours and plain interleaved; "
              "plain = per-image reference maths, single_stage_detector/reference_impl.py):")
        print(f"{'component':<26} {'workload':<46} {'batch':>5} {'ours':>8} {'plain':>8} {'speed-up':>8}")
        for r in component_rows:
            r["images_per_s"] = r["batch"] / r["median_s"]
            print(f"{r['part']:<26} {r['workload']:<46} {r['batch']:>5} {r['ours_ms_per_image']:>8.3f} "
                  f"{r['plain_ms_per_image']:>8.3f} {r['plain_ms_per_image'] / r['ours_ms_per_image']:>7.1f}x")
    for r in rows:
        if "peak_memory_gib" in r:
            print(f"peak GPU memory ({r['part']}): {r['peak_memory_gib']:.2f} GiB")
    if getattr(args, "json", None):
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"settings": settings, "rows": rows + component_rows}, fh, indent=2)
    return rows + component_rows
