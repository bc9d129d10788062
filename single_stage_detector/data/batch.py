"""The one batch interface every data backend (PyTorch DataLoader, DALI) produces."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..distributed import to_device_async


@dataclass
class DetectionBatch:
    """A batch of images and their ground truth.

    Attributes:
        images (Tensor[B, 3, H, W]): normalised float images (may be channels-last in memory),
            or uint8 RGB (0..255) still to be normalised when ``normalization`` is set.
        boxes (list[Tensor[N_i, 4]]): ground truth (x1, y1, x2, y2), normalised to [0, 1]
            in the coordinates of the (possibly cropped / flipped) network input.
        labels (list[Tensor[N_i]]): contiguous class labels 1..80 (int64).
        image_ids (Tensor[B]): COCO image ids (int64).
        orig_sizes (Tensor[B, 2]): original (height, width) of each image, for rescaling.
        valid (Tensor[B]): False for padding samples (so a sharded eval sees each image once).
        skipped (int): samples the loader dropped while building this batch (corrupt files).
        encoded (tuple[Tensor[B, A, 4], Tensor[B, A]] | None): regression targets and per-default-box
            labels when the pipeline already encoded them (the DALI graph, or the torch path's
            loader workers for SSD presets); None otherwise.
        normalization (tuple[mean, std] | None): set when ``images`` are uint8: the per-channel
            mean and std (of x / 255) that :meth:`to` applies on the target device
            (``transforms.normalize_images``); None when ``images`` are already normalised.
    """

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    image_ids: Tensor
    orig_sizes: Tensor
    valid: Tensor
    skipped: int = 0
    encoded: Optional[tuple[Tensor, Tensor]] = None
    normalization: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None

    def targets(self) -> dict:
        """Training targets in the detector's format (see ``detector.Targets``)."""
        if self.encoded is not None:
            return {"loc": self.encoded[0], "labels": self.encoded[1]}
        return {"boxes": self.boxes, "labels": self.labels}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def ground_truth_on(self, device: torch.device | str,
                        non_blocking: bool = True) -> tuple[list[Tensor], list[Tensor]]:
        """``(boxes, labels)`` on ``device``: one transfer per kind (concatenated, then split per image)."""
        if not self.boxes:
            return [], []
        counts = [int(b.shape[0]) for b in self.boxes]
        if non_blocking:  # pinned first on CUDA: a copy from pageable memory may wait for the stream
            boxes, labels = (to_device_async(torch.cat(t), device) for t in (self.boxes, self.labels))
        else:
            boxes, labels = (torch.cat(t).to(device) for t in (self.boxes, self.labels))
        return list(boxes.split(counts)), list(labels.split(counts))

    def to(self, device: torch.device | str, non_blocking: bool = True,
           memory_format: torch.memory_format = torch.contiguous_format) -> "DetectionBatch":
        """Move images and targets to ``device`` (:meth:`ground_truth_on`).

        uint8 images (``normalization`` set) travel as uint8 and are normalised on ``device``;
        the returned batch holds float images and ``normalization`` None.
        """
        boxes, labels = self.ground_truth_on(device, non_blocking)
        images = self.images.to(device, non_blocking=non_blocking, memory_format=memory_format)
        if self.normalization is not None:
            from .transforms import normalize_images

            images = normalize_images(images, *self.normalization)
        return DetectionBatch(
            images=images,
            boxes=boxes,
            labels=labels,
            image_ids=self.image_ids,
            orig_sizes=self.orig_sizes,
            valid=self.valid,
            skipped=self.skipped,
            encoded=None if self.encoded is None else tuple(
                t.to(device, non_blocking=non_blocking) for t in self.encoded),
        )

    def __reduce__(self):
        # Between processes (loader workers -> training process). torch sends every tensor
        # storage as a shared-memory file: the sender creates and fills it, the receiver fetches
        # its descriptor in a round trip and maps it, page by page. Measured on 2 CPU cores (a
        # virtual machine): about 0.5 ms per file, 20 files per batch of 8 with per-image boxes
        # and labels, and 2.7 ms per MB in the worker, where the pipe moves bytes for a fraction
        # of that. So the small tensors always travel as bytes inside the message (boxes and
        # labels concatenated and split again on arrival; ids, sizes, flags), and so does a
        # batch of uint8 images with its encoded targets (3.9 MB for 8 images of 300x300: 200
        # images/s at 2 workers against 180 through shared memory). Float images (YOLO's) keep
        # shared memory.
        small = [*self.boxes, *self.labels, self.image_ids, self.orig_sizes, self.valid]
        large = [self.images, *(self.encoded or ())]
        if any(t.device.type != "cpu" for t in small + large):  # not a loader's batch: plain fields
            return DetectionBatch, (self.images, self.boxes, self.labels, self.image_ids, self.orig_sizes, self.valid,
                                    self.skipped, self.encoded, self.normalization)
        counts = [int(b.shape[0]) for b in self.boxes]
        boxes = (torch.cat(self.boxes) if self.boxes else torch.zeros(0, 4)).numpy()
        labels = (torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.int64)).numpy()
        images, encoded = self.images, self.encoded
        if images.dtype == torch.uint8:
            images = images.numpy()
            encoded = None if encoded is None else tuple(t.numpy() for t in encoded)
        return _rebuild_batch, (images, boxes, labels, counts, self.image_ids.numpy(), self.orig_sizes.numpy(),
                                self.valid.numpy(), self.skipped, encoded, self.normalization)

    def pin_memory(self) -> "DetectionBatch":
        # Called by torch's DataLoader when pin_memory=True.
        self.images = self.images.pin_memory()
        if self.encoded is not None:
            self.encoded = (self.encoded[0].pin_memory(), self.encoded[1].pin_memory())
        return self


def _rebuild_batch(images, boxes, labels, counts: list[int], image_ids, orig_sizes, valid, skipped: int,
                   encoded, normalization) -> DetectionBatch:
    """The batch :meth:`DetectionBatch.__reduce__` took apart (numpy arrays back to tensors, no copy)."""
    def tensor(x):
        return x if isinstance(x, Tensor) else torch.from_numpy(x)

    return DetectionBatch(images=tensor(images), boxes=list(torch.from_numpy(boxes).split(counts)),
                          labels=list(torch.from_numpy(labels).split(counts)), image_ids=torch.from_numpy(image_ids),
                          orig_sizes=torch.from_numpy(orig_sizes), valid=torch.from_numpy(valid), skipped=skipped,
                          encoded=None if encoded is None else (tensor(encoded[0]), tensor(encoded[1])),
                          normalization=normalization)
