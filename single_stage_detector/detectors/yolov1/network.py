"""The YOLOv1 network: a backbone, 3x3 conv layers, and an output head of S x S cells.

Output (the interface to the loss and the decoder): ``Tensor[N, S, S, 5B + C]``, indexed
``[image, row j, column i, channel]``; the channels of a cell are, for each predictor
``b = 0 .. B-1``, ``5b + [0: x, 1: y, 2: sqrt-w, 3: sqrt-h, 4: confidence]``, then the ``C``
class scores at ``5B .. 5B + C - 1`` (one class distribution per cell, shared by its B
predictors; arXiv:1506.02640 section 2). Every output is linear (the paper's last layer):

* x, y: the box centre's offset inside its cell, in cell units (0..1 inside the cell);
* sqrt-w, sqrt-h: ``t`` with box width ``w = prior_w * t**2`` as a fraction of the input side.
  Without anchors ``prior = (1, 1)``: the network predicts the square root of the width and
  height as fractions of the image, which is what the paper's loss on ``sqrt(w)`` implies and
  what darknet's detection layer does (``sqrt=1`` in ``cfg/yolov1.cfg``, ``src/detection_layer.c``
  squares the output). With anchors (seed 000) ``prior`` is the predictor's anchor shape and
  ``t = 1`` is the anchor itself;
* confidence: the paper's Pr(Object) x IoU(pred, truth);
* class scores: Pr(Class_c | Object), trained by squared error against one-hot.

The paper's order of the output (darknet: all class scores first, then confidences, then
boxes) is not kept: the per-cell layout above is documented, simpler to index and equivalent.

The last conv map is average-pooled to a fixed side (``fc_pool`` for the fully connected
head, S for the conv head; an identity at the preset's input size), so the input size may
change (``--input-size``): the grid stays S x S and covers the whole input.

The anchors do not enter the forward pass: they are the buffer ``prior_wh`` (``Tensor[B, 2]``,
fractions of the input side; ones without anchors), saved with the weights, so that a
checkpoint trained with k-means anchors decodes with them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbones.darknet import ConvBNLeaky, LEAKY_SLOPE, darknet_init_

__all__ = ["YOLOv1Network", "ResNet34Trunk", "Darknet24Trunk", "TinyTrunk", "build_backbone",
           "BOX_CHANNELS", "DARKNET24_LAYERS"]

BOX_CHANNELS = 5
"""Channels per predictor: x, y, sqrt-w, sqrt-h, confidence."""

DARKNET24_LAYERS: tuple = (
    ("conv", 7, 64, 2), "max",
    ("conv", 3, 192, 1), "max",
    ("conv", 1, 128, 1), ("conv", 3, 256, 1), ("conv", 1, 256, 1), ("conv", 3, 512, 1), "max",
    *((("conv", 1, 256, 1), ("conv", 3, 512, 1)) * 4),
    ("conv", 1, 512, 1), ("conv", 3, 1024, 1), "max",
    *((("conv", 1, 512, 1), ("conv", 3, 1024, 1)) * 2),
)
"""The first 20 conv layers of the paper's network (arXiv:1506.02640 figure 3; seed 001's table A):
``("conv", kernel, channels, stride)`` or a 2x2 stride-2 max-pool. Output stride 32, 1024 channels.
The paper's last 4 conv layers are the preset's ``head_convs``."""


class ResNet34Trunk(nn.Module):
    """torchvision ResNet-34 without its classifier: ``conv1`` .. ``layer4`` (output stride 32).

    Submodule names are torchvision's, so torchvision's ImageNet ``resnet34-333f7ec4.pth``
    without ``fc.*`` loads with ``strict=True`` (:func:`load_imagenet_resnet34`).
    ``Tensor[N, 3, H, W]`` -> ``Tensor[N, 512, H / 32, W / 32]`` (14x14 at 448).
    """

    out_channels: int = 512
    stride: int = 32

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet34

        full = resnet34(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = full.conv1, full.bn1, full.relu, full.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = full.layer1, full.layer2, full.layer3, full.layer4

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _plain_trunk(layers: Sequence) -> tuple[nn.Sequential, int, int]:
    """``(Sequential, out_channels, stride)`` of ConvBNLeaky layers and 2x2 max-pools."""
    modules: list[nn.Module] = []
    channels, stride = 3, 1
    for layer in layers:
        if layer == "max":
            modules.append(nn.MaxPool2d(2, 2))
            stride *= 2
            continue
        _, kernel, out, s = layer
        modules.append(ConvBNLeaky(channels, out, kernel, s))
        channels, stride = out, stride * s
    return nn.Sequential(*modules), channels, stride


class Darknet24Trunk(nn.Module):
    """The paper's first 20 conv layers (:data:`DARKNET24_LAYERS`) with BatchNorm and leaky 0.1
    (seed 001's CNN block; the 2015 paper had no BatchNorm). ``Tensor[N, 3, H, W]`` ->
    ``Tensor[N, 1024, H / 32, W / 32]``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers, self.out_channels, self.stride = _plain_trunk(DARKNET24_LAYERS)
        darknet_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TinyTrunk(nn.Module):
    """A small plain network for CPU demos: a 3x3 ConvBNLeaky per entry of ``widths``, a 2x2
    max-pool after each but the last (the layout of darknet's tiny YOLO networks).
    ``Tensor[N, 3, H, W]`` -> ``Tensor[N, widths[-1], H / 2**(len - 1), W / 2**(len - 1)]``.

    Raises:
        ValueError: on an empty ``widths`` or a width < 1.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        if not widths or min(widths) < 1:
            raise ValueError(f"tiny backbone widths must be positive, got {tuple(widths)}")
        layers: list = []
        for k, width in enumerate(widths):
            layers.append(("conv", 3, int(width), 1))
            if k < len(widths) - 1:
                layers.append("max")
        self.layers, self.out_channels, self.stride = _plain_trunk(layers)
        darknet_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def build_backbone(kind: str, tiny_widths: Sequence[int] = ()) -> nn.Module:
    """The backbone ``kind`` (``resnet34``, ``darknet24``, ``tiny``); ValueError otherwise."""
    if kind == "resnet34":
        return ResNet34Trunk()
    if kind == "darknet24":
        return Darknet24Trunk()
    if kind == "tiny":
        return TinyTrunk(tiny_widths)
    raise ValueError(f"unknown YOLOv1 backbone {kind!r} (resnet34, darknet24, tiny)")


class YOLOv1Network(nn.Module):
    """Backbone + 3x3 conv layers + the S x S output head (module docstring for the output).

    Args:
        backbone: a module with ``out_channels`` mapping images to one feature map.
        num_classes: C.
        grid_size: S.
        boxes_per_cell: B.
        head_convs: (channels, stride) of each 3x3 ConvBNLeaky after the backbone (paper:
            1024/1, 1024/2, 1024/1, 1024/1).
        head: ``fc`` (the paper: flatten the map pooled to ``fc_pool`` x ``fc_pool``, a
            ``fc_hidden`` linear layer, dropout, leaky 0.1, a linear layer to S*S*(5B+C)) or
            ``conv`` (the map pooled to S x S, a 1x1 conv to 5B+C per cell).
        fc_pool, fc_hidden, dropout: the fully connected head's sizes (paper at 448: 7, 4096, 0.5).
        prior_wh: ``Tensor[B, 2]`` or B pairs, anchor shapes (fractions of the input side);
            None: ones (the paper's plain w, h).

    Initialisation: conv layers darknet's (He normal); the output layer's weights N(0, 0.01^2)
    and biases 0 except x, y at 0.5 (the cell centre) and sqrt-w, sqrt-h at 1 with anchors
    (every predictor starts at its prior shape) or 0.5 without (a quarter of the image side):
    an untrained network then predicts boxes with non-zero IoU, so the responsible predictor
    is chosen by IoU from the first step. The paper does not state its init.

    ``forward(images)``: ``Tensor[N, 3, H, W]`` -> ``Tensor[N, S, S, 5B + C]``.

    Raises:
        ValueError: on sizes < 1, an unknown head, a ``prior_wh`` not ``[B, 2]``; in forward,
            images not ``[N, 3, H, W]``.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, grid_size: int, boxes_per_cell: int, *,
                 head_convs: Sequence[tuple[int, int]] = ((1024, 1), (1024, 2), (1024, 1), (1024, 1)),
                 head: str = "fc", fc_pool: int = 7, fc_hidden: int = 4096, dropout: float = 0.5,
                 prior_wh=None) -> None:
        super().__init__()
        if min(num_classes, grid_size, boxes_per_cell, fc_pool, fc_hidden) < 1:
            raise ValueError("num_classes, grid_size, boxes_per_cell, fc_pool and fc_hidden must be >= 1")
        if head not in ("fc", "conv"):
            raise ValueError(f"head must be fc or conv, got {head!r}")
        self.num_classes, self.grid_size, self.boxes_per_cell = int(num_classes), int(grid_size), int(boxes_per_cell)
        self.head_kind = head
        self.backbone = backbone
        channels = int(backbone.out_channels)
        convs = []
        for out, stride in head_convs:
            convs.append(ConvBNLeaky(channels, int(out), 3, int(stride)))
            channels = int(out)
        self.head_convs = nn.Sequential(*convs)
        darknet_init_(self.head_convs)
        per_cell = BOX_CHANNELS * self.boxes_per_cell + self.num_classes
        self.pool_side = int(fc_pool) if head == "fc" else self.grid_size
        if head == "fc":
            self.fc = nn.Sequential(
                nn.Flatten(),
                nn.Linear(channels * self.pool_side ** 2, int(fc_hidden)),
                nn.Dropout(float(dropout)),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            )
            self.output = nn.Linear(int(fc_hidden), self.grid_size ** 2 * per_cell)
        else:
            self.fc = nn.Identity()
            self.output = nn.Conv2d(channels, per_cell, 1)
        if prior_wh is None:
            prior = torch.ones(self.boxes_per_cell, 2)
        else:
            prior = torch.as_tensor(prior_wh, dtype=torch.float32).reshape(-1, 2).clone()
        if prior.shape != (self.boxes_per_cell, 2):
            raise ValueError(f"prior_wh must be [B={self.boxes_per_cell}, 2], got {tuple(prior.shape)}")
        self.register_buffer("prior_wh", prior)
        self.init_output(anchors=prior_wh is not None)

    @property
    def channels_per_cell(self) -> int:
        """``5B + C``."""
        return BOX_CHANNELS * self.boxes_per_cell + self.num_classes

    @torch.no_grad()
    def init_output(self, *, anchors: bool) -> None:
        """The output layer's init (class docstring); skipped on the meta device."""
        weight, bias = self.output.weight, self.output.bias
        if weight.is_meta:
            return
        nn.init.normal_(weight, 0.0, 0.01)
        per_cell = bias.view(-1, self.channels_per_cell)  # [S*S or 1, 5B + C]
        per_cell.zero_()
        boxes = per_cell[:, :BOX_CHANNELS * self.boxes_per_cell].view(per_cell.shape[0], self.boxes_per_cell,
                                                                     BOX_CHANNELS)
        boxes[..., 0:2] = 0.5
        boxes[..., 2:4] = 1.0 if anchors else 0.5

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"YOLOv1Network expects images [N, 3, H, W], got {tuple(images.shape)}")
        x = self.head_convs(self.backbone(images))
        if x.shape[-2:] != (self.pool_side, self.pool_side):
            x = F.adaptive_avg_pool2d(x, self.pool_side)
        n, s = images.shape[0], self.grid_size
        if self.head_kind == "fc":
            return self.output(self.fc(x)).view(n, s, s, self.channels_per_cell)
        return self.output(x).permute(0, 2, 3, 1)
