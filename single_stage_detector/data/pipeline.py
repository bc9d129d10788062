"""Builds the training and evaluation inputs of a run for the selected data backend.

The trainer only sees :class:`DataPipeline`: two iterables of
:class:`~single_stage_detector.data.batch.DetectionBatch`, the sample counts it logs,
and the validation annotation file the COCO evaluator reads. A backend (PyTorch
DataLoader, or NVIDIA DALI) is one ``_build_<name>`` function here; ``--data-backend auto``
picks DALI when it is importable and the run is on a GPU, else the DataLoader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .batch import DetectionBatch
from .coco import CocoDetection, find_coco_split
from .loader import build_eval_loader, build_train_loader
from .transforms import SSDEvalTransform, SSDTrainTransform

__all__ = ["DataPipeline", "build_data_pipeline"]


@dataclass
class DataPipeline:
    """What a run needs from its input pipeline.

    ``set_epoch(epoch)`` must be called before iterating ``train`` for an epoch (1-based).
    ``train_steps`` is the number of batches ``train`` yields per epoch on every rank.
    """

    backend: str
    train: Iterable[DetectionBatch]
    eval: Iterable[DetectionBatch]
    train_samples: int
    eval_samples: int
    train_steps: int
    val_annotation_file: Path
    stats: dict[str, Any] = field(default_factory=dict)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.train, "set_epoch"):  # DALI: finish the previous reader epoch (reshuffles)
            self.train.set_epoch(epoch)
            return
        sampler = getattr(self.train, "sampler", None)
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def close(self) -> None:
        """Release the backend's workers / pipelines (DALI threads and buffers). Safe to call twice."""
        for loader in (self.train, self.eval):
            close = getattr(loader, "close", None)
            if close is not None:
                close()


def _subset(dataset, limit: int | None):
    if limit is None or limit >= len(dataset):
        return dataset
    return torch.utils.data.Subset(dataset, range(limit))


def build_data_pipeline(cfg, *, input_size: int, seed: int, rank: int, world_size: int,
                        device: torch.device) -> DataPipeline:
    """The pipeline of ``cfg.data_backend`` for ``cfg.data_dir`` (a :class:`TrainConfig`)."""
    from .dali import resolve_data_backend

    builders = {"torch": _build_torch, "dali": _build_dali}
    if cfg.data_backend not in (*builders, "auto"):
        raise ValueError(f"unknown data backend {cfg.data_backend!r}; known: {', '.join(builders)}, auto")
    builder = builders[resolve_data_backend(cfg.data_backend, device)]
    return builder(cfg, input_size=input_size, seed=seed, rank=rank, world_size=world_size, device=device)


def _build_torch(cfg, *, input_size: int, seed: int, rank: int, world_size: int, device: torch.device) -> DataPipeline:
    train_dir, train_ann = find_coco_split(cfg.data_dir, "train2017")
    train_tf = SSDTrainTransform(input_size, cfg.max_samples) if cfg.augment else SSDEvalTransform(input_size)
    train_set = CocoDetection(train_dir, train_ann, transform=train_tf, skip_empty=True)
    train_data = _subset(train_set, cfg.max_train_images)
    train_loader = build_train_loader(train_data, cfg.batch_size, num_workers=cfg.num_workers, seed=seed,
                                      rank=rank, world_size=world_size, pin_memory=device.type == "cuda")
    eval_loader, eval_samples, val_ann = build_torch_eval_loader(
        cfg.data_dir, input_size, cfg.eval_batch_size, num_workers=cfg.num_workers, rank=rank,
        world_size=world_size, max_images=cfg.max_eval_images, all_images=cfg.eval_all_images,
        persistent_workers=True)
    return DataPipeline(backend="torch", train=train_loader, eval=eval_loader, train_samples=len(train_data),
                        eval_samples=eval_samples, train_steps=len(train_loader), val_annotation_file=val_ann,
                        stats=train_set.stats)


def build_torch_eval_loader(data_dir, input_size: int, batch_size: int, *, num_workers: int, rank: int = 0,
                            world_size: int = 1, max_images: int | None = None, all_images: bool = False,
                            persistent_workers: bool = False) -> tuple[Iterable[DetectionBatch], int, Path]:
    """``(loader, number of images, annotation file)`` of the val split of ``data_dir`` (this rank's shard).

    Images without annotations are left out, as the reference does, unless ``all_images``.
    """
    val_dir, val_ann = find_coco_split(data_dir, "val2017")
    val_set = CocoDetection(val_dir, val_ann, transform=SSDEvalTransform(input_size), skip_empty=not all_images)
    val_data = _subset(val_set, max_images)
    loader = build_eval_loader(val_data, batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
                               persistent_workers=persistent_workers)
    return loader, len(val_data), val_ann


def _subset_files(dataset: CocoDetection, limit: int | None) -> list[str]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [dataset.image_info(i)["file_name"] for i in dataset.image_ids[:n]]


def _build_dali(cfg, *, input_size: int, seed: int, rank: int, world_size: int, device: torch.device) -> DataPipeline:
    """NVIDIA DALI pipelines (data/dali.py): GPU decode + augmentation on CUDA, CPU-only otherwise.

    The annotation files are indexed once with :class:`CocoDetection` (no images read) so
    that DALI reads exactly the images, in the order, that the torch path would.
    """
    from ..box_coder import default_boxes
    from ..models import get_preset
    from .dali import DaliEvalLoader, DaliTrainLoader

    train_dir, train_ann = find_coco_split(cfg.data_dir, "train2017")
    val_dir, val_ann = find_coco_split(cfg.data_dir, "val2017")
    train_index = CocoDetection(train_dir, train_ann, skip_empty=True)
    val_index = CocoDetection(val_dir, val_ann, skip_empty=not cfg.eval_all_images)
    train_files = _subset_files(train_index, cfg.max_train_images)
    val_files = _subset_files(val_index, cfg.max_eval_images)
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    fp16 = device.type == "cuda" and cfg.amp != "off"
    spec = get_preset(cfg.preset).box_spec
    threads = max(1, cfg.num_workers)
    train = DaliTrainLoader(train_dir, train_ann, train_files, batch_size=cfg.batch_size, input_size=input_size,
                            seed=seed, rank=rank, world_size=world_size, device_id=device_id, num_threads=threads,
                            max_samples=cfg.max_samples, augment=cfg.augment,
                            default_boxes=default_boxes(spec), fp16=fp16)
    evaluation = DaliEvalLoader(val_dir, val_ann, val_files, batch_size=cfg.eval_batch_size, input_size=input_size,
                                rank=rank, world_size=world_size, device_id=device_id, num_threads=threads,
                                skip_empty=not cfg.eval_all_images, fp16=fp16)
    stats = dict(train_index.stats)
    stats["dali_device"] = "gpu" if device_id is not None else "cpu"
    return DataPipeline(backend="dali", train=train, eval=evaluation, train_samples=len(train_files),
                        eval_samples=len(val_files), train_steps=len(train), val_annotation_file=val_ann,
                        stats=stats)
