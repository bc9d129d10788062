"""The one batch interface every data backend (PyTorch DataLoader, DALI) produces."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class DetectionBatch:
    """A batch of images and their ground truth.

    Attributes:
        images (Tensor[B, 3, H, W]): normalised float images (may be channels-last in memory).
        boxes (list[Tensor[N_i, 4]]): ground truth (x1, y1, x2, y2), normalised to [0, 1]
            in the coordinates of the (possibly cropped / flipped) network input.
        labels (list[Tensor[N_i]]): contiguous class labels 1..80 (int64).
        image_ids (Tensor[B]): COCO image ids (int64).
        orig_sizes (Tensor[B, 2]): original (height, width) of each image, for rescaling.
        valid (Tensor[B]): False for padding samples (so a sharded eval sees each image once).
        skipped (int): samples the loader dropped while building this batch (corrupt files).
        encoded (tuple[Tensor[B, A, 4], Tensor[B, A]] | None): regression targets and per-default-box
            labels when the pipeline already encoded them (DALI's box encoder); None otherwise.
    """

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    image_ids: Tensor
    orig_sizes: Tensor
    valid: Tensor
    skipped: int = 0
    encoded: Optional[tuple[Tensor, Tensor]] = None

    def targets(self) -> dict:
        """Training targets in the detector's format (see ``detector.Targets``)."""
        if self.encoded is not None:
            return {"loc": self.encoded[0], "labels": self.encoded[1]}
        return {"boxes": self.boxes, "labels": self.labels}

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = True,
           memory_format: torch.memory_format = torch.contiguous_format) -> "DetectionBatch":
        """Move images and targets to ``device`` (targets in one transfer each, then split)."""
        counts = [int(b.shape[0]) for b in self.boxes]
        boxes = list(torch.cat(self.boxes).to(device, non_blocking=non_blocking).split(counts)) if self.boxes else []
        labels = list(torch.cat(self.labels).to(device, non_blocking=non_blocking).split(counts)) if self.labels else []
        return DetectionBatch(
            images=self.images.to(device, non_blocking=non_blocking, memory_format=memory_format),
            boxes=boxes,
            labels=labels,
            image_ids=self.image_ids,
            orig_sizes=self.orig_sizes,
            valid=self.valid,
            skipped=self.skipped,
            encoded=None if self.encoded is None else tuple(
                t.to(device, non_blocking=non_blocking) for t in self.encoded),
        )

    def pin_memory(self) -> "DetectionBatch":
        # Called by torch's DataLoader when pin_memory=True.
        self.images = self.images.pin_memory()
        return self
