"""Evaluation scored in the background (``train --async-eval on``) against the same runs scored in line.

* the same AP and val loss per epoch, each ``eval_accuracy`` with the evaluated epoch's
  ``epoch_num`` although logged after the next epoch, and a log that passes the 1.0.0 checker;
* the stop decision at the next epoch boundary: a target reached at epoch 1 stops the run after
  epoch 2 with status success, and ``checkpoint.pt`` holds the weights evaluated at epoch 1;
* a resume checkpoint written while a scoring was pending evaluates those weights again and
  continues exactly (same evaluations, bit-identical final weights);
* with 2 processes (gloo), rank 0 scoring in the background: the evaluations of the run scored in line.

The model is ``ssd_tiny`` started from a crafted checkpoint whose heads output fixed, above-threshold
detections (non-zero AP from the first epoch) and trained at a small LR.
"""
import json
import shutil

import pytest
import torch

from cli_runner import run_cli
from single_stage_detector.compliance import check_log
from single_stage_detector.data.coco import COCO_CATEGORY_IDS, find_coco_split
from single_stage_detector.data.synthetic import ensure_synthetic_coco

pytestmark = pytest.mark.slow


def _args(coco, out, *extra):
    return ["train", "--preset", "ssd_tiny", "--data-dir", str(coco), "--output-dir", str(out), "--device", "cpu",
            "--batch-size", "8", "--eval-batch-size", "8", "--num-workers", "0", "--seed", "4", "--lr", "1e-4",
            "--warmup-steps", "0", "--eval-every", "1", "--log-every", "1", *extra]


