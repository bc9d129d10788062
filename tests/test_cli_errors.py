"""Bad input through the real CLI: a clear message naming the file or flag, nothing lost."""
import json
import shutil
from cli_runner import run_cli



def _run(args, cwd):
    return run_cli(args, cwd=cwd, timeout=600)


TINY = ["--preset", "ssd_tiny", "--batch-size", "8", "--eval-batch-size", "8", "--num-workers", "0",
        "--no-save-checkpoint", "--seed", "1"]


def test_missing_dataset_folder(tmp_path):
    missing = tmp_path / "no_such_coco"
    proc = _run(["train", *TINY, "--data-dir", str(missing), "--output-dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
    # The run had started: its log is closed with status aborted.
    log = (tmp_path / "o" / "mlperf.log").read_text()
    assert '"key": "run_stop"' in log and '"status": "aborted"' in log


def test_missing_backbone_file(small_coco, tmp_path):
    proc = _run(["train", "--preset", "ssd300_resnet34", "--data-dir", str(small_coco), "--output-dir",
                 str(tmp_path / "o"), "--pretrained-backbone", str(tmp_path / "resnet34.npz")], tmp_path)
    assert proc.returncode == 2
    assert str(tmp_path / "resnet34.npz") in proc.stderr and "get_resnet34_backbone.sh" in proc.stderr


def test_wrong_flag_value_names_the_flag(small_coco, tmp_path):
    proc = _run(["train", *TINY, "--data-dir", str(small_coco), "--max-samples", "7"], tmp_path)
    assert proc.returncode == 2 and "--max-samples" in proc.stderr


def test_non_finite_loss_stops_with_terms_printed(small_coco, tmp_path):
    proc = _run(["train", *TINY, "--data-dir", str(small_coco), "--output-dir", str(tmp_path / "o"),
                 "--lr", "1e20", "--warmup-steps", "1", "--epochs", "3", "--eval-every", "1"], tmp_path)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "non-finite loss" in proc.stderr and "loc=" in proc.stderr and "cls=" in proc.stderr
    log = (tmp_path / "o" / "mlperf.log").read_text().splitlines()
    assert '"status": "aborted"' in log[-1]


def test_corrupt_jpeg_is_skipped_and_counted(small_coco, tmp_path):
    data = tmp_path / "coco"
    shutil.copytree(small_coco, data)
    ann = json.loads((data / "annotations" / "instances_train2017.json").read_text())
    annotated = {a["image_id"] for a in ann["annotations"]}
    victim = next(im["file_name"] for im in ann["images"] if im["id"] in annotated)
    (data / "train2017" / victim).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    proc = _run(["train", *TINY, "--data-dir", str(data), "--output-dir", str(tmp_path / "o"), "--epochs", "1",
                 "--eval-every", "1"], tmp_path)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert victim in proc.stderr  # the warning names the file
    assert "skipped images    1 train (unreadable 1;" in proc.stdout
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["dataset_stats"]["images_skipped_unreadable"] == 1
