"""The YOLO family's DALI input (data/dali_yolo.py, CPU-only graph here) against the torch path.

One dataset, one answer: with one seed both backends give the same batches, each image
with the same augmentation; pixels agree to resampling rounding, boxes to float32.
Skipped as a whole when NVIDIA DALI is not installed (``pip install -e .[dali]``).
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from single_stage_detector.data.coco import CocoDetection, DataWarning, find_coco_split
from single_stage_detector.data.dali import dali_available
from single_stage_detector.data.loader import EpochBatchSampler, build_train_loader
from single_stage_detector.data.yolo_transforms import (
    FILL_GREY,
    YOLOEvalTransform,
    YOLOTrainTransform,
    affine_matrix,
    warp_boxes,
)
from single_stage_detector.detectors.yolo.family import YOLO_MEAN, YOLO_STD

pytestmark = [pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed"),
              pytest.mark.usefixtures("one_torch_thread")]  # the DALI thread and the model share 2 cores

SIZE = 96
_BRANCHES = [pytest.param(None, id="cpu"),
             pytest.param(0, id="gpu", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                  reason="the GPU graph needs CUDA"))]
RUN = ["--preset", "yolov3_tiny_cpu", "--input-size", "64", "--batch-size", "8", "--eval-batch-size", "4",
       "--epochs", "1", "--eval-every", "1", "--num-workers", "0", "--lr", "0.01", "--warmup-steps", "2", "--seed", "3"]


def _same_resize(a: torch.Tensor, b: torch.Tensor) -> None:
    """``[3, S, S]`` images in [0, 1] resized (shrunk) by Pillow and by DALI: one grey level of
    rounding inside; the outermost row and column differ more (up to 12 levels measured on 240
    synthetic images at 96 px), where the two antialiasing filters treat the image border
    differently. Mean over the image: measured at most 0.2 levels."""
    diff = (a - b).abs() * 255
    assert float(diff[:, 1:-1, 1:-1].max()) <= 1.5 and float(diff.mean()) < 0.35, (diff.max(), diff.mean())


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    from single_stage_detector.data.synthetic import ensure_synthetic_coco

    root = tmp_path_factory.mktemp("dali_yolo_coco")
    ensure_synthetic_coco(root, num_train=16, num_val=4, seed=5)  # 15 training images with objects
    img_dir, ann = find_coco_split(root, "train2017")
    index = CocoDetection(img_dir, ann)
    reader_ann = index.write_reader_annotations(root / "train_reader.json")
    return {"root": root, "img_dir": img_dir, "ann": ann, "index": index, "reader_ann": reader_ann}


def _dali(coco, transform, **kw):
    from single_stage_detector.data.dali_yolo import DaliYoloTrainLoader

    args = dict(batch_size=5, seed=11, num_threads=1)
    args.update(kw)
    files = args.pop("files", coco["index"].file_names)
    return DaliYoloTrainLoader(coco["img_dir"], coco["reader_ann"], files, transform=transform, **args)


def _torch(coco, transform, batch_size=5, seed=11):
    ds = CocoDetection(coco["img_dir"], coco["ann"], transform=transform)
    return build_train_loader(ds, batch_size, num_workers=0, seed=seed)


def _near_source_border(matrix: torch.Tensor, width: int, height: int, size: int, band: float = 1.5) -> np.ndarray:
    """``bool[S, S]``: output pixels whose centre maps to within ``band`` source pixels of the
    source image's border (where the bilinear kernels meet the grey fill differently: Pillow
    fills every pixel whose centre falls outside the source, DALI blends the border pixel
    with the fill)."""
    m = np.vstack([matrix.double().numpy(), [0.0, 0.0, 1.0]])  # normalised input -> output pixels
    inv = np.linalg.inv(m)
    x, y = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    u = (inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]) * width
    v = (inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]) * height
    distance = np.minimum.reduce([np.abs(u), np.abs(width - u), np.abs(v), np.abs(height - v)])
    return distance < band


# -- the same batches and augmentation as the torch path -------------------------------------


@pytest.mark.parametrize("device_id", _BRANCHES)
@pytest.mark.parametrize("kind", ["default", "rotation+shear"])
def test_same_batches_augmentation_and_boxes_as_the_torch_path(coco, kind, device_id):
    """Epochs 1 and 2 through both backends with one seed: same images in the same batches,
    the same boxes (float32) and the same pixels (so the same augmentation of each sample) up to
    bilinear rounding (amplified by at most saturation x exposure = 2.25) away from the
    one-pixel band where the source image meets the grey fill."""
    extra = {} if kind == "default" else {"degrees": 10.0, "shear": 5.0}
    tf = YOLOTrainTransform(SIZE, mean=YOLO_MEAN, std=YOLO_STD, **extra)
    dali, ref = _dali(coco, tf, device_id=device_id), _torch(coco, tf)
    index = coco["index"]
    seen, flips = 0, []
    for epoch in (1, 2):
        dali.set_epoch(epoch)
        ref.batch_sampler.set_epoch(epoch)
        for d, t in zip(dali, ref, strict=True):
            assert torch.equal(d.image_ids, t.image_ids)
            aug = dali.last_augmentation
            flips += aug["flip"].tolist()
            images = d.images.float().cpu()
            assert images.shape == t.images.shape == (len(t), 3, SIZE, SIZE)
            for i in range(len(t)):
                assert torch.equal(d.labels[i], t.labels[i])
                assert torch.allclose(d.boxes[i], t.boxes[i], atol=1e-4), (d.boxes[i], t.boxes[i])
                h, w = index.image_size(index.image_ids.index(int(t.image_ids[i])))
                diff = ((images[i] - t.images[i]).abs() * 255).amax(dim=0).numpy()  # grey levels
                inner = ~_near_source_border(aug["matrix"][i], w, h, SIZE)
                assert diff[inner].max() <= 4.0 and diff[inner].mean() < 1.25, (diff[inner].max(), diff[inner].mean())
            seen += len(t)
    assert seen == 2 * len(index) and 0 < sum(flips) < seen
    dali.close()


def test_forced_flip_and_zoom_put_a_known_box_where_the_torch_path_does(tmp_path):
    """flip 1, zoom 0.5, no translation or colour change on a 256 x 192 ramp image with one box
    (x 40..160, y 30..120 pixels). Hand computation, output S = 64:
    resize x / 4, y / 3; zoom about the centre 32: x' = 32 + 0.5 (x / 4 - 32) = 16 + x / 8,
    y' = 16 + y / 6; flip x'' = 64 - x'.
    x 40 -> 21 -> 43, 160 -> 36 -> 28; y 30 -> 21, 120 -> 36: box (28, 21, 43, 36) px,
    / 64 = (0.4375, 0.328125, 0.671875, 0.5625). The image covers x', y' in [16, 48]; outside it
    the fill grey 127."""
    from PIL import Image

    from single_stage_detector.data.coco import COCO_CATEGORIES
    from single_stage_detector.data.dali_yolo import DaliYoloTrainLoader

    img_dir, ann = tmp_path / "train2017", tmp_path / "instances_train2017.json"
    img_dir.mkdir()
    x, y = np.meshgrid(np.arange(256), np.arange(192))
    Image.fromarray(np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)).save(img_dir / "1.png")
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.png", "width": 256, "height": 192}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                                                "bbox": [40.0, 30.0, 120.0, 90.0], "area": 10800.0}],
                               "categories": COCO_CATEGORIES}))
    index = CocoDetection(img_dir, ann)
    reader_ann = index.write_reader_annotations(tmp_path / "reader.json")
    tf = YOLOTrainTransform(64, flip_p=1.0, scale=(0.5, 0.5), translate=0.0, hue=0.0, saturation=1.0,
                            exposure=1.0, mean=YOLO_MEAN, std=YOLO_STD)
    lo = DaliYoloTrainLoader(img_dir, reader_ann, index.file_names, transform=tf, batch_size=1, seed=0,
                             num_threads=1)
    batch = next(iter(lo))
    ref = CocoDetection(img_dir, ann, transform=tf)[0]
    expected = torch.tensor([[0.4375, 0.328125, 0.671875, 0.5625]])
    assert torch.allclose(batch.boxes[0], expected, atol=1e-6)
    assert torch.allclose(ref.boxes, expected, atol=1e-6)
    rgb = batch.images[0] * 255
    assert torch.all((rgb[:, :14, :] - FILL_GREY).abs() < 0.5) and torch.all((rgb[:, :, 50:] - FILL_GREY).abs() < 0.5)
    # Inside the image: red = the source column. Output column j (centre j + 0.5) of the flipped
    # warp shows source x = 8 (64 - (j + 0.5) - 16) (inverse of x'' = 64 - 16 - x / 8), less the
    # half-pixel of the pixel-centre convention.
    j = torch.arange(20, 44, dtype=torch.float64)
    src_x = 8.0 * (48.0 - (j + 0.5)) - 0.5
    assert torch.allclose(rgb[0, 32, 20:44].double(), src_x, atol=1.0)
    assert float((rgb - ref.image * 255).abs()[:, 18:46, 18:46].max()) <= 1.0 + 1e-3
    lo.close()


def test_without_augmentation_the_eval_resize(coco):
    """augment=False (train --no-augment): the evaluation transform's resize and normalisation,
    boxes unchanged, in the torch sampler's order."""
    lo = _dali(coco, YOLOTrainTransform(SIZE, mean=YOLO_MEAN, std=YOLO_STD), augment=False)
    ref = CocoDetection(coco["img_dir"], coco["ann"], transform=YOLOEvalTransform(SIZE, mean=YOLO_MEAN, std=YOLO_STD))
    assert lo.last_augmentation == {}
    seen = 0
    for batch in lo:
        for img, boxes, labels, image_id in zip(batch.images, batch.boxes, batch.labels, batch.image_ids.tolist()):
            s = ref[ref.image_ids.index(image_id)]
            _same_resize(img, s.image)
            assert torch.allclose(boxes, s.boxes) and torch.equal(labels, s.labels)
            seen += 1
    assert seen == len(coco["index"]) and lo.last_augmentation == {}
    lo.close()


