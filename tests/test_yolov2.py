"""YOLOv2 against darknet's region layer (src/region_layer.c) and cfg/yolov2.cfg, and seed 004's
variant: assignment, every loss term, the prior-matching warm-up, the passthrough layer, decoding,
and the presets through ``build_detector``.

Golden values are worked by hand from darknet's formulas (arithmetic in the comments);
``_darknet_region_deltas`` is a plain loop transcription of ``forward_region_layer``, written
from its rules, that the vectorised loss's gradients must equal (negated, / B).
"""
import math

import pytest
import torch

from single_stage_detector.boxes import cxcywh_to_xyxy
from single_stage_detector.detectors.base import build_detector, family_of, get_preset
from single_stage_detector.detectors.yolov2.decode import decode_region, postprocess_region
from single_stage_detector.detectors.yolov2.network import darknet_reorg, reorg, space_to_depth
from single_stage_detector.detectors.yolov2.presets import YOLOV2_COCO_ANCHORS
from single_stage_detector.detectors.yolov2.region_loss import RegionLoss, assign_region_targets

ANCHORS = torch.tensor(YOLOV2_COCO_ANCHORS)
LN2 = math.log(2.0)


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def _bce(z, t):
    """BCE-with-logits(z, t) = softplus(z) - t z."""
    return math.log1p(math.exp(z)) - t * z


def _raw(batch, grid, num_classes=3, anchors=5, fill=0.0):
    return torch.full((batch, anchors, 5 + num_classes, grid, grid), fill)


def _flat(view):
    b, a, ch, gh, gw = view.shape
    return view.reshape(b, a * ch, gh, gw).clone().requires_grad_()


def _xyxy(*rows):
    return cxcywh_to_xyxy(torch.tensor(rows, dtype=torch.float32).reshape(-1, 4))


def _grad_view(raw, anchors=5):
    b, ch, gh, gw = raw.grad.shape
    return raw.grad.view(b, anchors, ch // anchors, gh, gw)


# ---------------------------------------------------------------- assignment


def test_anchor_choice_is_shape_only_in_the_centre_cell():
    # 416 px, grid 13. Truth (0.5, 0.5, 0.3, 0.25): centre 6.5 cells -> cell (6, 6); size in grid
    # units 3.9 x 3.25. Shape IoU with the yolov2.cfg anchors:
    #   a2 3.33843 x 5.47434: inter 3.33843 * 3.25 = 10.8499, union 12.675 + 18.2757 - 10.8499 = 20.1008 -> .5398
    #   a3 7.88282 x 3.52778: inter 3.9 * 3.25 = 12.675, union 27.8090 -> .4558 (a0 .031, a1 .305, a4 .141)
    # -> anchor 2; tx = ty = .5, tw = log(3.9 / 3.33843) = .155476, th = log(3.25 / 5.47434) = -.521417;
    # box scale 2 - .3 * .25 = 1.925.
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.25], [7 / 13, 1.0, 0.3, 0.25], [0.2, 0.3, 0.0, 0.1]])
    asg = assign_region_targets(boxes, torch.zeros(3, dtype=torch.long), torch.tensor([4, 0, 1]), ANCHORS, (13, 13))
    assert asg.anchor.tolist() == [2, 2, 0] and asg.valid.tolist() == [True, True, False]
    assert asg.cell_i.tolist()[:2] == [6, 7] and asg.cell_j.tolist()[:2] == [6, 12]  # y == 1 -> last row
    torch.testing.assert_close(asg.target[0], torch.tensor([0.5, 0.5, 0.155476, -0.521417]), atol=1e-5, rtol=0)
    torch.testing.assert_close(asg.box_scale[:2], torch.tensor([1.925, 1.925]))
    assert asg.target[2].tolist() == [0.0, 0.0, 0.0, 0.0] and asg.box_scale[2] == 0  # zero width: not assigned
    torch.testing.assert_close(asg.anchor_iou[0, 2:4], torch.tensor([0.5398, 0.4558]), atol=1e-4, rtol=0)


