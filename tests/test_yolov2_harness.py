"""YOLOv2 through the harness: `train` with multi-scale and a resume (the count of images seen
travels in the checkpoints), `evaluate --input-sizes`, and yolov2_resnet50 with an ImageNet
ResNet-50 file and a frozen backbone in epoch 1."""
from __future__ import annotations

import json

import pytest
import torch

from single_stage_detector.__main__ import main

RUN = ["--batch-size", "4", "--eval-batch-size", "4", "--num-workers", "0", "--lr", "0.001", "--warmup-steps", "1",
       "--log-every", "1", "--seed", "5", "--no-check-images"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from single_stage_detector.data.synthetic import ensure_synthetic_coco

    root = tmp_path_factory.mktemp("yolov2_data")
    ensure_synthetic_coco(root, num_train=8, num_val=4, seed=4)
    return root


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _resume_models(out):
    from single_stage_detector.checkpoint import list_resume_checkpoints, load_resume_checkpoint

    return [load_resume_checkpoint(p)["model"] for p in list_resume_checkpoints(out)]


@pytest.mark.slow
def test_tiny_train_resume_and_evaluate_at_several_sizes(data, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    args = ["train", "--preset", "yolov2_tiny_cpu", *RUN, "--data-dir", str(data), "--output-dir", str(out),
            "--multi-scale", "64", "128", "--eval-epochs", "1", "2"]
    assert main([*args, "--epochs", "1"]) == 3  # aborted at the epoch limit (target not reached)
    assert main([*args, "--epochs", "2", "--resume", "auto"]) == 3
    first, second = _resume_models(out)
    # darknet's net.seen: the epoch's training images (those with boxes), kept across the resume.
    log = [json.loads(ln.split(" ", 1)[1]) for ln in (out / "mlperf.log").read_text().splitlines()
           if ln.startswith(":::MLLOG")]
    per_epoch = next(r["value"] for r in log if r["key"] == "train_samples")
    assert per_epoch >= 6 and int(first["images_seen"]) == per_epoch and int(second["images_seen"]) == 2 * per_epoch
    capsys.readouterr()

    ckpt = out / "checkpoint.pt"
    assert main(["evaluate", str(ckpt), "--input-sizes", "64", "128", "--num-workers", "0"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["size"])
    assert lines[header].split() == ["size", "AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L"]
    rows = [ln.split() for ln in lines[header + 1:header + 3]]
    assert [r[0] for r in rows] == ["64", "128"]
    assert all(0.0 <= float(v) <= 100.0 for r in rows for v in r[1:])
    assert "4 images" in text and "policy:" in text
    # --json: one object, the row at the checkpoint's own size equal to a plain evaluation.
    assert main(["evaluate", str(ckpt), "--input-sizes", "128", "64", "--num-workers", "0", "--json"]) == 0
    sizes = json.loads(capsys.readouterr().out)["sizes"]
    assert [s["input_size"] for s in sizes] == [128, 64]
    assert main(["evaluate", str(ckpt), "--num-workers", "0", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["stats"] == sizes[0]["stats"] and plain["num_detections"] == sizes[0]["num_detections"]


def test_input_sizes_refuses_a_fixed_size_family(data, tmp_path, capsys):
    ckpt = tmp_path / "ssd.pt"
    torch.save({"preset": "ssd_tiny", "model": {}, "config": {"data_dir": str(data)}}, ckpt)
    assert main(["evaluate", str(ckpt), "--input-sizes", "320"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --input-sizes: preset 'ssd_tiny' (ssd) has a fixed input size")


@pytest.mark.slow
def test_resnet50_loads_imagenet_weights_and_freezes_its_backbone_in_epoch_1(data, tmp_path, capsys, one_thread):
    from torchvision.models import resnet50

    torch.manual_seed(7)
    imagenet = resnet50(weights=None).state_dict()  # stands in for torchvision's ImageNet file
    weights = tmp_path / "resnet50-imagenet.pth"
    torch.save(imagenet, weights)
    out = tmp_path / "run"
    code = main(["train", "--preset", "yolov2_resnet50", *RUN, "--input-size", "64", "--data-dir", str(data),
                 "--output-dir", str(out), "--epochs", "2", "--eval-epochs", "2", "--checkpoint-every", "1",
                 "--pretrained-backbone", str(weights), "--freeze-backbone-epochs", "1"])
    assert code == 3
    after1, after2 = _resume_models(out)
    backbone = {k[len("backbone."):]: k for k in after1 if k.startswith("backbone.")}
    assert set(backbone) == {k for k in imagenet if not k.startswith("fc.")}  # torchvision's names, fc dropped
    # Epoch 1: every backbone tensor (weights and BatchNorm statistics) exactly the file's.
    assert all(torch.equal(after1[key], imagenet[name]) for name, key in backbone.items()
               if not name.endswith("num_batches_tracked"))
    assert not torch.equal(after1["output_conv.weight"], after2["output_conv.weight"])
    # Epoch 2: the backbone trains.
    weights_changed = [name for name, key in backbone.items()
                       if name.endswith(".weight") and not torch.equal(after1[key], after2[key])]
    assert len(weights_changed) > 0.9 * sum(name.endswith(".weight") for name in backbone)


def test_resnet50_weight_file_errors_name_the_file(tmp_path):
    from single_stage_detector.detectors.yolov2.resnet50 import ResNet50Backbone, load_resnet50_weights
    from single_stage_detector.models.backbone_weights import BackboneWeightsError

    with torch.device("meta"):
        backbone = ResNet50Backbone()
    missing = tmp_path / "none.pth"
    with pytest.raises(BackboneWeightsError, match="not found: .*none.pth"):
        load_resnet50_weights(backbone, missing)
    wrong = tmp_path / "resnet34.pth"
    from torchvision.models import resnet34

    torch.save(resnet34().state_dict(), wrong)
    with pytest.raises(BackboneWeightsError, match="resnet34.pth: does not fit torchvision's ResNet-50; missing keys"):
        load_resnet50_weights(backbone, wrong)


def test_yolov2_config_is_the_papers_schedule():
    """configs/config_1xH100_YOLOV2.sh: the paper's 160 epochs (x0.1 at 60 and 90) with yolov2.cfg's
    batch 64 and burn-in, multi-scale 320..608, darknet's ImageNet Darknet-19."""
    import shlex
    import subprocess
    from pathlib import Path

    from single_stage_detector.__main__ import build_parser
    from single_stage_detector.config import config_from_args

    config = Path(__file__).resolve().parents[1] / "configs" / "config_1xH100_YOLOV2.sh"
    script = f'set -euo pipefail; set -a; . "{config}"; set +a; printf "%s\\n%s" "$BACKBONE_FILE" "$EXTRA_PARAMS"'
    backbone, params = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                                      env={"PATH": "/usr/bin:/bin"}).stdout.split("\n", 1)
    cfg = config_from_args(build_parser().parse_args(["train", "--data-dir", "/data", *shlex.split(params)]))
    assert cfg.preset == "yolov2_darknet19" and cfg.batch_size == 64 and cfg.lr == 1e-3
    assert (cfg.epochs, tuple(cfg.lr_decay_epochs), cfg.weight_decay, cfg.momentum) == (160, (60, 90), 5e-4, 0.9)
    assert (cfg.warmup_type, cfg.warmup_power, cfg.warmup_steps) == ("power", 4, 1000)
    assert tuple(cfg.multi_scale) == (320, 608) and backbone == "darknet19_448.conv.23"


@pytest.mark.slow
def test_darknet19_backbone_file_loads_into_yolov2_darknet19(tmp_path):
    """--pretrained-backbone darknet19_448.conv.23: the first 18 convs of a darknet file (written here
    from a random Darknet-19) load into the backbone, bit for bit; the head keeps its init."""
    from single_stage_detector.detectors.base import build_detector
    from single_stage_detector.detectors.yolo.darknet_weights import write_darknet_weights

    torch.manual_seed(1)
    source = build_detector("yolov2_darknet19").model
    for m in source.modules():  # BatchNorm statistics away from their init, so the copy shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = tmp_path / "darknet19_448.conv.23"
    write_darknet_weights(source, path, max_conv_layers=18)
    assert path.stat().st_size == 79_327_124  # 0.2 header (20 bytes) + the 18 convs
    detector = build_detector("yolov2_darknet19", pretrained_backbone=path)
    assert detector.backbone_pretrained
    ours, theirs = detector.model.state_dict(), source.state_dict()
    backbone = [k for k in ours if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    assert len(backbone) == 18 * 5 and all(torch.equal(ours[k], theirs[k]) for k in backbone)
    assert not torch.equal(ours["head.conv.weight"], theirs["head.conv.weight"])


def test_input_sizes_warn_of_the_cpu_fallback_once(data, tmp_path, capsys, monkeypatch):
    from single_stage_detector import distributed
    from single_stage_detector.detectors.base import build_detector, get_preset

    monkeypatch.setattr(distributed, "cuda_unavailable_reason", lambda: "no GPU is visible (test)")
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build on a machine without a GPU
    ckpt = tmp_path / "v2.pt"
    torch.save({"preset": "yolov2_tiny_cpu", "model": build_detector(get_preset("yolov2_tiny_cpu")).model.state_dict(),
                "config": {"data_dir": str(data)}}, ckpt)
    assert main(["evaluate", str(ckpt), "--input-sizes", "64", "96", "128", "--num-workers", "0",
                 "--max-images", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("WARNING: --device auto: running on the CPU") == 1
