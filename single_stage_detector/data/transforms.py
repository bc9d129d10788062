"""SSD training and evaluation transforms (SPEC.md section 6).

All transforms take and return ``(image, boxes, labels)`` with boxes ``Tensor[N, 4]``
(x1, y1, x2, y2) normalised to [0, 1] and labels ``Tensor[N]`` int64. Pixel work is done
by Pillow's C code (crop+resize in one call, ImageEnhance for the colour jitter), never
per pixel in Python.

Randomness: every random draw goes through ``rng``, an object with numpy's
``random(size)`` and ``permutation(n)`` methods (a ``np.random.Generator`` or
``np.random.RandomState``). When none is given, numpy's global RNG is used; the training
loader (``loader.build_train_loader``) reseeds it before every sample from (seed, epoch,
sample index), so augmentation is reproducible per seed, differs between samples and
epochs, and does not depend on the worker that loads a sample.
"""
from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageStat
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SSDCropping",
    "drop_degenerate",
    "RandomHorizontalFlip",
    "ColorJitter",
    "resize",
    "to_normalized_tensor",
    "SSDTrainTransform",
    "SSDEvalTransform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Boxes narrower/shorter than this (normalised) after a crop are dropped: the box
# encoder takes log(w) and would produce -inf/huge targets.
MIN_BOX_SIZE = 1e-6


class RandomSource(Protocol):
    def random(self, size: Any = None) -> Any: ...
    def permutation(self, x: Any) -> Any: ...


def _rng(rng: RandomSource | None) -> RandomSource:
    # Resolved per call (not stored) so transforms stay picklable and follow the
    # per-worker reseeding of numpy's global RNG.
    return np.random if rng is None else rng  # type: ignore[return-value]


def drop_degenerate(boxes: Tensor, labels: Tensor, min_size: float = MIN_BOX_SIZE) -> tuple[Tensor, Tensor]:
    """Drop boxes of (near) zero width or height, and boxes without a class (label <= 0),
    so that the box encoder never sees one. Every input pipeline ends with this."""
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size) & (labels > 0)
    if bool(keep.all()):
        return boxes, labels
    return boxes[keep], labels[keep]


