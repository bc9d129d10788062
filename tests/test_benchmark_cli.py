"""The benchmark command prints an images/s table naming device, preset and batch size."""
import re
import subprocess
from cli_runner import run_cli


def _benchmark(args: list[str], cwd) -> subprocess.CompletedProcess:
    proc = run_cli(["benchmark", *args], timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_benchmark_prints_a_table(small_coco, tmp_path):
    proc = _benchmark(["--preset", "ssd_tiny", "--batch-size", "4", "--warmup", "1", "--iters", "2",
                       "--num-workers", "0", "--data-dir", str(small_coco)], tmp_path)
    out = proc.stdout
    assert "device: CPU" in out and "preset ssd_tiny" in out and "batch 4" in out
    rows = [ln for ln in out.splitlines() if re.search(r"\s4\s+[\d.]+\s+[\d.]+$", ln)]
    parts = " ".join(rows)
    assert "train step" in parts and "inference" in parts and "data pipeline" in parts
    for ln in rows:
        assert float(ln.split()[-1]) > 0


def test_benchmark_components_against_plain_code(tmp_path):
    proc = _benchmark(["--parts", "components", "--batch-size", "2", "--warmup", "0", "--iters", "1"], tmp_path)
    out = proc.stdout
    assert "device: CPU" in out and "threads" in out and "fp32" in out
    rows = [ln for ln in out.splitlines() if re.search(r"\s2\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", ln)]
    text = "\n".join(rows)
    assert len(rows) == 4, out
    assert "encode" in text and "COCO-like counts" in text and "60 boxes" in text
    assert "loss forward + backward" in text and "A=8732, C=81" in text
    assert "decode + NMS" in text and "candidates/image" in text
    for ln in rows:
        ours, plain = (float(v) for v in ln.split()[-3:-1])
        assert ours > 0 and plain > 0


def test_data_part_on_real_photos_through_both_backends(tmp_path):
    """--photos builds the real-photo dataset once and times both input pipelines on it,
    the torch row including the target encoding."""
    photos = tmp_path / "photos"
    args = ["--parts", "data", "--photos", "--data-dir", str(photos), "--batch-size", "2", "--warmup", "1",
            "--iters", "2", "--num-workers", "1"]
    proc = _benchmark(args, tmp_path)
    out = proc.stdout
    assert "real photographs" in out and "from scikit-image" in out
    rows = [ln for ln in out.splitlines() if re.search(r"\s2\s+[\d.]+\s+[\d.]+$", ln)]
    assert any("torch, 1 workers, torchvision jitter) + encoding" in ln for ln in rows), out
    from single_stage_detector.data.dali import dali_import_error
    if dali_import_error() is None:
        assert any("dali cpu, 1 threads) + encoding" in ln for ln in rows), out
    assert all(float(ln.split()[-1]) > 0 for ln in rows)
    assert len(list((photos / "train2017").glob("*.jpg"))) == 256


def test_data_part_generates_the_synthetic_dataset_into_a_missing_or_empty_folder(tmp_path, monkeypatch):
    """``--data-dir`` of the data part (gpu_check's dali_gpu step): the synthetic dataset is made
    there when the folder is missing or empty, whatever its name; a folder with files is read as is."""
    import argparse

    import single_stage_detector.data.synthetic as synthetic
    from single_stage_detector.benchmark import _data_part_dataset

    made = []
    monkeypatch.setattr(synthetic, "ensure_synthetic_coco", lambda root, **kw: made.append(str(root)))
    for root in (tmp_path / "gc_data", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        args = argparse.Namespace(photos=False, data_dir=str(root))
        assert _data_part_dataset(args, 100) == str(root)
    assert made == [str(tmp_path / "gc_data"), str(tmp_path / "empty")]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README").write_text("not a dataset")
    _data_part_dataset(argparse.Namespace(photos=False, data_dir=str(tmp_path / "mine")), 100)
    assert len(made) == 2
