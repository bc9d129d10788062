"""Post-processing: score threshold, per-class NMS, top-k, output format."""
import pytest
import torch

from single_stage_detector.box_coder import BoxCoder, cxcywh_to_xyxy, default_boxes_300
from single_stage_detector.postprocess import grouped_nms, postprocess


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
    # Anchor 0 is [-.022, -.022, .048, .048] (it crosses the image border and is not
    # clipped); anchor 2 (the 2:1 box at the same centre) overlaps it with IoU 0.55 ->
    # suppressed within the same class only; anchor 8 (two cells to the right) overlaps it
    # little -> kept. Anchor 100's score is below 0.05.
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
    assert tuple(round(v, 5) for v in xyxy[0].tolist()) in kept_boxes  # not clipped (the reference)
    clipped = postprocess(loc, logits, d, clip_boxes=True)[0]
    assert torch.equal(clipped["scores"], det["scores"]) and torch.equal(clipped["labels"], det["labels"])
    torch.testing.assert_close(clipped["boxes"], det["boxes"].clamp(0, 1), rtol=0, atol=0)


def test_max_detections_and_empty_images():
    d = default_boxes_300()
    a = d.shape[0]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, a, 81, generator=gen) * 4
    logits[1, :, 0] = 100.0  # second image: only background
    loc = torch.randn(2, a, 4, generator=gen) * 0.1
    out = postprocess(loc, logits, d, max_detections=200, clip_boxes=True)
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
    boxes = BoxCoder(d).decode(loc)[0]  # not clipped, as in the reference
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


# -- exact-coordinate NMS and the reference's order of operations (no clipping before NMS) --

def _iou_reference_arithmetic(box, others):
    """IoU of one box against others with the MLPerf reference's arithmetic (float32)."""
    lt = torch.maximum(others[:, :2], box[:2])
    rb = torch.minimum(others[:, 2:], box[2:])
    delta = (rb - lt).clamp(min=0)
    inter = delta[:, 0] * delta[:, 1]
    area_o = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    area_b = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area_o + area_b - inter)


def _greedy_nms_loop(boxes, scores, threshold):
    """Plain greedy NMS of one class: take the best, drop everything with IoU >= threshold."""
    order = torch.sort(scores, descending=True, stable=True).indices
    keep = []
    while order.numel():
        top = order[0]
        keep.append(int(top))
        order = order[1:]
        order = order[_iou_reference_arithmetic(boxes[top], boxes[order]) < threshold]
    return keep


def _reference_postprocess(loc, logits, d, threshold=0.05, nms=0.5, per_class=200, per_image=200):
    """The MLPerf reference's order of operations, one image and one class at a time.

    Softmax, decode, then per class: scores > threshold, best `per_class`, greedy NMS;
    then the best `per_image` of the image. No clipping anywhere.
    """
    coder = BoxCoder(d)
    out = []
    for b in range(loc.shape[0]):
        boxes = coder.decode(loc[b:b + 1])[0]
        probs = torch.softmax(logits[b], dim=-1)
        dets = []
        for c in range(1, logits.shape[-1]):
            s = probs[:, c]
            idx = torch.nonzero(s > threshold).flatten()
            idx = idx[torch.sort(s[idx], descending=True, stable=True).indices][:per_class]
            for k in _greedy_nms_loop(boxes[idx], s[idx], nms):
                a = int(idx[k])
                dets.append((float(s[a]), c, tuple(boxes[a].tolist())))
        dets.sort(key=lambda t: -t[0])
        out.append(dets[:per_image])
    return out


def _as_set(det):
    return {(s, c, tuple(bx)) for s, c, bx in zip(det["scores"].tolist(), det["labels"].tolist(),
                                                  det["boxes"].tolist())}


def test_equals_reference_order_of_operations_with_boxes_crossing_the_border():
    d = default_boxes_300()
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(2, d.shape[0], 81, generator=gen) * 1.5
    logits[:, :, 0] += 8.0  # ~2000 candidates per image
    loc = torch.randn(2, d.shape[0], 4, generator=gen) * 0.6  # many boxes reach past the image
    out = postprocess(loc, logits, d)
    ref = _reference_postprocess(loc, logits, d)
    crossing = 0
    for det, r in zip(out, ref):
        assert _as_set(det) == {(s, c, bx) for s, c, bx in r}
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        crossing += int(((det["boxes"] < 0) | (det["boxes"] > 1)).any(dim=1).sum())
    assert crossing > 50  # the case this test is about is well represented


