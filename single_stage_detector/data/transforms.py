"""SSD training and evaluation transforms (SPEC.md section 6).

All transforms take and return ``(image, boxes, labels)`` with boxes ``Tensor[N, 4]``
(x1, y1, x2, y2) normalised to [0, 1] and labels ``Tensor[N]`` int64. Pixel work is done
by Pillow's C code (crop+resize in one call, ImageEnhance for the colour jitter) or, on the
fast path of ``SSDTrainTransform(fused_color=True)``, by torch operations on uint8 tensors,
never per pixel in Python.

Randomness: every random draw goes through ``rng``, an object with numpy's
``random(size)`` and ``permutation(n)`` methods (a ``np.random.Generator`` or
``np.random.RandomState``). When none is given, numpy's global RNG is used; the training
loader (``loader.build_train_loader``) reseeds it before every sample from (seed, epoch,
sample index), so augmentation is reproducible per seed, differs between samples and
epochs, and does not depend on the worker that loads a sample.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageStat
from torch import Tensor

from .threads import single_thread_on_cpu

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SSDCropping",
    "drop_degenerate",
    "RandomHorizontalFlip",
    "hflip_boxes",
    "ColorJitter",
    "resize",
    "to_normalized_tensor",
    "to_uint8_tensor",
    "normalize_images",
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
    if boxes.device.type != "cpu" or labels.device.type != "cpu":
        keep = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size) & (labels > 0)
        return (boxes, labels) if bool(keep.all()) else (boxes[keep], labels[keep])
    # On the CPU in numpy (the same float arithmetic): a few small tensors per sample, where
    # torch's per-operation overhead is several times numpy's.
    b, lab = boxes.numpy(), labels.numpy()
    keep = ((b[:, 2] - b[:, 0]) > min_size) & ((b[:, 3] - b[:, 1]) > min_size) & (lab > 0)
    if keep.all():
        return boxes, labels
    keep_t = torch.from_numpy(keep)
    return boxes[keep_t], labels[keep_t]


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
        x1, y1, x2, y2 = boxes.numpy().astype(np.float64, copy=False).T  # each [N]
        area_b = (x2 - x1) * (y2 - y1)
        cx = 0.5 * (x1 + x2)
        cy = 0.5 * (y1 + y2)
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
            ratio = w / h
            ok = (ratio >= 0.5) & (ratio <= 2.0)  # [T]
            if not ok.any():  # the tests below cannot accept a try of this mode
                continue
            lt, tp, rt, bt = left[:, None], top[:, None], right[:, None], bottom[:, None]  # [T, 1]
            centre_in = (cx > lt) & (cx < rt) & (cy > tp) & (cy < bt)  # [T, N]
            ok &= centre_in.any(axis=1)
            if mode > -math.inf and ok.any():  # "no constraint" accepts every IoU
                # IoU of every box with every candidate window: [T, N].
                iw = np.maximum(np.minimum(rt, x2) - np.maximum(lt, x1), 0.0)
                ih = np.maximum(np.minimum(bt, y2) - np.maximum(tp, y1), 0.0)
                inter = iw * ih
                iou = inter / np.maximum((w * h)[:, None] + area_b - inter, 1e-12)
                ok &= (iou > mode).all(axis=1)
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
    # In numpy (CPU tensors; the same float arithmetic as in torch, without its per-operation overhead).
    kb, kl = boxes.numpy()[keep], labels.numpy()[keep]
    scale = np.array([r - l, btm - t, r - l, btm - t], dtype=kb.dtype)
    offset = np.array([l, t, l, t], dtype=kb.dtype)
    kb = np.clip((kb - offset) / scale, 0.0, 1.0)
    return drop_degenerate(torch.from_numpy(kb), torch.from_numpy(kl))


class RandomHorizontalFlip:
    """Mirror image and boxes with probability ``p`` (x1' = 1 - x2, x2' = 1 - x1)."""

    def __init__(self, p: float = 0.5, rng: RandomSource | None = None) -> None:
        self.p = p
        self.rng = rng

    def draw(self) -> bool:
        """Whether to flip (one draw from the RNG)."""
        return float(_rng(self.rng).random()) < self.p

    def __call__(self, image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Image.Image, Tensor, Tensor]:
        if not self.draw():
            return image, boxes, labels
        return hflip(image, boxes, labels)


def hflip_boxes(boxes: Tensor) -> Tensor:
    """Normalised xyxy boxes of the mirrored image: (1 - x2, y1, 1 - x1, y2)."""
    if boxes.device.type != "cpu":
        return torch.stack([1.0 - boxes[:, 2], boxes[:, 1], 1.0 - boxes[:, 0], boxes[:, 3]], dim=1)
    out = boxes.numpy()[:, [2, 1, 0, 3]]  # a copy
    out[:, 0::2] = 1.0 - out[:, 0::2]
    return torch.from_numpy(out)


def hflip(image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Image.Image, Tensor, Tensor]:
    """Deterministic horizontal flip of a PIL image and its normalised xyxy boxes."""
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), hflip_boxes(boxes), labels


# RGB <-> YIQ, for the hue rotation of the fused colour twist.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)
# ITU-R 601-2 luma, as PIL's "L" conversion (used by torchvision's saturation/contrast).
_LUMA = np.array([0.299, 0.587, 0.114])
_LUMA_ROWS = np.outer(np.ones(3), _LUMA)  # x -> luma(x) in every channel
_EYE3, _ZERO3 = np.eye(3), np.zeros(3)


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
    :meth:`apply_tensor` applies the same twist to a uint8 tensor.
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
        matrix = self._fused_matrix(order, f, lambda: np.asarray(ImageStat.Stat(image).mean[:3]))
        return image.convert("RGB", tuple(float(v) for v in matrix.ravel()))

    def apply_tensor(self, image: Tensor) -> Tensor:
        """The fused colour twist (``fused=True``) of a uint8 RGB ``Tensor[3, H, W]``, drawing its
        factors as ``__call__`` does, with ``__call__``'s matrix and rounding.

        Pillow's ``convert("RGB", matrix)`` (``src/libImaging/Matrix.c``) computes every output
        channel in float32 as ``m0 r + m1 g + m2 b + m3``, adds 0.5, clamps to [0, 255] and
        truncates. Here the sums are one float32 matrix product over all pixels (about 0.8 ms
        less per 300x300 image than Pillow's order of operations written out plane by plane),
        so a value can round the other way: measured, 4 values in a million differ from
        Pillow's, by one grey level. ValueError for ``fused=False`` (torchvision's ops take
        PIL images).
        """
        if not self.fused:
            raise ValueError("ColorJitter.apply_tensor is the fused colour twist (fused=True); torchvision's "
                             "colour jitter takes PIL images")
        order, f = self.sample()
        plane = image.reshape(3, -1)
        # Per-channel mean as ImageStat's (exact integer sums; int32 holds 255 x 8.4 million pixels).
        matrix = self._fused_matrix(order, f, lambda: np.array(plane.sum(dim=1, dtype=torch.int32).tolist())
                                    / plane.shape[1])
        m = torch.from_numpy(matrix.astype(np.float32))  # Pillow's matrix is float32 too
        # M x + (o + 0.5) in one matrix product over all pixels.
        out = torch.addmm((m[:, 3] + 0.5)[:, None], m[:, :3], image.reshape(3, -1).float())
        # Clamp, then truncate (values are >= 0): numpy's cast, several times faster here than torch's
        # float -> uint8.
        return torch.from_numpy(out.clamp_(0.0, 255.0).numpy().astype(np.uint8)).view(image.shape)

    def _fused_matrix(self, order: np.ndarray, f: np.ndarray, mean_rgb_of_image) -> np.ndarray:
        """The four ops as one affine map ``[3, 4]`` (x -> M x + o on RGB column vectors, composed in
        application order); ``mean_rgb_of_image()`` gives the input's per-channel mean (contrast)."""
        m, o = _EYE3, _ZERO3
        mean_rgb = None
        for i in order:
            if i == 0 and self.brightness > 0:
                a, b = f[0] * _EYE3, _ZERO3
            elif i == 1 and self.contrast > 0:
                if mean_rgb is None:
                    mean_rgb = mean_rgb_of_image()
                mean_luma = float(_LUMA @ (m @ mean_rgb + o))  # luma mean of the image so far
                a, b = f[1] * _EYE3, np.full(3, (1.0 - f[1]) * mean_luma)
            elif i == 2 and self.saturation > 0:
                a, b = f[2] * _EYE3 + (1.0 - f[2]) * _LUMA_ROWS, _ZERO3
            elif i == 3 and self.hue > 0:
                # HSV hue grows red -> green -> blue, which is a negative rotation in the IQ plane.
                t = -2.0 * math.pi * f[3]
                c, s = math.cos(t), math.sin(t)
                rot = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
                a, b = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ, _ZERO3
            else:
                continue
            m, o = a @ m, a @ o + b
        return np.concatenate([m, o[:, None]], axis=1)