def test_refuses_what_the_graph_cannot_do(coco):
    with pytest.raises(ValueError, match="fill must be one grey level"):
        _dali(coco, YOLOTrainTransform(SIZE, fill=(127, 0, 0)))
    with pytest.raises(ValueError, match="rank"):
        _dali(coco, YOLOTrainTransform(SIZE), rank=2, world_size=2)
    with pytest.raises(ValueError, match="no images"):
        _dali(coco, YOLOTrainTransform(SIZE), files=[])
    lo = _dali(coco, YOLOTrainTransform(SIZE))
    with pytest.raises(ValueError, match="start_batch"):
        lo.set_epoch(1, 4)
    lo.close()


# -- the box keep rule --------------------------------------------------------------------------


def test_keep_rule_golden_values():
    from single_stage_detector.data.dali_yolo import keep_warped_boxes

    # Output 100 px; rows: (1) clipped to (0, 10, 20, 50): sides 20, 40 px, area 800 of 1200 (0.67)
    # -> kept, / 100; (2) clipped to (0, 0, 10, 10): 100 of 1000 (0.1 < 0.2) -> dropped;
    # (3) width 1.5 px < 2 -> dropped; (4) label 0 -> dropped; (5) a padding row -> dropped.
    boxes = torch.tensor([[[-10.0, 10.0, 20.0, 50.0], [-90.0, 0.0, 10.0, 10.0], [5.0, 5.0, 6.5, 50.0],
                           [10.0, 10.0, 60.0, 60.0], [10.0, 10.0, 60.0, 60.0]]])
    labels = torch.tensor([[3, 4, 5, 0, 7]])
    out, keep = keep_warped_boxes(boxes, labels, torch.tensor([4]), 100, min_box_side=2.0, min_area_ratio=0.2)
    assert keep.tolist() == [[True, False, False, False, False]]
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 0.1, 0.2, 0.5]))


