"""YOLOv1 (arXiv:1506.02640): network shapes, cell assignment, the responsible predictor, every
loss term of the paper on hand-computed values, the switches (confidence target, class
weights, anchors), decoding, presets through the harness, and the ImageNet ResNet-34 backbone
with its freeze.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from single_stage_detector.config import ConfigError, TrainConfig
from single_stage_detector.detectors.base import PRESETS, build_detector, configure_preset, get_preset
from single_stage_detector.detectors.yolov1.decode import decode_output, postprocess_yolov1
from single_stage_detector.detectors.yolov1.family import parse_anchors, prepare
from single_stage_detector.detectors.yolov1.loss import (YOLOv1Loss, assign_cells, inverse_frequency_weights,
                                                         responsible_predictor)
from single_stage_detector.detectors.yolov1.network import TinyTrunk, YOLOv1Network

# torchrun's error recorder (train.run_training) cannot install its fault handler under pytest's capture.
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

S, B, C = 2, 2, 3  # the hand-worked grid: 2x2 cells, 2 predictors, 3 classes (channels 5*2 + 3 = 13)


def _output(batch: int = 1) -> torch.Tensor:
    """A known raw output [N, 2, 2, 13]: cell (row 0, col 0) holds the worked example."""
    out = torch.zeros(batch, S, S, 5 * B + C)
    # cell (j=0, i=0): predictor 0 (x, y, sqrt-w, sqrt-h, conf), predictor 1, class scores
    out[:, 0, 0] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.3, 0.7, 0.3, 0.6, 0.4, 0.8, 0.1, 0.7, 0.3])
    out[:, 0, 1, 4], out[:, 0, 1, 9] = 0.2, -0.1   # confidences of cell (j=0, i=1)
    out[:, 1, 1, 4] = 0.4                          # cell (j=1, i=1), predictor 0
    out[:, 1, 1, 10:] = torch.tensor([0.9, 0.9, 0.9])  # class scores of a cell without object: no loss
    return out.requires_grad_(True)


# The ground truth: centre (0.3, 0.2), size 0.4 x 0.2 -> xyxy (0.1, 0.1, 0.5, 0.3), class index 1 (label 2);
# its cell: i = floor(0.3 * 2) = 0, j = floor(0.2 * 2) = 0; offsets x^ = 0.6, y^ = 0.4.
GT = torch.tensor([[0.1, 0.1, 0.5, 0.3]])
LABEL = torch.tensor([2])

# Predictor 0: centre ((0 + 0.5) / 2, (0 + 0.5) / 2) = (0.25, 0.25), size 0.5^2 = 0.25 -> (0.125, 0.125, 0.375, 0.375);
#   intersection 0.25 x 0.175 = 0.04375, union 0.0625 + 0.08 - 0.04375 = 0.09875, IoU 0.443038.
# Predictor 1: centre (0.35, 0.15), size 0.36 x 0.16 -> (0.17, 0.07, 0.53, 0.23);
#   intersection 0.33 x 0.13 = 0.0429, union 0.0576 + 0.08 - 0.0429 = 0.0947, IoU 0.453009: responsible.
IOU_0 = 0.04375 / 0.09875
IOU_1 = 0.0429 / 0.0947
XY = 5 * ((0.7 - 0.6) ** 2 + (0.3 - 0.4) ** 2)                              # 5 x 0.02 = 0.1
WH = 5 * ((0.6 - math.sqrt(0.4)) ** 2 + (0.4 - math.sqrt(0.2)) ** 2)        # 5 x 0.0032825 = 0.016412
OBJ_IOU = (0.8 - IOU_1) ** 2                                                # 0.120403
OBJ_ONE = (0.8 - 1.0) ** 2                                                  # 0.04
NOOBJ = 0.5 * (0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2 + 0.4 ** 2)                   # 0.5 x 0.30 = 0.15 (incl. predictor 0)
CLS = (0.1 - 0) ** 2 + (0.7 - 1) ** 2 + (0.3 - 0) ** 2                      # 0.19


def _loss(**kwargs) -> YOLOv1Loss:
    return YOLOv1Loss(C, B, **kwargs)


def test_responsible_predictor_and_every_loss_term_by_hand():
    out = _output()
    terms = _loss()(out, [GT], [LABEL], torch.ones(B, 2))
    got = {k: v.item() for k, v in terms.items()}
    assert got == pytest.approx({"xy": XY, "wh": WH, "obj": OBJ_IOU, "noobj": NOOBJ, "cls": CLS}, rel=1e-5)
    decoded = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.35, 0.15, 0.36, 0.16]]])
    best, iou = responsible_predictor(decoded, torch.tensor([[0.3, 0.2, 0.4, 0.2]]))
    assert best.tolist() == [1] and iou[0].tolist() == pytest.approx([IOU_0, IOU_1], rel=1e-5)
    # Gradients: the other predictor of the object cell gets the no-object term (d/dC 0.5 C^2 = C = 0.3),
    # the responsible one its obj term 2 (0.8 - IoU), the detached IoU target none.
    sum(terms.values()).backward()
    assert out.grad[0, 0, 0, 4].item() == pytest.approx(0.3, rel=1e-5)
    assert out.grad[0, 0, 0, 9].item() == pytest.approx(2 * (0.8 - IOU_1), rel=1e-5)
    assert out.grad[0, 0, 0, :4].abs().sum() == 0  # predictor 0's box is not trained
    assert out.grad[0, 1, 1, 10:].abs().sum() == 0  # no class loss without an object


def test_sum_over_the_batch_divided_by_the_batch_size():
    # Two copies of the image: every term is the one-image value (sum of 2 equal sums / 2).
    terms = _loss()(_output(2), [GT, GT], [LABEL, LABEL], torch.ones(B, 2))
    assert terms["obj"].item() == pytest.approx(OBJ_IOU, rel=1e-5)
    # A second image without objects adds only its no-object term, every predictor's:
    # 0.5 x (0.3^2 + 0.8^2 + 0.2^2 + 0.1^2 + 0.4^2) = 0.5 x 0.94 = 0.47.
    terms = _loss()(_output(2), [GT, torch.zeros(0, 4)], [LABEL, torch.zeros(0, dtype=torch.int64)], torch.ones(B, 2))
    assert terms["noobj"].item() == pytest.approx((NOOBJ + 0.47) / 2, rel=1e-5)
    assert terms["xy"].item() == pytest.approx(XY / 2, rel=1e-5)


def test_confidence_target_one_and_class_weights_switches():
    out = _output()
    one = _loss(confidence_target="one")(out, [GT], [LABEL], torch.ones(B, 2))
    assert one["obj"].item() == pytest.approx(OBJ_ONE, rel=1e-5)
    weighted = _loss()
    weighted.set_class_weights(torch.tensor([1.0, 2.0, 0.5]))
    # 1 x 0.1^2 + 2 x 0.3^2 + 0.5 x 0.3^2 = 0.01 + 0.18 + 0.045 = 0.235
    assert weighted(out, [GT], [LABEL], torch.ones(B, 2))["cls"].item() == pytest.approx(0.235, rel=1e-5)
    with pytest.raises(ValueError, match="confidence_target"):
        YOLOv1Loss(C, B, confidence_target="two")
    with pytest.raises(ValueError, match="class weights"):
        weighted.set_class_weights(torch.ones(2))


def test_all_ious_zero_falls_back_to_the_closest_prediction():
    # Both predictions miss the truth (IoU 0); predictor 1 is closer in (cx, cy, w, h): darknet's box_rmse.
    decoded = torch.tensor([[[0.9, 0.9, 0.1, 0.1], [0.6, 0.6, 0.1, 0.1]]])
    best, iou = responsible_predictor(decoded, torch.tensor([[0.2, 0.2, 0.1, 0.1]]))
    assert iou.abs().sum() == 0 and best.tolist() == [1]
    # Equal IoUs: the first.
    same = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]])
    assert responsible_predictor(same, torch.tensor([[0.2, 0.2, 0.1, 0.1]]))[0].tolist() == [0]


def test_several_objects_in_one_cell_the_largest_wins():
    # Image 0: three centres in cell (0, 0) of a 2x2 grid, areas 1/64, 1/16, 1/16 (exact in binary): the
    # first 1/16 wins; one in cell (1, 1). Image 1: one box in cell (0, 0) of its own.
    boxes = torch.tensor([[0.25, 0.25, 0.125, 0.125], [0.375, 0.25, 0.25, 0.25], [0.125, 0.375, 0.25, 0.25],
                          [0.75, 0.75, 0.25, 0.25], [0.25, 0.25, 0.125, 0.125]])
    cells = assign_cells(boxes, torch.tensor([0, 0, 0, 0, 1]), batch=2, grid_size=2)
    assert cells.is_object.tolist() == [False, True, False, True, True]
    assert cells.cell_i.tolist() == [0, 0, 0, 1, 0] and cells.cell_j.tolist() == [0, 0, 0, 1, 0]
    # The losers are not trained at all: the loss equals the one of the winner alone.
    xyxy = torch.cat([boxes[:3, :2] - boxes[:3, 2:] / 2, boxes[:3, :2] + boxes[:3, 2:] / 2], 1)
    loss = _loss()
    both = loss(_output(), [xyxy], [torch.tensor([1, 2, 3])], torch.ones(B, 2))
    alone = loss(_output(), [xyxy[1:2]], [torch.tensor([2])], torch.ones(B, 2))
    assert all(torch.equal(both[k], alone[k]) for k in both)
    # A centre on the last edge (1.0) lies in the last cell.
    edge = assign_cells(torch.tensor([[1.0, 1.0, 0.2, 0.2]]), torch.tensor([0]), batch=1, grid_size=7)
    assert (edge.cell_i.item(), edge.cell_j.item()) == (6, 6)


def test_decode_known_outputs_and_anchor_priors():
    out = torch.zeros(1, 2, 2, 5 * 1 + 2)
    # cell (j=1, i=0): x = y = 0.5, sqrt-w = sqrt-h = 0.5, confidence 0.9, classes (0.2, 0.8)
    out[0, 1, 0] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.9, 0.2, 0.8])
    # cell (j=0, i=1): negative confidence and class score: score max(-0.5, 0) x max(-0.4, 0) = 0, not 0.2
    out[0, 0, 1] = torch.tensor([0.5, 0.5, 0.5, 0.5, -0.5, -0.4, 0.1])
    boxes, scores = decode_output(out, torch.ones(1, 2), 2)
    # centre ((0 + 0.5) / 2, (1 + 0.5) / 2) = (0.25, 0.75), size 0.25 -> (0.125, 0.625, 0.375, 0.875); P = j*S*B + i*B + b
    assert boxes[0, 2].tolist() == pytest.approx([0.125, 0.625, 0.375, 0.875])
    assert scores[0, 2].tolist() == pytest.approx([0.18, 0.72]) and scores[0, 1].tolist() == [0.0, 0.0]
    det = postprocess_yolov1(out, torch.ones(1, 2), 2)[0]
    assert det["labels"].tolist() == [2, 1] and det["scores"].tolist() == pytest.approx([0.72, 0.18])
    # With a prior (0.5, 0.25): w = 0.5 x 0.5^2 = 0.125, h = 0.25 x 0.25 = 0.0625 around (0.25, 0.75).
    boxes, _ = decode_output(out, torch.tensor([[0.5, 0.25]]), 2)
    assert boxes[0, 2].tolist() == pytest.approx([0.1875, 0.71875, 0.3125, 0.78125])
    with pytest.raises(ValueError, match="YOLOv1 output"):
        decode_output(out, torch.ones(2, 2), 2)


def test_network_output_shape_at_any_input_size():
    for head in ("conv", "fc"):
        net = YOLOv1Network(TinyTrunk((8, 16)), num_classes=3, grid_size=4, boxes_per_cell=2, head_convs=((8, 1),),
                            head=head, fc_pool=4, fc_hidden=16)
        for side in (64, 96, 128):  # the grid stays 4x4 (the last map is pooled to it)
            assert net(torch.zeros(2, 3, side, side)).shape == (2, 4, 4, 13)
    assert net.prior_wh.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="prior_wh"):
        YOLOv1Network(TinyTrunk((8,)), 3, 4, 2, head_convs=(), head="conv", prior_wh=[[0.1, 0.2]])


def test_class_weights_from_an_annotation_file(tmp_path):
    from single_stage_detector.data.coco import CocoDetection

    # 3 person boxes (label 1), 1 car box (COCO id 3, label 3); N = 4 boxes, K = 2 classes:
    # person 4 / (2 x 3) = 0.6667, car 4 / (2 x 1) = 2, the 78 other classes 1.
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 100, "width": 100} for i in (1, 2)]
    anns = [{"id": k, "image_id": 1 + k % 2, "category_id": cat, "bbox": [10, 10, 20, 20], "iscrowd": 0}
            for k, cat in enumerate((1, 1, 1, 3))]
    path = tmp_path / "instances_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    data = CocoDetection(tmp_path, path)
    assert sorted(data.box_labels().tolist()) == [1, 1, 1, 3]
    weights = inverse_frequency_weights(data.box_labels(), 80)
    assert weights[0].item() == pytest.approx(2 / 3) and weights[2].item() == pytest.approx(2.0)
    assert weights[1].item() == 1.0 and weights[3:].eq(1).all()
    # prepare() sets them into the detector of a preset that asks for them.
    preset = dataclasses.replace(get_preset("yolov1_tiny_cpu"), class_weights="inverse-frequency")
    detector = build_detector(preset)
    report = prepare(preset, detector, data)
    assert torch.equal(detector.loss.class_weights, weights) and "class weights" in report
    with pytest.raises(ValueError, match="1..80"):
        inverse_frequency_weights([0, 1], 80)


def test_run_options_change_the_preset_and_other_families_refuse_them():
    from single_stage_detector.train import resolve_preset

    tiny = get_preset("yolov1_tiny_cpu")
    assert parse_anchors(["kmeans:3"]) == ("kmeans", 3) and parse_anchors("none") == ("none", None)
    p = configure_preset(tiny, {"anchors": ["kmeans:3"], "confidence_target": "one", "class_weights": None})
    assert (p.kmeans_anchors, p.boxes_per_cell, p.confidence_target, p.class_weights) == (True, 3, "one", "none")
    p = configure_preset(tiny, {"anchors": ["0.1,0.2", "0.5,0.4", "0.9,0.8"]})
    assert p.anchors == ((0.1, 0.2), (0.5, 0.4), (0.9, 0.8)) and p.boxes_per_cell == 3 and not p.kmeans_anchors
    preset, _ = resolve_preset(TrainConfig(data_dir="d", preset="yolov1_tiny_cpu", class_weights="inverse-frequency",
                                           input_size=160))
    assert preset.class_weights == "inverse-frequency" and preset.input_size == 160
    for options, flag in (({"anchors": ["kmeans:0"]}, "--anchors"), ({"anchors": ["1.5,0.2"]}, "--anchors"),
                          ({"anchors": ["0.1"]}, "--anchors"), ({"confidence_target": "two"}, "--confidence-target"),
                          ({"class_weights": "sqrt"}, "--class-weights")):
        with pytest.raises(ValueError, match=flag):
            configure_preset(tiny, options)
    with pytest.raises(ConfigError, match="--anchors: preset 'ssd_tiny' .ssd. does not take it"):
        resolve_preset(TrainConfig(data_dir="d", preset="ssd_tiny", anchors=("kmeans:5",)))


class _TrainSet:
    """The two statistics `prepare` reads from a CocoDetection."""

    def __init__(self, sizes, labels):
        self.sizes, self.labels = sizes, labels

    def box_sizes(self):
        return self.sizes

    def box_labels(self):
        return self.labels


def test_kmeans_anchors_at_start_and_a_checkpoint_keeps_them():
    from single_stage_detector.detectors.yolo.kmeans import kmeans_anchors
    from single_stage_detector.tools.show_detections import load_detector

    gen = torch.Generator().manual_seed(0)
    sizes = torch.cat([torch.rand(40, 2, generator=gen) * 0.1 + 0.05, torch.rand(40, 2, generator=gen) * 0.2 + 0.5])
    preset = configure_preset(get_preset("yolov1_tiny_cpu"), {"anchors": ["kmeans:2"]})
    detector = build_detector(preset)
    report = prepare(preset, detector, _TrainSet(sizes.numpy(), None))
    expected = kmeans_anchors(sizes, 2, seed=0)
    assert torch.equal(detector.model.prior_wh, expected) and "k-means on 80 training boxes" in report
    assert expected[0, 0] < 0.2 < expected[1, 0]  # one small, one large prior
    # A checkpoint of the run rebuilds the same detector from its config, anchors included.
    ckpt = {"preset": "yolov1_tiny_cpu", "config": {"anchors": ["kmeans:2"]}, "model": detector.model.state_dict()}
    loaded, loaded_preset, _ = load_detector(ckpt)
    assert loaded_preset.boxes_per_cell == 2 and torch.equal(loaded.model.prior_wh, expected)
    with pytest.raises(ConfigError, match="--anchors kmeans:2"):
        prepare(preset, build_detector(preset), _TrainSet(sizes[:1].numpy(), None))


# Parameters of the full networks (our design; README): the FC layer of the paper is most of yolov1_resnet34.
PARAMETERS = {"yolov1_tiny_cpu": 1_006_570, "yolov1_coursework": 68_884_730, "yolov1_resnet34": 277_915_770}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_presets_build_train_one_step_and_evaluate(name):
    preset = get_preset(name)
    s, b = preset.grid_size, preset.boxes_per_cell
    with torch.device("meta"):  # the full network, shapes only
        full = build_detector(preset)
        assert full.model(torch.empty(1, 3, preset.input_size, preset.input_size)).shape == (1, s, s, 5 * b + 80)
    assert sum(p.numel() for p in full.model.parameters()) == PARAMETERS[name]
    if name != "yolov1_tiny_cpu":
        # The real step on the same backbone with a narrow head (the full head's 1024-channel convs and
        # FC layers would take a minute of a shared CPU here), at a small input for the ResNet-34.
        preset = dataclasses.replace(preset, head_convs=((64, 1), (64, 2)), fc_hidden=32,
                                     input_size=64 if name == "yolov1_resnet34" else preset.input_size)
    torch.manual_seed(0)
    detector = build_detector(preset)
    images = torch.rand(2, 3, preset.input_size, preset.input_size)
    targets = {"boxes": [torch.tensor([[0.1, 0.2, 0.5, 0.7]]), torch.zeros(0, 4)],
               "labels": [torch.tensor([5]), torch.zeros(0, dtype=torch.int64)]}
    detector.train()
    opt = torch.optim.SGD(detector.parameters(), lr=1e-4)
    losses = detector(images, targets)
    assert set(losses) == {"xy", "wh", "obj", "noobj", "cls"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    opt.step()
    detector.eval()
    with torch.no_grad():
        out = detector(images)
    assert len(out) == 2 and all(o["boxes"].shape[1] == 4 and o["labels"].min() >= 1 for o in out if len(o["labels"]))
    assert detector.eval_policy["score_threshold"] == preset.score_threshold == 0.001
    assert detector.eval_policy["nms_threshold"] == 0.5 and detector.eval_policy["max_detections"] == 100


def test_resnet34_backbone_loads_torchvision_imagenet_weights(tmp_path):
    from torchvision.models import resnet34

    from single_stage_detector.models.backbone_weights import BackboneWeightsError, save_backbone_npz

    torch.manual_seed(1)
    state = resnet34(weights=None).state_dict()  # stands for resnet34-333f7ec4.pth (random values)
    torch.save(state, tmp_path / "resnet34.pth")
    preset = dataclasses.replace(get_preset("yolov1_resnet34"), head_convs=((32, 1), (32, 2)), fc_hidden=16)
    detector = build_detector(preset, pretrained_backbone=tmp_path / "resnet34.pth")
    loaded = detector.model.backbone.state_dict()
    assert detector.backbone_pretrained and any(k.startswith("layer4.") for k in loaded)
    assert all(torch.equal(loaded[k], state[k].float()) for k in loaded if not k.endswith("num_batches_tracked"))
    # SSD's .npz (no layer4) is refused, naming the .pth to use.
    save_backbone_npz(state, tmp_path / "resnet34-backbone.npz")
    with pytest.raises(BackboneWeightsError, match="holds no layer4.*resnet34-333f7ec4.pth"):
        build_detector(preset, pretrained_backbone=tmp_path / "resnet34-backbone.npz")
    with pytest.raises(ValueError, match="no ImageNet backbone"):
        build_detector("yolov1_tiny_cpu", pretrained_backbone=tmp_path / "resnet34.pth")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from single_stage_detector.data.synthetic import ensure_synthetic_coco

    root = tmp_path_factory.mktemp("yolov1_coco")
    ensure_synthetic_coco(root, num_train=8, num_val=4, seed=3, min_size=64, max_size=96)
    return root


@pytest.mark.slow
def test_resnet34_backbone_frozen_in_epoch_1_then_fine_tuned(coco, tmp_path, capsys, monkeypatch):
    """`train --freeze-backbone-epochs 1` on yolov1_resnet34's network with a narrow head (the
    paper's 4096-unit FC layer would take gigabytes of AdamW state for nothing the test checks):
    the ImageNet weights are exactly those of the file after epoch 1, trained after epoch 2."""
    from torchvision.models import resnet34

    from single_stage_detector.__main__ import main
    from single_stage_detector.checkpoint import list_resume_checkpoints, load_resume_checkpoint

    torch.manual_seed(2)
    state = resnet34(weights=None).state_dict()
    torch.save(state, tmp_path / "resnet34.pth")
    narrow = dataclasses.replace(get_preset("yolov1_resnet34"), name="yolov1_resnet34_narrow",
                                 head_convs=((32, 1), (32, 2)), fc_hidden=16)
    monkeypatch.setitem(PRESETS, narrow.name, narrow)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "out"
        code = main(["train", "--preset", narrow.name, "--input-size", "64", "--data-dir", str(coco),
                     "--output-dir", str(out), "--device", "cpu", "--amp", "off", "--seed", "5", "--batch-size", "4",
                     "--eval-batch-size", "4", "--num-workers", "0", "--epochs", "2", "--eval-epochs", "2",
                     "--threshold", "0.99", "--warmup-steps", "0", "--optimizer", "adamw", "--lr", "1e-3",
                     "--pretrained-backbone", str(tmp_path / "resnet34.pth"), "--freeze-backbone-epochs", "1",
                     "--backbone-lr-mult", "0.5", "--checkpoint-every", "1"])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert code == 3, captured.out[-3000:] + captured.err[-3000:]  # the epoch limit: status aborted
    assert "resnet34 (ImageNet)" in captured.out
    after1, after2 = (load_resume_checkpoint(p)["model"] for p in list_resume_checkpoints(out))
    backbone = [k for k in after1 if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    assert any(k.startswith("backbone.layer4.") for k in backbone)
    # Epoch 1: every backbone weight and BatchNorm statistic exactly the file's; the head trained.
    assert all(torch.equal(after1[k], state[k.removeprefix("backbone.")]) for k in backbone)
    assert not torch.equal(after1["output.weight"], after2["output.weight"])
    # Epoch 2: the backbone trains (at half the LR).
    assert not any(torch.equal(after1[k], after2[k]) for k in backbone if k.endswith(".weight"))


def _config_flags(name: str):
    import shlex
    from pathlib import Path

    from single_stage_detector.__main__ import build_parser
    from single_stage_detector.config import config_from_args
    from test_launchers import source_config

    v = source_config(Path(__file__).resolve().parents[1] / "configs" / f"config_{name}.sh")
    argv = ["train", "--data-dir", "/data", *shlex.split(v["EXTRA_PARAMS"])]
    return v, config_from_args(build_parser().parse_args(argv))


def test_configs_follow_the_paper_and_the_seeds():
    # The paper (section 2.2): 135 epochs, batch 64, momentum 0.9, decay 5e-4, LR 1e-2 to epoch 75, then
    # 1e-3 for 30 epochs and 1e-4 for 30 (x0.1 after 75 and 105); seed 000: ImageNet ResNet-34, frozen first.
    v, cfg = _config_flags("1xH100_YOLOV1")
    assert cfg.preset == "yolov1_resnet34" and cfg.batch_size == 64 == int(v["BATCHSIZE"]) and cfg.lr == 0.01
    assert (cfg.momentum, cfg.weight_decay, cfg.epochs, tuple(cfg.lr_decay_epochs)) == (0.9, 5e-4, 135, (75, 105))
    assert cfg.freeze_backbone_epochs > 0 and cfg.backbone_lr_mult < 1 and v["BACKBONE_FILE"] == "resnet34-333f7ec4.pth"
    assert cfg.warmup_steps == 2 * math.ceil(117_266 / 64)  # 2 epochs of COCO train2017 at batch 64 (last batch kept)
    # Seed 001: AdamW, cosine annealing, gradient clipping, 35 epochs (128 input, FC 1024, target 1 and
    # class weights are the preset's); from scratch.
    v, cfg = _config_flags("1xA100_YOLOV1_COURSEWORK")
    preset = get_preset(cfg.preset)
    assert (cfg.optimizer, cfg.lr_schedule, cfg.epochs) == ("adamw", "cosine", 35) and cfg.clip_grad_norm
    assert (preset.input_size, preset.fc_hidden, preset.confidence_target, preset.class_weights) == (
        128, 1024, "one", "inverse-frequency")
    assert dict(preset.augmentation)["degrees"] > 0 and v["BACKBONE"] == "none"
