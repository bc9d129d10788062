"""The YOLOv3 network: Darknet-53 and the three-scale neck and heads of darknet ``cfg/yolov3.cfg``.

Layer by layer (cfg layer numbers for the published model; B = the backbone's layer count, 75):

* 0-74: Darknet-53 (:class:`~single_stage_detector.backbones.darknet.Darknet53`), C3 = layer 36,
  C4 = layer 61, C5 = layer 74.
* Stride 32, on C5: the conv set 1x1 512, 3x3 1024, 1x1 512, 3x3 1024, 1x1 512 (75-79), 3x3 1024
  (80), 1x1 output conv with bias and linear activation, A * (5 + C) filters (81), ``[yolo]`` (82).
* Stride 16: ``[route] layers=-4`` (83, back to 79), 1x1 256 (84), 2x nearest ``[upsample]`` (85),
  ``[route] layers=-1, 61`` (86: the upsampled map first, then C4), conv set 256/512 (87-91),
  3x3 512 (92), output conv (93), ``[yolo]`` (94).
* Stride 8: route -4 (95, to 91), 1x1 128 (96), upsample (97), ``[route] layers=-1, 36`` (98),
  conv set 128/256 (99-103), 3x3 256 (104), output conv (105), ``[yolo]`` (106).

Every conv except the three output convs is ``ConvBNLeaky`` (BatchNorm, leaky 0.1). Channels
scale with ``width`` (32 in darknet): the conv set of a scale whose backbone map has ``c``
channels works at ``c / 2`` and its 3x3 layers at ``c``.

The raw output (the interface to the loss and the decoder): a list of 3 tensors, strides 32,
16, 8 (``YOLOV3_STRIDES``), each ``Tensor[B, A * (5 + C), H / stride, W / stride]``; the
channels of anchor ``a`` are ``a * (5 + C) + [0: tx, 1: ty, 2: tw, 3: th, 4: objectness logit,
5 .. 5 + C: class logits]`` (``entry_index`` in darknet ``src/yolo_layer.c``). The anchors
(``YOLOV3_MASKS``) do not enter the network: one network serves every input size.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones.darknet import (
    BN_MOMENTUM,
    DARKNET53_STAGE_BLOCKS,
    ConvBNLeaky,
    Darknet53,
    DarknetConvLayer,
    darknet_init_,
)

__all__ = ["YOLOv3Network", "OBJECTNESS_CHANNEL", "NUM_BOX_CHANNELS", "INPUT_MULTIPLE"]

NUM_BOX_CHANNELS = 5
"""Channels per anchor before the class logits: tx, ty, tw, th, objectness (``src/yolo_layer.c``)."""

OBJECTNESS_CHANNEL = 4
"""Index of the objectness logit among an anchor's ``5 + C`` channels."""

INPUT_MULTIPLE = 32
"""Input height and width must be multiples of the largest stride (32) so the upsampled maps
line up with C4 and C3 for the concatenations."""


def _conv_set(in_channels: int, mid_channels: int, *, bn_momentum: float) -> nn.Sequential:
    """Darknet's five-conv block before each output: 1x1 mid, 3x3 2*mid, 1x1 mid, 3x3 2*mid, 1x1 mid."""
    wide = 2 * mid_channels
    return nn.Sequential(
        ConvBNLeaky(in_channels, mid_channels, 1, bn_momentum=bn_momentum),
        ConvBNLeaky(mid_channels, wide, 3, bn_momentum=bn_momentum),
        ConvBNLeaky(wide, mid_channels, 1, bn_momentum=bn_momentum),
        ConvBNLeaky(mid_channels, wide, 3, bn_momentum=bn_momentum),
        ConvBNLeaky(wide, mid_channels, 1, bn_momentum=bn_momentum),
    )


