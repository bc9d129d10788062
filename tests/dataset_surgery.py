"""Helpers that damage a COCO-layout dataset copy in the ways real datasets are damaged (tests only)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Callable

from PIL import Image

def _ann_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{split}2017.json"


def _load(root: Path, split: str) -> dict:
    return json.loads(_ann_path(root, split).read_text())


def _save(root: Path, split: str, data: dict) -> None:
    _ann_path(root, split).write_text(json.dumps(data))


def _annotated(root: Path, split: str, k: int = 0) -> dict:
    """The k-th image entry (in file order) that has at least one annotation."""
    data = _load(root, split)
    ids = {a["image_id"] for a in data["annotations"]}
    return [im for im in data["images"] if im["id"] in ids][k]


def _image_file(root: Path, split: str, k: int = 0) -> Path:
    return root / f"{split}2017" / _annotated(root, split, k)["file_name"]


def with_exif_orientation(jpeg: bytes, orientation: int = 6) -> bytes:
    """The same JPEG (same compressed pixels) with an EXIF APP1 segment carrying Orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()  # b"Exif\0\0" + TIFF structure
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _rewrite_image(path: Path, convert: Callable[[Image.Image], Image.Image], **save) -> None:
    with Image.open(path) as im:
        out = convert(im.convert("RGB"))
    out.save(path, **save)


def _oversized_header(jpeg: bytes, width: int = 20000, height: int = 20000) -> bytes:
    """A JPEG whose frame header declares ``width x height`` (above Pillow's bomb limit)."""
    data = bytearray(jpeg)
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
