"""The GPU check (scripts/gpu_check.sh): on a machine without a GPU every step is reported,
the CUDA ones as skipped; what it would run on a GPU is accepted by the CLI; a step that
hangs or does not fit the budget is reported as failed."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from single_stage_detector.__main__ import build_parser
from single_stage_detector.benchmark import MODES
from single_stage_detector.gpu_check import BENCHMARK_MODES, Settings, _run, plan_commands

REPO = Path(__file__).resolve().parent.parent
# Written out (not imported from the module): a step dropped from the check fails here.
EXPECTED_STEPS = ["environment", "cuda_tests", "benchmark_fp32", "benchmark_bf16", "benchmark_bf16-cl",
                  "benchmark_fp16-cl", "benchmark_bf16-cl-graphs", "inference", "training_run",
                  "training_log_check", "dali_gpu", "benchmark_bf16-cl-compile"]


def _gpu_check(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # No GPU visible, even on a GPU machine: the CPU behaviour is what is tested here.
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("WHEELHOUSE", None)
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=out.parent)


def test_on_the_cpu_every_step_is_reported(tmp_path):
    out = tmp_path / "check"
    proc = _gpu_check(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert [s["name"] for s in steps] == EXPECTED_STEPS
    assert steps[0]["status"] == "passed" and steps[0]["details"]["torch"]
    for s in steps[1:]:
        assert s["status"] == "skipped" and s["reason"].startswith("needs CUDA: no GPU is visible"), s
    assert report["ok"] and report["failed"] == [] and report["gpu"] is None
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: no GPU (")
    for name in EXPECTED_STEPS:
        assert f"| {name} | {'passed' if name == 'environment' else 'skipped'} |" in md
    assert "1 passed, 11 skipped, 0 failed" in proc.stdout


def test_smoke_run_measures_on_the_cpu_and_a_spent_budget_fails(tmp_path):
    """--smoke runs the steps that can run on the CPU at toy sizes, through the same code that
    reads their figures on a GPU; steps that no longer fit the budget fail, named."""
    out = tmp_path / "smoke"
    proc = _gpu_check(out, "--smoke", "--only", "benchmark_fp32", "inference")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = {s["name"]: s for s in json.loads((out / "gpu_check.json").read_text())["steps"]}
    assert list(steps) == EXPECTED_STEPS
    for name in ("benchmark_fp32", "inference"):
        d = steps[name]["details"]
        assert steps[name]["status"] == "passed" and d["images_per_s"] > 0 and d["ms_per_step"] > 0, steps[name]
    assert steps["benchmark_fp32"]["details"]["vs_fp32"] == 1.0
    fp32 = steps["benchmark_fp32"]["details"]["settings"]
    assert fp32["mode"] == "fp32" and fp32["precision"] == "fp32" and not fp32["channels_last"]
    assert not fp32["fused_sgd"] and not fp32["compile"] and not fp32["cuda_graphs"]
    assert steps["benchmark_bf16-cl-graphs"]["status"] == "skipped"  # CUDA only, even in a smoke run
    assert steps["training_run"]["reason"] == "not selected (--only)"
    assert "| fp32 |" in (out / "gpu_check.md").read_text()

    spent = tmp_path / "spent"
    proc = _gpu_check(spent, "--smoke", "--only", "benchmark_fp32", "--budget-s", "0")
    assert proc.returncode == 1
    assert "FAILED: benchmark_fp32" in proc.stderr
    step = next(s for s in json.loads((spent / "gpu_check.json").read_text())["steps"] if s["name"] == "benchmark_fp32")
    assert step["status"] == "failed" and "not run" in step["reason"]


def test_a_hanging_step_is_killed_with_its_children(tmp_path):
    t0 = time.monotonic()
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")
    rc, _ = _run(["-c", code], tmp_path / "hang.log", timeout_s=3)
    assert rc is None and time.monotonic() - t0 < 30


def test_the_gpu_commands_are_accepted_by_the_cli(tmp_path):
    """Every command the check runs on a GPU parses with the real CLI (a typo would cost the GPU run)."""
    cmds = plan_commands(tmp_path, Settings())
    assert set(BENCHMARK_MODES) == set(MODES)
    parser = build_parser()
    for name, argv in cmds.items():
        if argv[:2] == ["-m", "single_stage_detector"]:
            args = parser.parse_args(argv[2:])
            assert getattr(args, "device", "cuda") == "cuda", name
        else:
            assert argv[:4] == ["-m", "pytest", "-m", "cuda"]
            files = argv[argv.index("-rs") + 1:]
            assert "tests/test_fast_path.py" in files and "tests/test_box_coder.py" in files
    bench = parser.parse_args(cmds["benchmark_bf16-cl-graphs"][2:])
    assert bench.batch_size == 114 and bench.preset == "ssd300_resnet34" and bench.mode == "bf16-cl-graphs"
    train = parser.parse_args(cmds["training_run"][2:])
    assert train.preset == "ssd300_resnet34" and train.division == "closed" and train.epochs == 4


def test_the_environment_is_read_in_a_child_and_names_what_steps_depend_on(tmp_path):
    """The environment comes from a child process (the check itself never holds a CUDA context);
    it names the precision of float32 convolutions (the ``fp32`` rows time TF32 convolutions on
    Ampere and later GPUs, torch's default), the scorers' versions, the free shared memory of
    the loader workers and the C compiler ``torch.compile`` needs."""
    import shutil

    import pytest
    import torch

    from single_stage_detector.gpu_check import _environment_in_child

    env = _environment_in_child(tmp_path / "environment.log")
    assert env["conv_fp32_precision"] in ("tf32", "ieee")
    assert "faster_coco_eval" in env and "pycocotools" in env
    assert env["torch"] == torch.__version__ and env["cuda"] == torch.cuda.is_available()
    assert env["shm_free_gib"] == pytest.approx(shutil.disk_usage("/dev/shm").free / 2**30, abs=0.5)
    assert (env["c_compiler"] is not None) == any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    assert isinstance(env["python_headers"], bool)
    assert "print(json.dumps(environment()))" in (tmp_path / "environment.log").read_text()
