"""Darknet-53, the YOLOv3 backbone (arXiv:1804.02767 section 2.4, darknet ``cfg/yolov3.cfg``
layers 0-74, the same layers as ``cfg/darknet53.cfg``).

Structure: a 3x3 stem conv, then five stages; each stage is a 3x3 stride-2 conv that doubles
the channels, followed by ``stage_blocks[i]`` residual blocks (1x1 conv to half the channels,
3x3 conv back, then ``[shortcut] from=-3 activation=linear``, an addition). At ``width`` 32 and
``stage_blocks`` (1, 2, 8, 8, 4) this is the published network: 52 convolutions (53 with the
classifier's last layer, hence the name), and the C3, C4, C5 maps it hands to the detector are
the outputs of darknet layers 36, 61 and 74 (``[route] layers=-1, 36`` and ``-1, 61`` in
``yolov3.cfg``).

Every convolution is darknet's ``[convolutional] batch_normalize=1 activation=leaky`` with
``pad=1`` (padding = size // 2): :class:`ConvBNLeaky`.

BatchNorm constants (see :data:`BN_EPS`, :data:`BN_MOMENTUM`):

* **eps 1e-5 inside the square root**, PyTorch's formula ``(x - mean) / sqrt(var + eps)``.
  Darknet has two formulas: its CPU code (``normalize_cpu`` in ``src/blas.c``) divides by
  ``sqrt(var) + 1e-6``, its GPU code (``normalize_kernel`` in ``src/blas_kernels.cu``, and
  cuDNN's batch norm called with epsilon ``.00001`` in ``src/batchnorm_layer.c``) divides by
  ``sqrt(var + 1e-5)``. YOLOv3 is trained with darknet's GPU build, so eps 1e-5 is the
  arithmetic its published weights were trained with; the CPU formula differs by a relative ``1e-5 / (2 var)``,
  below 5e-4 for every variance above 0.01. The CPU formula is not expressible as a constant
  eps, and a custom normalisation would give up cuDNN's fused batch norm and
  ``nn.SyncBatchNorm.convert_sync_batchnorm``.
* **momentum 0.1** (PyTorch's default, the weight of the new batch's statistics). Darknet
  updates its rolling statistics with weight 0.01 at every forward pass (``.99`` / ``.01`` in
  ``forward_batchnorm_layer``, ``src/batchnorm_layer.c``), and ``yolov3.cfg`` trains with
  ``batch=64 subdivisions=16``: a forward of 4 images. Per image seen, weight 0.01 per 4
  images equals weight ``1 - 0.99 ** (b / 4)`` per forward of ``b`` images
  (:func:`darknet_bn_momentum`); 0.1 is that rate at b = 42 images per BatchNorm forward,
  between the usual 32 and 64 images per GPU. A preset with another batch passes
  ``bn_momentum=darknet_bn_momentum(b)`` to keep darknet's rate exactly.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "LEAKY_SLOPE",
    "DARKNET53_STAGE_BLOCKS",
    "ConvBNLeaky",
    "DarknetResidual",
    "Darknet53",
    "DarknetConvLayer",
    "darknet_bn_momentum",
    "darknet_init_",
]

BN_EPS: float = 1e-5
"""BatchNorm eps, inside the square root: darknet's GPU arithmetic (module docstring)."""

BN_MOMENTUM: float = 0.1
"""BatchNorm running-statistics momentum: darknet's per-image rate at 42 images per forward."""

LEAKY_SLOPE: float = 0.1
"""Negative slope of darknet's ``leaky`` activation (``leaky_activate``, ``src/activations.h``)."""

DARKNET53_STAGE_BLOCKS: tuple[int, ...] = (1, 2, 8, 8, 4)
"""Residual blocks per stage of the published Darknet-53 (``cfg/darknet53.cfg``)."""

DarknetConvLayer = tuple[int, nn.Conv2d, "nn.BatchNorm2d | None"]
"""``(darknet layer number, conv, its BatchNorm or None)``: one entry of a cfg-ordered conv list."""


def darknet_bn_momentum(images_per_forward: int) -> float:
    """The BatchNorm momentum that updates running statistics at darknet's rate per image.

    Darknet mixes each forward pass's statistics in with weight 0.01 (``src/batchnorm_layer.c``)
    and ``yolov3.cfg`` runs forwards of 64 / 16 = 4 images, so after ``b`` images the old
    statistics keep ``0.99 ** (b / 4)``. Returns ``1 - 0.99 ** (images_per_forward / 4)``
    (0.0773 at 32, 0.149 at 64). ValueError if ``images_per_forward`` < 1.
    """
    if images_per_forward < 1:
        raise ValueError(f"images_per_forward must be >= 1, got {images_per_forward}")
    return 1.0 - 0.99 ** (images_per_forward / 4.0)


