"""The val loss: every family's training loss on the val images, from the evaluation's own forward pass.

* the contract's evaluation mode with targets returns the detections of ``detector(images)`` and
  the loss terms training computes on the same outputs (BatchNorm on running statistics), and
  advances no state (BatchNorm statistics, YOLOv2's image count);
* ``evaluate(val_loss=True)`` reports the image-weighted mean of the batches' terms, leaves the
  padding samples of a sharded batch out, and does not change the detections or the AP;
* a run writes ``val_loss`` into each evaluation record (on by default, off for the benchmark
  preset) and ``plot`` draws it against optimiser steps (``loss_map_vs_step.png``).
"""
import json
import math
import struct

import pytest
import torch

from cli_runner import run_cli
from single_stage_detector.data.batch import DetectionBatch
from single_stage_detector.data.coco import COCO_CATEGORY_IDS, CocoDetection, find_coco_split
from single_stage_detector.detectors.base import build_detector, family_of, get_preset
from single_stage_detector.distributed import DistInfo
from single_stage_detector.engine import AmpSettings, evaluate
from single_stage_detector.evaluation import CocoEvaluator
from single_stage_detector.recipe import set_batch_norm_eval
from single_stage_detector.tools.plots import load_run

TINY_PRESETS = ("ssd_tiny", "yolov3_tiny_cpu", "yolov1_tiny_cpu", "yolov2_tiny_cpu")
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LABEL_TO_CATEGORY = torch.tensor([0] + list(COCO_CATEGORY_IDS), dtype=torch.int64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # bit-stable sums on a shared machine


def _targets(generator: torch.Generator, batch: int) -> dict:
    boxes, labels = [], []
    for i in range(batch):
        n = (0, 1, 3, 7)[i % 4]  # an image without boxes too
        xy = torch.rand(n, 2, generator=generator) * 0.6
        wh = torch.rand(n, 2, generator=generator) * 0.35 + 0.05
        boxes.append(torch.cat([xy, xy + wh], 1))
        labels.append(torch.randint(1, 81, (n,), generator=generator))
    return {"boxes": boxes, "labels": labels}


def _state(detector) -> dict:
    return {k: v.clone() for k, v in detector.state_dict().items()}


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_eval_mode_with_targets_gives_the_detections_and_the_training_loss(name):
    torch.manual_seed(0)
    preset = get_preset(name)
    detector = build_detector(preset)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, preset.input_size, preset.input_size, generator=g) * 2 - 1
    targets = _targets(g, 4)
    # Training's loss on the same outputs: train mode, BatchNorm on its running statistics (as in eval).
    detector.train()
    set_batch_norm_eval(detector)
    with torch.no_grad():
        train_terms = detector(images, targets)  # YOLOv2: counts these images as seen
    detector.eval()
    before = _state(detector)
    with torch.no_grad():
        plain = detector(images)
        detections, terms = detector(images, targets)
    after = _state(detector)
    assert before.keys() == after.keys()
    for k in before:  # nothing advanced: BatchNorm statistics, YOLOv2's images_seen
        assert torch.equal(before[k], after[k]), k
    assert terms.keys() == train_terms.keys() and len(terms) >= 2
    for k in terms:
        assert terms[k].ndim == 0 and math.isfinite(float(terms[k]))
        torch.testing.assert_close(terms[k], train_terms[k], rtol=1e-6, atol=0.0, msg=lambda m: f"{name} {k}: {m}")
    assert len(detections) == len(plain) == 4
    for d, p in zip(detections, plain):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(d[key], p[key]), key


@pytest.mark.parametrize("name", ("ssd_tiny", "yolov2_tiny_cpu"))
def test_eval_mode_loss_without_boxes_raises_a_clear_error(name):
    detector = build_detector(get_preset(name)).eval()
    images = torch.zeros(1, 3, 128, 128)
    with pytest.raises((ValueError, KeyError)):
        detector(images, {"labels": [torch.zeros(0, dtype=torch.int64)]})


# -- evaluate(val_loss=True) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def val_set(small_coco):
    val_dir, val_ann = find_coco_split(small_coco, "val2017")
    return val_dir, val_ann


class _Loader:
    """Batches of a dataset, the last one padded with copies marked invalid (as a sharded DALI shard)."""

    def __init__(self, dataset, sizes, pad: int):
        self.dataset, self.sizes, self.pad = dataset, sizes, pad

    def __iter__(self):
        start = 0
        for i, n in enumerate(self.sizes):
            samples = [self.dataset[j] for j in range(start, start + n)]
            start += n
            pad = self.pad if i == len(self.sizes) - 1 else 0
            samples += [samples[0]] * pad
            yield DetectionBatch(images=torch.stack([s.image for s in samples]),
                                 boxes=[s.boxes for s in samples], labels=[s.labels for s in samples],
                                 image_ids=torch.tensor([s.image_id for s in samples]),
                                 orig_sizes=torch.tensor([s.orig_size for s in samples]),
                                 valid=torch.tensor([True] * n + [False] * pad))


