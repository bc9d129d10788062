"""COCO evaluation through the real pycocotools and the real faster-coco-eval (the same 13 numbers,
==), and gathering detections across ranks."""
import contextlib
import importlib.util
import io
import json

import numpy as np
import pytest
import torch

from single_stage_detector.evaluation import COCO_STAT_NAMES, CocoEvaluator, _dedupe, to_coco_array, to_coco_results

LUT = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13])  # label -> COCO id (12 -> 13: the id gap)


def _write_gt(path):
    gt = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "height": 100, "width": 200},
            {"id": 2, "file_name": "b.jpg", "height": 50, "width": 50},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 13, "bbox": [100, 20, 60, 60], "area": 3600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 30, 20], "area": 600, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 13, "name": "stop sign"}],
    }
    path.write_text(json.dumps(gt))
    return gt


def _as_normalised_detections(gt):
    """Detections equal to the ground truth, in the model's output format."""
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    per_image = {}
    for ann in gt["annotations"]:
        h, w = sizes[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        label = int((LUT == ann["category_id"]).nonzero()[0, 0])
        per_image.setdefault(ann["image_id"], []).append(([x / w, y / h, (x + bw) / w, (y + bh) / h], label))
    ids = sorted(per_image)
    dets = [{"boxes": torch.tensor([b for b, _ in per_image[i]]),
             "scores": torch.full((len(per_image[i]),), 0.9),
             "labels": torch.tensor([lb for _, lb in per_image[i]])} for i in ids]
    return ids, dets, torch.tensor([sizes[i] for i in ids])


def test_detections_equal_to_ground_truth_give_ap_one(tmp_path):
    gt = _write_gt(tmp_path / "gt.json")
    ids, dets, sizes = _as_normalised_detections(gt)
    results = to_coco_results(dets, ids, sizes, LUT)
    assert {r["category_id"] for r in results} == {1, 13}  # original ids, not labels
    r = to_coco_results(dets, ids, sizes, LUT)[0]
    assert r["bbox"] == pytest.approx([10, 10, 50, 40], abs=1e-3)
    res = CocoEvaluator(tmp_path / "gt.json").evaluate(results)
    assert res.ap == pytest.approx(1.0)
    assert len(res.stats) == 13 and res.stats["AP50"] == pytest.approx(1.0) and res.stats["VOC_mAP50"] == 1.0


def test_hand_made_detections_match_plain_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    _write_gt(tmp_path / "gt.json")
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [12, 11, 48, 40], "score": 0.9},   # good
        {"image_id": 1, "category_id": 1, "bbox": [60, 50, 30, 30], "score": 0.8},   # false positive
        {"image_id": 1, "category_id": 13, "bbox": [110, 30, 60, 60], "score": 0.7},  # IoU ~0.53
        {"image_id": 2, "category_id": 1, "bbox": [5, 5, 25, 20], "score": 0.3},     # IoU 0.83
    ]
    res = CocoEvaluator(tmp_path / "gt.json").evaluate(results)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    np.testing.assert_allclose([res.stats[k] for k in COCO_STAT_NAMES], ev.stats)
    assert 0.0 < res.ap < 1.0


def test_no_detections_gives_zero(tmp_path):
    _write_gt(tmp_path / "gt.json")
    assert CocoEvaluator(tmp_path / "gt.json").evaluate([]).ap == 0.0


def test_restricting_to_evaluated_images(tmp_path):
    gt = _write_gt(tmp_path / "gt.json")
    ids, dets, sizes = _as_normalised_detections(gt)
    results = to_coco_results(dets[:1], ids[:1], sizes[:1], LUT)  # only image 1 was run
    assert CocoEvaluator(tmp_path / "gt.json").evaluate(results, image_ids=[1]).ap == pytest.approx(1.0)
    assert CocoEvaluator(tmp_path / "gt.json").evaluate(results).ap < 1.0


