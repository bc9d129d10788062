"""PyTorch ``DataLoader`` backend: collate into :class:`DetectionBatch`, train and eval loaders.

Sharding:

* train: :class:`EpochBatchSampler`: every image exactly once per epoch (the last,
  partial global batch is kept, as in the MLPerf reference), the same number of batches
  on every rank; the caller calls ``loader.batch_sampler.set_epoch(epoch)`` before each
  epoch to reshuffle.
* eval: :class:`StridedShardSampler`, rank r gets r, r + W, r + 2W, ...: disjoint, every
  image exactly once overall, no padding (so ``DetectionBatch.valid`` is all True).
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import platform
import random
import signal
import threading
from typing import Callable, Iterator, Protocol, Sequence, Sized

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .batch import DetectionBatch
from .coco import Sample

__all__ = [
    "collate_detection",
    "DetectionCollate",
    "StridedShardSampler",
    "EpochBatchSampler",
    "mix_seed",
    "seed_worker",
    "SampleIndex",
    "SeededSamples",
    "build_train_loader",
    "build_eval_loader",
]


def collate_detection(samples: Sequence[Sample | None]) -> DetectionBatch:
    """Stack samples into a :class:`DetectionBatch`, dropping ``None`` (unreadable) samples.

    Dropped samples are counted in ``skipped``. If every sample was dropped the batch
    has ``images`` of shape ``[0, 3, 0, 0]``; callers should skip empty batches.
    """
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return DetectionBatch(
            images=torch.zeros(0, 3, 0, 0), boxes=[], labels=[],
            image_ids=torch.zeros(0, dtype=torch.int64), orig_sizes=torch.zeros(0, 2, dtype=torch.int64),
            valid=torch.zeros(0, dtype=torch.bool), skipped=skipped,
        )
    return DetectionBatch(
        images=torch.stack([s.image for s in good]),
        boxes=[s.boxes for s in good],
        labels=[s.labels for s in good],
        image_ids=torch.tensor([s.image_id for s in good], dtype=torch.int64),
        orig_sizes=torch.tensor([s.orig_size for s in good], dtype=torch.int64),
        valid=torch.ones(len(good), dtype=torch.bool),
        skipped=skipped,
    )


class TargetEncoder(Protocol):
    """What :class:`DetectionCollate` needs of a box coder (``box_coder.BoxCoder``)."""

    def encode(self, boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor]: ...


class DetectionCollate:
    """:func:`collate_detection`, then the per-batch work that can run in the loader's workers.

    Args:
        target_encoder: encodes the batch's targets where the batch is built (a loader worker,
            one intra-op thread): ``encode(boxes, labels) -> (loc Tensor[B, A, 4], labels
            Tensor[B, A])`` stored in ``DetectionBatch.encoded``, which the SSD detector trains
            on instead of encoding in the training process. It must be the detector's encoding
            (the SSD family's ``BoxCoder`` over the preset's default boxes, on the CPU: the same
            targets, bit for bit, as ``SSDDetector.encode_targets``). None: raw boxes only.
        normalization: ``(mean, std)`` when the samples' images are uint8 RGB (a transform with
            ``normalize=False``): recorded in the batch, whose ``to()`` normalises on the device.

    Picklable (the loader sends it to spawned workers).
    """

    def __init__(self, target_encoder: TargetEncoder | None = None,
                 normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> None:
        self.target_encoder = target_encoder
        self.normalization = normalization

    def __call__(self, samples: Sequence[Sample | None]) -> DetectionBatch:
        batch = collate_detection(samples)
        if batch.images.dtype == torch.uint8:
            if self.normalization is None:
                raise ValueError("DetectionCollate: the samples' images are uint8 but no normalization (mean, std) "
                                 "was given to apply to them")
            batch.normalization = self.normalization
        if self.target_encoder is not None and len(batch):
            batch.encoded = self.target_encoder.encode(batch.boxes, batch.labels)
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target_encoder={self.target_encoder!r}, normalization={self.normalization})"


class StridedShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, rank + 2 * world_size, ... < n``, in order.

    Over all ranks every index appears exactly once; shard sizes differ by at most one.
    """

    def __init__(self, data_source: Sized | int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.n = data_source if isinstance(data_source, int) else len(data_source)
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class EpochBatchSampler(Sampler[list[int]]):
    """Per-rank batches of one epoch: every index of ``range(n)`` exactly once over all ranks.

    Epoch ``e`` is one permutation of ``range(n)`` drawn from ``(seed, e)``, identical on
    every rank. Step ``s`` takes the next global batch of ``batch_size x world_size`` of
    it, and rank ``r`` gets every ``world_size``-th index of that slice starting at ``r``.
    Every rank yields ``ceil(n / (batch_size x world_size))`` batches; only the last may
    be smaller than ``batch_size``, and when it holds fewer than ``world_size`` images some
    ranks get an empty batch there (the trainer keeps such a rank in step without
    training on anything, see ``engine.train_one_epoch``).

    ``set_epoch(e, start_batch=k)`` skips the first ``k`` batches of epoch ``e`` (a run
    resumed mid-epoch); ``len()`` stays the whole epoch's. With ``sample_seeds`` every index
    is yielded as a :class:`SampleIndex` carrying the seed of that sample's augmentation in
    that epoch, drawn from ``(seed, epoch, index)``.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, sample_seeds: bool = False) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.sample_seeds = sample_seeds
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return math.ceil(self.n / (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0xE90C))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        step = self.batch_size * self.world_size
        for start in range(self.start_batch * step, self.n, step):
            batch = order[start:start + step][self.rank::self.world_size]
            if self.sample_seeds:
                batch = [SampleIndex(i, mix_seed(self.seed, self.epoch, i, 0xA06)) for i in batch]
            yield batch


class SampleIndex(int):
    """A dataset index (an ``int``) that also carries the seed of the sample's augmentation.

    The seed travels with the index to whichever worker process loads the sample, so the
    augmentation of a sample depends on (run seed, epoch, index) only: not on the number
    of workers, on which worker loads it, or on what that worker loaded before. That is
    what lets a run resume exactly, even mid-epoch.
    """

    seed: int

    def __new__(cls, index: int, seed: int) -> "SampleIndex":
        obj = super().__new__(cls, index)
        obj.seed = int(seed)
        return obj

    def __reduce__(self):
        return SampleIndex, (int(self), self.seed)


class SeededSamples(Dataset):
    """``dataset[i]`` after seeding the RNGs the transforms draw from (``random`` and numpy's
    global RNG) with ``i.seed`` when ``i`` is a :class:`SampleIndex`; plain ints pass through."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        seed = getattr(index, "seed", None)
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)
        return self.dataset[int(index)]

    def __getattr__(self, name: str):  # the wrapped dataset's attributes (annotation_file, stats, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from ``parts`` (numpy's SeedSequence hashing, so nearby inputs decorrelate)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def ignore_stop_signals(worker_id: int = 0) -> None:
    """In a loader worker: leave SIGINT and a job-wide SIGTERM to the training process, which
    stops at a step boundary and then shuts its workers down (a terminal's Ctrl-C or SLURM
    signal every process of the job, and a worker that died of it would fail the batch the
    trainer is waiting for).

    A SIGTERM from the worker's own parent still ends it at once: that is how the DataLoader
    and multiprocessing's exit handler stop workers, and ignoring it would hang the parent's
    exit. The sender is read with ``sigwaitinfo`` in a helper thread (SIGTERM is blocked in
    the worker's main thread, so only that thread receives it).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # not POSIX: plain ignore
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_term() -> None:
        while True:
            info = signal.sigwaitinfo({signal.SIGTERM})
            if info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait_for_term, name="sigterm-from-parent", daemon=True).start()


def retain_freed_memory() -> bool:
    """glibc only: serve allocations under 32 MB from the heap and keep freed memory (up to
    256 MB) instead of returning it to the system. Returns whether the settings were applied.

    A loader worker allocates and frees the same few-hundred-kB to few-MB buffers for every
    sample (the decoded image, the resized one, the colour twist's float planes). glibc maps
    blocks from about 128 kB upwards straight from the kernel and unmaps them on free, so each
    one is faulted in again, page by page; measured on 2 CPU cores (a virtual machine), the
    colour twist of a 300x300 image took 1.7 ms with 496 page faults, 0.3 ms with none once
    freed memory is kept (``mallopt(M_MMAP_THRESHOLD)``, ``mallopt(M_TRIM_THRESHOLD)``).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def seed_worker(worker_id: int, *, seed: int, rank: int) -> None:
    """Seed this process's ``random``, numpy and torch RNGs from (seed, rank, worker id, loader seed).

    ``torch.initial_seed()`` in a worker is the loader's per-iterator base seed plus the
    worker id, itself drawn from the loader's generator (seeded from ``seed`` and
    ``rank``), so it changes with every non-persistent epoch iterator yet reproducibly.
    The transforms draw from numpy's global RNG. Also sets the worker's allocator to keep
    freed memory (:func:`retain_freed_memory`).
    """
    ignore_stop_signals()
    retain_freed_memory()
    s = mix_seed(seed, rank, worker_id, torch.initial_seed())
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    num_workers: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    prefetch_factor: int | None = None,
    collate_fn: Callable[[Sequence[Sample | None]], DetectionBatch] = collate_detection,
) -> DataLoader:
    """Shuffled, sharded training loader of :class:`DetectionBatch` (``batch_size`` per rank).

    Call ``loader.batch_sampler.set_epoch(epoch)`` at every epoch start. Every image is
    trained on once per epoch (see :class:`EpochBatchSampler` for the last batch). Each
    sample's augmentation is seeded from (seed, epoch, index) (:class:`SampleIndex`), so it
    is the same with any ``num_workers`` and after a resume. ``collate_fn`` builds each batch
    in the worker that loaded it (e.g. a :class:`DetectionCollate` that encodes the targets
    there); torch runs every worker with one intra-op thread.
    """
    batch_sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, rank=rank, world_size=world_size,
                                      sample_seeds=True)
    generator = torch.Generator().manual_seed(mix_seed(seed, rank, 0x5EED))
    init_fn = functools.partial(seed_worker, seed=seed, rank=rank)
    kwargs = {}
    if num_workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        worker_init_fn=init_fn if num_workers > 0 else None,
        generator=generator,
        persistent_workers=persistent_workers and num_workers > 0,
        **kwargs,
    )


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    collate_fn: Callable[[Sequence[Sample | None]], DetectionBatch] = collate_detection,
) -> DataLoader:
    """Sharded evaluation loader: rank r sees images r, r + W, ...; no shuffling, no padding, no drop.

    ``collate_fn``: a :class:`DetectionCollate` with a ``normalization`` for a transform that
    returns uint8 images (normalised on the device by ``engine.evaluate``).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=StridedShardSampler(dataset, rank, world_size),
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=False,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
    )
