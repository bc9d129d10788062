"""Tests of the COCO reader, the SSD transforms and the DataLoader backend."""
from __future__ import annotations

import io
import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from single_stage_detector.data.batch import DetectionBatch
from single_stage_detector.data.coco import (
    COCO_CATEGORIES,
    COCO_CATEGORY_IDS,
    LABEL_NAMES,
    CocoDetection,
    DatasetError,
    DataWarning,
    Sample,
    coco_id_to_label,
    coco_ids_to_labels,
    find_annotation_file,
    find_coco_split,
    label_to_coco_id,
    labels_to_coco_ids,
)
from single_stage_detector.data.loader import (
    EpochBatchSampler,
    SampleIndex,
    StridedShardSampler,
    build_eval_loader,
    build_train_loader,
    collate_detection,
)
from single_stage_detector.data.transforms import (
    ColorJitter,
    SSDCropping,
    SSDEvalTransform,
    SSDTrainTransform,
    crop_boxes,
    hflip,
)

# --------------------------------------------------------------------------------------
# Category map
# --------------------------------------------------------------------------------------


def test_category_map_round_trip():
    assert len(COCO_CATEGORY_IDS) == 80 == len(COCO_CATEGORIES) == len(LABEL_NAMES) - 1
    assert list(COCO_CATEGORY_IDS) == sorted(COCO_CATEGORY_IDS)
    assert [c["id"] for c in COCO_CATEGORIES] == list(COCO_CATEGORY_IDS)
    assert coco_id_to_label(1) == 1 and label_to_coco_id(1) == 1
    assert coco_id_to_label(90) == 80 and label_to_coco_id(80) == 90
    assert coco_id_to_label(13) == 12  # 12 is one of the gaps
    for label in range(1, 81):
        assert coco_id_to_label(label_to_coco_id(label)) == label
    ids = torch.tensor(COCO_CATEGORY_IDS)
    labels = coco_ids_to_labels(ids)
    assert labels.tolist() == list(range(1, 81))
    assert torch.equal(labels_to_coco_ids(labels), ids)
    assert LABEL_NAMES[1] == "person" and LABEL_NAMES[80] == "toothbrush"
    with pytest.raises(KeyError):
        coco_id_to_label(12)
    with pytest.raises(KeyError):
        label_to_coco_id(0)
    with pytest.raises(ValueError):
        coco_ids_to_labels(torch.tensor([1, 12]))
    with pytest.raises(ValueError):
        labels_to_coco_ids(torch.tensor([0, 5]))


# --------------------------------------------------------------------------------------
# Reader fixtures
# --------------------------------------------------------------------------------------


