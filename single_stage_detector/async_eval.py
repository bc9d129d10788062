"""COCO scoring off the training's critical path: one spawned process runs ``COCOeval`` on an
evaluation's gathered detections while the next epoch trains (``train --async-eval``), as
NVIDIA's MLPerf SSD submissions do.

Only the scoring moves: inference stays in the training processes (it needs the model and
every rank). The scorer process is started once per run (``spawn``: no CUDA context or
threads are inherited), loads the ground truth once, and leaves job-wide SIGINT/SIGTERM to
the trainer, which stops it when the run ends.
"""
from __future__ import annotations

import multiprocessing
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .evaluation import CocoEvaluator, EvalResult

__all__ = ["AsyncScorer"]

_EVALUATOR: CocoEvaluator | None = None


def _init_worker(annotation_file: str, backend: str) -> None:
    global _EVALUATOR
    # A terminal's Ctrl-C or a job-wide SIGTERM is the trainer's to handle: it finishes the step,
    # collects the pending scoring and then stops this process (which also ends when its parent dies:
    # the call queue closes).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _EVALUATOR = CocoEvaluator(annotation_file, backend=backend)


def _score(results: np.ndarray, image_ids: list[int]) -> EvalResult:
    assert _EVALUATOR is not None
    return _EVALUATOR.evaluate(results, image_ids)


class AsyncScorer:
    """COCO evaluation of ``annotation_file`` in one background process, by the scorer
    ``backend`` (:class:`~.evaluation.CocoEvaluator`'s: auto | pycocotools | faster-coco-eval).

    :meth:`submit` returns at once with a ``Future`` of the :class:`EvalResult` (its
    ``result()`` re-raises the scorer's errors, e.g. ``UndefinedAPError``); scorings run one
    after another in submission order. :meth:`close` stops the process (waiting for nothing
    but the current scoring when ``wait``).
    """

    def __init__(self, annotation_file: str | Path, backend: str = "auto") -> None:
        self.annotation_file = str(annotation_file)
        self.backend = backend
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(self.annotation_file, backend))

    def submit(self, results: np.ndarray, image_ids: list[int]) -> Future:
        """Score ``results`` (``float64[K, 7]``, :func:`~.evaluation.to_coco_array` rows) over ``image_ids``."""
        return self._pool.submit(_score, results, list(image_ids))

    def close(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