def test_keep_rule_matches_warp_boxes_under_rotation_and_shear():
    """The graph's corners + the loader's rule give warp_boxes' boxes for random boxes and warps."""
    from single_stage_detector.data.dali_yolo import keep_warped_boxes

    rng = np.random.default_rng(0)
    tf = YOLOTrainTransform(128, degrees=30.0, shear=10.0, scale=(0.4, 1.6), translate=0.4,
                            rng=np.random.default_rng(1))
    for _ in range(20):
        xy = rng.random((12, 2)) * 0.9
        b = torch.from_numpy(np.concatenate([xy, np.minimum(xy + rng.random((12, 2)) * 0.4, 1.0)], 1)).float()
        labels = torch.arange(1, 13)
        aug = tf.sample()
        ref_boxes, ref_labels = warp_boxes(b, labels, affine_matrix(aug, 640, 480, 128), 640, 480, 128,
                                           min_box_side=2.0, min_area_ratio=0.2)
        m = affine_matrix(aug, 1, 1, 128)
        corners = b.double().numpy()[:, [[0, 1], [2, 1], [0, 3], [2, 3]]] @ m[:2, :2].T + m[:2, 2]
        enclosing = torch.from_numpy(np.concatenate([corners.min(1), corners.max(1)], 1)).float()[None]
        out, keep = keep_warped_boxes(enclosing, labels[None], torch.tensor([12]), 128, min_box_side=2.0,
                                      min_area_ratio=0.2)
        assert torch.equal(labels[keep[0]], ref_labels)
        assert torch.allclose(out[0][keep[0]], ref_boxes, atol=1e-5)