class YOLOv3Network(nn.Module):
    """Darknet-53 + the YOLOv3 neck and heads of ``cfg/yolov3.cfg``, returning the raw maps.

    Args:
        num_classes: C, classes predicted per anchor (80 for COCO).
        width: backbone stem channels (32 in darknet; see :class:`Darknet53`).
        stage_blocks: residual blocks per backbone stage (darknet: 1, 2, 8, 8, 4).
        num_anchors: A, anchors per scale (3 in ``yolov3.cfg``).
        objectness_prior: if given, a probability in (0, 1): the bias of every objectness
            channel of the three output convs starts at ``logit(objectness_prior)``, so every
            prediction starts with that objectness instead of about 0.5. With ~10,000
            predictions per image at 416 and a handful of objects, a start at 0.5 makes the
            no-object term dominate the first steps; a small prior (e.g. 0.01, the "prior
            probability" initialisation of the focal-loss paper, arXiv:1708.02002 section 4.1)
            starts near the converged state, which pays on short runs and small data. None
            (default) keeps darknet's plain init (biases 0).
        bn_momentum: BatchNorm momentum of every layer (see ``backbones.darknet``).

    ``forward(images)``: ``images`` ``Tensor[B, 3, H, W]`` with H and W multiples of 32 ->
    ``list`` of 3 ``Tensor[B, A * (5 + C), H / s, W / s]`` for s = 32, 16, 8 (module
    docstring). 13, 26, 52 cells per side at 416; 10, 20, 40 at 320; 19, 38, 76 at 608.

    Weights start with darknet's init (:func:`~single_stage_detector.backbones.darknet.darknet_init_`:
    He-normal convs, zero biases).

    Raises:
        ValueError: ``num_classes`` or ``num_anchors`` < 1, ``objectness_prior`` outside
            (0, 1), a bad backbone configuration; in ``forward``, an input that is not
            ``[B, 3, H, W]`` with H, W multiples of 32.
    """

    strides: tuple[int, int, int] = (32, 16, 8)

    def __init__(self, num_classes: int = 80, *, width: int = 32,
                 stage_blocks: Sequence[int] = DARKNET53_STAGE_BLOCKS, num_anchors: int = 3,
                 objectness_prior: float | None = None, bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_anchors < 1:
            raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
        if objectness_prior is not None and not 0.0 < objectness_prior < 1.0:
            raise ValueError(f"objectness_prior must be a probability in (0, 1), got {objectness_prior}")
        self.num_classes = int(num_classes)
        self.num_anchors = int(num_anchors)
        self.objectness_prior = objectness_prior
        self.backbone = Darknet53(width, stage_blocks, bn_momentum=bn_momentum)
        c3, c4, c5 = self.backbone.out_channels
        out_channels = self.num_anchors * (NUM_BOX_CHANNELS + self.num_classes)
        # Per output scale (strides 32, 16, 8): the backbone map it reads and the channels the
        # map from the coarser scale brings after its 1x1 conv and upsampling.
        skip_channels = (c5, c4, c3)
        lateral_channels = (0, c4 // 2, c3 // 2)
        self.conv_sets = nn.ModuleList(
            _conv_set(skip + lateral, skip // 2, bn_momentum=bn_momentum)
            for skip, lateral in zip(skip_channels, lateral_channels))
        self.head_convs = nn.ModuleList(
            ConvBNLeaky(skip // 2, skip, 3, bn_momentum=bn_momentum) for skip in skip_channels)
        self.output_convs = nn.ModuleList(nn.Conv2d(skip, out_channels, 1) for skip in skip_channels)
        # The 1x1 convs between a conv set and the upsampling to the next finer scale (84, 96).
        self.lateral_convs = nn.ModuleList(
            ConvBNLeaky(skip // 2, lateral, 1, bn_momentum=bn_momentum)
            for skip, lateral in zip(skip_channels[:-1], lateral_channels[1:]))
        for module in (self.conv_sets, self.head_convs, self.output_convs, self.lateral_convs):
            darknet_init_(module)
        if objectness_prior is not None:
            self.init_objectness_bias(objectness_prior)

    @property
    def channels_per_anchor(self) -> int:
        """``5 + C``: tx, ty, tw, th, objectness, then C class logits."""
        return NUM_BOX_CHANNELS + self.num_classes

    @torch.no_grad()
    def init_objectness_bias(self, prior: float) -> None:
        """Set the objectness bias of every anchor of the 3 output convs to ``logit(prior)``.

        ValueError if ``prior`` is not in (0, 1). Other biases are untouched.
        """
        if not 0.0 < prior < 1.0:
            raise ValueError(f"the objectness prior must be a probability in (0, 1), got {prior}")
        for conv in self.output_convs:
            bias = conv.bias.view(self.num_anchors, self.channels_per_anchor)
            bias[:, OBJECTNESS_CHANNEL] = math.log(prior / (1.0 - prior))

    def darknet_conv_layers(self) -> list[DarknetConvLayer]:
        """Every conv in ``yolov3.cfg`` order as ``(darknet layer number, conv, BatchNorm or None)``.

        Layer numbers count every cfg section (convolutional, shortcut, route, upsample, yolo).
        The published model: 75 convs, numbers 0 .. 105; the first 52 (0 .. 73) are the
        backbone; the output convs (81, 93, 105) have no BatchNorm and carry a bias.
        """
        layers = self.backbone.darknet_conv_layers()
        number = self.backbone.num_darknet_layers
        for k in range(3):
            if k > 0:
                lateral = self.lateral_convs[k - 1]
                number += 1  # [route] layers=-4
                layers.append((number, lateral.conv, lateral.bn))
                number += 3  # the conv, [upsample], [route] layers=-1, skip
            for block in self.conv_sets[k]:
                layers.append((number, block.conv, block.bn))
                number += 1
            layers.append((number, self.head_convs[k].conv, self.head_convs[k].bn))
            layers.append((number + 1, self.output_convs[k], None))
            number += 3  # the 3x3, the output conv, [yolo]
        return layers

    def forward(self, images: Tensor) -> list[Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"YOLOv3Network expects images [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
            raise ValueError(f"YOLOv3Network needs H and W multiples of {INPUT_MULTIPLE}, got {height}x{width}")
        c3, c4, c5 = self.backbone(images)
        outputs = []
        x = c5
        for k, skip in enumerate((c5, c4, c3)):
            if k > 0:
                # [route] -4, 1x1 conv, [upsample] stride=2 (nearest), [route] -1, skip: upsampled first.
                x = F.interpolate(self.lateral_convs[k - 1](x), scale_factor=2.0, mode="nearest")
                x = torch.cat([x, skip], dim=1)
            x = self.conv_sets[k](x)
            outputs.append(self.output_convs[k](self.head_convs[k](x)))
        return outputs
