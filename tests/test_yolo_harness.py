"""YOLOv3 through the whole harness: `train` (multi-scale included), its MLPerf log and the
harness rules, `evaluate`, `show-detections`, `predict` and darknet weight files on the
checkpoint, and the family-agnostic training step (multi-scale sizes reach the detector)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from single_stage_detector.__main__ import main

RUN = ["--preset", "yolov3_tiny_cpu", "--batch-size", "8", "--eval-batch-size", "8", "--epochs", "1",
       "--eval-every", "1", "--num-workers", "0", "--lr", "0.01", "--warmup-steps", "2", "--log-every", "1",
       "--seed", "3"]


@pytest.fixture(scope="module")
def yolo_run(tmp_path_factory):
    """One short real `train` of yolov3_tiny_cpu with --multi-scale (in this process: no torch import cost)."""
    from single_stage_detector.data.synthetic import ensure_synthetic_coco

    root = tmp_path_factory.mktemp("yolo")
    ensure_synthetic_coco(root / "data", num_train=24, num_val=6, seed=2)
    out = root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(["train", *RUN, "--data-dir", str(root / "data"), "--output-dir", str(out),
                     "--multi-scale", "96", "160"])
    finally:
        torch.set_num_threads(threads)
    return {"code": code, "out": out, "data": root / "data"}


def _records(path: Path) -> list[dict]:
    return [json.loads(ln.split(" ", 1)[1]) for ln in path.read_text().splitlines() if ln.startswith(":::MLLOG")]


def test_yolo_run_log_result_and_checkpoint(yolo_run, capsys):
    assert yolo_run["code"] == 3  # one epoch cannot reach the target: aborted at the epoch limit
    out = yolo_run["out"]
    records = _records(out / "mlperf.log")
    value = {r["key"]: r["value"] for r in records}
    assert value["submission_benchmark"] == "yolov3" and value["submission_division"] == "open"
    assert next(r for r in records if r["key"] == "run_stop")["metadata"]["status"] == "aborted"
    assert [r["key"] for r in records].count("eval_accuracy") == 1
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "aborted"
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["threshold"] == 0.23 and config["multi_scale"] == [96, 160]
    # The harness rules pass the log; no MLPerf ruleset is claimed.
    assert main(["check-logs", str(out / "mlperf.log")]) == 0
    assert "PASS" in capsys.readouterr().out


def test_evaluate_show_detections_predict_and_darknet_round_trip(yolo_run, tmp_path, capsys):
    from single_stage_detector.tools.show_detections import load_detector

    ckpt = yolo_run["out"] / "checkpoint.pt"
    assert main(["evaluate", str(ckpt), "--json", "--num-workers", "0"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["num_images"] == 6 and 0.0 <= first["ap"] <= 1.0
    png = tmp_path / "grid.png"
    assert main(["show-detections", str(ckpt), "--output", str(png), "--num-images", "2"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    val = sorted((yolo_run["data"] / "val2017").glob("*.jpg"))[:2]
    assert main(["predict", *map(str, val), "--checkpoint", str(ckpt), "--output", str(tmp_path / "pred"),
                 "--score-threshold", "0.0"]) == 0
    detections = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert {Path(d["file_name"]).name for d in detections} <= {p.name for p in val}
    assert all((tmp_path / "pred" / f"{p.stem}.jpg").exists() for p in val)
    # darknet .weights out and back in: the same network, the same detections.
    weights, back = tmp_path / "tiny.weights", tmp_path / "back.pt"
    assert main(["darknet-weights", "export", str(ckpt), "-o", str(weights)]) == 0
    assert main(["darknet-weights", "import", str(weights), "-o", str(back), "--preset", "yolov3_tiny_cpu"]) == 0
    capsys.readouterr()
    a, _, _ = load_detector(str(ckpt))
    b, _, _ = load_detector(str(back))
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        for da, db in zip(a(images), b(images)):
            assert torch.equal(da["boxes"], db["boxes"]) and torch.equal(da["scores"], db["scores"])


class _ShapeRecorder(nn.Module):
    """A detector stand-in that records the input side of each training step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.sides: list[int] = []

    def forward(self, images, targets=None):
        self.sides.append(int(images.shape[-1]))
        return {"loss": self.weight * images.mean()}


def test_multi_scale_sizes_reach_the_detector_every_10_steps():
    from single_stage_detector.data.batch import DetectionBatch
    from single_stage_detector.distributed import DistInfo
    from single_stage_detector.engine import AmpSettings, multi_scale_size, train_one_epoch
    from single_stage_detector.recipe import LRSchedule

    def batch():
        return DetectionBatch(images=torch.rand(2, 3, 64, 64), boxes=[torch.tensor([[0.1, 0.1, 0.5, 0.5]])] * 2,
                              labels=[torch.tensor([1])] * 2, image_ids=torch.arange(2),
                              orig_sizes=torch.tensor([[64, 64]] * 2), valid=torch.ones(2, dtype=torch.bool))

    det = _ShapeRecorder()
    opt = torch.optim.SGD(det.parameters(), lr=0.0)
    schedule = LRSchedule(0.0, 0, 0, (), 0.1, 30)
    sizes = lambda step: multi_scale_size(11, step, 32, 128)  # noqa: E731
    train_one_epoch(det, opt, [batch() for _ in range(30)], epoch=1, num_epochs=1, start_step=5, schedule=schedule,
                    amp=AmpSettings.resolve("off", torch.device("cpu")), scaler=None, info=DistInfo(),
                    log_every=1000, steps_per_epoch=30, input_size_at=sizes)
    assert det.sides == [sizes(step) for step in range(5, 35)]
    assert len(set(det.sides)) > 1


def test_benchmark_times_a_yolo_preset(capsys):
    from single_stage_detector.benchmark import add_benchmark_arguments, run_benchmark
    import argparse

    parser = argparse.ArgumentParser()
    add_benchmark_arguments(parser)
    rows = run_benchmark(parser.parse_args(["--preset", "yolov3_tiny_cpu", "--batch-size", "2", "--warmup", "0",
                                            "--iters", "1", "--device", "cpu"]))
    assert [r["part"] for r in rows] == ["train step (fwd+loss+bwd+SGD)", "inference (fwd+decode+NMS)"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "preset yolov3_tiny_cpu (input 128)" in capsys.readouterr().out