class SSDCropping:
    """The SSD random crop, returning the crop window and the boxes inside it.

    Repeat until a mode succeeds: choose uniformly among 7 modes (whole image, minimum
    IoU 0.1, 0.3, 0.5, 0.7, 0.9, no constraint). "Whole image" returns unchanged.
    Otherwise make up to ``max_samples`` tries: w, h ~ U(0.3, 1) of the image, rejected
    unless 0.5 <= w/h <= 2; left ~ U(0, 1 - w), top ~ U(0, 1 - h). A try is accepted when
    every ground-truth box has IoU > min_iou with the crop and at least one box centre lies
    strictly inside it. The boxes with centre inside are kept, clipped to the crop and
    renormalised to it.

    The tries of one mode are drawn and tested together (one ``[T, N]`` IoU) and the
    first acceptable one is taken, which is the same distribution as trying one by one.
    """

    MODES: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9, -math.inf)

    def __init__(self, max_samples: int = 1, rng: RandomSource | None = None) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.max_samples = int(max_samples)
        self.rng = rng

    def sample_window(self, boxes: Tensor) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Draw a crop for ``boxes`` (Tensor[N, 4] normalised xyxy).

        Returns ``(window, keep)``: ``window`` = (left, top, right, bottom) normalised
        (``None`` for the whole image) and ``keep`` = bool mask [N] of boxes whose centre
        is inside (``None`` for the whole image).
        """
        rng = _rng(self.rng)
        b = boxes.numpy().astype(np.float64, copy=False)
        area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # [N]
        cx = 0.5 * (b[:, 0] + b[:, 2])
        cy = 0.5 * (b[:, 1] + b[:, 3])
        n_modes = len(self.MODES)
        while True:
            mode = self.MODES[min(int(rng.random() * n_modes), n_modes - 1)]
            if mode is None:
                return None, None
            u = np.asarray(rng.random((self.max_samples, 4)))
            w = 0.3 + 0.7 * u[:, 0]
            h = 0.3 + 0.7 * u[:, 1]
            left = (1.0 - w) * u[:, 2]
            top = (1.0 - h) * u[:, 3]
            right, bottom = left + w, top + h
            ok = (w / h >= 0.5) & (w / h <= 2.0)  # [T]
            # IoU of every box with every candidate window: [T, N].
            iw = np.clip(np.minimum(right[:, None], b[None, :, 2]) - np.maximum(left[:, None], b[None, :, 0]), 0, None)
            ih = np.clip(np.minimum(bottom[:, None], b[None, :, 3]) - np.maximum(top[:, None], b[None, :, 1]), 0, None)
            inter = iw * ih
            iou = inter / np.maximum((w * h)[:, None] + area_b[None, :] - inter, 1e-12)
            ok &= (iou > mode).all(axis=1)
            centre_in = ((cx[None] > left[:, None]) & (cx[None] < right[:, None])
                         & (cy[None] > top[:, None]) & (cy[None] < bottom[:, None]))  # [T, N]
            ok &= centre_in.any(axis=1)
            hits = np.flatnonzero(ok)
            if hits.size:
                t = int(hits[0])
                return np.array([left[t], top[t], right[t], bottom[t]]), centre_in[t]

    def __call__(self, image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Image.Image, Tensor, Tensor]:
        """Crop a PIL image and its boxes (Tensor[N, 4] normalised xyxy, labels Tensor[N])."""
        window, keep = self.sample_window(boxes)
        if window is None:
            return image, boxes, labels
        boxes, labels = crop_boxes(boxes, labels, window, keep)
        w, h = image.size
        px = (round(window[0] * w), round(window[1] * h), round(window[2] * w), round(window[3] * h))
        return image.crop(px), boxes, labels


def crop_boxes(boxes: Tensor, labels: Tensor, window: np.ndarray, keep: np.ndarray) -> tuple[Tensor, Tensor]:
    """Keep ``boxes[keep]``, clip them to ``window`` (l, t, r, b) and express them relative to it.

    Degenerate results (w or h <= ``MIN_BOX_SIZE``) are dropped.
    """
    l, t, r, btm = (float(v) for v in window)
    keep_t = torch.from_numpy(np.ascontiguousarray(keep))
    kb, kl = boxes[keep_t], labels[keep_t]
    scale = torch.tensor([r - l, btm - t, r - l, btm - t], dtype=kb.dtype)
    offset = torch.tensor([l, t, l, t], dtype=kb.dtype)
    kb = ((kb - offset) / scale).clamp_(0.0, 1.0)
    return drop_degenerate(kb, kl)


class RandomHorizontalFlip:
    """Mirror image and boxes with probability ``p`` (x1' = 1 - x2, x2' = 1 - x1)."""

    def __init__(self, p: float = 0.5, rng: RandomSource | None = None) -> None:
        self.p = p
        self.rng = rng

    def __call__(self, image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Image.Image, Tensor, Tensor]:
        if float(_rng(self.rng).random()) >= self.p:
            return image, boxes, labels
        return hflip(image, boxes, labels)


def hflip(image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Image.Image, Tensor, Tensor]:
    """Deterministic horizontal flip of a PIL image and its normalised xyxy boxes."""
    flipped = torch.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], dim=1)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), flipped, labels


# RGB <-> YIQ, for the hue rotation of the fused colour twist.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
# ITU-R 601-2 luma, as PIL's "L" conversion (used by torchvision's saturation/contrast).
_LUMA = np.array([0.299, 0.587, 0.114])


class ColorJitter:
    """torchvision ``ColorJitter`` with an explicit RNG, on PIL RGB images.

    Factors: brightness ~ U(1 - b, 1 + b), contrast ~ U(1 - c, 1 + c), saturation
    ~ U(1 - s, 1 + s), hue ~ U(-h, h), applied in a random order.

    ``fused=False`` (default) runs torchvision's functional ops one after the other
    (uint8 clamping after each, hue shifted in HSV): exactly ``torchvision.ColorJitter``,
    about 3-6 ms for a 300x300 image, mostly the RGB<->HSV conversions.
    ``fused=True`` composes the four ops into one affine colour matrix applied in a
    single Pillow pass (~0.3 ms): brightness, saturation and contrast are the same
    linear maps (contrast pivots on the image's mean luma), hue is a rotation about
    the grey axis in YIQ space (as DALI's colour twist does) and values are clamped
    only once at the end. Same factor distributions; pixel values differ slightly.
    """

    def __init__(self, brightness: float = 0.125, contrast: float = 0.5, saturation: float = 0.5,
                 hue: float = 0.05, *, fused: bool = False, rng: RandomSource | None = None) -> None:
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.fused = fused
        self.rng = rng

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``(order Int[4], factors Float[4])``: op order (0 brightness, 1 contrast, 2 saturation,
        3 hue) and the brightness, contrast, saturation factors and the hue shift."""
        rng = _rng(self.rng)
        order = np.asarray(rng.permutation(4))
        u = np.asarray(rng.random(4), dtype=np.float64)
        lo = np.array([1.0 - self.brightness, 1.0 - self.contrast, 1.0 - self.saturation, -self.hue])
        span = 2.0 * np.array([self.brightness, self.contrast, self.saturation, self.hue])
        return order, lo + span * u

    def __call__(self, image: Image.Image) -> Image.Image:
        order, f = self.sample()
        if self.fused:
            return self._apply_fused(image, order, f)
        enabled = (self.brightness > 0, self.contrast > 0, self.saturation > 0, self.hue > 0)
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in order:
            if enabled[i]:
                image = ops[i](image, float(f[i]))
        return image

    def _apply_fused(self, image: Image.Image, order: np.ndarray, f: np.ndarray) -> Image.Image:
        # Affine maps x -> M x + o on RGB column vectors, composed in application order.
        m, o = np.eye(3), np.zeros(3)
        mean_rgb = None
        for i in order:
            if i == 0 and self.brightness > 0:
                a, b = f[0] * np.eye(3), np.zeros(3)
            elif i == 1 and self.contrast > 0:
                if mean_rgb is None:
                    mean_rgb = np.asarray(ImageStat.Stat(image).mean[:3])
                mean_luma = float(_LUMA @ (m @ mean_rgb + o))  # luma mean of the image so far
                a, b = f[1] * np.eye(3), np.full(3, (1.0 - f[1]) * mean_luma)
            elif i == 2 and self.saturation > 0:
                a, b = f[2] * np.eye(3) + (1.0 - f[2]) * np.outer(np.ones(3), _LUMA), np.zeros(3)
            elif i == 3 and self.hue > 0:
                # HSV hue grows red -> green -> blue, which is a negative rotation in the IQ plane.
                t = -2.0 * math.pi * f[3]
                c, s = math.cos(t), math.sin(t)
                rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
                a, b = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ, np.zeros(3)
            else:
                continue
            m, o = a @ m, a @ o + b
        matrix = tuple(float(v) for v in np.concatenate([m, o[:, None]], axis=1).ravel())
        return image.convert("RGB", matrix)


def resize(image: Image.Image, size: int, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Bilinear resize to ``size x size``; ``box`` (pixels, floats allowed) crops first, in the same pass."""
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


_MEAN_255 = torch.tensor(IMAGENET_MEAN).mul(255.0).view(3, 1, 1)
_INV_STD_255 = torch.tensor(IMAGENET_STD).mul(255.0).reciprocal().view(3, 1, 1)


def to_normalized_tensor(image: Image.Image) -> Tensor:
    """PIL RGB image -> ``Tensor[3, H, W]`` float32, ``(x / 255 - mean) / std`` (ImageNet), contiguous."""
    # HWC -> CHW while still uint8 (4x fewer bytes to move), then one float pass.
    chw = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
    return torch.from_numpy(chw).float().sub_(_MEAN_255).mul_(_INV_STD_255)


class SSDTrainTransform:
    """SSD training augmentation: random crop, flip p=0.5, resize to ``size``, colour jitter, normalise.

    ``(PIL image, boxes Tensor[N, 4], labels Tensor[N]) -> (Tensor[3, size, size] float32,
    boxes Tensor[M, 4], labels Tensor[M])`` with M <= N, every box inside [0, 1] with
    positive width and height. ``fused_color=True`` selects the single-pass colour twist
    (see :class:`ColorJitter`), several times faster than the exact torchvision ops.

    Leave ``rng`` as None under a DataLoader: an explicit generator would be copied into
    every worker with the same state, so all workers would draw the same augmentations.
    """

    def __init__(self, size: int, max_samples: int = 1, *, rng: RandomSource | None = None,
                 brightness: float = 0.125, contrast: float = 0.5, saturation: float = 0.5,
                 hue: float = 0.05, flip_p: float = 0.5, fused_color: bool = False) -> None:
        self.size = int(size)
        self.crop = SSDCropping(max_samples, rng=rng)
        self.flip = RandomHorizontalFlip(flip_p, rng=rng)
        self.jitter = ColorJitter(brightness, contrast, saturation, hue, fused=fused_color, rng=rng)

    def __call__(self, image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        boxes = boxes.float()
        window, keep = self.crop.sample_window(boxes)
        w, h = image.size
        if window is None:
            box = None
        else:
            boxes, labels = crop_boxes(boxes, labels, window, keep)
            # Crop and resize in one resampling pass, at sub-pixel precision, so the
            # pixels match the renormalised boxes exactly.
            box = (float(window[0] * w), float(window[1] * h), float(window[2] * w), float(window[3] * h))
        image = resize(image, self.size, box)
        image, boxes, labels = self.flip(image, boxes, labels)  # after the resize: fewer pixels
        image = self.jitter(image)
        boxes = boxes.clamp(0.0, 1.0)
        boxes, labels = drop_degenerate(boxes, labels)
        return to_normalized_tensor(image), boxes, labels.long()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, max_samples={self.crop.max_samples}, "
                f"fused_color={self.jitter.fused})")


class SSDEvalTransform:
    """Evaluation: resize to ``size x size`` (bilinear) and normalise; boxes and labels pass through."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return to_normalized_tensor(resize(image, self.size)), boxes.float().clamp(0.0, 1.0), labels.long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"
