"""NVIDIA DALI input pipeline: the SSD training and evaluation inputs of SPEC.md section 6.

(The YOLO family's training graph, :mod:`.dali_yolo`, shares this module's reader, decoder,
normalisation and loader base; the evaluation graph serves every family, normalising with
the family's mean/std.)

On a GPU the JPEGs are decoded with nvJPEG (``device="mixed"``, fused with the random
crop by ``decoders.image_slice``) and every image operation runs on the GPU; without
one the same graph runs on the CPU (``device_id=None``), which is how CI exercises it.

Training graph, per sample::

    readers.coco (ltrb, ratio, skip_empty, sharded, reshuffled every epoch)
      -> COCO category id -> label 1..80 (lookup table)
      -> random_bbox_crop (SSD modes)   -> decode of the crop window
      -> resize to S x S -> hsv (hue, saturation) -> brightness_contrast
      -> crop_mirror_normalize (flip with p=0.5, ImageNet mean/std)   + bb_flip of the boxes

Evaluation graph: reader (no shuffle, sharded, padded last batch) -> decode -> resize ->
normalise (ImageNet mean/std unless the family's are given), plus the image id and the
original image size.

Ground truth leaves the pipeline as padded ``[B, Nmax, 4]`` / ``[B, Nmax]`` tensors plus
per-sample counts; :class:`DaliTrainLoader` cuts them into per-image tensors, clips them
to [0, 1], drops boxes the crop made degenerate (as the torch path does after its crop)
and encodes them with :class:`~single_stage_detector.box_coder.BoxCoder` on the
pipeline's device. DALI's own ``fn.box_encoder`` is not used by default: it breaks ties
of the forced matching differently from the reference rule (see docs/DALI.md and
tests/test_dali.py); it can be selected with ``box_encoder="dali"``.

One dataset, one answer: the reader does not read the user's annotation file but the
cleaned one that :meth:`~single_stage_detector.data.coco.CocoDetection.write_reader_annotations`
writes from the torch path's index (the same images, the same clipped and filtered boxes,
already normalised), and gets the list of image files that index kept (``images=``), so
counts, sharding and subsets (``--max-train-images``) agree. Decoders ignore EXIF
orientation (``adjust_orientation=False``), as Pillow and the reference do: COCO's boxes
refer to the stored pixels. Evaluation rescales boxes with the annotation's width and
height (``image_sizes``), never with a decoded shape.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .batch import DetectionBatch
from .coco import COCO_CATEGORY_IDS
from .loader import mix_seed
from .threads import single_thread_on_cpu
from .transforms import IMAGENET_MEAN, IMAGENET_STD, drop_degenerate

__all__ = [
    "dali_available",
    "dali_import_error",
    "resolve_data_backend",
    "DaliTrainLoader",
    "DaliEvalLoader",
    "SSD_CROP_THRESHOLDS",
    "color_jitter_ranges",
]

# SSD random crop: minimum IoU of every box with the window; 0 = "no constraint".
# allow_no_crop=True adds the "whole image" outcome, so 7 equally likely modes as in
# transforms.SSDCropping.
SSD_CROP_THRESHOLDS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
_READER = "Reader"
_PAD_BOX = -1.0  # value of padded box rows (only the counts say which rows are real)


def dali_import_error() -> str | None:
    """``None`` when ``nvidia.dali`` imports, else the reason (for error messages)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401  (the iterator lives there)
    except Exception as e:  # ImportError, or a CUDA/driver mismatch raised at import
        return f"{type(e).__name__}: {e}"
    return None


def dali_available() -> bool:
    """True when NVIDIA DALI (and its PyTorch plugin) can be imported."""
    return dali_import_error() is None


