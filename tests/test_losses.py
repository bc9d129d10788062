"""MultiboxLoss against a straightforward per-image reference computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from single_stage_detector.losses import FiniteLossMonitor, MultiboxLoss, NonFiniteLossError, check_finite


def _reference_loss(loc_pred, cls_logits, loc_target, labels, ratio=3):
    total = 0.0
    batch, anchors = labels.shape
    for b in range(batch):
        pos = labels[b] > 0
        n_pos = int(pos.sum())
        if n_pos == 0:
            continue  # counts 0 but still in the batch mean
        loc = 0.0
        for a in torch.nonzero(pos).flatten().tolist():
            for k in range(4):
                d = abs(float(loc_pred[b, a, k] - loc_target[b, a, k]))
                loc += 0.5 * d * d if d < 1 else d - 0.5
        ce = F.cross_entropy(cls_logits[b], labels[b], reduction="none")
        neg_ce = sorted((float(ce[a]) for a in range(anchors) if not pos[a]), reverse=True)
        n_neg = min(ratio * n_pos, anchors)
        cls = float(ce[pos].sum()) + sum(neg_ce[:n_neg])
        total += (loc + cls) / n_pos
    return total / batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_equals_per_image_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, anchors, classes = 3, 200, 81
    loc_pred = torch.randn(batch, anchors, 4, generator=gen) * 2
    loc_target = torch.randn(batch, anchors, 4, generator=gen)
    logits = torch.randn(batch, anchors, classes, generator=gen) * 3
    labels = torch.zeros(batch, anchors, dtype=torch.int64)
    labels[0, torch.randperm(anchors, generator=gen)[:7]] = torch.randint(1, 81, (7,), generator=gen)
    labels[1, torch.randperm(anchors, generator=gen)[:90]] = torch.randint(1, 81, (90,), generator=gen)
    # image 2 has no positives
    loss = MultiboxLoss()(loc_pred, logits, loc_target, labels)
    ref = _reference_loss(loc_pred, logits, loc_target, labels)
    assert loss.shape == ()
    assert math.isclose(float(loss), ref, rel_tol=1e-5)


def test_negatives_capped_at_all_boxes_and_terms_sum():
    # 90 positives of 100 boxes: 3 x 90 > the 10 negatives, all of which are then used.
    gen = torch.Generator().manual_seed(3)
    labels = torch.zeros(1, 100, dtype=torch.int64)
    labels[0, :90] = 1
    args = (torch.randn(1, 100, 4, generator=gen), torch.randn(1, 100, 81, generator=gen),
            torch.randn(1, 100, 4, generator=gen), labels)
    terms = MultiboxLoss().terms(*args)
    assert set(terms) == {"loc", "cls"}
    assert math.isclose(float(terms["loc"] + terms["cls"]), _reference_loss(*args), rel_tol=1e-5)


def test_loss_is_zero_without_positives_and_differentiable():
    logits = torch.randn(2, 50, 81, requires_grad=True)
    loc = torch.randn(2, 50, 4, requires_grad=True)
    loss = MultiboxLoss()(loc, logits, torch.zeros(2, 50, 4), torch.zeros(2, 50, dtype=torch.int64))
    assert float(loss.detach()) == 0.0
    loss.backward()


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="shapes"):
        MultiboxLoss()(torch.zeros(1, 10, 4), torch.zeros(1, 11, 81), torch.zeros(1, 10, 4),
                       torch.zeros(1, 10, dtype=torch.int64))


def test_non_finite_loss_names_every_term():
    with pytest.raises(NonFiniteLossError, match=r"cls.*loc=1\.5.*cls=nan"):
        check_finite({"loc": torch.tensor(1.5), "cls": torch.tensor(float("nan"))}, where="epoch 1, step 3")
    check_finite({"loc": torch.tensor(1.0)})


def test_deferred_non_finite_check_names_the_first_bad_step():
    """The GPU mode records on the device and raises only at a check, naming the first bad step
    and the range checked; the CPU mode raises at once."""
    ok, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    monitor = FiniteLossMonitor(immediate=False)
    monitor.update({"loc": ok, "cls": ok}, 1)
    monitor.check()  # all finite: nothing raised, state reset
    for step, cls in ((2, ok), (3, inf), (4, nan), (5, ok)):
        monitor.update({"loc": ok, "cls": cls}, step)  # no raise: nothing is read here
    with pytest.raises(NonFiniteLossError, match=r"in epoch 7 at step 3 \(checked steps 2\.\.5; .*loc=1\.0"):
        monitor.check(where="epoch 7")
    monitor.check()  # reported once
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 9"):
        FiniteLossMonitor(immediate=True).update({"loc": nan}, 9, where="epoch 2")
