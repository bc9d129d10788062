#!/usr/bin/env python3
"""Check a COCO-layout dataset folder before a long training run.

Usage::

    verify_dataset.py DATADIR [--expect coco2017|any] [--sample N] [--seed S]

DATADIR is the folder holding ``train2017/``, ``val2017/`` and ``annotations/`` (the
``coco2017`` folder written by init_datasets.sh; giving its parent works too).  For each
split the annotation file is ``annotations/bbox_only_instances_<split>2017.json`` if
present, else ``annotations/instances_<split>2017.json``.

Checks, printed as a table (check | expected | found | ok):

- the image folders and annotation files exist and the annotation files parse;
- with ``--expect coco2017``: 118,287 train images (117,266 of them with annotations),
  5,000 val images (4,952 with annotations), 80 categories;
  with ``--expect any`` (the default; e.g. the synthetic dataset) counts are shown only;
- ids (image, annotation, category) are JSON integers (the trainer refuses strings);
- the val split has annotated images (without them AP is undefined: the trainer refuses);
- every image listed in an annotation file exists on disk;
- every image's header, with the trainer's own check (``image_check.py`` of the package,
  loaded from its file): readable, complete (end-of-image marker), below Pillow's
  decompression-bomb limit, a format and pixel mode every backend decodes alike, and the
  stored width x height equal to the annotation's. The trainer skips such images (FAIL here);
- notes on what the trainer handles without losing anything (``warn``): images with an
  EXIF orientation tag (ignored: boxes refer to the stored pixels), boxes past the image
  border (clipped), boxes of zero or negative size (dropped), annotations without
  ``iscrowd``/``area`` (the evaluation fills in 0 and w x h);
- a sample of N images (default 100; drawn with a fixed seed from both splits) decodes
  fully with Pillow and has the width and height the annotation file gives.

Each problem row names up to a few example files or annotation ids.

Exit status: 0 when every check passes (``warn`` rows included), 1 when one fails (the
first problems are listed), 2 on a usage error.  Needs only the Python standard library
and Pillow, so it runs on a host without the training package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

PROG = "verify_dataset.py"
SPLITS = ("train", "val")
MAX_PROBLEMS_SHOWN = 10
EXAMPLES = 3
IMAGE_CHECK = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "single_stage_detector", "data",
                           "image_check.py")

# Published sizes of COCO 2017 (detection).
COCO2017 = {
    "train images": 118287,
    "train images with annotations": 117266,
    "val images": 5000,
    "val images with annotations": 4952,
    "categories": 80,
}


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.problems: list[str] = []

    def row(self, check: str, expected: Any, found: Any, ok: bool | None,
            problem: str | None = None) -> None:
        status = "-" if ok is None else ("ok" if ok else "FAIL")  # "-": shown, not checked
        self.rows.append((check, str(expected), str(found), status))
        if ok is False:
            self.problems.append(problem or f"{check}: expected {expected}, found {found}")

    def note(self, check: str, found: int, examples: list[str]) -> None:
        """A condition the trainer handles without losing data: ``warn`` (exit status unaffected)."""
        shown = f"{found}" + (f", e.g. {examples[0]}" if found and examples else "")
        self.rows.append((check, "0", shown, "warn" if found else "ok"))

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def print(self) -> None:
        header = ("check", "expected", "found", "ok")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(4)]
        for i, r in enumerate([header, *self.rows]):
            print(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                print("-+-".join("-" * w for w in widths))


def _drop_segmentation(obj: dict[str, Any]) -> dict[str, Any]:
    # instances_train2017.json is 448 MiB, mostly polygons this script does not need.
    if "segmentation" in obj and "image_id" in obj:
        obj["segmentation"] = []
    return obj


def find_root(datadir: str) -> str:
    nested = os.path.join(datadir, "coco2017")
    if not os.path.isdir(os.path.join(datadir, "annotations")) and os.path.isdir(nested):
        return nested
    return datadir


def annotation_file(root: str, split: str) -> str | None:
    for name in (f"bbox_only_instances_{split}2017.json", f"instances_{split}2017.json"):
        path = os.path.join(root, "annotations", name)
        if os.path.isfile(path):
            return path
    return None


def load_annotations(path: str) -> tuple[dict | None, str | None]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.loads(f.read(), object_hook=_drop_segmentation)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path}: cannot be read as JSON: {exc}"
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        return None, f"{path}: missing or malformed top-level key(s): {', '.join(missing)}"
    for section, keys in (("images", ("id", "file_name", "height", "width")),
                          ("annotations", ("image_id",))):
        for i, entry in enumerate(data[section]):
            if not isinstance(entry, dict) or any(k not in entry for k in keys):
                return None, f"{path}: {section}[{i}] lacks one of {', '.join(keys)}"
    return data, None


def load_image_check():
    """The trainer's ``image_check`` module, loaded from its file (no torch needed)."""
    path = os.path.normpath(IMAGE_CHECK)
    if not os.path.isfile(path) or importlib.util.find_spec("PIL") is None:
        return None
    spec = importlib.util.spec_from_file_location("ssd_image_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def non_integer_ids(data: dict) -> list[str]:
    """Entries whose ids are not JSON integers (``"1001"``, 1001.0, true), as 'section[i].key = value'."""
    bad = []
    for section, keys in (("images", ("id",)), ("annotations", ("id", "image_id", "category_id"))):
        for i, entry in enumerate(data[section]):
            for key in keys:
                if key in entry and type(entry[key]) is not int:
                    bad.append(f"{section}[{i}].{key} = {entry[key]!r}")
    return bad


def box_notes(data: dict) -> dict[str, list[str]]:
    """Annotation ids of boxes past the border, boxes of zero/negative size, and entries lacking iscrowd/area."""
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    notes: dict[str, list[str]] = {"past": [], "degenerate": [], "no_iscrowd_area": []}
    for a in data["annotations"]:
        if "iscrowd" not in a or "area" not in a:
            notes["no_iscrowd_area"].append(f"annotation {a.get('id')}")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            continue
        x, y, w, h = bbox
        if not all(math.isfinite(v) for v in bbox) or w <= 0 or h <= 0:
            notes["degenerate"].append(f"annotation {a.get('id')} bbox {bbox}")
            continue
        width, height = sizes.get(a.get("image_id"), (None, None))
        if width is not None and (x < 0 or y < 0 or x + w > width or y + h > height):
            notes["past"].append(f"annotation {a.get('id')} bbox {bbox} in a {width}x{height} image")
    return notes


def header_checks(checker, items: list[tuple[str, int, int]], threads: int = 8) -> list[tuple[str, Any]]:
    """``checker.check_image`` on every (path, width, height); returns (path, result) with a finding."""
    def one(item):
        return item[0], checker.check_image(*item)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(one, items, chunksize=256))
    return [(p, r) for p, r in results if not r.ok or r.exif_orientation is not None]


