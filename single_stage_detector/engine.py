"""Training and evaluation steps: LR schedule, one epoch, one evaluation, progress output.

Nothing here knows about SSD internals: a detector follows the contract of
:mod:`single_stage_detector.detector`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, TextIO

import torch
from torch import Tensor, nn

from .data.batch import DetectionBatch
from .distributed import DistInfo
from .evaluation import CocoEvaluator, EvalResult, gather_results, to_coco_results
from .losses import check_finite

__all__ = ["LRSchedule", "AmpSettings", "EpochStats", "MetricsWriter", "ShardedEvalResult", "backward", "optimizer_step", "train_one_epoch",
           "evaluate", "FAULT_INJECT_ENV"]

# Test hook: SSD_FAULT_INJECT_RANK=r makes rank r raise at optimiser step SSD_FAULT_INJECT_STEP
# (default 1), to check that one failing rank ends the whole launch. Never set in real runs.
FAULT_INJECT_ENV = "SSD_FAULT_INJECT_RANK"


def _fault_injection_step(rank: int) -> int | None:
    value = os.environ.get(FAULT_INJECT_ENV, "")
    if value == "" or int(value) != rank:
        return None
    return int(os.environ.get("SSD_FAULT_INJECT_STEP", "1"))


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate per optimiser step: linear warm-up, then x ``decay_factor`` at each boundary.

    Warm-up follows the MLPerf reference: during the first ``warmup_steps`` steps,
    ``lr = base_lr * (1 - (warmup_steps - step) / (warmup_steps * 2**warmup_factor))``,
    i.e. a ramp from ``base_lr * (1 - 2**-factor)`` (0 for factor 0) to ``base_lr``.
    Decay boundaries are epochs: from the first step of epoch ``e`` (0-based), the LR is
    multiplied once for every boundary ``<= e``.
    """

    base_lr: float
    warmup_steps: int
    warmup_factor: float
    decay_epochs: tuple[int, ...]
    decay_factor: float
    steps_per_epoch: int

    def __call__(self, step: int) -> float:
        lr = self.base_lr
        if step < self.warmup_steps:
            lr = self.base_lr * (1.0 - (self.warmup_steps - step) / (self.warmup_steps * 2.0 ** self.warmup_factor))
        epoch = step // max(1, self.steps_per_epoch)
        decays = sum(1 for b in self.decay_epochs if epoch >= b)
        return lr * self.decay_factor ** decays


@dataclass(frozen=True)
class AmpSettings:
    enabled: bool
    dtype: torch.dtype
    device_type: str

    @classmethod
    def resolve(cls, mode: str, device: torch.device) -> "AmpSettings":
        if mode == "auto":
            mode = "bf16" if device.type == "cuda" else "off"
        if mode == "off":
            return cls(False, torch.float32, device.type)
        return cls(True, torch.bfloat16 if mode == "bf16" else torch.float16, device.type)

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16


@dataclass
class ShardedEvalResult(EvalResult):
    """An :class:`EvalResult` plus how many images each rank ran inference on."""

    images_per_rank: list[int] = field(default_factory=list)


@dataclass
class EpochStats:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    skipped_samples: int = 0
    last_loss: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class MetricsWriter:
    """Appends one JSON object per line (steps, epochs, evaluations) for plots; rank 0 only.

    With ``tensorboard_dir`` the same numbers also go to TensorBoard scalars
    (``train/*`` by optimiser step, ``epoch/*`` and ``eval/*`` by epoch). TensorBoard is an
    optional dependency (``pip install tensorboard``), imported only when asked for.
    """

    def __init__(self, path: str | None, enabled: bool = True, tensorboard_dir: str | None = None) -> None:
        self._fh: TextIO | None = None
        self._tb = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from .config import ConfigError

                raise ConfigError("--tensorboard-dir needs the tensorboard package (pip install tensorboard)") from None
            self._tb = SummaryWriter(log_dir=tensorboard_dir)
        if path and enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")

    def write(self, **record) -> None:
        record.setdefault("time", time.time())
        if self._fh is not None:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        if self._tb is not None:
            self._write_tensorboard(record)

    def _write_tensorboard(self, record: dict) -> None:
        kind = record.get("kind")
        if kind == "train":
            scalars, step, prefix = record, record["step"], "train"
        elif kind in ("epoch", "eval"):
            scalars, step, prefix = record, record["epoch"], kind
        else:
            return
        for key, value in scalars.items():
            if key in ("kind", "time", "step", "epoch") or not isinstance(value, (int, float)):
                continue
            self._tb.add_scalar(f"{prefix}/{key}", value, global_step=step, walltime=record["time"])
        self._tb.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _printer(info: DistInfo) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if info.is_main:
            print(msg, file=sys.stdout, flush=True)
    return say


