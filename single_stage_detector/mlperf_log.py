"""The one place that writes MLPerf log lines (``:::MLLOG {...}``).

Only rank 0 writes. Keys that the rules require exactly once are guarded: logging
one twice is a bug in the harness and raises at once rather than producing a log that
fails the compliance checker hours later.
"""
from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from mlperf_logging.mllog.mllog import MLLogger
from mlperf_logging.mllog import constants as C

__all__ = ["MLPerfLogger", "C", "HYPERPARAMETER_KEYS", "RESUMED_KEY", "move_aside", "rename_to_first_free"]

# Not an MLPerf key: marks where a run resumed from a checkpoint appends to its log. A log
# holding it is not a valid timed result (the rules time one uninterrupted run).
RESUMED_KEY = "run_resumed"

# Keys the 0.7.0-1.1.0 SSD rules want exactly once per log.
_EXACTLY_ONCE = {
    C.SUBMISSION_BENCHMARK, C.SUBMISSION_ORG, C.SUBMISSION_DIVISION, C.SUBMISSION_STATUS,
    C.SUBMISSION_PLATFORM, C.INIT_STOP, C.RUN_START, C.RUN_STOP, C.TRAIN_SAMPLES, C.EVAL_SAMPLES,
    C.SEED, C.GLOBAL_BATCH_SIZE, C.OPT_BASE_LR, C.OPT_WEIGHT_DECAY, C.MODEL_BN_SPAN,
    C.OPT_LR_WARMUP_STEPS, C.OPT_LR_WARMUP_FACTOR, C.MAX_SAMPLES, C.OPT_LR_DECAY_BOUNDARY_EPOCHS,
    C.GRADIENT_ACCUMULATION_STEPS,
}

# The closed-division hyperparameters of SSD, in the order they are logged.
HYPERPARAMETER_KEYS = (
    C.GLOBAL_BATCH_SIZE, C.OPT_BASE_LR, C.OPT_WEIGHT_DECAY, C.MODEL_BN_SPAN,
    C.OPT_LR_WARMUP_STEPS, C.OPT_LR_WARMUP_FACTOR, C.MAX_SAMPLES,
    C.OPT_LR_DECAY_BOUNDARY_EPOCHS, C.GRADIENT_ACCUMULATION_STEPS,
)


def _check_accuracy(value: Any) -> None:
    """An ``eval_accuracy`` must be a COCO AP in [0, 1]: never pycocotools' "no ground truth"
    sentinel -1 or a NaN, which the checkers would read as a (failed) accuracy."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"refusing to log eval_accuracy {value!r}: an accuracy is a COCO AP in [0, 1] "
                         "(pycocotools gives -1 when the evaluated images have no ground truth)")


class _FlushingFileHandler(logging.FileHandler):
    """A file handler that fsyncs nothing but flushes every line (a killed run keeps its log)."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        self.flush()

    def handleError(self, record: logging.LogRecord) -> None:
        # logging's default prints "--- Logging error ---" and goes on: a log that silently
        # lost lines (full disk) must stop the run instead. Called inside emit's except block.
        raise  # noqa: PLE0704


def rename_to_first_free(path: Path) -> Path:
    """Rename ``path`` (a file or a folder) to the first free ``path.N`` (N = 1, 2, ...); return
    the new name."""
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.{n}")
    os.replace(path, target)
    return target


def move_aside(path: Path) -> Path | None:
    """Rename a non-empty ``path`` to the first free ``path.N``; return the new name."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    return rename_to_first_free(path)


class MLPerfLogger:
    """Writes MLPerf events to ``log_file`` (appending) and to stdout, on rank 0 only.

    Args:
        log_file: path of the MLPerf log; its folder is created. None: stdout only.
        rank: this process's global rank; ranks other than 0 log nothing.
        stdout: also echo the lines on stdout.
        keep_existing: a non-empty file already at ``log_file`` (an earlier run) is renamed
            to ``<log_file>.1`` (``.2``, ...) rather than appended to: one run per log, as
            the checkers expect, and nothing overwritten.
    """

    def __init__(self, log_file: str | os.PathLike | None = None, *, rank: int = 0, stdout: bool = True,
                 keep_existing: bool = True) -> None:
        self.enabled = rank == 0
        self.previous_log: Path | None = None
        self.log_file = Path(log_file) if log_file is not None else None
        self._seen: set[str] = set()
        self._logger = logging.getLogger(f"single_stage_detector.mllog.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handlers: list[logging.Handler] = []
        if self.enabled:
            if self.log_file is not None:
                self.log_file.parent.mkdir(parents=True, exist_ok=True)
                if keep_existing:
                    self.previous_log = move_aside(self.log_file)
                self._handlers.append(_FlushingFileHandler(self.log_file, mode="a", encoding="utf-8"))
            if stdout:
                self._handlers.append(logging.StreamHandler(sys.stdout))
            for h in self._handlers:
                h.setLevel(logging.INFO)
                self._logger.addHandler(h)
        # stack offset 2: report the caller of event()/start()/end(), not this module.
        root = str(Path(__file__).resolve().parent.parent)
        self._mllog = MLLogger(logger=self._logger, default_stack_offset=2, root_dir=root)

    # -- raw events -------------------------------------------------------------------
    def _guard(self, key: str, kind: str) -> None:
        tag = f"{kind}:{key}"
        if key in _EXACTLY_ONCE:
            if tag in self._seen:
                raise RuntimeError(f"MLPerf key {key!r} ({kind}) logged twice; the rules allow it once")
            self._seen.add(tag)

    def event(self, key: str, value: Any = None, metadata: Mapping[str, Any] | None = None) -> None:
        if key == C.EVAL_ACCURACY:
            _check_accuracy(value)  # on every rank, so that all of them stop alike
        if not self.enabled:
            return
        self._guard(key, "event")
        self._mllog.event(key=key, value=value, metadata=dict(metadata) if metadata else None)

    def start(self, key: str, value: Any = None, metadata: Mapping[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        self._guard(key, "start")
        self._mllog.start(key=key, value=value, metadata=dict(metadata) if metadata else None)

    def end(self, key: str, value: Any = None, metadata: Mapping[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        self._guard(key, "end")
        self._mllog.end(key=key, value=value, metadata=dict(metadata) if metadata else None)

    # -- groups of events -------------------------------------------------------------
    def submission_info(self, *, benchmark: str, org: str, division: str, status: str, platform: str) -> None:
        self.event(C.SUBMISSION_BENCHMARK, benchmark)
        self.event(C.SUBMISSION_ORG, org)
        self.event(C.SUBMISSION_DIVISION, division)
        self.event(C.SUBMISSION_STATUS, status)
        self.event(C.SUBMISSION_PLATFORM, platform)

    def hyperparameters(self, values: Mapping[str, Any]) -> None:
        """Log each hyperparameter once, in the order of :data:`HYPERPARAMETER_KEYS`."""
        for key in HYPERPARAMETER_KEYS:
            if key in values:
                self.event(key, values[key])
        for key, value in values.items():
            if key not in HYPERPARAMETER_KEYS:
                self.event(key, value)

    def weights_initialization(self, tensor_names: list[str]) -> None:
        for name in tensor_names:
            self.event(C.WEIGHTS_INITIALIZATION, metadata={"tensor": name})

    def close(self) -> None:
        for h in self._handlers:
            h.flush()
            h.close()
            self._logger.removeHandler(h)
        self._handlers.clear()
