"""YOLO anchor tools (k-means with 1 - IoU, fitness, units, the recall check, ``kmeans-anchors``) and ``predict``.

Golden values are computed by hand in the comments next to them.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from single_stage_detector.boxes import shape_iou
from single_stage_detector.detectors.yolo.anchors import anchors_tensor
from single_stage_detector.detectors.yolo.kmeans import BPR_IOU_THRESHOLD, anchor_fitness, box_shapes_from_coco, \
    check_anchor_recall, convert_units, format_anchors, kmeans_anchors, round_anchors

REPO = Path(__file__).resolve().parents[1]
CENTRES = torch.tensor([[10.0, 12.0], [40.0, 25.0], [120.0, 200.0]])  # sorted by area: 120, 1000, 24000


def _clusters(per_centre: int, seed: int = 0, spread: float = 0.05) -> torch.Tensor:
    """``per_centre`` shapes around each of CENTRES: each side x exp(N(0, spread))."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.exp(torch.randn(3, per_centre, 2, generator=g) * spread)
    return (CENTRES[:, None, :] * noise).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# Shape IoU, k-means, fitness, units
# ---------------------------------------------------------------------------------------------


def test_shape_iou_hand_computed():
    a = torch.tensor([[10.0, 20.0], [8.0, 8.0]])
    b = torch.tensor([[20.0, 10.0], [4.0, 4.0]])
    iou = shape_iou(a, b)
    # 10x20 vs 20x10: overlap 10x10 = 100, union 200 + 200 - 100 = 300 -> 1/3.
    assert iou[0, 0].item() == pytest.approx(1 / 3)
    # 10x20 vs 4x4: the small box lies inside: 16 / 200 = 0.08.
    assert iou[0, 1].item() == pytest.approx(0.08)
    # 8x8 vs 4x4: 16 / 64 = 0.25 (a factor 2 per side, the BPR threshold).
    assert iou[1, 1].item() == pytest.approx(0.25)
    assert BPR_IOU_THRESHOLD == 0.25


def test_kmeans_recovers_three_centres_and_is_deterministic():
    shapes = _clusters(200)
    anchors = kmeans_anchors(shapes, 3, seed=0)
    assert anchors.shape == (3, 2) and anchors.dtype == torch.float32
    # Sorted by area, each within 3% of its centre (the noise averages out over 200 boxes).
    torch.testing.assert_close(anchors, CENTRES, rtol=0.03, atol=0.0)
    assert torch.equal(anchors, kmeans_anchors(shapes, 3, seed=0))
    # Another seed starts elsewhere but finds the same, well separated, clusters.
    torch.testing.assert_close(kmeans_anchors(shapes, 3, seed=7), CENTRES, rtol=0.03, atol=0.0)


def test_kmeans_many_boxes_uses_the_summary_and_still_recovers_centres():
    shapes = _clusters(25_000, seed=1)  # 75,000 boxes: above the exact-clustering limit (65,536)
    anchors = kmeans_anchors(shapes, 3, seed=3)
    torch.testing.assert_close(anchors, CENTRES, rtol=0.02, atol=0.0)
    assert torch.equal(anchors, kmeans_anchors(shapes, 3, seed=3))


def test_kmeans_input_errors():
    with pytest.raises(ValueError, match="fewer than k=4"):
        kmeans_anchors(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), 4)
    with pytest.raises(ValueError, match="distinct"):
        kmeans_anchors(torch.tensor([[5.0, 5.0]] * 10), 2)
    with pytest.raises(ValueError, match="positive"):
        kmeans_anchors(torch.tensor([[5.0, 0.0], [1.0, 1.0]]), 1)


def test_anchor_fitness_four_boxes_hand_computed():
    anchors = torch.tensor([[10.0, 10.0], [40.0, 40.0]])
    shapes = torch.tensor([[10.0, 10.0], [20.0, 20.0], [40.0, 20.0], [5.0, 40.0]])
    # Best shape IoU of each box:
    #   10x10: anchor 10x10 exactly                                            -> 1
    #   20x20: 100/400 = 0.25 with 10x10, 400/1600 = 0.25 with 40x40            -> 0.25
    #   40x20: 100/800 = 0.125 with 10x10; 800/(1600 + 800 - 800) = 0.5        -> 0.5
    #   5x40:  50/(100 + 200 - 50) = 0.2 with 10x10; 200/1600 = 0.125          -> 0.2
    # mean = (1 + 0.25 + 0.5 + 0.2) / 4 = 0.4875
    fit = anchor_fitness(shapes, anchors)
    assert fit.mean_iou == pytest.approx(0.4875)
    assert fit.bpr == pytest.approx(0.75)  # IoU >= 0.25: 3 of 4 (20x20 sits exactly on the threshold)
    assert anchor_fitness(shapes, anchors, threshold=0.5).bpr == pytest.approx(0.5)
    assert anchor_fitness(shapes, anchors, threshold=0.21).bpr == pytest.approx(0.75)
    assert anchor_fitness(shapes, anchors, threshold=0.19).bpr == pytest.approx(1.0)


