"""Registers the subcommands that read back what `train` writes (checkpoints, logs) on the main CLI."""
from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the tooling subcommands to ``python -m single_stage_detector``.

    Each tool lives in its own module; heavy imports (matplotlib, torch) happen when it runs.
    """
    from . import check_logs, evaluate_checkpoint, package, plots, score, show_detections

    for module in (evaluate_checkpoint, check_logs, score, package, plots, show_detections):
        module.add_parser(sub)


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
