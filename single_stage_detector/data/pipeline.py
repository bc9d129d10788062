"""Builds the training and evaluation inputs of a run for the selected data backend.

The trainer only sees :class:`DataPipeline`: two iterables of
:class:`~single_stage_detector.data.batch.DetectionBatch`, the sample counts it logs,
and the validation annotation file the COCO evaluator reads. A backend (PyTorch
DataLoader, or NVIDIA DALI) is one ``_build_<name>`` function here; ``--data-backend auto``
picks DALI when it is importable and the run is on a GPU, else the DataLoader.
"""
from __future__ import annotations

import dataclasses
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .batch import DetectionBatch
from .coco import CocoDetection, DatasetError, DataWarning, find_coco_split
from .loader import DetectionCollate, build_eval_loader, build_train_loader, collate_detection
from .transforms import SSDEvalTransform, SSDTrainTransform

__all__ = ["DataPipeline", "EvalInput", "build_data_pipeline", "build_eval_input", "load_split", "train_collate"]


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
    workdir: Path | None = None  # files the pipeline wrote for this run (DALI's reader annotations)
    train_set: CocoDetection | None = None  # the training split's index (boxes, sizes), every backend

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position ``train`` at batch ``start_batch`` (0-based, per rank) of epoch ``epoch`` (1-based).

        The position is all the state a backend has: batches and augmentation are functions
        of (seed, epoch, position), so this is also how a resumed run restores it.
        """
        if hasattr(self.train, "set_epoch"):  # DALI: a pipeline for this epoch
            self.train.set_epoch(epoch, start_batch)
            return
        for name in ("batch_sampler", "sampler"):
            sampler = getattr(self.train, name, None)
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch, start_batch)
                return
        if start_batch:
            raise ValueError(f"the {self.backend} pipeline cannot start an epoch at batch {start_batch}")

    def close(self) -> None:
        """Release the backend's workers / pipelines (DALI threads and buffers). Safe to call twice."""
        for loader in (self.train, self.eval):
            close = getattr(loader, "close", None)
            if close is not None:
                close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def build_data_pipeline(cfg, *, input_size: int, seed: int, rank: int, world_size: int,
                        device: torch.device, transforms: tuple[Any, Any] | None = None,
                        dali_graph: str = "ssd") -> DataPipeline:
    """The pipeline of ``cfg.data_backend`` for ``cfg.data_dir`` (a :class:`TrainConfig`).

    ``transforms``: the (training, evaluation) transforms of the torch path, the preset
    family's (``DetectorFamily.train_transform`` / ``eval_transform``); default SSD's.
    ``dali_graph``: the family's DALI training graph (``DetectorFamily.dali_graph``):
    ``"ssd"`` (data/dali.py) or ``"yolo"`` (data/dali_yolo.py, which takes its parameters
    from ``transforms``).
    """
    from .dali import resolve_data_backend

    builders = {"torch": _build_torch, "dali": _build_dali}
    if cfg.data_backend not in (*builders, "auto"):
        raise ValueError(f"unknown data backend {cfg.data_backend!r}; known: {', '.join(builders)}, auto")
    builder = builders[resolve_data_backend(cfg.data_backend, device)]
    if builder is _build_dali:
        extra = {} if dali_graph == "ssd" else {"transforms": transforms, "dali_graph": dali_graph}
    else:
        extra = {} if transforms is None else {"transforms": transforms}
    return builder(cfg, input_size=input_size, seed=seed, rank=rank, world_size=world_size, device=device, **extra)


def _all_gather(items: list, world_size: int) -> list:
    """Concatenate every rank's ``items`` (picklable) on every rank; ``items`` when not distributed."""
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return list(items)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(items))
    return [x for part in parts for x in part]


def load_split(cfg, split: str, *, rank: int = 0, world_size: int = 1, transform=None,
               limit: int | None = None, skip_empty: bool = True) -> CocoDetection:
    """The index of ``split`` as every backend reads it: one place for boxes and image checks.

    Builds :class:`CocoDetection` (boxes clipped and cleaned, crowd boxes per
    ``cfg.include_crowd``), keeps the first ``limit`` images, then, with
    ``cfg.check_images``, checks every image header (sharded over the ranks, results
    gathered, so each file is read once per run) and drops the files that no backend
    can use, warning once per reason (rank 0) and counting them in ``stats``.
    """
    image_dir, annotation_file = find_coco_split(cfg.data_dir, split)
    dataset = CocoDetection(image_dir, annotation_file, transform=transform, skip_empty=skip_empty,
                            include_crowd=getattr(cfg, "include_crowd", True))
    if limit is not None and limit < len(dataset):
        dataset.restrict(range(limit))
    listed = len(dataset)
    if getattr(cfg, "check_images", True):
        findings = _all_gather(dataset.check_images(range(rank, len(dataset), world_size)), world_size)
        findings.sort(key=lambda item: item[0])
        if rank == 0:
            dataset.apply_image_checks(findings)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DataWarning)
                dataset.apply_image_checks(findings)
    if len(dataset) == 0:
        stats = dataset.stats
        raise DatasetError(
            f"{annotation_file}: no usable image in {split} ({listed + stats['images_skipped_empty']} listed, "
            f"{stats['images_skipped_empty']} without annotations, {listed - len(dataset)} unreadable or skipped); "
            "a run needs training images and annotated val images")
    return dataset