def _jpeg_bytes(width: int, height: int, color=(120, 60, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _coco_dict() -> dict:
    return {
        "info": {}, "licenses": [],
        "images": [
            {"id": 4, "file_name": "d.jpg", "height": 40, "width": 40},
            {"id": 1, "file_name": "a.jpg", "height": 100, "width": 200},
            {"id": 2, "file_name": "b.jpg", "height": 50, "width": 50},
            {"id": 3, "file_name": "c.jpg", "height": 48, "width": 64},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [20, 10, 40, 30], "iscrowd": 0},
            # Sticks out of the image: clipped to [150, 50, 200, 100].
            {"id": 11, "image_id": 1, "category_id": 90, "bbox": [150, 50, 100, 80], "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [5, 5, 20, 20], "iscrowd": 1},
            {"id": 13, "image_id": 4, "category_id": 18, "bbox": [0, 0, 10, 10]},  # no iscrowd key
        ],
        "categories": COCO_CATEGORIES,
    }


def _write_dataset(root: Path, data: dict, split: str = "val2017") -> tuple[Path, Path]:
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    for im in data["images"]:
        (image_dir / im["file_name"]).write_bytes(_jpeg_bytes(im["width"], im["height"]))
    ann = root / "annotations" / f"instances_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data))
    return image_dir, ann


@pytest.fixture
def small_coco(tmp_path: Path) -> tuple[Path, Path]:
    return _write_dataset(tmp_path, _coco_dict())


# --------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------


def test_reader_skip_empty_normalisation_and_crowd(small_coco):
    image_dir, ann = small_coco
    ds = CocoDetection(image_dir, ann)
    # Crowd boxes are targets, as in the MLPerf reference: image 2 (only a crowd box) is kept
    # and its box is a training target. Image 3 has nothing: skipped. Ids sorted.
    assert ds.image_ids == [1, 2, 4]
    assert len(ds) == 3
    assert ds.stats == {"images": 3, "images_skipped_empty": 1, "boxes": 4,
                        "boxes_dropped_degenerate": 0, "boxes_clipped": 1, "boxes_crowd": 0}
    s = ds[0]
    assert isinstance(s, Sample)
    assert s.image_id == 1 and s.orig_size == (100, 200)
    assert s.image.dtype == torch.uint8 and s.image.shape == (3, 100, 200)
    expected = torch.tensor([[20 / 200, 10 / 100, 60 / 200, 40 / 100], [0.75, 0.5, 1.0, 1.0]])
    assert s.boxes.dtype == torch.float32
    torch.testing.assert_close(s.boxes, expected)
    assert s.labels.tolist() == [1, 80] and s.labels.dtype == torch.int64
    crowd = ds[1]
    assert crowd.image_id == 2 and crowd.labels.tolist() == [coco_id_to_label(3)]
    torch.testing.assert_close(crowd.boxes, torch.tensor([[5 / 50, 5 / 50, 25 / 50, 25 / 50]]))
    assert ds[2].labels.tolist() == [coco_id_to_label(18)] == [17]
    assert ds.image_info(4) == {"id": 4, "file_name": "d.jpg", "height": 40, "width": 40}
    assert ds.label_names[80] == "toothbrush"

    # The open-division option drops them again.
    no_crowd = CocoDetection(image_dir, ann, include_crowd=False)
    assert no_crowd.image_ids == [1, 4] and no_crowd.stats["boxes_crowd"] == 1
    keep_all = CocoDetection(image_dir, ann, skip_empty=False)
    assert keep_all.image_ids == [1, 2, 3, 4]
    assert keep_all[2].boxes.shape == (0, 4) and keep_all[2].labels.shape == (0,)


def test_only_crowd_image_becomes_a_positive_target(small_coco):
    """The golden case of the reference's reader: a crowd-only image trains, its box is matched."""
    from single_stage_detector.box_coder import BoxCoder, default_boxes_300

    image_dir, ann = small_coco
    ds = CocoDetection(image_dir, ann)
    boxes, labels = ds.targets(ds.image_ids.index(2))
    _, labels_t = BoxCoder(default_boxes_300()).encode([boxes], [labels])
    assert int((labels_t == coco_id_to_label(3)).sum()) >= 1


def test_find_annotation_file_layouts(tmp_path: Path, small_coco):
    image_dir, ann = small_coco
    assert find_annotation_file(tmp_path, "val2017") == ann
    assert find_annotation_file(tmp_path, "val") == ann
    assert find_coco_split(tmp_path, "val") == (image_dir, ann)
    bbox_only = ann.parent / "bbox_only_instances_val2017.json"
    bbox_only.write_text(ann.read_text())
    assert find_annotation_file(tmp_path, "val2017") == bbox_only
    # A parent folder holding coco2017/ works too.
    parent = tmp_path / "parent"
    _write_dataset(parent / "coco2017", _coco_dict())
    assert find_annotation_file(parent, "val2017") == parent / "coco2017" / "annotations" / "instances_val2017.json"
    assert len(CocoDetection.from_dir(parent, "val")) == 3


def test_missing_dataset_folder_and_file(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=str(missing)):
        find_annotation_file(missing, "val2017")
    (tmp_path / "val2017").mkdir()
    with pytest.raises(DatasetError) as e:
        find_annotation_file(tmp_path, "val2017")
    assert str(tmp_path / "annotations" / "instances_val2017.json") in str(e.value)
    with pytest.raises(DatasetError, match="does not exist"):
        CocoDetection(tmp_path / "val2017", tmp_path / "annotations" / "nope.json")
    # Annotations present but the image folder is not.
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(DatasetError, match=str(tmp_path / "train2017")):
        find_coco_split(tmp_path, "train")


def test_invalid_json(tmp_path: Path):
    f = tmp_path / "bad.json"
    f.write_text('{"images": [\n  {"id": 1,, }\n')
    with pytest.raises(DatasetError) as e:
        CocoDetection(tmp_path, f)
    assert str(f) in str(e.value) and "line 2" in str(e.value)


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d.pop("categories"), "categories"),
    (lambda d: d.pop("images"), "images"),
    (lambda d: d["annotations"][1].pop("bbox"), "annotation entry #1 (id 11)"),
    (lambda d: d["annotations"][2].pop("image_id"), "(id 12)"),
    (lambda d: d["images"][0].pop("file_name"), "(id 4)"),
    (lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, 3]), "annotation 10"),
    (lambda d: d["annotations"][0].__setitem__("image_id", 77), "annotation 10 refers to image id 77"),
    # The JSON types by their JSON names (object, array, integer), not Python's (dict, list, int).
    (lambda d: d.__setitem__("annotations", {}), "'annotations' is an object, expected an array"),
    (lambda d: d["images"].__setitem__(0, 5), "image entry #0 is an integer, not an object"),
    (lambda d: d["annotations"][0].__setitem__("id", 10.0), "(a number written with a decimal point)"),
])
def test_missing_keys(tmp_path: Path, mutate, needle):
    data = _coco_dict()
    mutate(data)
    f = tmp_path / "instances_val2017.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as e:
        CocoDetection(tmp_path, f)
    assert str(f) in str(e.value) and needle in str(e.value)