# -- augmentation statistics ------------------------------------------------------------------


def test_augmentation_ranges_and_boxes(coco):
    """Parameters inside the transform's ranges (flip about half the time, zoom in [0.75, 1.25],
    translation within +-0.2, hue within +-0.1, saturation/exposure in [1/1.5, 1.5]); every box
    inside [0, 1] with sides >= 2 output pixels; each matrix the transform's own."""
    tf = YOLOTrainTransform(SIZE, mean=YOLO_MEAN, std=YOLO_STD)
    lo = _dali(coco, tf, batch_size=8)
    rows: dict[str, list] = {}
    for epoch in (1, 2, 3, 4):
        lo.set_epoch(epoch)
        for batch in lo:
            for k, v in lo.last_augmentation.items():
                rows.setdefault(k, []).append(v)
            for b in batch.boxes:
                assert len(b) and float(b.min()) >= 0.0 and float(b.max()) <= 1.0
                assert bool(((b[:, 2:] - b[:, :2]) * SIZE >= 2.0 - 1e-4).all())
    lo.close()
    a = {k: torch.cat(v) for k, v in rows.items()}
    n = len(a["zoom"])
    assert n == 4 * len(coco["index"])
    assert 0.25 < a["flip"].float().mean() < 0.75
    for name, lo_, hi in (("zoom", 0.75, 1.25), ("translate_x", -0.2, 0.2), ("translate_y", -0.2, 0.2),
                          ("hue", -0.1, 0.1), ("saturation", 1 / 1.5, 1.5), ("exposure", 1 / 1.5, 1.5)):
        assert float(a[name].min()) >= lo_ - 1e-6 and float(a[name].max()) <= hi + 1e-6, name
        assert float(a[name].max() - a[name].min()) > 0.5 * (hi - lo_), name  # spread over the range
    assert float(a["degrees"].abs().max()) == 0.0 and float(a["shear_x"].abs().max()) == 0.0
    # The matrix of each row is affine_matrix of its parameters (normalised input -> output pixels).
    from single_stage_detector.data.yolo_transforms import YOLOAugmentation

    for i in range(0, n, 7):
        aug = YOLOAugmentation(flip=bool(a["flip"][i]), zoom=float(a["zoom"][i]),
                               translate_x=float(a["translate_x"][i]), translate_y=float(a["translate_y"][i]))
        assert torch.allclose(a["matrix"][i].double(), torch.from_numpy(affine_matrix(aug, 1, 1, SIZE)[:2]),
                              atol=1e-4)


# -- reproducibility, resume, sharding -----------------------------------------------------------


