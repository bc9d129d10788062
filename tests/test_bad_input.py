"""One dataset, one answer: every bad input through the real CLI with both input pipelines.

Each row of the README's "Bad input" table (plus the real-world image conditions that
broke the DALI path: EXIF orientation, boxes past the border, truncated / empty files,
grayscale, CMYK and PNG-inside-.jpg images, ...) is run through ``train`` with
``--data-backend torch`` and ``--data-backend dali``; both must give the same exit code,
the same ``error:`` line, the same data warnings and the same counts in ``result.json``.
Conditions of val images are also run through ``evaluate`` on a trained checkpoint: both
backends must give the same AP (within 0.002).

DALI runs its CPU-only graph here; the rows are skipped without DALI.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
from cli_runner import run_cli
from dataset_surgery import (_ann_path, _image_file, _load, _oversized_header, _rewrite_image, _save, _truncate,
                             with_exif_orientation)
from PIL import Image

from single_stage_detector.data.dali import dali_available
from single_stage_detector.data.synthetic import ensure_synthetic_coco

pytestmark = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")

BACKENDS = ("torch", "dali")
TRAIN_FLAGS = ["--preset", "ssd_tiny", "--batch-size", "8", "--eval-batch-size", "8", "--epochs", "1",
               "--eval-every", "1", "--num-workers", "1", "--seed", "1", "--lr", "0.01", "--warmup-steps", "2",
               "--no-save-checkpoint"]


def mutate_train_image(k: int, fn: Callable[[Path], None]) -> Callable[[Path], str]:
    def mutate(root: Path) -> str:
        path = _image_file(root, "train", k)
        fn(path)
        return path.name
    return mutate


def _edit_ann(split: str, fn: Callable[[dict], None]) -> Callable[[Path], str]:
    def mutate(root: Path) -> str:
        data = _load(root, split)
        fn(data)
        _save(root, split, data)
        return str(_ann_path(root, split).name)
    return mutate


def _first_ann_of(data: dict, image_id: int) -> dict:
    return next(a for a in data["annotations"] if a["image_id"] == image_id)


def _box_past_border(data: dict) -> None:
    im = data["images"][0]
    a = _first_ann_of(data, im["id"]) if any(a["image_id"] == im["id"] for a in data["annotations"]) \
        else data["annotations"][0]
    img = next(i for i in data["images"] if i["id"] == a["image_id"])
    a["bbox"] = [-10.0, 5.0, img["width"] * 0.5, 20.0]  # x < 0
    b = data["annotations"][1]
    img_b = next(i for i in data["images"] if i["id"] == b["image_id"])
    b["bbox"] = [img_b["width"] * 0.6, 2.0, img_b["width"] * 0.6, 30.0]  # x + w > width


def _degenerate_box(data: dict) -> None:
    data["annotations"][0]["bbox"][2] = 0.0


def _unknown_category(data: dict) -> None:
    data["annotations"][0]["category_id"] = 12  # an unused COCO id


def _missing_key(data: dict) -> None:
    del data["images"][0]["file_name"]


def _string_ids(data: dict) -> None:
    im = data["images"][0]
    old = im["id"]
    im["id"] = str(old)
    for a in data["annotations"]:
        if a["image_id"] == old:
            a["image_id"] = str(old)


def _no_val_images(data: dict) -> None:
    data["images"], data["annotations"] = [], []


def _no_val_annotations(data: dict) -> None:
    data["annotations"] = []


def _strip_iscrowd_area(data: dict) -> None:
    for a in data["annotations"]:
        a.pop("iscrowd", None)
        a.pop("area", None)


def _size_mismatch(path: Path) -> None:
    with Image.open(path) as im:
        im.convert("RGB").resize((im.width + 16, im.height)).save(path, quality=90)


def _invalid_json(root: Path) -> str:
    _ann_path(root, "train").write_text('{"images": [')
    return _ann_path(root, "train").name


def _missing_folder(root: Path) -> str:
    shutil.rmtree(root)
    return str(root)


# name -> (mutation returning the text the message must name, expected exit code, expected stats, flags)
# Exit codes: 2 bad input (one error line), 3 trained to the epoch limit (the bad part skipped or handled).
ROWS: dict[str, tuple] = {
    "missing dataset folder": (_missing_folder, 2, {}, []),
    "annotation not valid JSON": (_invalid_json, 2, {}, []),
    "annotation entry lacks a key": (_edit_ann("train", _missing_key), 2, {}, []),
    "unknown category id": (_edit_ann("train", _unknown_category), 2, {}, []),
    "image id as a JSON string": (_edit_ann("train", _string_ids), 2, {}, []),
    "zero-size box": (_edit_ann("train", _degenerate_box), 3, {"boxes_dropped_degenerate": 1}, []),
    "box past the image border": (_edit_ann("train", _box_past_border), 3, {"boxes_clipped": 2}, []),
    "corrupt JPEG": (mutate_train_image(0, lambda p: p.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")), 3,
                     {"images_skipped_unreadable": 1}, []),
    "missing JPEG": (mutate_train_image(0, lambda p: p.unlink()), 3, {"images_skipped_unreadable": 1}, []),
    "0-byte JPEG": (mutate_train_image(0, lambda p: p.write_bytes(b"")), 3, {"images_skipped_unreadable": 1}, []),
    "truncated JPEG": (mutate_train_image(0, _truncate), 3, {"images_skipped_truncated": 1}, []),
    "JPEG above the decompression-bomb limit": (
        mutate_train_image(0, lambda p: p.write_bytes(_oversized_header(p.read_bytes()))), 3,
        {"images_skipped_too_large": 1}, []),
    "stored size differs from the annotation": (mutate_train_image(0, _size_mismatch), 3,
                                                {"images_skipped_size_mismatch": 1}, []),
    "EXIF-rotated JPEG": (mutate_train_image(0, lambda p: p.write_bytes(with_exif_orientation(p.read_bytes()))), 3,
                          {"images_exif_orientation": 1, "images_skipped_size_mismatch": 0}, []),
    "grayscale JPEG": (mutate_train_image(0, lambda p: _rewrite_image(p, lambda im: im.convert("L"), quality=90)),
                       3, {"images_skipped_unsupported": 0}, []),
    "CMYK JPEG": (mutate_train_image(0, lambda p: _rewrite_image(p, lambda im: im.convert("CMYK"), quality=90)),
                  3, {"images_skipped_unsupported": 0}, []),
    "PNG inside .jpg": (mutate_train_image(0, lambda p: _rewrite_image(p, lambda im: im, format="PNG")), 3,
                        {"images_skipped_unsupported": 0}, []),
    "val annotations without iscrowd/area": (_edit_ann("val", _strip_iscrowd_area), 3, {}, []),
    "val split without images": (_edit_ann("val", _no_val_images), 2, {}, []),
    "val split without annotations": (_edit_ann("val", _no_val_annotations), 2, {}, []),
    "batch larger than the training set": (lambda root: "--batch-size", 2, {}, ["--batch-size", "32"]),
    "wrong flag value": (lambda root: "--max-samples", 2, {}, ["--max-samples", "7"]),
    "non-finite loss": (lambda root: "non-finite loss", 4, {}, ["--lr", "1e20", "--warmup-steps", "1", "--epochs", "3"]),
}


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input_base")
    ensure_synthetic_coco(root, num_train=16, num_val=4, seed=3)
    return root


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # A real process per run, forked from a process that has imported torch and DALI already:
    # a row's run takes a fraction of a second, a fresh interpreter's imports several seconds.
    return run_cli(args, cwd=cwd, timeout=600)


_WARNING = re.compile(r"(?:^warning|DataWarning|UserWarning): (.*)$")


def _data_warnings(stderr: str) -> list[str]:
    return sorted({m.group(1) for line in stderr.splitlines() if (m := _WARNING.search(line))})


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_same_behaviour_in_both_backends(row, base_dataset, tmp_path):
    mutate, exit_code, stats, flags = ROWS[row]
    data = tmp_path / "coco"
    shutil.copytree(base_dataset, data)
    named = mutate(data)
    outcome = {}
    for backend in BACKENDS:
        out = tmp_path / f"out_{backend}"
        proc = _cli(["train", *TRAIN_FLAGS, "--data-dir", str(data), "--output-dir", str(out),
                     "--data-backend", backend, *flags], tmp_path)
        assert proc.returncode == exit_code, f"{backend}: {proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{backend}: {proc.stderr[-3000:]}"
        assert "DataWarning:" not in proc.stderr, f"{backend}: not a plain 'warning:' line: {proc.stderr[-3000:]}"
        errors = _error_lines(proc.stderr)
        if exit_code == 2:
            assert len(errors) == 1 and named in errors[0], f"{backend}: {proc.stderr[-3000:]}"
        if exit_code == 4:
            assert named in proc.stderr
        result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
        counts = {k: v for k, v in result.get("dataset_stats", {}).items() if k != "dali_device"}
        for key, value in stats.items():
            assert counts.get(key, 0) == value, f"{backend}: {key} = {counts.get(key)} (want {value}); {counts}"
        if stats and any(stats.values()) and exit_code == 3:
            assert named in proc.stderr  # the warning names the file (or annotation file)
        log = out / "mlperf.log"
        if log.exists():  # every accuracy the log holds is a real one
            for line in log.read_text().splitlines():
                if '"key": "eval_accuracy"' in line:
                    value = json.loads(line.split(" ", 1)[1])["value"]
                    assert value == value and value >= 0.0, line
        outcome[backend] = (errors, _data_warnings(proc.stderr), counts, result.get("skipped_samples"),
                            result.get("status"))
    # The same message, warnings, counts and status from both pipelines.
    torch_out, dali_out = outcome["torch"], outcome["dali"]
    assert torch_out[0] == dali_out[0], "error lines differ"
    assert torch_out[1] == dali_out[1], f"warnings differ:\n{torch_out[1]}\n{dali_out[1]}"
    assert torch_out[2:] == dali_out[2:], f"counts differ:\n{torch_out[2:]}\n{dali_out[2:]}"


# -- evaluation: the same AP from both pipelines on the same checkpoint ----------------------


def _val_images(root: Path, n: int) -> list[Path]:
    return [_image_file(root, "val", k) for k in range(n)]


EVAL_ROWS: dict[str, Callable[[Path], None]] = {
    "untagged": lambda root: None,
    "EXIF-rotated JPEGs": lambda root: [p.write_bytes(with_exif_orientation(p.read_bytes())) for p in
                                        _val_images(root, 6)],
    "val annotations without iscrowd/area": lambda root: _edit_ann("val", _strip_iscrowd_area)(root),
    "box past the image border": lambda root: _edit_ann("val", _box_past_border)(root),
    "grayscale, CMYK and PNG-inside-.jpg": lambda root: [
        _rewrite_image(p, conv, **kw) for p, (conv, kw) in zip(_val_images(root, 3), [
            (lambda im: im.convert("L"), {"quality": 90}), (lambda im: im.convert("CMYK"), {"quality": 90}),
            (lambda im: im, {"format": "PNG"})])],
    "truncated and 0-byte JPEGs": lambda root: [_truncate(_val_images(root, 1)[0]),
                                                _val_images(root, 2)[1].write_bytes(b"")],
}


@pytest.fixture(scope="session")
def eval_aps(demo_run, tmp_path_factory):
    """AP of the demo checkpoint on each mutated val split, per backend (session scope: built
    once even when the demo's other users run between these tests, as under pytest-xdist)."""
    assert demo_run["proc"].returncode == 0, demo_run["proc"].stderr[-3000:]
    ckpt = demo_run["out"] / "checkpoint.pt"
    results: dict[str, dict[str, dict]] = {}
    for row, mutate in EVAL_ROWS.items():
        root = tmp_path_factory.mktemp("eval_row")
        data = root / "coco"
        shutil.copytree(demo_run["data"], data, ignore=shutil.ignore_patterns("train2017"))
        (data / "train2017").mkdir()
        mutate(data)
        results[row] = {}
        for backend in BACKENDS:
            proc = _cli(["evaluate", str(ckpt), "--data-dir", str(data), "--data-backend", backend,
                         "--num-workers", "1", "--max-images", "64", "--json"], root)
            assert proc.returncode == 0, f"{row} / {backend}: {proc.stderr[-3000:]}"
            results[row][backend] = {"json": json.loads(proc.stdout.strip().splitlines()[-1]),
                                     "warnings": _data_warnings(proc.stderr)}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("row", list(EVAL_ROWS))
def test_evaluate_same_ap_in_both_backends(row, eval_aps):
    torch_r, dali_r = eval_aps[row]["torch"], eval_aps[row]["dali"]
    assert torch_r["json"]["num_images"] == dali_r["json"]["num_images"]
    assert abs(torch_r["json"]["ap"] - dali_r["json"]["ap"]) <= 0.002, (torch_r["json"], dali_r["json"])
    assert torch_r["warnings"] == dali_r["warnings"]
    assert torch_r["json"]["ap"] > 0.1  # a trained model: the comparison means something


@pytest.mark.slow
def test_exif_tags_do_not_change_the_ap(eval_aps):
    """EXIF-tagged val images (boxes in stored orientation): the untagged copy's AP in both backends."""
    plain = eval_aps["untagged"]["torch"]["json"]["ap"]
    for backend in BACKENDS:
        assert abs(eval_aps["EXIF-rotated JPEGs"][backend]["json"]["ap"] - plain) <= 0.002
    assert any("EXIF" in w for w in eval_aps["EXIF-rotated JPEGs"]["dali"]["warnings"])
