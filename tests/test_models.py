"""Tests of single_stage_detector.models: shapes, sizes, layout, init, weights files, MLPerf names."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import mlperf_logging
from single_stage_detector.box_coder import SSD300_BOX_SPEC, default_boxes
from single_stage_detector.models import (
    MLPERF_SSD_TENSOR_NAMES,
    NPZ_FORMAT,
    PRESETS,
    SSD,
    BackboneWeightsError,
    ExtraBlockSpec,
    ResNet34Backbone,
    TinyResNetBackbone,
    build_model,
    count_parameters,
    get_preset,
    load_backbone_into,
    load_backbone_state_dict,
    mlperf_tensor_names,
    save_backbone_npz,
)

SSD300_PARAMS = 19_972_534  # 8,170,304 backbone + extras + heads
SSD_TINY_PARAMS = 2_913_784  # with the preset's 81 classes


@pytest.fixture(scope="module")
def ssd300() -> SSD:
    torch.manual_seed(0)
    return build_model("ssd300_resnet34").eval()


@pytest.fixture(scope="module")
def tv_state_dict() -> dict[str, torch.Tensor]:
    """A random-init torchvision ResNet-34 state dict with non-trivial BN statistics."""
    torch.manual_seed(1)
    model = torchvision.models.resnet34(weights=None)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _truncated_torchvision(state: dict[str, torch.Tensor]) -> nn.Sequential:
    """Independent construction of the SPEC backbone from a torchvision model."""
    model = torchvision.models.resnet34(weights=None)
    model.load_state_dict(state)
    model.layer3[0].conv1.stride = (1, 1)
    model.layer3[0].downsample[0].stride = (1, 1)
    return nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3
    ).eval()


# -- sizes and shapes -------------------------------------------------------------------------
def test_ssd300_parameter_count(ssd300: SSD) -> None:
    n = count_parameters(ssd300)
    assert n == SSD300_PARAMS
    assert 19.5e6 <= n <= 20.5e6
    assert len(list(ssd300.parameters())) == 119
    assert len(list(ssd300.backbone.parameters())) == 87
    assert len(list(ssd300.extras.parameters())) == 20
    assert len(list(ssd300.heads.parameters())) == 12
    assert ssd300.backbone_pretrained is False
    assert ssd300.preset is PRESETS["ssd300_resnet34"] and ssd300.preset.is_benchmark


def test_ssd300_forward_shapes(ssd300: SSD) -> None:
    seen: dict[str, torch.Size] = {}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["layer3"] = output.shape

    handle = ssd300.backbone.layer3.register_forward_hook(hook)
    try:
        with torch.no_grad():
            loc, cls = ssd300(torch.randn(2, 3, 300, 300))
    finally:
        handle.remove()
    assert seen["layer3"] == (2, 256, 38, 38)
    assert loc.shape == (2, 8732, 4) and cls.shape == (2, 8732, 81)
    assert loc.is_contiguous() and cls.is_contiguous()
    assert ssd300.feature_map_sizes(300) == SSD300_BOX_SPEC.feature_sizes
    assert ssd300.num_default_boxes == 8732


def test_ssd_tiny_matches_its_default_boxes() -> None:
    model = build_model("ssd_tiny")
    assert count_parameters(model) == SSD_TINY_PARAMS
    spec = get_preset("ssd_tiny").box_spec
    with torch.no_grad():
        loc, cls = model(torch.randn(2, 3, 128, 128))
    num_boxes = default_boxes(spec).shape[0]
    assert loc.shape == (2, num_boxes, 4) and cls.shape == (2, num_boxes, 81)
    assert model.feature_map_sizes(128) == spec.feature_sizes == (16, 8, 4, 2, 1)
    assert build_model("ssd_tiny", num_classes=5)(torch.randn(1, 3, 128, 128))[1].shape == (1, num_boxes, 5)


def test_wrong_input_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="128x128"):
        build_model("ssd_tiny")(torch.randn(1, 3, 96, 96))


def test_inconsistent_box_spec_or_channels_raise() -> None:
    tiny = get_preset("ssd_tiny")
    with pytest.raises(ValueError, match="feature maps"):
        # The tiny model gives 16x16 .. 1x1 maps for 128x128 inputs, not 38 .. 1 for 300.
        SSD(TinyResNetBackbone(), tiny.extra_blocks + (tiny.extra_blocks[-1],), SSD300_BOX_SPEC)
    with pytest.raises(ValueError, match="input channels"):
        SSD(TinyResNetBackbone(), (ExtraBlockSpec(64, 64, 128, 2, 1),) + tiny.extra_blocks[1:], tiny.box_spec)
    with pytest.raises(ValueError, match="levels"):
        SSD(TinyResNetBackbone(), tiny.extra_blocks[:-1], tiny.box_spec)


def test_presets_registry() -> None:
    assert set(PRESETS) >= {"ssd300_resnet34", "ssd_tiny"}
    with pytest.raises(ValueError, match="ssd300_resnet34.*ssd_tiny|ssd_tiny.*ssd300_resnet34"):
        get_preset("ssd512")
    with pytest.raises(ValueError, match="no ImageNet"):
        build_model("ssd_tiny", pretrained_backbone="whatever.npz")


# -- initialisation ---------------------------------------------------------------------------
def test_xavier_init_on_extras(ssd300: SSD) -> None:
    convs = [m for m in ssd300.extras.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10
    for conv in convs:
        w = conv.weight.detach()
        fan_in = w.shape[1] * w[0, 0].numel()
        fan_out = w.shape[0] * w[0, 0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.1)
        # PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not zeroed.
        b = conv.bias.detach()
        assert b.abs().max() <= 1.0 / math.sqrt(fan_in) and b.abs().max() > 0


# Golden values: the reference's separate loc conv (n*4 outputs) and class conv (n*81
# outputs) per level, 3x3 kernels, xavier bound sqrt(6 / (fan_in + fan_out)) worked out by hand:
# level 0: c_in 256, n 4 -> loc sqrt(6 / (2304 + 144)) = 0.049507, cls sqrt(6 / (2304 + 2916)) = 0.033903
HEAD_BOUNDS = [  # (c_in, n, loc bound, cls bound)
    (256, 4, math.sqrt(6 / (256 * 9 + 4 * 4 * 9)), math.sqrt(6 / (256 * 9 + 4 * 81 * 9))),
    (512, 6, math.sqrt(6 / (512 * 9 + 6 * 4 * 9)), math.sqrt(6 / (512 * 9 + 6 * 81 * 9))),
    (512, 6, math.sqrt(6 / (512 * 9 + 6 * 4 * 9)), math.sqrt(6 / (512 * 9 + 6 * 81 * 9))),
    (256, 6, math.sqrt(6 / (256 * 9 + 6 * 4 * 9)), math.sqrt(6 / (256 * 9 + 6 * 81 * 9))),
    (256, 4, math.sqrt(6 / (256 * 9 + 4 * 4 * 9)), math.sqrt(6 / (256 * 9 + 4 * 81 * 9))),
    (256, 4, math.sqrt(6 / (256 * 9 + 4 * 4 * 9)), math.sqrt(6 / (256 * 9 + 4 * 81 * 9))),
]


def test_fused_heads_are_initialised_as_the_references_separate_convs(ssd300: SSD) -> None:
    assert HEAD_BOUNDS[0][2] == pytest.approx(0.049507, abs=1e-6)
    assert HEAD_BOUNDS[0][3] == pytest.approx(0.033903, abs=1e-6)
    assert len(ssd300.heads) == len(HEAD_BOUNDS)
    for head, (c_in, n, loc_bound, cls_bound) in zip(ssd300.heads, HEAD_BOUNDS):
        w = head.weight.detach()
        assert w.shape == (n * 85, c_in, 3, 3)
        per_box = w.view(n, 85, c_in, 3, 3)  # box-major: 4 location channels, then 81 class channels
        for part, bound in ((per_box[:, :4], loc_bound), (per_box[:, 4:], cls_bound)):
            assert part.abs().max() <= bound
            assert part.abs().max() >= 0.99 * bound  # drawn up to the bound (thousands of values)
            assert part.std().item() == pytest.approx(bound / math.sqrt(3.0), rel=0.05)
        # The fused fan-out's bound would have been smaller than the reference's location bound.
        fused = math.sqrt(6 / (c_in * 9 + n * 85 * 9))
        assert per_box[:, :4].abs().max() > fused
        b = head.bias.detach()
        assert b.abs().max() <= 1.0 / math.sqrt(c_in * 9) and b.abs().max() > 0


# -- output layout ----------------------------------------------------------------------------
def test_output_order_matches_default_boxes() -> None:
    torch.manual_seed(0)
    num_classes = 3
    model = build_model("ssd_tiny", num_classes=num_classes).eval()
    spec = model.box_spec
    head_out: dict[int, torch.Tensor] = {}
    for k, head in enumerate(model.heads):
        head.register_forward_hook(lambda m, i, o, k=k: head_out.__setitem__(k, o.detach()))
    with torch.no_grad():
        loc, cls = model(torch.randn(2, 3, 128, 128))
    boxes = default_boxes(spec)

    width = 4 + num_classes
    a = 0
    for k, (fsize, n) in enumerate(zip(spec.feature_sizes, spec.boxes_per_location)):
        out = head_out[k]
        assert out.shape == (2, n * width, fsize, fsize)
        fk = spec.image_size / spec.steps[k]
        for i in range(fsize):
            for j in range(fsize):
                for b in range(n):
                    torch.testing.assert_close(loc[:, a], out[:, b * width : b * width + 4, i, j], rtol=0, atol=0)
                    torch.testing.assert_close(cls[:, a], out[:, b * width + 4 : (b + 1) * width, i, j], rtol=0, atol=0)
                    # ... and default box a sits at cell (i, j) of level k.
                    assert boxes[a, 0].item() == pytest.approx(min((j + 0.5) / fk, 1.0))
                    assert boxes[a, 1].item() == pytest.approx(min((i + 0.5) / fk, 1.0))
                    a += 1
    assert a == loc.shape[1] == boxes.shape[0]


def test_channels_last_and_autocast() -> None:
    torch.manual_seed(0)
    model = build_model("ssd_tiny", num_classes=4).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref_loc, ref_cls = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        loc, cls = model_cl(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(loc, ref_loc, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cls, ref_cls, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loc16, cls16 = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert loc16.dtype == cls16.dtype == torch.bfloat16
    assert loc16.shape == ref_loc.shape and cls16.shape == ref_cls.shape


def test_ssd_tiny_forward_backward() -> None:
    torch.manual_seed(0)
    model = build_model("ssd_tiny", num_classes=4).train()
    loc, cls = model(torch.randn(4, 3, 128, 128))
    loss = loc.square().mean() + nn.functional.cross_entropy(
        cls.reshape(-1, 4), torch.randint(0, 4, (cls.shape[0] * cls.shape[1],))
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# -- backbone weights -------------------------------------------------------------------------
def _assert_same_backbone_state(backbone: nn.Module, tv_state: dict[str, torch.Tensor]) -> None:
    got = backbone.state_dict()
    expected = {k: v for k, v in tv_state.items() if not k.startswith(("layer4.", "fc."))}
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_resnet34_backbone_names_match_torchvision(tv_state_dict) -> None:
    backbone = ResNet34Backbone()
    expected = [k for k in tv_state_dict if not k.startswith(("layer4.", "fc."))]
    assert list(backbone.state_dict()) == expected
    assert backbone.out_channels == 256


def test_pth_loads_bit_identically(tmp_path: Path, tv_state_dict) -> None:
    path = tmp_path / "resnet34-333f7ec4.pth"
    torch.save(tv_state_dict, path)
    backbone = ResNet34Backbone()
    load_backbone_into(backbone, path)
    _assert_same_backbone_state(backbone, tv_state_dict)

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), _truncated_torchvision(tv_state_dict)(x))


def test_build_model_with_pretrained_backbone(tmp_path: Path, tv_state_dict) -> None:
    # The 2017 torchvision file has no num_batches_tracked entries; they must be optional.
    legacy = {k: v for k, v in tv_state_dict.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "legacy.pth"
    torch.save(legacy, path)
    model = build_model("ssd300_resnet34", pretrained_backbone=path)
    assert model.backbone_pretrained is True
    _assert_same_backbone_state(model.backbone, tv_state_dict)


def test_npz_round_trip(tmp_path: Path, tv_state_dict) -> None:
    path = save_backbone_npz(tv_state_dict, tmp_path / "sub" / "resnet34-backbone.npz")
    assert path == tmp_path / "sub" / "resnet34-backbone.npz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["resnet34-backbone.npz"]  # no temp left
    with np.load(path, allow_pickle=False) as data:
        assert str(data["__format__"]) == NPZ_FORMAT
        assert all(data[k].dtype == np.float32 for k in data.files if k != "__format__")
        assert not any(k.startswith(("layer4.", "fc.")) or k.endswith("num_batches_tracked") for k in data.files)

    state = load_backbone_state_dict(path)
    backbone = ResNet34Backbone()
    load_backbone_into(backbone, path)
    _assert_same_backbone_state(backbone, tv_state_dict)
    assert set(state) == set(backbone.state_dict())

    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), _truncated_torchvision(tv_state_dict)(x))


def test_missing_file_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.npz"
    with pytest.raises(BackboneWeightsError, match="get_resnet34_backbone.sh") as err:
        load_backbone_state_dict(path)
    assert str(path) in str(err.value) and "not found" in str(err.value)


@pytest.mark.parametrize("name", ["garbage.pth", "text.pth", "truncated.npz", "truncated.pth"])
def test_corrupt_file_error(tmp_path: Path, tv_state_dict, name: str) -> None:
    path = tmp_path / name
    if name.startswith("garbage"):
        path.write_bytes(b"this is not a checkpoint\x00\x01" * 10)
    elif name.startswith("text"):  # torch's weights-only unpickler fails on it, with a paragraph of advice
        path.write_text("not a checkpoint\n")
    else:
        good = tmp_path / ("good" + path.suffix)
        if path.suffix == ".npz":
            save_backbone_npz(tv_state_dict, good)
        else:
            torch.save(tv_state_dict, good)
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone_state_dict(path)
    assert str(path) in str(err.value)
    # One line (the CLI's bad-input contract), without torch's weights_only advice.
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value), str(err.value)


def test_wrong_keys_and_shapes_error(tmp_path: Path, tv_state_dict) -> None:
    state = dict(tv_state_dict)
    del state["layer2.1.conv1.weight"]
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError) as err:
        load_backbone_state_dict(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "missing keys: layer2.1.conv1.weight" in msg
    assert "unexpected keys: layer9.0.conv1.weight" in msg
    assert "conv1.weight: file (64, 3, 3, 3) vs model (64, 3, 7, 7)" in msg

    # A backbone of another architecture does not accept ResNet-34 weights either.
    good = tmp_path / "good.pth"
    torch.save(tv_state_dict, good)
    with pytest.raises(BackboneWeightsError, match="unexpected keys"):
        load_backbone_into(TinyResNetBackbone(), good)


def test_npz_with_unknown_format_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, __format__=np.array("something-else"), x=np.zeros(3, np.float32))
    with pytest.raises(BackboneWeightsError, match="unknown backbone file format"):
        load_backbone_state_dict(path)


# -- MLPerf tensor names ----------------------------------------------------------------------
def _checker_names() -> list[str]:
    yaml_path = (
        Path(mlperf_logging.__file__).parent / "compliance_checker" / "training_1.1.0" / "closed_ssd.yaml"
    )
    return re.findall(r"['\"](ssd0_\w+)['\"]", yaml_path.read_text())


def test_mlperf_names_bijection(ssd300: SSD) -> None:
    checker = _checker_names()
    assert len(checker) == len(set(checker)) == 119
    assert list(MLPERF_SSD_TENSOR_NAMES) == checker

    mapping = mlperf_tensor_names(ssd300)
    params = dict(ssd300.named_parameters())
    assert list(mapping) == list(params)  # named_parameters order
    assert sorted(mapping.values()) == sorted(checker)
    # The mapped tensors have the right kind of shape for their reference names.
    by_mlperf = {v: params[k] for k, v in mapping.items()}
    assert by_mlperf["ssd0_resnetmlperf0_conv0_weight"].shape == (64, 3, 7, 7)
    assert by_mlperf["ssd0_resnetmlperf0_stage2_conv2_weight"].shape == (128, 64, 1, 1)  # projection
    assert by_mlperf["ssd0_resnetmlperf0_stage3_conv2_weight"].shape == (256, 128, 1, 1)
    assert by_mlperf["ssd0_resnetmlperf0_stage3_conv12_weight"].shape == (256, 256, 3, 3)
    assert by_mlperf["ssd0_expand_trans_conv0_weight"].shape == (256, 256, 1, 1)
    assert by_mlperf["ssd0_expand_conv4_weight"].shape == (256, 128, 3, 3)
    assert by_mlperf["ssd0_convpredictor0_conv0_weight"].shape == (4 * 85, 256, 3, 3)
    for name, tensor in by_mlperf.items():
        if name.endswith(("_gamma", "_beta", "_bias")):
            assert tensor.dim() == 1, name
        else:
            assert tensor.dim() == 4, name


def test_mlperf_names_reject_other_models() -> None:
    with pytest.raises(ValueError, match="119"):
        mlperf_tensor_names(build_model("ssd_tiny"))
