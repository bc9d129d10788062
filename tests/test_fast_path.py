"""The fast path: torch.compile equals eager, fused SGD equals foreach SGD, the CUDA-graph
training step equals the eager one (CUDA), and a GPU request without a usable GPU stops."""
import os
import re
import subprocess
import sys

import pytest
import torch

from cli_runner import run_cli
from single_stage_detector.detector import SSDDetector
from single_stage_detector.distributed import DeviceUnavailableError, cuda_unavailable_reason, select_device
from single_stage_detector.engine import AmpSettings
from single_stage_detector.fast_path import (CudaGraphTrainStep, TrainStep, compile_for_training, make_sgd,
                                             sgd_supports_fused)
from single_stage_detector.models import build_model, get_preset

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tiny(device="cpu", seed=0):
    preset = get_preset("ssd_tiny")
    torch.manual_seed(seed)
    det = SSDDetector(build_model(preset), preset.box_spec).to(device)
    det.train()
    return det


def _batches(det, n, batch=2, device="cpu", seed=1):
    """``n`` batches of (images [B, 3, 128, 128], encoded loc [B, A, 4], labels [B, A]) with 1..3 boxes each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        boxes, labels = [], []
        for _ in range(batch):
            k = int(torch.randint(1, 4, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * 0.5
            boxes.append(torch.cat([xy, xy + 0.1 + torch.rand(k, 2, generator=g) * 0.4], 1).to(device))
            labels.append(torch.randint(1, 81, (k,), generator=g).to(device))
        with torch.no_grad():
            loc_t, lab_t = det.encode_targets(boxes, labels)
        out.append((torch.randn(batch, 3, 128, 128, generator=g).to(device), loc_t, lab_t))
    return out


def _losses(step, batches):
    return [float(sum(step(*b).values())) for b in batches]


def test_compiled_training_step_gives_the_eager_losses():
    """torch.compile as ``--compile`` applies it: 5 SGD steps, every loss within 1e-4 relative."""
    eager_det = _tiny()
    batches = _batches(eager_det, 5)
    eager = _losses(TrainStep(eager_det, make_sgd(eager_det.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                                                  device=torch.device("cpu"))), batches)
    det = _tiny()
    module = compile_for_training(det, det, torch.device("cpu"))
    assert det.model._compiled_call_impl is not None  # the network really runs compiled
    compiled = _losses(TrainStep(module, make_sgd(det.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4,
                                                  device=torch.device("cpu"))), batches)
    assert eager[-1] < eager[0]  # the steps train
    for e, c in zip(eager, compiled):
        assert abs(c - e) <= 1e-4 * abs(e), (eager, compiled)
    assert set(det.state_dict()) == set(eager_det.state_dict())  # checkpoints keep their keys


@pytest.mark.skipif(not sgd_supports_fused(torch.device("cpu")), reason="fused SGD needs a newer torch on CPU")
def test_fused_sgd_is_the_same_update():
    """make_sgd(fused=True) and the foreach default move the weights identically (momentum, weight decay)."""
    a, b = _tiny(), _tiny()
    batches = _batches(a, 3)
    cpu = torch.device("cpu")
    opt_a = make_sgd(a.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, device=cpu)
    opt_b = make_sgd(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, device=cpu, fused=True)
    assert not opt_a.defaults.get("fused") and opt_b.defaults["fused"]
    _losses(TrainStep(a, opt_a), batches)
    _losses(TrainStep(b, opt_b), batches)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_cuda_graph_step_refuses_what_it_cannot_capture():
    det = _tiny()
    opt = make_sgd(det.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="fp16"):
        CudaGraphTrainStep(det, opt, scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphTrainStep(det, opt)(*_batches(det, 1)[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_gpu_stops_naming_the_reason(tmp_path):
    reason = cuda_unavailable_reason()
    assert reason
    with pytest.raises(DeviceUnavailableError, match="--device cuda: "):
        select_device("cuda")
    assert select_device("auto").type == "cpu"
    # A GPU system config passes --device cuda: the run stops before anything is written.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "single_stage_detector", "train", "--device", "cuda", "--preset",
                           "ssd_tiny", "--synthetic", "--data-dir", str(tmp_path / "d"), "--output-dir",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: --device cuda:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


@needs_cuda
def test_fused_sgd_is_the_cuda_default():
    opt = make_sgd(_tiny("cuda").parameters(), lr=0.01, momentum=0.9, weight_decay=0.0, device=torch.device("cuda"))
    assert opt.defaults["fused"]


@needs_cuda
def test_cuda_graph_step_equals_eager_and_falls_back_on_new_shapes():
    """Replaying the captured step trains as the eager step does; another batch size runs eagerly."""
    cuda = torch.device("cuda")
    ref, det = _tiny("cuda"), _tiny("cuda")
    batches = _batches(ref, 6, device="cuda")
    fp32 = AmpSettings.resolve("off", cuda)
    eager = TrainStep(ref, make_sgd(ref.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4, device=cuda),
                      fp32.autocast)
    graphed = CudaGraphTrainStep(det, make_sgd(det.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4,
                                               device=cuda), fp32.autocast, warmup=2)
    # The graph's warm-up steps are real steps on the first batch: give the eager model the same.
    for _ in range(2):
        eager(*batches[0])
    want = _losses(eager, batches[:4])
    got = _losses(graphed, batches[:4])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=1e-4)
    assert graphed.replays == 4 and graphed.fallbacks == 0
    small = _batches(det, 1, batch=1, device="cuda", seed=5)[0]
    losses = graphed(*small)
    assert graphed.fallbacks == 1 and torch.isfinite(sum(losses.values()))
    graphed(*batches[4])  # back on the captured shape: replayed
    assert graphed.replays == 5


@needs_cuda
def test_bf16_channels_last_step_on_cuda_trains():
    cuda = torch.device("cuda")
    det = _tiny("cuda").to(memory_format=torch.channels_last)
    step = TrainStep(det, make_sgd(det.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, device=cuda),
                     AmpSettings.resolve("bf16", cuda).autocast)
    batches = [(i.contiguous(memory_format=torch.channels_last), lt, lb)
               for i, lt, lb in _batches(det, 1, device="cuda")] * 8
    losses = _losses(step, batches)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@needs_cuda
def test_non_finite_loss_on_cuda_stops_at_a_check_naming_the_step(small_coco, tmp_path):
    """On the GPU the loss is not read every step; the run still stops, naming the first bad step."""
    proc = run_cli(["train", "--device", "cuda", "--preset",
                    "ssd_tiny", "--data-dir", str(small_coco), "--output-dir", str(tmp_path / "o"),
                    "--batch-size", "8", "--eval-batch-size", "8", "--num-workers", "0", "--no-save-checkpoint",
                    "--seed", "1", "--lr", "1e20", "--warmup-steps", "1", "--epochs", "3", "--eval-every", "1",
                    "--log-every", "4"], timeout=600, cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr[-3000:]
    m = re.search(r"non-finite loss in epoch \d+ at step (\d+) \(checked steps (\d+)\.\.(\d+); .*loc=", proc.stderr)
    assert m and int(m[2]) <= int(m[1]) <= int(m[3]), proc.stderr[-2000:]