def backward(loss: Tensor, scaler: "torch.amp.GradScaler | None") -> None:
    """Backward pass, through the fp16 loss scaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler | None") -> None:
    """Apply and clear the gradients (the scaler skips steps with inf/NaN gradients and adapts its scale)."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
    detector: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable[DetectionBatch],
    *,
    epoch: int,
    num_epochs: int,
    start_step: int,
    schedule: LRSchedule,
    amp: AmpSettings,
    scaler: "torch.amp.GradScaler | None",
    info: DistInfo,
    accumulation_steps: int = 1,
    channels_last: bool = False,
    log_every: int = 20,
    metrics: MetricsWriter | None = None,
    steps_per_epoch: int | None = None,
) -> EpochStats:
    """Train for one epoch (``epoch`` is 1-based). Returns the epoch's statistics.

    Every ``accumulation_steps`` micro-batches make one optimiser step; gradients are
    only all-reduced on the last micro-batch (DDP ``no_sync``). Each micro-batch loss is
    divided by ``accumulation_steps``, so the step's gradient is the mean over all its
    images, as with one batch of ``accumulation_steps`` times the size. With
    ``steps_per_epoch`` the epoch ends after that many optimiser steps (micro-batches left
    over that would not make a full step are not run).

    Distributed: every rank must run the same number of forward/backward passes (DDP and
    SyncBatchNorm are collectives). A batch whose images were all unreadable is therefore
    not skipped when there are several ranks: the previous batch is run again with its
    loss multiplied by 0 (no gradient, no update of its own), keeping the ranks in step.
    """
    say = _printer(info)
    detector.train()
    stats = EpochStats()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    step = start_step
    micro = 0
    t0 = time.perf_counter()
    t_log, images_since_log = t0, 0
    total = steps_per_epoch if steps_per_epoch is not None else "?"
    fault_step = _fault_injection_step(info.rank)
    optimizer.zero_grad(set_to_none=True)
    previous: DetectionBatch | None = None
    for batch in loader:
        stats.skipped_samples += batch.skipped
        loss_weight = 1.0
        if len(batch) == 0:
            if not info.distributed:
                continue
            if previous is None:
                raise RuntimeError(f"rank {info.rank}: every image of the first batch of epoch {epoch} was unreadable; "
                                   "the ranks cannot stay in step (see the warnings above)")
            batch, loss_weight = previous, 0.0
        else:
            batch = batch.to(info.device, memory_format=memory_format)
            previous = batch
        if fault_step is not None and step + 1 >= fault_step:
            raise RuntimeError(f"fault injected on rank {info.rank} at step {step + 1} "
                               f"({FAULT_INJECT_ENV} test hook)")
        last_micro = (micro + 1) % accumulation_steps == 0
        sync_ctx = (detector.no_sync() if (not last_micro and hasattr(detector, "no_sync"))
                    else contextlib.nullcontext())
        with sync_ctx:
            with amp.autocast():
                losses = detector(batch.images, batch.targets())
            loss = sum(losses.values())
            check_finite(losses, where=f"epoch {epoch}, step {step + 1}")
            backward(loss * (loss_weight / accumulation_steps), scaler)
        micro += 1
        if loss_weight:
            stats.images += len(batch)
            images_since_log += len(batch)
        if not last_micro:
            continue

        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer_step(optimizer, scaler)
        step += 1
        stats.steps += 1

        if stats.steps % log_every == 0 or stats.steps == 1:
            now = time.perf_counter()
            values = {k: float(v.detach()) for k, v in losses.items()}
            stats.last_loss = values
            rate = images_since_log * info.world_size / max(now - t_log, 1e-9)
            terms = " ".join(f"{k} {v:.3f}" for k, v in values.items())
            say(f"epoch {epoch}/{num_epochs} step {stats.steps}/{total} loss {sum(values.values()):.3f} "
                f"({terms}) lr {lr:.2e} {rate:.0f} img/s")
            if metrics is not None:
                metrics.write(kind="train", epoch=epoch, step=step, lr=lr, loss=sum(values.values()),
                              images_per_s=rate, **{f"loss_{k}": v for k, v in values.items()})
            t_log, images_since_log = now, 0
        if steps_per_epoch is not None and stats.steps >= steps_per_epoch:
            break
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    stats.seconds = time.perf_counter() - t0
    return stats


@torch.no_grad()
def evaluate(
    detector: nn.Module,
    loader: Iterable[DetectionBatch],
    evaluator: CocoEvaluator | None,
    label_to_category: Tensor,
    *,
    amp: AmpSettings,
    info: DistInfo,
    channels_last: bool = False,
) -> EvalResult:
    """Run inference on this rank's shard, gather on rank 0, COCO-evaluate there.

    Returns the result on rank 0 and a placeholder (ap = nan) on other ranks; the caller
    broadcasts the AP so that every rank takes the same stop decision.
    ``evaluator`` may be None on ranks other than 0.
    """
    detector.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    t0 = time.perf_counter()
    results: list[dict] = []
    seen_ids: list[int] = []
    for batch in loader:
        if len(batch) == 0:
            continue
        images = batch.images.to(info.device, non_blocking=True, memory_format=memory_format)
        with amp.autocast():
            detections = detector(images)
        keep = batch.valid.tolist()
        ids = [int(i) for i, k in zip(batch.image_ids.tolist(), keep) if k]
        dets = [d for d, k in zip(detections, keep) if k]
        sizes = batch.orig_sizes[batch.valid]
        results.extend(to_coco_results(dets, ids, sizes, label_to_category))
        seen_ids.extend(ids)
    inference_s = time.perf_counter() - t0
    gathered = gather_results(results, seen_ids)
    if gathered is None:
        return ShardedEvalResult(ap=math.nan, seconds=inference_s)
    all_results, all_ids, images_per_rank = gathered
    if sum(images_per_rank) != len(all_ids):
        print(f"WARNING: evaluation: the ranks inferred {sum(images_per_rank)} images for {len(all_ids)} distinct "
              "ones; duplicates were counted once", file=sys.stderr, flush=True)
    assert evaluator is not None, "rank 0 needs the COCO evaluator"
    result = evaluator.evaluate(all_results, all_ids)
    result.seconds = time.perf_counter() - t0
    return ShardedEvalResult(**vars(result), images_per_rank=images_per_rank)
