"""Golden tests for default boxes and box coding (SPEC.md sections 3 and 4)."""
import math

import pytest
import torch

from single_stage_detector.box_coder import (
    SSD300_BOX_SPEC,
    BoxCoder,
    DefaultBoxSpec,
    box_iou,
    cxcywh_to_xyxy,
    default_boxes_300,
)


def test_default_boxes_count_and_golden_values():
    d = default_boxes_300()
    assert d.shape == (8732, 4)
    assert SSD300_BOX_SPEC.num_boxes == 8732
    assert SSD300_BOX_SPEC.boxes_per_location == (4, 6, 6, 6, 4, 4)
    assert float(d.min()) >= 0.0 and float(d.max()) <= 1.0
    s0, s1 = 21 / 300, 45 / 300
    # First cell of the 38x38 map: centre (0.5 / 37.5), then the 4 shapes in order.
    c = 0.5 / (300 / 8)
    expected = [
        (c, c, s0, s0),
        (c, c, math.sqrt(s0 * s1), math.sqrt(s0 * s1)),
        (c, c, s0 * math.sqrt(2), s0 / math.sqrt(2)),
        (c, c, s0 / math.sqrt(2), s0 * math.sqrt(2)),
        (1.5 / 37.5, c, s0, s0),  # next column, same row
    ]
    torch.testing.assert_close(d[:5], torch.tensor(expected), rtol=0, atol=1e-6)
    # Level offsets: 38^2*4 = 5776, +19^2*6 = 7942, +10^2*6 = 8542, +5^2*6 = 8692, +3^2*4 = 8728.
    torch.testing.assert_close(d[5776], torch.tensor([0.5 / (300 / 16), 0.5 / (300 / 16), 0.15, 0.15]))
    # Last level (1x1, step 300): a 0.87 square, the 0.9558 one, and 2:1 boxes clamped to 1.
    s5, s6 = 261 / 300, 315 / 300
    torch.testing.assert_close(
        d[8728:],
        torch.tensor([
            [0.5, 0.5, s5, s5],
            [0.5, 0.5, math.sqrt(s5 * s6), math.sqrt(s5 * s6)],
            [0.5, 0.5, 1.0, s5 / math.sqrt(2)],
            [0.5, 0.5, s5 / math.sqrt(2), 1.0],
        ]),
        rtol=0, atol=1e-6,
    )


def test_box_spec_validates_lengths():
    with pytest.raises(ValueError, match="scales"):
        DefaultBoxSpec(300, (38, 19), (8, 16), (21, 45), ((2,), (2,)))


def _toy_coder():
    # Three hand-placed default boxes (cx, cy, w, h):
    # d0 = [0, 0, .5, .5], d1 = [.5, .5, 1, 1], d2 = [.4, .4, .6, .6] in xyxy.
    d = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]])
    return BoxCoder(d)


def test_hand_computed_match_and_encode():
    coder = _toy_coder()
    # g0 overlaps d0 with IoU 0.2/0.25 = 0.8 -> positive by threshold.
    # g1 has IoU 0.0225/0.0575 = 0.391 with d2 (< 0.5) but d2 is its best default box,
    # so it is forced positive; d1's best IoU (0.084, with g1) stays background.
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.4], [0.45, 0.45, 0.65, 0.65]])]
    labels = [torch.tensor([7, 3])]
    iou = box_iou(boxes[0], cxcywh_to_xyxy(coder.default_boxes))
    torch.testing.assert_close(iou[1], torch.tensor([0.0025 / 0.2875, 0.0225 / 0.2675, 0.0225 / 0.0575]))
    loc, lab = coder.encode(boxes, labels)
    assert lab.tolist() == [[7, 0, 3]]
    # d0 <- g0 = (cx .25, cy .2, w .5, h .4): (10*0/.5, 10*(-.05)/.5, 5 log 1, 5 log .8)
    # d2 <- g1 = (.55, .55, .2, .2): (10*.05/.2, 10*.05/.2, 0, 0)
    expected = torch.tensor([[[0.0, -1.0, 0.0, 5 * math.log(0.8)], [0, 0, 0, 0], [2.5, 2.5, 0.0, 0.0]]])
    torch.testing.assert_close(loc, expected, rtol=0, atol=1e-5)


