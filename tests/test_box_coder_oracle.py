"""The segment-reduction encoder pinned to the previous padded implementation (the oracle).

``_OldBoxCoder`` is a verbatim copy of ``BoxCoder.match``/``encode`` as they were before the
rewrite (with the unchanged ``box_iou``) (every image padded to the batch's largest box count, one [B, G, A] IoU): labels
must be identical and targets equal, on random batches, exact IoU ties and a 60-box image,
on both code paths of the new encoder (per-image reductions + sparse targets, and the
synchronisation-free segment reduction + dense targets used on GPUs).
"""
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from single_stage_detector.box_coder import (
    SSD300_BOX_SPEC,
    BoxCoder,
    box_iou,
    cxcywh_to_xyxy,
    default_boxes,
    default_boxes_300,
    xyxy_to_cxcywh,
)
from single_stage_detector.models.presets import SSD_TINY


class _OldBoxCoder:
    """The encoder before the rewrite (padded [B, G, A]), kept as the oracle."""

    def __init__(self, default_boxes, iou_threshold=0.5, variances=(0.1, 0.2)):
        self.default_boxes = default_boxes.float()
        self.default_boxes_xyxy = cxcywh_to_xyxy(self.default_boxes)
        self.iou_threshold = iou_threshold
        self.variances = variances

    def match(self, boxes, labels):
        device = self.default_boxes.device
        batch = len(boxes)
        num_anchors = self.default_boxes.shape[0]
        max_gt = max((int(b.shape[0]) for b in boxes), default=0)
        if max_gt == 0:
            return (torch.zeros(batch, num_anchors, 4, device=device),
                    torch.zeros(batch, num_anchors, dtype=torch.int64, device=device))
        gt = pad_sequence([b.to(device=device, dtype=torch.float32) for b in boxes], batch_first=True,
                          padding_value=-2.0)
        gt_labels = pad_sequence([lb.to(device=device, dtype=torch.int64) for lb in labels], batch_first=True)
        counts = torch.tensor([int(b.shape[0]) for b in boxes], device=device)
        valid = torch.arange(max_gt, device=device)[None, :] < counts[:, None]
        iou = box_iou(gt, self.default_boxes_xyxy)
        iou = iou.masked_fill(~valid[..., None], -1.0)
        best_gt_iou, best_gt = iou.max(dim=1)
        best_anchor = iou.argmax(dim=2)
        gt_ids = torch.arange(1, max_gt + 1, device=device).expand(batch, -1)
        gt_ids = torch.where(valid, gt_ids, torch.zeros_like(gt_ids))
        forced_gt = torch.zeros(batch, num_anchors, dtype=torch.int64, device=device)
        forced_gt.scatter_reduce_(1, best_anchor, gt_ids, reduce="amax")
        is_forced = forced_gt > 0
        best_gt = torch.where(is_forced, forced_gt - 1, best_gt)
        best_gt_iou = torch.where(is_forced, torch.full_like(best_gt_iou, 2.0), best_gt_iou)
        positive = best_gt_iou > self.iou_threshold
        matched_boxes = torch.gather(gt, 1, best_gt[..., None].expand(-1, -1, 4))
        matched_labels = torch.gather(gt_labels, 1, best_gt)
        matched_labels = torch.where(positive, matched_labels, torch.zeros_like(matched_labels))
        return matched_boxes, matched_labels

    def encode_boxes(self, boxes_xyxy):
        d = self.default_boxes
        g = xyxy_to_cxcywh(boxes_xyxy)
        vc, vs = self.variances
        txy = (g[..., :2] - d[:, :2]) / (vc * d[:, 2:])
        twh = torch.log(g[..., 2:] / d[:, 2:]) / vs
        return torch.cat([txy, twh], dim=-1)

    def encode(self, boxes, labels):
        matched_boxes, matched_labels = self.match(boxes, labels)
        positive = matched_labels > 0
        safe = torch.where(positive[..., None], matched_boxes, self.default_boxes_xyxy.expand_as(matched_boxes))
        loc = self.encode_boxes(safe)
        loc = torch.where(positive[..., None], loc, torch.zeros_like(loc))
        return loc, matched_labels


def _boxes(gen, n, quantum=None):
    """n boxes with COCO-like sizes (side ~2% to ~90% of the image), optionally on a k/quantum grid."""
    side = torch.exp(torch.empty(n, 1).uniform_(-4.0, -0.1, generator=gen))
    aspect = torch.exp(torch.randn(n, 1, generator=gen) * 0.5)
    wh = torch.cat([side * aspect.sqrt(), side / aspect.sqrt()], dim=1).clamp(0.01, 1.0)
    xy = torch.rand(n, 2, generator=gen) * (1 - wh)
    boxes = torch.cat([xy, xy + wh], dim=1)
    if quantum:
        boxes = (boxes * quantum).round() / quantum
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1 / quantum)
    return boxes.clamp(0, 1)


def _batch(gen, counts, quantum=None):
    boxes = [_boxes(gen, n, quantum) for n in counts]
    labels = [torch.randint(1, 81, (n,), generator=gen) for n in counts]
    return boxes, labels


def _between(d, a, b):
    """A box of default box a's shape centred half-way between a and b (same shape, same row):
    equal IoU with both, which are its best default boxes."""
    cx = (d[a, 0] + d[b, 0]) / 2
    w, cy, h = d[a, 2], d[a, 1], d[a, 3]
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])[None]