def test_clipping_happens_after_nms_golden():
    # Two boxes of class 3 in one image, decoded exactly from zero offsets:
    #   A = [-.12, .2, .08, .4] (crosses the left border), score .9
    #   B = [ 0,   .2, .08, .4],                           score .8
    # Unclipped (the reference) IoU(A, B) = .016 / .04 = 0.4 -> both kept. Clipping before NMS
    # would make A == B (IoU 1) and suppress B: the order of operations changes the result.
    d = torch.tensor([[-0.02, 0.3, 0.2, 0.2], [0.04, 0.3, 0.08, 0.2], [0.5, 0.5, 0.2, 0.2]])
    logits = torch.full((1, 3, 81), -20.0)
    logits[0, :, 0] = 0.0
    logits[0, 0, 3] = torch.log(torch.tensor(0.9 / 0.1)).item()
    logits[0, 1, 3] = torch.log(torch.tensor(0.8 / 0.2)).item()
    loc = torch.zeros(1, 3, 4)
    ref = postprocess(loc, logits, d)[0]
    assert ref["labels"].tolist() == [3, 3]
    torch.testing.assert_close(ref["scores"], torch.tensor([0.9, 0.8]))
    torch.testing.assert_close(ref["boxes"], torch.tensor([[-0.12, 0.2, 0.08, 0.4], [0.0, 0.2, 0.08, 0.4]]))
    clipped = postprocess(loc, logits, d, clip_boxes=True)[0]
    assert clipped["labels"].tolist() == [3, 3]  # clipped after NMS: B still kept
    torch.testing.assert_close(clipped["boxes"], torch.tensor([[0.0, 0.2, 0.08, 0.4], [0.0, 0.2, 0.08, 0.4]]))
    # What clipping first would have done: one detection.
    from torchvision.ops import nms
    assert len(nms(ref["boxes"].clamp(0, 1), ref["scores"], 0.5)) == 1


def test_iou_exactly_at_the_threshold_suppresses():
    # IoU([0, 0, .5, .5], [0, 0, .25, .5]) = .125 / .25 = 0.5 exactly in binary floating point;
    # the reference keeps only IoU < threshold.
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.25, 0.5], [0.6, 0.6, 0.7, 0.7]])
    keep = grouped_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.int64), 0.5)
    assert keep.tolist() == [0, 2]


def _small_box_clusters(gen, n_groups, per_group=5, width=0.01):
    """Clusters of ~0.01-wide boxes whose pairwise IoUs lie near 0.5, one cluster per group."""
    base = torch.rand(n_groups, 1, 2, generator=gen) * 0.9 + 0.02
    # A same-size box shifted by w/3 along one axis has IoU exactly 0.5; jitter around that.
    shift = width / 3 * (1 + 0.3 * (torch.rand(n_groups, per_group, 2, generator=gen) - 0.5))
    sign = torch.randint(0, 2, (n_groups, per_group, 2), generator=gen) * 2 - 1
    step = torch.cumsum(shift * sign * (torch.rand(n_groups, per_group, 2, generator=gen) < 0.7), dim=1)
    x1y1 = base + step
    wh = width * (1 + 0.1 * torch.rand(n_groups, per_group, 2, generator=gen))
    boxes = torch.cat([x1y1, x1y1 + wh], dim=-1).reshape(-1, 4)
    scores = torch.rand(n_groups * per_group, generator=gen)
    groups = torch.arange(n_groups).repeat_interleave(per_group)
    return boxes, scores, groups


def test_nms_on_small_boxes_equals_a_per_group_loop():
    from torchvision.ops import nms

    gen = torch.Generator().manual_seed(0)
    images, classes = 16, 81
    n_groups = images * (classes - 1)
    boxes, scores, groups = _small_box_clusters(gen, n_groups)
    # (image, class) group ids as the post-processing forms them: up to images x 81.
    img, cls = groups // (classes - 1), groups % (classes - 1) + 1
    group_ids = img * classes + cls
    perm = torch.randperm(len(scores), generator=gen)  # groups interleaved, as in a real batch
    boxes, scores, group_ids = boxes[perm], scores[perm], group_ids[perm]

    keep = set(grouped_nms(boxes, scores, group_ids, 0.5).tolist())
    loop, loop_tv = set(), set()
    near_half = 0
    for g in torch.unique(group_ids).tolist():
        idx = torch.nonzero(group_ids == g).flatten()
        loop.update(int(idx[k]) for k in _greedy_nms_loop(boxes[idx], scores[idx], 0.5))
        loop_tv.update(idx[nms(boxes[idx], scores[idx], 0.5)].tolist())
        iou = torch.stack([_iou_reference_arithmetic(bx, boxes[idx]) for bx in boxes[idx]])
        near_half += int(((iou - 0.5).abs() < 0.05).sum()) // 2
    assert near_half > 500  # many decisions sit close to the threshold
    assert keep == loop
    assert keep == loop_tv  # torchvision's per-class NMS on exact coordinates agrees (no IoU is exactly .5)

    # The coordinate-offset trick in float32 (torchvision's batched_nms below its size
    # threshold) rounds these boxes and changes decisions: what this test guards against.
    offset = group_ids.to(boxes) * (boxes.max() + 1)
    shifted = set(nms(boxes + offset[:, None], scores, 0.5).tolist())
    assert shifted != loop