def test_result_array_is_the_references_layout_and_evaluates_as_the_dicts(tmp_path):
    """to_coco_array: rows (image_id, x, y, w, h, score, category_id) in pixels, w = (x2 - x1) * W
    as the MLPerf reference's coco_eval; COCOeval gives the dict path's numbers to float32 precision."""
    gt = _write_gt(tmp_path / "gt.json")
    ids, dets, sizes = _as_normalised_detections(gt)
    g = torch.Generator().manual_seed(0)
    for d in dets:  # imperfect detections with distinct scores, so that the ranking matters
        d["boxes"] = (d["boxes"] + 0.02 * torch.randn(d["boxes"].shape, generator=g)).clamp(0, 1)
        d["scores"] = torch.rand(len(d["scores"]), generator=g)
    dets.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)})
    array = to_coco_array(dets, [*ids, 2], torch.cat([sizes, sizes[:1]]), LUT)
    dicts = to_coco_results(dets, ids, sizes, LUT)
    assert array.shape == (len(dicts), 7) and array.dtype == np.float64
    # Hand-computed first row: image 1 (200 x 100), box (x1, y1, x2, y2) -> (x1 W, y1 H, (x2 - x1) W, (y2 - y1) H).
    b = dets[0]["boxes"][0]
    expect = [1, float(b[0] * 200), float(b[1] * 100), float((b[2] - b[0]) * 200), float((b[3] - b[1]) * 100),
              float(dets[0]["scores"][0]), int(LUT[dets[0]["labels"][0]])]
    np.testing.assert_allclose(array[0], expect, rtol=1e-6)
    np.testing.assert_allclose(array[:, 1:5], [r["bbox"] for r in dicts], atol=2e-3)
    assert array[:, 6].tolist() == [r["category_id"] for r in dicts]
    evaluator = CocoEvaluator(tmp_path / "gt.json")
    by_array, by_dicts = evaluator.evaluate(array), evaluator.evaluate(dicts)
    assert 0.0 < by_array.ap < 1.0 and by_array.num_detections == len(dicts)
    for k in COCO_STAT_NAMES:
        assert by_array.stats[k] == pytest.approx(by_dicts.stats[k], abs=1e-3), k
    assert evaluator.evaluate(np.zeros((0, 7))).ap == 0.0


def test_dedupe_keeps_each_image_once_in_arrays():
    row = lambda i: [i, 0, 0, 1, 1, 0.5, 1]  # noqa: E731
    parts = [(np.array([row(1), row(3), row(3)], dtype=float), [1, 3]), (np.array([row(2), row(1)], dtype=float), [2, 1])]
    results, ids = _dedupe(parts)
    assert ids == [1, 3, 2] and sorted(results[:, 0].tolist()) == [1, 2, 3, 3]


def test_dedupe_keeps_each_image_once():
    r = lambda i: {"image_id": i, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}  # noqa: E731
    parts = [([r(1), r(3)], [1, 3]), ([r(2), r(1)], [2, 1])]  # image 1 seen by both ranks (padding)
    results, ids = _dedupe(parts)
    assert sorted(ids) == [1, 2, 3]
    assert sorted(x["image_id"] for x in results) == [1, 2, 3]


# -- annotation files as converters write them ----------------------------------------------
def test_ground_truth_without_iscrowd_or_area_evaluates_like_the_full_file(tmp_path):
    """Real pycocotools on the raw file fails with KeyError 'iscrowd' at the first evaluation;
    the evaluator's normalised ground truth gives the numbers of the complete file."""
    gt = _write_gt(tmp_path / "full.json")
    noflags = json.loads(json.dumps(gt))
    for a in noflags["annotations"]:
        del a["iscrowd"], a["area"]
    (tmp_path / "noflags.json").write_text(json.dumps(noflags))
    bare = json.loads(json.dumps(noflags))  # ... and more of what converters write
    for i, a in enumerate(bare["annotations"]):
        a["id"] = 0 if i == 0 else str(a["id"])  # id 0 (pycocotools' "unmatched" marker) and a numeric string
        a["image_id"] = str(a["image_id"])
    bare["categories"] = []  # the reader ignores the list; the ground truth must not be skipped
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [12, 11, 48, 40], "score": 0.9},
        {"image_id": 1, "category_id": 13, "bbox": [110, 30, 60, 60], "score": 0.7},
        {"image_id": 2, "category_id": 1, "bbox": [5, 5, 25, 20], "score": 0.3},
    ]
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(KeyError, match="iscrowd"):
        raw = COCO(str(tmp_path / "noflags.json"))
        ev = COCOeval(raw, raw.loadRes(results), "bbox")
        ev.evaluate()
    full = CocoEvaluator(tmp_path / "full.json").evaluate(results)
    assert 0.0 < full.ap < 1.0
    for name in ("noflags.json", "bare.json"):
        got = CocoEvaluator(tmp_path / name).evaluate(results)
        assert got.stats == pytest.approx(full.stats), name  # areas w*h = the file's areas here