def _tie_batch(gen, d):
    """Images built for exact IoU ties (both kinds) and shared best default boxes."""
    between = torch.cat([_between(d, 156, 160), _between(d, 158, 162), _between(d, 172, 176)])
    a = _boxes(gen, 5)
    dup = torch.cat([a, a[:3], a[1:2]])  # identical boxes: equal IoU everywhere, same best default box
    nested = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.1, 0.1, 0.3, 0.3], [0.1, 0.1, 0.29, 0.3], [0.7, 0.2, 0.9, 0.4]])
    boxes = [between, dup, nested, torch.cat([between[:1], between[:1], a[:2]]), torch.zeros(0, 4)]
    labels = [torch.randint(1, 81, (len(b),), generator=gen) for b in boxes]
    return boxes, labels


def _coco_like_counts(gen, n):
    # Geometric-like counts with mean ~5.8 (COCO after the SSD crop), at least 1.
    u = torch.rand(n, generator=gen)
    return (torch.log1p(-u) / torch.log(torch.tensor(1 - 1 / 5.8))).floor().long().clamp(0, 40).add(1).tolist()


def _assert_same(new, old, boxes, labels):
    loc_o, lab_o = old.encode(boxes, labels)
    for sparse in (True, False):
        loc_n, lab_n = new._encode(boxes, labels, sparse=sparse)
        assert torch.equal(lab_n, lab_o), f"labels differ (sparse={sparse})"
        assert torch.equal(loc_n, loc_o), f"targets differ (sparse={sparse})"
    loc_n, lab_n = new.encode(boxes, labels)  # the default path of this device
    assert torch.equal(lab_n, lab_o) and torch.equal(loc_n, loc_o)
    # match() still returns the matched box of every positive default box.
    matched_n, mlab_n = new.match(boxes, labels)
    matched_o, mlab_o = old.match(boxes, labels)
    assert torch.equal(mlab_n, mlab_o)
    pos = mlab_o > 0
    assert torch.equal(matched_n[pos], matched_o[pos])


@pytest.mark.parametrize("seed", range(4))
def test_encode_equals_old_encoder_on_coco_like_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    d = default_boxes_300()
    counts = _coco_like_counts(gen, 12)
    counts[3] = 0  # an image without boxes inside the batch
    boxes, labels = _batch(gen, counts, quantum=64 if seed % 2 else None)
    _assert_same(BoxCoder(d), _OldBoxCoder(d), boxes, labels)


def test_encode_equals_old_encoder_with_a_60_box_image():
    gen = torch.Generator().manual_seed(10)
    d = default_boxes_300()
    counts = [3, 1, 60, 7, 0, 2]
    boxes, labels = _batch(gen, counts)
    _assert_same(BoxCoder(d), _OldBoxCoder(d), boxes, labels)


def test_encode_equals_old_encoder_on_exact_ties():
    gen = torch.Generator().manual_seed(20)
    d = default_boxes_300()
    boxes, labels = _tie_batch(gen, d)
    old_iou = box_iou(boxes[0], cxcywh_to_xyxy(d))
    top = old_iou.max(dim=1, keepdim=True).values
    assert ((old_iou == top).sum(dim=1) == 2).all()  # each box's best IoU is reached by two default boxes
    _assert_same(BoxCoder(d), _OldBoxCoder(d), boxes, labels)


@pytest.mark.parametrize("which", ["tiny", "random", "toy"])
def test_encode_equals_old_encoder_on_other_default_boxes(which):
    # The ssd_tiny default boxes, an anchor set with no shared intervals, and 3 boxes.
    gen = torch.Generator().manual_seed(30)
    if which == "tiny":
        d = default_boxes(SSD_TINY.box_spec)
    elif which == "random":
        d = torch.cat([torch.rand(300, 2, generator=gen), 0.05 + 0.5 * torch.rand(300, 2, generator=gen)], 1)
    else:
        d = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]])
    coder = BoxCoder(d)
    assert (coder._blocks is None) == (which == "random")  # no grid: overlaps gathered by interval
    boxes, labels = _batch(gen, [4, 0, 9, 1])
    _assert_same(coder, _OldBoxCoder(d), boxes, labels)


def test_ssd300_default_boxes_share_few_intervals():
    # What makes the IoU cheap: 372 distinct x-intervals (and y-intervals) for 8732 boxes.
    coder = BoxCoder(default_boxes_300())
    assert coder._x_intervals.shape == (372, 2) and coder._y_intervals.shape == (372, 2)
    assert [blk[:4] for blk in coder._blocks] == [  # one grid block per feature map: (start, rows, cols, shapes)
        (0, 38, 38, 4), (5776, 19, 19, 6), (7942, 10, 10, 6), (8542, 5, 5, 6), (8692, 3, 3, 4), (8728, 1, 1, 4)]
    assert SSD300_BOX_SPEC.num_boxes == 8732


def test_empty_batches():
    d = default_boxes_300()
    new, old = BoxCoder(d), _OldBoxCoder(d)
    empty = ([torch.zeros(0, 4), torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)] * 2)
    _assert_same(new, old, *empty)
    loc, lab = new.encode([], [])
    assert loc.shape == (0, 8732, 4) and lab.shape == (0, 8732)


@pytest.mark.parametrize("threshold", [0.45, 0.7, 2.5])
def test_encode_equals_old_encoder_at_other_thresholds(threshold):
    # 0.45 is not a float32 number (the comparison rounds it); 2.5 makes even forced boxes negative.
    gen = torch.Generator().manual_seed(40)
    d = default_boxes_300()
    boxes, labels = _batch(gen, [5, 2, 0, 8])
    _assert_same(BoxCoder(d, iou_threshold=threshold), _OldBoxCoder(d, iou_threshold=threshold), boxes, labels)
