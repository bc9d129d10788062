"""The benchmark's plain per-image baseline computes what the batched components compute."""
import math

import torch

from single_stage_detector.benchmark import _coco_like_targets, coco_like_counts, realistic_outputs
from single_stage_detector.box_coder import BoxCoder, default_boxes_300
from single_stage_detector.losses import MultiboxLoss
from single_stage_detector.postprocess import postprocess
from single_stage_detector.reference_impl import plain_encode, plain_multibox_loss, plain_postprocess


def test_plain_baseline_agrees_with_the_batched_components():
    gen = torch.Generator().manual_seed(0)
    d = default_boxes_300()
    coder = BoxCoder(d)
    counts = coco_like_counts(4, gen)
    counts[1] = 0
    boxes, labels = _coco_like_targets(counts, gen)
    loc_t, lab_t = coder.encode(boxes, labels)
    plain_loc, plain_lab = plain_encode(d, boxes, labels)
    assert torch.equal(lab_t, plain_lab)
    torch.testing.assert_close(loc_t, plain_loc, rtol=0, atol=0)

    loc_p = torch.randn(4, 8732, 4, generator=gen, requires_grad=True)
    logits = torch.randn(4, 8732, 81, generator=gen, requires_grad=True)
    ours = MultiboxLoss()(loc_p, logits, loc_t, lab_t)
    plain = plain_multibox_loss(loc_p, logits, loc_t, lab_t)
    assert math.isclose(float(ours.detach()), float(plain.detach()), rel_tol=1e-6)

    loc, lg = realistic_outputs(coder, boxes, labels, gen)
    for a, b in zip(postprocess(loc, lg, d), plain_postprocess(loc, lg, d)):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["scores"], b["scores"])
        assert torch.equal(a["boxes"], b["boxes"])
