"""The real-photo dataset: COCO layout, real JPEG photographs, COCO-like boxes, reproducible."""
import hashlib
import json

import pytest

from single_stage_detector.data.coco import CocoDetection, find_coco_split
from single_stage_detector.data.sample_photos import MAX_BOXES, PHOTO_NAMES, ensure_photo_coco, make_photo_coco

pytest.importorskip("skimage")


def _digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_photo_dataset_is_readable_reproducible_and_coco_like(tmp_path):
    summary = make_photo_coco(tmp_path / "a", num_images=12, seed=3)
    assert summary["images"] == 24 and summary["photos"] == list(PHOTO_NAMES)
    for split in ("train2017", "val2017"):
        img_dir, ann = find_coco_split(tmp_path / "a", split)
        ds = CocoDetection(img_dir, ann)
        assert len(ds) == 12
        assert ds.check_images() == []  # every file is a readable RGB JPEG of the annotated size
        for i in range(len(ds)):
            sample = ds[i]
            h, w = sample.orig_size
            assert max(h, w) == 640 and min(h, w) >= 640 * 9 // 16 - 1  # aspect 3:4 .. 16:9
            boxes = sample.boxes
            assert 1 <= len(boxes) <= MAX_BOXES
            assert bool((boxes[:, 2:] > boxes[:, :2]).all()) and bool((boxes >= 0).all() & (boxes <= 1).all())
        # Real photographs: far more detail than the synthetic gradients (tens of kB per JPEG).
        sizes = [p.stat().st_size for p in (tmp_path / "a" / split).glob("*.jpg")]
        assert min(sizes) > 20_000
    make_photo_coco(tmp_path / "b", num_images=12, seed=3)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    # ensure_* reuses a matching dataset and rebuilds a different one.
    marker = tmp_path / "a" / "sample_photos.json"
    before = marker.stat().st_mtime_ns
    assert ensure_photo_coco(tmp_path / "a", num_images=12, seed=3)["images"] == 24
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["seed"] == 3
    assert ensure_photo_coco(tmp_path / "a", num_images=6, seed=3)["images"] == 12
