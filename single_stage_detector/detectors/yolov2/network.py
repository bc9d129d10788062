"""The YOLOv2 network: a backbone giving C4 (stride 16) and C5 (stride 32), the passthrough
layer and one stride-32 output (arXiv:1612.08242 section 2 "Fine-Grained Features"; darknet
``cfg/yolov2.cfg``).

Layer by layer for the published model (cfg layer numbers; Darknet-19 is layers 0-22):

* 0-22: Darknet-19 (:class:`~single_stage_detector.backbones.darknet19.Darknet19`), C4 = layer
  16 (26 x 26 x 512 at 416), C5 = layer 22 (13 x 13 x 1024);
* 23, 24: 3x3 1024 twice on C5 (the *neck*, ``neck_kernels`` (3, 3));
* 25 ``[route] layers=-9`` (back to C4), 26: 1x1 64 (``passthrough_channels``), 27
  ``[reorg] stride=2`` (26 x 26 x 64 -> 13 x 13 x 256, :func:`reorg`);
* 28 ``[route] layers=-1,-4``: the reorganised passthrough map first, then layer 24
  (13 x 13 x 1280);
* 29: 3x3 1024 (``head_channels``); 30: 1x1 output conv with bias and linear activation,
  A * (5 + C) = 425 filters; 31 ``[region]``.

The paper's description, "the passthrough layer ... stacking adjacent features into different
channels", turns the 26 x 26 x 512 map into 13 x 13 x 2048; ``yolov2.cfg`` first reduces it to
64 channels (layer 26), so 256 reach the concatenation.

Reorg channel order (``reorg_order``). Two orders exist for the same 2 x 2 space-to-depth shape:

* ``"darknet"``: darknet's ``[reorg]`` layer exactly. ``forward_reorg_layer``
  (``src/reorg_layer.c``) calls ``reorg_cpu`` (``src/blas.c``) with ``forward = 0`` and the
  *input's* width, height and channels, which reads the C x H x W input buffer as a
  (C / s^2) x (sH) x (sW) array: output channel ``k`` at (row j, column i) holds that array's
  element ``[k % (C / s^2), j s + (k // (C / s^2)) // s, i s + (k // (C / s^2)) % s]``, and the
  result, a C x H x W buffer, is read as (s^2 C) x (H / s) x (W / s). It is a fixed
  permutation of the values but not a true space-to-depth: it mixes rows of different input
  channels. ``yolov2.cfg``'s published weights were trained with it, so a model that is to
  load them must use it; :func:`darknet_reorg`.
* ``"space_to_depth"``: the true space-to-depth of ``torch.nn.functional.pixel_unshuffle``:
  output channel ``c s^2 + dy s + dx`` at (y, x) is input channel ``c`` at ``(s y + dy, s x + dx)``;
  :func:`space_to_depth`.

Both are tested against hand-worked indices (tests/test_yolov2.py). ``yolov2_darknet19``
follows darknet; the models trained here from scratch or from a torchvision backbone
(``yolov2_resnet50``, ``yolov2_tiny_cpu``) use the true space-to-depth.

The raw output (the interface to the loss and the decoder): ``Tensor[B, A * (5 + C), H / 32,
W / 32]``; the channels of anchor ``a`` are ``a * (5 + C) + [0: tx, 1: ty, 2: tw, 3: th, 4:
objectness logit, 5 .. 5 + C: class logits]`` (``entry_index`` in darknet ``src/region_layer.c``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones.darknet import BN_MOMENTUM, ConvBNLeaky, DarknetConvLayer, darknet_init_

__all__ = ["YOLOv2Network", "REORG_ORDERS", "darknet_reorg", "space_to_depth", "reorg", "INPUT_MULTIPLE",
           "NUM_BOX_CHANNELS", "OBJECTNESS_CHANNEL"]

REORG_ORDERS = ("darknet", "space_to_depth")
"""The passthrough layer's channel orders (module docstring)."""

NUM_BOX_CHANNELS = 5
"""Channels per anchor before the class logits: tx, ty, tw, th, objectness (``src/region_layer.c``)."""

OBJECTNESS_CHANNEL = 4
"""Index of the objectness logit among an anchor's ``5 + C`` channels."""

INPUT_MULTIPLE = 32
"""Input height and width must be multiples of the output stride (32): C4 (stride 16) then has
even sides, which the stride-2 reorg needs to land on C5's grid."""


