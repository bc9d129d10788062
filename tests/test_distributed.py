"""Distributed training and evaluation on CPU (gloo), launched with torchrun as in production.

* 2 processes x batch 4 (SyncBatchNorm over both, bn_span 8) end with the same weights as
  1 process x batch 8, given the same data order (augmentation off);
* evaluation of a fixed checkpoint with 1, 2 and 3 processes: same AP, every image once;
* the 2-process MLPerf log passes the official checker, each key once (rank 0 only);
* gradient accumulation 2 x batch B == batch 2B (BN statistics frozen, see docs/DISTRIBUTED.md);
* one failing rank ends the whole launch, non-zero, within a bounded time;
* SLURM node-list parsing, launcher environment, sharded sampling.
"""
import copy
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from single_stage_detector.compliance import check_log
from single_stage_detector.data.coco import COCO_CATEGORY_IDS, CocoDetection, find_coco_split
from single_stage_detector.data.loader import build_train_loader, collate_detection
from single_stage_detector.data.synthetic import ensure_synthetic_coco
from single_stage_detector.data.transforms import SSDEvalTransform
from single_stage_detector.detector import SSDDetector
from single_stage_detector.distributed import DistInfo, expand_slurm_nodelist, first_slurm_host, launch_env
from single_stage_detector.engine import AmpSettings, LRSchedule, train_one_epoch
from single_stage_detector.models import build_model, get_preset

# 10 training images at a global batch of 8: the epoch's last global batch holds 2 images,
# 1 per process (the reference keeps that partial batch).
NUM_TRAIN, NUM_VAL = 10, 10
COMMON = ["--preset", "ssd_tiny", "--device", "cpu", "--amp", "off", "--num-workers", "0", "--seed", "11",
          "--no-augment", "--warmup-steps", "0", "--base-lr", "0.04", "--epochs", "1", "--log-every", "1",
          "--max-train-images", str(NUM_TRAIN), "--eval-batch-size", "4", "--dist-timeout-s", "60"]
