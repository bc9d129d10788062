"""Post-processing: score threshold, per-class NMS, top-k, output format."""
import torch

from single_stage_detector.box_coder import BoxCoder, cxcywh_to_xyxy, default_boxes_300
from single_stage_detector.postprocess import postprocess


def _logits_with(anchors, classes, hits):
    """Logits where anchor a has probability ~p for class c (others share the rest)."""
    logits = torch.full((1, anchors, classes), 0.0)
    logits[0, :, 0] = 10.0  # background everywhere by default
    for a, c, strength in hits:
        logits[0, a, 0] = 0.0
        logits[0, a, c] = strength
    return logits


def test_decodes_thresholds_and_suppresses_per_class():
    d = default_boxes_300()
    a = d.shape[0]
    # After clamping to the image, anchor 0 is [0, 0, .048, .048]; anchor 2 (the 2:1 box at
    # the same centre) overlaps it with IoU 0.64 -> suppressed within the same class only;
    # anchor 8 (two cells to the right) overlaps it little -> kept. Anchor 100's score is
    # below 0.05.
    hits = [(0, 5, 12.0), (2, 5, 11.0), (2, 7, 11.0), (8, 5, 10.0), (100, 9, -5.0)]
    logits = _logits_with(a, 81, hits)
    loc = torch.zeros(1, a, 4)
    out = postprocess(loc, logits, d)
    assert len(out) == 1
    det = out[0]
    assert set(det) == {"boxes", "scores", "labels"}
    pairs = sorted(zip(det["labels"].tolist(), [round(s, 4) for s in det["scores"].tolist()]))
    labels = [p[0] for p in pairs]
    # class 5: anchors 0 and 8 survive, anchor 2 suppressed by anchor 0; class 7: anchor 2 kept.
    assert labels.count(5) == 2 and labels.count(7) == 1 and 9 not in labels
    assert torch.all(det["scores"][:-1] >= det["scores"][1:])  # sorted
    xyxy = cxcywh_to_xyxy(d)
    kept_boxes = {tuple(round(v, 5) for v in b) for b in det["boxes"].tolist()}
    assert tuple(round(v, 5) for v in xyxy[0].clamp(0, 1).tolist()) in kept_boxes


def test_max_detections_and_empty_images():
    d = default_boxes_300()
    a = d.shape[0]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, a, 81, generator=gen) * 4
    logits[1, :, 0] = 100.0  # second image: only background
    loc = torch.randn(2, a, 4, generator=gen) * 0.1
    out = postprocess(loc, logits, d, max_detections=200)
    assert len(out[0]["scores"]) == 200
    assert len(out[1]["scores"]) == 0 and out[1]["boxes"].shape == (0, 4)
    assert out[0]["labels"].min() >= 1 and out[0]["labels"].max() <= 80
    assert (out[0]["boxes"] >= 0).all() and (out[0]["boxes"] <= 1).all()
    assert (out[0]["scores"] > 0.05).all()


def test_matches_a_per_class_loop_reference():
    from torchvision.ops import nms

    d = default_boxes_300()
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, d.shape[0], 81, generator=gen) * 3
    loc = torch.randn(1, d.shape[0], 4, generator=gen) * 0.2
    out = postprocess(loc, logits, d)[0]
    boxes = BoxCoder(d).decode(loc)[0].clamp(0, 1)
    probs = torch.softmax(logits[0], -1)
    ref = []
    for c in range(1, 81):
        s = probs[:, c]
        top = s.topk(200).indices
        top = top[s[top] > 0.05]
        keep = nms(boxes[top], s[top], 0.5)
        ref += [(float(s[top][k]), c) for k in keep]
    ref.sort(reverse=True)
    ref = ref[:200]
    got = sorted(zip(out["scores"].tolist(), out["labels"].tolist()), reverse=True)
    assert len(got) == len(ref)
    for (s1, c1), (s2, c2) in zip(got, ref):
        assert abs(s1 - s2) < 1e-6 and c1 == c2
