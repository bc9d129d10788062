"""Training and evaluation steps: one epoch, one evaluation, progress output.

The recipe's pieces (LR schedule, optimiser, EMA, backbone freezing, gradient clipping) are
in :mod:`single_stage_detector.recipe`; ``LRSchedule`` stays importable from here.

Nothing here knows about SSD internals: a detector follows the contract of
:mod:`single_stage_detector.detector`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, TextIO

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .data.batch import DetectionBatch
from .data.transforms import normalize_images
from .distributed import DistInfo, average_batch_norm_stats
from .evaluation import CocoEvaluator, EvalResult, gather_results, to_coco_array
from .losses import FiniteLossMonitor
from .recipe import LRSchedule, ModelEMA, clip_gradients, set_batch_norm_eval, set_learning_rate

if TYPE_CHECKING:
    from .fast_path import CudaGraphTrainStep

__all__ = ["LRSchedule", "AmpSettings", "multi_scale_size", "EpochStats", "MetricsWriter", "ShardedEvalResult", "backward", "optimizer_step", "train_one_epoch",
           "evaluate", "infer", "scored", "Inference", "FAULT_INJECT_ENV"]

# Test hook: SSD_FAULT_INJECT_RANK=r makes rank r raise at optimiser step SSD_FAULT_INJECT_STEP
# (default 1), to check that one failing rank ends the whole launch. Never set in real runs.
FAULT_INJECT_ENV = "SSD_FAULT_INJECT_RANK"


def _fault_injection_step(rank: int) -> int | None:
    value = os.environ.get(FAULT_INJECT_ENV, "")
    if value == "" or int(value) != rank:
        return None
    return int(os.environ.get("SSD_FAULT_INJECT_STEP", "1"))


@dataclass(frozen=True)
class AmpSettings:
    """Autocast precision of the forward pass (``enabled`` False: fp32)."""

    enabled: bool
    dtype: torch.dtype
    device_type: str

    @classmethod
    def resolve(cls, mode: str, device: torch.device) -> "AmpSettings":
        """Training precision of ``--amp``: ``auto`` is bf16 on CUDA, fp32 on CPU."""
        if mode == "auto":
            mode = "bf16" if device.type == "cuda" else "off"
        return cls._of(mode, device)

    @classmethod
    def resolve_eval(cls, mode: str, device: torch.device) -> "AmpSettings":
        """Evaluation precision of ``--eval-amp``: ``auto`` is fp32 on every device.

        The accuracy target is a hard threshold, so evaluation only runs in reduced precision
        where it was measured to stay within 0.0005 AP of fp32; no GPU measurement exists yet
        (docs/ACCURACY.md has the CPU one), hence fp32.
        """
        return cls._of("off" if mode == "auto" else mode, device)

    @classmethod
    def _of(cls, mode: str, device: torch.device) -> "AmpSettings":
        if mode == "off":
            return cls(False, torch.float32, device.type)
        if mode not in ("bf16", "fp16"):
            raise ValueError(f"unknown precision {mode!r}; expected auto|off|bf16|fp16")
        return cls(True, torch.bfloat16 if mode == "bf16" else torch.float16, device.type)

    def describe(self) -> str:
        """``bfloat16`` / ``float16`` / ``off (fp32)``, as config.json records it."""
        return str(self.dtype).replace("torch.", "") if self.enabled else "off (fp32)"

    def autocast(self, cache_enabled: bool = True):
        """The forward pass's autocast context. ``cache_enabled`` False: no cache of cast weights
        (required while capturing a CUDA graph, which then owns the casts)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, cache_enabled=cache_enabled)

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16


@dataclass
class ShardedEvalResult(EvalResult):
    """An :class:`EvalResult` plus how many images each rank ran inference on."""

    images_per_rank: list[int] = field(default_factory=list)
    val_loss: float | None = None  # the loss on the evaluated images (``evaluate(val_loss=True)``)
    val_loss_terms: dict[str, float] = field(default_factory=dict)


