"""Registers the subcommands that read back what `train` writes (checkpoints, logs) on the main CLI."""
from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the tooling subcommands to ``python -m single_stage_detector``.

    Each tool lives in its own module; heavy imports (matplotlib, torch) happen when it runs.
    """
    from . import (check_logs, darknet_weights_cli, evaluate_checkpoint, kmeans_anchors, package, plots, predict, score,
                   show_detections)

    for module in (evaluate_checkpoint, check_logs, score, package, plots, show_detections):
        module.add_parser(sub)
    # Tools whose flags are added when their command is chosen (``populate``: fast --help).
    for name, module, text in (
            ("predict", predict, "detections of a checkpoint on image files or folders: COCO-style JSON and "
                                 "pictures"),
            ("kmeans-anchors", kmeans_anchors, "YOLO anchors by k-means (1 - IoU) of a COCO file's boxes, with "
                                               "mean IoU and best-possible recall"),
            ("darknet-weights", darknet_weights_cli, "darknet .weights files to and from checkpoint.pt (YOLOv3, YOLOv2)")):
        # The module docstring's first paragraph, without its reStructuredText literal markup.
        sub.add_parser(name, help=text, description=(module.__doc__ or "").strip().split("\n\n")[0].replace("``", ""),
                       populate=module.add_arguments).set_defaults(func=module.main)


def load_checkpoint_arg(path: str) -> dict:
    """:func:`~single_stage_detector.checkpoint.load_checkpoint` for a path given on the command
    line: any file that is not a readable ``checkpoint.pt`` (a log, a folder, a damaged file) is a
    :class:`~single_stage_detector.config.ConfigError` naming it, not a traceback."""
    import os

    from ..checkpoint import load_checkpoint
    from ..config import ConfigError

    if os.path.isdir(path):
        raise ConfigError(f"{path} is a folder; name its checkpoint.pt")
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        return load_checkpoint(path)
    except ConfigError:
        raise
    except Exception as e:  # torch.load's errors differ per file kind (pickle, zip, EOF)
        raise ConfigError(f"{path} is not a checkpoint.pt of `train` ({type(e).__name__})") from None


def require_positive(args, *flags: str, minimum: int = 1) -> None:
    """ConfigError naming the first of ``flags`` (``--max-images``: attribute max_images) whose value
    is set and below ``minimum``."""
    from ..config import ConfigError

    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < minimum:
            raise ConfigError(f"{flag}: must be >= {minimum}, got {value}")


def run_standalone(module_name: str, description: str, add_arguments, main, argv: "list[str] | None" = None) -> int:
    """``python -m <module_name>``: a tool's command outside the main CLI (its flags from
    ``add_arguments``); bad input (ConfigError is a ValueError, or an OSError) is one line, exit 2."""
    import sys

    from ..config import HelpFormatter

    parser = argparse.ArgumentParser(prog=f"python -m {module_name}", description=description,
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return main(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