def test_unknown_category(tmp_path: Path):
    data = _coco_dict()
    data["annotations"][3]["category_id"] = 12  # a gap in the COCO ids
    f = tmp_path / "instances_val2017.json"
    f.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as e:
        CocoDetection(tmp_path, f)
    msg = str(e.value)
    assert str(f) in msg and "annotation 13" in msg and "category id 12" in msg


def test_degenerate_boxes_dropped_with_one_warning(tmp_path: Path):
    data = _coco_dict()
    data["annotations"] += [
        {"id": 20, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5]},
        {"id": 21, "image_id": 1, "category_id": 1, "bbox": [10, 10, 5, -1]},
        {"id": 22, "image_id": 1, "category_id": 1, "bbox": [float("nan"), 10, 5, 5]},
        {"id": 23, "image_id": 3, "category_id": 1, "bbox": [300, 10, 5, 5]},  # outside the image
    ]
    image_dir, ann = _write_dataset(tmp_path, data)
    with pytest.warns(DataWarning) as rec:
        ds = CocoDetection(image_dir, ann)
    degenerate = [r for r in rec if "degenerate box" in str(r.message)]
    assert len(degenerate) == 1  # one summarised warning (a second one reports the clipped box)
    assert "4 degenerate" in str(degenerate[0].message) and str(ann) in str(degenerate[0].message)
    assert any("clipped 1 box(es) past the image border" in str(r.message) for r in rec)
    assert ds.stats["boxes_dropped_degenerate"] == 4
    assert ds.stats["boxes"] == 4 and ds.image_ids == [1, 2, 4]