def resolve_data_backend(name: str, device: torch.device) -> str:
    """``"torch"`` or ``"dali"`` for the configured ``--data-backend`` (``auto``: DALI on a GPU run when installed)."""
    if name == "auto":
        return "dali" if device.type == "cuda" and dali_available() else "torch"
    if name == "dali":
        err = dali_import_error()
        if err is not None:
            from ..config import ConfigError  # a bad flag for this machine: one error line, exit 2

            raise ConfigError(
                "--data-backend dali: NVIDIA DALI is not importable "
                f"({err}); install it with `pip install -e .[dali]` (nvidia-dali-cuda130, the CUDA "
                "flavour must match the torch build) or use --data-backend torch")
    return name


def color_jitter_ranges(brightness: float = 0.125, contrast: float = 0.5, saturation: float = 0.5,
                        hue: float = 0.05) -> dict[str, tuple[float, float]]:
    """DALI parameter ranges for the reference jitter magnitudes (torchvision ColorJitter semantics).

    brightness/contrast/saturation factors ~ U(1 - m, 1 + m); torchvision's hue shift
    ``h`` is a fraction of the colour circle, DALI's ``hsv(hue=)`` is in degrees: ``360 * h``.
    """
    return {
        "brightness": (1.0 - brightness, 1.0 + brightness),
        "contrast": (1.0 - contrast, 1.0 + contrast),
        "saturation": (1.0 - saturation, 1.0 + saturation),
        "hue_degrees": (-360.0 * hue, 360.0 * hue),
    }


def _mix_seed(*parts: int) -> int:
    """A 31-bit seed from ``parts`` (DALI seeds are int32): the low bits of the DataLoader's seed mix."""
    return mix_seed(*parts) & 0x7FFFFFFF


def _label_table() -> tuple[list[int], list[int]]:
    return list(COCO_CATEGORY_IDS), list(range(1, len(COCO_CATEGORY_IDS) + 1))


# --------------------------------------------------------------------------------------
# Pipeline graphs
# --------------------------------------------------------------------------------------


def _reader(image_dir: Path, annotation_file: Path, files: Sequence[str], *, shard_id: int, num_shards: int,
            train: bool, shuffle_seed: int, skip_empty: bool):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    kwargs: dict[str, Any] = {}
    if train:
        # A full permutation of the dataset after every epoch (same seed on every rank, so
        # the shards stay disjoint); `files` itself is pre-shuffled for the first epoch.
        kwargs.update(shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed)
    else:
        kwargs.update(random_shuffle=False, stick_to_shard=True)
    jpegs, boxes, cats, ids = fn.readers.coco(
        name=_READER,
        file_root=str(image_dir),
        annotations_file=str(annotation_file),
        images=list(files),
        ltrb=True,
        ratio=True,
        skip_empty=skip_empty,
        image_ids=True,
        include_iscrowd=True,  # the cleaned file already holds exactly the boxes to train on
        avoid_class_remapping=True,  # raw COCO ids; mapped to 1..80 below as the torch path does
        size_threshold=1e-12,  # the cleaned file has no degenerate box; keep every one it lists
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,  # epoch boundaries stay aligned with batches: nothing leaks into the next epoch
        prefetch_queue_depth=2,
        **kwargs,
    )
    keys, values = _label_table()
    labels = fn.lookup_table(cats, keys=keys, values=values, default_value=0, dtype=types.INT32)
    return jpegs, boxes, labels, ids


# EXIF orientation is ignored (boxes refer to the stored pixels, as Pillow reads them).
_DECODE_ARGS = {"adjust_orientation": False}