def darknet_init_(module: nn.Module) -> None:
    """Darknet's initialisation, in place, for every conv and BatchNorm inside ``module``.

    Conv weights ``N(0, 2 / fan_in)`` with fan_in = in_channels * k * k (``scale =
    sqrt(2./(size*size*c/groups))`` times ``rand_normal()`` in ``make_convolutional_layer``,
    ``src/convolutional_layer.c``); conv biases 0; BatchNorm scale 1, shift 0, running mean 0,
    running variance 1. Tensors on the ``meta`` device (shapes only) are skipped: they hold no
    values, and ``normal_`` there would import torch's compiler stack (seconds).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.weight.is_meta:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")  # std sqrt(2 / fan_in)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()


class ConvBNLeaky(nn.Module):
    """Darknet's ``[convolutional] batch_normalize=1 pad=1 activation=leaky``.

    Conv2d without bias (BatchNorm's shift is darknet's ``biases``), padding ``kernel_size //
    2``, then BatchNorm2d (:data:`BN_EPS`, ``bn_momentum``), then LeakyReLU(0.1).
    ``Tensor[B, in_channels, H, W]`` -> ``Tensor[B, out_channels, ceil(H / stride), ceil(W / stride)]``
    (for odd ``kernel_size``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=bn_momentum)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DarknetResidual(nn.Module):
    """One residual block: 1x1 conv to ``channels // 2``, 3x3 conv back to ``channels``, add input.

    Darknet: two ``[convolutional]`` sections then ``[shortcut] from=-3 activation=linear``
    (three cfg layers). ``Tensor[B, C, H, W]`` -> ``Tensor[B, C, H, W]``.
    """

    def __init__(self, channels: int, *, bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"a residual block needs an even channel count, got {channels}")
        self.conv1 = ConvBNLeaky(channels, channels // 2, 1, bn_momentum=bn_momentum)
        self.conv2 = ConvBNLeaky(channels // 2, channels, 3, bn_momentum=bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.conv1(x))


class Darknet53(nn.Module):
    """Darknet-53 up to its last residual block (darknet layer 74), returning C3, C4, C5.

    Args:
        width: channels of the stem conv (32 in darknet); stage ``i`` (1..5) has ``width *
            2**i`` channels, so C3, C4, C5 have ``8 * width``, ``16 * width``, ``32 * width``
            (256, 512, 1024 at width 32).
        stage_blocks: residual blocks in each of the 5 stages (darknet: 1, 2, 8, 8, 4); a
            small CPU model may use e.g. width 8 and (1, 1, 1, 1, 1).
        bn_momentum: BatchNorm momentum of every layer (module docstring).

    ``forward(Tensor[B, 3, H, W])`` -> ``(C3, C4, C5)`` of shapes ``[B, 8w, H/8, W/8]``,
    ``[B, 16w, H/16, W/16]``, ``[B, 32w, H/32, W/32]`` (strides :attr:`strides`; sizes rounded
    up when H, W are not multiples of 32). Weights start with :func:`darknet_init_`.

    Raises:
        ValueError: ``width`` < 1, or ``stage_blocks`` not 5 non-negative counts.
    """

    strides: tuple[int, int, int] = (8, 16, 32)

    def __init__(self, width: int = 32, stage_blocks: Sequence[int] = DARKNET53_STAGE_BLOCKS, *,
                 bn_momentum: float = BN_MOMENTUM) -> None:
        super().__init__()
        stage_blocks = tuple(int(n) for n in stage_blocks)
        if int(width) != width or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        if len(stage_blocks) != 5 or min(stage_blocks) < 0:
            raise ValueError(f"stage_blocks must be 5 non-negative block counts, got {stage_blocks}")
        self.width = int(width)
        self.stage_blocks = stage_blocks
        self.stem = ConvBNLeaky(3, self.width, 3, bn_momentum=bn_momentum)
        stages = []
        channels = self.width
        for num_blocks in stage_blocks:
            layers: list[nn.Module] = [ConvBNLeaky(channels, 2 * channels, 3, stride=2, bn_momentum=bn_momentum)]
            channels *= 2
            layers += [DarknetResidual(channels, bn_momentum=bn_momentum) for _ in range(num_blocks)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_channels: tuple[int, int, int] = (8 * self.width, 16 * self.width, 32 * self.width)
        darknet_init_(self)

    @property
    def num_darknet_layers(self) -> int:
        """cfg layers this backbone spans: 1 stem + per stage 1 + 3 per block (75 for Darknet-53)."""
        return 1 + sum(1 + 3 * n for n in self.stage_blocks)

    @property
    def darknet_layer_of_maps(self) -> tuple[int, int, int]:
        """Darknet layer numbers whose outputs are C3, C4, C5 (36, 61, 74 for Darknet-53)."""
        ends, last = [], 0
        for n in self.stage_blocks:
            last += 1 + 3 * n
            ends.append(last)
        return ends[2], ends[3], ends[4]

    def darknet_conv_layers(self) -> list[DarknetConvLayer]:
        """Every conv in darknet cfg order with its cfg layer number (shortcuts counted).

        Stem 0; each stage: its stride-2 conv, then per residual block the 1x1 and 3x3 convs
        and one shortcut layer. Darknet-53: 52 entries, numbers 0 .. 73 (layer 74 is the last
        shortcut), the layers of ``darknet53.conv.74``.
        """
        out: list[DarknetConvLayer] = [(0, self.stem.conv, self.stem.bn)]
        number = 1
        for stage in self.stages:
            down = stage[0]
            out.append((number, down.conv, down.bn))
            number += 1
            for block in list(stage)[1:]:
                out.append((number, block.conv1.conv, block.conv1.bn))
                out.append((number + 1, block.conv2.conv, block.conv2.bn))
                number += 3  # conv, conv, shortcut
        return out

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.stem(images)
        x = self.stages[1](self.stages[0](x))
        c3 = self.stages[2](x)
        c4 = self.stages[3](c3)
        c5 = self.stages[4](c4)
        return c3, c4, c5

