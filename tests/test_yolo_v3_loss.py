"""YOLOv3 assignment, loss, decoding and detector against darknet's yolo layer (src/yolo_layer.c).

Golden values are worked by hand from darknet's formulas (arithmetic in the comments);
``_darknet_deltas`` is a plain loop transcription of ``forward_yolo_layer``'s two loops,
written from its rules, that the vectorised loss's gradients must equal (negated, / B).
"""
import math

import pytest
import torch
from torch import nn

from single_stage_detector.boxes import cxcywh_to_xyxy
from single_stage_detector.detectors.yolo import v3_loss
from single_stage_detector.detectors.yolo.anchors import YOLOV3_COCO_ANCHORS_PX, YOLOV3_MASKS, anchors_tensor
from single_stage_detector.detectors.yolo.decode import decode_outputs, postprocess_yolo, select_detections
from single_stage_detector.detectors.yolo.detector import YOLOv3Detector
from single_stage_detector.detectors.yolo.v3_loss import YOLOv3Loss, assign_targets, best_truth_iou

ANCHORS = anchors_tensor()


def _sp(z):
    """softplus: BCE-with-logits(z, 0) = sp(z), BCE(z, 1) = sp(-z)."""
    return math.log1p(math.exp(z))


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def _px_box(cx, cy, w, h, size=416):
    """(cx, cy, w, h) in pixels of a square input -> normalised cxcywh row."""
    return [cx / size, cy / size, w / size, h / size]


def _assign(rows, size=416, anchors=ANCHORS, masks=YOLOV3_MASKS):
    boxes = torch.tensor(rows, dtype=torch.float32)
    g = boxes.shape[0]
    return assign_targets(boxes, torch.zeros(g, dtype=torch.long), torch.zeros(g, dtype=torch.long),
                          (size, size), anchors, masks)


def _raw(size, num_classes, batch=1, tx=0.0, tw=-10.0, obj=-3.0, cls=-4.0):
    """Raw outputs (strides 32, 16, 8) with every prediction set alike; tw = th = -10 makes
    every decoded box tiny (exp(-10) x anchor: IoU ~0 with any ground truth)."""
    outs = []
    for stride in (32, 16, 8):
        g = size // stride
        r = torch.empty(batch, 3, 5 + num_classes, g, g)
        r[:, :, 0:2] = tx
        r[:, :, 2:4] = tw
        r[:, :, 4] = obj
        r[:, :, 5:] = cls
        outs.append(r)
    return outs


def _flat(outs):
    return [o.reshape(o.shape[0], -1, o.shape[-2], o.shape[-1]).requires_grad_() for o in outs]


# ---------------------------------------------------------------- assignment


