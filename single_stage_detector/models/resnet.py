"""Backbones for SSD: the truncated ResNet-34 of the benchmark and a tiny ResNet for CPU demos.

Every backbone is an ``nn.Module`` mapping ``Tensor[B, 3, S, S]`` to a single feature map
``Tensor[B, out_channels, F, F]`` with output stride 8 (F = 38 for S = 300 with the
ResNet-34 padding arithmetic, 16 for S = 128), and exposes:

* ``out_channels`` (int): channels of that feature map;
* ``supports_imagenet_weights`` (bool): whether a ResNet-34 ImageNet state dict fits it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor, nn
from torchvision.models import resnet34
from torchvision.models.resnet import BasicBlock

__all__ = [
    "ResNet34Backbone",
    "TinyResNetBackbone",
    "BACKBONES",
    "build_backbone",
]


class ResNet34Backbone(nn.Module):
    """torchvision ResNet-34 up to and including ``layer3``, with ``layer3`` at stride 1.

    Submodule names are torchvision's (``conv1``, ``bn1``, ``layer1`` .. ``layer3``), so a
    torchvision ``resnet34`` state dict without ``layer4.*`` / ``fc.*`` loads with
    ``strict=True``. BatchNorm layers are ordinary (trained, running stats updated).

    Shapes: ``Tensor[B, 3, 300, 300]`` -> ``Tensor[B, 256, 38, 38]``.
    """

    out_channels: int = 256
    supports_imagenet_weights: bool = True

    def __init__(self) -> None:
        super().__init__()
        # Building the full torchvision model and keeping its first layers guarantees the
        # exact torchvision parameter names, shapes and default (Kaiming) initialisation.
        full = resnet34(weights=None)
        self.conv1 = full.conv1
        self.bn1 = full.bn1
        self.relu = full.relu
        self.maxpool = full.maxpool
        self.layer1 = full.layer1
        self.layer2 = full.layer2
        self.layer3 = full.layer3
        # SSD300 keeps layer3 at the resolution of layer2 (38x38 for a 300x300 input):
        # only block 0 has stride 2 in torchvision (its 3x3 conv1 and the 1x1 downsample).
        for block in self.layer3:
            block.conv1.stride = (1, 1)
            block.conv2.stride = (1, 1)
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[B, 3, S, S]`` -> ``Tensor[B, 256, F, F]`` (F = 38 for S = 300)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))


def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    """A stage of ``blocks`` BasicBlocks; block 0 changes channels/stride via a 1x1 conv + BN."""
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    layers = [BasicBlock(in_channels, out_channels, stride=stride, downsample=downsample)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class TinyResNetBackbone(nn.Module):
    """A small ResNet (BasicBlocks, BN, ReLU) with output stride 8, for fast CPU demos.

    Layout: 3x3 stride-2 stem conv + BN + ReLU, then two stages of BasicBlocks, each
    starting with a stride-2 block (stride 2 x 2 x 2 = 8).

    Shapes: ``Tensor[B, 3, 128, 128]`` -> ``Tensor[B, stage_channels[-1], 16, 16]``.

    Args:
        stem_channels: output channels of the stem conv.
        stage_channels: output channels of each stage (each starts with stride 2).
        stage_blocks: BasicBlocks per stage.
    """

    supports_imagenet_weights: bool = False

    def __init__(
        self,
        stem_channels: int = 32,
        stage_channels: Sequence[int] = (48, 96),
        stage_blocks: Sequence[int] = (1, 2),
    ) -> None:
        super().__init__()
        if len(stage_channels) != 2 or len(stage_blocks) != 2:
            raise ValueError(
                "TinyResNetBackbone needs exactly 2 stages (stem stride 2 x 2 stride-2 stages = "
                f"output stride 8); got stage_channels={tuple(stage_channels)}, "
                f"stage_blocks={tuple(stage_blocks)}"
            )
        if min(stage_blocks) < 1:
            raise ValueError(f"stage_blocks must all be >= 1, got {tuple(stage_blocks)}")
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_ch = stem_channels
        for out_ch, n in zip(stage_channels, stage_blocks):
            stages.append(_make_stage(in_ch, out_ch, n, stride=2))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.out_channels = int(stage_channels[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[B, 3, S, S]`` -> ``Tensor[B, out_channels, S/8, S/8]``."""
        return self.stages(self.stem(x))


# Backbone registry used by the presets: name -> factory(**kwargs) -> module.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet34": ResNet34Backbone,
    "tiny_resnet": TinyResNetBackbone,
}


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the backbone registered as ``name`` (see :data:`BACKBONES`)."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; valid names: {sorted(BACKBONES)}") from None
    return factory(**kwargs)