def test_the_responsible_anchor_ignores_the_current_predictions():
    # bias_match=1: anchor 3's prediction at cell (6, 6) is planted exactly on the truth above
    # (tw = log(3.9 / 7.88282), th = log(3.25 / 3.52778), offsets .5), yet anchor 2 is
    # responsible: it gets the truth's box gradient; anchor 3 only the prior pull (1 image seen).
    view = _raw(1, 13, fill=0.0)
    view[0, 3, 2, 6, 6] = math.log(3.9 / 7.88282)
    view[0, 3, 3, 6, 6] = math.log(3.25 / 3.52778)
    raw = _flat(view)
    loss = RegionLoss(ANCHORS, 3)
    terms = loss(raw, [_xyxy([0.5, 0.5, 0.3, 0.25])], [torch.tensor([1])], images_seen=1)
    sum(terms.values()).backward()
    g = _grad_view(raw)
    # Anchor 2 (responsible): d/dtw of 1.925 * .5 * (tw - .155473)^2 at 0 = -1.925 * .155476 = -.299291.
    assert g[0, 2, 2, 6, 6].item() == pytest.approx(-0.299291, abs=1e-5)
    # Anchor 3: only the prior pull toward its anchor (.01 * tw), and the no-object gradient on
    # its objectness is 0: its box has IoU 1 > .6 with the truth (ignored).
    assert g[0, 3, 2, 6, 6].item() == pytest.approx(0.01 * math.log(3.9 / 7.88282), abs=1e-6)
    assert g[0, 3, 4, 6, 6].item() == 0.0
    assert float(g[0, 3, 5:, 6, 6].abs().sum()) == 0.0  # no class gradient off the responsible anchor


# ---------------------------------------------------------------- each loss term, hand-computed

# One truth, B = 1, input 64 px (grid 2 x 2), C = 3, the 5 yolov2.cfg anchors.
# Truth (cx .3, cy .7, w .5, h .4), label 3 (class 2): cell i = int(.3 * 2) = 0, j = int(.7 * 2) = 1;
# size 1.0 x 0.8 grid units; shape IoU with a0 (.57273 x .677385): .387961 / .8 = .484948, a1 .206925
# (a2 .0438, a3 .0288, a4 .0089) -> anchor 0. Targets tx = .6, ty = .4, tw = log(1 / .57273) = .557341,
# th = log(.8 / .677385) = .166372; box scale 2 - .5 * .4 = 1.8.
# The responsible prediction's raw outputs: tx .5, ty -.2, tw .3, th -.1, objectness 1.0, classes
# (.2, -.4, 1.0); every other raw output 0.
# Decoded: cx = sigmoid(.5) / 2 = .311230, cy = (1 + sigmoid(-.2)) / 2 = .725083,
# w = .57273 e^.3 / 2 = .386552, h = .677385 e^-.1 / 2 = .306462: x [.117954, .504506] and
# y [.571852, .878314] lie inside the truth's [.05, .55] x [.5, .9], so
# IoU = area(pred) / area(truth) = .386552 * .306462 / .2 = .592317.
TRUTH_1BOX = [0.3, 0.7, 0.5, 0.4]
RESPONSIBLE_RAW = [0.5, -0.2, 0.3, -0.1, 1.0, 0.2, -0.4, 1.0]


def _one_box(variant, images_seen=0):
    view = _raw(1, 2)
    view[0, 0, :, 1, 0] = torch.tensor(RESPONSIBLE_RAW)
    raw = _flat(view)
    kw = {"ignore_threshold": 0.6 if variant == "darknet" else 0.5}
    terms = RegionLoss(ANCHORS, 3, variant=variant, **kw)(raw, [_xyxy(TRUTH_1BOX)], [torch.tensor([3])],
                                                            images_seen=images_seen)
    sum(terms.values()).backward()
    return terms, _grad_view(raw)