def test_assignment_anchor_scale_cell_and_targets_at_416():
    asg = _assign([
        # A: 90 x 150 px at (200, 300). Shape IoU (origin-aligned):
        #   anchor 5 (59,119): inter 59*119 = 7021, union 90*150 = 13500 -> 0.5201
        #   anchor 6 (116,90): inter 90*90 = 8100, union 13500 + 10440 - 8100 = 15840 -> 0.5114
        #   anchor 7 (156,198): inter 13500, union 30888 -> 0.4371
        # The naive guess (the anchor of closest area: 116x90, 10440 vs 13500) is stride 32;
        # darknet's best is anchor 5: stride 16 (grid 26), slot 2 of mask 3,4,5.
        # 200/16 = 12.5 -> i 12, tx .5; 300/16 = 18.75 -> j 18, ty .75;
        # tw = log(90/59) = 0.422272, th = log(150/119) = 0.231512; scale 2 - 13500/416^2 = 1.921991.
        _px_box(200, 300, 90, 150),
        # B: exactly on a cell border: centre x = 208 px = 0.5, 30 x 61 px = anchor 3 (IoU 1),
        # stride 16: 0.5 * 26 = 13.0 -> i 13, tx 0; y 104 px: 0.25 * 26 = 6.5 -> j 6, ty .5.
        _px_box(208, 104, 30, 61),
        # C: centre at x == 1, y == 0: 10 x 13 px = anchor 0 -> stride 8 (grid 52):
        # floor(52) = 52 clamped to the last cell 51, tx = 52 - 51 = 1; j 0, ty 0.
        [1.0, 0.0, 10 / 416, 13 / 416],
        # D: 373 x 326 px = anchor 8 -> stride 32 slot 2; 0.5 * 13 = 6.5 -> cell (6, 6).
        _px_box(208, 208, 373, 326),
    ])
    assert asg.best_anchor.tolist() == [5, 3, 0, 8]
    assert asg.scale.tolist() == [1, 1, 2, 0]
    assert asg.anchor.tolist() == [2, 0, 0, 2]
    assert asg.cell_i.tolist() == [12, 13, 51, 6]
    assert asg.cell_j.tolist() == [18, 6, 0, 6]
    expected = torch.tensor([[0.5, 0.75, math.log(90 / 59), math.log(150 / 119)],
                             [0.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(asg.target, expected, atol=2e-6, rtol=0)
    assert asg.target[0, 2].item() == pytest.approx(0.422272, abs=1e-6)
    assert asg.target[0, 3].item() == pytest.approx(0.231512, abs=1e-6)
    assert asg.box_scale[0].item() == pytest.approx(1.921991, abs=1e-6)
    assert asg.positive.all()


def test_assignment_ties_go_to_the_lowest_anchor_index():
    # A 10 x 10 px box against (10, 20) and (20, 10): both IoU 100 / 200 = 0.5. Darknet keeps the
    # first best (strict >): the lower index, whichever shape it has.
    for pair in ([10, 20], [20, 10]), ([20, 10], [10, 20]):
        anchors = torch.full((9, 2), 400.0)  # the others: IoU 100 / 160000, far below
        anchors[2], anchors[3] = torch.tensor(pair[0]), torch.tensor(pair[1])
        asg = _assign([_px_box(100, 100, 10, 10)], anchors=anchors)
        assert asg.best_anchor.tolist() == [2] and asg.scale.tolist() == [2] and asg.anchor.tolist() == [2]


def test_assignment_without_a_mask_or_size_is_not_assigned():
    # Only the two coarse scales: a 10 x 13 px box (best anchor 0, in no mask) is not trained;
    # a zero-width box is never assigned (darknet's log(0)) and its targets stay finite.
    boxes = torch.tensor([_px_box(100, 100, 10, 13), _px_box(100, 100, 116, 90), [0.5, 0.5, 0.0, 0.1]])
    asg = assign_targets(boxes, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), (416, 416),
                         ANCHORS, YOLOV3_MASKS[:2], grid_sizes=[(13, 13), (26, 26)])
    assert asg.best_anchor.tolist()[:2] == [0, 6]
    assert asg.scale.tolist() == [-1, 0, -1] and asg.anchor.tolist() == [-1, 0, -1]
    assert torch.isfinite(asg.target).all()
    with pytest.raises(ValueError, match="share an anchor"):
        assign_targets(boxes, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), (416, 416),
                       ANCHORS, ((0, 1, 2), (2, 3, 4)))


def test_input_sizes_320_and_608_use_the_same_pixel_anchors():
    # A 116 x 90 px box is anchor 6 exactly at any input size (tw = th = log(1) = 0); its
    # normalised size differs. Raw tw = th = 0 decodes to 116/320 wide at 320, 116/608 at 608.
    for size in (320, 608):
        asg = _assign([_px_box(size / 2, size / 2, 116, 90, size)], size=size)
        assert asg.best_anchor.tolist() == [6] and asg.scale.tolist() == [0]
        g = size // 32  # 10 at 320, 19 at 608; centre 0.5 * g -> cell floor(g / 2)
        assert asg.cell_i.tolist() == [g // 2]
        torch.testing.assert_close(asg.target[0, 2:], torch.zeros(2), atol=1e-6, rtol=0)
        raw = _raw(size, 1, tw=0.0)
        boxes, _, _ = decode_outputs(_flat(raw), ANCHORS, YOLOV3_MASKS, (size, size))
        width = boxes[0, 0, 2] - boxes[0, 0, 0]  # scale 0, anchor 6, cell (0, 0)
        assert width.item() == pytest.approx(116 / size, rel=1e-6)


# ---------------------------------------------------------------- loss terms

# The 1-box example: input 128 x 128, C = 3, grids 4, 8, 16 (P = 3 * (16 + 64 + 256) = 1008).
# Ground truth (x1, y1, x2, y2) = (24, 40, 56, 104) px: centre (40, 72), 32 x 64 px, label 2
# (class index 1). Best anchor: 3 (30, 61): 1830 / 2048 = 0.894 (62,45: 1440 / 3398 = 0.424,
# 33,23: 736 / 2071 = 0.355, 59,119: 2048 / 7021 = 0.292) -> stride 16 (grid 8), slot 0;
# 0.3125 * 8 = 2.5 -> i 2, tx .5; 0.5625 * 8 = 4.5 -> j 4, ty .5; tw = log(32/30),
# th = log(64/61); box scale 2 - 0.25 * 0.5 = 1.875.
GT_128 = torch.tensor([[24 / 128, 40 / 128, 56 / 128, 104 / 128]])
POS = (1, 0, 4, 2)  # (scale, slot, j, i)
POS_RAW = {"x": 1.0, "y": -0.5, "w": 0.2, "h": -0.1, "obj": 0.5, "cls": (-4.0, 1.5, 2.0)}
TW, TH, BOX_SCALE = math.log(32 / 30), math.log(64 / 61), 1.875


def _one_box_raw(batch=1):
    raw = _raw(128, 3, batch=batch)
    s, a, j, i = POS
    p = raw[s][0, a, :, j, i]
    p[0], p[1], p[2], p[3], p[4] = POS_RAW["x"], POS_RAW["y"], POS_RAW["w"], POS_RAW["h"], POS_RAW["obj"]
    p[5:] = torch.tensor(POS_RAW["cls"])
    return _flat(raw)


def test_each_loss_term_on_one_box():
    raw = _one_box_raw()
    loss = YOLOv3Loss(ANCHORS, YOLOV3_MASKS, 3, 0.7)
    terms = loss(raw, [GT_128], [torch.tensor([2])], (128, 128))
    assert list(terms) == ["xy", "wh", "obj", "noobj", "cls"]
    # xy = 1.875 * (BCE(1, .5) + BCE(-.5, .5)), BCE(z, t) = sp(z) - t z:
    #    = 1.875 * ((1.3132617 - .5) + (.4740770 + .25)) = 1.875 * 1.5373387 = 2.8825100
    assert terms["xy"].item() == pytest.approx(2.8825100, abs=1e-5)
    # wh = 1.875 * .5 * ((.2 - .0645385)^2 + (-.1 - .0480092)^2) = .9375 * .0402565 = .0377405
    assert terms["wh"].item() == pytest.approx(0.0377405, abs=1e-6)
    # obj = BCE(.5, 1) = sp(-.5) = .4740770. The positive's decoded box, centre
    # ((2 + sig(1)) / 8, (4 + sig(-.5)) / 8), size e^.2 * 30/128 x e^-.1 * 61/128, has IoU .710
    # with the truth (> .7): the assignment overrides the ignore.
    assert terms["obj"].item() == pytest.approx(0.4740770, abs=1e-6)
    # noobj = the 1007 other (tiny-box, never ignored) predictions x sp(-3) = 1007 * .0485874 = 48.927463
    assert terms["noobj"].item() == pytest.approx(48.927463, rel=1e-5)
    # cls = BCE(-4, 0) + BCE(1.5, 1) + BCE(2, 0) = sp(-4) + sp(-1.5) + sp(2)
    #     = .0181499 + .2014133 + 2.1269280 = 2.3464912
    assert terms["cls"].item() == pytest.approx(2.3464912, abs=1e-5)


def test_gradients_are_darknets_deltas_on_one_box():
    raw = _one_box_raw()
    terms = YOLOv3Loss(ANCHORS, YOLOV3_MASKS, 3, 0.7)(raw, [GT_128], [torch.tensor([2])], (128, 128))
    sum(terms.values()).backward()
    s, a, j, i = POS
    grad = raw[s].grad.view(1, 3, 8, 8, 8)[0, a, :, j, i]
    # darknet: delta = scale * (t - sigmoid(out)) for x, y; scale * (t - raw) for w, h;
    # 1 - sigmoid for objectness; onehot - sigmoid for classes; the gradient is -delta.
    delta = [BOX_SCALE * (0.5 - _sig(POS_RAW["x"])), BOX_SCALE * (0.5 - _sig(POS_RAW["y"])),
             BOX_SCALE * (TW - POS_RAW["w"]), BOX_SCALE * (TH - POS_RAW["h"]), 1 - _sig(POS_RAW["obj"]),
             0 - _sig(-4.0), 1 - _sig(1.5), 0 - _sig(2.0)]
    torch.testing.assert_close(grad, -torch.tensor(delta), atol=1e-6, rtol=1e-5)
    # every other prediction: objectness delta 0 - sigmoid(-3), nothing else.
    for k, r in enumerate(raw):
        g = r.grad.view(1, 3, 8, r.shape[-2], r.shape[-1]).clone()
        if k == s:
            g[0, a, :, j, i] = 0
            g[0, a, 4, j, i] = _sig(-3.0)
        torch.testing.assert_close(g[:, :, 4], torch.full_like(g[:, :, 4], _sig(-3.0)))
        assert g[:, :, :4].abs().max() == 0 and g[:, :, 5:].abs().max() == 0


def test_batch_of_two_where_the_second_image_has_no_boxes():
    raw = _one_box_raw(batch=2)
    terms = YOLOv3Loss(ANCHORS, YOLOV3_MASKS, 3, 0.7)(
        raw, [GT_128, torch.zeros(0, 4)], [torch.tensor([2]), torch.zeros(0, dtype=torch.long)], (128, 128))
    # Sums over the batch / B = 2. Image 1 has every raw output at the defaults: it adds only
    # noobj, 1008 * sp(-3): noobj = (1007 + 1008) * .0485874 / 2; the box terms are halved.
    assert terms["noobj"].item() == pytest.approx(2015 * _sp(-3.0) / 2, rel=1e-5)
    assert terms["xy"].item() == pytest.approx(2.8825100 / 2, abs=1e-5)
    assert terms["cls"].item() == pytest.approx(2.3464912 / 2, abs=1e-5)
    dets = postprocess_yolo([r.detach() for r in raw], ANCHORS, YOLOV3_MASKS, (128, 128))
    # Image 0: the positive's objectness sig(.5) = .6225 times sig(2) = .8808, sig(1.5) = .8176,
    # sig(-4) = .0180: scores .5483, .5090, .0112 (> .005: three labels for one box); every
    # other prediction sig(-3) * sig(-4) = .0474 * .0180 = .00085 < .005. Image 1: nothing.
    assert dets[0]["labels"].tolist() == [3, 2, 1]
    assert dets[0]["scores"].tolist() == pytest.approx([0.5483, 0.5090, 0.0112], abs=1e-4)
    assert dets[1]["boxes"].shape == (0, 4) and dets[1]["labels"].shape == (0,)
    # and a batch with no boxes at all: image 0's box position is a plain negative, sp(.5) = .9740770
    empty = YOLOv3Loss(ANCHORS, YOLOV3_MASKS, 3, 0.7)(raw, [torch.zeros(0, 4)] * 2,
                                                      [torch.zeros(0, dtype=torch.long)] * 2, (128, 128))
    assert empty["xy"].item() == 0 and empty["cls"].item() == 0 and empty["obj"].item() == 0
    assert empty["noobj"].item() == pytest.approx((2015 * _sp(-3.0) + _sp(0.5)) / 2, rel=1e-5)


def test_two_truths_on_one_prediction_last_box_and_both_classes():
    # Two truths in cell (2, 4) of stride 16 with anchor 3 (30 x 61-ish): the first class index 0
    # at centre (40, 72) px, 32 x 64; the second class index 2 at (44, 76) px, 30 x 60.
    # Darknet: box targets and scale of the last (tx = 44/16 - 2 = .75, ty = 76/16 - 4 = .75,
    # tw = log(30/30) = 0, th = log(60/61), scale 2 - (30*60)/128^2), objectness 1, classes 0 and 2 -> 1.
    gt = cxcywh_to_xyxy(torch.tensor([[40, 72, 32, 64], [44, 76, 30, 60]], dtype=torch.float32) / 128)
    raw = _flat(_raw(128, 3, tx=0.0, tw=0.0, obj=0.0, cls=0.0))
    terms = YOLOv3Loss(ANCHORS, YOLOV3_MASKS, 3, 0.7)(raw, [gt], [torch.tensor([1, 3])], (128, 128))
    sum(terms.values()).backward()
    grad = raw[1].grad.view(1, 3, 8, 8, 8)[0, 0, :, 4, 2]
    scale = 2 - 30 * 60 / 128 ** 2
    delta = [scale * (0.75 - 0.5), scale * (0.75 - 0.5), scale * (0.0 - 0.0), scale * (math.log(60 / 61) - 0.0),
             1 - 0.5, 1 - 0.5, 0 - 0.5, 1 - 0.5]
    torch.testing.assert_close(grad, -torch.tensor(delta), atol=1e-6, rtol=1e-5)
    # One prediction counted once: cls = 2 * BCE(0, 1) + BCE(0, 0) = 3 log 2;
    # xy = scale * 2 * BCE(0, .75) = scale * 2 * log 2.
    assert terms["cls"].item() == pytest.approx(3 * math.log(2), rel=1e-6)
    assert terms["xy"].item() == pytest.approx(scale * 2 * math.log(2), rel=1e-6)


# ---------------------------------------------------------------- ignore mask


def _ignore_case():
    """416 px, C = 1. Ground truth: centre (208, 208) px, 69.6 x 90 px. Its best anchor is 5
    (59,119): inter 59*90 = 5310, union 6264 + 7021 - 5310 = 7975 -> .666 (116,90: 6264 / 10440
    = .6) -> stride 16, slot 2, 208/16 = 13.0 -> cell (13, 13). The stride-32 prediction of
    anchor 6 (116 x 90) at cell (6, 6) with raw 0, 0, 0, 0 decodes to centre (6.5/13, 6.5/13)
    = (.5, .5), 116 x 90 px: IoU with the truth 69.6*90 / (116*90) = .6, between .5 and .7.
    The positive (stride 16, slot 2, (13, 13)) decodes to the truth (tw = log(69.6/59),
    th = log(90/119)): IoU ~1 > both thresholds, but it is assigned."""
    raw = _raw(416, 1)
    raw[0][0, 0, :4, 6, 6] = 0.0
    raw[1][0, 2, 0:2, 13, 13] = -20.0  # sigmoid ~0: centre (13/26, 13/26) = (.5, .5)
    raw[1][0, 2, 2, 13, 13] = math.log(69.6 / 59)
    raw[1][0, 2, 3, 13, 13] = math.log(90 / 119)
    gt = cxcywh_to_xyxy(torch.tensor([_px_box(208, 208, 69.6, 90)]))
    return _flat(raw), gt


def test_ignore_threshold_05_vs_07():
    raw, gt = _ignore_case()
    boxes, _, _ = decode_outputs(raw, ANCHORS, YOLOV3_MASKS, (416, 416))
    best = best_truth_iou(boxes, gt, torch.zeros(1, dtype=torch.long))
    p_scale0 = 0 * 169 + 6 * 13 + 6  # scale 0, slot 0, j 6, i 6
    p_pos = 3 * 169 + 2 * 676 + 13 * 26 + 13  # scale 1, slot 2, j 13, i 13
    assert best[0, p_scale0].item() == pytest.approx(0.6, abs=1e-5)
    assert best[0, p_pos].item() == pytest.approx(1.0, abs=1e-4)
    assert (best > 0.5).sum().item() == 2  # every other box is tiny
    n = 3 * (13 ** 2 + 26 ** 2 + 52 ** 2)  # 10647 predictions at 416
    for threshold, negatives in ((0.5, n - 2), (0.7, n - 1)):
        terms = YOLOv3Loss(ANCHORS, YOLOV3_MASKS, 1, threshold)(raw, [gt], [torch.tensor([1])], (416, 416))
        # .5: the IoU-.6 prediction is ignored (no objectness loss); .7: it is a negative.
        assert terms["noobj"].item() == pytest.approx(negatives * _sp(-3.0), rel=1e-5)
        # the positive overrides the ignore (IoU ~1 > threshold): BCE(-3, 1) = sp(3) = 3.0485874
        assert terms["obj"].item() == pytest.approx(3.0485874, abs=1e-5)


def test_ignore_uses_every_truth_of_the_image_only():
    # The IoU-.6 truth placed in image 1 of a batch of 2: image 0's prediction is no longer
    # ignored (truths of other images do not count); image 1's is.
    raw, gt = _ignore_case()
    raw2 = [torch.cat([r.detach()] * 2).requires_grad_() for r in raw]
    loss = YOLOv3Loss(ANCHORS, YOLOV3_MASKS, 1, 0.5)
    terms = loss(raw2, [torch.zeros(0, 4), gt], [torch.zeros(0, dtype=torch.long), torch.tensor([1])], (416, 416))
    n = 10647
    # image 0: every prediction negative; image 1: n - 2 (the positive, the ignored one).
    assert terms["noobj"].item() == pytest.approx(((n - 1) * _sp(-3.0) + _sp(-3.0) + (n - 2) * _sp(-3.0)) / 2,
                                                  rel=1e-5)


def test_best_truth_iou_chunked_equals_brute_force(monkeypatch):
    g = torch.Generator().manual_seed(0)
    pred = cxcywh_to_xyxy(torch.cat([torch.rand(3, 50, 2, generator=g), 0.05 + 0.4 * torch.rand(3, 50, 2, generator=g)], -1))
    gt = cxcywh_to_xyxy(torch.cat([torch.rand(7, 2, generator=g), 0.05 + 0.4 * torch.rand(7, 2, generator=g)], -1))
    image = torch.tensor([0, 0, 2, 2, 2, 0, 2])
    from single_stage_detector.boxes import box_iou
    expected = torch.zeros(3, 50)
    for b in range(3):
        if (image == b).any():
            expected[b] = box_iou(pred[b], gt[image == b]).amax(1)
    for chunk in (1 << 21, 50, 100, 120):  # 1, 2 and 2-with-remainder truths per chunk
        monkeypatch.setattr(v3_loss, "_MAX_PAIRS_PER_CHUNK", chunk)
        torch.testing.assert_close(best_truth_iou(pred, gt, image), expected)


# ---------------------------------------------------------------- darknet oracle


def _darknet_deltas(raw, gts, anchors, masks, num_classes, size, ignore_threshold):
    """forward_yolo_layer's deltas, loop by loop, on Python floats; gts: per image
    [(cx, cy, w, h, class index)] normalised. Returns per scale a [B, A, 5+C, g, g] tensor."""
    out = []
    for s, (r, mask) in enumerate(zip(raw, masks)):
        bsz, _, g, _ = r.shape
        x = r.detach().view(bsz, 3, 5 + num_classes, g, g).tolist()
        delta = [[[[[0.0] * g for _ in range(g)] for _ in range(5 + num_classes)] for _ in range(3)] for _ in range(bsz)]
        for b in range(bsz):
            for j in range(g):
                for i in range(g):
                    for n in range(3):
                        aw, ah = anchors[mask[n]]
                        px, py = (i + _sig(x[b][n][0][j][i])) / g, (j + _sig(x[b][n][1][j][i])) / g
                        pw, ph = math.exp(x[b][n][2][j][i]) * aw / size, math.exp(x[b][n][3][j][i]) * ah / size
                        best = 0.0
                        for (tx, ty, tw, th, _) in gts[b]:
                            ix = max(0.0, min(px + pw / 2, tx + tw / 2) - max(px - pw / 2, tx - tw / 2))
                            iy = max(0.0, min(py + ph / 2, ty + th / 2) - max(py - ph / 2, ty - th / 2))
                            iou = ix * iy / (pw * ph + tw * th - ix * iy)
                            best = max(best, iou)
                        o = _sig(x[b][n][4][j][i])
                        delta[b][n][4][j][i] = 0.0 if best > ignore_threshold else -o
            for (tx, ty, tw, th, c) in gts[b]:
                ious = []
                for (aw, ah) in anchors:
                    inter = min(tw * size, aw) * min(th * size, ah)
                    ious.append(inter / (tw * th * size * size + aw * ah - inter))
                best_n = 0
                for n in range(len(anchors)):
                    if ious[n] > ious[best_n]:
                        best_n = n
                if best_n not in mask:
                    continue
                n = mask.index(best_n)
                i, j = min(int(tx * g), g - 1), min(int(ty * g), g - 1)
                aw, ah = anchors[best_n]
                bs = 2 - tw * th
                t = [tx * g - i, ty * g - j, math.log(tw * size / aw), math.log(th * size / ah)]
                for k in range(2):
                    delta[b][n][k][j][i] = bs * (t[k] - _sig(x[b][n][k][j][i]))
                for k in range(2, 4):
                    delta[b][n][k][j][i] = bs * (t[k] - x[b][n][k][j][i])
                delta[b][n][4][j][i] = 1 - _sig(x[b][n][4][j][i])
                if delta[b][n][5][j][i] != 0:  # delta_yolo_class: classes already set here
                    delta[b][n][5 + c][j][i] = 1 - _sig(x[b][n][5 + c][j][i])
                else:
                    for k in range(num_classes):
                        delta[b][n][5 + k][j][i] = (1.0 if k == c else 0.0) - _sig(x[b][n][5 + k][j][i])
        out.append(torch.tensor(delta))
    return out


def test_gradients_equal_darknet_deltas_on_a_random_batch():
    # Input 64 px (grids 2, 4, 8), C = 4, B = 3: image 0 has two truths on one prediction
    # (anchor 3, stride 16, cell (1, 1)) and others; image 1 none; image 2 three.
    size, num_classes = 64, 4
    gts = [
        [(0.30, 0.30, 30 / 64, 60 / 64, 0), (0.35, 0.45, 31 / 64, 62 / 64, 2), (0.8, 0.2, 0.1, 0.12, 1),
         (0.5, 0.7, 0.9, 0.5, 3)],
        [],
        [(0.1, 0.9, 0.15, 0.2, 3), (0.6, 0.6, 0.5, 0.6, 0), (1.0, 0.5, 0.3, 0.2, 2)],
    ]
    g = torch.Generator().manual_seed(1)
    raw = [0.7 * torch.randn(3, 3, 5 + num_classes, k, k, generator=g) for k in (2, 4, 8)]
    # Planted overlaps at stride 8 (grid 8), where the two truths below are assigned to slot 0:
    # image 2, slot 1 (16 x 30 px) at cell (0, 7) decodes onto the truth (.1, .9, .15, .2):
    # sigmoid(tx) = .1*8 - 0 = .8, sigmoid(ty) = .9*8 - 7 = .2, tw = log(.15*64/16), th = log(.2*64/30)
    # -> IoU 1, ignored at both thresholds; image 0, slot 2 (33 x 23 px) at cell (6, 1), centred
    # on the truth (.8, .2, .1, .12), .6 of its width -> IoU .6: ignored at .5 only.
    raw[2][2, 1, :4, 7, 0] = torch.tensor([math.log(4), math.log(0.25), math.log(0.15 * 64 / 16), math.log(0.2 * 64 / 30)])
    raw[2][0, 2, :4, 1, 6] = torch.tensor([math.log(0.4 / 0.6), math.log(0.6 / 0.4), math.log(0.06 * 64 / 33),
                                           math.log(0.12 * 64 / 23)])
    raw = [r.reshape(3, -1, r.shape[-2], r.shape[-1]).requires_grad_() for r in raw]
    boxes = [cxcywh_to_xyxy(torch.tensor([t[:4] for t in im], dtype=torch.float32).reshape(-1, 4)) for im in gts]
    labels = [torch.tensor([t[4] + 1 for t in im], dtype=torch.long) for im in gts]
    anchors = [tuple(a) for a in YOLOV3_COCO_ANCHORS_PX]
    for threshold in (0.5, 0.7):
        for r in raw:
            r.grad = None
        terms = YOLOv3Loss(ANCHORS, YOLOV3_MASKS, num_classes, threshold)(raw, boxes, labels, (size, size))
        sum(terms.values()).backward()
        deltas = _darknet_deltas(raw, gts, anchors, YOLOV3_MASKS, num_classes, size, threshold)
        ignored = sum(int((d[:, :, 4] == 0).sum()) for d in deltas)
        assert ignored >= (2 if threshold == 0.5 else 1)  # the case exercises the ignore rule
        for r, d in zip(raw, deltas):
            torch.testing.assert_close(r.grad, -d.view_as(r) / 3, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- decode and postprocess


def test_decode_known_logits():
    # 416 px; stride 16 (grid 26), slot 1 = anchor 4 (62 x 45), cell i 3, j 5:
    # tx 0 -> sigmoid .5, ty log 3 -> .75, tw log 2 -> w = 2 * 62 / 416, th 0 -> h = 45 / 416.
    # cx = (3 + .5) / 26 = .1346154, cy = (5 + .75) / 26 = .2211538;
    # x1 = .1346154 - 62/416 = -.0144231 (not clipped), x2 = .2836538,
    # y1 = .2211538 - 22.5/416 = .1670673, y2 = .2752404; objectness 0 -> .5, class log 4 -> .8.
    raw = _raw(416, 2)
    raw[1][0, 1, :7, 5, 3] = torch.tensor([0.0, math.log(3), math.log(2), 0.0, 0.0, math.log(4), -1.0])
    boxes, obj, cls = decode_outputs(_flat(raw), ANCHORS, YOLOV3_MASKS, (416, 416))
    assert boxes.shape == (1, 10647, 4) and obj.shape == (1, 10647) and cls.shape == (1, 10647, 2)
    p = 3 * 169 + 1 * 676 + 5 * 26 + 3  # scale 1 after 507 predictions of scale 0 -> 1316
    torch.testing.assert_close(boxes[0, p], torch.tensor([-0.0144231, 0.1670673, 0.2836538, 0.2752404]),
                               atol=1e-6, rtol=0)
    assert obj[0, p].item() == pytest.approx(0.5) and cls[0, p, 0].item() == pytest.approx(0.8)
    assert cls[0, p, 1].item() == pytest.approx(_sig(-1.0))


def _select(rows, batch, num_classes=3, **kw):
    """rows: (image, box xyxy, objectness, class probs); every other prediction objectness 0."""
    p = max(sum(1 for r in rows if r[0] == b) for b in range(batch))
    boxes, obj, cls = torch.zeros(batch, p, 4), torch.zeros(batch, p), torch.zeros(batch, p, num_classes)
    fill = [0] * batch
    for b, box, o, c in rows:
        boxes[b, fill[b]], obj[b, fill[b]], cls[b, fill[b]] = torch.tensor(box), o, torch.tensor(c)
        fill[b] += 1
    return select_detections(boxes, obj, cls, **kw)


def test_postprocess_multi_label_and_thresholds():
    dets = _select([
        # objectness .9, classes .5 / .4 / .001: scores .45, .36 kept (multi-label), .0009 dropped
        (0, [0.1, 0.1, 0.3, 0.3], 0.9, [0.5, 0.4, 0.001]),
        # objectness .004 <= .005: dropped whatever its class
        (0, [0.5, 0.5, 0.7, 0.7], 0.004, [1.0, 1.0, 1.0]),
        # objectness .5: classes .0099 -> .00495 dropped, .0102 -> .0051 kept
        (0, [0.6, 0.1, 0.9, 0.3], 0.5, [0.0099, 0.0102, 0.0]),
    ], batch=1)
    d = dets[0]
    assert d["labels"].tolist() == [1, 2, 2] and d["labels"].dtype == torch.int64
    torch.testing.assert_close(d["scores"], torch.tensor([0.45, 0.36, 0.0051]))
    torch.testing.assert_close(d["boxes"][:2], torch.tensor([[0.1, 0.1, 0.3, 0.3]] * 2))


def test_postprocess_nms_at_045_is_strict_per_image_and_class():
    a = [0.0, 0.0, 0.5, 0.625]  # area .3125 (all coordinates exact in float32)
    dets = _select([
        # image 0: B inside A, area .140625: IoU .140625 / .3125 = .45 exactly -> kept (darknet: IoU > .45)
        (0, a, 1.0, [0.9, 0, 0]), (0, [0.0, 0.0, 0.375, 0.375], 1.0, [0.8, 0, 0]),
        # image 1: E inside A, area .375 * .390625 = .146484375: IoU .46875 > .45 -> suppressed;
        # the same box of another class is kept.
        (1, a, 1.0, [0.9, 0, 0]), (1, [0.0, 0.0, 0.375, 0.390625], 1.0, [0.8, 0.7, 0]),
        # image 2: D inside A, area .125: IoU .4 -> kept
        (2, a, 1.0, [0.9, 0, 0]), (2, [0.0, 0.0, 0.25, 0.5], 1.0, [0.8, 0, 0]),
    ], batch=3)
    assert [d["scores"].tolist() for d in dets] == [pytest.approx([0.9, 0.8]), pytest.approx([0.9, 0.7]),
                                                    pytest.approx([0.9, 0.8])]
    assert dets[1]["labels"].tolist() == [1, 2]


def test_postprocess_clips_after_nms_and_caps_per_image():
    # [-2, 0, 1, 1] and [0, 0, 1, 1]: IoU 1/3 before clipping -> both kept; both written clamped.
    dets = _select([(0, [-2.0, 0.0, 1.0, 1.0], 1.0, [0.9, 0, 0]), (0, [0.0, 0.0, 1.0, 1.0], 1.0, [0.8, 0, 0]),
                    (1, [0.2, 0.2, 1.3, 0.4], 1.0, [0, 0, 0.3])], batch=2)
    torch.testing.assert_close(dets[0]["boxes"], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2))
    torch.testing.assert_close(dets[1]["boxes"], torch.tensor([[0.2, 0.2, 1.0, 0.4]]))
    # 12 disjoint boxes, scores .1 ... .12: the best 5 kept, best first.
    rows = [(0, [0.05 * k, 0.0, 0.05 * k + 0.04, 0.04], 1.0, [0.1 + 0.001 * k, 0, 0]) for k in range(12)]
    d = _select(rows, batch=1, max_detections=5)[0]
    torch.testing.assert_close(d["scores"], torch.tensor([0.111, 0.110, 0.109, 0.108, 0.107]))
    assert len(_select(rows, batch=1, max_detections=None)[0]["scores"]) == 12
    # A pre-NMS cap keeps the best candidates per image before NMS: with a box overlapping the
    # best one (IoU 1, score .2, suppressed) among the 3 kept, only 2 survive.
    rows.append((0, [0.55, 0.0, 0.59, 0.04], 1.0, [0.2, 0, 0]))
    d = _select(rows, batch=1, pre_nms_top_k=3, max_detections=None)[0]
    torch.testing.assert_close(d["scores"], torch.tensor([0.2, 0.110]))


# ---------------------------------------------------------------- detector


class _StandIn(nn.Module):
    """A stand-in network: average pooling to strides 32, 16, 8 and a 1x1 conv per scale."""

    def __init__(self, num_classes):
        super().__init__()
        self.heads = nn.ModuleList(nn.Conv2d(3, 3 * (5 + num_classes), 1) for _ in range(3))

    def forward(self, images):
        return [head(nn.functional.avg_pool2d(images, s)) for head, s in zip(self.heads, (32, 16, 8))]


def test_detector_training_multi_scale_and_evaluation():
    torch.manual_seed(0)
    det = YOLOv3Detector(_StandIn(4), num_classes=4, ignore_threshold=0.7)
    targets = {"boxes": [GT_128, torch.zeros(0, 4)], "labels": [torch.tensor([2]), torch.zeros(0, dtype=torch.long)]}
    det.train()
    for size in (128, 96):  # multi-scale: the input size comes from the images
        losses = det(torch.rand(2, 3, size, size), targets)
        assert set(losses) == {"xy", "wh", "obj", "noobj", "cls"}
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        det.zero_grad()
        sum(losses.values()).backward()
        assert all(h.weight.grad.abs().sum() > 0 for h in det.model.heads)
    with pytest.raises(ValueError, match="needs targets"):
        det(torch.rand(1, 3, 64, 64))
    det.eval()
    out = det(torch.rand(2, 3, 64, 64))
    assert len(out) == 2
    for d in out:
        assert set(d) == {"boxes", "scores", "labels"} and len(d["scores"]) <= 100
        assert d["labels"].dtype == torch.int64 and ((d["labels"] >= 1) & (d["labels"] <= 4)).all()
        assert ((d["boxes"] >= 0) & (d["boxes"] <= 1)).all() and (d["scores"] > 0.005).all()
    policy = det.eval_policy
    assert policy["score_threshold"] == 0.005 and policy["nms_threshold"] == 0.45 and policy["max_detections"] == 100
    with pytest.raises(ValueError, match="YOLO output"):
        YOLOv3Detector(_StandIn(4), num_classes=5).train()(torch.rand(1, 3, 64, 64), targets)
