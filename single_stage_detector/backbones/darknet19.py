"""Darknet-19, the YOLOv2 backbone (arXiv:1612.08242 section 3 "Faster", Table 6; darknet
``cfg/yolov2.cfg`` layers 0-22, the same layers as ``cfg/darknet19_448.cfg`` without its classifier).

Structure: six stages; every stage but the first starts with a 2x2 stride-2 max-pool
(``[maxpool] size=2 stride=2``), then alternates 3x3 convs at the stage's width and 1x1 convs
at half of it, starting and ending with a 3x3. Stage ``s`` (0..5) has ``width * 2**s``
channels. At ``width`` 32 and ``stage_convs`` (1, 1, 3, 3, 5, 5) this is Table 6 without
the classifier's last 1x1 conv (1000 filters), average pool and softmax: 18 convolutions and
5 max-pools, 23 cfg layers (``darknet19_448.conv.23``, the ImageNet backbone file of
darknet's YOLOv2 training, holds their weights).

Maps handed to the detector: C4, the output of the fifth stage (cfg layer 16, 512 channels,
stride 16: the source of the passthrough layer, ``[route] layers=-9`` at layer 25 of
``yolov2.cfg``), and C5, the output of the last stage (cfg layer 22, 1024 channels, stride 32).

Every convolution is darknet's ``[convolutional] batch_normalize=1 pad=1 activation=leaky``:
:class:`~single_stage_detector.backbones.darknet.ConvBNLeaky` (BatchNorm constants and
initialisation as Darknet-53, :mod:`single_stage_detector.backbones.darknet`).
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from .darknet import BN_MOMENTUM, ConvBNLeaky, DarknetConvLayer, darknet_init_

__all__ = ["DARKNET19_STAGE_CONVS", "Darknet19"]

DARKNET19_STAGE_CONVS: tuple[int, ...] = (1, 1, 3, 3, 5, 5)
"""Convolutions per stage of the published Darknet-19 (arXiv:1612.08242 Table 6)."""


def _stage(in_channels: int, channels: int, num_convs: int, *, pool: bool, bn_momentum: float) -> nn.Sequential:
    """[maxpool 2/2] then ``num_convs`` convs: 3x3 ``channels``, 1x1 ``channels // 2``, 3x3, ... (odd count)."""
    layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if pool else []
    c_in = in_channels
    for k in range(num_convs):
        out, size = (channels, 3) if k % 2 == 0 else (channels // 2, 1)
        layers.append(ConvBNLeaky(c_in, out, size, bn_momentum=bn_momentum))
        c_in = out
    return nn.Sequential(*layers)


class Darknet19(nn.Module):
    """Darknet-19 up to its last 3x3 conv (darknet layer 22), returning C4 and C5.

    Args:
        width: channels of the first conv (32 in darknet); stage ``s`` has ``width * 2**s``, so
            C4 has ``16 * width`` channels and C5 ``32 * width`` (512 and 1024 at width 32).
        stage_convs: convolutions in each of the 6 stages, each odd (3x3 first and last; darknet:
            1, 1, 3, 3, 5, 5); a small CPU model may use e.g. width 8 and (1, 1, 1, 1, 3, 3).
        bn_momentum: BatchNorm momentum of every layer (``backbones.darknet``).

    ``forward(Tensor[B, 3, H, W])`` -> ``(C4, C5)`` of shapes ``[B, 16w, H/16, W/16]`` and
    ``[B, 32w, H/32, W/32]`` (H, W multiples of 32; strides :attr:`strides`). 26 and 13 cells
    per side at 416. Weights start with darknet's init (:func:`~.darknet.darknet_init_`).

    Raises:
        ValueError: ``width`` < 1, or ``stage_convs`` not 6 positive odd counts.
    """

    strides: tuple[int, int] = (16, 32)

    def __init__(self, width: int = 32, stage_convs: Sequence[int] = DARKNET19_STAGE_CONVS, *,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        stage_convs = tuple(int(n) for n in stage_convs)
        if int(width) != width or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        if len(stage_convs) != 6 or any(n < 1 or n % 2 == 0 for n in stage_convs):
            raise ValueError(f"stage_convs must be 6 positive odd conv counts, got {stage_convs}")
        self.width = int(width)
        self.stage_convs = stage_convs
        stages, c_in = [], 3
        for s, num_convs in enumerate(stage_convs):
            channels = self.width * 2 ** s
            stages.append(_stage(c_in, channels, num_convs, pool=s > 0, bn_momentum=bn_momentum))
            c_in = channels
        self.stages = nn.ModuleList(stages)
        self.out_channels: tuple[int, int] = (16 * self.width, 32 * self.width)
        darknet_init_(self)

    @property
    def num_darknet_layers(self) -> int:
        """cfg layers this backbone spans: its convs plus 5 max-pools (23 for Darknet-19)."""
        return sum(self.stage_convs) + len(self.stage_convs) - 1

    @property
    def darknet_layer_of_maps(self) -> tuple[int, int]:
        """Darknet layer numbers whose outputs are C4 and C5 (16 and 22 for Darknet-19)."""
        return self.num_darknet_layers - 1 - (self.stage_convs[-1] + 1), self.num_darknet_layers - 1

    def darknet_conv_layers(self) -> list[DarknetConvLayer]:
        """Every conv in darknet cfg order with its cfg layer number (max-pools counted):
        Darknet-19, 18 entries: 0, 2, 4, 5, 6, 8, 9, 10, 12 .. 16, 18 .. 22."""
        out: list[DarknetConvLayer] = []
        number = 0
        for stage in self.stages:
            for layer in stage:
                if isinstance(layer, ConvBNLeaky):
                    out.append((number, layer.conv, layer.bn))
                number += 1
        return out

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images
        for stage in self.stages[:5]:
            x = stage(x)
        c4 = x
        c5 = self.stages[5](c4)
        return c4, c5
