"""Tests of the Darknet-53 backbone and the YOLOv3 network: cfg layout, shapes, channel layout, init."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from single_stage_detector.backbones.darknet import (
    BN_EPS,
    BN_MOMENTUM,
    ConvBNLeaky,
    Darknet53,
    DarknetResidual,
    darknet_bn_momentum,
)
from single_stage_detector.detectors.yolo.anchors import YOLOV3_STRIDES
from single_stage_detector.detectors.yolo.network import YOLOv3Network

TINY = dict(width=8, stage_blocks=(1, 1, 1, 1, 1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def yolov3_cfg_sections() -> list[tuple]:
    """darknet ``cfg/yolov3.cfg`` after ``[net]``, transcribed: one tuple per section.

    ``("conv", filters, size, stride, batch_normalize)``, ``("shortcut",)``, ``("route", layers)``,
    ``("upsample",)``, ``("yolo",)``. Written from the cfg text, not from the model code.
    """
    s: list[tuple] = [("conv", 32, 3, 1, True)]
    for filters, blocks in ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4)):
        s.append(("conv", filters, 3, 2, True))
        for _ in range(blocks):
            s += [("conv", filters // 2, 1, 1, True), ("conv", filters, 3, 1, True), ("shortcut",)]
    for k, (mid, skip) in enumerate(((512, None), (256, 61), (128, 36))):
        if k:
            s += [("route", (-4,)), ("conv", mid, 1, 1, True), ("upsample",), ("route", (-1, skip))]
        one, three = ("conv", mid, 1, 1, True), ("conv", 2 * mid, 3, 1, True)
        s += [one, three, one, three, one, three, ("conv", 255, 1, 1, False), ("yolo",)]
    return s


CFG = yolov3_cfg_sections()


def test_cfg_transcription_landmarks():
    # Landmarks read off yolov3.cfg: 107 sections (0..106); the yolo layers, routes and upsamples
    # where darknet prints them; the backbone ends with the shortcut at 74.
    assert len(CFG) == 107
    assert [i for i, sec in enumerate(CFG) if sec[0] == "yolo"] == [82, 94, 106]
    assert [i for i, sec in enumerate(CFG) if sec[0] == "route"] == [83, 86, 95, 98]
    assert [i for i, sec in enumerate(CFG) if sec[0] == "upsample"] == [85, 97]
    assert CFG[36] == CFG[61] == CFG[74] == ("shortcut",)
    assert CFG[75:82] == [("conv", 512, 1, 1, True), ("conv", 1024, 3, 1, True)] * 2 + [
        ("conv", 512, 1, 1, True), ("conv", 1024, 3, 1, True), ("conv", 255, 1, 1, False)]


@pytest.fixture(scope="module")
def meta_yolov3() -> YOLOv3Network:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return YOLOv3Network().eval()


def test_conv_layers_follow_yolov3_cfg(meta_yolov3):
    expected = [(i, sec[1], sec[2], sec[3], sec[4]) for i, sec in enumerate(CFG) if sec[0] == "conv"]
    got = [(n, conv.out_channels, conv.kernel_size[0], conv.stride[0], bn is not None)
           for n, conv, bn in meta_yolov3.darknet_conv_layers()]
    assert got == expected
    assert len(got) == 75
    for n, conv, bn in meta_yolov3.darknet_conv_layers():
        assert conv.padding[0] == conv.kernel_size[0] // 2  # pad=1 in darknet: size / 2
        assert (conv.bias is None) == (bn is not None)  # BN convs have no bias, output convs do
        if bn is not None:
            assert bn.num_features == conv.out_channels


def test_route_input_channels(meta_yolov3):
    # [route] -1, 61 concatenates the upsampled 256 (layer 84) with C4's 512: layer 87 reads 768;
    # [route] -1, 36: 128 + 256 = 384 into layer 99. Route -4 feeds layer 79's 512 to 84, 91's 256 to 96.
    convs = {n: conv for n, conv, _ in meta_yolov3.darknet_conv_layers()}
    assert convs[87].in_channels == 768 and convs[99].in_channels == 384
    assert convs[84].in_channels == 512 and convs[96].in_channels == 256
    assert convs[75].in_channels == 1024  # C5
    assert [convs[n].in_channels for n in (81, 93, 105)] == [1024, 512, 256]


def test_parameter_count(meta_yolov3):
    # Hand sum from the cfg: each conv has filters * c * k * k weights; + 2 * filters (BN scale,
    # shift) or + filters (output conv bias). 61,949,149 is YOLOv3's well-known parameter count;
    # the backbone (layers 0-74) holds 40,584,928 of them.
    total, channels, outputs = 0, [3], []
    for sec in CFG:
        if sec[0] == "conv":
            _, n, k, _, bn = sec
            total += n * channels[-1] * k * k + (2 * n if bn else n)
            channels.append(n)
        elif sec[0] == "route":
            layers = [i if i >= 0 else len(channels) - 1 + i for i in sec[1]]
            channels.append(sum(channels[i + 1] for i in layers))
        else:  # shortcut, upsample, yolo keep the channel count (yolo: of its input)
            channels.append(channels[-1])
        outputs.append(channels[-1])
    assert total == 61_949_149
    assert sum(p.numel() for p in meta_yolov3.parameters()) == total
    assert sum(p.numel() for p in meta_yolov3.backbone.parameters()) == 40_584_928
    assert [outputs[i] for i in (36, 61, 74)] == [256, 512, 1024]


def test_backbone_is_first_52_convs(meta_yolov3):
    layers = meta_yolov3.darknet_conv_layers()
    backbone = meta_yolov3.backbone.darknet_conv_layers()
    assert len(backbone) == 52 and backbone[-1][0] == 73 and layers[52][0] == 75
    assert all(a[1] is b[1] and a[2] is b[2] for a, b in zip(layers, backbone))
    assert meta_yolov3.backbone.num_darknet_layers == 75
    assert meta_yolov3.backbone.darknet_layer_of_maps == (36, 61, 74)
    assert meta_yolov3.backbone.out_channels == (256, 512, 1024)


@pytest.mark.parametrize("size, grids", [(416, (13, 26, 52)), (320, (10, 20, 40)), (608, (19, 38, 76))])
def test_output_shapes_full_model(meta_yolov3, size, grids):
    # Grid = size / stride for strides 32, 16, 8; channels 3 * (5 + 80) = 255. Meta tensors: shape only.
    outputs = meta_yolov3(torch.empty(2, 3, size, size, device="meta"))
    assert [tuple(o.shape) for o in outputs] == [(2, 255, g, g) for g in grids]
    assert tuple(size // s for s in YOLOV3_STRIDES) == grids


def test_non_square_and_class_count(meta_yolov3):
    with torch.device("meta"):
        net = YOLOv3Network(num_classes=20, num_anchors=2).eval()
        outputs = net(torch.empty(1, 3, 320, 512))
    # 2 * (5 + 20) = 50 channels; 320 x 512 -> 10 x 16, 20 x 32, 40 x 64.
    assert [tuple(o.shape) for o in outputs] == [(1, 50, 10, 16), (1, 50, 20, 32), (1, 50, 40, 64)]


def test_tiny_forward_at_128():
    torch.manual_seed(0)
    net = YOLOv3Network(num_classes=3, **TINY).eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        outputs = net(images)
        c3, c4, c5 = net.backbone(images)
    # 3 * (5 + 3) = 24 channels; 128 / 32 = 4, / 16 = 8, / 8 = 16.
    assert [tuple(o.shape) for o in outputs] == [(2, 24, 4, 4), (2, 24, 8, 8), (2, 24, 16, 16)]
    # width 8: C3, C4, C5 have 8 * 8, 16 * 8, 32 * 8 channels.
    assert (tuple(c3.shape), tuple(c4.shape), tuple(c5.shape)) == ((2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4))
    assert all(torch.isfinite(o).all() for o in outputs)
    # [route] -1, 61 / -1, 36: the input of each finer conv set is [2x nearest upsample of the
    # lateral 1x1 conv's output, then the backbone map], in that order (darknet weights rely on it).
    seen = {}
    hooks = [net.conv_sets[k].register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(("in", k), args[0]))
             for k in (1, 2)]
    hooks += [net.lateral_convs[k].register_forward_hook(lambda m, args, out, k=k: seen.__setitem__(("lat", k), out))
              for k in (0, 1)]
    with torch.no_grad():
        net(images)
    for hook in hooks:
        hook.remove()
    for k, skip in ((1, c4), (2, c3)):
        lateral = seen[("lat", k - 1)]
        upsampled = lateral.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        assert torch.equal(seen[("in", k)], torch.cat([upsampled, skip], dim=1))
    # The upsampled paths carry information: the stride-8 map depends on the coarse C5 path.
    with torch.no_grad():
        net.lateral_convs[1].bn.bias.add_(1.0)
        changed = net(images)
    assert torch.equal(changed[0], outputs[0]) and torch.equal(changed[1], outputs[1])
    assert not torch.equal(changed[2], outputs[2])


def test_tiny_backward():
    torch.manual_seed(0)
    net = YOLOv3Network(num_classes=2, **TINY).train()
    outputs = net(torch.rand(2, 3, 64, 96))
    sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("shape", [(1, 3, 100, 128), (1, 3, 128, 48), (1, 1, 128, 128), (3, 128, 128)])
def test_forward_refuses_bad_input(shape):
    net = YOLOv3Network(num_classes=1, **TINY)
    with pytest.raises(ValueError, match="multiples of 32|\\[B, 3, H, W\\]"):
        net(torch.zeros(shape))


@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(num_anchors=0), dict(objectness_prior=0.0),
                                    dict(objectness_prior=1.0), dict(width=0), dict(stage_blocks=(1, 1, 1, 1)),
                                    dict(stage_blocks=(1, 1, -1, 1, 1))])
def test_constructor_refuses_bad_config(kwargs):
    with pytest.raises(ValueError):
        YOLOv3Network(**{**TINY, **kwargs})


def test_channel_layout_and_objectness_prior():
    # With the output conv weights zeroed, each output channel equals its bias: the objectness
    # channel of anchor a is a * (5 + C) + 4 and starts at logit(0.01) = ln(0.01 / 0.99) = -4.59512.
    net = YOLOv3Network(num_classes=3, objectness_prior=0.01, **TINY).eval()
    with torch.no_grad():
        for conv in net.output_convs:
            conv.weight.zero_()
        outputs = net(torch.rand(1, 3, 64, 64))
    expected = torch.zeros(24)
    expected[[4, 12, 20]] = -4.59512
    for out in outputs:
        assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-5)
        assert torch.allclose(torch.sigmoid(out[0, 4]), torch.full_like(out[0, 4], 0.01))
    plain = YOLOv3Network(num_classes=3, **TINY)
    assert all(torch.equal(conv.bias, torch.zeros(24)) for conv in plain.output_convs)  # darknet: biases 0


def test_darknet_init():
    # Darknet's make_convolutional_layer: weights N(0, 2 / (c * k * k)). In the tiny model the 3x3
    # head conv of scale 0 reads 256 / 2 = 128 channels: std sqrt(2 / (128 * 9)) = 0.04167.
    torch.manual_seed(0)
    net = YOLOv3Network(num_classes=3, **TINY)
    weight = net.head_convs[0].conv.weight
    assert weight.shape == (256, 128, 3, 3)
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 1152), rel=0.02)
    assert abs(weight.mean().item()) < 0.002
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))


def test_batchnorm_constants():
    net = YOLOv3Network(num_classes=1, **TINY)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(net.darknet_conv_layers()) - 3  # all but the 3 output convs
    assert all(bn.eps == BN_EPS == 1e-5 and bn.momentum == BN_MOMENTUM == 0.1 for bn in bns)
    slow = YOLOv3Network(num_classes=1, bn_momentum=0.03, **TINY)
    assert all(m.momentum == 0.03 for m in slow.modules() if isinstance(m, nn.BatchNorm2d))
    # Darknet: rolling = 0.99 rolling + 0.01 batch per forward of 4 images (batch 64 / subdivisions 16).
    assert darknet_bn_momentum(4) == pytest.approx(0.01)
    assert darknet_bn_momentum(64) == pytest.approx(1 - 0.99 ** 16)  # 0.14854
    assert darknet_bn_momentum(42) == pytest.approx(0.1, abs=0.001)  # why 0.1 is the default
    with pytest.raises(ValueError):
        darknet_bn_momentum(0)


def test_conv_bn_leaky_matches_darknet_gpu_formula():
    # Inference: leaky_0.1(gamma * (conv(x) - mean) / sqrt(var + 1e-5) + beta) (darknet normalize_kernel).
    torch.manual_seed(0)
    layer = ConvBNLeaky(4, 6, 3, stride=2).eval()
    with torch.no_grad():
        layer.bn.running_mean.uniform_(-1, 1)
        layer.bn.running_var.uniform_(0.01, 2)
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-1, 1)
        x = torch.randn(2, 4, 9, 9)
        y = layer(x)
        z = nn.functional.conv2d(x, layer.conv.weight, stride=2, padding=1)
        bn = layer.bn
        z = (z - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
        z = z * bn.weight[:, None, None] + bn.bias[:, None, None]
        z = torch.where(z > 0, z, 0.1 * z)
    assert y.shape == (2, 6, 5, 5)  # ceil(9 / 2)
    assert torch.allclose(y, z, atol=1e-5)


def test_residual_block_adds_its_input():
    block = DarknetResidual(16).eval()
    with torch.no_grad():
        block.conv2.bn.weight.zero_()  # the branch outputs leaky(0) = 0
        x = torch.randn(1, 16, 5, 5)
        assert torch.equal(block(x), x)
    with pytest.raises(ValueError):
        DarknetResidual(15)


def test_darknet53_alone():
    backbone = Darknet53(width=4, stage_blocks=(0, 1, 2, 0, 1))
    # Layers: stem 0; stage 1: conv 1; stage 2: conv 2, block 3-5; stage 3: conv 6, blocks 7-12;
    # stage 4: conv 13; stage 5: conv 14, block 15-17. C3, C4, C5 end at layers 12, 13, 17.
    assert [n for n, _, _ in backbone.darknet_conv_layers()] == [0, 1, 2, 3, 4, 6, 7, 8, 10, 11, 13, 14, 15, 16]
    assert backbone.num_darknet_layers == 18
    assert backbone.darknet_layer_of_maps == (12, 13, 17)
    c3, c4, c5 = backbone(torch.rand(1, 3, 64, 32))
    assert (c3.shape[1:], c4.shape[1:], c5.shape[1:]) == ((32, 8, 4), (64, 4, 2), (128, 2, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu():
    torch.manual_seed(0)
    net = YOLOv3Network(num_classes=3, objectness_prior=0.01, **TINY).eval()
    images = torch.rand(2, 3, 128, 96)
    # cuDNN runs float32 convolutions in TF32 by default on Ampere and later GPUs (10-bit
    # mantissa): 20-40x this tolerance after a dozen layers. The comparison is of the maths, in
    # full float32, as torch's own tests do it (common_cuda.tf32_off).
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=None, benchmark=None, benchmark_limit=None,
                                                     deterministic=None, allow_tf32=False):
        cpu = net(images)
        gpu = net.cuda()(images.cuda())
    for a, b in zip(cpu, gpu):
        assert b.is_cuda and a.shape == b.shape
        assert torch.allclose(a, b.cpu(), atol=1e-3, rtol=1e-3)
