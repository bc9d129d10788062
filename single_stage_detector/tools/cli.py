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