def _pipeline_stats(train_set: CocoDetection, val_set: CocoDetection) -> dict[str, Any]:
    """Dataset counts reported in the summary and ``result.json``: train stats, then ``val_``-prefixed ones."""
    return {**train_set.stats, **{f"val_{k}": v for k, v in val_set.stats.items()}}


def train_collate(preset: str, transform: Any, device: torch.device | str = "cpu") -> DetectionCollate:
    """The torch path's training collate for ``preset`` (a registered name), its samples'
    ``transform`` and the training ``device``, run in the loader workers.

    SSD presets (those with a ``box_spec``) training on the CPU encode their targets there,
    with a CPU ``BoxCoder`` over the preset's default boxes and the detector's matching (IoU
    0.5): the targets ``SSDDetector.encode_targets`` computes, bit for bit, as the DALI graph
    hands them over too; the training process, whose cores the workers share, then only
    trains. On a GPU the detector encodes on the device as before (dense matching, no host
    synchronisation; encoded in the workers, the targets would add 210 kB per image to move). Other
    families (YOLO) assign their targets in the loss, at the input size of the step, and get
    raw boxes. A transform built with ``normalize=False`` sends uint8 images, normalised with
    its ``mean`` / ``std`` by ``DetectionBatch.to`` on the training device.
    """
    from ..box_coder import BoxCoder, default_boxes
    from ..detectors.base import get_preset

    spec = getattr(get_preset(preset), "box_spec", None)
    encoder = None if spec is None or torch.device(device).type != "cpu" else BoxCoder(default_boxes(spec))
    normalization = None if getattr(transform, "normalize", True) else (tuple(transform.mean), tuple(transform.std))
    return DetectionCollate(target_encoder=encoder, normalization=normalization)


def _build_torch(cfg, *, input_size: int, seed: int, rank: int, world_size: int, device: torch.device,
                 transforms: tuple[Any, Any] | None = None) -> DataPipeline:
    if transforms is None:
        transforms = (SSDTrainTransform(input_size, cfg.max_samples, fused_color=cfg.color_jitter == "fused",
                                        normalize=False),
                      SSDEvalTransform(input_size))
    train_tf = transforms[0] if cfg.augment else transforms[1]
    train_set = load_split(cfg, "train2017", rank=rank, world_size=world_size, transform=train_tf,
                           limit=cfg.max_train_images)
    train_loader = build_train_loader(train_set, cfg.batch_size, num_workers=cfg.num_workers, seed=seed,
                                      rank=rank, world_size=world_size, pin_memory=device.type == "cuda",
                                      collate_fn=train_collate(cfg.preset, train_tf, device))
    val = build_eval_input(dataclasses.replace(cfg, data_backend="torch"), input_size=input_size, rank=rank,
                           world_size=world_size, device=device, persistent_workers=True,
                           eval_transform=transforms[1])
    return DataPipeline(backend="torch", train=train_loader, eval=val.loader, train_samples=len(train_set),
                        eval_samples=val.num_images, train_steps=len(train_loader),
                        val_annotation_file=val.annotation_file, stats=_pipeline_stats(train_set, val.dataset),
                        train_set=train_set)