def test_iou_threshold_is_strictly_greater_than_half():
    # One ground truth with IoU exactly 0.5 against d0 and a better match elsewhere.
    d = torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.5, 0.5, 1.0, 1.0]])  # [0,0,.5,1] and [0,0,1,1]
    coder = BoxCoder(d)
    gt = [torch.tensor([[0.0, 0.0, 1.0, 1.0]])]  # IoU 0.5 with d0, 1.0 with d1 (forced there anyway)
    _, lab = coder.encode(gt, [torch.tensor([5])])
    assert lab.tolist() == [[0, 5]]


def test_shared_best_default_box_goes_to_later_ground_truth():
    coder = _toy_coder()
    # Both ground truths have d0 as their best default box; the later one wins d0.
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.45, 0.45]])]
    _, lab = coder.encode(boxes, [torch.tensor([1, 2])])
    assert lab[0, 0].item() == 2


def test_image_without_boxes_and_mixed_batch():
    coder = BoxCoder(default_boxes_300())
    empty = torch.zeros(0, 4)
    loc, lab = coder.encode([empty], [torch.zeros(0, dtype=torch.int64)])
    assert loc.shape == (1, 8732, 4) and lab.shape == (1, 8732)
    assert lab.sum() == 0 and loc.abs().sum() == 0
    loc, lab = coder.encode(
        [empty, torch.tensor([[0.1, 0.1, 0.4, 0.5]])],
        [torch.zeros(0, dtype=torch.int64), torch.tensor([12])],
    )
    assert lab[0].sum() == 0 and (lab[1] == 12).sum() >= 1
    assert set(lab[1].unique().tolist()) <= {0, 12}


def _reference_encode(coder, boxes, labels):
    """Straightforward per-image, per-ground-truth version of the matching rules."""
    dxyxy = cxcywh_to_xyxy(coder.default_boxes)
    out_loc, out_lab = [], []
    for bx, lb in zip(boxes, labels):
        a = dxyxy.shape[0]
        lab = torch.zeros(a, dtype=torch.int64)
        matched = dxyxy.clone()
        if len(bx):
            iou = box_iou(bx, dxyxy)
            best_iou, best_gt = iou.max(dim=0)
            for g in range(len(bx)):
                p = int(iou[g].argmax())
                best_iou[p] = 2.0
                best_gt[p] = g
            pos = best_iou > 0.5
            lab[pos] = lb[best_gt[pos]]
            matched[pos] = bx[best_gt[pos]]
        loc = coder.encode_boxes(matched)
        loc[lab == 0] = 0
        out_loc.append(loc)
        out_lab.append(lab)
    return torch.stack(out_loc), torch.stack(out_lab)


def _random_gt(gen, n_images=4, max_boxes=9):
    boxes, labels = [], []
    for i in range(n_images):
        n = int(torch.randint(0, max_boxes, (1,), generator=gen)) if i else 0
        xy = torch.rand(n, 2, generator=gen) * 0.7
        wh = 0.02 + torch.rand(n, 2, generator=gen) * 0.5
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1))
        labels.append(torch.randint(1, 81, (n,), generator=gen))
    return boxes, labels


def test_batched_encode_equals_per_image_reference():
    gen = torch.Generator().manual_seed(0)
    coder = BoxCoder(default_boxes_300())
    boxes, labels = _random_gt(gen)
    loc, lab = coder.encode(boxes, labels)
    ref_loc, ref_lab = _reference_encode(coder, boxes, labels)
    assert torch.equal(lab, ref_lab)
    torch.testing.assert_close(loc, ref_loc, rtol=1e-5, atol=1e-5)


def test_decode_inverts_encode():
    gen = torch.Generator().manual_seed(1)
    coder = BoxCoder(default_boxes_300())
    boxes, labels = _random_gt(gen)
    matched, mlab = coder.match(boxes, labels)
    loc, lab = coder.encode(boxes, labels)
    decoded = coder.decode(loc)
    pos = lab > 0
    assert pos.any()
    torch.testing.assert_close(decoded[pos], matched[pos], rtol=1e-5, atol=1e-5)
    # Zero offsets decode to the default boxes themselves.
    torch.testing.assert_close(coder.decode(torch.zeros(1, 8732, 4))[0], cxcywh_to_xyxy(coder.default_boxes))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encode_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    boxes, labels = _random_gt(gen)
    cpu = BoxCoder(default_boxes_300())
    gpu = BoxCoder(default_boxes_300()).to("cuda")
    loc_c, lab_c = cpu.encode(boxes, labels)
    loc_g, lab_g = gpu.encode([b.cuda() for b in boxes], [lb.cuda() for lb in labels])
    assert torch.equal(lab_c, lab_g.cpu())
    torch.testing.assert_close(loc_c, loc_g.cpu(), rtol=1e-4, atol=1e-4)