def _decode(jpegs, gpu: bool):
    """Whole-image decode to RGB; on the GPU with libjpeg's chroma upsampling, as Pillow and the CPU decoder."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if gpu:
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=True,
                                 **_DECODE_ARGS)
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, **_DECODE_ARGS)


def _normalize(images, *, gpu: bool, mirror, dtype, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD):
    """``(x / 255 - mean) / std`` of [0, 255] images (``mean``, ``std``: fractions of 255, per R, G, B)."""
    import nvidia.dali.fn as fn

    return fn.crop_mirror_normalize(
        images,
        device="gpu" if gpu else "cpu",
        dtype=dtype,
        output_layout="HWC" if gpu else "CHW",  # NHWC = channels_last on the GPU
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
        mirror=mirror if mirror is not None else 0,
    )


def _build_train_pipeline(*, image_dir: Path, annotation_file: Path, files: Sequence[str], batch_size: int,
                          input_size: int, shard_id: int, num_shards: int, device_id: int | None, num_threads: int,
                          seed: int, shuffle_seed: int, max_samples: int, augment: bool, fp16: bool,
                          dali_anchors: list[float] | None):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None
    out_dtype = types.FLOAT16 if fp16 else types.FLOAT

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def train_pipe():
        jpegs, boxes, labels, ids = _reader(image_dir, annotation_file, files, shard_id=shard_id,
                                            num_shards=num_shards, train=True, shuffle_seed=shuffle_seed,
                                            skip_empty=True)
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)  # (H, W, C) as stored
        flip = None
        window = fn.constant(fdata=[0.0, 0.0, 1.0, 1.0])  # (x, y, w, h) of the crop, relative
        if augment:
            anchor, crop, boxes, labels = fn.random_bbox_crop(
                boxes, labels,
                device="cpu",
                aspect_ratio=[0.5, 2.0],
                thresholds=list(SSD_CROP_THRESHOLDS),
                scaling=[0.3, 1.0],
                bbox_layout="xyXY",
                allow_no_crop=True,
                num_attempts=max_samples,
            )
            window = fn.cat(anchor, crop)
            if gpu:
                images = fn.decoders.image_slice(jpegs, anchor, crop, device="mixed", output_type=types.RGB,
                                                 normalized_anchor=True, normalized_shape=True,
                                                 **_DECODE_ARGS, jpeg_fancy_upsampling=True)
                images = fn.resize(images, resize_x=input_size, resize_y=input_size,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
            else:
                # Crop and resize in one pass at sub-pixel precision (like the torch path).
                images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB, **_DECODE_ARGS)
                # resize's region of interest follows the tensor's (H, W) order; the crop
                # window is (x, y), so swap: (y, x) start and (y, x) end.
                start_yx = fn.stack(anchor[1], anchor[0])
                end_yx = fn.stack(anchor[1] + crop[1], anchor[0] + crop[0])
                images = fn.resize(images, resize_x=input_size, resize_y=input_size,
                                   roi_start=start_yx, roi_end=end_yx, roi_relative=True,
                                   interp_type=types.INTERP_LINEAR, antialias=True)
            flip = fn.random.coin_flip(probability=0.5)
            boxes = fn.bb_flip(boxes, ltrb=True, horizontal=flip)
            ranges = color_jitter_ranges()
            images = fn.hsv(images,
                            hue=fn.random.uniform(range=list(ranges["hue_degrees"])),
                            saturation=fn.random.uniform(range=list(ranges["saturation"])),
                            dtype=types.UINT8)
            # torchvision pivots contrast on the image's mean grey level, not mid-range.
            grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
            mean_grey = fn.reductions.mean(grey)
            if gpu:
                mean_grey = mean_grey.cpu() if hasattr(mean_grey, "cpu") else mean_grey
            images = fn.brightness_contrast(images,
                                            brightness=fn.random.uniform(range=list(ranges["brightness"])),
                                            contrast=fn.random.uniform(range=list(ranges["contrast"])),
                                            contrast_center=mean_grey, dtype=types.UINT8)
        else:
            images = _decode(jpegs, gpu)
            images = fn.resize(images, resize_x=input_size, resize_y=input_size,
                               interp_type=types.INTERP_LINEAR, antialias=True)
        images = _normalize(images, gpu=gpu, mirror=flip, dtype=out_dtype)
        outputs = [images, fn.pad(boxes, fill_value=_PAD_BOX, axes=(0,)),
                   fn.pad(labels, fill_value=0, axes=(0,)), labels.shape(), ids, shape, window,
                   flip if flip is not None else fn.constant(idata=0)]
        if dali_anchors is not None:
            enc_boxes, enc_labels = (boxes.gpu(), labels.gpu()) if gpu else (boxes, labels)
            loc, enc = fn.box_encoder(enc_boxes, enc_labels, anchors=dali_anchors, criteria=0.5, offset=True,
                                      scale=1.0, stds=[0.1, 0.1, 0.2, 0.2])
            outputs += [loc, enc]
        return tuple(outputs)

    return train_pipe()


def _build_eval_pipeline(*, image_dir: Path, annotation_file: Path, files: Sequence[str], batch_size: int,
                         input_size: int, shard_id: int, num_shards: int, device_id: int | None, num_threads: int,
                         skip_empty: bool, fp16: bool, mean: Sequence[float] = IMAGENET_MEAN,
                         std: Sequence[float] = IMAGENET_STD):
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                  prefetch_queue_depth=2, exec_dynamic=True)
    def eval_pipe():
        jpegs, boxes, labels, ids = _reader(image_dir, annotation_file, files, shard_id=shard_id,
                                            num_shards=num_shards, train=False, shuffle_seed=0,
                                            skip_empty=skip_empty)
        shape = fn.peek_image_shape(jpegs, adjust_orientation=False)
        images = _decode(jpegs, gpu)
        images = fn.resize(images, resize_x=input_size, resize_y=input_size,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        images = _normalize(images, gpu=gpu, mirror=None, dtype=types.FLOAT16 if fp16 else types.FLOAT,
                            mean=mean, std=std)
        return (images, fn.pad(boxes, fill_value=_PAD_BOX, axes=(0,)), fn.pad(labels, fill_value=0, axes=(0,)),
                labels.shape(), ids, shape)

    return eval_pipe()


_OUTPUT_NAMES = ["images", "boxes", "labels", "counts", "ids", "shape"]


# --------------------------------------------------------------------------------------
# Iterators producing DetectionBatch
# --------------------------------------------------------------------------------------


def _clean_boxes(boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Clip to [0, 1] and drop boxes of (near) zero width or height, and unknown labels."""
    return drop_degenerate(boxes.clamp(0.0, 1.0), labels)


