"""torchvision's ResNet-50 as a YOLOv2 backbone (seed 004: C4 = ``layer3``, C5 = ``layer4``) and
its ImageNet weight file.

The module keeps torchvision's attribute names (``conv1``, ``bn1``, ``layer1`` .. ``layer4``),
so its state dict is torchvision's ``resnet50().state_dict()`` without ``fc.*``, and a
torchvision ImageNet file (``resnet50-0676ba61.pth`` or ``resnet50-11ad3fa6.pth``: a pickled
state dict) loads into it by name.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ResNet50Backbone", "load_resnet50_weights"]


class ResNet50Backbone(nn.Module):
    """ResNet-50 (He et al., arXiv:1512.03385; torchvision's, Bottleneck v1.5: stride in the 3x3)
    up to ``layer4``, returning C4 and C5.

    ``forward(Tensor[B, 3, H, W])`` -> ``(C4 [B, 1024, H/16, W/16], C5 [B, 2048, H/32, W/32])``
    (13 x 13 x 2048 at 416). Weights start as torchvision's random init; ImageNet weights come
    from a file (:func:`load_resnet50_weights`). Inputs are normalised with the ImageNet mean and
    standard deviation (the preset's ``mean`` / ``std``), as the weights expect.
    """

    strides: tuple[int, int] = (16, 32)
    out_channels: tuple[int, int] = (1024, 2048)

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        c4 = self.layer3(self.layer2(self.layer1(x)))
        return c4, self.layer4(c4)


def load_resnet50_weights(backbone: ResNet50Backbone, path: str | os.PathLike) -> None:
    """Copy torchvision ResNet-50 ImageNet weights from ``path`` into ``backbone``.

    The file: a state dict saved by ``torch.save`` (torchvision's download, or ``{"state_dict":
    ...}``), read with ``weights_only=True``. ``fc.*`` (the classifier) is dropped; every other
    key must match the backbone's keys and shapes. BatchNorm ``num_batches_tracked`` counters
    are optional (0 where missing). Values are copied as float32.

    Raises:
        BackboneWeightsError (``models.backbone_weights``): the file is missing, unreadable, not a
            state dict of tensors, or has missing / unexpected keys or other shapes; the message
            names the file. The backbone is unchanged then.
    """
    from ...models.backbone_weights import BackboneWeightsError

    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"ResNet-50 backbone weights file not found: {path}" if not path.exists()
                                   else f"ResNet-50 backbone weights path is not a file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch raise their own types
        raise BackboneWeightsError(f"{path}: cannot read ResNet-50 weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise BackboneWeightsError(f"{path}: not a state dict of tensors (a torchvision ResNet-50 .pth is expected)")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{what}: {', '.join(keys[:5])}{f' ... ({len(keys)} in all)' if len(keys) > 5 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shape mismatches", mismatched)) if keys]
    if problems:
        raise BackboneWeightsError(f"{path}: does not fit torchvision's ResNet-50; " + "; ".join(problems))
    out = {}
    for key, value in expected.items():
        if key.endswith("num_batches_tracked"):
            out[key] = state.get(key, torch.zeros((), dtype=torch.int64)).to(torch.int64)
        else:
            out[key] = state[key].to(torch.float32)
    backbone.load_state_dict(out, strict=True)