def test_reproducible_and_resumes_mid_epoch_exactly(coco):
    tf = YOLOTrainTransform(SIZE, mean=YOLO_MEAN, std=YOLO_STD)

    def epoch(lo, e, start=0):
        lo.set_epoch(e, start)
        return [(b.image_ids.clone(), b.images.clone(), [x.clone() for x in b.boxes]) for b in lo]

    a, b = _dali(coco, tf), _dali(coco, tf)
    full = epoch(a, 2)
    assert len(full) == len(a) == 3  # 15 images in batches of 5
    for start in (1, 2):
        resumed = epoch(b, 2, start)
        assert len(resumed) == 3 - start
        for (ia, xa, ba), (ib, xb, bb) in zip(full[start:], resumed, strict=True):
            assert torch.equal(ia, ib) and torch.equal(xa, xb)
            assert all(torch.equal(p, q) for p, q in zip(ba, bb))
    assert [x[0].tolist() for x in epoch(a, 3)] != [x[0].tolist() for x in full]  # reshuffled
    a.close()
    b.close()


def test_ranks_get_the_torch_samplers_batches_and_stay_in_step(coco):
    """15 images, batch 7 on 2 ranks: global batches of 14 and 1; rank 1's second batch is empty."""
    tf = YOLOTrainTransform(SIZE, mean=YOLO_MEAN, std=YOLO_STD)
    files = coco["index"].file_names[:15]
    ids = coco["index"].image_ids[:15]
    for rank in (0, 1):
        lo = _dali(coco, tf, files=files, batch_size=7, rank=rank, world_size=2)
        sampler = EpochBatchSampler(15, 7, seed=11, rank=rank, world_size=2)
        for epoch in (1, 2):
            lo.set_epoch(epoch)
            sampler.set_epoch(epoch)
            got = [b.image_ids.tolist() for b in lo]
            assert got == [[ids[i] for i in batch] for batch in sampler]
            assert [len(g) for g in got] == ([7, 1] if rank == 0 else [7, 0])
        lo.close()


def test_benchmark_data_part_times_both_yolo_pipelines(coco, capsys):
    import argparse

    from single_stage_detector.benchmark import add_benchmark_arguments, run_benchmark

    parser = argparse.ArgumentParser()
    add_benchmark_arguments(parser)
    rows = run_benchmark(parser.parse_args(["--preset", "yolov3_tiny_cpu", "--parts", "data", "--data-dir",
                                            str(coco["root"]), "--batch-size", "2", "--warmup", "0", "--iters", "1",
                                            "--num-workers", "0", "--device", "cpu"]))
    assert [r["part"] for r in rows] == ["data pipeline (torch, 0 workers, YOLO affine + HSV)",
                                         "data pipeline (dali cpu, 1 threads, YOLO affine + HSV)"]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "preset yolov3_tiny_cpu (input 128)" in capsys.readouterr().out


# -- evaluation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device_id", _BRANCHES)
def test_eval_graph_matches_the_yolo_eval_transform(coco, device_id):
    """Same images, resized and divided by 255 (YOLO_MEAN 0, YOLO_STD 1), not ImageNet-normalised."""
    from single_stage_detector.config import TrainConfig
    from single_stage_detector.data.pipeline import build_eval_input

    tf = YOLOEvalTransform(SIZE, mean=YOLO_MEAN, std=YOLO_STD)
    cfg = TrainConfig(data_dir=str(coco["root"]), data_backend="dali", eval_batch_size=3, num_workers=1)
    device = torch.device("cpu") if device_id is None else torch.device("cuda", device_id)
    val = build_eval_input(cfg, input_size=SIZE, eval_transform=tf, device=device)
    ref = CocoDetection(*find_coco_split(coco["root"], "val2017"), transform=tf)
    seen = 0
    for batch in val.loader:
        images = batch.images.float().cpu()
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0  # x / 255
        for img, image_id, hw in zip(images, batch.image_ids.tolist(), batch.orig_sizes.tolist()):
            s = ref[ref.image_ids.index(image_id)]
            _same_resize(img, s.image)
            assert hw == list(s.orig_size)
            seen += 1
    assert seen == 4
    val.close()


# -- the real CLI: train with --data-backend dali, evaluate through both backends --------------------