@pytest.mark.parametrize("threshold, per_class, per_image", [(0.05, 200, 200), (0.0, 3, 5), (0.02, 1, 7)])
def test_limits_and_thresholds_equal_the_reference(threshold, per_class, per_image):
    gen = torch.Generator().manual_seed(4)
    d = torch.cat([torch.rand(60, 2, generator=gen), 0.05 + 0.3 * torch.rand(60, 2, generator=gen)], 1)
    logits = torch.randn(3, 60, 6, generator=gen) * 2
    loc = torch.randn(3, 60, 4, generator=gen) * 0.5
    out = postprocess(loc, logits, d, score_threshold=threshold, max_per_class=per_class, max_detections=per_image)
    ref = _reference_postprocess(loc, logits, d, threshold=threshold, per_class=per_class, per_image=per_image)
    for det, r in zip(out, ref):
        assert len(det["scores"]) == len(r) <= per_image
        assert _as_set(det) == {(s, c, bx) for s, c, bx in r}


def test_empty_output_and_empty_batch():
    d = default_boxes_300()
    logits = torch.zeros(2, d.shape[0], 81)
    logits[..., 0] = 50.0
    out = postprocess(torch.zeros(2, d.shape[0], 4), logits, d)
    assert [len(o["scores"]) for o in out] == [0, 0] and out[0]["boxes"].shape == (0, 4)
    assert postprocess(torch.zeros(0, d.shape[0], 4), torch.zeros(0, d.shape[0], 81), d) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_equals_cpu():
    d = default_boxes_300()
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(2, d.shape[0], 81, generator=gen) * 1.5
    logits[:, :, 0] += 8.0
    loc = torch.randn(2, d.shape[0], 4, generator=gen) * 0.6
    cpu = postprocess(loc, logits, d)
    gpu = postprocess(loc.cuda(), logits.cuda(), d.cuda())
    for c, g in zip(cpu, gpu):
        _same_detections(c, {k: v.cpu() for k, v in g.items()})


def _same_detections(a: dict, b: dict, tol: float = 1e-5) -> None:
    """The same detections up to float rounding: softmax and exp may differ in the last bit on
    a GPU, which may reorder equal-looking scores and must not move a box by more than ``tol``
    (rounding the coordinates to compare them exactly would fail whenever one lies within an
    ulp of a rounding boundary)."""
    assert len(a["labels"]) == len(b["labels"])
    assert sorted(a["labels"].tolist()) == sorted(b["labels"].tolist())
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-5, atol=1e-7)
    match = ((a["labels"][:, None] == b["labels"][None, :])
             & ((a["boxes"][:, None, :] - b["boxes"][None, :, :]).abs().amax(dim=2) <= tol)
             & ((a["scores"][:, None] - b["scores"][None, :]).abs() <= tol))
    assert bool(match.any(dim=1).all()) and bool(match.any(dim=0).all()), match.sum().item()


def test_detections_compare_up_to_rounding():
    """The CUDA comparison's helper: a last-bit change of a coordinate passes, a moved box fails."""
    d = default_boxes_300()
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(1, d.shape[0], 81, generator=gen) * 1.5
    logits[:, :, 0] += 8.0
    det = postprocess(torch.randn(1, d.shape[0], 4, generator=gen) * 0.6, logits, d)[0]
    nudged = {**det, "boxes": torch.nextafter(det["boxes"], torch.full_like(det["boxes"], 2.0))}
    _same_detections(det, nudged)
    moved = {**det, "boxes": det["boxes"].clone()}
    moved["boxes"][3, 0] += 1e-3
    with pytest.raises(AssertionError):
        _same_detections(det, moved)
