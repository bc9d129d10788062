"""Command line: ``python -m single_stage_detector {train,demo,evaluate,benchmark,make-synthetic-dataset}``."""
from __future__ import annotations

import argparse
import sys

from .config import SYNTHETIC_DEFAULTS, ConfigError, add_arguments, config_from_args

# The CPU demo: the small preset on the embedded synthetic dataset (division open).
DEMO_DEFAULTS = {
    "preset": "ssd_tiny",
    "data_dir": "data/synthetic",
    "synthetic": True,
    "output_dir": "output/demo",
    "batch_size": 32,
    "eval_batch_size": 64,
    "lr": 0.05,
    "warmup_steps": 100,
    "weight_decay": 5e-4,
    "lr_decay_epochs": (8, 10),
    "epochs": 12,
    "eval_every": 1,
    "eval_start": 2,
    "num_workers": 2,
    "log_every": 20,
    "seed": 1,
}


def _print_summary(result) -> None:
    minutes = result.time_to_train_s / 60.0
    lines = [
        "",
        "=" * 64,
        f"status            {result.status}",
        f"time to train     {result.time_to_train_s:.1f} s ({minutes:.2f} min, run_start -> run_stop)",
        f"final mAP         {result.ap:.4f} (COCO AP@[.5:.95])",
        f"epochs            {result.epochs}",
        f"devices           {result.world_size} x {result.device}",
        f"MLPerf log        {result.log_file}",
        f"output folder     {result.output_dir} (config.json, metrics.jsonl, result.json, checkpoint.pt)",
    ]
    stats = result.dataset_stats
    for prefix, split in (("", "train"), ("val_", "val")):
        skipped = {k[len(prefix) + len("images_skipped_"):]: v for k, v in stats.items()
                   if k.startswith(f"{prefix}images_skipped_") and k != f"{prefix}images_skipped_empty" and v}
        if skipped:
            detail = ", ".join(f"{reason.replace('_', ' ')} {n}" for reason, n in skipped.items())
            lines.append(f"skipped images    {sum(skipped.values())} {split} ({detail}; see warnings above)")
        exif = stats.get(f"{prefix}images_exif_orientation", 0)
        if exif:
            lines.append(f"EXIF orientation  {exif} {split} image(s), tag ignored (boxes refer to the stored pixels)")
    if result.skipped_samples:
        lines.append(f"skipped samples   {result.skipped_samples} (unreadable while training; see warnings above)")
    dropped = stats.get("boxes_dropped_degenerate", 0)
    if dropped:
        lines.append(f"dropped boxes     {dropped} (zero or negative size)")
    clipped = stats.get("boxes_clipped", 0)
    if clipped:
        lines.append(f"clipped boxes     {clipped} (past the image border)")
    lines.append("=" * 64)
    print("\n".join(lines), flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import run_training

    cfg = config_from_args(args)
    result = run_training(cfg)
    if result.rank == 0:
        _print_summary(result)
    if result.stopped_by is not None:
        from .signals import EXIT_STOPPED

        if result.rank == 0:
            print(f"stopped by {result.stopped_by} after writing a checkpoint; continue with --resume auto "
                  f"--output-dir {cfg.output_dir}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    return 0 if result.status == "success" else 3


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from .data.synthetic import ensure_synthetic_coco

    summary = ensure_synthetic_coco(args.root, num_train=args.train_images, num_val=args.val_images, seed=args.seed)
    print(summary)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import run_benchmark

    run_benchmark(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m single_stage_detector", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train to the target quality and write an MLPerf log",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="CPU demo: small SSD on the embedded synthetic dataset (same flags as train)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p, DEMO_DEFAULTS)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("make-synthetic-dataset", help="write the embedded synthetic dataset in COCO layout")
    p.add_argument("root", help="output folder (gets train2017/, val2017/, annotations/)")
    p.add_argument("--train-images", type=int, default=SYNTHETIC_DEFAULTS.num_train)
    p.add_argument("--val-images", type=int, default=SYNTHETIC_DEFAULTS.num_val)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_make_synthetic)

    from .benchmark import add_benchmark_arguments

    p = sub.add_parser("benchmark", help="images/s of training steps, evaluation and the data pipeline",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_benchmark_arguments(p)
    p.set_defaults(func=_cmd_benchmark)

    from .tools.cli import register as register_tools

    register_tools(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import OutputWriteError
    from .data.coco import DatasetError
    from .losses import NonFiniteLossError
    from .models.backbone_weights import BackboneWeightsError
    from .signals import EXIT_WRITE_FAILED, RunInterrupted, signal_exit_code

    try:
        return args.func(args)
    except (ConfigError, DatasetError, BackboneWeightsError) as e:
        # Bad input: one clear line naming the file or flag, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 4
    except OutputWriteError as e:
        print(f"error: {e.strerror or e}; the run stopped (complete checkpoints written before are kept)",
              file=sys.stderr)
        return EXIT_WRITE_FAILED
    except RunInterrupted as e:
        print(f"error: {e}; continue from the last checkpoint with --resume auto", file=sys.stderr)
        return signal_exit_code(e.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