@pytest.mark.parametrize("name", ("ssd_tiny", "yolov2_tiny_cpu"))
def test_evaluate_reports_the_image_weighted_val_loss(name, val_set):
    val_dir, val_ann = val_set
    preset = get_preset(name)
    torch.manual_seed(3)
    detector = build_detector(preset)
    dataset = CocoDetection(val_dir, val_ann, transform=family_of(preset).eval_transform(preset), skip_empty=True)
    sizes = (5, 3)  # unequal batches: a plain mean of batch losses would differ
    assert len(dataset) >= sum(sizes)
    evaluator = CocoEvaluator(val_ann)
    amp = AmpSettings.resolve_eval("off", CPU.device)
    ids = [dataset[i].image_id for i in range(sum(sizes))]
    result = evaluate(detector, _Loader(dataset, sizes, pad=2), evaluator, LABEL_TO_CATEGORY, amp=amp, info=CPU,
                      val_loss=True)
    plain = evaluate(detector, _Loader(dataset, sizes, pad=2), evaluator, LABEL_TO_CATEGORY, amp=amp, info=CPU)
    assert plain.val_loss is None and not plain.val_loss_terms
    assert result.ap == plain.ap and result.num_detections == plain.num_detections  # the same detections
    assert result.num_images == len(ids) and result.images_per_rank == [len(ids)]  # padding not counted
    # By hand: each batch's terms in eval mode, weighted by its number of real images.
    detector.eval()
    expected: dict[str, float] = {}
    start = 0
    with torch.no_grad():
        for n in sizes:
            samples = [dataset[j] for j in range(start, start + n)]
            start += n
            _, terms = detector(torch.stack([s.image for s in samples]),
                                {"boxes": [s.boxes for s in samples], "labels": [s.labels for s in samples]})
            for k, v in terms.items():
                expected[k] = expected.get(k, 0.0) + float(v) * n / sum(sizes)
    assert result.val_loss_terms.keys() == expected.keys()
    for k in expected:
        assert result.val_loss_terms[k] == pytest.approx(expected[k], rel=1e-6), k
    assert result.val_loss == pytest.approx(sum(expected.values()), rel=1e-6)


# -- a run and its plots ----------------------------------------------------------------------
def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    return struct.unpack(">II", head[16:24])


def test_a_run_logs_the_val_loss_and_plot_draws_it_against_steps(small_coco, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["train", "--preset", "yolov1_tiny_cpu", "--data-dir", str(small_coco), "--output-dir", str(out),
                    "--batch-size", "8", "--eval-batch-size", "8", "--epochs", "2", "--eval-every", "1",
                    "--max-train-images", "16", "--num-workers", "0", "--warmup-steps", "1", "--seed", "2",
                    "--threshold", "0.99", "--no-save-checkpoint"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]  # target not reached: aborted
    assert "val loss" in proc.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2] and [r["step"] for r in evals] == [2, 4]
    for r in evals:
        terms = {k: v for k, v in r.items() if k.startswith("val_loss_")}
        assert len(terms) >= 3 and r["val_loss"] == pytest.approx(sum(terms.values()), rel=1e-9)
        assert r["val_loss"] > 0
    train_terms = {k[5:] for r in records if r["kind"] == "train" for k in r if k.startswith("loss_")}
    assert {k[9:] for k in terms} == train_terms  # the same named terms as the batch loss
    run = load_run(out / "mlperf.log")  # what plot draws: the val loss at the evaluations' steps
    assert [(r["step"], r["val_loss"]) for r in run.eval_records] == [(r["step"], r["val_loss"]) for r in evals]
    proc = run_cli(["plot", str(out / "mlperf.log"), "--output", str(tmp_path / "plots")], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _png_size(tmp_path / "plots" / "loss_map_vs_step.png") == (1000, 400)


def test_val_loss_off_and_bad_value(small_coco, tmp_path):
    out = tmp_path / "off"
    proc = run_cli(["train", "--preset", "ssd_tiny", "--data-dir", str(small_coco), "--output-dir", str(out),
                    "--batch-size", "8", "--eval-batch-size", "8", "--epochs", "1", "--max-train-images", "8",
                    "--max-eval-images", "8", "--num-workers", "0", "--seed", "2", "--threshold", "0.99",
                    "--eval-every", "1", "--no-save-checkpoint", "--val-loss", "off"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 1 and "val_loss" not in evals[0] and evals[0]["step"] == 1
    proc = run_cli(["train", "--preset", "ssd_tiny", "--data-dir", str(small_coco), "--output-dir",
                    str(tmp_path / "bad"), "--val-loss", "sometimes"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "--val-loss" in proc.stderr and "sometimes" in proc.stderr