@pytest.fixture(scope="module")
def dali_run(coco, tmp_path_factory):
    from single_stage_detector.__main__ import main

    out = tmp_path_factory.mktemp("yolo_dali_run") / "out"
    code = main(["train", *RUN, "--data-dir", str(coco["root"]), "--output-dir", str(out), "--data-backend", "dali"])
    return {"code": code, "out": out}


@pytest.mark.slow
def test_train_yolo_with_dali_completes_and_logs(dali_run):
    out = dali_run["out"]
    assert dali_run["code"] == 3  # one epoch: aborted at the epoch limit, not failed
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "aborted" and result["dataset_stats"]["dali_device"] == "cpu"
    assert json.loads((out / "config.json").read_text())["config"]["data_backend"] == "dali"
    log = (out / "mlperf.log").read_text()
    assert '"key": "eval_accuracy"' in log and '"key": "train_samples", "value": 15' in log
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_evaluate_the_same_checkpoint_through_both_backends(dali_run, coco):
    from single_stage_detector.tools.evaluate_checkpoint import evaluate_checkpoint

    ckpt = dali_run["out"] / "checkpoint.pt"
    results = {backend: evaluate_checkpoint(str(ckpt), coco["root"], batch_size=4, num_workers=1, device="cpu",
                                            data_backend=backend, val_loss=True) for backend in ("torch", "dali")}
    assert results["torch"].num_images == results["dali"].num_images == 4
    assert abs(results["torch"].ap - results["dali"].ap) <= 0.002
    # The same boxes through both readers: the val loss agrees up to the resize's pixel differences.
    assert results["torch"].val_loss > 0
    assert results["dali"].val_loss == pytest.approx(results["torch"].val_loss, rel=0.02)
    assert results["dali"].val_loss_terms.keys() == results["torch"].val_loss_terms.keys()
    # After one epoch the AP is near 0 either way: compare what the network sees and says.
    from single_stage_detector.config import TrainConfig
    from single_stage_detector.data.pipeline import build_eval_input
    from single_stage_detector.tools.show_detections import load_detector

    detector, preset, _ = load_detector(str(ckpt), device="cpu")
    tf = YOLOEvalTransform(preset.input_size, mean=YOLO_MEAN, std=YOLO_STD)
    outputs = {}
    for backend in ("torch", "dali"):
        cfg = TrainConfig(data_dir=str(coco["root"]), data_backend=backend, eval_batch_size=4, num_workers=1)
        val = build_eval_input(cfg, input_size=preset.input_size, eval_transform=tf)
        batch = next(iter(val.loader))
        with torch.no_grad():
            outputs[backend] = [o.flatten() for o in detector.model(batch.images.float())]
        val.close()
    for a, b in zip(outputs["torch"], outputs["dali"], strict=True):
        assert float((a - b).abs().max()) < 0.02 * float(a.abs().max())  # raw head outputs


@pytest.mark.slow
@pytest.mark.demo  # three training processes: about a minute on 2 busy cores, so left out of make test
def test_sigterm_mid_epoch_then_resume_is_exact(coco, tmp_path):
    """A run stopped by SIGTERM inside epoch 2 and resumed ends with the uninterrupted run's
    weights, bit for bit, and the same LR at every step (15 images, batch 4: 4 steps/epoch).
    The loader's own resume is checked fast in test_reproducible_and_resumes_mid_epoch_exactly."""
    from test_reliability import _assert_bit_identical, _lrs, _train, _train_until, _weights

    from single_stage_detector.checkpoint import list_resume_checkpoints, load_resume_checkpoint

    args = [*RUN, "--batch-size", "4", "--epochs", "2", "--log-every", "1", "--device", "cpu", "--threshold", "0.99",
            "--data-backend", "dali", "--data-dir", str(coco["root"])]
    reference = _train([*args, "--output-dir", "reference"], tmp_path)
    assert reference.returncode == 3, reference.stderr[-3000:]
    rc, output, _ = _train_until([*args, "--output-dir", "out"], tmp_path, "epoch 2/2 step 1/4")
    assert rc == 5, output[-3000:]
    newest = load_resume_checkpoint(list_resume_checkpoints(tmp_path / "out")[-1])["resume"]
    assert newest["epoch"] == 1 and 1 <= newest["step_in_epoch"] < 4, newest  # inside epoch 2
    second = _train([*args, "--output-dir", "out", "--resume", "auto"], tmp_path)
    assert second.returncode == 3, second.stderr[-3000:]
    _assert_bit_identical(_weights(tmp_path / "reference"), _weights(tmp_path / "out"))
    assert _lrs(tmp_path / "out") == _lrs(tmp_path / "reference")


