"""YOLO anchor constants (the published sets) and their units.

YOLOv3 anchors are **pixels of the network input** (darknet ``yolov3.cfg``): they are not
rescaled when the input size changes (a 116x90 anchor is 116/416 of the width at 416 and
116/608 at 608). Each of the three output scales uses three of the nine anchors, chosen by
its ``mask`` (stride 32: 6, 7, 8; stride 16: 3, 4, 5; stride 8: 0, 1, 2).
Source: arXiv:1804.02767 section 2.3 and darknet ``cfg/yolov3.cfg`` ([yolo] ``anchors``, ``mask``).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["YOLOV3_COCO_ANCHORS_PX", "YOLOV3_MASKS", "YOLOV3_STRIDES", "anchors_tensor"]

YOLOV3_COCO_ANCHORS_PX: tuple[tuple[float, float], ...] = (
    (10, 13), (16, 30), (33, 23),
    (30, 61), (62, 45), (59, 119),
    (116, 90), (156, 198), (373, 326),
)
"""The 9 COCO anchors (width, height) in pixels of the network input, smallest first."""

YOLOV3_MASKS: tuple[tuple[int, ...], ...] = ((6, 7, 8), (3, 4, 5), (0, 1, 2))
"""Anchor indices per output scale, in the network's output order (strides 32, 16, 8)."""

YOLOV3_STRIDES: tuple[int, ...] = (32, 16, 8)
"""Stride (input pixels per grid cell) of each output scale, in output order."""


def anchors_tensor(anchors: tuple[tuple[float, float], ...] = YOLOV3_COCO_ANCHORS_PX) -> Tensor:
    """``Tensor[A, 2]`` float32 (width, height) of ``anchors``, in their own units."""
    return torch.tensor(anchors, dtype=torch.float32).reshape(-1, 2)