def _craft(src, dst, coco):
    """Heads that output their biases only: the default boxes of levels 1.. scored 0.95 for every
    class present in val (level 0 suppressed), so every image gets detections that overlap its objects."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ann = json.loads(find_coco_split(coco, "val2017")[1].read_text())
    labels = sorted({COCO_CATEGORY_IDS.index(a["category_id"]) + 1 for a in ann["annotations"]})
    for k, v in ckpt["model"].items():
        if k.startswith("heads."):
            v.zero_()
            if k.endswith(".bias"):
                b = v.view(-1, 4 + 81)
                if int(k.split(".")[1]) > 0:
                    b[:, [4 + lab for lab in labels]] = 3.0
                else:
                    b[:, 5:] = -3.0
    torch.save(ckpt, dst)


def _evals(out):
    return json.loads((out / "result.json").read_text())["evaluations"]


def _mllog(out):
    return [json.loads(x.split(" ", 1)[1]) for x in (out / "mlperf.log").read_text().splitlines()
            if x.startswith(":::MLLOG")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("async_eval")
    coco = tmp / "coco"
    ensure_synthetic_coco(coco, num_train=16, num_val=8, seed=5)
    proc = run_cli(_args(coco, tmp / "base", "--epochs", "1", "--threshold", "0.99"),
                   cwd=tmp, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    crafted = tmp / "crafted.pt"
    _craft(tmp / "base" / "checkpoint.pt", crafted, coco)
    common = ["--init-checkpoint", str(crafted), "--keep-checkpoints", "5"]
    out = {}
    for name, extra in (("inline", ["--async-eval", "off"]), ("background", ["--async-eval", "on"])):
        proc = run_cli(_args(coco, tmp / name, "--epochs", "3", "--threshold", "0.99", *common, *extra),
                       cwd=tmp, timeout=600)
        assert proc.returncode == 3, proc.stderr[-3000:]
        out[name] = (tmp / name, proc)
    return tmp, coco, common, out


def test_background_scoring_gives_the_same_evaluations_and_a_compliant_log(runs):
    _, _, _, out = runs
    inline, background = _evals(out["inline"][0]), _evals(out["background"][0])
    assert [e["epoch"] for e in inline] == [e["epoch"] for e in background] == [1, 2, 3]
    assert inline[0]["ap"] > 0  # the crafted heads detect something
    for a, b in zip(inline, background):
        assert b["ap"] == a["ap"] and b["coco_AP50"] == a["coco_AP50"] and b["step"] == a["step"]
        assert b["val_loss"] == a["val_loss"] and b["num_detections"] == a["num_detections"]
        assert b.get("scored_in_background") is True and "scored_in_background" not in a
    assert "scored in the background" in out["background"][1].stdout
    recs = _mllog(out["background"][0])
    keys = [(r["key"], r["metadata"].get("epoch_num")) for r in recs]
    # Epoch 1's accuracy is logged after epoch 2 trained, with epoch_num 1.
    assert keys.index(("epoch_stop", 2)) < keys.index(("eval_accuracy", 1)) < keys.index(("eval_accuracy", 2))
    assert [r["metadata"]["epoch_num"] for r in recs if r["key"] == "eval_accuracy"] == [1, 2, 3]
    res = check_log(out["background"][0] / "mlperf.log", "1.0.0")
    assert res.ok, res.output
    config = json.loads((out["background"][0] / "config.json").read_text())
    assert config["derived"]["async_eval"] is True and config["config"]["async_eval"] == "on"


def test_a_target_reached_is_acted_on_at_the_next_epoch_boundary(runs):
    tmp, coco, common, out = runs
    target = str(_evals(out["inline"][0])[0]["ap"])  # reached by epoch 1's evaluation
    results = {}
    for name, mode in (("inline_stop", "off"), ("background_stop", "on")):
        proc = run_cli(_args(coco, tmp / name, "--epochs", "3", "--threshold", target, *common, "--async-eval", mode),
                       cwd=tmp, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp / name / "result.json").read_text())
    assert results["inline_stop"]["status"] == results["background_stop"]["status"] == "success"
    assert results["inline_stop"]["epochs"] == 1 and results["background_stop"]["epochs"] == 2
    assert [e["epoch"] for e in results["background_stop"]["evaluations"]] == [1]  # epoch 2 not evaluated
    recs = _mllog(tmp / "background_stop")
    stop = next(r for r in recs if r["key"] == "run_stop")
    assert stop["metadata"]["status"] == "success"
    assert [r["metadata"]["epoch_num"] for r in recs if r["key"] == "eval_accuracy"] == [1]
    assert check_log(tmp / "background_stop" / "mlperf.log", "1.0.0").ok
    # checkpoint.pt: the weights that reached the target, not those trained one epoch further.
    a = torch.load(tmp / "inline_stop" / "checkpoint.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp / "background_stop" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert b["epoch"] == 1 and b["step"] == a["step"] and b["ap"] == a["ap"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_from_a_checkpoint_with_a_pending_scoring_is_exact(runs):
    tmp, coco, common, out = runs
    src = out["background"][0]
    ckpts = sorted((src / "checkpoints").glob("resume-e00001-*.pt"))
    assert len(ckpts) == 1
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)["resume"]
    assert state["pending_eval"] == 1 and state["evaluations"] == []  # saved while epoch 1 was being scored
    resumed = tmp / "resumed"
    resumed.mkdir()
    shutil.copy(ckpts[0], resumed / ckpts[0].name)
    proc = run_cli(_args(coco, resumed, "--epochs", "3", "--threshold", "0.99", *common, "--async-eval", "on",
                         "--resume", str(resumed / ckpts[0].name)), cwd=tmp, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    again, original = _evals(resumed), _evals(src)
    assert [e["epoch"] for e in again] == [1, 2, 3]
    for a, b in zip(original, again):
        assert (b["ap"], b["val_loss"], b["step"]) == (a["ap"], a["val_loss"], a["step"])
    a = torch.load(src / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(resumed / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_two_processes_score_in_the_background_as_in_line(runs):
    """Rank 0 scores in the background while both ranks train on: the same evaluations as the
    2-process run scored in line, and every rank ends together."""
    from test_distributed import _launch

    tmp, coco, common, _ = runs
    evals = {}
    for mode in ("off", "on"):
        out = tmp / f"two_{mode}"
        args = _args(coco, out, "--epochs", "2", "--threshold", "0.99", *common, "--async-eval", mode,
                     "--batch-size", "4")  # 15 training images: a global batch of 8
        proc = _launch(2, args[1:], tmp)
        assert "status            aborted" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
        evals[mode] = _evals(out)
    assert [e["epoch"] for e in evals["on"]] == [1, 2]
    for a, b in zip(evals["off"], evals["on"]):
        assert (b["ap"], b["val_loss"], b["images_per_rank"]) == (a["ap"], a["val_loss"], a["images_per_rank"])