def test_corrupt_images_are_skipped_and_counted(small_coco):
    image_dir, ann = small_coco
    (image_dir / "a.jpg").write_bytes(np.random.default_rng(0).bytes(500))  # not an image at all
    good = _jpeg_bytes(40, 40)
    (image_dir / "d.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    ds = CocoDetection(image_dir, ann, transform=SSDEvalTransform(32))
    for i, name in [(0, "a.jpg"), (2, "d.jpg")]:
        with pytest.warns(DataWarning, match=str(image_dir / name)):
            assert ds[i] is None
    (image_dir / "a.jpg").unlink()  # missing file
    with pytest.warns(DataWarning, match="a.jpg"):
        assert ds[0] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        batches = list(build_eval_loader(ds, 2, num_workers=0))
    assert sum(b.skipped for b in batches) == 2 and sum(len(b) for b in batches) == 1


def test_dataset_with_transform(small_coco):
    image_dir, ann = small_coco
    ds = CocoDetection(image_dir, ann, transform=SSDTrainTransform(48, rng=np.random.default_rng(0)))
    s = ds[0]
    assert s.image.shape == (3, 48, 48) and s.image.dtype == torch.float32
    assert s.orig_size == (100, 200)


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------


def _random_image(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _random_boxes(n: int, rng: np.random.Generator) -> torch.Tensor:
    xy = rng.uniform(0, 0.8, (n, 2))
    wh = rng.uniform(0.005, 0.5, (n, 2))
    return torch.tensor(np.concatenate([xy, np.minimum(xy + wh, 1.0)], 1), dtype=torch.float32)


@pytest.mark.parametrize("max_samples", [1, 50])
def test_train_transform_outputs_valid_boxes(max_samples):
    rng = np.random.default_rng(max_samples)
    tf = SSDTrainTransform(64, max_samples=max_samples, rng=rng)
    image = _random_image()
    n_out = 0
    for _ in range(300):
        n = int(rng.integers(1, 8))
        boxes, labels = _random_boxes(n, rng), torch.arange(1, n + 1)
        img, b, lb = tf(image, boxes, labels)
        assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and img.is_contiguous()
        assert b.dtype == torch.float32 and lb.dtype == torch.int64
        assert b.shape == (lb.shape[0], 4) and 1 <= b.shape[0] <= n
        assert bool((b >= 0).all() and (b <= 1).all())
        assert bool(((b[:, 2:] - b[:, :2]) > 1e-6).all())
        assert set(lb.tolist()) <= set(labels.tolist())
        n_out += b.shape[0]
    assert n_out > 0


def test_crop_window_constraints_and_termination():
    for max_samples in (1, 50):
        crop = SSDCropping(max_samples, rng=np.random.default_rng(1))
        # A tiny box (no IoU constraint >= 0.1 can hold), and no boxes at all: both must
        # terminate via the whole-image / unconstrained modes.
        for boxes in (torch.tensor([[0.5, 0.5, 0.51, 0.51]]), torch.zeros(0, 4),
                      torch.tensor([[0.1, 0.1, 0.6, 0.5], [0.4, 0.3, 0.9, 0.95]])):
            for _ in range(200):
                window, keep = crop.sample_window(boxes)
                if window is None:
                    continue
                l, t, r, b = window.tolist()
                w, h = r - l, b - t
                assert 0.3 - 1e-9 <= w <= 1 and 0.3 - 1e-9 <= h <= 1 and 0.5 <= w / h <= 2
                assert 0 <= l and r <= 1 + 1e-9 and 0 <= t and b <= 1 + 1e-9
                assert keep.any()
                assert len(boxes) > 0
    # Image-level call returns a PIL crop.
    img, b, lb = SSDCropping(50, rng=np.random.default_rng(2))(
        _random_image(), torch.tensor([[0.2, 0.2, 0.8, 0.8]]), torch.tensor([3]))
    assert isinstance(img, Image.Image) and lb.tolist() == [3]


@pytest.mark.parametrize("fused", [False, True])
def test_train_transform_pixels_follow_boxes(fused):
    """A white rectangle on black must land exactly where the transformed box says."""
    arr = np.zeros((160, 200, 3), dtype=np.uint8)
    arr[40:120, 60:140] = 255
    box = torch.tensor([[60 / 200, 40 / 160, 140 / 200, 120 / 160]])
    tf = SSDTrainTransform(100, max_samples=50, rng=np.random.default_rng(3), brightness=0, contrast=0,
                           saturation=0, hue=0, fused_color=fused)
    checked = 0
    for _ in range(40):
        img, b, _ = tf(Image.fromarray(arr), box, torch.tensor([1]))
        if b.shape[0] == 0:
            continue
        ys, xs = np.nonzero(img[0].numpy() > 0)  # white pixels (normalised > 0)
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert np.abs(found - b[0].numpy() * 100).max() <= 1.5
        checked += 1
    assert checked > 10


def test_crop_boxes_hand_computed():
    boxes = torch.tensor([[0.3, 0.3, 0.9, 0.6], [0.0, 0.0, 0.1, 0.1]])
    out, lab = crop_boxes(boxes, torch.tensor([5, 6]), np.array([0.25, 0.25, 0.75, 0.75]), np.array([True, False]))
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.1, 1.0, 0.7]]))
    assert lab.tolist() == [5]


