"""NVIDIA DALI training input for the YOLO family: :class:`~.yolo_transforms.YOLOTrainTransform` as a DALI graph.

The reader, the decoder, the normalisation and the iterator plumbing are those of the
SSD graphs (:mod:`.dali`); only the augmentation differs. Per sample::

    readers.coco (this rank's files in the torch sampler's order; no shuffle, no sharding)
      -> COCO category id -> label 1..80 (lookup table)
      -> decode (nvJPEG on a GPU, libjpeg on the CPU; EXIF orientation ignored)
      -> warp_affine to S x S: the sample's forward affine (resize, zoom, translation,
         rotation, shear, horizontal flip), bilinear, grey fill        boxes: coord_transform
      -> darknet's HSV distortion (DALI arithmetic)                    of their 4 corners
      -> crop_mirror_normalize: (x / 255 - mean) / std

**The same augmentation as the torch path, sample for sample.** The torch path draws a
sample's parameters from numpy's RNG seeded with (seed, epoch, dataset index)
(:class:`~.loader.EpochBatchSampler` with ``sample_seeds``, :class:`~.loader.SeededSamples`).
This graph does not use DALI's random operators: the loader takes the epoch's order and the
per-sample seeds from that same sampler, draws each sample's parameters with the same
:meth:`YOLOTrainTransform.sample` from the same seed, turns them into the same matrix
(:func:`~.yolo_transforms.affine_matrix`) and feeds them to the graph through
``fn.external_source`` in the reader's order. So with one seed both backends see the same
batches, each image with the same flip, zoom, translation, rotation, shear and HSV
factors; what differs is resampling rounding (DALI's and Pillow's bilinear kernels agree to
one grey level) and float32 box arithmetic. Resuming inside an epoch
(``set_epoch(epoch, start_batch)``) drops the first ``start_batch`` batches from the reader's
file list instead of decoding them.

Each rank reads its own file list (the torch sampler's batches for that rank, with
``num_shards=1``) rather than a DALI shard of the whole list: DALI's contiguous shards do
not have the torch sampler's sizes, and this way each rank gets exactly the torch path's
images, the empty last batch of a short rank included.

Darknet's HSV distortion (``distort_image`` in ``src/image.c``, :func:`.yolo_transforms.distort_hsv`)
is evaluated exactly with DALI arithmetic operators: ``fn.hsv`` approximates hue and
saturation by a linear map in RGB (a rotation about the grey axis), which is not darknet's
hexcone model, and ``fn.color_space_conversion`` has no HSV space.

Boxes: the 4 corners of each box go through the sample's matrix (``fn.coord_transform``);
their enclosing box, in output pixels and unclipped, leaves the graph, and the loader
clips it and applies :func:`.yolo_transforms.warp_boxes`'s keep rule to the whole padded
batch at once (:func:`keep_warped_boxes`; DALI has no operator that drops rows).
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .batch import DetectionBatch
from .dali import _PAD_BOX, _DaliLoaderBase, _clean_boxes, _decode, _empty_batch, _mix_seed, _normalize, _reader
from .loader import EpochBatchSampler
from .transforms import drop_degenerate
from .yolo_transforms import YOLOAugmentation, YOLOTrainTransform, affine_matrix

__all__ = ["AUGMENTATION_FIELDS", "augmentation_row", "keep_warped_boxes", "DaliYoloTrainLoader"]

# The parameters of one sample as the graph receives them: the YOLOAugmentation fields
# (flip as 0/1), then the 2 x 3 forward matrix from normalised input coordinates to output pixels.
AUGMENTATION_FIELDS = tuple(f.name for f in dataclasses.fields(YOLOAugmentation))
_HSV = slice(AUGMENTATION_FIELDS.index("hue"), AUGMENTATION_FIELDS.index("exposure") + 1)
_MATRIX = slice(len(AUGMENTATION_FIELDS), len(AUGMENTATION_FIELDS) + 6)
_ROW = len(AUGMENTATION_FIELDS) + 6


def augmentation_row(aug: YOLOAugmentation, size: int) -> np.ndarray:
    """``float32[16]``: ``aug``'s fields in :data:`AUGMENTATION_FIELDS` order, then the top two
    rows of ``affine_matrix(aug, 1, 1, size)``: the forward warp from normalised input
    coordinates ([0, 1] x [0, 1] is the whole image) to output pixels. The graph gets the
    pixel matrix of an image of W x H by composing it with diag(1/W, 1/H)."""
    fields = [float(getattr(aug, name)) for name in AUGMENTATION_FIELDS]
    return np.asarray(fields + affine_matrix(aug, 1, 1, size)[:2].ravel().tolist(), dtype=np.float32)


class _AugmentationSource:
    """``fn.external_source`` callback: the parameter rows of the samples the reader delivers.

    ``seeds[k]``: the seed of the k-th file of the reader's list (the torch sampler's). The
    reader pads its last batch by repeating the last file and then starts over; position
    ``p`` of its stream is file ``min(p mod P, n - 1)`` with ``P = ceil(n / B) * B``.
    Holds no reference to the loader (the pipeline owns it).
    """

    def __init__(self, transform: YOLOTrainTransform, seeds: Sequence[int], batch_size: int) -> None:
        self._transform = copy.copy(transform)
        self._seeds = list(seeds)
        self._batch = batch_size
        self._period = math.ceil(len(self._seeds) / batch_size) * batch_size

    def row(self, k: int) -> np.ndarray:
        # As SeededSamples does before the torch path's transform draws: numpy's MT19937 seeded with seed mod 2^32.
        self._transform.rng = np.random.RandomState(self._seeds[k] % 2**32)
        return augmentation_row(self._transform.sample(), self._transform.size)

    def __call__(self, info) -> np.ndarray:
        first = info.iteration * self._batch
        last = len(self._seeds) - 1
        return np.stack([self.row(min((first + j) % self._period, last)) for j in range(self._batch)])


def _darknet_hsv(images, hue, saturation, exposure):
    """Darknet's ``distort_image`` on ``images`` (HWC RGB, [0, 255]) with per-sample scalars:
    the formula of :func:`.yolo_transforms.distort_hsv` in DALI arithmetic (float32 HWC out,
    [0, 255], not rounded). Ties of the maximum channel go to red, then green, as there."""
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    x = fn.cast(images, dtype=types.FLOAT)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    v = dmath.max(dmath.max(r, g), b)
    delta = v - dmath.min(dmath.min(r, g), b)
    is_r = fn.cast(r == v, dtype=types.FLOAT)
    is_g = fn.cast(g == v, dtype=types.FLOAT) * (1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    # Hue in sextants [0, 6) plus the shift (grey pixels, delta 0, have numerator 0).
    h6 = (is_r * (g - b) + is_g * (b - r) + is_b * (r - g)) / dmath.max(delta, 1e-6) \
        + 2.0 * is_g + 4.0 * is_b + 6.0 * hue
    h6 = h6 - 6.0 * dmath.floor(h6 * (1.0 / 6.0))
    # channel = V' - V' S' (1 - c), V' = exposure V, V' S' = exposure saturation delta.
    value, chroma = v * exposure, delta * (exposure * saturation)

    def channel(one_minus_c):
        return dmath.clamp(value - dmath.clamp(one_minus_c, 0.0, 1.0) * chroma, 0.0, 255.0)

    red = channel(2.0 - dmath.abs(h6 - 3.0))
    green = channel(dmath.abs(h6 - 2.0) - 1.0)
    blue = channel(dmath.abs(h6 - 4.0) - 1.0)
    return fn.stack(red, green, blue, axis=2, axis_name="C")


def _warp_box_corners(boxes, matrix):
    """``[N, 4]`` normalised xyxy boxes -> the enclosing boxes of their 4 mapped corners,
    ``[N, 4]`` xyxy in output pixels, unclipped (``matrix``: ``[2, 3]``, normalised -> pixels)."""
    import nvidia.dali.fn as fn

    corners = fn.cat(boxes[:, 0:2], boxes[:, 2:4], fn.stack(boxes[:, 2], boxes[:, 1], axis=1),
                     fn.stack(boxes[:, 0], boxes[:, 3], axis=1), axis=1)  # [N, 8]: 4 (x, y) points per box
    mapped = fn.coord_transform(fn.reshape(corners, rel_shape=[4, 0.25]), MT=matrix)  # [4N, 2]
    mapped = fn.reshape(mapped, shape=[-1, 4, 2])
    return fn.cat(fn.reductions.min(mapped, axes=1), fn.reductions.max(mapped, axes=1), axis=1)


def _build_yolo_train_pipeline(*, image_dir: Path, annotation_file: Path, files: Sequence[str], batch_size: int,
                               input_size: int, device_id: int | None, num_threads: int, seed: int,
                               source: _AugmentationSource | None, fp16: bool, mean: Sequence[float],
                               std: Sequence[float], fill: float):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def yolo_train_pipe():
        jpegs, boxes, labels, ids = _reader(image_dir, annotation_file, files, shard_id=0, num_shards=1,
                                            train=False, shuffle_seed=0, skip_empty=True)
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # (H, W, C) as stored
        images = _decode(jpegs, gpu)
        if source is not None:
            aug = fn.external_source(source=source, batch=True, batch_info=True, dtype=types.FLOAT, ndim=1)
            to_pixels = fn.reshape(aug[_MATRIX], shape=[2, 3])  # normalised input -> output pixels
            width = fn.cast(shape[1], dtype=types.FLOAT)
            height = fn.cast(shape[0], dtype=types.FLOAT)
            # Pixel matrix of this image: first input pixels -> normalised, then the sample's warp.
            matrix = fn.transforms.combine(fn.transforms.scale(scale=fn.stack(1.0 / width, 1.0 / height)),
                                           to_pixels)
            images = fn.warp_affine(images, matrix=matrix, size=[input_size, input_size], fill_value=fill,
                                    inverse_map=False, interp_type=types.INTERP_LINEAR, dtype=types.UINT8)
            hue, saturation, exposure = (aug[i] for i in range(_HSV.start, _HSV.stop))
            if gpu:
                hue, saturation, exposure = hue.gpu(), saturation.gpu(), exposure.gpu()
            images = _darknet_hsv(images, hue, saturation, exposure)
            boxes = _warp_box_corners(boxes, to_pixels)
        else:  # no augmentation: the evaluation transform's resize (antialiased bilinear)
            images = fn.resize(images, resize_x=input_size, resize_y=input_size,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            aug = fn.constant(fdata=[0.0] * _ROW, shape=[_ROW])
        images = _normalize(images, gpu=gpu, mirror=None, dtype=types.FLOAT16 if fp16 else types.FLOAT,
                            mean=mean, std=std)
        return (images, fn.pad(boxes, fill_value=_PAD_BOX, axes=(0,)), fn.pad(labels, fill_value=0, axes=(0,)),
                labels.shape(), ids, shape, aug)

    return yolo_train_pipe()


def keep_warped_boxes(boxes: Tensor, labels: Tensor, counts: Tensor, size: int, *, min_box_side: float,
                      min_area_ratio: float) -> tuple[Tensor, Tensor]:
    """Clip warped boxes to the output and apply :func:`.yolo_transforms.warp_boxes`'s keep rule, whole batch at once.

    ``boxes``: ``Tensor[B, N, 4]`` enclosing boxes of the mapped corners, xyxy in output
    pixels, unclipped, padded; ``labels``: ``Tensor[B, N]``; ``counts``: ``Tensor[B]`` real
    rows per image. Kept: real rows with label > 0 whose clipped sides are both >=
    ``min_box_side`` pixels and whose clipped area is >= ``min_area_ratio`` x the unclipped
    area. Returns ``(Tensor[B, N, 4] clipped boxes normalised to [0, 1] of the output,
    Tensor[B, N] bool keep mask)``.
    """
    lo, hi = boxes[..., :2], boxes[..., 2:]
    area = (hi - lo).prod(dim=-1)
    lo_c, hi_c = lo.clamp(0.0, size), hi.clamp(0.0, size)
    side = hi_c - lo_c
    real = torch.arange(boxes.shape[1], device=boxes.device) < counts.reshape(-1, 1)
    keep = real & (labels > 0) & (side >= min_box_side).all(dim=-1) & (side.prod(dim=-1) >= min_area_ratio * area)
    return (torch.cat([lo_c, hi_c], dim=-1) / size).clamp_(0.0, 1.0), keep


class DaliYoloTrainLoader(_DaliLoaderBase):
    """YOLO training batches from a DALI pipeline: the torch path's batches and augmentation, ``len(self)`` per epoch.

    Args:
        image_dir, annotation_file: the split and the cleaned annotation file the reader reads
            (:meth:`~.coco.CocoDetection.write_reader_annotations`).
        files: image file names in dataset order (the index's ``file_names``); a file's
            position is the dataset index its augmentation seed is drawn from.
        transform: the torch path's :class:`~.yolo_transforms.YOLOTrainTransform` (its
            ``size``, parameter distributions, fill, keep rule and normalisation are used).
        batch_size: images per batch on this rank.
        seed: the run seed (the torch loader's): epoch order and per-sample seeds from (seed, epoch, index).
        rank, world_size: this rank's share of each global batch, as the torch sampler gives it.
        device_id: CUDA device for the GPU graph; ``None`` runs everything on the CPU.
        num_threads: DALI CPU threads.
        augment: False: the evaluation transform's resize + normalisation only (as the torch
            path trains with ``--no-augment``).
        fp16: images as float16 (GPU graph under mixed precision); else float32.

    Batches are :class:`~.batch.DetectionBatch` with raw boxes (``Tensor[N_i, 4]`` xyxy
    normalised to the ``size x size`` input, labels 1..80); ``encoded`` is None (YOLO
    assigns its targets in the forward pass).

    Raises:
        ValueError: a bad rank/world size, no files, or a fill that is not one grey level
            (``fn.warp_affine`` fills every channel with one value).
    """

    _extra_outputs = ("aug",)  # the parameter rows, after the base's outputs

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, files: Sequence[str], *,
                 transform: YOLOTrainTransform, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 device_id: int | None = None, num_threads: int = 2, augment: bool = True,
                 fp16: bool = False) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not files:
            raise ValueError("DALI YOLO train pipeline: no images")
        if len(set(transform.fill)) != 1:
            raise ValueError(f"DALI YOLO train pipeline: fill must be one grey level, got {transform.fill}")
        self._files = list(files)
        self.transform = transform
        self.size = transform.size
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.augment = augment
        self.steps = math.ceil(len(files) / (batch_size * world_size))  # the torch sampler's count
        self._args = dict(image_dir=Path(image_dir), annotation_file=Path(annotation_file), batch_size=batch_size,
                          input_size=transform.size, device_id=device_id, num_threads=max(1, num_threads),
                          fp16=fp16, mean=transform.mean, std=transform.std, fill=float(transform.fill[0]))
        self.device_id = device_id
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        self._last_augmentation: Tensor | None = None
        self._epoch, self._fresh = 1, True
        self._build(1, 0)

    def _build(self, epoch: int, start_batch: int) -> None:
        """The pipeline of ``epoch`` from its batch ``start_batch``: this rank's files in the
        torch sampler's order, the first ``start_batch`` batches left out."""
        sampler = EpochBatchSampler(len(self._files), self.batch_size, seed=self.seed, rank=self.rank,
                                    world_size=self.world_size, sample_seeds=True)
        sampler.set_epoch(epoch, start_batch)
        order = [index for batch in sampler for index in batch]
        self._steps_left = self.steps - start_batch
        self.close()
        self._it, self._pipe, self._in_epoch = None, None, False
        if not order:  # this rank's part of the epoch is empty batches only
            return
        source = _AugmentationSource(self.transform, [i.seed for i in order], self.batch_size) \
            if self.augment else None
        pipe = _build_yolo_train_pipeline(files=[self._files[int(i)] for i in order], source=source,
                                          seed=_pipeline_seed(self.seed, epoch, self.rank), **self._args)
        super().__init__(pipe, last_batch_policy="partial", device_id=self.device_id)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Prepare epoch ``epoch`` (1-based) from its ``start_batch``-th batch (0-based): the
        torch sampler's batches of that epoch and their augmentation, the first
        ``start_batch`` batches never read."""
        if epoch < 1 or not 0 <= start_batch <= self.steps:
            raise ValueError(f"need epoch >= 1 and 0 <= start_batch <= {self.steps}, got {epoch}, {start_batch}")
        if not (epoch == 1 and start_batch == 0 and self._fresh):
            self._in_epoch = False  # the old pipeline is dropped: no need to drain it
            self._build(epoch, start_batch)
        self._fresh = False
        self._epoch = epoch

    def _finish_epoch(self) -> None:
        if self._it is None:
            self._in_epoch = False
            return
        super()._finish_epoch()

    def __iter__(self) -> Iterator[DetectionBatch]:
        self._finish_epoch()  # a previous iteration that stopped early
        self._fresh = False
        self._in_epoch = self._it is not None
        exhausted = self._it is None
        for _ in range(self._steps_left):
            if not exhausted:
                try:
                    data = next(self._it)[0]
                except StopIteration:
                    exhausted = True
            if exhausted:
                # This rank's share of the last global batch is empty (as in the torch sampler).
                yield _empty_batch(self.device)
                continue
            yield self._to_batch(data)
        if exhausted and self._it is not None:
            self._it.reset()
            self._in_epoch = False
        self._finish_epoch()

    @property
    def last_augmentation(self) -> dict[str, Tensor]:
        """The last batch's parameters on the CPU, for statistics: one ``Tensor[B]`` per
        :class:`~.yolo_transforms.YOLOAugmentation` field (``flip`` bool), and ``matrix``
        ``Tensor[B, 2, 3]`` (normalised input -> output pixels). Empty before the first batch
        and without augmentation."""
        if self._last_augmentation is None or not self.augment:
            return {}
        rows = self._last_augmentation.reshape(-1, _ROW).cpu()
        out = {name: rows[:, i] for i, name in enumerate(AUGMENTATION_FIELDS)}
        out["flip"] = out["flip"] > 0.5
        out["matrix"] = rows[:, _MATRIX].reshape(-1, 2, 3)
        return out

    def _to_batch(self, data: dict[str, Tensor]) -> DetectionBatch:
        images = data["images"]
        if self.device_id is not None:  # NHWC from the GPU graph -> [B, 3, S, S] channels_last view
            images = images.permute(0, 3, 1, 2)
        ids = data["ids"].reshape(-1).cpu().long()
        counts = data["counts"].reshape(-1).cpu().long()
        labels_pad = data["labels"].cpu().long()  # [B, Nmax]
        boxes_pad = data["boxes"].cpu().float()  # [B, Nmax, 4]
        if self.augment:
            boxes_pad, keep = keep_warped_boxes(boxes_pad, labels_pad, counts, self.size,
                                                min_box_side=self.transform.min_box_side,
                                                min_area_ratio=self.transform.min_area_ratio)
            boxes, labels = [], []
            for b, lb, kp in zip(boxes_pad, labels_pad, keep):  # per image (a boolean row mask each)
                b, lb = drop_degenerate(b[kp], lb[kp])
                boxes.append(b)
                labels.append(lb)
        else:
            pairs = [_clean_boxes(b[:n], lb[:n]) for b, lb, n in zip(boxes_pad, labels_pad, counts.tolist())]
            boxes, labels = [p[0] for p in pairs], [p[1] for p in pairs]
        self._last_augmentation = data["aug"]
        hw = data["shape"].reshape(-1, 3)[:, :2].cpu().long()
        return DetectionBatch(images=images, boxes=boxes, labels=labels, image_ids=ids, orig_sizes=hw,
                              valid=torch.ones(len(ids), dtype=torch.bool))


def _pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    """DALI's own seed (nothing in the YOLO graph draws from it; set for determinism all the same)."""
    return _mix_seed(seed, epoch, rank, 0xA06)