# -- bad input: the same answer as the torch path (rows of tests/test_bad_input.py) ---------------


@pytest.mark.slow
@pytest.mark.parametrize("row", ["corrupt JPEG", "truncated JPEG", "box past the image border", "zero-size box",
                                 "EXIF-rotated JPEG", "grayscale JPEG", "CMYK JPEG", "PNG inside .jpg"])
def test_bad_input_same_behaviour_in_both_backends(row, coco, tmp_path, capsys):
    from test_bad_input import ROWS

    from single_stage_detector.__main__ import main

    mutate, exit_code, stats, flags = ROWS[row]
    data = tmp_path / "coco"
    shutil.copytree(coco["root"], data, ignore=shutil.ignore_patterns("train_reader.json"))
    named = mutate(data)
    outcome = {}
    for backend in ("torch", "dali"):
        out = tmp_path / f"out_{backend}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DataWarning)
            code = main(["train", *RUN, "--no-save-checkpoint", "--data-dir", str(data), "--output-dir", str(out),
                         "--data-backend", backend, *flags])
        captured = capsys.readouterr()
        assert code == exit_code, f"{backend}: {captured.err[-3000:]}"
        messages = sorted({str(w.message) for w in caught if issubclass(w.category, DataWarning)})
        if any(stats.values()):
            assert any(named in m for m in messages), (backend, messages)  # the warning names the file
        counts = {k: v for k, v in json.loads((out / "result.json").read_text())["dataset_stats"].items()
                  if k != "dali_device"}
        for key, value in stats.items():
            assert counts.get(key, 0) == value, f"{backend}: {key} = {counts.get(key)} (want {value})"
        outcome[backend] = (messages, counts)
    assert outcome["torch"] == outcome["dali"]


@pytest.mark.slow
@pytest.mark.demo
def test_yolo_demo_with_dali_reaches_its_target_and_evaluates_alike(tmp_path):
    """The YOLOv3 CPU demo with --data-backend dali reaches 0.23; its checkpoint gets the same AP
    through both evaluation backends (minutes on 2 idle cores)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out, data = tmp_path / "out", tmp_path / "data"
    env = dict(os.environ, PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, "-m", "single_stage_detector", "demo", "--preset", "yolov3_tiny_cpu",
                           "--data-backend", "dali", "--data-dir", str(data), "--output-dir", str(out)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(dali pipeline)" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "success" and result["ap"] >= 0.23, result
    aps = {}
    for backend in ("torch", "dali"):
        ev = subprocess.run([sys.executable, "-m", "single_stage_detector", "evaluate", str(out / "checkpoint.pt"),
                             "--data-dir", str(data), "--data-backend", backend, "--num-workers", "1", "--json"],
                            cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert ev.returncode == 0, ev.stderr[-3000:]
        aps[backend] = json.loads(ev.stdout.strip().splitlines()[-1])
    assert aps["torch"]["num_images"] == aps["dali"]["num_images"]
    assert abs(aps["torch"]["ap"] - aps["dali"]["ap"]) <= 0.002, aps


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["yolov1_tiny_cpu", "yolov2_tiny_cpu"])
def test_other_yolo_families_train_with_dali(preset, coco, tmp_path):
    """Every YOLO family reads through the same DALI graph: a one-epoch run completes and logs."""
    from cli_runner import run_cli

    out = tmp_path / "out"
    proc = run_cli(["train", "--preset", preset, *RUN[2:], "--data-dir", coco["root"], "--output-dir", out,
                    "--data-backend", "dali"], cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]  # one epoch: aborted at the epoch limit, not failed
    result = json.loads((out / "result.json").read_text())
    assert result["dataset_stats"]["dali_device"] == "cpu"
    assert '"key": "eval_accuracy"' in (out / "mlperf.log").read_text()