def test_darknet_region_loss_terms_on_one_box():
    terms, g = _one_box("darknet", images_seen=64)
    expected = {
        # 1.8 * (BCE(.5, .6) + BCE(-.2, .4)) = 1.8 * ((.974077 - .3) + (.598139 + .08)) = 2.433989
        "xy": 1.8 * (_bce(0.5, 0.6) + _bce(-0.2, 0.4)),
        # 1.8 * .5 * ((.3 - .557341)^2 + (-.1 - .166372)^2) = .9 * (.066224 + .070954) = .123460
        "wh": 0.123460,
        # 5 * BCE(1.0, IoU .592317) = 5 * (1.313262 - .592317) = 3.604722
        "obj": 3.604722,
        # 19 other predictions, logit 0: BCE(0, 0) = ln 2 each; none ignored (their best IoU with the
        # truth is .2069, anchor 1 at the same cell: 1 x .8 inside 1.87 x 2.06 -> .8 / 3.866)
        "noobj": 19 * LN2,
        # softmax CE of (.2, -.4, 1.0) at class 2: logsumexp 1.528229 - 1.0 = .528229
        "cls": 0.528229,
        # 64 images seen < 12800: the 19 other predictions pulled to their anchors at their cell
        # centres: .01 * (BCE(0, .5) + BCE(0, .5) + .5 * 0 + .5 * 0) = .01 * 2 ln 2 each
        "prior": 0.01 * 19 * 2 * LN2,
    }
    assert list(terms) == ["xy", "wh", "obj", "noobj", "cls", "prior"]
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=2e-5), name
    # The gradients are darknet's deltas, negated: x: -1.8 (.6 - sigmoid(.5)) = .040427,
    # y: -1.8 (.4 - sigmoid(-.2)) = .090299, w: -1.8 (.557341 - .3) = -.463214, h: -1.8 (.166372 + .1)
    # = -.479469, objectness: -5 (.592317 - sigmoid(1)) = .693706, classes softmax - onehot =
    # (.264946, .145406, -.410352).
    torch.testing.assert_close(g[0, 0, :, 1, 0], torch.tensor([0.040427, 0.090299, -0.463214, -0.479469, 0.693706,
                                                               0.264946, 0.145406, -0.410352]), atol=2e-5, rtol=0)
    # Another prediction: objectness sigmoid(0) = .5 (no-object delta -.5), box .01 * (sigmoid(0) - .5) = 0.
    assert g[0, 3, 4, 0, 1].item() == pytest.approx(0.5)


def test_seed004_loss_terms_on_one_box():
    terms, g = _one_box("seed004")
    # xy and cls as darknet's; wh the full squared error: 2 * .123460; objectness squared error on
    # the sigmoid: 5 (sigmoid(1) - .592317)^2 = 5 * (.731059 - .592317)^2 = .096246; no-object:
    # sigmoid(0)^2 = .25 for each of the 19 others (the cell's other anchors have shape IoU < .5 with
    # the truth: .2069 at most); no prior term.
    assert terms["xy"].item() == pytest.approx(1.8 * (_bce(0.5, 0.6) + _bce(-0.2, 0.4)), abs=2e-5)
    assert terms["wh"].item() == pytest.approx(2 * 0.123460, abs=2e-5)
    assert terms["obj"].item() == pytest.approx(0.096246, abs=2e-5)
    assert terms["noobj"].item() == pytest.approx(19 * 0.25)
    assert terms["cls"].item() == pytest.approx(0.528229, abs=2e-5)
    assert terms["prior"].item() == 0.0
    # d/dz 5 (sigmoid(z) - .592317)^2 at z = 1: 10 * .138742 * sigmoid'(1) (.196612) = .272782
    assert g[0, 0, 4, 1, 0].item() == pytest.approx(0.272782, abs=2e-5)
    # d/dz sigmoid(z)^2 at 0 = 2 * .5 * .25 = .25
    assert g[0, 3, 4, 0, 1].item() == pytest.approx(0.25)


def test_box_terms_are_scaled_by_2_minus_wh():
    # B = 2, raw 0, 64 px (grid 2). Image 0: the 1-box truth (scale 1.8, anchor 0, tw .557341);
    # image 1: (.5, .5, .9, .8): 1.8 x 1.6 grid units -> a1 (1.87446 x 2.06253: inter 2.88, union
    # 3.866144 -> .7449), cell (1, 1), tw = log(1.8 / 1.87446) = -.040534, scale 2 - .72 = 1.28.
    # d/dtw of scale * .5 * (tw - t)^2 / B at tw = 0: -scale * t / 2.
    raw = _flat(_raw(2, 2))
    loss = RegionLoss(ANCHORS, 3)
    terms = loss(raw, [_xyxy(TRUTH_1BOX), _xyxy([0.5, 0.5, 0.9, 0.8])], [torch.tensor([1]), torch.tensor([2])],
                 images_seen=20000)
    sum(terms.values()).backward()
    g = _grad_view(raw)
    assert g[0, 0, 2, 1, 0].item() == pytest.approx(-1.8 * 0.557341 / 2, abs=1e-5)
    assert g[1, 1, 2, 1, 1].item() == pytest.approx(-1.28 * -0.040534 / 2, abs=1e-5)
    # x: BCE gradient (sigmoid(0) - tx) x scale / B: image 1 tx = .5 * 2 - 1 = 0 -> 1.28 * .5 / 2 = .32
    assert g[1, 1, 0, 1, 1].item() == pytest.approx(0.32)