@dataclass
class EvalInput:
    """The val split as one backend reads it: ``loader`` yields this rank's shard."""

    backend: str
    loader: Iterable[DetectionBatch]
    num_images: int
    annotation_file: Path
    dataset: CocoDetection
    workdir: Path | None = None

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _dali_device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def build_eval_input(cfg, *, input_size: int, rank: int = 0, world_size: int = 1,
                     device: torch.device = torch.device("cpu"), persistent_workers: bool = False,
                     workdir: Path | None = None, eval_transform=None) -> EvalInput:
    """The val split of ``cfg.data_dir`` for ``cfg.data_backend`` (a :class:`TrainConfig`), this rank's shard.

    ``eval_transform``: the torch path's transform (default SSD's resize + normalisation); a
    preset family without DALI support must pass its own and ``cfg.data_backend`` torch.
    The DALI graph resizes as every family's evaluation transform does and normalises with
    the transform's ``mean`` / ``std`` (YOLOEvalTransform's), ImageNet's for a transform
    without them (SSDEvalTransform).

    Images without annotations are left out, as the reference does, unless
    ``cfg.eval_all_images``. Both backends evaluate the same images: those
    :func:`load_split` keeps; boxes are rescaled with the annotation's width and height.
    """
    from .dali import resolve_data_backend

    backend = resolve_data_backend(cfg.data_backend, device)
    if backend == "torch":
        transform = eval_transform or SSDEvalTransform(input_size)
        collate = collate_detection
        if type(transform) is SSDEvalTransform:
            # uint8 from the workers (through their pipe, not shared memory, which a container
            # may have little of) and to the device, a quarter of float32's bytes; evaluate()
            # normalises on the device, bit for bit the values of the float transform.
            transform = SSDEvalTransform(transform.size, normalize=False)
            collate = DetectionCollate(normalization=(tuple(transform.mean), tuple(transform.std)))
        val_set = load_split(cfg, "val2017", rank=rank, world_size=world_size, transform=transform,
                             limit=cfg.max_eval_images, skip_empty=not cfg.eval_all_images)
        loader = build_eval_loader(val_set, cfg.eval_batch_size, num_workers=cfg.num_workers, rank=rank,
                                   world_size=world_size, persistent_workers=persistent_workers,
                                   pin_memory=device.type == "cuda", collate_fn=collate)
        return EvalInput("torch", loader, len(val_set), val_set.annotation_file, val_set)

    from .dali import DaliEvalLoader

    val_set = load_split(cfg, "val2017", rank=rank, world_size=world_size, limit=cfg.max_eval_images,
                         skip_empty=not cfg.eval_all_images)
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix=f"ssd_dali_rank{rank}_")) if own_dir else workdir
    reader_ann = val_set.write_reader_annotations(workdir / "val_reader.json")
    loader = DaliEvalLoader(val_set.image_dir, reader_ann, val_set.file_names, batch_size=cfg.eval_batch_size,
                            input_size=input_size, rank=rank, world_size=world_size,
                            device_id=_dali_device_id(device), num_threads=max(1, cfg.num_workers),
                            skip_empty=not cfg.eval_all_images, fp16=device.type == "cuda" and cfg.amp != "off",
                            image_sizes=val_set.image_sizes(), **_normalisation(eval_transform))
    return EvalInput("dali", loader, len(val_set), val_set.annotation_file, val_set, workdir if own_dir else None)


def _normalisation(eval_transform) -> dict[str, Any]:
    """``mean``/``std`` of the DALI evaluation graph: the torch transform's when it has them
    (none given: the graph's default, ImageNet's)."""
    if eval_transform is None or not hasattr(eval_transform, "mean"):
        return {}
    return {"mean": tuple(eval_transform.mean), "std": tuple(eval_transform.std)}


def _build_dali(cfg, *, input_size: int, seed: int, rank: int, world_size: int, device: torch.device,
                transforms: tuple[Any, Any] | None = None, dali_graph: str = "ssd") -> DataPipeline:
    """NVIDIA DALI pipelines (data/dali.py; YOLO's training graph data/dali_yolo.py): GPU decode +
    augmentation on CUDA, CPU-only otherwise.

    The splits are indexed and checked by :func:`load_split`, exactly as for the torch
    path; DALI's COCO reader then reads a cleaned annotation file written from that index
    (:meth:`CocoDetection.write_reader_annotations`), so both backends read the same
    images with the same boxes.
    """
    if dali_graph not in ("ssd", "yolo"):
        raise ValueError(f"unknown DALI graph {dali_graph!r}; known: ssd, yolo")
    if dali_graph == "yolo" and transforms is None:
        raise ValueError("the yolo DALI graph takes its parameters from the torch path's transforms")
    train_set = load_split(cfg, "train2017", rank=rank, world_size=world_size, limit=cfg.max_train_images)
    workdir = Path(tempfile.mkdtemp(prefix=f"ssd_dali_rank{rank}_"))
    train_ann = train_set.write_reader_annotations(workdir / "train_reader.json")
    device_id = _dali_device_id(device)
    fp16 = device.type == "cuda" and cfg.amp != "off"
    if dali_graph == "yolo":
        from .dali_yolo import DaliYoloTrainLoader

        train = DaliYoloTrainLoader(train_set.image_dir, train_ann, train_set.file_names, transform=transforms[0],
                                    batch_size=cfg.batch_size, seed=seed, rank=rank, world_size=world_size,
                                    device_id=device_id, num_threads=max(1, cfg.num_workers), augment=cfg.augment,
                                    fp16=fp16)
    else:
        from ..box_coder import default_boxes
        from ..models import get_preset
        from .dali import DaliTrainLoader

        spec = get_preset(cfg.preset).box_spec
        train = DaliTrainLoader(train_set.image_dir, train_ann, train_set.file_names, batch_size=cfg.batch_size,
                                input_size=input_size, seed=seed, rank=rank, world_size=world_size,
                                device_id=device_id, num_threads=max(1, cfg.num_workers),
                                max_samples=cfg.max_samples, augment=cfg.augment,
                                default_boxes=default_boxes(spec), fp16=fp16)
    val = build_eval_input(cfg, input_size=input_size, rank=rank, world_size=world_size, device=device,
                           workdir=workdir, eval_transform=None if transforms is None else transforms[1])
    stats = _pipeline_stats(train_set, val.dataset)
    stats["dali_device"] = "gpu" if device_id is not None else "cpu"
    return DataPipeline(backend="dali", train=train, eval=val.loader, train_samples=len(train_set),
                        eval_samples=val.num_images, train_steps=len(train),
                        val_annotation_file=val.annotation_file, stats=stats, workdir=workdir, train_set=train_set)