class _DaliLoaderBase:
    """Owns one DALI pipeline and its ``DALIGenericIterator``; yields :class:`DetectionBatch`."""

    def __init__(self, pipe, *, last_batch_policy: str, device_id: int | None) -> None:
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._pipe = pipe
        self.device_id = device_id
        self.device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
        names = list(_OUTPUT_NAMES) + list(getattr(self, "_extra_outputs", ()))
        policy = {"drop": LastBatchPolicy.DROP, "partial": LastBatchPolicy.PARTIAL}[last_batch_policy]
        self._it = DALIGenericIterator([pipe], names, reader_name=_READER, last_batch_policy=policy,
                                       auto_reset=False, prepare_first_batch=False)
        self._in_epoch = False  # batches of the current reader epoch were taken but the epoch is not finished

    def _finish_epoch(self) -> None:
        """Drain what is left of the reader's epoch and reset, so the next epoch starts at its boundary."""
        if self._in_epoch:
            # next() until StopIteration: `for _ in iterator` would call iter(), which resets a
            # DROP iterator that is one batch from the end and so silently skips a whole epoch.
            while True:
                try:
                    next(self._it)
                except StopIteration:
                    break
            self._it.reset()
            self._in_epoch = False

    def _unpack(self, data: dict[str, Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor, Tensor]:
        images = data["images"]
        if self.device_id is not None:  # NHWC from the GPU graph -> [B, 3, S, S] channels_last view
            images = images.permute(0, 3, 1, 2)
        counts = data["counts"].reshape(-1).tolist()
        boxes_pad = data["boxes"].cpu().float()
        labels_pad = data["labels"].cpu().long()
        boxes, labels = [], []
        for i, n in enumerate(counts):
            b, lb = _clean_boxes(boxes_pad[i, :n].reshape(-1, 4), labels_pad[i, :n].reshape(-1))
            boxes.append(b)
            labels.append(lb)
        ids = data["ids"].reshape(-1).cpu().long()
        hw = data["shape"].reshape(-1, 3)[:, :2].cpu().long()
        return images, boxes, labels, ids, hw

    def close(self) -> None:
        """Stop the pipeline's threads and free its memory (also done when garbage-collected)."""
        it, self._it = getattr(self, "_it", None), None
        pipe, self._pipe = getattr(self, "_pipe", None), None
        del it
        if pipe is not None:
            del pipe

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class DaliTrainLoader(_DaliLoaderBase):
    """Training batches from a DALI pipeline: a fixed ``len(self)`` batches per epoch on every rank.

    Args:
        image_dir, annotation_file: the COCO split (as :func:`~single_stage_detector.data.coco.find_coco_split`).
        files: image file names to read (those the torch path keeps), one epoch's sample set.
        batch_size: images per batch on this rank.
        input_size: S of the S x S network input.
        seed: run seed; the reader's shuffle seed is shared by all ranks, augmentation seeds differ per rank.
        rank, world_size: shard ``rank`` of ``world_size``.
        device_id: CUDA device for the GPU graph; ``None`` runs everything on the CPU.
        num_threads: DALI CPU threads.
        max_samples: random-crop attempts per mode (1 or 50).
        augment: False: resize + normalise only (no crop, flip or colour).
        default_boxes: ``Tensor[A, 4]`` (cx, cy, w, h); when given, batches carry ``encoded`` targets.
        box_encoder: ``"boxcoder"`` (reference matching, default) or ``"dali"`` (``fn.box_encoder``).
        fp16: images as float16 (GPU graph under mixed precision); else float32.

    Epochs: epoch 1 reads the pipeline built here; :meth:`set_epoch` builds a new
    pipeline for every later epoch, its file order and augmentation seeds derived from
    (seed, epoch) only. So epoch k is the same whether the run got there epoch by epoch or
    was resumed from a checkpoint (the DALI reader's own reshuffling state cannot be saved
    or restored). ``set_epoch(k, start_batch=b)`` then reads and drops the first ``b``
    batches, which restores a position inside an epoch exactly (at the cost of decoding
    them once more).
    """

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, files: Sequence[str], *, batch_size: int,
                 input_size: int, seed: int, rank: int = 0, world_size: int = 1, device_id: int | None = None,
                 num_threads: int = 2, max_samples: int = 1, augment: bool = True,
                 default_boxes: Tensor | None = None, box_encoder: str = "boxcoder", fp16: bool = False) -> None:
        if box_encoder not in ("boxcoder", "dali"):
            raise ValueError(f"box_encoder must be 'boxcoder' or 'dali', got {box_encoder!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not files:
            raise ValueError("DALI train pipeline: no images")
        # Every image once per epoch, the last partial batch kept: the same number of steps
        # as the torch path's EpochBatchSampler, ceil(n / (batch x ranks)), on every rank.
        self.steps = math.ceil(len(files) / (batch_size * world_size))
        self._args = dict(image_dir=Path(image_dir), annotation_file=Path(annotation_file), batch_size=batch_size,
                          input_size=input_size, shard_id=rank, num_shards=world_size, device_id=device_id,
                          num_threads=max(1, num_threads), max_samples=max_samples, augment=augment, fp16=fp16)
        self._files = list(files)
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.augment = augment
        self._dali_encode = default_boxes is not None and box_encoder == "dali"
        self._extra_outputs = ["crop", "flip"] + (["enc_loc", "enc_labels"] if self._dali_encode else [])
        self._last_augmentation: tuple[Tensor, Tensor] | None = None
        self._coder = None
        if default_boxes is not None:
            from ..box_coder import BoxCoder

            self._coder = BoxCoder(default_boxes.float()).to(
                torch.device("cuda", device_id) if device_id is not None else "cpu")
        self._epoch = 0  # last epoch started (1-based); 0 = none yet
        self._skip = 0  # batches to read and drop at the start of the next iteration (resume)
        self._fresh = True  # the pipeline has not been read since it was built (for epoch 1)
        self._build(epoch_seed=None)

    def _build(self, epoch_seed: int | None) -> None:
        base = (self.seed,) if epoch_seed is None else (self.seed, epoch_seed)
        rng = np.random.default_rng(_mix_seed(*base, 0x5F1))
        files = [self._files[i] for i in rng.permutation(len(self._files))]  # first epoch's order
        anchors = None
        if self._dali_encode:
            from ..box_coder import cxcywh_to_xyxy

            anchors = cxcywh_to_xyxy(self._coder.default_boxes.cpu()).flatten().tolist()
        pipe = _build_train_pipeline(files=files, seed=_mix_seed(*base, self.rank, 0xA06),
                                     shuffle_seed=_mix_seed(*base, 0x5A1), dali_anchors=anchors, **self._args)
        self.close()
        super().__init__(pipe, last_batch_policy="partial", device_id=self._args["device_id"])

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Prepare epoch ``epoch`` (1-based) from its ``start_batch``-th batch: a pipeline seeded
        from (seed, epoch), the one built at construction for epoch 1 if still unread."""
        if epoch < 1 or not 0 <= start_batch <= self.steps:
            raise ValueError(f"need epoch >= 1 and 0 <= start_batch <= {self.steps}, got {epoch}, {start_batch}")
        if not (epoch == 1 and self._fresh):
            self._in_epoch = False  # the old pipeline is dropped: no need to drain it
            self._build(epoch_seed=None if epoch == 1 else epoch)
        self._fresh = False
        self._epoch, self._skip = epoch, start_batch

    def __iter__(self) -> Iterator[DetectionBatch]:
        self._finish_epoch()  # a previous iteration that stopped early
        self._fresh = False
        self._in_epoch = True
        exhausted = False
        skip, self._skip = self._skip, 0
        for i in range(self.steps):
            if not exhausted:
                try:
                    data = next(self._it)[0]
                except StopIteration:
                    exhausted = True
            if i < skip:
                continue  # read and dropped: the batches a resumed run already trained on
            if exhausted:
                # This rank's shard is one image shorter than the largest and ran out one step
                # early: an empty batch keeps it in step (as the torch sampler does).
                yield _empty_batch(self.device)
                continue
            yield self._to_batch(data)
        if exhausted:
            self._it.reset()
            self._in_epoch = False
        self._finish_epoch()

    @property
    def last_augmentation(self) -> dict[str, Tensor]:
        """Crop windows (``Tensor[B, 4]``) and flips (``Tensor[B]`` bool) of the last batch, on the
        CPU, for statistics; copied only when read (not in every training step)."""
        if self._last_augmentation is None:
            return {}
        crop, flip = self._last_augmentation
        return {"crop": crop.reshape(-1, 4).cpu(), "flip": flip.reshape(-1).cpu().bool()}

    def _to_batch(self, data: dict[str, Tensor]) -> DetectionBatch:
        images, boxes, labels, ids, hw = self._unpack(data)
        self._last_augmentation = (data["crop"], data["flip"])
        encoded = None
        if self._dali_encode:
            encoded = (data["enc_loc"], data["enc_labels"].long())
        elif self._coder is not None:
            # One host-to-device copy for the whole batch's boxes and one for its labels (not
            # two per image: each small blocking copy is a stream synchronisation).
            dev = self._coder.default_boxes.device
            counts = [int(b.shape[0]) for b in boxes]
            dev_boxes = list(torch.cat(boxes).to(dev, non_blocking=True).split(counts)) if boxes else []
            dev_labels = list(torch.cat(labels).to(dev, non_blocking=True).split(counts)) if labels else []
            with single_thread_on_cpu(dev):  # DALI's threads keep the cores busy meanwhile
                encoded = self._coder.encode(dev_boxes, dev_labels)
        return DetectionBatch(images=images, boxes=boxes, labels=labels, image_ids=ids, orig_sizes=hw,
                              valid=torch.ones(len(ids), dtype=torch.bool), encoded=encoded)


def _empty_batch(device: torch.device) -> DetectionBatch:
    return DetectionBatch(images=torch.zeros(0, 3, 0, 0, device=device), boxes=[], labels=[],
                          image_ids=torch.zeros(0, dtype=torch.int64), orig_sizes=torch.zeros(0, 2, dtype=torch.int64),
                          valid=torch.zeros(0, dtype=torch.bool))


class DaliEvalLoader(_DaliLoaderBase):
    """Evaluation batches: shard ``rank`` of ``world_size``, every image exactly once over all ranks.

    The reader pads each shard's last batch by repeating its last image; the iterator's
    PARTIAL policy cuts the padding off, and ``valid`` marks the images that count
    (all True after that cut; kept as the contract for padded batches). ``orig_sizes``
    come from ``image_sizes`` (image id -> annotation (height, width)) when given, else
    from the file header. ``mean``, ``std``: the normalisation ``(x / 255 - mean) / std``
    of the preset family (default ImageNet's, SSD's; YOLO: 0 and 1, plain x / 255).
    """

    def __init__(self, image_dir: str | Path, annotation_file: str | Path, files: Sequence[str], *, batch_size: int,
                 input_size: int, rank: int = 0, world_size: int = 1, device_id: int | None = None,
                 num_threads: int = 2, skip_empty: bool = True, fp16: bool = False,
                 image_sizes: dict[int, tuple[int, int]] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if not files:
            raise ValueError("DALI eval pipeline: no images")
        self.num_images = len(files)
        pipe = _build_eval_pipeline(image_dir=Path(image_dir), annotation_file=Path(annotation_file), files=files,
                                    batch_size=batch_size, input_size=input_size, shard_id=rank,
                                    num_shards=world_size, device_id=device_id, num_threads=max(1, num_threads),
                                    skip_empty=skip_empty, fp16=fp16, mean=mean, std=std)
        self.shard_size = _shard_size(len(files), rank, world_size)
        self.batch_size = batch_size
        # (height, width) per image id from the annotation file: the geometry boxes are rescaled with.
        self.image_sizes = dict(image_sizes) if image_sizes is not None else None
        super().__init__(pipe, last_batch_policy="partial", device_id=device_id)

    def __len__(self) -> int:
        return math.ceil(self.shard_size / self.batch_size)

    def __iter__(self) -> Iterator[DetectionBatch]:
        self._finish_epoch()
        self._in_epoch = True
        while True:
            try:
                out = next(self._it)
            except StopIteration:
                break
            images, boxes, labels, ids, hw = self._unpack(out[0])
            if self.image_sizes is not None:
                hw = torch.tensor([self.image_sizes[i] for i in ids.tolist()], dtype=torch.int64).reshape(-1, 2)
            yield DetectionBatch(images=images, boxes=boxes, labels=labels, image_ids=ids, orig_sizes=hw,
                                 valid=torch.ones(len(ids), dtype=torch.bool))
        self._it.reset()
        self._in_epoch = False


def _shard_size(n: int, shard_id: int, num_shards: int) -> int:
    """Samples of shard ``shard_id`` under DALI's contiguous split (``floor(n * k / W)`` boundaries)."""
    return n * (shard_id + 1) // num_shards - n * shard_id // num_shards