def test_no_object_loss_is_ignored_above_06_iou():
    # 416 px, grid 13; truth centred on cell (6, 6), 2 x 2 grid units -> anchor 1 responsible
    # (1.87446 x 2.06253: inter 3.74892, union 4.11722 -> .9105). At the same cell, anchor 0 is
    # made 1.22 x 2 (IoU 2.44 / 4 = .61 > .6: ignored) and anchor 2 1.18 x 2 (.59: not ignored),
    # both centred (tx = ty = 0) with objectness logit 0.
    view = _raw(1, 13)
    view[0, 0, 2, 6, 6], view[0, 0, 3, 6, 6] = math.log(1.22 / 0.57273), math.log(2 / 0.677385)
    view[0, 2, 2, 6, 6], view[0, 2, 3, 6, 6] = math.log(1.18 / 3.33843), math.log(2 / 5.47434)
    raw = _flat(view)
    for threshold, ignored in ((0.6, {0}), (0.55, {0, 2}), (0.62, set())):
        raw.grad = None
        terms = RegionLoss(ANCHORS, 3, ignore_threshold=threshold)(raw, [_xyxy([0.5, 0.5, 2 / 13, 2 / 13])],
                                                                   [torch.tensor([1])], images_seen=0)
        sum(terms.values()).backward()
        g = _grad_view(raw)
        for a in (0, 2):
            assert g[0, a, 4, 6, 6].item() == (0.0 if a in ignored else 0.5), (threshold, a)
        # 169 * 5 = 845 predictions: 1 responsible, |ignored| ignored, the rest ln 2 each.
        assert terms["noobj"].item() == pytest.approx((844 - len(ignored)) * LN2, rel=1e-5)


def test_seed004_ignores_the_cells_other_anchors_by_shape():
    # Anchors (1, 1), (1.2, 1.2), (3, 3) grid units; truth 1.1 x 1.1 at cell (1, 1) of a 2 x 2 grid:
    # shape IoU 1 / 1.21 = .826, 1.21 / 1.44 = .840, 1.21 / 9 = .134 -> anchor 1 responsible,
    # anchor 0 ignored (> .5) at that cell only; anchor 2 not.
    anchors = torch.tensor([[1.0, 1.0], [1.2, 1.2], [3.0, 3.0]])
    raw = _flat(_raw(1, 2, anchors=3))
    loss = RegionLoss(anchors, 3, variant="seed004", ignore_threshold=0.5)
    sum(loss(raw, [_xyxy([0.75, 0.75, 0.55, 0.55])], [torch.tensor([2])]).values()).backward()
    g = _grad_view(raw, anchors=3)
    assert g[0, 0, 4, 1, 1].item() == 0.0 and g[0, 2, 4, 1, 1].item() == pytest.approx(0.25)
    assert g[0, 0, 4, 0, 0].item() == pytest.approx(0.25)  # anchor 0 elsewhere: a negative


# ---------------------------------------------------------------- the prior-matching warm-up


