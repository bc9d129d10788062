"""Tests of darknet ``.weights`` reading and writing: published sizes, layout, round trips, refusals."""
from __future__ import annotations

import errno
import struct

import numpy as np
import pytest
import torch
from torch import nn

from single_stage_detector.backbones.darknet import Darknet53
from single_stage_detector.checkpoint import OutputWriteError
from single_stage_detector.detectors.yolo import darknet_weights
from single_stage_detector.detectors.yolo.darknet_weights import (
    DarknetWeightsError,
    darknet_weights_nbytes,
    read_darknet_weights,
    write_darknet_weights,
)
from single_stage_detector.detectors.yolo.network import YOLOv3Network

TINY = dict(width=8, stage_blocks=(1, 1, 1, 1, 1))
TINY_BACKBONE_CONVS = 16  # stem + 5 stages x (stride-2 conv + one block's 2 convs)

# Published file sizes: yolov3.weights (80 classes) and darknet53.conv.74.
YOLOV3_WEIGHTS_BYTES = 248_007_048
DARKNET53_CONV74_BYTES = 162_482_580


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BatchNorm statistic random (variance positive), so nothing is at its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) * (1.0 if "running_var" in name else 2.0)
                        + (0.1 if "running_var" in name else -1.0))
    return model


def tiny(num_classes: int = 3, seed: int = 0) -> YOLOv3Network:
    return randomise(YOLOv3Network(num_classes, **TINY), seed).eval()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    return bool(keys) and all(torch.equal(a[k], b[k]) for k in keys)


def test_published_file_sizes():
    # Hand computation (cfg/yolov3.cfg, 80 classes): 75 convs; 72 with BatchNorm store 4 * n + n*c*k*k
    # floats, the 3 output convs n + n*c: 62,001,757 floats = the 61,949,149 parameters + the
    # 2 * 26,304 running statistics of the BN layers. Header 20 bytes (version 0.2: int64 seen):
    # 20 + 4 * 62,001,757 = 248,007,048. The backbone (52 convs, layers 0-73): 40,620,640
    # floats = 40,584,928 parameters + 2 * 17,856 statistics; 20 + 4 * 40,620,640 = 162,482,580.
    with torch.device("meta"):
        net = YOLOv3Network()
    assert darknet_weights_nbytes(net) == YOLOV3_WEIGHTS_BYTES == 20 + 4 * 62_001_757
    assert darknet_weights_nbytes(net, max_conv_layers=52) == DARKNET53_CONV74_BYTES == 20 + 4 * 40_620_640
    params = sum(p.numel() for p in net.parameters())
    stats = sum(bn.num_features for _, _, bn in net.darknet_conv_layers() if bn is not None)
    assert (params, stats) == (61_949_149, 26_304)
    assert params + 2 * stats == 62_001_757
    assert darknet_weights_nbytes(net, version=(0, 1, 0)) == YOLOV3_WEIGHTS_BYTES - 4  # int32 seen
    with torch.device("meta"):
        backbone = Darknet53()
    assert darknet_weights_nbytes(backbone) == DARKNET53_CONV74_BYTES


def test_full_model_file_is_published_size_and_round_trips(tmp_path):
    torch.manual_seed(0)
    source = YOLOv3Network()
    path = tmp_path / "yolov3.weights"
    write_darknet_weights(source, path, seen=32_013_312)
    assert path.stat().st_size == YOLOV3_WEIGHTS_BYTES
    with open(path, "rb") as fh:
        assert struct.unpack("<3iQ", fh.read(20)) == (0, 2, 0, 32_013_312)
    with torch.device("meta"):
        target = YOLOv3Network()
    target.to_empty(device="cpu")  # uninitialised memory: every value must come from the file
    header = read_darknet_weights(target, path)
    assert header == {"major": 0, "minor": 2, "revision": 0, "seen": 32_013_312}
    assert same(state(source), state(target))
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write left no temporary file