def test_undefined_ap_is_an_error_never_a_number(tmp_path):
    from single_stage_detector.evaluation import UndefinedAPError

    gt = _write_gt(tmp_path / "gt.json")
    gt["images"].append({"id": 3, "file_name": "c.jpg", "height": 10, "width": 10})  # no annotation
    gt["annotations"].append({"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    ev = CocoEvaluator(tmp_path / "gt.json")
    assert ev.num_annotations == 3  # crowd boxes are not ground truth that AP can be computed on
    det = [{"image_id": 3, "category_id": 1, "bbox": [1, 1, 4, 4], "score": 0.9}]
    for results in (det, []):
        with pytest.raises(UndefinedAPError, match="gt.json has no annotations for the 1 evaluated"):
            ev.evaluate(results, image_ids=[3])
    empty = {**gt, "annotations": []}
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    assert CocoEvaluator(tmp_path / "empty.json").num_annotations == 0


def test_malformed_ground_truth_entry_names_the_file_and_entry(tmp_path):
    from single_stage_detector.data.coco import DatasetError

    gt = _write_gt(tmp_path / "gt.json")
    gt["annotations"][1]["category_id"] = "person"
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    with pytest.raises(DatasetError, match=r"gt.json: annotation entry #1 \(id 2\): category_id 'person'"):
        CocoEvaluator(tmp_path / "gt.json")


def _voc_hand_made():
    """Two images, classes 1 and 13 with a crowd box, and five detections (the VOC test's)."""
    gt = {
        "images": [{"id": 1, "height": 100, "width": 200}, {"id": 2, "height": 100, "width": 200}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [100, 20, 40, 60], "area": 2400, "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 13, "bbox": [100, 20, 60, 60], "area": 3600, "iscrowd": 0},
            {"id": 4, "image_id": 2, "category_id": 13, "bbox": [0, 0, 80, 80], "area": 6400, "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 13, "name": "stop sign"}],
    }
    results = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "score": 0.9},    # TP
        {"image_id": 1, "category_id": 1, "bbox": [150, 60, 30, 30], "score": 0.8},   # FP
        {"image_id": 2, "category_id": 1, "bbox": [100, 20, 40, 60], "score": 0.7},   # TP
        {"image_id": 1, "category_id": 13, "bbox": [100, 20, 60, 60], "score": 0.6},  # TP
        {"image_id": 2, "category_id": 13, "bbox": [0, 0, 80, 80], "score": 0.95},    # on the crowd box
    ]
    return gt, results


def test_voc_map50_hand_computed_beside_coco_ap50(tmp_path):
    """VOC all-point interpolation on COCOeval's matches at IoU 0.5, a crowd match ignored.

    Class 1 (person): 2 ground truths; detections by score: TP (0.9), FP (0.8), TP (0.7).
    Precision-recall points (R 0.5, P 1), (0.5, 1/2), (1, 2/3); envelope 1 up to R 0.5, then 2/3:
    AP = 0.5 x 1 + 0.5 x 2/3 = 5/6 (COCO's 101-point AP50 is (51 x 1 + 50 x 2/3) / 101 = 0.835).
    Class 13 (stop sign): 1 ground truth and 1 crowd box; the detection on the crowd box is
    ignored, the other is a TP: AP 1. mAP = (5/6 + 1) / 2.
    """
    gt, results = _voc_hand_made()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    res = CocoEvaluator(tmp_path / "gt.json").evaluate(results)
    assert res.stats["VOC_mAP50"] == pytest.approx((5 / 6 + 1.0) / 2, abs=1e-12)
    assert res.stats["AP50"] == pytest.approx(((51 + 50 * 2 / 3) / 101 + 1.0) / 2, abs=1e-6)


# -- the two scorers: pycocotools and faster-coco-eval give the same 13 numbers ----------------
HAVE_FASTER = importlib.util.find_spec("faster_coco_eval") is not None
needs_faster = pytest.mark.skipif(not HAVE_FASTER, reason="faster-coco-eval is not installed (pip install "
                                                          "faster-coco-eval); pycocotools alone is tested")

CATS = (1, 2, 3, 5, 13)  # category 5 gets no detection in the random dataset


def _random_dataset(rng, n_images=300, per_image=100, tie_decimals=None):
    """Ground truth of several classes (1 % crowd boxes, every 10th image without any) and about
    ``per_image`` detections per image: jittered ground-truth boxes (some with another class)
    plus random boxes of every size; ``tie_decimals`` rounds the scores (many ties)."""
    images, anns, rows = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "height": 480, "width": 640})
        boxes = []
        for _ in range(0 if i % 10 == 0 else int(rng.integers(1, 12))):
            w, h = rng.uniform(4, 300), rng.uniform(4, 300)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            cat = int(rng.choice(CATS))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.01)})
            boxes.append((x, y, w, h, cat))
        for x, y, w, h, cat in boxes:
            j = rng.normal(0, 0.1, 4) * [w, h, w, h]
            det_cat = cat if rng.random() < 0.8 else int(rng.choice((1, 2, 3, 13)))
            rows.append([i, x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3]), rng.random(), det_cat])
        for _ in range(per_image - len(boxes)):
            w, h = rng.uniform(2, 300), rng.uniform(2, 300)
            rows.append([i, rng.uniform(0, 640 - w), rng.uniform(0, 480 - h), w, h, 0.6 * rng.random(),
                         int(rng.choice((1, 2, 3, 13)))])
    res = np.asarray(rows, dtype=np.float64)
    if tie_decimals is not None:
        res[:, 5] = np.round(res[:, 5], tie_decimals)
    return {"images": images, "annotations": anns, "categories": [{"id": c, "name": str(c)} for c in CATS]}, res


