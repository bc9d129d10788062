"""MultiboxLoss pinned to the previous implementation (the oracle): value to 1e-6 relative, same gradients.

``_old_terms`` is a verbatim copy of ``MultiboxLoss.terms`` before the rewrite (cross entropy
on the transposed logits, two full argsorts for the hard negatives). Both code paths of the
new loss are checked: the CPU one (nonzero/topk, sparse backward) and the dense one used on
GPUs (no host synchronisation).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import single_stage_detector.losses as losses_mod
from single_stage_detector.box_coder import BoxCoder, default_boxes_300
from single_stage_detector.losses import MultiboxLoss, _hard_negatives


def _old_terms(loc_pred, cls_logits, loc_target, labels, neg_pos_ratio=3):
    loc_pred = loc_pred.float()
    cls_logits = cls_logits.float()
    loc_target = loc_target.float()
    num_anchors = labels.shape[1]
    positive = labels > 0
    num_pos = positive.sum(dim=1)
    loc_loss = F.smooth_l1_loss(loc_pred, loc_target, reduction="none", beta=1.0).sum(dim=2)
    loc_loss = (loc_loss * positive).sum(dim=1)
    ce = F.cross_entropy(cls_logits.transpose(1, 2), labels, reduction="none")
    neg_loss = ce.detach().masked_fill(positive, 0.0)
    order = neg_loss.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1, stable=True)
    num_neg = torch.clamp(neg_pos_ratio * num_pos, max=num_anchors)
    negative = rank < num_neg[:, None]
    cls_loss = (ce * (positive | negative)).sum(dim=1)
    has_pos = (num_pos > 0).float()
    denom = num_pos.float().clamp(min=1.0)
    return {"loc": (loc_loss * has_pos / denom).mean(), "cls": (cls_loss * has_pos / denom).mean()}


@pytest.fixture(params=["cpu-path", "dense-path"])
def path(request, monkeypatch):
    if request.param == "dense-path":
        monkeypatch.setattr(losses_mod, "_allow_host_sync", lambda t: False)
    return request.param


def _realistic(seed, batch=4, empty_image=True):
    gen = torch.Generator().manual_seed(seed)
    coder = BoxCoder(default_boxes_300())
    boxes, labels = [], []
    for i in range(batch):
        n = 0 if (empty_image and i == 1) else int(torch.randint(1, 12, (1,), generator=gen))
        xy = torch.rand(n, 2, generator=gen) * 0.6
        boxes.append(torch.cat([xy, xy + 0.05 + torch.rand(n, 2, generator=gen) * 0.35], 1))
        labels.append(torch.randint(1, 81, (n,), generator=gen))
    loc_t, lab_t = coder.encode(boxes, labels)
    loc_p = torch.randn(batch, 8732, 4, generator=gen)
    logits = torch.randn(batch, 8732, 81, generator=gen) * 2
    return loc_p, logits, loc_t, lab_t


def _compare(loc_p, logits, loc_t, lab_t):
    a_loc, a_log = loc_p.clone().requires_grad_(), logits.clone().requires_grad_()
    b_loc, b_log = loc_p.clone().requires_grad_(), logits.clone().requires_grad_()
    new = MultiboxLoss().terms(a_loc, a_log, loc_t, lab_t)
    old = _old_terms(b_loc, b_log, loc_t, lab_t)
    for k in ("loc", "cls"):
        n, o = float(new[k].detach()), float(old[k].detach())
        assert math.isclose(n, o, rel_tol=1e-6, abs_tol=1e-12), (k, n, o)
    (new["loc"] + new["cls"]).backward()
    (old["loc"] + old["cls"]).backward()
    torch.testing.assert_close(a_loc.grad, b_loc.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(a_log.grad, b_log.grad, rtol=1e-4, atol=1e-8)
    # The gradient reaches exactly the rows the old loss selects.
    assert torch.equal(a_log.grad.abs().sum(-1) > 0, b_log.grad.abs().sum(-1) > 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_equals_old_loss_on_encoded_targets(path, seed):
    _compare(*_realistic(seed))


def test_loss_equals_old_loss_with_ties_and_saturation(path):
    loc_p, logits, loc_t, lab_t = _realistic(5, batch=3)
    # Exact ties among the negatives' losses (identical rows), some at the mining cut, and
    # saturated rows whose cross entropy is exactly 0.
    logits[:, 100:4000] = logits[:, 99:100]
    logits[2, 4000:4100, 0] = 200.0
    _compare(loc_p, logits, loc_t, lab_t)


def test_loss_equals_old_loss_when_negatives_run_out(path):
    # 90 positives of 100 boxes: 3 x 90 is capped at all 100 boxes.
    gen = torch.Generator().manual_seed(3)
    labels = torch.zeros(2, 100, dtype=torch.int64)
    labels[0, :90] = torch.randint(1, 81, (90,), generator=gen)
    args = (torch.randn(2, 100, 4, generator=gen), torch.randn(2, 100, 81, generator=gen),
            torch.randn(2, 100, 4, generator=gen), labels)
    _compare(*args)


def test_both_hard_negative_paths_agree_on_ties():
    gen = torch.Generator().manual_seed(7)
    neg = torch.randint(0, 4, (6, 50), generator=gen).float()  # many exact ties
    num_neg = torch.tensor([0, 1, 5, 17, 49, 50])
    a = _hard_negatives(neg, num_neg, host_sync=True)
    b = _hard_negatives(neg, num_neg, host_sync=False)
    assert torch.equal(a, b)
    order = neg.argsort(dim=1, descending=True, stable=True)
    assert torch.equal(a, order.argsort(dim=1, stable=True) < num_neg[:, None])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loss_on_cuda_equals_cpu():
    loc_p, logits, loc_t, lab_t = _realistic(3)
    cpu = MultiboxLoss().terms(loc_p, logits, loc_t, lab_t)
    gpu = MultiboxLoss().terms(loc_p.cuda(), logits.cuda(), loc_t.cuda(), lab_t.cuda())
    for k in ("loc", "cls"):
        assert math.isclose(float(cpu[k]), float(gpu[k]), rel_tol=1e-5)