@dataclass
class EpochStats:
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    skipped_samples: int = 0
    last_loss: dict[str, float] = field(default_factory=dict)
    stopped: bool = False  # should_stop() ended the epoch early, at a step boundary

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


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: "torch.amp.GradScaler | None",
                   clip_grad_norm: float | None = None, *, zero_grad: bool = True) -> None:
    """Apply and clear the gradients (the scaler skips steps with inf/NaN gradients and adapts its scale).

    ``clip_grad_norm``: first clip the global gradient norm to it (unscaled first when there
    is a scaler; :func:`~single_stage_detector.recipe.clip_gradients`, no host sync).
    ``zero_grad`` False keeps the gradients (a CUDA-graph capture, whose replays overwrite them)."""
    if clip_grad_norm is not None:
        clip_gradients(optimizer, clip_grad_norm, scaler)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def frozen_batch_norm_stats(module: nn.Module):
    """BatchNorm layers of ``module`` normalise as usual but leave their running statistics
    unchanged (momentum 0), for passes that only keep distributed ranks in step."""
    saved = [(m, m.momentum) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in saved:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def _tail_step(optimizer, scaler, schedule, step, stats, clip_grad_norm, ema):
    """The optimiser step of an epoch's last accumulation group when it ended on an empty batch."""
    set_learning_rate(optimizer, schedule(step))
    optimizer_step(optimizer, scaler, clip_grad_norm)
    stats.steps += 1
    if ema is not None:
        ema.update(step + 1)
    return step + 1, stats


def multi_scale_size(seed: int, step: int, low: int, high: int, every: int = 10) -> int:
    """The input side of optimiser step ``step`` in multi-scale training: a multiple of 32 in
    [``low``, ``high``] drawn uniformly, the same for ``every`` consecutive steps (darknet: a new
    size every 10 batches, ``src/detector.c`` train_detector; YOLOv2 paper section 3 "Multi-Scale
    Training"). A pure function of (seed, step // every): every rank and a resumed run agree."""
    choices = (high - low) // 32 + 1
    return low + 32 * random.Random(seed * 1_000_003 + step // every).randrange(choices)


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
    epoch_samples: int | None = None,
    batch_size: int | None = None,
    start_batch: int = 0,
    should_stop: Callable[[int], bool] | None = None,
    input_size_at: Callable[[int], int] | None = None,
    clip_grad_norm: float | None = None,
    ema: ModelEMA | None = None,
    frozen_bn: nn.Module | None = None,
    graph_step: "CudaGraphTrainStep | None" = None,
) -> EpochStats:
    """Train for one epoch (``epoch`` is 1-based). Returns the epoch's statistics.

    Every ``accumulation_steps`` micro-batches make one optimiser step; gradients are
    only all-reduced on the last micro-batch (DDP ``no_sync``). Each micro-batch loss is
    divided by the number of micro-batches of its step, so the step's gradient is the mean
    over all its images, as with one batch of ``accumulation_steps`` times the size. Every
    micro-batch the loader yields is trained on: when their number is not a multiple of
    ``accumulation_steps``, the last optimiser step of the epoch takes the remainder
    (``len(loader)`` must be known for that). ``steps_per_epoch`` caps the optimiser steps.

    Distributed: every rank must run the same number of forward/backward passes (DDP and
    SyncBatchNorm are collectives). An empty batch (all images unreadable, or a rank
    whose share of the epoch's last partial batch is empty) is therefore not skipped when
    there are several ranks: the previous batch is run again with its loss multiplied by
    0 and BatchNorm momentum 0 (no gradient, no change of the running statistics),
    keeping the ranks in step.

    With ``epoch_samples`` (images per epoch over all ranks) and ``batch_size`` (per rank),
    each rank's loss (a mean over its images) is weighted by its share of the micro-batch's
    images over all ranks, ``n_local x world / n_global``, so that the gradient DDP averages
    is the mean over all images of the step even when the epoch's last, partial global
    batch splits unevenly: the same gradient as one process with the whole global batch.
    ``n_global`` follows from the micro-batch's index (the samplers fill every global batch
    but the last), so no collective is needed.

    Resume and stop: ``start_batch`` is the number of micro-batches of this epoch already
    trained on (a multiple of ``accumulation_steps``; the loader must skip them itself and
    keep ``len(loader)`` the whole epoch's). After each optimiser step but the epoch's last,
    ``should_stop(steps done in this epoch)`` is called; True ends the epoch there, with
    ``stats.stopped`` set. It must be cheap (it runs on the hot path).

    Recipe: each parameter group's LR is ``schedule(step)`` times its ``lr_mult``
    (:func:`~single_stage_detector.recipe.set_learning_rate`); ``clip_grad_norm`` clips the
    global gradient norm before each optimiser step; ``ema`` is updated after each one
    (with the run's 1-based step count); the BatchNorm layers of ``frozen_bn`` (a submodule
    of ``detector``, e.g. a frozen backbone) stay in eval mode for the epoch.

    Multi-scale training: ``input_size_at(step)`` (``step`` = optimiser steps done before this
    one) gives the input side of the step; images of another size are resized to it on the
    device (bilinear; the normalised boxes are unchanged). See :func:`multi_scale_size`.

    CUDA graphs: with ``graph_step`` (:class:`~single_stage_detector.fast_path.CudaGraphTrainStep`
    over ``detector`` and ``optimizer``, with tensor LRs), each plain step (a full batch of
    real images, no accumulation) encodes its targets outside the graph and replays the
    captured forward, loss, backward, clipping and optimiser step; the LR is written into the
    optimiser's tensors first. Other steps (a rank's zero-weight stand-in, an uneven last batch
    under DDP) run eagerly, as without it.
    """
    say = _printer(info)
    detector.train()
    if frozen_bn is not None:
        set_batch_norm_eval(frozen_bn)
    stats = EpochStats()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    step = start_step
    micro = start_batch
    steps_before = start_batch // accumulation_steps  # optimiser steps of this epoch done before
    t0 = time.perf_counter()
    t_log, images_since_log = t0, 0
    total = steps_per_epoch if steps_per_epoch is not None else "?"
    fault_step = _fault_injection_step(info.rank)
    optimizer.zero_grad(set_to_none=True)
    # Non-finite losses: checked every step on the CPU, at logging steps and the epoch end on
    # GPUs (reading a loss value would stall the stream in every step).
    finite = FiniteLossMonitor(immediate=info.device.type == "cpu")
    previous: DetectionBatch | None = None
    try:
        total_micro = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total_micro = None
    # Micro-batches of the epoch's last (possibly partial) accumulation group.
    tail = (total_micro % accumulation_steps) if total_micro else 0
    for batch in loader:
        stats.skipped_samples += batch.skipped
        loss_weight = 1.0
        if len(batch) == 0:
            if not info.distributed:
                micro += 1  # keeps the accumulation groups aligned with the loader's batches
                if total_micro is not None and micro == total_micro and micro % accumulation_steps != 0:
                    step, stats = _tail_step(optimizer, scaler, schedule, step, stats, clip_grad_norm, ema)
                continue
            if previous is None:
                raise RuntimeError(f"rank {info.rank}: the first batch of epoch {epoch} is empty (unreadable "
                                   "images); the ranks cannot stay in step (see the warnings above)")
            batch, loss_weight = previous, 0.0
        else:
            batch = batch.to(info.device, memory_format=memory_format)
            if input_size_at is not None:
                side = input_size_at(step)
                if batch.images.shape[-1] != side or batch.images.shape[-2] != side:
                    batch.images = F.interpolate(batch.images, size=(side, side), mode="bilinear",
                                                 align_corners=False)
            previous = batch
        if fault_step is not None and step + 1 >= fault_step:
            raise RuntimeError(f"fault injected on rank {info.rank} at step {step + 1} "
                               f"({FAULT_INJECT_ENV} test hook)")
        share = 1.0
        if info.distributed and epoch_samples and batch_size and loss_weight:
            per_step = batch_size * info.world_size
            n_global = max(1, min(per_step, epoch_samples - micro * per_step))
            share = len(batch) * info.world_size / n_global
        in_tail = total_micro is not None and tail and micro >= total_micro - tail
        micro_per_step = tail if in_tail else accumulation_steps
        last_micro = (micro + 1) % accumulation_steps == 0 or (total_micro is not None and micro + 1 == total_micro)
        sync_ctx = (detector.no_sync() if (not last_micro and hasattr(detector, "no_sync"))
                    else contextlib.nullcontext())
        bn_ctx = frozen_batch_norm_stats(detector) if loss_weight == 0.0 else contextlib.nullcontext()
        if last_micro:
            lr = schedule(step)
            set_learning_rate(optimizer, lr)  # with --cuda-graphs: into the tensors the captured step reads
        graphed = graph_step is not None and loss_weight == 1.0 and share == 1.0 and micro_per_step == 1
        if graphed:
            if batch.encoded is not None:
                loc_t, labels_t = batch.encoded
            else:
                with torch.no_grad():  # static shapes [B, A, 4], [B, A] whatever the box counts
                    loc_t, labels_t = graph_step.encode_targets(batch.boxes, batch.labels)
            losses = graph_step(batch.images, loc_t, labels_t)
            finite.update(losses, step + 1, where=f"epoch {epoch}")
        else:
            with sync_ctx:
                with amp.autocast(), bn_ctx:
                    losses = detector(batch.images, batch.targets())
                loss = sum(losses.values())
                finite.update(losses, step + 1, where=f"epoch {epoch}")
                backward(loss * (loss_weight * share / micro_per_step), scaler)
        micro += 1
        if loss_weight:
            stats.images += len(batch)
            images_since_log += len(batch)
        if not last_micro:
            continue

        if not graphed:
            optimizer_step(optimizer, scaler, clip_grad_norm)
        step += 1
        stats.steps += 1
        if ema is not None:
            ema.update(step)

        in_epoch = steps_before + stats.steps
        # Read before this step's progress line: a signal sent on seeing that line stops after the next step.
        stop_here = (should_stop is not None and not (total_micro is not None and micro >= total_micro)
                     and should_stop(in_epoch))
        if in_epoch % log_every == 0 or stats.steps == 1:
            finite.check(where=f"epoch {epoch}")
            now = time.perf_counter()
            values = {k: float(v.detach()) for k, v in losses.items()}
            stats.last_loss = values
            rate = images_since_log * info.world_size / max(now - t_log, 1e-9)
            terms = " ".join(f"{k} {v:.3f}" for k, v in values.items())
            say(f"epoch {epoch}/{num_epochs} step {in_epoch}/{total} loss {sum(values.values()):.3f} "
                f"({terms}) lr {lr:.2e} {rate:.0f} img/s")
            if metrics is not None:
                metrics.write(kind="train", epoch=epoch, step=step, lr=lr, loss=sum(values.values()),
                              images_per_s=rate, **{f"loss_{k}": v for k, v in values.items()})
            t_log, images_since_log = now, 0
        if steps_per_epoch is not None and in_epoch >= steps_per_epoch:
            break
        if stop_here:
            stats.stopped = True
            break
    finite.check(where=f"epoch {epoch}")
    if info.device.type == "cuda":
        torch.cuda.synchronize(info.device)
    stats.seconds = time.perf_counter() - t0
    return stats


@dataclass
class Inference:
    """One evaluation's detections over every rank, on rank 0 (what :func:`score` needs).

    Attributes:
        results (np.ndarray float64[K, 7]): COCO results (:func:`~.evaluation.to_coco_array` rows) of
            every evaluated image, each image once.
        image_ids: the evaluated images' COCO ids.
        images_per_rank: how many images each rank inferred.
        seconds: the inference's wall time (with the gather).
        val_loss, val_loss_terms: the loss on the evaluated images (``val_loss=True``), else None / {}.
    """

    results: np.ndarray
    image_ids: list[int]
    images_per_rank: list[int]
    seconds: float
    val_loss: float | None = None
    val_loss_terms: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def infer(
    detector: nn.Module,
    loader: Iterable[DetectionBatch],
    label_to_category: Tensor,
    *,
    amp: AmpSettings,
    info: DistInfo,
    channels_last: bool = False,
    val_loss: bool = False,
) -> Inference | None:
    """The inference half of :func:`evaluate`: this rank's shard, gathered on rank 0; returns the
    :class:`Inference` on rank 0 and None on the other ranks. Collective: call on every rank.

    With several ranks, the BatchNorm running statistics are first averaged over all of
    them (in place), as the reference and NVIDIA's v0.7 code do before every evaluation,
    so that every rank evaluates (and later saves) the same model.

    ``val_loss``: also compute the training loss on the evaluated images from the same forward
    pass (``detector(images, targets)``, the contract's evaluation mode with targets): each term
    is the mean over batches of the batch's term weighted by its number of images, over every
    rank's images. The loss terms stay on the device until the end (no host synchronisation per
    batch).
    """
    if info.distributed:
        average_batch_norm_stats(detector)
    detector.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    t0 = time.perf_counter()
    results: list[np.ndarray] = []
    seen_ids: list[int] = []
    loss_sums: dict[str, Tensor] = {}
    loss_images = 0
    for batch in loader:
        if len(batch) == 0:
            continue
        keep = batch.valid.tolist()
        if not all(keep):  # padding samples of a sharded last batch: not inferred, not counted
            index = [i for i, k in enumerate(keep) if k]
            batch = DetectionBatch(images=batch.images[index], boxes=[batch.boxes[i] for i in index],
                                   labels=[batch.labels[i] for i in index], image_ids=batch.image_ids[index],
                                   orig_sizes=batch.orig_sizes[index], valid=batch.valid[index],
                                   normalization=batch.normalization)
            if len(batch) == 0:
                continue
        images = batch.images.to(info.device, non_blocking=True, memory_format=memory_format)
        if batch.normalization is not None:  # uint8 from the loader (SSD's torch path)
            images = normalize_images(images, *batch.normalization)
        with amp.autocast():
            if val_loss:
                boxes, labels = batch.ground_truth_on(info.device)
                detections, terms = detector(images, {"boxes": boxes, "labels": labels})
            else:
                detections = detector(images)
        if val_loss:
            n = len(batch)
            for name, value in terms.items():
                weighted = value.detach().double() * n
                loss_sums[name] = loss_sums[name] + weighted if name in loss_sums else weighted
            loss_images += n
        ids = [int(i) for i in batch.image_ids.tolist()]
        results.append(to_coco_array(detections, ids, batch.orig_sizes, label_to_category))
        seen_ids.extend(ids)
    # The val-loss sums travel with the detections: one collective per evaluation.
    sums = ({k: float(v) for k, v in loss_sums.items()}, loss_images) if val_loss else None
    gathered = gather_results(np.concatenate(results) if results else np.zeros((0, 7)), seen_ids, extra=sums)
    if gathered is None:
        return None
    all_results, all_ids, images_per_rank, rank_sums = gathered
    losses = _val_loss_terms(rank_sums) if val_loss else None
    if sum(images_per_rank) != len(all_ids):
        print(f"WARNING: evaluation: the ranks inferred {sum(images_per_rank)} images for {len(all_ids)} distinct "
              "ones; duplicates were counted once", file=sys.stderr, flush=True)
    out = Inference(results=all_results, image_ids=all_ids, images_per_rank=images_per_rank,
                    seconds=time.perf_counter() - t0)
    if losses:
        out.val_loss_terms = losses
        out.val_loss = sum(losses.values())
    return out


def scored(inference: Inference, result: EvalResult) -> "ShardedEvalResult":
    """``result`` (the COCO scoring of ``inference``) with the inference's counts and val loss; its
    ``seconds`` become inference + scoring."""
    return ShardedEvalResult(**{**vars(result), "seconds": inference.seconds + result.seconds},
                             images_per_rank=inference.images_per_rank, val_loss=inference.val_loss,
                             val_loss_terms=dict(inference.val_loss_terms))


def evaluate(
    detector: nn.Module,
    loader: Iterable[DetectionBatch],
    evaluator: CocoEvaluator | None,
    label_to_category: Tensor,
    *,
    amp: AmpSettings,
    info: DistInfo,
    channels_last: bool = False,
    val_loss: bool = False,
) -> EvalResult:
    """Run inference on this rank's shard, gather on rank 0, COCO-evaluate there: :func:`infer`
    then ``evaluator.evaluate`` (see :func:`infer` for the BatchNorm averaging and ``val_loss``).
    Collective: call on every rank.

    Returns the result on rank 0 and a placeholder (ap = nan) on other ranks; the caller
    broadcasts the AP so that every rank takes the same stop decision.
    ``evaluator`` may be None on ranks other than 0.
    """
    inference = infer(detector, loader, label_to_category, amp=amp, info=info, channels_last=channels_last,
                      val_loss=val_loss)
    if inference is None:
        return ShardedEvalResult(ap=math.nan)
    assert evaluator is not None, "rank 0 needs the COCO evaluator"
    return scored(inference, evaluator.evaluate(inference.results, inference.image_ids))


def _val_loss_terms(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Per-term val loss over every rank's images: sum(term x images) / sum(images). Each part is
    one rank's (image-weighted term sums, image count)."""
    total = sum(n for _, n in parts)
    names = sorted({k for part, _ in parts for k in part})
    if total == 0:
        return {}
    return {k: sum(part.get(k, 0.0) for part, _ in parts) / total for k in names}