def _many_in_one_image():
    """150 detections of one class in one image (more than maxDets 100): which 100 count matters."""
    rng = np.random.default_rng(1)
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "bbox": [40.0 * (k % 10), 40.0 * (k // 10), 30, 30],
             "area": 900, "iscrowd": 0} for k in range(60)]
    anns.append({"id": 61, "image_id": 2, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0})
    rows = [[1, 40.0 * (k % 10) + rng.uniform(-8, 8), 40.0 * (k // 10) + rng.uniform(-8, 8), 30, 30,
             rng.random(), 1] for k in range(150)]  # rows 60.. repeat boxes: duplicates, false positives
    rows.append([2, 12, 12, 50, 50, 0.5, 1])
    gt = {"images": [{"id": 1, "height": 400, "width": 400}, {"id": 2, "height": 100, "width": 100}],
          "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    return gt, np.asarray(rows)


def _tied_scores():
    """Equal scores within an image and across images, true and false positives interleaved:
    the order among ties (image, then detection id) decides the VOC and COCO curves."""
    gt = {"images": [{"id": i, "height": 100, "width": 100} for i in (1, 2, 3)],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
              {"id": 2, "image_id": 2, "category_id": 1, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
              {"id": 3, "image_id": 3, "category_id": 1, "bbox": [10, 60, 30, 30], "area": 900, "iscrowd": 0},
              {"id": 4, "image_id": 3, "category_id": 2, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    rows = [[1, 60, 60, 20, 20, 0.5, 1], [1, 0, 0, 20, 20, 0.5, 1], [2, 50, 50, 20, 20, 0.5, 1],
            [2, 0, 0, 10, 10, 0.5, 1], [3, 10, 60, 30, 30, 0.5, 1], [3, 11, 61, 30, 30, 0.5, 1],
            [3, 10, 10, 40, 40, 0.7, 2], [3, 60, 60, 30, 30, 0.7, 2], [1, 0, 0, 20, 20, 0.7, 2]]
    return gt, np.asarray(rows, dtype=np.float64)


def _crowd_matches():
    """Detections on crowd boxes (ignored, several on one crowd box), beside ordinary matches."""
    gt = {"images": [{"id": 1, "height": 200, "width": 200}, {"id": 2, "height": 200, "width": 200}],
          "annotations": [
              {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 120, 120], "area": 14400, "iscrowd": 1},
              {"id": 2, "image_id": 1, "category_id": 1, "bbox": [130, 130, 40, 40], "area": 1600, "iscrowd": 0},
              {"id": 3, "image_id": 2, "category_id": 1, "bbox": [20, 20, 60, 60], "area": 3600, "iscrowd": 0},
              {"id": 4, "image_id": 2, "category_id": 1, "bbox": [100, 100, 90, 90], "area": 8100, "iscrowd": 1}],
          "categories": [{"id": 1, "name": "person"}]}
    rows = [[1, 0, 0, 120, 120, 0.9, 1], [1, 10, 10, 100, 100, 0.8, 1], [1, 130, 130, 40, 40, 0.7, 1],
            [1, 5, 5, 110, 110, 0.95, 1], [2, 20, 20, 60, 60, 0.6, 1], [2, 100, 100, 90, 90, 0.99, 1],
            [2, 0, 100, 50, 50, 0.65, 1]]
    return gt, np.asarray(rows, dtype=np.float64)


def _single_image():
    gt = {"images": [{"id": 7, "height": 100, "width": 200}],
          "annotations": [
              {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
              {"id": 2, "image_id": 7, "category_id": 13, "bbox": [100, 20, 60, 60], "area": 3600, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "person"}, {"id": 13, "name": "stop sign"}]}
    rows = [[7, 12, 11, 48, 40, 0.9, 1], [7, 110, 30, 60, 60, 0.7, 13], [7, 60, 50, 30, 30, 0.8, 1]]
    return gt, np.asarray(rows, dtype=np.float64)


def _existing_hand_made():
    """The VOC test's hand-made data plus a second class-1 detection overlapping the stop sign."""
    gt, results = _voc_hand_made()
    results.append({"image_id": 1, "category_id": 1, "bbox": [110, 30, 60, 60], "score": 0.7})
    return gt, results


def _dataset(name):
    if name == "random":
        return _random_dataset(np.random.default_rng(0))
    if name == "random-ties":
        return _random_dataset(np.random.default_rng(2), n_images=60, per_image=40, tie_decimals=1)
    return {"many-in-one-image": _many_in_one_image, "tied-scores": _tied_scores, "crowd-matches": _crowd_matches,
            "single-image": _single_image, "hand-made": _existing_hand_made}[name]()


@needs_faster
@pytest.mark.parametrize("name", ["random", "random-ties", "many-in-one-image", "tied-scores", "crowd-matches",
                                  "single-image", "hand-made"])
def test_faster_coco_eval_gives_exactly_the_stats_of_pycocotools(tmp_path, name):
    """All 13 numbers (the 12 COCO stats and VOC mAP@0.5) equal, ==, for both input forms."""
    gt, results = _dataset(name)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    reference = CocoEvaluator(tmp_path / "gt.json", backend="pycocotools")
    faster = CocoEvaluator(tmp_path / "gt.json", backend="faster-coco-eval")
    forms = [results]
    if isinstance(results, np.ndarray):  # the dict form too (loadRes takes either)
        forms.append([{"image_id": int(r[0]), "bbox": [float(v) for v in r[1:5]], "score": float(r[5]),
                       "category_id": int(r[6])} for r in results])
    for form in forms:
        expect, got = reference.evaluate(form), faster.evaluate(form)
        assert expect.backend == "pycocotools" and got.backend == "faster-coco-eval"
        assert list(got.stats) == list(expect.stats) == [*COCO_STAT_NAMES, "VOC_mAP50"]
        assert got.stats == expect.stats, {k: (expect.stats[k], got.stats[k]) for k in expect.stats}
        assert got.ap == expect.ap and got.num_images == expect.num_images
        assert got.num_detections == expect.num_detections
        assert 0.0 < got.stats["VOC_mAP50"] and 0.0 < got.ap <= 1.0
        assert "Average Precision" in got.summary
    if name == "random":  # a subset of the images, as a run with --max-eval-images
        ids = list(range(1, 300, 3))
        assert faster.evaluate(results, image_ids=ids).stats == reference.evaluate(results, image_ids=ids).stats


@needs_faster
def test_faster_coco_eval_keeps_the_evaluators_behaviours(tmp_path):
    """No detections: AP 0; no ground truth in the evaluated images: UndefinedAPError; the
    VOC hand computation of test_voc_map50_hand_computed_beside_coco_ap50; auto picks it."""
    from single_stage_detector.evaluation import UndefinedAPError

    gt, results = _existing_hand_made()
    gt["images"].append({"id": 3, "height": 10, "width": 10})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    ev = CocoEvaluator(tmp_path / "gt.json", backend="faster-coco-eval")
    assert CocoEvaluator(tmp_path / "gt.json").backend == "faster-coco-eval"
    for empty in ([], np.zeros((0, 7))):
        r = ev.evaluate(empty)
        assert r.ap == 0.0 and r.stats["VOC_mAP50"] == 0.0 and len(r.stats) == 13 and r.backend == "faster-coco-eval"
    for res in (results[:1], []):
        with pytest.raises(UndefinedAPError, match="gt.json has no annotations for the 1 evaluated"):
            ev.evaluate([{**results[0], "image_id": 3}] if res else [], image_ids=[3])
    r = ev.evaluate(results[:5], image_ids=[1, 2])
    assert r.stats["VOC_mAP50"] == pytest.approx((5 / 6 + 1.0) / 2, abs=1e-12)
    # Were the two ever to disagree, pycocotools scores on a pycocotools index of the same ground truth.
    fallback, _ = ev._score_pycocotools(results, [1, 2, 3], ev._pycocotools_index())
    assert fallback == CocoEvaluator(tmp_path / "gt.json", backend="pycocotools").evaluate(results).stats == \
        ev.evaluate(results).stats


def test_backend_choice_is_checked(tmp_path):
    from single_stage_detector.evaluation import resolve_coco_eval_backend

    _write_gt(tmp_path / "gt.json")
    with pytest.raises(ValueError, match="expected auto|pycocotools|faster-coco-eval, got 'fast'"):
        CocoEvaluator(tmp_path / "gt.json", backend="fast")
    assert CocoEvaluator(tmp_path / "gt.json", backend="pycocotools").backend == "pycocotools"
    assert resolve_coco_eval_backend("auto") == ("faster-coco-eval" if HAVE_FASTER else "pycocotools")


def test_background_scorer_scores_with_the_chosen_backend(tmp_path):
    """AsyncScorer's process builds its CocoEvaluator with the run's --coco-eval."""
    from single_stage_detector.async_eval import AsyncScorer

    gt, results = _single_image()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    scorer = AsyncScorer(tmp_path / "gt.json", backend="pycocotools")
    try:
        got = scorer.submit(results, [7]).result(timeout=300)
    finally:
        scorer.close()
    assert got.backend == "pycocotools"
    assert got.stats == CocoEvaluator(tmp_path / "gt.json", backend="pycocotools").evaluate(results).stats