def test_hflip_hand_computed():
    arr = np.zeros((4, 6, 3), dtype=np.uint8)
    arr[:, :2] = 255  # left third white
    img, boxes, labels = hflip(Image.fromarray(arr), torch.tensor([[0.1, 0.2, 0.4, 0.6]]), torch.tensor([7]))
    torch.testing.assert_close(boxes, torch.tensor([[0.6, 0.2, 0.9, 0.6]]))
    out = np.asarray(img)
    assert (out[:, 4:] == 255).all() and (out[:, :4] == 0).all()
    assert labels.tolist() == [7]


def test_eval_transform_deterministic_and_boxes_unchanged():
    tf = SSDEvalTransform(40)
    image = _random_image()
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    a = tf(image, boxes, torch.tensor([1]))
    b = tf(image, boxes, torch.tensor([1]))
    assert a[0].shape == (3, 40, 40) and a[0].dtype == torch.float32
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], boxes)
    # ImageNet normalisation: a mid-grey image maps to (128/255 - mean) / std.
    grey = tf(Image.new("RGB", (10, 10), (128, 128, 128)), boxes, torch.tensor([1]))[0]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(grey[:, 0, 0], (128 / 255 - mean) / std)


def test_train_transform_reproducible_per_seed():
    image, boxes, labels = _random_image(), torch.tensor([[0.2, 0.2, 0.6, 0.7]]), torch.tensor([2])
    runs = []
    for seed in (0, 0, 1):
        tf = SSDTrainTransform(32, rng=np.random.default_rng(seed))
        runs.append([tf(image, boxes, labels) for _ in range(5)])
    for x, y in zip(runs[0], runs[1]):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(runs[0], runs[2]))


def test_fused_colour_jitter_close_to_torchvision():
    image = Image.fromarray(np.random.default_rng(0).integers(60, 190, (32, 32, 3), dtype=np.uint8))

    def mean_diff(hue: float) -> float:
        diffs = []
        for seed in range(10):
            kw = dict(brightness=0.125, contrast=0.5, saturation=0.5, hue=hue)
            exact = np.asarray(ColorJitter(**kw, rng=np.random.default_rng(seed))(image), dtype=np.float32)
            fused = np.asarray(ColorJitter(**kw, fused=True, rng=np.random.default_rng(seed))(image), dtype=np.float32)
            diffs.append(np.abs(exact - fused).mean())
        return float(np.mean(diffs))

    # Brightness/contrast/saturation are the same linear maps (rounding and clamping differ);
    # the YIQ hue rotation only approximates the HSV hue shift.
    assert mean_diff(0.0) < 1.5
    assert mean_diff(0.05) < 5.0
    # Only hue: both shift a red patch toward yellow for a positive hue.
    red = Image.new("RGB", (4, 4), (200, 40, 40))
    for fused in (False, True):
        jit = ColorJitter(0, 0, 0, 0.05, fused=fused, rng=np.random.default_rng(0))
        order, f = jit.sample()
        jit.rng = np.random.default_rng(0)
        out = np.asarray(jit(red))[0, 0].astype(int)
        assert (out[1] > 40) == (f[3] > 0)


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


