"""Tests of the synthetic COCO-layout dataset generator."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from single_stage_detector.data.coco import CocoDetection, DatasetError, find_coco_split
from single_stage_detector.data.synthetic import (
    MARKER_FILE,
    SYNTHETIC_CLASSES,
    ensure_synthetic_coco,
    make_synthetic_coco,
)

SMALL = dict(num_train=8, num_val=3, min_size=64, max_size=96, empty_fraction=0.1)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MARKER_FILE}


def test_generator_is_deterministic(tmp_path: Path):
    s1 = make_synthetic_coco(tmp_path / "a", seed=7, **SMALL)
    make_synthetic_coco(tmp_path / "b", seed=7, **SMALL)
    make_synthetic_coco(tmp_path / "c", seed=8, **SMALL)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 8 + 3 + 2 and a == b
    assert a != c
    assert s1["train_images"] == 8 and s1["val_images"] == 3 and s1["train_images_empty"] == 1


def test_output_is_valid_coco(tmp_path: Path):
    summary = make_synthetic_coco(tmp_path, **SMALL)
    image_dir, ann = find_coco_split(tmp_path, "train")
    coco = COCO(str(ann))
    assert len(coco.getImgIds()) == 8 and len(coco.getCatIds()) == 80
    assert len(coco.getAnnIds()) == summary["train_annotations"] > 0
    valid_ids = {c.coco_id for c in SYNTHETIC_CLASSES}
    for a in coco.loadAnns(coco.getAnnIds()):
        img = coco.imgs[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert a["category_id"] in valid_ids and a["iscrowd"] == 0
        assert 0 <= x and 0 <= y and x + w <= img["width"] and y + h <= img["height"] and w > 2 and h > 2
        assert 0 < a["area"] <= w * h
        # The segmentation polygon lies in (and spans) the tight box up to a pixel.
        poly = a["segmentation"][0]
        xs, ys = poly[0::2], poly[1::2]
        assert min(xs) >= x - 1 and max(xs) <= x + w + 1 and min(ys) >= y - 1 and max(ys) <= y + h + 1
    assert all(64 <= im["width"] <= 96 and 64 <= im["height"] <= 96 for im in coco.imgs.values())
    # Through the project's reader: the empty image is skipped.
    ds = CocoDetection(image_dir, ann)
    assert len(ds) == 7 and ds.stats["images_skipped_empty"] == 1
    assert ds[0].image.shape[0] == 3
    COCO(str(find_coco_split(tmp_path, "val")[1]))


def test_ensure_is_idempotent_and_safe(tmp_path: Path):
    root = tmp_path / "syn"
    first = ensure_synthetic_coco(root, **SMALL)
    assert first["generated"]
    again = ensure_synthetic_coco(root, **SMALL)
    assert not again["generated"] and again["train_annotations"] == first["train_annotations"]
    changed = ensure_synthetic_coco(root, **{**SMALL, "num_train": 5})
    assert changed["generated"] and len(list((root / "train2017").iterdir())) == 5
    marker = json.loads((root / MARKER_FILE).read_text())
    assert marker["params"]["num_train"] == 5
    # A folder with a COCO dataset this generator did not write is never overwritten.
    foreign = tmp_path / "coco"
    (foreign / "annotations").mkdir(parents=True)
    (foreign / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(DatasetError, match=str(foreign)):
        ensure_synthetic_coco(foreign, **SMALL)


def test_train_loader_on_synthetic_data_is_reproducible(tmp_path: Path):
    import torch

    from single_stage_detector.data.loader import build_eval_loader, build_train_loader
    from single_stage_detector.data.transforms import SSDEvalTransform, SSDTrainTransform

    make_synthetic_coco(tmp_path, **{**SMALL, "num_train": 12})
    ds = CocoDetection.from_dir(tmp_path, "train", transform=SSDTrainTransform(64))

    def run() -> list:
        loader = build_train_loader(ds, 4, num_workers=2, seed=11, persistent_workers=False)
        loader.batch_sampler.set_epoch(0)
        return list(loader)

    a, b = run(), run()
    assert len(a) == -(-len(ds) // 4)
    for x, y in zip(a, b):
        assert x.images.shape[1:] == (3, 64, 64) and len(x) <= 4 and x.skipped == 0
        assert torch.equal(x.images, y.images) and torch.equal(x.image_ids, y.image_ids)
        assert all(torch.equal(p, q) for p, q in zip(x.boxes, y.boxes))
        assert all(((bx >= 0) & (bx <= 1)).all() and bx.shape[0] == lb.shape[0] for bx, lb in zip(x.boxes, x.labels))
    val = CocoDetection.from_dir(tmp_path, "val", transform=SSDEvalTransform(64))
    ids = [i for batch in build_eval_loader(val, 2, num_workers=0) for i in batch.image_ids.tolist()]
    assert ids == val.image_ids


def test_make_synthetic_dataset_command_prints_a_summary(tmp_path, capsys):
    from single_stage_detector.__main__ import main

    root = tmp_path / "syn"
    assert main(["make-synthetic-dataset", str(root), "--train-images", "4", "--val-images", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"synthetic dataset {root}: generated in ") and "{" not in out
    assert "  train2017  4 images" in out and "  val2017    2 images" in out
    assert main(["make-synthetic-dataset", str(root), "--train-images", "4", "--val-images", "2"]) == 0
    assert "already there (same parameters), kept" in capsys.readouterr().out
