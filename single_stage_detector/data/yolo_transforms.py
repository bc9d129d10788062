"""YOLO training and evaluation transforms for the torch data path.

Same interface as the SSD transforms (:mod:`.transforms`): ``(PIL image, boxes
Tensor[N, 4], labels Tensor[N]) -> (Tensor[3, size, size] float32, boxes Tensor[M, 4],
labels Tensor[M] int64)``, boxes (x1, y1, x2, y2) normalised to [0, 1] of the image
they belong to (the input image before, the network input after).

Training augmentation (:class:`YOLOTrainTransform`), after darknet's detection loader:

* geometry: ONE affine warp from the original image to the ``size x size`` output,
  composed of the stretch resize, a random zoom, translation, rotation and shear about
  the output centre, and the horizontal flip; applied with a single bilinear resampling
  pass (``PIL.Image.transform``), the area outside the source filled with grey 127
  (darknet fills with 0.5, ``fill_image(sized, .5)`` in ``src/data.c``). Boxes go through
  the same matrix (4 corners -> enclosing box), are clipped to the output and filtered
  (see :func:`warp_boxes`).
* colour: darknet's HSV distortion (``random_distort_image`` / ``distort_image`` in
  ``src/image.c``), vectorised with numpy over the whole output image
  (:func:`distort_hsv`).

Randomness follows the SSD transforms' convention: every draw goes through ``rng``, an
object with numpy's ``random(size)`` method; ``None`` means numpy's global RNG, which the
training loader (``loader.SeededSamples``) reseeds before every sample from (seed, epoch,
sample index). A call draws a fixed number of values (:data:`NUM_DRAWS`) whatever the
options, so a sample's augmentation depends on its seed only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .transforms import RandomSource, drop_degenerate

__all__ = [
    "YOLOAugmentation",
    "NUM_DRAWS",
    "rand_scale",
    "distort_hsv",
    "affine_matrix",
    "warp_boxes",
    "YOLOTrainTransform",
    "YOLOEvalTransform",
]

# Uniform draws per sample: flip, rotation, zoom, shear x/y, translate x/y, hue,
# saturation (value, inverse coin), exposure (value, inverse coin).
NUM_DRAWS = 12

# Darknet's fill of the area outside the placed image: 0.5 grey (src/data.c, fill_image(sized, .5)).
FILL_GREY = 127


@dataclass(frozen=True)
class YOLOAugmentation:
    """One sample's augmentation parameters.

    flip: mirror the output horizontally. degrees: rotation (degrees, counter-clockwise
    on screen). zoom: isotropic scale factor (> 1 enlarges objects). shear_x, shear_y:
    shear angles (degrees). translate_x, translate_y: shift of the image content as a
    fraction of the output side. hue: shift as a fraction of the hue circle.
    saturation, exposure: factors on HSV's S and V.
    """

    flip: bool = False
    degrees: float = 0.0
    zoom: float = 1.0
    shear_x: float = 0.0
    shear_y: float = 0.0
    translate_x: float = 0.0
    translate_y: float = 0.0
    hue: float = 0.0
    saturation: float = 1.0
    exposure: float = 1.0


def rand_scale(s: float, u_value: float, u_coin: float) -> float:
    """Darknet's ``rand_scale(s)`` (``src/utils.c``) from two uniform [0, 1) draws: a factor
    f ~ U(1, s), returned as f with probability 0.5 (``u_coin < 0.5``), else 1 / f. So the
    factor lies in [1/s, s] and is as likely to darken/desaturate as to brighten/saturate."""
    f = 1.0 + (s - 1.0) * u_value
    return f if u_coin < 0.5 else 1.0 / f


def distort_hsv(chw: np.ndarray, hue: float, saturation: float, exposure: float) -> np.ndarray:
    """Darknet's ``distort_image`` (``src/image.c``) on a whole RGB image, vectorised.

    ``chw``: ``[3, H, W]`` RGB, uint8 or float, values in [0, 255]. In HSV (H a fraction of
    the circle, S = (max - min) / max, V = max): H' = (H + hue) mod 1, S' = saturation x S,
    V' = exposure x V; back to RGB and clipped to [0, 255] (darknet: ``constrain_image``).
    As in darknet S' is not clipped before the conversion back (S' > 1 pushes the smallest
    channels below 0, which the final clip removes).

    Returns ``[3, H, W]`` float32 in [0, 255] (not rounded: darknet keeps float pixels).
    Cost: ~25 elementwise passes over the image, about 2-3 ms at 416 x 416.
    """
    # Every step writes into one workspace allocated once (fresh multi-megabyte
    # temporaries cost more, in page faults, than the arithmetic), and the branches of the
    # conversion are arithmetic on 0/1 masks (masked ufuncs, where=, are ~20x slower).
    height, width = chw.shape[1:]
    work = np.empty((10, height, width), dtype=np.float32)
    x = work[:3]  # the image, then the output
    v, delta, h6, t, u, is_r, is_g = work[3:]
    np.copyto(x, chw)
    r, g, b = x[0], x[1], x[2]
    np.max(x, axis=0, out=v)
    np.min(x, axis=0, out=delta)
    np.subtract(v, delta, out=delta)
    # Hue in sextants [0, 6) plus the shift. The maximum channel picks the 120-degree
    # sector (ties go to red, then green, as in darknet's rgb_to_hsv):
    #   red: (g - b) / delta, green: 2 + (b - r) / delta, blue: 4 + (r - g) / delta.
    np.equal(r, v, out=is_r)
    np.equal(g, v, out=is_g)
    np.multiply(is_g, is_r, out=t)
    is_g -= t
    np.subtract(r, g, out=h6)  # the blue sector's numerator ...
    np.subtract(g, b, out=t)  # ... replaced by the red one where red is the maximum
    t -= h6
    t *= is_r
    np.subtract(b, r, out=u)  # ... and by the green one where green is
    u -= h6
    u *= is_g
    h6 += t
    h6 += u
    np.maximum(delta, np.float32(1e-6), out=t)  # grey pixels (delta 0) have numerator 0
    h6 /= t
    h6 += np.float32(4.0 + 6.0 * hue)
    is_g *= np.float32(2.0)
    is_r *= np.float32(4.0)
    h6 -= is_g
    h6 -= is_r
    # Wrap into [0, 6) (h6 was in [-1 - 3, 5 + 3)); a value that rounds to 6.0 is harmless,
    # the colour formula below is continuous there.
    np.multiply(h6, np.float32(1.0 / 6.0), out=t)
    np.floor(t, out=t)
    t *= np.float32(6.0)
    h6 -= t
    # RGB from HSV: channel = V' - V' S' (1 - c) with c the fully saturated colour of the hue,
    # c_R = clip(|h6 - 3| - 1, 0, 1), c_G = clip(2 - |h6 - 2|, 0, 1), c_B = clip(2 - |h6 - 4|, 0, 1);
    # V' = exposure x V and V' S' = exposure x saturation x delta (no division by V).
    v *= np.float32(exposure)
    delta *= np.float32(exposure * saturation)
    for channel, centre in enumerate((3.0, 2.0, 4.0)):  # the R, G, B planes
        np.subtract(h6, np.float32(centre), out=t)
        np.abs(t, out=t)
        if channel == 0:  # 1 - c_R = 2 - |h6 - 3|
            np.subtract(np.float32(2.0), t, out=t)
        else:  # 1 - c_G, 1 - c_B = |h6 - centre| - 1
            t -= np.float32(1.0)
        np.clip(t, np.float32(0.0), np.float32(1.0), out=t)
        t *= delta
        np.subtract(v, t, out=x[channel])
    return np.clip(x, np.float32(0.0), np.float32(255.0), out=x)


def affine_matrix(aug: YOLOAugmentation, width: int, height: int, size: int) -> np.ndarray:
    """The forward warp, ``[3, 3]`` float64, from input pixel coordinates to output pixel
    coordinates (continuous: pixel i spans [i, i + 1), so (0, 0)-(width, height) is the
    whole image). Composition, applied right to left: stretch resize to ``size x size``,
    move the centre to the origin, zoom, rotate, shear, move back and translate, flip."""
    half = 0.5 * size
    resize = np.diag([size / width, size / height, 1.0])
    centre = np.array([[1.0, 0.0, -half], [0.0, 1.0, -half], [0.0, 0.0, 1.0]])
    a = math.radians(aug.degrees)
    # Image y points down, so this rotation turns the content counter-clockwise on screen.
    rotate = np.array([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    shear = np.array([[1.0, math.tan(math.radians(aug.shear_x)), 0.0],
                      [math.tan(math.radians(aug.shear_y)), 1.0, 0.0], [0.0, 0.0, 1.0]])
    zoom = np.diag([aug.zoom, aug.zoom, 1.0])
    back = np.array([[1.0, 0.0, half + aug.translate_x * size],
                     [0.0, 1.0, half + aug.translate_y * size], [0.0, 0.0, 1.0]])
    m = back @ shear @ rotate @ zoom @ centre @ resize
    if aug.flip:
        m = np.array([[-1.0, 0.0, float(size)], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    return m


def warp_boxes(boxes: Tensor, labels: Tensor, matrix: np.ndarray, width: int, height: int, size: int, *,
               min_box_side: float, min_area_ratio: float) -> tuple[Tensor, Tensor]:
    """Map boxes through the warp and keep those still usable as targets.

    ``boxes``: ``Tensor[N, 4]`` normalised xyxy of the ``width x height`` input; ``labels``
    ``Tensor[N]``; ``matrix`` from :func:`affine_matrix`. Each box's 4 corners are mapped
    and replaced by their enclosing box (exact without rotation/shear, larger than the
    object with them), which is clipped to the ``size x size`` output.

    Keep rule: both clipped sides >= ``min_box_side`` output pixels and the clipped area >=
    ``min_area_ratio`` x the unclipped mapped area. Darknet (``fill_truth_detection`` in
    ``src/data.c``) only drops boxes under 0.001 of the image after clipping, which keeps
    slivers of objects that lie almost wholly outside the frame; the side threshold of 2 px
    is the one of YOLOv5's ``box_candidates``, the area ratio 0.2 (an object at least
    one-fifth visible) is this project's choice. Boxes with label <= 0 are dropped too
    (:func:`.transforms.drop_degenerate`).

    Returns ``(boxes Tensor[M, 4] float32 normalised to the output, labels Tensor[M])``.
    """
    b = boxes.detach().to(torch.float64).cpu().numpy().reshape(-1, 4) * np.array([width, height, width, height])
    corners = b[:, [[0, 1], [2, 1], [0, 3], [2, 3]]]  # [N, 4, 2]
    mapped = corners @ matrix[:2, :2].T + matrix[:2, 2]
    lo, hi = mapped.min(axis=1), mapped.max(axis=1)  # [N, 2] each
    area = np.prod(hi - lo, axis=1)
    lo_c, hi_c = np.clip(lo, 0.0, size), np.clip(hi, 0.0, size)
    side = hi_c - lo_c
    keep = (side >= min_box_side).all(axis=1) & (np.prod(side, axis=1) >= min_area_ratio * area)
    out = torch.from_numpy(np.concatenate([lo_c, hi_c], axis=1)[keep] / size).float().clamp_(0.0, 1.0)
    return drop_degenerate(out, labels[torch.from_numpy(keep)])


def _normalizer(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (R, G, B), got {tuple(mean)} and {tuple(std)}")
    if min(std) <= 0:
        raise ValueError(f"std must be > 0, got {tuple(std)}")
    # (x / 255 - mean) / std = x * scale - shift
    m, s = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    return (1.0 / (255.0 * s)).astype(np.float32).reshape(3, 1, 1), (m / s).astype(np.float32).reshape(3, 1, 1)


def _to_tensor(chw: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> Tensor:
    """``[3, H, W]`` array of [0, 255] values -> ``Tensor[3, H, W]`` float32 ``(x / 255 - mean) / std``."""
    # In numpy: its uint8 -> float32 cast is much faster than torch's on a busy CPU.
    x = np.ascontiguousarray(chw, dtype=np.float32)
    x *= scale
    x -= shift
    return torch.from_numpy(x)


def _rgb(image: Image.Image) -> Image.Image:
    # Grayscale, palette, RGBA (alpha dropped), CMYK, 16-bit...: all become 8-bit RGB.
    return image if image.mode == "RGB" else image.convert("RGB")


class YOLOTrainTransform:
    """YOLO training augmentation: one affine warp (resize + zoom + translate + rotation + shear
    + horizontal flip) and darknet's HSV jitter, then normalisation.

    ``(PIL image, boxes Tensor[N, 4] normalised xyxy of the image, labels Tensor[N]) ->
    (Tensor[3, size, size] float32 (x / 255 - mean) / std, boxes Tensor[M, 4] normalised
    xyxy of the output, labels Tensor[M] int64)``, M <= N, every box inside [0, 1] with
    sides >= ``min_box_side`` pixels (see :func:`warp_boxes` for the keep rule).

    Per sample (uniform draws): flip with probability ``flip_p``; rotation U(-degrees,
    degrees); zoom U(scale[0], scale[1]); shear x, y U(-shear, shear) degrees; translation
    x, y U(-translate, translate) x size; hue shift U(-hue, hue) of the circle; saturation
    and exposure factors :func:`rand_scale` (in [1/s, s]).

    ``fill``: the colour (0..255, one grey level or R, G, B) of the output area that the
    source image does not cover. ``min_box_side`` (output pixels) and ``min_area_ratio``:
    the box keep rule of :func:`warp_boxes`.

    Defaults: hue 0.1, saturation 1.5, exposure 1.5 are darknet's ``cfg/yolov3.cfg``; fill
    grey 127 is darknet's 0.5 (``src/data.c``); flip p 0.5 as darknet (``rand()%2``).
    ``translate`` 0.2 and ``scale`` (0.75, 1.25) stand for ``jitter=.3`` of yolov3.cfg:
    darknet's crop jitter j (``load_data_detection``, ``src/data.c`` of the AlexeyAB fork
    and of YOLOv2-era darknet) moves each edge of the crop window independently by
    U(-j, j) x the image side. The window centre then moves by (dl - dr) / 2, triangular
    on [-j, j] with standard deviation j / sqrt(6) = 0.12 for j = 0.3; U(-0.2, 0.2) has
    the same (0.2 / sqrt(3) = 0.12), hence ``translate = j / sqrt(2)``, rounded. The
    window side is 1 - dl - dr, triangular on [1 - 2j, 1 + 2j] = [0.4, 1.6] with standard
    deviation 2j / sqrt(6) = 0.245; the zoom range 1 +- 0.25 spans one standard deviation
    each way (two-thirds of darknet's windows), milder than matching that deviation
    (1 +- 0.42), since here the zoom is one isotropic factor and darknet's per-axis
    stretch is not reproduced. (pjreddie's darknet of the YOLOv3 release uses jitter for
    an aspect-ratio jitter only, with the zoom fixed at 1.) ``degrees`` and ``shear``
    default to 0: darknet's YOLOv3 loader neither rotates nor shears.

    The warp uses PIL's 2 x 2 bilinear kernel (no antialiasing when it shrinks the image,
    as darknet's ``resize_image``); :class:`YOLOEvalTransform` resizes with PIL's
    antialiased bilinear, as the SSD evaluation does.

    Leave ``rng`` as None under a DataLoader (see :class:`.transforms.SSDTrainTransform`).

    Raises:
        ValueError: for a size < 1, flip_p outside [0, 1], negative degrees/translate,
            shear outside [0, 90), a scale range not 0 < lo <= hi, hue outside [0, 0.5],
            saturation or exposure < 1, mean/std not 3 values or std <= 0, negative
            min_box_side or min_area_ratio outside [0, 1].
    """

    def __init__(self, size: int, *, flip_p: float = 0.5, degrees: float = 0.0, translate: float = 0.2,
                 scale: tuple[float, float] = (0.75, 1.25), shear: float = 0.0, hue: float = 0.1,
                 saturation: float = 1.5, exposure: float = 1.5,
                 mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                 min_box_side: float = 2.0, min_area_ratio: float = 0.2,
                 fill: int | tuple[int, int, int] = FILL_GREY, rng: RandomSource | None = None) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        if degrees < 0 or translate < 0:
            raise ValueError(f"degrees and translate must be >= 0, got {degrees} and {translate}")
        if not 0.0 <= shear < 90.0:
            raise ValueError(f"shear must be in [0, 90) degrees, got {shear}")
        if not 0.0 < scale[0] <= scale[1]:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi, got {tuple(scale)}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        if saturation < 1.0 or exposure < 1.0:
            raise ValueError(f"saturation and exposure must be >= 1 (factors in [1/s, s]), "
                             f"got {saturation} and {exposure}")
        if min_box_side < 0 or not 0.0 <= min_area_ratio <= 1.0:
            raise ValueError(f"need min_box_side >= 0 and min_area_ratio in [0, 1], "
                             f"got {min_box_side} and {min_area_ratio}")
        self.size = int(size)
        self.flip_p, self.degrees, self.translate, self.shear = float(flip_p), float(degrees), float(translate), float(shear)
        self.scale = (float(scale[0]), float(scale[1]))
        self.hue, self.saturation, self.exposure = float(hue), float(saturation), float(exposure)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._scale, self._shift = _normalizer(self.mean, self.std)
        self.min_box_side, self.min_area_ratio = float(min_box_side), float(min_area_ratio)
        # A tuple: PIL reads a single int fill of an RGB image as a packed 0xBBGGRR colour.
        self.fill = (int(fill),) * 3 if isinstance(fill, (int, float)) else tuple(int(c) for c in fill)
        self.rng = rng

    def sample(self) -> YOLOAugmentation:
        """Draw one sample's parameters: exactly :data:`NUM_DRAWS` uniforms from ``rng``."""
        rng = np.random if self.rng is None else self.rng
        u = np.asarray(rng.random(NUM_DRAWS), dtype=np.float64)

        def sym(x: float, r: float) -> float:  # U(-r, r) from U(0, 1)
            return float(r * (2.0 * x - 1.0))

        return YOLOAugmentation(
            flip=bool(u[0] < self.flip_p),
            degrees=sym(u[1], self.degrees),
            zoom=float(self.scale[0] + (self.scale[1] - self.scale[0]) * u[2]),
            shear_x=sym(u[3], self.shear),
            shear_y=sym(u[4], self.shear),
            translate_x=sym(u[5], self.translate),
            translate_y=sym(u[6], self.translate),
            hue=sym(u[7], self.hue),
            saturation=rand_scale(self.saturation, u[8], u[9]),
            exposure=rand_scale(self.exposure, u[10], u[11]),
        )

    def apply(self, image: Image.Image, boxes: Tensor, labels: Tensor,
              aug: YOLOAugmentation) -> tuple[Tensor, Tensor, Tensor]:
        """The augmentation with given parameters (deterministic); same types as ``__call__``."""
        image = _rgb(image)
        width, height = image.size
        m = affine_matrix(aug, width, height, self.size)
        inv = np.linalg.inv(m)  # PIL maps each output pixel back to the input
        warped = image.transform((self.size, self.size), Image.Transform.AFFINE,
                                 tuple(float(v) for v in inv[:2].ravel()),
                                 resample=Image.Resampling.BILINEAR, fillcolor=self.fill)
        chw = np.asarray(warped).transpose(2, 0, 1)
        if aug.hue != 0.0 or aug.saturation != 1.0 or aug.exposure != 1.0:
            chw = distort_hsv(chw, aug.hue, aug.saturation, aug.exposure)
        boxes, labels = warp_boxes(boxes, labels, m, width, height, self.size,
                                   min_box_side=self.min_box_side, min_area_ratio=self.min_area_ratio)
        return _to_tensor(chw, self._scale, self._shift), boxes, labels.long()

    def __call__(self, image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.apply(image, boxes, labels, self.sample())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.size}, flip_p={self.flip_p}, degrees={self.degrees}, "
                f"translate={self.translate}, scale={self.scale}, shear={self.shear}, hue={self.hue}, "
                f"saturation={self.saturation}, exposure={self.exposure})")


class YOLOEvalTransform:
    """Evaluation: bilinear resize to ``size x size`` (as the SSD evaluation transform) and
    ``(x / 255 - mean) / std``; boxes (clamped to [0, 1]) and labels pass through.

    Raises:
        ValueError: for a size < 1, or mean/std not 3 values or std <= 0.
    """

    def __init__(self, size: int, *, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = int(size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._scale, self._shift = _normalizer(self.mean, self.std)

    def __call__(self, image: Image.Image, boxes: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        resized = _rgb(image).resize((self.size, self.size), Image.Resampling.BILINEAR)
        chw = np.asarray(resized).transpose(2, 0, 1)
        return _to_tensor(chw, self._scale, self._shift), boxes.float().clamp(0.0, 1.0), labels.long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std})"