class _ToyDataset(torch.utils.data.Dataset):
    """Samples whose image records a draw from numpy's global RNG (as the transforms use)."""

    def __init__(self, n: int, size: int = 8, none_at: tuple[int, ...] = ()) -> None:
        self.n, self.size, self.none_at = n, size, none_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample | None:
        if i in self.none_at:
            return None
        noise = float(np.random.random())
        image = torch.full((3, self.size, self.size), noise)
        k = i % 3 + 1
        return Sample(image=image, boxes=torch.rand(k, 4).sort(dim=1).values, labels=torch.full((k,), i % 80 + 1),
                      image_id=1000 + i, orig_size=(10 + i, 20 + i))


def test_collate_detection_fields_and_skips():
    ds = _ToyDataset(5, none_at=(1, 3))
    batch = collate_detection([ds[i] for i in range(5)])
    assert isinstance(batch, DetectionBatch)
    assert batch.skipped == 2 and len(batch) == 3
    assert batch.images.shape == (3, 3, 8, 8)
    assert batch.image_ids.tolist() == [1000, 1002, 1004] and batch.image_ids.dtype == torch.int64
    assert batch.orig_sizes.shape == (3, 2) and batch.orig_sizes[1].tolist() == [12, 22]
    assert batch.valid.dtype == torch.bool and bool(batch.valid.all())
    assert [b.shape for b in batch.boxes] == [(1, 4), (3, 4), (2, 4)]
    assert [lb.shape[0] for lb in batch.labels] == [1, 3, 2]
    empty = collate_detection([None, None])
    assert len(empty) == 0 and empty.skipped == 2


@pytest.mark.parametrize("n, batch, world_size", [(11, 2, 2), (10, 4, 1), (10, 4, 2), (9, 4, 2), (8, 4, 2)])
def test_train_loader_every_image_once_per_epoch(n, batch, world_size):
    """The last partial batch is kept (as the reference): an epoch trains every image once,
    every rank runs the same number of batches, each at most ``batch`` images."""
    ds = _ToyDataset(n)
    seen: list[int] = []
    steps = []
    for rank in range(world_size):
        loader = build_train_loader(ds, batch, num_workers=0, seed=3, rank=rank, world_size=world_size)
        loader.batch_sampler.set_epoch(1)
        batches = list(loader)
        steps.append(len(batches))
        assert len(batches) == len(loader) == math.ceil(n / (batch * world_size))
        assert all(len(b) <= batch for b in batches) and all(len(b) == batch for b in batches[:-1])
        seen += [i for b in batches for i in b.image_ids.tolist()]
    assert sorted(seen) == [1000 + i for i in range(n)]  # each image exactly once
    assert len(set(steps)) == 1
    # set_epoch reshuffles reproducibly.
    loader = build_train_loader(ds, batch, num_workers=0, seed=3)
    loader.batch_sampler.set_epoch(1)
    e1 = list(loader.batch_sampler)
    loader.batch_sampler.set_epoch(1)
    assert list(loader.batch_sampler) == e1
    loader.batch_sampler.set_epoch(2)
    assert list(loader.batch_sampler) != e1 or n < 3


def test_train_loader_augmentation_reproducible_with_workers():
    ds = _ToyDataset(16)

    def noises(seed: int, workers: int) -> list[float]:
        loader = build_train_loader(ds, 4, num_workers=workers, seed=seed, persistent_workers=False)
        out = []
        for epoch in range(2):
            loader.batch_sampler.set_epoch(epoch)
            out += [float(v) for b in loader for v in b.images[:, 0, 0, 0]]
        return out

    a, b, c = noises(0, 2), noises(0, 2), noises(1, 2)
    assert a == b and a != c
    assert len(set(a)) == len(a)  # workers and epochs draw different numbers
    assert noises(5, 0) == noises(5, 0)