def _check_reorg_input(x: Tensor, stride: int) -> None:
    if x.dim() != 4 or x.shape[1] % (stride * stride) or x.shape[2] % stride or x.shape[3] % stride:
        raise ValueError(f"reorg with stride {stride} needs [B, C, H, W] with C a multiple of {stride * stride} "
                         f"and H, W multiples of {stride}; got {tuple(x.shape)}")


def darknet_reorg(x: Tensor, stride: int = 2) -> Tensor:
    """Darknet's ``[reorg]`` layer (``reorg_cpu`` with ``forward = 0``; module docstring).

    ``Tensor[B, C, H, W]`` -> ``Tensor[B, C s^2, H / s, W / s]`` with, for the intermediate
    ``Tensor[B, C, H, W]`` ``t``: ``t[b, k, j, i] = x.reshape(B, C / s^2, s H, s W)[b, k % (C /
    s^2), s j + (k // (C / s^2)) // s, s i + (k // (C / s^2)) % s]``, and the result is ``t``
    reshaped (a reinterpretation of the same buffer). Vectorised: one reshape, one permute.

    Raises:
        ValueError: C not a multiple of s^2, or H, W not multiples of s.
    """
    _check_reorg_input(x, stride)
    b, c, h, w = x.shape
    s = stride
    # The buffer as [C/s^2, sH, sW], rows and columns split into (j, dy) and (i, dx):
    # element [c2, j, dy, i, dx] is at row s j + dy, column s i + dx.
    t = x.reshape(b, c // (s * s), h, s, w, s)
    # Output channel k = (dy s + dx) (C / s^2) + c2 (darknet: offset = k / out_c, c2 = k % out_c).
    t = t.permute(0, 3, 5, 1, 2, 4).reshape(b, c, h, w)
    return t.reshape(b, c * s * s, h // s, w // s)


def space_to_depth(x: Tensor, stride: int = 2) -> Tensor:
    """True space-to-depth (``pixel_unshuffle``): ``Tensor[B, C, H, W]`` -> ``Tensor[B, C s^2, H / s,
    W / s]``, ``out[b, c s^2 + dy s + dx, y, x] = x[b, c, s y + dy, s x + dx]``.

    Raises:
        ValueError: C not a multiple of s^2 (checked as darknet's), or H, W not multiples of s.
    """
    _check_reorg_input(x, stride)
    return F.pixel_unshuffle(x, stride)


def reorg(x: Tensor, stride: int = 2, order: str = "darknet") -> Tensor:
    """:func:`darknet_reorg` or :func:`space_to_depth` by ``order`` (:data:`REORG_ORDERS`);
    ValueError on another order."""
    if order == "darknet":
        return darknet_reorg(x, stride)
    if order == "space_to_depth":
        return space_to_depth(x, stride)
    raise ValueError(f"reorg order must be one of {REORG_ORDERS}, got {order!r}")


class YOLOv2Network(nn.Module):
    """A C4/C5 backbone + the YOLOv2 passthrough head, returning the raw stride-32 map.

    Args:
        backbone: a module with ``out_channels`` ``(c4, c5)`` whose ``forward(images)`` returns
            ``(C4 [B, c4, H/16, W/16], C5 [B, c5, H/32, W/32])`` (Darknet-19; torchvision's
            ResNet-50 in :mod:`.resnet50`).
        num_classes: C, classes per anchor (80 for COCO).
        num_anchors: A, anchors per cell (5 in ``yolov2.cfg``).
        neck_kernels: kernel sizes of the convs on C5 before the concatenation, each with
            ``head_channels`` filters (``yolov2.cfg``: 3, 3; seed 004: 1, 3, 3).
        head_channels: filters of the neck convs and of the 3x3 conv after the concatenation
            (1024 in both).
        passthrough_channels: filters of the 1x1 conv on C4 before the reorg (``yolov2.cfg``: 64,
            seed 004: 128); ``4 *`` this many channels reach the concatenation.
        reorg_order: ``"darknet"`` or ``"space_to_depth"`` (module docstring).
        objectness_prior: if given, a probability in (0, 1): the objectness bias of the output
            conv starts at ``logit(objectness_prior)`` (as ``YOLOv3Network``); None: darknet's
            plain init (bias 0).
        bn_momentum: BatchNorm momentum of the head's layers.

    Buffer ``images_seen`` (0-d int64): training images the detector has seen (darknet's
    ``net.seen``), counted by :class:`~.detector.YOLOv2Detector`; it lives here so that the
    checkpoints, which store ``detector.model.state_dict()``, keep it and a resumed run
    switches the prior-matching warm-up off at the same image.

    ``forward(images)``: ``Tensor[B, 3, H, W]``, H and W multiples of 32 ->
    ``Tensor[B, A * (5 + C), H / 32, W / 32]`` (module docstring).

    Raises:
        ValueError: ``num_classes`` or ``num_anchors`` < 1, an unknown ``reorg_order``,
            ``objectness_prior`` outside (0, 1), no neck conv; in ``forward``, an input that is
            not ``[B, 3, H, W]`` with H, W multiples of 32.
    """

    stride: int = 32

    def __init__(self, backbone: nn.Module, num_classes: int = 80, num_anchors: int = 5, *,
                 neck_kernels: Sequence[int] = (3, 3), head_channels: int = 1024, passthrough_channels: int = 64,
                 reorg_order: str = "darknet", objectness_prior: float | None = None,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
        if reorg_order not in REORG_ORDERS:
            raise ValueError(f"reorg_order must be one of {REORG_ORDERS}, got {reorg_order!r}")
        if not neck_kernels:
            raise ValueError("neck_kernels needs at least one conv")
        if objectness_prior is not None and not 0.0 < objectness_prior < 1.0:
            raise ValueError(f"objectness_prior must be a probability in (0, 1), got {objectness_prior}")
        self.num_classes = int(num_classes)
        self.num_anchors = int(num_anchors)
        self.reorg_order = reorg_order
        self.backbone = backbone
        c4, c5 = backbone.out_channels
        self.neck = nn.Sequential(*(ConvBNLeaky(c5 if k == 0 else head_channels, head_channels, size,
                                                bn_momentum=bn_momentum) for k, size in enumerate(neck_kernels)))
        self.passthrough = ConvBNLeaky(c4, passthrough_channels, 1, bn_momentum=bn_momentum)
        self.head = ConvBNLeaky(4 * passthrough_channels + head_channels, head_channels, 3, bn_momentum=bn_momentum)
        self.output_conv = nn.Conv2d(head_channels, self.num_anchors * self.channels_per_anchor, 1)
        for module in (self.neck, self.passthrough, self.head, self.output_conv):
            darknet_init_(module)
        if objectness_prior is not None:
            self.init_objectness_bias(objectness_prior)
        self.register_buffer("images_seen", torch.zeros((), dtype=torch.int64))

    @property
    def channels_per_anchor(self) -> int:
        """``5 + C``: tx, ty, tw, th, objectness, then C class logits."""
        return NUM_BOX_CHANNELS + self.num_classes

    @torch.no_grad()
    def init_objectness_bias(self, prior: float) -> None:
        """Set every anchor's objectness bias of the output conv to ``logit(prior)``; ValueError
        if ``prior`` is not in (0, 1). Other biases are untouched."""
        if not 0.0 < prior < 1.0:
            raise ValueError(f"the objectness prior must be a probability in (0, 1), got {prior}")
        bias = self.output_conv.bias.view(self.num_anchors, self.channels_per_anchor)
        bias[:, OBJECTNESS_CHANNEL] = math.log(prior / (1.0 - prior))

    def darknet_conv_layers(self) -> list[DarknetConvLayer]:
        """Every conv in ``yolov2.cfg`` order as ``(darknet layer number, conv, BatchNorm or None)``:
        the backbone's, then (published model) 23, 24 (neck), 26 (passthrough), 29 (head) and 30
        (output conv: no BatchNorm, with bias); 23 convs. For darknet ``.weights`` files.

        Raises:
            ValueError: the backbone is not a darknet backbone (no ``darknet_conv_layers``).
        """
        if not hasattr(self.backbone, "darknet_conv_layers"):
            raise ValueError(f"{type(self.backbone).__name__} is not a darknet backbone: no darknet layer list")
        layers = self.backbone.darknet_conv_layers()
        number = self.backbone.num_darknet_layers
        for block in self.neck:
            layers.append((number, block.conv, block.bn))
            number += 1
        layers.append((number + 1, self.passthrough.conv, self.passthrough.bn))  # after [route] -9
        layers.append((number + 4, self.head.conv, self.head.bn))  # after [reorg], [route] -1,-4
        layers.append((number + 5, self.output_conv, None))
        return layers

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"YOLOv2Network expects images [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
            raise ValueError(f"YOLOv2Network needs H and W multiples of {INPUT_MULTIPLE}, got {height}x{width}")
        c4, c5 = self.backbone(images)
        fine = reorg(self.passthrough(c4), 2, self.reorg_order)
        x = torch.cat([fine, self.neck(c5)], dim=1)  # [route] layers=-1,-4: the passthrough first
        return self.output_conv(self.head(x))