def count_jpegs(folder: str) -> int:
    with os.scandir(folder) as it:
        return sum(1 for e in it if e.name.lower().endswith((".jpg", ".jpeg")))


def check_decode(path: str, width: int, height: int) -> str | None:
    """None if the image decodes to (width, height), else the problem."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()  # decode all pixel data, not only the header
            size = img.size
    except Exception as exc:  # Pillow raises several types for broken files
        return f"{path}: does not decode ({type(exc).__name__}: {exc})"
    if size != (width, height):
        return f"{path}: decoded size {size[0]}x{size[1]}, annotation file says {width}x{height}"
    return None


def _image_rows(rep: Report, split: str, present: list[tuple[str, int, int]]) -> None:
    """Header checks of every present image: one row per skip reason, one note for EXIF tags."""
    checker = load_image_check()
    if checker is None:
        rep.row(f"{split} image headers", len(present), "skipped: image_check.py or Pillow missing", None)
        return
    findings = header_checks(checker, present)
    for reason in checker.SKIP_REASONS:
        hits = [(p, r) for p, r in findings if r.reason == reason]
        text = checker.REASON_TEXT[reason]
        rep.row(f"{split} images {reason.replace('_', ' ')}", 0, len(hits), not hits,
                problem=f"{len(hits)} {split} image(s) {text} (the trainer skips them), e.g. "
                        f"{'; '.join(r.message(p) for p, r in hits[:EXAMPLES])}")
    exif = [(p, r) for p, r in findings if r.exif_orientation is not None]
    rep.note(f"{split} images with an EXIF orientation tag (ignored)", len(exif),
             [f"{p} (orientation {r.exif_orientation})" for p, r in exif])


def verify(datadir: str, expect: str, sample: int, seed: int) -> Report:
    rep = Report()
    root = find_root(datadir)
    strict = expect == "coco2017"

    def counted(check: str, found: int) -> None:
        if strict:
            rep.row(check, COCO2017[check], found, found == COCO2017[check])
        else:
            rep.row(check, "any", found, None if found else False,
                    problem=f"{check}: none found")

    to_decode: list[tuple[str, int, int]] = []
    categories_seen: int | None = None
    for split in SPLITS:
        folder = os.path.join(root, f"{split}2017")
        has_folder = os.path.isdir(folder)
        rep.row(f"{split}2017/ folder", "exists", "yes" if has_folder else "missing",
                has_folder, problem=f"{folder}: folder missing")
        if has_folder:
            jpegs = count_jpegs(folder)
            if strict:
                rep.row(f"{split}2017/ JPEG files", COCO2017[f"{split} images"], jpegs,
                        jpegs == COCO2017[f"{split} images"])
            else:
                rep.row(f"{split}2017/ JPEG files", "any", jpegs, None)

        ann_path = annotation_file(root, split)
        rep.row(f"{split} annotation file", f"(bbox_only_)instances_{split}2017.json",
                os.path.basename(ann_path) if ann_path else "missing", ann_path is not None,
                problem=f"{os.path.join(root, 'annotations')}: no bbox_only_instances_"
                        f"{split}2017.json or instances_{split}2017.json")
        if ann_path is None:
            continue
        data, error = load_annotations(ann_path)
        if data is None:
            rep.row(f"{split} annotation file parses", "yes", "no", False, problem=error)
            continue

        images = data["images"]
        annotated = {a["image_id"] for a in data["annotations"]}
        counted(f"{split} images", len(images))
        with_annotations = sum(1 for img in images if img["id"] in annotated)
        counted(f"{split} images with annotations", with_annotations)
        if split == "val" and not strict:
            rep.row("val images with annotations > 0", "> 0", with_annotations, with_annotations > 0,
                    problem=f"{ann_path}: no val image has an annotation: AP is undefined and the trainer "
                            "refuses such a split")
        categories_seen = len(data["categories"])
        bad_ids = non_integer_ids(data)
        rep.row(f"{split} ids are JSON integers", "all", "all" if not bad_ids else f"{len(bad_ids)} not",
                not bad_ids, problem=f"{ann_path}: {len(bad_ids)} id(s) are not JSON integers, e.g. "
                                     f"{'; '.join(bad_ids[:EXAMPLES])}")
        notes = box_notes(data)
        rep.note(f"{split} boxes past the image border (clipped)", len(notes["past"]), notes["past"])
        rep.note(f"{split} boxes of zero/negative size (dropped)", len(notes["degenerate"]), notes["degenerate"])
        rep.note(f"{split} annotations without iscrowd/area", len(notes["no_iscrowd_area"]),
                 notes["no_iscrowd_area"])

        if has_folder:
            missing = []
            present = []
            for img in images:
                path = os.path.join(folder, img["file_name"])
                if os.path.isfile(path):
                    present.append((path, img["width"], img["height"]))
                else:
                    missing.append(path)
            to_decode.extend(present)
            rep.row(f"{split} images on disk", len(images), len(images) - len(missing),
                    not missing, problem=f"{len(missing)} {split} image(s) listed in "
                                         f"{ann_path} are missing")
            for path in missing[:MAX_PROBLEMS_SHOWN]:
                rep.problem(f"missing: {path}")
            _image_rows(rep, split, present)
        del data

    if categories_seen is not None:
        counted("categories", categories_seen)

    n = min(sample, len(to_decode))
    if importlib.util.find_spec("PIL") is None:
        rep.row("sample decodes (Pillow)", n, "skipped: Pillow not installed", None)
    else:
        picked = random.Random(seed).sample(sorted(to_decode), n) if n else []
        bad = [p for p in (check_decode(*item) for item in picked) if p]
        rep.row("sample decodes (Pillow)", f"{n} of {n}", f"{n - len(bad)} of {n}", not bad,
                problem=f"{len(bad)} of {n} sampled image(s) fail to decode")
        rep.problems.extend(bad)
    return rep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("datadir", metavar="DATADIR",
                        help="folder with train2017/, val2017/, annotations/ (or its parent)")
    parser.add_argument("--expect", choices=("coco2017", "any"), default="any",
                        help="coco2017: also check the published image counts (default: any)")
    parser.add_argument("--sample", type=int, default=100, metavar="N",
                        help="number of images to decode (default 100; 0 to skip)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the sample (default 0)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.datadir):
        parser.error(f"{args.datadir}: not a folder")
    if args.sample < 0:
        parser.error("--sample must be >= 0")

    root = find_root(args.datadir)
    print(f"{PROG}: {root} (expect {args.expect}, sample {args.sample}, seed {args.seed})")
    rep = verify(args.datadir, args.expect, args.sample, args.seed)
    rep.print()
    if rep.problems:
        print(f"\n{PROG}: FAILED, {len(rep.problems)} problem(s); first ones:", file=sys.stderr)
        for p in rep.problems[:MAX_PROBLEMS_SHOWN]:
            print(f"  - {p}", file=sys.stderr)
        return 1
    print(f"\n{PROG}: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
