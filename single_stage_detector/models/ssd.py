"""A generic single-shot detector: backbone + extra feature blocks + one fused head per level.

The output layout matches :func:`single_stage_detector.box_coder.default_boxes`: default
box ``a`` is ordered by level, then row ``i``, then column ``j``, then box shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..box_coder import DefaultBoxSpec

__all__ = ["ExtraBlockSpec", "SSD", "init_fused_head_"]


@dataclass(frozen=True)
class ExtraBlockSpec:
    """One extra feature block: 1x1 conv ``in->mid`` + ReLU, 3x3 conv ``mid->out`` + ReLU.

    Both convs have a bias and no BatchNorm. Output size of the 3x3 conv:
    ``(F + 2 * padding - 3) // stride + 1``.
    """

    in_channels: int
    mid_channels: int
    out_channels: int
    stride: int
    padding: int

    def output_size(self, input_size: int) -> int:
        """Spatial size after this block for a square ``input_size`` map."""
        return (input_size + 2 * self.padding - 3) // self.stride + 1


def _extra_block(spec: ExtraBlockSpec) -> nn.Sequential:
    # Indices 0 and 2 hold the convs (names extras.K.0.* and extras.K.2.*).
    return nn.Sequential(
        nn.Conv2d(spec.in_channels, spec.mid_channels, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(spec.mid_channels, spec.out_channels, kernel_size=3, stride=spec.stride, padding=spec.padding),
        nn.ReLU(inplace=True),
    )


def _run_features(backbone: nn.Module, extras: nn.ModuleList, images: Tensor) -> list[Tensor]:
    x = backbone(images)
    feats = [x]
    for block in extras:
        x = block(x)
        feats.append(x)
    return feats


def init_fused_head_(weight: Tensor, boxes_per_location: int, num_classes: int) -> Tensor:
    """Xavier-uniform init of a fused loc+class head as if it were the reference's two convs.

    The MLPerf reference (mlcommons/training ``single_stage_detector/ssd/ssd300.py``) has
    separate location (``n*4`` outputs) and class (``n*C`` outputs) convs per level, each
    ``xavier_uniform_``-initialised. Xavier on the fused ``n*(4+C)``-output weight would
    use the fused fan-out and start the location weights at 0.61-0.72x the reference's
    bound, so each part is drawn with the bound of its own conv:
    ``sqrt(6 / (c_in*k*k + n*4*k*k))`` for location, ``sqrt(6 / (c_in*k*k + n*C*k*k))``
    for classes.

    Args:
        weight: ``Tensor[n*(4+C), c_in, k, k]``, box-major: the channels of box ``b`` are
            ``b*(4+C) .. b*(4+C)+3`` (location) then ``C`` class logits (see :class:`SSD`).
        boxes_per_location: ``n``.
        num_classes: ``C`` (with background).

    Returns:
        ``weight``, filled in place.
    """
    out_channels, in_channels = weight.shape[:2]
    per_box = 4 + num_classes
    if out_channels != boxes_per_location * per_box:
        raise ValueError(f"head weight has {out_channels} output channels, expected "
                         f"{boxes_per_location} x (4 + {num_classes})")
    receptive = weight[0, 0].numel()
    fan_in = in_channels * receptive
    w = weight.detach().view(boxes_per_location, per_box, *weight.shape[1:])
    with torch.no_grad():
        for part, width in ((w[:, :4], 4), (w[:, 4:], num_classes)):
            bound = math.sqrt(6.0 / (fan_in + boxes_per_location * width * receptive))
            part.uniform_(-bound, bound)
    return weight


class _FeatureExtractor(nn.Module):
    """Backbone + extras of an SSD as a module of their own (for meta-device shape checks)."""

    def __init__(self, backbone: nn.Module, extras: nn.ModuleList) -> None:
        super().__init__()
        self.backbone = backbone
        self.extras = extras

    def forward(self, images: Tensor) -> list[Tensor]:
        return _run_features(self.backbone, self.extras, images)


class SSD(nn.Module):
    """Single-shot detector.

    Feature maps: the backbone output, then one per extra block (applied in sequence).
    Level ``k`` has a single 3x3 pad-1 conv head with ``n_k * (4 + num_classes)`` output
    channels, ``n_k = box_spec.boxes_per_location[k]``; for each box the first 4
    channels are the location offsets and the next ``num_classes`` the class logits.

    Args:
        backbone: module ``Tensor[B, 3, S, S] -> Tensor[B, backbone.out_channels, F0, F0]``.
        extra_blocks: specs of the extra blocks, chained (block 0 takes the backbone output).
        box_spec: default-box geometry; its ``feature_sizes`` must be the sizes of the
            feature maps for an input of ``box_spec.image_size`` (checked here).
        num_classes: number of classes including background (81 for COCO).

    Raises:
        ValueError: inconsistent channels, level count or feature-map sizes.
    """

    def __init__(
        self,
        backbone: nn.Module,
        extra_blocks: Sequence[ExtraBlockSpec],
        box_spec: DefaultBoxSpec,
        num_classes: int = 81,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + 1 class), got {num_classes}")
        channels = [int(backbone.out_channels)]
        for k, blk in enumerate(extra_blocks):
            if blk.in_channels != channels[-1]:
                raise ValueError(
                    f"extra block {k} expects {blk.in_channels} input channels but the previous "
                    f"feature map has {channels[-1]}"
                )
            channels.append(blk.out_channels)
        if len(channels) != len(box_spec.feature_sizes):
            raise ValueError(
                f"the model has {len(channels)} feature levels (backbone + {len(extra_blocks)} extra "
                f"blocks) but the box spec has {len(box_spec.feature_sizes)}"
            )

        self.backbone = backbone
        self.extras = nn.ModuleList(_extra_block(b) for b in extra_blocks)
        self.heads = nn.ModuleList(
            nn.Conv2d(c, n * (4 + num_classes), kernel_size=3, padding=1)
            for c, n in zip(channels, box_spec.boxes_per_location)
        )
        self.box_spec = box_spec
        self.num_classes = num_classes
        self.input_size = box_spec.image_size
        self.feature_channels: tuple[int, ...] = tuple(channels)
        self._init_weights()

        sizes = self.feature_map_sizes(box_spec.image_size)
        if sizes != tuple(box_spec.feature_sizes):
            raise ValueError(
                f"for a {box_spec.image_size}x{box_spec.image_size} input the model produces feature "
                f"maps of sizes {sizes} but the box spec expects {tuple(box_spec.feature_sizes)}"
            )

    def _init_weights(self) -> None:
        # SPEC: xavier_uniform on every weight with dim > 1 in extras and heads; biases keep
        # PyTorch's default init. The backbone keeps its own (torchvision) init.
        for p in self.extras.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for head, n in zip(self.heads, self.box_spec.boxes_per_location):
            init_fused_head_(head.weight, n, self.num_classes)

    @property
    def num_default_boxes(self) -> int:
        """A, the number of default boxes (predictions per image)."""
        return self.box_spec.num_boxes

    def feature_map_sizes(self, input_size: int) -> tuple[int, ...]:
        """Spatial sizes of the feature maps for a square ``input_size`` input.

        Runs the backbone and extra blocks on the ``meta`` device (shapes only, no compute,
        real parameters and buffers untouched).
        """
        extractor = _FeatureExtractor(self.backbone, self.extras)
        tensors = {n: torch.empty_like(t, device="meta") for n, t in extractor.named_parameters()}
        tensors.update({n: torch.empty_like(t, device="meta") for n, t in extractor.named_buffers()})
        # Batch 2 so that training-mode BatchNorm accepts 1x1 maps.
        x = torch.empty(2, 3, input_size, input_size, device="meta")
        feats = functional_call(extractor, tensors, (x,))
        return tuple(int(f.shape[-1]) for f in feats)

    def features(self, images: Tensor) -> list[Tensor]:
        """Feature maps ``[Tensor[B, C_k, F_k, F_k]]`` for ``images`` ``Tensor[B, 3, S, S]``."""
        return _run_features(self.backbone, self.extras, images)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Predict box offsets and class logits for every default box.

        Args:
            images: ``Tensor[B, 3, S, S]``, normalised (contiguous or channels_last).

        Returns:
            ``(loc Tensor[B, A, 4], cls_logits Tensor[B, A, num_classes])``, both contiguous,
            in the dtype of the head convs' output (e.g. fp16 under autocast); ``A`` ordered
            like ``box_coder.default_boxes(box_spec)``.
        """
        if images.shape[-2:] != (self.input_size, self.input_size):
            # Other sizes give other feature maps, which would not line up with the default boxes.
            raise ValueError(
                f"expected images of size {self.input_size}x{self.input_size}, got {tuple(images.shape)}"
            )
        feats = self.features(images)
        batch = images.shape[0]
        locs, logits = [], []
        for feat, head in zip(feats, self.heads):
            out = head(feat)  # [B, n*(4+C), H, W]
            # [B, H, W, n*(4+C)] -> [B, H*W*n, 4+C]: row, column, box shape, as default_boxes.
            # (With channels_last activations this permute is already contiguous.)
            out = out.permute(0, 2, 3, 1).reshape(batch, -1, 4 + self.num_classes)
            locs.append(out[..., :4])
            logits.append(out[..., 4:])
        return torch.cat(locs, dim=1), torch.cat(logits, dim=1)