def resize(image: Image.Image, size: int, box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """Bilinear resize to ``size x size``; ``box`` (pixels, floats allowed) crops first, in the same pass."""
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box)


@functools.lru_cache(maxsize=16)
def _normalization_constants(mean: tuple[float, ...], std: tuple[float, ...],
                             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``(255 mean, 1 / (255 std))`` as float32 ``Tensor[3, 1, 1]`` on ``device``; made once per
    device (a copy to a GPU every batch would make the host wait for the stream). Read-only."""
    return (torch.tensor(mean).mul(255.0).view(3, 1, 1).to(device),
            torch.tensor(std).mul(255.0).reciprocal().view(3, 1, 1).to(device))


_MEAN_255, _INV_STD_255 = _normalization_constants(IMAGENET_MEAN, IMAGENET_STD)


def to_uint8_tensor(image: Image.Image) -> Tensor:
    """PIL RGB image -> ``Tensor[3, H, W]`` uint8 (0..255), contiguous."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def to_normalized_tensor(image: Image.Image) -> Tensor:
    """PIL RGB image -> ``Tensor[3, H, W]`` float32, ``(x / 255 - mean) / std`` (ImageNet), contiguous."""
    # HWC -> CHW while still uint8 (4x fewer bytes to move), then one float pass.
    return to_uint8_tensor(image).float().sub_(_MEAN_255).mul_(_INV_STD_255)


def normalize_images(images: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                     std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """uint8 RGB images ``Tensor[..., 3, H, W]`` (0..255) -> float32 ``(x / 255 - mean) / std``.

    Runs on the images' device and keeps their memory format. For ImageNet's ``mean`` and
    ``std`` (the defaults) the values are bit for bit those of :func:`to_normalized_tensor`
    (the same float32 subtraction and multiplication per element), so a pipeline may send
    uint8 images (4x fewer bytes between processes and to the device) and normalise the
    batch where it trains. ValueError for images that are not uint8 with 3 channels.

    On the CPU it runs on one intra-op thread (:func:`.threads.single_thread_on_cpu`): it is
    called in the training process while the loader workers keep the cores busy.
    """
    if images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(f"normalize_images: expected uint8 images [..., 3, H, W], got {images.dtype} "
                         f"{tuple(images.shape)}")
    mean_255, inv_std_255 = _normalization_constants(tuple(mean), tuple(std), images.device)
    with single_thread_on_cpu(images.device):
        return images.float().sub_(mean_255).mul_(inv_std_255)


class SSDTrainTransform:
    """SSD training augmentation: random crop, flip p=0.5, resize to ``size``, colour jitter, normalise.

    ``(PIL image, boxes Tensor[N, 4], labels Tensor[N]) -> (Tensor[3, size, size] float32,
    boxes Tensor[M, 4], labels Tensor[M])`` with M <= N, every box inside [0, 1] with
    positive width and height.

    Two pixel paths, with the same random draws in the same order (crop window, flip, colour
    order and factors), so one seed gives the same crops, flips and factors in both:

    * default (``fused_color=False``), the reference's operations on a PIL image: crop and
      bilinear resize in one Pillow pass at sub-pixel precision, torchvision's colour jitter.
    * ``fused_color=True``, the fast path (:attr:`tensor_input`: the dataset hands over the
      decoded uint8 ``Tensor[3, H, W]``; a PIL image is converted): the crop window is taken
      at whole pixels (nearest pixel edges; the boxes are renormalised to that window, so
      pixels and boxes stay consistent), cropped and resized by torch's antialiased bilinear
      interpolation of uint8 images (Pillow's filter; pixels within one grey level of
      Pillow's inside the image, a few levels at the crop border, where Pillow reads the
      pixels outside the window and torch does not), flipped, and the colour twist of
      :class:`ColorJitter` applied as one affine colour matrix (:meth:`ColorJitter.apply_tensor`).
      About 6 ms per 300x300 image from a 640x480 photograph, decode included, where the
      default takes about 13 on one core (README, "Input pipeline on real photographs").

    ``normalize=False`` returns the image as uint8 RGB ``Tensor[3, size, size]`` instead, the
    same pixels before the ImageNet normalisation (``mean``, ``std``), which
    :func:`normalize_images` then applies to the whole batch with the same values, bit for
    bit: the training loader does so, sending a quarter of the bytes between processes.

    Leave ``rng`` as None under a DataLoader: an explicit generator would be copied into
    every worker with the same state, so all workers would draw the same augmentations.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, size: int, max_samples: int = 1, *, rng: RandomSource | None = None,
                 brightness: float = 0.125, contrast: float = 0.5, saturation: float = 0.5,
                 hue: float = 0.05, flip_p: float = 0.5, fused_color: bool = False, normalize: bool = True) -> None:
        self.size = int(size)
        self.crop = SSDCropping(max_samples, rng=rng)
        self.flip = RandomHorizontalFlip(flip_p, rng=rng)
        self.jitter = ColorJitter(brightness, contrast, saturation, hue, fused=fused_color, rng=rng)
        self.normalize = normalize

    @property
    def tensor_input(self) -> bool:
        """True for the fast path: it takes the decoded uint8 ``Tensor[3, H, W]`` (see ``CocoDetection``)."""
        return self.jitter.fused

    def __call__(self, image: Image.Image | Tensor, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        boxes = boxes.float()
        window, keep = self.crop.sample_window(boxes)
        if self.jitter.fused:
            return self._tensor_path(image, boxes, labels, window, keep)
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
        return (to_normalized_tensor(image) if self.normalize else to_uint8_tensor(image)), boxes, labels.long()

    def _tensor_path(self, image: Image.Image | Tensor, boxes: Tensor, labels: Tensor, window: np.ndarray | None,
                     keep: np.ndarray | None) -> tuple[Tensor, Tensor, Tensor]:
        if isinstance(image, Image.Image):
            image = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if window is not None:
            x0, y0 = round(window[0] * w), round(window[1] * h)
            x1, y1 = max(round(window[2] * w), x0 + 1), max(round(window[3] * h), y0 + 1)  # at least one pixel
            boxes, labels = crop_boxes(boxes, labels, np.array([x0 / w, y0 / h, x1 / w, y1 / h]), keep)
            image = image[:, y0:y1, x0:x1]
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        if self.flip.draw():
            image, boxes = image.flip(-1), hflip_boxes(boxes)
        image = self.jitter.apply_tensor(image)
        boxes, labels = drop_degenerate(boxes.clamp(0.0, 1.0), labels)
        return (normalize_images(image, self.mean, self.std) if self.normalize else image), boxes, labels.long()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, max_samples={self.crop.max_samples}, "
                f"fused_color={self.jitter.fused}, normalize={self.normalize})")


class SSDEvalTransform:
    """Evaluation: resize to ``size x size`` (bilinear) and normalise; boxes and labels pass through.

    ``normalize=False`` returns the uint8 RGB ``Tensor[3, size, size]`` before the ImageNet
    normalisation (``mean``, ``std``), which :func:`normalize_images` applies to the batch on
    the evaluation device, bit for bit the same values. The torch evaluation loader sends
    these (``build_eval_input``): a quarter of the bytes from the workers and to the GPU.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, size: int, normalize: bool = True) -> None:
        self.size = int(size)
        self.normalize = normalize

    def __call__(self, image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        image = resize(image, self.size)
        image = to_normalized_tensor(image) if self.normalize else to_uint8_tensor(image)
        return image, boxes.float().clamp(0.0, 1.0), labels.long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, normalize={self.normalize})"