def test_convert_units_pixels_grid_stride_32():
    # YOLOv3's 116x90 px at stride 32: 116/32 = 3.625, 90/32 = 2.8125 grid units.
    grid = convert_units(torch.tensor([[116.0, 90.0]]), to="grid", stride=32)
    torch.testing.assert_close(grid, torch.tensor([[3.625, 2.8125]]))
    # YOLOv2's first COCO anchor 0.57273,0.677385 grid units: x32 = 18.32736, 21.67632 px.
    px = convert_units([[0.57273, 0.677385]], to="pixels", stride=32)
    torch.testing.assert_close(px, torch.tensor([[18.32736, 21.67632]]))
    torch.testing.assert_close(convert_units(convert_units(anchors_tensor(), to="grid", stride=32), to="pixels",
                                             stride=32), anchors_tensor())
    with pytest.raises(ValueError, match="pixels' or 'grid"):
        convert_units(anchors_tensor(), to="cells", stride=32)


def test_round_and_format_anchors_cfg_form():
    assert format_anchors(round_anchors(torch.tensor([[9.6, 13.2], [0.2, 30.0]]), "pixels"), "pixels") == \
        "10,13,  1,30"
    grid = round_anchors(torch.tensor([[0.572734, 0.677385], [3.0, 2.81249]]), "grid")
    assert format_anchors(grid, "grid") == "0.5727,0.6774,  3,2.8125"


def _yolo_like_shapes(n_per_anchor: int = 300) -> torch.Tensor:
    """Boxes around YOLOv3's own COCO anchors (pixels at 416): the reference anchors fit them."""
    g = torch.Generator().manual_seed(0)
    base = anchors_tensor()
    return (base[:, None, :] * torch.exp(torch.randn(9, n_per_anchor, 2, generator=g) * 0.3)).reshape(-1, 2)


def test_recall_check_quiet_for_pixel_anchors():
    bpr, mean_iou, message = check_anchor_recall(_yolo_like_shapes(), anchors_tensor())
    assert bpr > 0.9 and 0.5 < mean_iou < 1.0
    assert not message.startswith("WARNING") and f"{bpr:.4f}" in message


def test_recall_check_warns_for_grid_units_given_as_pixels():
    grid = convert_units(anchors_tensor(), to="grid", stride=32)  # the classic mistake: 0.3..11.7 "pixels"
    bpr, _, message = check_anchor_recall(_yolo_like_shapes(), grid)
    assert bpr < 0.5
    assert message.startswith("WARNING") and "grid units" in message and "x32" in message


def test_recall_check_warns_for_anchors_converted_twice_and_for_a_poor_fit():
    _, _, twice = check_anchor_recall(_yolo_like_shapes(), anchors_tensor() * 32)
    assert twice.startswith("WARNING") and "too large" in twice
    # All boxes tall and thin, anchors square: no unit fixes that.
    thin = torch.tensor([[4.0, 100.0]] * 50)
    _, _, poor = check_anchor_recall(thin, torch.tensor([[20.0, 20.0], [60.0, 60.0]]))
    assert poor.startswith("WARNING") and "kmeans-anchors" in poor and "grid units" not in poor


# ---------------------------------------------------------------------------------------------
# COCO box shapes and the kmeans-anchors command
# ---------------------------------------------------------------------------------------------


def _write_coco(path: Path, n_per_centre: int = 20) -> Path:
    """Images of 640x480 whose boxes, plainly resized to 416, have the shapes of _clusters; plus a
    crowd box and a zero-width box that must be ignored."""
    shapes = _clusters(n_per_centre, seed=2)
    sx, sy = 640 / 416, 480 / 416
    images = [{"id": i + 1, "file_name": f"{i + 1:06d}.jpg", "width": 640, "height": 480} for i in range(10)]
    anns = [{"id": k + 1, "image_id": k % 10 + 1, "category_id": 1, "iscrowd": 0,
             "bbox": [1.0, 2.0, float(w) * sx, float(h) * sy]} for k, (w, h) in enumerate(shapes.tolist())]
    anns.append({"id": 900, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 600, 400]})
    anns.append({"id": 901, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 0, 30]})
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}]}))
    return path