def test_float_order_in_file(tmp_path):
    # After the 20-byte header, layer 0 (BN): beta [n], gamma [n], mean [n], var [n], weights
    # [n, c, k, k] row-major; the last layer (output conv, no BN): bias [n], weights [n, c, 1, 1].
    net = tiny()
    path = tmp_path / "t.weights"
    write_darknet_weights(net, path)
    floats = np.fromfile(path, dtype="<f4", offset=20)
    bn, conv = net.backbone.stem.bn, net.backbone.stem.conv
    n = 8  # stem filters at width 8; weights 8 x 3 x 3 x 3 = 216
    expected = torch.cat([bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight.flatten()])
    assert torch.equal(torch.from_numpy(floats[:4 * n + 216].copy()), expected.detach())
    last = net.output_convs[2]  # 24 filters reading 64 channels
    tail = torch.cat([last.bias, last.weight.flatten()]).detach()
    assert tail.numel() == 24 + 24 * 64
    assert torch.equal(torch.from_numpy(floats[-tail.numel():].copy()), tail)
    assert floats.size * 4 + 20 == darknet_weights_nbytes(net) == path.stat().st_size


def test_round_trip_gives_bit_identical_outputs(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    images = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        before = source(images)
        assert not torch.equal(target(images)[0], before[0])
    path = tmp_path / "tiny.weights"
    write_darknet_weights(source, path)
    read_darknet_weights(target, path)
    with torch.no_grad():
        after = target(images)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_reads_version_0_1_header_with_int32_seen(tmp_path):
    # major * 10 + minor < 2: seen is an int32 (src/parser.c); the payload is unchanged.
    net = tiny()
    path = tmp_path / "new.weights"
    write_darknet_weights(net, path)
    old = tmp_path / "old.weights"
    old.write_bytes(struct.pack("<3ii", 0, 1, 0, 4242) + path.read_bytes()[20:])
    target = tiny(seed=5)
    assert read_darknet_weights(target, old) == {"major": 0, "minor": 1, "revision": 0, "seen": 4242}
    assert same(state(net), state(target))


def test_truncated_file_names_the_layer_and_changes_nothing(tmp_path):
    net = tiny()
    path = tmp_path / "cut.weights"
    write_darknet_weights(net, path)
    # Stop 10 floats into the conv list's entry 7: layer 9 of the tiny cfg (stem 0, stages 1 and 2
    # at 1-4 and 5-8), the stride-2 conv of stage 3, 32 -> 64 filters, 3x3: it stores
    # 4 * 64 + 64 * 32 * 9 = 18,688 floats.
    layers = net.darknet_conv_layers()
    assert (layers[7][0], layers[7][1].out_channels, layers[7][1].in_channels) == (9, 64, 32)
    start = sum(4 * c.out_channels + c.weight.numel() for _, c, _ in layers[:7])
    data = path.read_bytes()
    path.write_bytes(data[:20 + 4 * (start + 10)])
    target = tiny(seed=7)
    before = state(target)
    with pytest.raises(DarknetWeightsError) as err:
        read_darknet_weights(target, path)
    message = str(err.value)
    assert str(path) in message and "too short" in message
    assert "layer 9 (convolutional, 64 filters, 3x3)" in message
    assert "needs 18,688 floats and has 10" in message
    assert same(before, state(target))


@pytest.mark.parametrize("extra, shown", [(b"\0" * 8, "2 floats left"), (b"\0" * 6, "1 floats and 2 bytes")])
def test_extra_bytes_are_refused_after_the_last_layer(tmp_path, extra, shown):
    net = tiny()
    path = tmp_path / "long.weights"
    write_darknet_weights(net, path)
    path.write_bytes(path.read_bytes() + extra)
    target = tiny(seed=3)
    before = state(target)
    with pytest.raises(DarknetWeightsError) as err:
        read_darknet_weights(target, path)
    message = str(err.value)
    assert str(path) in message and "too long" in message and shown in message
    # The tiny cfg: backbone layers 0-20 (stem + 5 x (conv + 2 convs + shortcut)), then the head's
    # 31 layers (21-51, as 75-105 in yolov3.cfg): the last conv is layer 51.
    assert "after the last layer read, layer 51 (convolutional, 24 filters, 1x1)" in message
    assert same(before, state(target))
    read_darknet_weights(target, path, allow_trailing=True)  # explicitly asked: the rest is ignored
    assert same(state(net), state(target))


def test_other_class_count_is_diagnosed(tmp_path):
    # Each class adds 3 filters to each output conv, each with in_channels + 1 floats:
    # 3 * ((256 + 1) + (128 + 1) + (64 + 1)) = 1,353 floats per class for the tiny model.
    path = tmp_path / "coco80.weights"
    write_darknet_weights(tiny(num_classes=80), path)
    with pytest.raises(DarknetWeightsError, match="would fit this network with 80 classes instead of 3"):
        read_darknet_weights(tiny(num_classes=3), path)
    small = tmp_path / "two.weights"
    write_darknet_weights(tiny(num_classes=2), small)
    with pytest.raises(DarknetWeightsError, match="too short.*with 2 classes instead of 3"):
        read_darknet_weights(tiny(num_classes=3), small)
    assert (darknet_weights_nbytes(tiny(80)) - darknet_weights_nbytes(tiny(3))) == 4 * 77 * 1_353


def test_backbone_only_file(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    backbone_file = tmp_path / "backbone.conv"
    write_darknet_weights(source, backbone_file, max_conv_layers=TINY_BACKBONE_CONVS)
    with torch.device("meta"):
        meta_backbone = Darknet53(**TINY)
    assert backbone_file.stat().st_size == darknet_weights_nbytes(meta_backbone)
    before = state(target)
    read_darknet_weights(target, backbone_file, max_conv_layers=TINY_BACKBONE_CONVS)
    after = state(target)
    assert same(state(source), after, "backbone.")  # the backbone is the source's
    head = [k for k in after if not k.startswith("backbone.")]
    assert head and all(torch.equal(before[k], after[k]) for k in head)  # the head untouched
    assert not any(torch.equal(state(source)[k], after[k]) for k in head)
    # A whole-model read of the backbone file is too short: it ends at the first head conv
    # (layer 21, 1x1, 256 -> 128 channels: 4 * 128 + 128 * 256 = 33,280 floats).
    with pytest.raises(DarknetWeightsError, match="ends inside layer 21 \\(convolutional, 128 filters, 1x1\\), "
                       "which needs 33,280 floats and has 0 .* pass max_conv_layers=16"):
        read_darknet_weights(tiny(seed=4), backbone_file)
    # The backbone file also loads into a Darknet53 of the same shape, as a whole-model read.
    alone = randomise(Darknet53(**TINY), 9)
    read_darknet_weights(alone, backbone_file)
    assert same(state(source.backbone), state(alone))


def test_backbone_of_a_full_file_needs_allow_trailing(tmp_path):
    source, target = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "full.weights"
    write_darknet_weights(source, path)
    with pytest.raises(DarknetWeightsError, match="too long.*allow_trailing=True"):
        read_darknet_weights(target, path, max_conv_layers=TINY_BACKBONE_CONVS)
    before = state(target)
    read_darknet_weights(target, path, max_conv_layers=TINY_BACKBONE_CONVS, allow_trailing=True)
    after = state(target)
    assert same(state(source), after, "backbone.")
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("backbone."))


@pytest.mark.parametrize("content, match", [
    (b"", "shorter than the darknet header"),
    (struct.pack("<3i", 0, 2, 0) + b"\0\0", "shorter than the 20-byte header"),
    (struct.pack("<3iQ", -1, 2, 0, 0), "invalid darknet header"),
    (b"PK\x03\x04" + b"\0" * 40, "not a darknet .weights file"),
])
def test_bad_headers(tmp_path, content, match):
    path = tmp_path / "bad.weights"
    path.write_bytes(content)
    with pytest.raises(DarknetWeightsError, match=match) as err:
        read_darknet_weights(tiny(), path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_checkpoint_is_refused(tmp_path, legacy):
    path = tmp_path / "model.pt"
    torch.save(tiny().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(DarknetWeightsError, match="PyTorch/pickle file"):
        read_darknet_weights(tiny(), path)


def test_write_is_atomic_and_checks_arguments(tmp_path, monkeypatch):
    path = tmp_path / "keep.weights"
    write_darknet_weights(tiny(), path)
    good = path.read_bytes()
    broken = tiny()
    broken.output_convs[1].bias = None  # a conv without BatchNorm and without bias: not darknet's
    with pytest.raises(ValueError, match="needs a bias"):
        write_darknet_weights(broken, path)
    assert path.read_bytes() == good  # the previous file is intact
    # A write failing half-way (disk full at the 10th tensor) leaves the old file and no temp file.
    calls = []

    def full_disk(tensor):
        calls.append(1)
        if len(calls) == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_to_bytes(tensor)

    real_to_bytes = darknet_weights._to_bytes
    monkeypatch.setattr(darknet_weights, "_to_bytes", full_disk)
    with pytest.raises(OutputWriteError, match="keep.weights"):
        write_darknet_weights(tiny(seed=8), path)
    assert len(calls) == 10
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.weights"]  # no temp file left
    monkeypatch.undo()
    with torch.device("meta"):
        meta = YOLOv3Network(3, **TINY)
    with pytest.raises(ValueError, match="meta device"):
        write_darknet_weights(meta, path)
    with pytest.raises(ValueError, match="seen"):
        write_darknet_weights(tiny(), path, seen=-1)
    with pytest.raises(ValueError, match="max_conv_layers"):
        write_darknet_weights(tiny(), path, max_conv_layers=0)
    with pytest.raises(ValueError, match="max_conv_layers"):
        read_darknet_weights(tiny(), path, max_conv_layers=1000)
    with pytest.raises(TypeError, match="darknet_conv_layers"):
        read_darknet_weights(nn.Conv2d(3, 3, 1), path)
    with pytest.raises(FileNotFoundError):
        read_darknet_weights(tiny(), tmp_path / "missing.weights")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(tmp_path):
    source, target = tiny(seed=1).cuda(), tiny(seed=2).cuda()
    path = tmp_path / "cuda.weights"
    write_darknet_weights(source, path)
    read_darknet_weights(target, path)
    images = torch.rand(1, 3, 96, 128, device="cuda")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(source(images), target(images)))
    cpu = tiny(seed=3)
    read_darknet_weights(cpu, path)  # a file written from CUDA reads on the CPU
    assert same(state(source.cpu()), state(cpu))


def test_command_imports_and_exports_yolov2_and_refuses_backbone_files(tmp_path):
    """``darknet-weights`` reads and writes the YOLOv2 presets of darknet layout (yolov2.weights
    fits yolov2_darknet19), byte for byte; a backbone-only file is refused naming ``train
    --pretrained-backbone``; a preset without a darknet layout is refused in one line."""
    from cli_runner import run_cli
    from single_stage_detector.detectors.base import build_detector, get_preset

    model = randomise(build_detector(get_preset("yolov2_tiny_cpu")).model, 3)
    source = tmp_path / "v2.weights"
    write_darknet_weights(model, source, seen=12_345)
    ckpt, back = tmp_path / "v2.pt", tmp_path / "back.weights"
    done = run_cli(["darknet-weights", "import", str(source), "-o", str(ckpt), "--preset", "yolov2_tiny_cpu"])
    assert done.returncode == 0, done.stderr
    done = run_cli(["darknet-weights", "export", str(ckpt), "-o", str(back)])
    assert done.returncode == 0, done.stderr
    assert back.read_bytes() == source.read_bytes()  # weights and darknet's seen (the prior warm-up's count)

    backbone = tmp_path / "backbone.conv"
    write_darknet_weights(model, backbone, max_conv_layers=len(model.backbone.darknet_conv_layers()))
    done = run_cli(["darknet-weights", "import", str(backbone), "-o", str(tmp_path / "x.pt"),
                    "--preset", "yolov2_tiny_cpu"])
    assert done.returncode == 2 and "train --pretrained-backbone" in done.stderr
    assert "max_conv_layers" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = run_cli(["darknet-weights", "import", str(source), "-o", str(tmp_path / "x.pt"),
                    "--preset", "yolov2_resnet50"])
    assert done.returncode == 2 and "yolov2_resnet50 has no darknet layout" in done.stderr
    assert not (tmp_path / "x.pt").exists()


def test_backbone_file_reader_refuses_a_whole_network_in_command_line_terms(tmp_path):
    """--pretrained-backbone given a whole-network file (yolov3.weights instead of darknet53.conv.74):
    refused naming the backbone file and --init-checkpoint, not read_darknet_weights' allow_trailing."""
    from single_stage_detector.detectors.yolo.darknet_weights import read_backbone_file

    source, target = tiny(seed=1), tiny(seed=2)
    whole, backbone = tmp_path / "whole.weights", tmp_path / "backbone.conv"
    write_darknet_weights(source, whole)
    write_darknet_weights(source, backbone, max_conv_layers=TINY_BACKBONE_CONVS)
    before = state(target)
    with pytest.raises(DarknetWeightsError, match="darknet53.conv.74.*--init-checkpoint") as info:
        read_backbone_file(target, whole, max_conv_layers=TINY_BACKBONE_CONVS, backbone_file="darknet53.conv.74")
    assert "allow_trailing" not in str(info.value) and same(before, state(target))
    read_backbone_file(target, backbone, max_conv_layers=TINY_BACKBONE_CONVS, backbone_file="darknet53.conv.74")
    assert same(state(source), state(target), "backbone.")