def test_prior_warmup_switches_off_after_12800_images():
    torch.manual_seed(0)
    detector = build_detector("yolov2_tiny_cpu").train()
    images = torch.rand(2, 3, 64, 64)
    targets = {"boxes": [_xyxy(TRUTH_1BOX), _xyxy([0.5, 0.5, 0.9, 0.8])],
               "labels": [torch.tensor([1]), torch.tensor([2])]}
    assert "images_seen" in detector.model.state_dict() and detector.images_seen == 0
    # darknet: net.seen += batch, then the region layer tests seen < 12800.
    detector.model.images_seen.fill_(12797)
    on = detector(images, targets)
    assert detector.images_seen == 12799 and on["prior"].item() > 0
    off = detector(images, targets)  # 12801 seen
    assert detector.images_seen == 12801 and off["prior"].item() == 0.0
    detector.model.images_seen.fill_(12798)
    assert detector(images, targets)["prior"].item() == 0.0  # exactly 12,800 seen: off
    # Off means no gradient from the term either.
    detector.zero_grad()
    detector(images, targets)["prior"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0.0 for p in detector.parameters())
    # Evaluation does not count; the count travels with the network's state dict (checkpoints).
    detector.eval()
    detector(images)
    again = build_detector("yolov2_tiny_cpu")
    again.model.load_state_dict(detector.model.state_dict())
    assert again.images_seen == detector.images_seen == 12802


# ---------------------------------------------------------------- the darknet oracle


def _darknet_region_deltas(raw, gts, anchors, num_classes, thresh, seen):
    """forward_region_layer's deltas, loop by loop (B, A, 5+C, gh, gw nested lists -> Tensor)."""
    b_n, a_n, _, gh, gw = raw.shape
    x = raw.tolist()
    delta = [[[[[0.0] * gw for _ in range(gh)] for _ in range(5 + num_classes)] for _ in range(a_n)]
             for _ in range(b_n)]

    def box(b, n, j, i):
        return ((i + _sig(x[b][n][0][j][i])) / gw, (j + _sig(x[b][n][1][j][i])) / gh,
                math.exp(x[b][n][2][j][i]) * anchors[n][0] / gw, math.exp(x[b][n][3][j][i]) * anchors[n][1] / gh)

    def iou(p, t):
        ix = max(0.0, min(p[0] + p[2] / 2, t[0] + t[2] / 2) - max(p[0] - p[2] / 2, t[0] - t[2] / 2))
        iy = max(0.0, min(p[1] + p[3] / 2, t[1] + t[3] / 2) - max(p[1] - p[3] / 2, t[1] - t[3] / 2))
        return ix * iy / (p[2] * p[3] + t[2] * t[3] - ix * iy)

    def delta_box(t, b, n, j, i, scale):
        target = [t[0] * gw - i, t[1] * gh - j,
                  math.log(t[2] * gw / anchors[n][0]), math.log(t[3] * gh / anchors[n][1])]
        out = [_sig(x[b][n][0][j][i]), _sig(x[b][n][1][j][i]), x[b][n][2][j][i], x[b][n][3][j][i]]
        for k in range(4):
            delta[b][n][k][j][i] = scale * (target[k] - out[k])
        return iou(box(b, n, j, i), t)

    for b in range(b_n):
        for j in range(gh):
            for i in range(gw):
                for n in range(a_n):
                    best = max([iou(box(b, n, j, i), t) for t in gts[b]] or [0.0])
                    delta[b][n][4][j][i] = 0.0 if best > thresh else -_sig(x[b][n][4][j][i])
                    if seen < 12800:
                        prior = ((i + 0.5) / gw, (j + 0.5) / gh, anchors[n][0] / gw, anchors[n][1] / gh)
                        delta_box(prior, b, n, j, i, 0.01)
        for t in gts[b]:
            i, j = min(int(t[0] * gw), gw - 1), min(int(t[1] * gh), gh - 1)
            best_n, best_iou = 0, 0.0
            for n in range(a_n):
                w, h = anchors[n][0] / gw, anchors[n][1] / gh  # bias_match: the anchor, at the origin
                inter = min(w, t[2]) * min(h, t[3])
                shape = inter / (w * h + t[2] * t[3] - inter)
                if shape > best_iou:
                    best_n, best_iou = n, shape
            score = delta_box(t, b, best_n, j, i, 2 - t[2] * t[3])
            delta[b][best_n][4][j][i] = 5 * (score - _sig(x[b][best_n][4][j][i]))
            logits = [x[b][best_n][5 + k][j][i] for k in range(num_classes)]
            top = max(logits)
            probs = [math.exp(v - top) for v in logits]
            probs = [p / sum(probs) for p in probs]
            for k in range(num_classes):
                delta[b][best_n][5 + k][j][i] = (1.0 if k == t[4] else 0.0) - probs[k]
    return torch.tensor(delta)