def test_box_shapes_from_coco_scaling_and_filtering(tmp_path):
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({
        "images": [{"id": 7, "width": 640, "height": 480}, {"id": 3, "width": 100, "height": 200}],
        "annotations": [
            {"image_id": 7, "bbox": [0, 0, 64, 48]},
            {"image_id": 3, "bbox": [10, 10, 50, 50], "iscrowd": 0},
            {"image_id": 3, "bbox": [0, 0, 90, 190], "iscrowd": 1},  # crowd: left out
            {"image_id": 7, "bbox": [0, 0, 10, -1]},  # degenerate: left out
        ]}))
    # Plain resize to 416: 64 * 416/640 = 41.6, 48 * 416/480 = 41.6; 50 * 416/100 = 208, 50 * 416/200 = 104.
    torch.testing.assert_close(box_shapes_from_coco(ann, 416), torch.tensor([[41.6, 41.6], [208.0, 104.0]]))
    # Letterbox: one scale per image, 416 / max(W, H): 416/640 = 0.65 -> 41.6, 31.2; 416/200 = 2.08 -> 104, 104.
    torch.testing.assert_close(box_shapes_from_coco(ann, 416, letterbox=True),
                               torch.tensor([[41.6, 31.2], [104.0, 104.0]]))


def test_box_shapes_from_coco_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json: cannot read"):
        box_shapes_from_coco(missing, 416)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json: not a JSON"):
        box_shapes_from_coco(garbage, 416)
    no_bbox = tmp_path / "no_bbox.json"
    no_bbox.write_text(json.dumps({"images": [{"id": 1, "width": 4, "height": 4}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match=r"no_bbox.json: annotations\[0\] has no 'bbox'"):
        box_shapes_from_coco(no_bbox, 416)
    image = {"id": 1, "width": 4, "height": 4}
    malformed = r"annotations\[1\] \(id {}\) has a malformed bbox"
    for name, entry, needle in (
            ("short_bbox", {"id": 7, "image_id": 1, "bbox": [0, 0, 1]}, malformed.format(7)),
            ("bbox_object", {"id": 8, "image_id": 1, "bbox": {"x": 0}}, malformed.format(8)),
            ("null_image_id", {"id": 9, "image_id": None, "bbox": [0, 0, 1, 1]},
             r"annotations\[1\] \(id 9\) has a non-numeric 'image_id'")):
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps({"images": [image], "annotations": [
            {"id": 6, "image_id": 1, "bbox": [0, 0, 1, 1]}, entry]}))
        with pytest.raises(ValueError, match=f"{name}.json: " + needle):
            box_shapes_from_coco(bad, 416)
    no_images = tmp_path / "no_images.json"
    no_images.write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="no_images.json: no 'images'"):
        box_shapes_from_coco(no_images, 416)
    orphan = tmp_path / "orphan.json"
    orphan.write_text(json.dumps({"images": [{"id": 1, "width": 4, "height": 4}],
                                  "annotations": [{"image_id": 2, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(ValueError, match="orphan.json: annotations\\[0\\] refers to image_id 2"):
        box_shapes_from_coco(orphan, 416)
    crowd_only = tmp_path / "crowd_only.json"
    crowd_only.write_text(json.dumps({"images": [{"id": 1, "width": 4, "height": 4}],
                                      "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1], "iscrowd": 1}]}))
    with pytest.raises(ValueError, match="crowd_only.json: no usable boxes"):
        box_shapes_from_coco(crowd_only, 416)


def _run_kmeans_command(argv, capsys):
    from single_stage_detector.tools.kmeans_anchors import _standalone

    code = _standalone([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _anchor_pairs(line: str) -> list[tuple[float, float]]:
    values = [float(v) for v in line.replace(",", " ").split()]
    return list(zip(values[0::2], values[1::2]))


def test_kmeans_anchors_command_prints_anchors_and_both_fitness_lines(tmp_path, capsys):
    ann = _write_coco(tmp_path / "instances_train.json")
    code, out, err = _run_kmeans_command([ann, "--num", "3", "--input-size", "416"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "clustered 60 boxes" in lines[0]  # 3 x 20 boxes; the crowd and the zero-width box are left out
    pairs = _anchor_pairs(lines[2])
    assert len(pairs) == 3 and lines[2].strip().count(",  ") == 2
    for (w, h), (cw, ch) in zip(pairs, CENTRES.tolist()):
        assert abs(w - cw) <= max(1.0, 0.05 * cw) and abs(h - ch) <= max(1.0, 0.05 * ch)
    ours = next(line for line in lines if line.startswith("k-means anchors"))
    ref = next(line for line in lines if line.startswith("YOLOv3 COCO anchors"))
    mean_iou, bpr = (float(v) for v in ours.split()[2:4])
    ref_iou, ref_bpr = (float(v) for v in ref.split()[3:5])
    assert 0.8 < mean_iou <= 1.0 and bpr == 1.0
    assert 0.0 < ref_iou < mean_iou and 0.0 < ref_bpr <= 1.0
    assert "10,13,  16,30" in ref

    # Grid units: the anchors / 32, and the YOLOv3 preset converted to grid units (116/32 = 3.625).
    code, out, err = _run_kmeans_command([ann, "--num", "3", "--units", "grid", "--stride", "32"], capsys)
    assert code == 0, err
    grid_pairs = _anchor_pairs(out.splitlines()[2])
    assert grid_pairs[2][0] == pytest.approx(pairs[2][0] / 32, abs=0.05)
    assert "3.625,2.8125" in out and "grid units" in out


def test_kmeans_anchors_command_compares_with_yolov2_anchors_in_grid_units(tmp_path, capsys):
    # YOLOv2's kmeans-anchors command (--units grid): --compare yolov2 scores yolov2.cfg's COCO
    # anchors, already grid units (0.57273,0.677385 ... 9.77052,9.16828); pixels: x 32.
    ann = _write_coco(tmp_path / "instances_train.json")
    code, out, err = _run_kmeans_command([ann, "--num", "3", "--units", "grid", "--compare", "yolov2"], capsys)
    assert code == 0, err
    ref = next(line for line in out.splitlines() if line.startswith("YOLOv2 COCO anchors"))
    assert "0.5727,0.6774" in ref and "9.7705,9.1683" in ref
    code, out, err = _run_kmeans_command([ann, "--num", "3", "--compare", "yolov2"], capsys)
    assert code == 0, err
    assert "18,22" in next(line for line in out.splitlines() if line.startswith("YOLOv2 COCO anchors"))


def test_kmeans_anchors_command_errors(tmp_path, capsys):
    code, _, err = _run_kmeans_command([tmp_path / "missing.json"], capsys)
    assert code == 2 and "missing.json" in err and "Traceback" not in err
    ann = _write_coco(tmp_path / "small.json", n_per_centre=1)
    code, _, err = _run_kmeans_command([ann, "--num", "9"], capsys)
    assert code == 2 and "3 usable box(es), fewer than --num 9" in err


def test_kmeans_anchors_help_does_not_import_torch():
    code = ("import argparse, sys\n"
            "from single_stage_detector.tools import kmeans_anchors, predict\n"
            "for m in (kmeans_anchors, predict):\n"
            "    p = argparse.ArgumentParser(); m.add_arguments(p); p.format_help()\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dog_checkpoint(tmp_path_factory):
    """An ssd_tiny checkpoint whose heads ignore the image: every default box is itself (offsets 0) and
    scores "dog" (COCO id 18) at softmax(8 vs 0 x 80) = e^8 / (e^8 + 80) ~ 0.974."""
    from single_stage_detector.data.coco import coco_id_to_label
    from single_stage_detector.models import build_model, get_preset

    preset = get_preset("ssd_tiny")
    model = build_model(preset)
    state = model.state_dict()
    dog = coco_id_to_label(18)
    for key in [k for k in state if k.startswith("heads.")]:
        state[key] = torch.zeros_like(state[key])
        if key.endswith(".bias"):
            per_box = state[key].view(-1, 4 + preset.num_classes)
            per_box[:, 4 + dog] = 8.0
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    torch.save({"preset": "ssd_tiny", "model": state}, path)
    return path


def _image(path: Path, size, color) -> Path:
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


def _run_predict(argv, capsys):
    from single_stage_detector.tools.predict import _standalone

    code = _standalone([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_files_and_folder_write_json_and_pictures(tmp_path, dog_checkpoint, capsys):
    from PIL import Image

    a = _image(tmp_path / "a.jpg", (200, 150), (200, 80, 40))
    b = _image(tmp_path / "b.png", (90, 120), (40, 80, 200))
    folder = tmp_path / "folder"
    folder.mkdir()
    _image(folder / "z.JPEG", (64, 64), (10, 10, 10))
    _image(folder / "a.png", (300, 100), (250, 250, 250))  # same stem as a.jpg: gets a-2.jpg
    (folder / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    out = tmp_path / "out"
    code, stdout, err = _run_predict([a, b, broken, folder, "--checkpoint", dog_checkpoint, "--output", out,
                                      "--device", "cpu", "--batch-size", "3", "--max-detections", "10"], capsys)
    assert code == 0, err
    assert "broken.jpg" in err and "unreadable" in err
    assert "1 unreadable skipped" in stdout

    detections = json.loads((out / "detections.json").read_text())
    sizes = {str(a): (200, 150), str(b): (90, 120), str(folder / "a.png"): (300, 100), str(folder / "z.JPEG"): (64, 64)}
    assert [d["file_name"] for d in detections] == sorted(
        (d["file_name"] for d in detections), key=[str(a), str(b), str(folder / "a.png"), str(folder / "z.JPEG")].index)
    assert {d["file_name"] for d in detections} == set(sizes)
    for d in detections:
        width, height = sizes[d["file_name"]]
        x, y, w, h = d["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        assert x + w <= width + 1e-6 and y + h <= height + 1e-6
        assert d["category_id"] == 18 and d["category_name"] == "dog"
        assert d["score"] == pytest.approx(math.exp(8) / (math.exp(8) + 80), abs=1e-3)
    per_image = {name: sum(d["file_name"] == name for d in detections) for name in sizes}
    assert all(1 <= n <= 10 for n in per_image.values())

    pictures = sorted(p.name for p in out.glob("*.jpg"))
    assert pictures == ["a-2.jpg", "a.jpg", "b.jpg", "z.jpg"]
    for name, source in (("a.jpg", a), ("b.jpg", b), ("a-2.jpg", folder / "a.png")):
        with Image.open(out / name) as im, Image.open(source) as src:
            assert im.size == src.size
    with Image.open(out / "a.jpg") as im:  # red boxes (230, 30, 30) drawn on the (200, 80, 40) picture
        rgb = torch.from_numpy(np.array(im.convert("RGB"))).int()
        assert bool(((rgb[..., 0] > 215) & (rgb[..., 1] < 55)).any())


def test_predict_threshold_filters_everything(tmp_path, dog_checkpoint, capsys):
    a = _image(tmp_path / "a.png", (50, 40), (0, 0, 0))
    code, stdout, err = _run_predict([a, "--checkpoint", dog_checkpoint, "--output", tmp_path / "out",
                                      "--score-threshold", "0.99", "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []
    assert (tmp_path / "out" / "a.jpg").exists() and "0 detections" in stdout


def test_predict_input_errors(tmp_path, dog_checkpoint, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    code, _, err = _run_predict([empty, "--checkpoint", dog_checkpoint, "--output", tmp_path / "o"], capsys)
    assert code == 2 and "empty: no jpg/jpeg/png images" in err
    code, _, err = _run_predict([tmp_path / "ghost.jpg", "--checkpoint", dog_checkpoint], capsys)
    assert code == 2 and "ghost.jpg does not exist" in err
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    code, _, err = _run_predict([bad, "--checkpoint", dog_checkpoint, "--output", tmp_path / "o2",
                                 "--device", "cpu"], capsys)
    assert code == 2 and "bad.png" in err and "none of the 1 image(s) could be read" in err
    good = _image(tmp_path / "good.jpg", (32, 32), (1, 2, 3))
    code, _, err = _run_predict([good, "--checkpoint", tmp_path / "nope.pt"], capsys)
    assert code == 2 and "nope.pt" in err
    code, _, err = _run_predict([good, "--checkpoint", dog_checkpoint, "--output", tmp_path], capsys)
    assert code == 2 and "overwrite the input image" in err


def test_boxes_to_image_scales_and_clips():
    from single_stage_detector.tools.predict import boxes_to_image, eval_transform

    boxes = torch.tensor([[0.1, 0.2, 0.5, 1.2], [-0.1, 0.0, 0.3, 0.5]])
    # 200 x 100 image: x * 200, y * 100; 1.2 * 100 = 120 clipped to 100; -0.1 * 200 = -20 clipped to 0.
    torch.testing.assert_close(boxes_to_image(object(), boxes, 200, 100),
                               torch.tensor([[20.0, 20.0, 100.0, 100.0], [0.0, 0.0, 60.0, 50.0]]))

    class Letterboxed:  # a family transform that maps its own boxes back
        def boxes_to_image(self, b, w, h):
            return b * 1000

    assert boxes_to_image(Letterboxed(), boxes[:1], 200, 100).tolist() == [[100.0, 100.0, 200.0, 100.0]]

    from single_stage_detector.detectors.base import get_preset

    # Each preset's family transform: SSD's (ImageNet normalisation) and YOLO's (RGB / 255).
    assert type(eval_transform(get_preset("ssd_tiny"))).__name__ == "SSDEvalTransform"
    assert type(eval_transform(get_preset("yolov3_tiny_cpu"))).__name__ == "YOLOEvalTransform"