EXACTLY_ONCE = ("submission_benchmark", "submission_org", "submission_division", "submission_status",
                "submission_platform", "init_stop", "run_start", "run_stop", "train_samples", "eval_samples",
                "seed", "global_batch_size", "opt_base_learning_rate", "opt_weight_decay", "model_bn_span",
                "opt_learning_rate_warmup_steps", "opt_learning_rate_warmup_factor", "max_samples",
                "opt_learning_rate_decay_boundary_epochs", "gradient_accumulation_steps")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_coco")
    ensure_synthetic_coco(root, num_train=20, num_val=NUM_VAL, seed=7)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                      "MASTER_PORT", "SSD_FAULT_INJECT_RANK")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _launch(nproc: int, args: list[str], cwd, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    """``python -m single_stage_detector train ARGS`` on 1 process, or under torchrun on ``nproc``."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "single_stage_detector", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "single_stage_detector", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=_clean_env(**env))


def _mllog(path):
    return [json.loads(line.split(" ", 1)[1]) for line in path.read_text().splitlines() if line.startswith(":::MLLOG")]


def _model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(a: dict, b: dict, atol=2e-5, rtol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


# -- launch environment -------------------------------------------------------------------
def test_slurm_nodelist_parser():
    assert expand_slurm_nodelist("node[01-04,07],gpu5") == ["node01", "node02", "node03", "node04", "node07", "gpu5"]
    assert first_slurm_host("node[01-04,07],gpu5") == "node01"
    assert first_slurm_host("gpu5,node[01-04]") == "gpu5"
    assert first_slurm_host("dgx-a100-[009-012]") == "dgx-a100-009"
    assert first_slurm_host("single") == "single"
    assert expand_slurm_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert expand_slurm_nodelist("a[3],b[10-11]-ib") == ["a3", "b10-ib", "b11-ib"]
    for bad in ("node[01-04", "node]", "node[4-1]"):
        with pytest.raises(ValueError):
            expand_slurm_nodelist(bad)


def test_launch_env_torchrun_slurm_and_single():
    env = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
                      "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        ("torchrun", 3, 8, 3, "h0", 1234)  # torchrun wins over an enclosing SLURM allocation
    env = launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1",
                      "SLURM_JOB_NODELIST": "node[01-04,07],gpu5", "SLURM_STEP_NODELIST": "node[02-03]",
                      "SLURM_JOB_ID": "123456"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        ("slurm", 9, 16, 1, "node02", 29500 + 456)
    env = launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "gpu5", "MASTER_PORT": "4000"})
    assert (env.world_size, env.master_addr, env.master_port) == (2, "gpu5", 4000)
    env = launch_env({})
    assert (env.launcher, env.rank, env.world_size) == ("none", 0, 1)


def test_sharded_sampling_disjoint_reshuffled_and_world_size_independent():
    n, seed = 50, 5
    data = list(range(n))

    def shard(rank, world, epoch):
        loader = build_train_loader(data, 4, num_workers=0, seed=seed, rank=rank, world_size=world)
        loader.batch_sampler.set_epoch(epoch)
        return list(loader.batch_sampler)

    for world in (2, 3):
        for epoch in (1, 2):
            shards = [shard(r, world, epoch) for r in range(world)]
            assert len({len(b) for b in shards}) == 1  # the same number of steps on every rank
            flat = [i for batches in shards for b in batches for i in b]
            assert sorted(flat) == data  # every image exactly once per epoch, the last partial batch kept
            # Interleaving the shards step by step gives the single-process order: global
            # batches do not depend on the number of processes.
            merged = [b[k] for step in zip(*shards) for k in range(max(map(len, step))) for b in step if k < len(b)]
            assert merged == [i for b in shard(0, 1, epoch) for i in b]
        assert shard(0, world, 1) != shard(0, world, 2)  # reshuffled every epoch


# -- 1 process vs 2 processes, distributed evaluation, log -----------------------------------
@pytest.fixture(scope="module")
def runs(coco, tmp_path_factory):
    """One process x batch 8 and two processes x batch 4 (bn_span 8), one epoch (2 steps) each."""
    tmp = tmp_path_factory.mktemp("dist_runs")
    # Warm-up from 0 over 1 step: step 1 has lr 0 (it only fills the momentum buffer), so both
    # steps' gradients are taken at the same initial weights in both runs. With lr > 0 at step 1,
    # float32 summation-order differences (SyncBatchNorm over 2 ranks vs BatchNorm over 8) leave
    # the weights ~4e-7 apart; at step 2 that flips the odd ReLU input lying ~1e-6 from 0, which
    # gates a large, sparse detection-loss gradient: weights up to 3e-4 apart (seed-dependent),
    # although the runs agree to 1e-15 in float64. The final weights still compare both steps'
    # gradients (through the momentum), the data order, SyncBatchNorm and its running statistics.
    one_step_at_lr0 = ["--warmup-steps", "1"]
    one = _launch(1, [*COMMON, *one_step_at_lr0, "--data-dir", str(coco), "--output-dir", str(tmp / "w1"),
                      "--batch-size", "8", "--eval-every", "1"], tmp)
    assert one.returncode == 3, one.stdout[-2000:] + one.stderr[-3000:]
    two = _launch(2, [*COMMON, *one_step_at_lr0, "--data-dir", str(coco), "--output-dir", str(tmp / "w2"),
                      "--batch-size", "4", "--bn-span", "8", "--eval-every", "1"], tmp)
    assert two.returncode != 0 and "status            aborted" in two.stdout, two.stdout[-2000:] + two.stderr[-4000:]
    return tmp, one, two


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    tmp, _, _ = runs
    cfg1 = json.loads((tmp / "w1" / "config.json").read_text())["derived"]
    cfg2 = json.loads((tmp / "w2" / "config.json").read_text())["derived"]
    assert (cfg1["world_size"], cfg2["world_size"]) == (1, 2)
    assert cfg1["global_batch_size"] == cfg2["global_batch_size"] == 8
    assert cfg1["learning_rate"] == cfg2["learning_rate"] == pytest.approx(0.04 * 8 / 32)  # LR from the global batch
    assert cfg2["bn_span"] == 8
    # Every image once per epoch, with 1 and 2 processes, the last partial batch included.
    for run in ("w1", "w2"):
        metrics = [json.loads(x) for x in (tmp / run / "metrics.jsonl").read_text().splitlines()]
        assert next(m for m in metrics if m["kind"] == "epoch")["images"] == NUM_TRAIN, run
    w1, w2 = _model_state(tmp / "w1" / "checkpoint.pt"), _model_state(tmp / "w2" / "checkpoint.pt")
    init = build_model(get_preset("ssd_tiny")).state_dict()
    assert any(not torch.allclose(init[k].float(), w1[k].float()) for k in init if "running" not in k)  # it trained
    _assert_same_weights(w1, w2)  # includes the BN running statistics (SyncBatchNorm over both ranks)


def test_two_process_log_is_rank0_only_and_compliant(runs):
    tmp, _, two = runs
    log = tmp / "w2" / "mlperf.log"
    recs = _mllog(log)
    keys = [r["key"] for r in recs]
    for key in EXACTLY_ONCE:
        assert keys.count(key) == 1, key
    triples = [(r["key"], json.dumps(r["value"]), json.dumps(r.get("metadata", {}).get("epoch_num"))) for r in recs]
    assert len(triples) == len(set(triples)), "duplicated MLPerf lines"
    assert next(r for r in recs if r["key"] == "model_bn_span")["value"] == 8
    assert next(r for r in recs if r["key"] == "global_batch_size")["value"] == 8
    assert two.stdout.count(":::MLLOG") == len(recs)  # rank 1 echoes nothing either
    assert two.stdout.count("epoch 1/1 step 1/2 ") == 1  # progress printed by rank 0 only
    res = check_log(log, "1.0.0")
    assert res.ok, res.output
    ev = json.loads((tmp / "w2" / "result.json").read_text())["evaluations"][0]
    assert ev["images_per_rank"] == [5, 5] and ev["num_images"] == NUM_VAL


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL, SyncBatchNorm on GPUs)")
def test_two_gpus_with_nccl_sync_batch_norm_match_one_gpu(coco, tmp_path):
    """The CPU comparison above on GPUs: 2 processes x batch 4 over NCCL, SyncBatchNorm over
    both (bn_span 8), against 1 GPU x batch 8 (fp32, the torch input path); cuDNN's own
    summation orders loosen the tolerance."""
    gpu = [a if a != "cpu" else "cuda" for a in COMMON] + ["--warmup-steps", "1", "--data-backend", "torch",
                                                          "--eval-every", "1"]
    one = _launch(1, [*gpu, "--data-dir", str(coco), "--output-dir", str(tmp_path / "g1"), "--batch-size", "8"],
                  tmp_path)
    assert one.returncode == 3, one.stdout[-2000:] + one.stderr[-3000:]
    two = _launch(2, [*gpu, "--data-dir", str(coco), "--output-dir", str(tmp_path / "g2"), "--batch-size", "4",
                      "--bn-span", "8"], tmp_path)
    assert "status            aborted" in two.stdout, two.stdout[-2000:] + two.stderr[-4000:]
    cfg2 = json.loads((tmp_path / "g2" / "config.json").read_text())["derived"]
    assert cfg2["world_size"] == 2 and cfg2["bn_span"] == 8 and cfg2["device"].startswith("cuda")
    _assert_same_weights(_model_state(tmp_path / "g1" / "checkpoint.pt"),
                         _model_state(tmp_path / "g2" / "checkpoint.pt"), atol=2e-4, rtol=1e-3)


def _craft_checkpoint(src, dst, coco):
    """A checkpoint whose heads output their biases only: every image gets the same detections,
    default boxes (zero offsets) of all but the smallest level, scored above the 0.05 threshold
    for the classes in val. The evaluation then has many detections and a non-zero AP that
    depends on every image's ground truth, whatever the weights' initialisation."""
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ann = json.loads(find_coco_split(coco, "val2017")[1].read_text())
    labels = sorted({COCO_CATEGORY_IDS.index(a["category_id"]) + 1 for a in ann["annotations"]})
    for k, v in ckpt["model"].items():
        if not k.startswith("heads."):
            continue
        v.zero_()
        if k.endswith(".bias"):
            b = v.view(-1, 4 + 81)
            if int(k.split(".")[1]) > 0:  # level 0's many small boxes would fill the 200 per image
                b[:, [4 + lab for lab in labels]] = 3.0
            else:
                b[:, 5:] = -3.0
    torch.save(ckpt, dst)


def test_distributed_evaluation_same_ap_each_image_once(runs, coco):
    tmp, _, _ = runs
    ckpt = tmp / "eval.pt"
    _craft_checkpoint(tmp / "w1" / "checkpoint.pt", ckpt, coco)
    results = {}
    for nproc in (1, 2, 3):
        out = tmp / f"eval{nproc}"
        proc = _launch(nproc, [*COMMON, "--data-dir", str(coco), "--output-dir", str(out), "--batch-size", "4",
                               "--eval-only", "--init-checkpoint", str(ckpt), "--no-save-checkpoint",
                               "--threshold", "1e-6"], tmp)  # reached: status success, exit 0 on every rank
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        results[nproc] = json.loads((out / "result.json").read_text())["evaluations"]
    shards = {1: [10], 2: [5, 5], 3: [4, 3, 3]}
    for nproc, evs in results.items():
        assert len(evs) == 1
        ev = evs[0]
        assert ev["epoch"] == 0 and ev["images_per_rank"] == shards[nproc] and ev["num_images"] == NUM_VAL
    ref = results[1][0]
    assert ref["ap"] > 0 and ref["num_detections"] > NUM_VAL and ref["val_loss"] > 0
    for nproc in (2, 3):
        ev = results[nproc][0]
        assert ev["num_detections"] == ref["num_detections"]
        # SSD's loss is a mean over images: the image-weighted val loss does not depend on the sharding.
        assert ev["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)
        for k in ref:
            if k.startswith("coco_"):
                assert ev[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-9), k


# -- gradient accumulation ------------------------------------------------------------------
class _FrozenBNStats(SSDDetector):
    """BN layers use their running statistics in training mode (their affine weights still train)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


def test_gradient_accumulation_matches_the_large_batch(coco):
    preset = get_preset("ssd_tiny")
    image_dir, ann = find_coco_split(coco, "train2017")
    ds = CocoDetection(image_dir, ann, transform=SSDEvalTransform(preset.input_size), skip_empty=True)
    samples = [ds[i] for i in range(16)]
    torch.manual_seed(0)
    base = _FrozenBNStats(build_model(preset), preset.box_spec)
    runs = {}
    for batch, accum in ((8, 1), (4, 2)):
        det = copy.deepcopy(base)
        opt = torch.optim.SGD(det.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        loader = [collate_detection(samples[i:i + batch]) for i in range(0, 16, batch)]
        stats = train_one_epoch(det, opt, loader, epoch=1, num_epochs=1, start_step=0,
                                schedule=LRSchedule(0.01, 0, 0.0, (), 0.1, 2), amp=AmpSettings.resolve("off", torch.device("cpu")),
                                scaler=None, info=DistInfo(), accumulation_steps=accum, log_every=100,
                                steps_per_epoch=2)
        assert stats.steps == 2 and stats.images == 16
        runs[(batch, accum)] = det.state_dict()
    assert any(not torch.equal(base.state_dict()[k], runs[(8, 1)][k]) for k in runs[(8, 1)])
    _assert_same_weights(runs[(8, 1)], runs[(4, 2)], atol=1e-6, rtol=1e-5)


# -- failure of one rank --------------------------------------------------------------------
def test_one_failing_rank_ends_the_launch(coco, tmp_path):
    t0 = time.monotonic()
    proc = _launch(2, [*COMMON, "--data-dir", str(coco), "--output-dir", str(tmp_path / "fault"), "--batch-size", "4",
                       "--eval-every", "1"], tmp_path, timeout=180, SSD_FAULT_INJECT_RANK="1")
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "fault injected on rank 1 at step 1" in out, out[-4000:]
    assert elapsed < 150
    recs = _mllog(tmp_path / "fault" / "mlperf.log")
    assert [r["metadata"]["status"] for r in recs if r["key"] == "run_stop"] in ([], ["aborted"])


# -- BatchNorm running statistics before evaluation ------------------------------------------
_BN_WORKER = r'''
import sys
import torch
from single_stage_detector.data.coco import COCO_CATEGORY_IDS, CocoDetection, find_coco_split
from single_stage_detector.data.loader import build_eval_loader
from single_stage_detector.data.transforms import SSDEvalTransform
from single_stage_detector.detector import SSDDetector
from single_stage_detector.distributed import init_distributed, shutdown
from single_stage_detector.engine import AmpSettings, evaluate
from single_stage_detector.evaluation import CocoEvaluator
from single_stage_detector.models import build_model, get_preset

coco, out = sys.argv[1], sys.argv[2]
info = init_distributed("cpu", 60)
preset = get_preset("ssd_tiny")
torch.manual_seed(0)  # the same weights on both ranks ...
detector = SSDDetector(build_model(preset), preset.box_spec)
val_dir, val_ann = find_coco_split(coco, "val2017")
dataset = CocoDetection(val_dir, val_ann, transform=SSDEvalTransform(preset.input_size))
# ... but BN running statistics from different data (plain BN, no DDP buffer broadcast).
detector.train()
with torch.no_grad():
    detector.model(torch.stack([dataset[i].image for i in range(info.rank * 4, info.rank * 4 + 4)]) * (1 + info.rank))
bn = lambda: {k: v.clone() for k, v in detector.state_dict().items() if "running_" in k}
before = bn()
loader = build_eval_loader(dataset, 4, num_workers=0, rank=info.rank, world_size=info.world_size)
result = evaluate(detector, loader, CocoEvaluator(val_ann) if info.is_main else None,
                  torch.tensor([0] + list(COCO_CATEGORY_IDS)), amp=AmpSettings.resolve_eval("auto", info.device),
                  info=info)
torch.save({"before": before, "after": bn(), "ap": result.ap,
            "images_per_rank": getattr(result, "images_per_rank", None)}, f"{out}/rank{info.rank}.pt")
shutdown()
'''


def test_bn_running_stats_are_averaged_before_evaluation(coco, tmp_path):
    """2 gloo processes whose BN running statistics differ: after ``evaluate`` both hold the
    same statistics, their mean (the reference's all-reduce), and rank 0 scored the AP."""
    script = tmp_path / "bn_worker.py"
    script.write_text(_BN_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(coco), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=240, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["before"].keys() == r1["before"].keys() and len(r0["before"]) > 10
    assert all(not torch.allclose(r0["before"][k], r1["before"][k]) for k in r0["before"])
    for k in r0["before"]:
        assert torch.equal(r0["after"][k], r1["after"][k]), k  # every rank evaluates the same model
        torch.testing.assert_close(r0["after"][k], (r0["before"][k] + r1["before"][k]) / 2)
    assert r0["ap"] >= 0.0 and r0["images_per_rank"] == [NUM_VAL // 2, NUM_VAL // 2]


def test_ddp_wrapper_keeps_rank_local_buffers_without_a_deprecation_warning(tmp_path):
    """torch 2.14 warns that `broadcast_buffers` is deprecated, on every rank of every run; the
    harness needs it (rank-local BN statistics), so the wrapper builds DDP without the warning."""
    import warnings

    import torch.distributed as dist

    from single_stage_detector.train import _wrap_ddp

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ddp = _wrap_ddp(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), torch.device("cpu"))
        assert ddp.broadcast_buffers is False
    finally:
        dist.destroy_process_group()