def test_sampler_resumes_mid_epoch_and_augmentation_does_not_depend_on_workers():
    sampler = EpochBatchSampler(10, 2, seed=3, sample_seeds=True)
    sampler.set_epoch(2)
    epoch = list(sampler)
    sampler.set_epoch(2, start_batch=3)  # a run resumed after 3 steps of epoch 2
    assert list(sampler) == epoch[3:] and len(sampler) == 5
    seeds = [i.seed for batch in epoch for i in batch]
    assert len(set(seeds)) == 10
    index = pickle.loads(pickle.dumps(epoch[0][0]))  # as sent to a worker process
    assert isinstance(index, SampleIndex) and (int(index), index.seed) == (int(epoch[0][0]), epoch[0][0].seed)

    ds = _ToyDataset(12)

    def noises(workers: int) -> list[float]:
        loader = build_train_loader(ds, 4, num_workers=workers, seed=7, persistent_workers=False)
        loader.batch_sampler.set_epoch(1)
        return [float(v) for b in loader for v in b.images[:, 0, 0, 0]]

    assert noises(0) == noises(2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_sampler_covers_every_index_once(world_size):
    n = 10
    seen: list[int] = []
    for rank in range(world_size):
        sampler = StridedShardSampler(n, rank, world_size)
        idx = list(sampler)
        assert idx == list(range(rank, n, world_size)) and len(sampler) == len(idx)
        seen += idx
    assert sorted(seen) == list(range(n))
    ds = _ToyDataset(n)
    ids: list[int] = []
    for rank in range(world_size):
        for batch in build_eval_loader(ds, 3, num_workers=0, rank=rank, world_size=world_size):
            ids += batch.image_ids.tolist()
            assert bool(batch.valid.all())
    assert sorted(ids) == [1000 + i for i in range(n)]
    with pytest.raises(ValueError):
        StridedShardSampler(n, world_size, world_size)


def test_crop_handles_near_zero_width_box():
    # Guard against NaN creeping into the crop maths with degenerate widths.
    crop = SSDCropping(50, rng=np.random.default_rng(0))
    window, keep = crop.sample_window(torch.tensor([[0.2, 0.2, 0.2 + 1e-7, 0.8]]))
    assert window is None or all(math.isfinite(v) for v in window.tolist())


_WORKER_SIGNAL_SCRIPT = r"""
import subprocess, sys, time
from single_stage_detector.data.coco import CocoDetection
from single_stage_detector.data.loader import build_train_loader
from single_stage_detector.data.transforms import SSDTrainTransform
ds = CocoDetection(sys.argv[1], sys.argv[2], transform=SSDTrainTransform(32))
loader = build_train_loader(ds, 1, num_workers=2, seed=0)
it = iter(loader)
next(it)
next(it)  # batches 0 and 1 come from workers 0 and 1: both have set their signal handlers
workers = [w.pid for w in it._workers]
# Sent by another process, as a job-wide SIGTERM (SLURM) or a terminal's Ctrl-C reaches the
# workers (a SIGTERM from this process, their parent, is the DataLoader's own stop and ends them).
subprocess.run(["kill", "-s", "TERM", str(workers[0])], check=True)
subprocess.run(["kill", "-s", "INT", str(workers[1])], check=True)
time.sleep(1.0)
assert all(w.is_alive() for w in it._workers), [w.exitcode for w in it._workers]
next(it)  # the loader still serves
print("alive", flush=True)
# Leave with the iterator open: multiprocessing's exit handler terminates the workers
# (SIGTERM from their parent), which must end them.
"""


def test_loader_workers_ignore_stop_signals_but_not_their_parent(small_coco, tmp_path):
    """Workers leave SIGINT/SIGTERM to the trainer, yet the process still exits promptly
    with a live iterator (its exit handler terminates the workers with SIGTERM)."""
    import subprocess
    import sys
    import time

    script = tmp_path / "workers.py"
    script.write_text(_WORKER_SIGNAL_SCRIPT)
    t0 = time.monotonic()
    image_dir, ann = small_coco
    proc = subprocess.run([sys.executable, str(script), str(image_dir), str(ann)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "alive" in proc.stdout
    assert time.monotonic() - t0 < 60