@pytest.mark.parametrize("seen", [0, 12800])
def test_gradients_equal_darknet_deltas_on_a_random_batch(seen):
    # 96 px (grid 3), C = 4, B = 3: image 0 has two truths on one prediction (the second one wins)
    # and a third; image 1 none; image 2 two, one on the grid's last column (x = 1).
    gts = [[(0.30, 0.30, 0.30, 0.35, 0), (0.32, 0.25, 0.28, 0.33, 2), (0.8, 0.7, 0.2, 0.5, 1)],
           [],
           [(0.1, 0.9, 0.15, 0.2, 3), (1.0, 0.5, 0.6, 0.4, 2)]]
    g = torch.Generator().manual_seed(3)
    view = 0.6 * torch.randn(3, 5, 9, 3, 3, generator=g)
    # A planted overlap: image 0, anchor 3 at cell (2, 2) decoded onto the truth (.8, .7, .2, .5):
    # sigmoid(tx) = .8 * 3 - 2 = .4, sigmoid(ty) = .7 * 3 - 2 = .1, w .6 / 7.88282 grid, h 1.5 / 3.52778.
    view[0, 3, :4, 2, 2] = torch.tensor([math.log(0.4 / 0.6), math.log(0.1 / 0.9), math.log(0.6 / 7.88282),
                                         math.log(1.5 / 3.52778)])
    raw = _flat(view)
    boxes = [_xyxy(*[t[:4] for t in im]) for im in gts]
    labels = [torch.tensor([t[4] + 1 for t in im], dtype=torch.long) for im in gts]
    terms = RegionLoss(ANCHORS, 4)(raw, boxes, labels, images_seen=seen)
    sum(terms.values()).backward()
    delta = _darknet_region_deltas(view, gts, YOLOV2_COCO_ANCHORS, 4, 0.6, seen)
    assert int((delta[:, :, 4] == 0).sum()) >= 1  # the ignore rule is exercised
    torch.testing.assert_close(raw.grad, -delta.view_as(raw) / 3, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- passthrough (reorg)


def _reorg_cpu_backward(x, stride):
    """darknet's reorg_cpu(x, w, h, c, batch, stride, forward=0, out) with the input's w, h, c, as
    forward_reorg_layer calls it, index for index; the output buffer read as [B, C s^2, H/s, W/s]."""
    b_n, c, h, w = x.shape
    flat = x.reshape(-1).tolist()
    out = [0.0] * len(flat)
    out_c = c // (stride * stride)
    for b in range(b_n):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * b))
                    c2, offset = k % out_c, k // out_c
                    w2, h2 = i * stride + offset % stride, j * stride + offset // stride
                    out_index = w2 + w * stride * (h2 + h * stride * (c2 + out_c * b))
                    out[in_index] = flat[out_index]
    return torch.tensor(out).view(b_n, c * stride * stride, h // stride, w // stride)


def test_passthrough_reorg_shape_and_channel_order():
    x = torch.arange(2 * 8 * 4 * 6, dtype=torch.float32).view(2, 8, 4, 6)
    torch.testing.assert_close(darknet_reorg(x), _reorg_cpu_backward(x, 2), rtol=0, atol=0)
    # By hand, image 0 of arange(8 * 4 * 4) as [1, 8, 4, 4] (out_c = 2): intermediate channel k = 5
    # at (j 1, i 0): c2 = 5 % 2 = 1, offset 5 // 2 = 2 -> dx 0, dy 1 -> the buffer as [2, 8, 8] at
    # [1, 3, 0] = 64 + 24 = 88; the intermediate's flat index 5 * 16 + 4 = 84 is channel 21, (0, 0)
    # of the [32, 2, 2] output.
    y = torch.arange(8 * 4 * 4, dtype=torch.float32).view(1, 8, 4, 4)
    assert darknet_reorg(y)[0, 21, 0, 0].item() == 88
    # True space-to-depth: out[c * 4 + dy * 2 + dx, y, x] = in[c, 2y + dy, 2x + dx]:
    # channel 1 * 4 + 1 * 2 + 0 = 6 at (1, 0) is in[1, 3, 0] = 16 + 12 = 28.
    assert space_to_depth(y)[0, 6, 1, 0].item() == 28
    assert torch.equal(reorg(y, 2, "space_to_depth"), torch.nn.functional.pixel_unshuffle(y, 2))
    assert not torch.equal(darknet_reorg(y), space_to_depth(y))  # two different orders
    assert torch.equal(darknet_reorg(y).flatten().sort().values, y.flatten())  # a permutation
    with pytest.raises(ValueError, match="multiples of 2"):
        darknet_reorg(torch.zeros(1, 8, 3, 4))
    with pytest.raises(ValueError, match="reorg order"):
        reorg(y, 2, "pixel")


def test_yolov2_cfg_network_shapes_and_darknet_layers():
    from single_stage_detector.detectors.yolo.darknet_weights import darknet_weights_nbytes
    from single_stage_detector.detectors.yolov2.family import build_network

    with torch.device("meta"):  # shapes only
        net = build_network(get_preset("yolov2_darknet19"))
        seen = {}

        def record(name, shape_of):
            def hook(module, inputs, output):  # returns None: the output is kept
                seen.setdefault(name, shape_of(inputs, output))
            return hook

        net.passthrough.register_forward_hook(record("pass", lambda i, o: o.shape))
        net.backbone.register_forward_hook(record("c4c5", lambda i, o: (o[0].shape, o[1].shape)))
        net.head.register_forward_hook(record("concat", lambda i, o: i[0].shape))
        out = net(torch.empty(1, 3, 416, 416))
        assert seen["c4c5"] == ((1, 512, 26, 26), (1, 1024, 13, 13))
        assert seen["pass"] == (1, 64, 26, 26) and seen["concat"] == (1, 256 + 1024, 13, 13)
        assert out.shape == (1, 5 * 85, 13, 13)
        for size in range(320, 609, 32):  # multi-scale: grid = size / 32
            assert net(torch.empty(1, 3, size, size)).shape[-2:] == (size // 32, size // 32)
        resnet = build_network(get_preset("yolov2_resnet50"))
        seen.clear()
        resnet.head.register_forward_hook(record("concat", lambda i, o: i[0].shape))
        assert resnet(torch.empty(1, 3, 416, 416)).shape == (1, 425, 13, 13)
        assert seen["concat"] == (1, 512 + 1024, 13, 13)  # seed 004: C4 -> 128 -> 512, then C5's 1024
    # yolov2.cfg conv layers and the published yolov2.weights (header 0.1: 16 bytes) 203,934,260
    # bytes; darknet19_448.conv.23 (its 18 backbone convs) 79,327,120 bytes.
    assert [n for n, _, _ in net.darknet_conv_layers()] == [0, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 15, 16, 18, 19,
                                                            20, 21, 22, 23, 24, 26, 29, 30]
    assert darknet_weights_nbytes(net, version=(0, 1, 0)) == 203_934_260
    assert darknet_weights_nbytes(net, max_conv_layers=18, version=(0, 1, 0)) == 79_327_120
    assert net.backbone.darknet_layer_of_maps == (16, 22)


# ---------------------------------------------------------------- decode


def test_decode_known_logits():
    # 416 px (grid 13), anchor 2 (3.33843 x 5.47434 grid units) at cell i 3, j 5: tx 0 -> .5,
    # ty log 3 -> .75, tw log 2, th 0: cx = 3.5 / 13 = .269231, cy = 5.75 / 13 = .442308,
    # w = 2 * 3.33843 / 13 = .513605, h = 5.47434 / 13 = .421103 -> x1 .012428, y1 .231756,
    # x2 .526034, y2 .652860; objectness logit 0 -> .5; class logits (log 4, 0, 0) -> softmax
    # (4/6, 1/6, 1/6): scores (.333333, .083333, .083333). Prediction index 2 * 169 + 5 * 13 + 3 = 406.
    view = _raw(1, 13, fill=-20.0)
    view[0, 2, :8, 5, 3] = torch.tensor([0.0, math.log(3), math.log(2), 0.0, 0.0, math.log(4), 0.0, 0.0])
    raw = view.reshape(1, 40, 13, 13)
    boxes, obj, cls = decode_region(raw, ANCHORS)
    assert boxes.shape == (1, 845, 4) and obj.shape == (1, 845) and cls.shape == (1, 845, 3)
    torch.testing.assert_close(boxes[0, 406], torch.tensor([0.012428, 0.231756, 0.526034, 0.652860]),
                               atol=2e-6, rtol=0)
    assert obj[0, 406].item() == pytest.approx(0.5) and cls[0, 406].tolist() == pytest.approx([4 / 6, 1 / 6, 1 / 6])
    multi = postprocess_region(raw, ANCHORS)[0]  # darknet: every class > .005
    assert multi["labels"].tolist() == [1, 2, 3]
    assert multi["scores"].tolist() == pytest.approx([1 / 3, 1 / 12, 1 / 12], abs=1e-6)
    single = postprocess_region(raw, ANCHORS, score_threshold=0.001, nms_threshold=0.6, multi_label=False)[0]
    assert single["labels"].tolist() == [1] and single["scores"].tolist() == pytest.approx([1 / 3], abs=1e-6)
    torch.testing.assert_close(single["boxes"][0], torch.tensor([0.012428, 0.231756, 0.526034, 0.652860]),
                               atol=2e-6, rtol=0)


# ---------------------------------------------------------------- presets through build_detector


def test_presets_and_their_documented_values():
    darknet, resnet, tiny = (get_preset(n) for n in ("yolov2_darknet19", "yolov2_resnet50", "yolov2_tiny_cpu"))
    assert darknet.anchors == YOLOV2_COCO_ANCHORS and darknet.grid_size == 13 and darknet.reorg_order == "darknet"
    assert darknet.loss_settings == {"variant": "darknet", "ignore_threshold": 0.6, "object_scale": 5.0,
                                     "noobject_scale": 1.0, "coord_scale": 1.0, "class_scale": 1.0,
                                     "prior_warmup_images": 12800, "prior_scale": 0.01}
    assert darknet.eval_policy["score_threshold"] == 0.005 and darknet.eval_policy["nms_threshold"] == 0.45
    assert resnet.anchors == ((0.53, 0.79), (1.71, 2.36), (2.89, 6.44), (6.33, 3.79), (9.03, 9.74))
    assert resnet.loss_settings["variant"] == "seed004" and resnet.loss_settings["ignore_threshold"] == 0.5
    assert resnet.loss_settings["prior_warmup_images"] == 0
    assert (resnet.score_threshold, resnet.nms_threshold, resnet.multi_label) == (0.001, 0.6, False)
    assert tiny.input_size == 128 and tiny.grid_size == 4
    assert all(family_of(p).name == "yolov2" and family_of(p).variable_input_size for p in (darknet, resnet, tiny))
    assert "darknet19_448.conv.23" in family_of(darknet).backbone_weights(darknet)
    assert "ResNet-50" in family_of(resnet).backbone_weights(resnet) and family_of(tiny).backbone_weights(tiny) is None
    with pytest.raises(ValueError, match="multiple of 32"):
        type(darknet)(name="x", input_size=300)
    with pytest.raises(ValueError, match="loss_variant"):
        type(darknet)(name="x", loss_variant="ultralytics")


@pytest.mark.parametrize("name", ["yolov2_tiny_cpu", "yolov2_darknet19", "yolov2_resnet50"])
def test_every_preset_trains_a_step_and_evaluates(name):
    torch.manual_seed(0)
    detector = build_detector(name)
    images = torch.rand(2, 3, 64, 64)  # grid 2
    targets = {"boxes": [_xyxy(TRUTH_1BOX), torch.zeros(0, 4)],
               "labels": [torch.tensor([5]), torch.zeros(0, dtype=torch.long)]}
    detector.train()
    terms = detector(images, targets)
    assert set(terms) == {"xy", "wh", "obj", "noobj", "cls", "prior"}
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    head = detector.model.output_conv.weight.grad
    assert head is not None and float(head.abs().sum()) > 0
    detector.eval()
    with torch.no_grad():
        dets = detector(images)
    assert len(dets) == 2
    for d in dets:
        assert d["boxes"].shape[1] == 4 and d["labels"].dtype == torch.int64
        assert bool((d["boxes"] >= 0).all() and (d["boxes"] <= 1).all())
        assert d["labels"].numel() == 0 or (int(d["labels"].min()) >= 1 and int(d["labels"].max()) <= 80)
    assert detector.eval_policy["multi_label"] == get_preset(name).multi_label
