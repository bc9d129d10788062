"""Command line: ``python -m single_stage_detector COMMAND [FLAGS]``; ``COMMAND -h`` for its flags.

Starting it imports no torch, DALI or matplotlib: each command imports what it needs when it
runs, so ``--help`` and the log tools answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import SYNTHETIC_DEFAULTS, ConfigError, HelpFormatter, add_arguments, config_from_args, \
    default_num_workers

DESCRIPTION = (
    "MLPerf-style time-to-train benchmark of single-stage detectors (SSD300-ResNet34 on COCO; "
    "ssd_tiny on an embedded synthetic dataset for CPUs). Exit status: 0 success, 1 a check failed, "
    "2 bad input (one line naming the flag or file), 3 training aborted at the epoch limit, "
    "4 non-finite loss, 5 stopped by SIGTERM/SIGINT after a resume checkpoint (--resume auto), "
    "6 an output could not be written mid-run.")

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
    "num_workers": default_num_workers(2),
    "log_every": 20,
    "seed": 1,
}


# The demo of another preset: what differs from DEMO_DEFAULTS (flags given on the command line win).
DEMO_PRESET_DEFAULTS: dict[str, dict] = {
    # AdamW converges in fewer epochs than SGD for this small model trained from scratch (SGD
    # at LR 0.01: AP 0.13 after 4 epochs; AdamW at 2e-3: 0.14, then 0.23 after the decay at 6).
    "yolov3_tiny_cpu": {
        "output_dir": "output/demo-yolov3_tiny_cpu",
        "optimizer": "adamw",
        "lr": 0.002,
        "epochs": 8,
        "lr_decay_epochs": (6, 7),
        "eval_start": 3,
    },
    # YOLOv1 from scratch with YOLOv3's demo optimiser (AdamW at 2e-3): AP 0.16, 0.31, 0.38 after
    # epochs 1, 2, 3 (seed 1); the first evaluation after epoch 2 reaches the 0.15 target twice over.
    "yolov1_tiny_cpu": {
        "output_dir": "output/demo-yolov1_tiny_cpu",
        "optimizer": "adamw",
        "lr": 0.002,
        "epochs": 6,
        "lr_decay_epochs": (5,),
        "eval_start": 2,
    },
    # YOLOv2's 4 x 4 grid gains most at the lower LR: AdamW at 2e-3 for 8 epochs gives AP 0.21,
    # then 0.27 and 0.34 after the first two epochs at 2e-4. Here 2e-4 from epoch 6: AP 0.227
    # after 6 epochs, 0.285 after 7 (4.2 min on 2 cores).
    "yolov2_tiny_cpu": {
        "output_dir": "output/demo-yolov2_tiny_cpu",
        "optimizer": "adamw",
        "lr": 0.002,
        "epochs": 8,
        "lr_decay_epochs": (6, 8),
        "eval_start": 6,
    },
}


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The ``dest`` of every option of ``parser`` that ``argv`` names (``--flag`` or ``--flag=value``)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {action.dest for action in parser._actions
            if any(opt in given or opt.replace("--", "--no-", 1) in given for opt in action.option_strings)}


def _written_outputs(result) -> list[str]:
    """The run's files present in its output folder: no ``checkpoint.pt`` after a stop by a signal
    (one there is an earlier run's) or with ``--no-save-checkpoint``."""
    names = ("config.json", "metrics.jsonl", "result.json") + (("checkpoint.pt",) if result.stopped_by is None else ())
    return [n for n in names if os.path.exists(os.path.join(result.output_dir, n))]


def _print_summary(result) -> None:
    minutes = result.time_to_train_s / 60.0
    lines = [
        "",
        "=" * 64,
        f"status            {result.status}",
        f"time to train     {result.time_to_train_s:.1f} s ({minutes:.2f} min, run_start -> run_stop)",
        f"final mAP         {result.ap:.4f} (COCO AP@[.5:.95])" if result.ap == result.ap
        else "final mAP         none (no evaluation ran)",
        f"epochs            {result.epochs}",
        f"devices           {result.world_size} x {result.device}",
        f"MLPerf log        {result.log_file}",
        f"output folder     {result.output_dir} ({', '.join(_written_outputs(result))})",
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


def _preflight(cfg) -> None:
    """The user errors that would otherwise surface as exceptions deep in the set-up: unknown
    preset, unusable device, a backbone file for a preset without ImageNet weights."""
    from .config import check_device
    from .detectors.base import all_presets, family_of

    presets = all_presets()
    if cfg.preset not in presets:
        raise ConfigError(f"--preset: unknown preset {cfg.preset!r}; valid presets: {', '.join(sorted(presets))}")
    check_device(cfg.device)
    takes = family_of(presets[cfg.preset]).backbone_weights(presets[cfg.preset])
    if cfg.pretrained_backbone is not None and takes is None:
        takers = sorted(n for n, p in presets.items() if family_of(p).backbone_weights(p) is not None)
        raise ConfigError(f"--pretrained-backbone: preset {cfg.preset!r} has no pretrained backbone; "
                          f"leave the flag out (it is for {', '.join(takers)})")
    if cfg.init_checkpoint is not None:
        from .tools.cli import load_checkpoint_arg

        try:
            load_checkpoint_arg(cfg.init_checkpoint)
        except ConfigError as e:
            raise ConfigError(f"--init-checkpoint: {e}") from None


def _warmup_hint(cfg) -> None:
    """Say so when the warm-up alone is longer than the whole run could be (short trials)."""
    # The training set's size is known before reading it only when capped or generated here.
    sizes = [n for n in (cfg.max_train_images, cfg.synthetic_train_images if cfg.synthetic else None) if n]
    if not cfg.warmup_steps or not sizes or os.environ.get("RANK", "0") != "0":
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps = cfg.epochs * max(1, min(sizes) // max(1, cfg.global_batch_size(world)))
    if cfg.warmup_steps >= steps:
        print(f"note: --warmup-steps {cfg.warmup_steps} is at least the whole run (about {steps} steps of "
              f"{cfg.epochs} epoch(s)): the LR never leaves the warm-up; lower --warmup-steps for short runs",
              flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import run_training

    cfg = config_from_args(args)
    _preflight(cfg)
    _warmup_hint(cfg)
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


def _cmd_demo(args: argparse.Namespace) -> int:
    """``train`` with the demo's defaults, those of ``--preset``'s demo when it has its own."""
    explicit = _explicit_dests(args.demo_parser, args.argv)
    for name, value in DEMO_PRESET_DEFAULTS.get(args.preset, {}).items():
        if name not in explicit:
            setattr(args, name, value)
    return _cmd_train(args)


def _cmd_make_synthetic(args: argparse.Namespace) -> int:
    from .data.synthetic import ensure_synthetic_coco
    from .tools.cli import require_positive

    require_positive(args, "--train-images", "--val-images")
    if os.path.exists(args.root) and not os.path.isdir(args.root):
        raise ConfigError(f"{args.root} is a file, not a folder")
    s = ensure_synthetic_coco(args.root, num_train=args.train_images, num_val=args.val_images, seed=args.seed)
    verb = f"generated in {s['seconds']:.1f} s" if s["generated"] else "already there (same parameters), kept"
    print(f"synthetic dataset {s['root']}: {verb}\n"
          f"  train2017  {s['train_images']} images ({s['train_images_empty']} without objects), "
          f"{s['train_annotations']} boxes\n"
          f"  val2017    {s['val_images']} images, {s['val_annotations']} boxes\n"
          f"  classes    {', '.join(s['classes'].values())}")
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import run_benchmark
    from .config import check_device
    from .detectors.base import all_presets
    from .tools.cli import require_positive

    presets = all_presets()
    if args.preset not in presets:
        raise ConfigError(f"--preset: unknown preset {args.preset!r}; valid presets: {', '.join(sorted(presets))}")
    check_device(args.device)
    if args.amp not in ("auto", "off", "bf16", "fp16"):
        raise ConfigError(f"--amp: expected auto | off | bf16 | fp16, got {args.amp!r}")
    if args.max_samples not in (1, 50):
        raise ConfigError(f"--max-samples: MLPerf allows 1 or 50, got {args.max_samples}")
    if args.cuda_graphs and args.amp == "fp16" and args.mode is None:
        raise ConfigError("--cuda-graphs: cannot capture fp16's loss scaler (it skips steps on the host); "
                          "use --amp bf16")
    require_positive(args, "--batch-size", "--iters")
    require_positive(args, "--warmup", "--num-workers", minimum=0)

    run_benchmark(args)
    return 0


class _OneLineErrors:
    """argparse's usage errors (unknown flag, a value of the wrong type) as one line naming the
    flag and the command's -h, exit status 2, instead of the whole usage text."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


class _Parser(_OneLineErrors, argparse.ArgumentParser):
    pass


class _CommandListFormatter(argparse.HelpFormatter):
    """Wide enough that every command and its summary share one line, the longest name included."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=100)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        # The command names are indented one level deeper when printed than when measured.
        self._action_max_length = max(self._action_max_length, 30)


class _LazyParser(_OneLineErrors, argparse.ArgumentParser):
    """A subcommand parser whose flags are added when that subcommand is parsed, so that a
    module with heavy imports (the benchmark: torch) is loaded only for its own command."""

    def __init__(self, *args, populate=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _fill(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._fill()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._fill()
        return super().format_help()


def _benchmark_arguments(p: argparse.ArgumentParser) -> None:
    from .benchmark import add_benchmark_arguments

    add_benchmark_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m single_stage_detector", description=DESCRIPTION,
                     formatter_class=_CommandListFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands",
                                parser_class=_LazyParser)

    p = sub.add_parser("train", help="train to the target quality; writes an MLPerf log")
    add_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="the CPU demo: ssd_tiny (or --preset yolov3_tiny_cpu, yolov2_tiny_cpu, "
                                    "yolov1_tiny_cpu) on the synthetic dataset (train's flags)")
    add_arguments(p, DEMO_DEFAULTS)
    p.set_defaults(func=_cmd_demo, demo_parser=p)

    p = sub.add_parser("make-synthetic-dataset", help="write the synthetic dataset in the COCO layout",
                       description="Write the synthetic detection dataset (shapes of 8 COCO classes) in the "
                                   "COCO 2017 layout; a folder already holding it with the same parameters is "
                                   "kept as it is.")
    p.add_argument("root", help="output folder (gets train2017/, val2017/, annotations/)")
    p.add_argument("--train-images", type=int, default=SYNTHETIC_DEFAULTS.num_train, help="training images")
    p.add_argument("--val-images", type=int, default=SYNTHETIC_DEFAULTS.num_val, help="validation images")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed and counts: identical files)")
    p.set_defaults(func=_cmd_make_synthetic)

    p = sub.add_parser("benchmark", help="images/s of the train step, inference and input pipelines",
                       populate=_benchmark_arguments)
    p.set_defaults(func=_cmd_benchmark)

    from .tools.cli import register as register_tools

    register_tools(sub)
    return parser


def _user_error_types() -> tuple[type, ...]:
    """Exception types that mean bad input (exit status 2, one line). Their modules are looked up
    only if already imported: an exception of a module never loaded cannot have been raised."""
    types_ = [ConfigError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
              PermissionError]
    for module, name in (("single_stage_detector.data.coco", "DatasetError"),
                         ("single_stage_detector.models.backbone_weights", "BackboneWeightsError"),
                         ("single_stage_detector.detectors.yolo.darknet_weights", "DarknetWeightsError"),
                         ("single_stage_detector.distributed", "DeviceUnavailableError")):
        mod = sys.modules.get(module)
        if mod is not None:
            types_.append(getattr(mod, name))
    return tuple(types_)


def _error_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and not isinstance(e, ConfigError):
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def _plain_data_warnings() -> None:
    """Format a ``DataWarning`` (an image skipped, boxes dropped: data/coco.py) as one
    ``warning:`` line, like the ``error:`` lines, instead of Python's ``<source file>:<line>:
    DataWarning:`` prefix and the source line. Other warnings keep Python's format; warnings
    recorded by ``warnings.catch_warnings(record=True)`` are untouched (they are not formatted).
    Loader workers forked later inherit it."""
    import warnings

    formatted = warnings.formatwarning
    if getattr(formatted, "plain_data_warnings", False):  # main() called again in this process
        return

    def format_warning(message, category, filename, lineno, line=None):
        if category.__name__ == "DataWarning":  # by name: importing data.coco would import torch
            return f"warning: {message}\n"
        return formatted(message, category, filename, lineno, line)

    format_warning.plain_data_warnings = True
    warnings.formatwarning = format_warning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _plain_data_warnings()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        signals = sys.modules.get("single_stage_detector.signals")
        if signals is not None and isinstance(e, signals.RunInterrupted):
            print(f"error: {e}; continue from the last checkpoint with --resume auto", file=sys.stderr)
            return signals.signal_exit_code(e.signum)
        checkpoint = sys.modules.get("single_stage_detector.checkpoint")
        if checkpoint is not None and isinstance(e, checkpoint.OutputWriteError):
            # Checked before the bad-input types: it is an OSError, but raised mid-run.
            print(f"error: {e.strerror or e}; the run stopped (complete checkpoints written before are kept)",
                  file=sys.stderr)
            return signals.EXIT_WRITE_FAILED if signals is not None else 6
        if not isinstance(e, Exception):
            raise
        if isinstance(e, _user_error_types()):
            # Bad input: one clear line naming the file or flag, no traceback.
            print(f"error: {_error_line(e)}", file=sys.stderr)
            return 2
        losses = sys.modules.get("single_stage_detector.losses")
        if losses is not None and isinstance(e, losses.NonFiniteLossError):
            print(f"error: training stopped: {e}", file=sys.stderr)
            return 4
        raise


if __name__ == "__main__":
    sys.exit(main())
