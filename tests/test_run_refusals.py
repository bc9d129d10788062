"""Runs that used to fail at the first evaluation (or never pass the checker) are refused
at once, through the real CLI: exit status 2, one ``error:`` line naming the flag or file,
and an MLPerf log that never holds an eval_accuracy below 0 or NaN.

* flags the closed-division rules fix (target, decay factor, momentum, one k for the decay
  boundaries), a non-integer warm-up factor, a schedule with no evaluation: refused before
  ``run_start``;
* val annotations without ``iscrowd``/``area``: evaluated (pycocotools gets a normalised
  ground truth);
* a val split without any annotation: refused right after the val index is built;
* ``--eval-only`` with a batch larger than the training set: evaluates (it trains nothing).
"""
import json
import math
import shutil

import pytest

from cli_runner import run_cli
from single_stage_detector.data.coco import find_coco_split

TINY = ["--preset", "ssd_tiny", "--batch-size", "8", "--eval-batch-size", "8", "--num-workers", "0",
        "--no-save-checkpoint", "--seed", "1", "--epochs", "1", "--eval-every", "1"]


def _run(args, cwd):
    return run_cli(["train", *args], cwd=cwd, timeout=600)


def _mllog(path):
    if not path.exists():
        return []
    return [json.loads(line.split(" ", 1)[1]) for line in path.read_text().splitlines() if line.startswith(":::MLLOG")]


def _error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _assert_accuracies_are_aps(recs) -> list[float]:
    values = [r["value"] for r in recs if r["key"] == "eval_accuracy"]
    for v in values:
        assert isinstance(v, (int, float)) and not math.isnan(v) and 0.0 <= v <= 1.0, v
    return values


def _copy_with_val(small_coco, tmp_path, edit):
    data = tmp_path / "coco"
    shutil.copytree(small_coco, data)
    ann_file = find_coco_split(data, "val2017")[1]
    ann = json.loads(ann_file.read_text())
    edit(ann)
    ann_file.write_text(json.dumps(ann))
    return data, ann_file


@pytest.mark.parametrize("flags,names", [
    (["--division", "closed", "--threshold", "0.2"], ["--threshold", "0.23"]),
    (["--division", "closed", "--lr-decay-factor", "0.5"], ["--lr-decay-factor", "0.1"]),
    (["--division", "closed", "--momentum", "0.8"], ["--momentum", "0.9"]),
    (["--division", "closed", "--lr-decay-epochs", "44", "60"], ["--lr-decay-epochs", "one integer k"]),
    (["--warmup-factor", "0.5"], ["--warmup-factor", "invalid int value"]),
    (["--epochs", "2", "--eval-every", "5"], ["--epochs", "--eval-every 5", "no evaluation"]),
    (["--epochs", "3", "--eval-epochs", "4", "8"], ["--epochs", "--eval-epochs 4 8"]),
], ids=["threshold", "decay-factor", "momentum", "decay-boundaries", "warmup-factor", "no-eval", "no-eval-list"])
def test_bad_flags_are_refused_before_run_start(small_coco, tmp_path, flags, names):
    out = tmp_path / "o"
    proc = _run([*TINY, "--data-dir", str(small_coco), "--output-dir", str(out), *flags], tmp_path)
    line = _error_line(proc)
    for name in names:
        assert name in line, line
    recs = _mllog(out / "mlperf.log")
    assert not any(r["key"] == "run_start" for r in recs)
    _assert_accuracies_are_aps(recs)


def test_val_annotations_without_iscrowd_or_area_are_evaluated(small_coco, tmp_path):
    def strip(ann):
        for a in ann["annotations"]:
            a.pop("iscrowd", None)
            a.pop("area", None)
            a.pop("segmentation", None)

    data, _ = _copy_with_val(small_coco, tmp_path, strip)
    out = tmp_path / "o"
    proc = _run([*TINY, "--data-dir", str(data), "--output-dir", str(out)], tmp_path)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]  # evaluated; target not reached
    assert "KeyError" not in proc.stderr
    recs = _mllog(out / "mlperf.log")
    assert len(_assert_accuracies_are_aps(recs)) == 1
    assert next(r for r in recs if r["key"] == "run_stop")["metadata"]["status"] == "aborted"


@pytest.mark.parametrize("all_images", [False, True], ids=["annotated-images", "eval-all-images"])
def test_val_split_without_annotations_is_refused(small_coco, tmp_path, all_images):
    def empty(ann):
        ann["annotations"] = []

    data, ann_file = _copy_with_val(small_coco, tmp_path, empty)
    out = tmp_path / "o"
    proc = _run([*TINY, "--data-dir", str(data), "--output-dir", str(out),
                 *(["--eval-all-images"] if all_images else [])], tmp_path)
    line = _error_line(proc)
    # The reader may refuse an empty split itself; either way the error names the file.
    assert str(ann_file) in line and ("has no annotations: AP is undefined" in line
                                      or "without annotations" in line), line
    recs = _mllog(out / "mlperf.log")
    assert _assert_accuracies_are_aps(recs) == []  # neither 0.0 nor pycocotools' -1
    assert not any(r["key"] == "epoch_start" for r in recs)  # refused before any training
    assert next(r for r in recs if r["key"] == "run_stop")["metadata"]["status"] == "aborted"


def test_eval_only_ignores_the_training_batch_size(small_coco, tmp_path):
    out = tmp_path / "o"
    proc = _run([*TINY, "--data-dir", str(small_coco), "--output-dir", str(out), "--eval-only",
                 "--batch-size", "1000", "--max-eval-images", "8"], tmp_path)
    assert proc.returncode in (0, 3), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "exceeds" not in proc.stderr
    recs = _mllog(out / "mlperf.log")
    assert len(_assert_accuracies_are_aps(recs)) == 1
    assert [r["metadata"]["epoch_num"] for r in recs if r["key"] == "eval_accuracy"] == [0]
    # Training still refuses a batch larger than the training set.
    proc = _run([*TINY, "--data-dir", str(small_coco), "--output-dir", str(tmp_path / "t"), "--batch-size", "1000"],
                tmp_path)
    assert "--batch-size 1000" in _error_line(proc)
