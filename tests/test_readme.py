"""The README, command by command, as a new user runs it, in a fresh copy of the repository.

Every command of the README's ``bash`` blocks is either run (as written, or with flags
appended that shrink a training run where the command takes trainer flags) or skipped for a
stated reason (GPU, Docker, SLURM, internet, the real COCO, or this suite itself). A command
added to the README without an entry in ``PLAN`` fails the test. The trained demo comes from
the session's ``demo_run`` (the ``demo`` command itself; ``make demo`` is exercised by
tests/test_tools.py). Every script also answers ``-h`` with its usage, exit status 0, and
leaves no file behind.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Trainer flags that turn a CPU-demo trial into a seconds-long one (it ends "aborted": the
# run is too short to reach the target; exit status 3 from run_and_time.sh).
SHORT = ("--max-train-images 32 --max-eval-images 8 --epochs 1 --eval-start 1 --batch-size 16 "
         "--num-workers 0 --warmup-steps 1 --no-check-images")
ABORTED = 3
BENCH_SHORT = "--batch-size 2 --warmup 0 --iters 1"

# README command (comment stripped, continuation lines joined) -> what the test does:
# ("run", appended flags, expected exit status) or ("skip", reason).
PLAN = {
    "make demo": ("skip", "the demo itself runs in the demo_run fixture; make demo in tests/test_tools.py"),
    "make test": ("skip", "this test suite"),
    ".venv/bin/python -m mlperf_logging.compliance_checker --usage training --ruleset 1.0.0 "
    "--log_output output/demo/compliance_checker.log output/demo/mlperf.log": ("run", "", 0),
    "DATADIR=/data ./init_datasets.sh": ("skip", "internet: downloads COCO (~40 GB)"),
    "OUTDIR=/data scripts/get_resnet34_backbone.sh": ("skip", "internet: downloads the ImageNet weights"),
    ".venv/bin/python scripts/verify_dataset.py /data --expect coco2017": ("skip", "needs the real COCO"),
    ".venv/bin/torchrun --standalone --nproc_per_node 8 -m single_stage_detector train": ("skip", "8 GPUs"),
    "./setup.sh": ("skip", "Docker"),
    "./setup.sh -t ssd:v1": ("skip", "Docker"),
    "DATADIR=/raid/ssd ./init_datasets.sh": ("skip", "internet: downloads COCO"),
    "OUTDIR=/raid/ssd scripts/get_resnet34_backbone.sh": ("skip", "internet: downloads the ImageNet weights"),
    "set -a; . configs/config_CPU.sh; set +a; scripts/run_and_time.sh": ("run", SHORT, ABORTED),
    "set -a; DGXNGPU=2; . configs/config_CPU.sh; set +a; scripts/run_and_time.sh": ("run", SHORT, ABORTED),
    "set -a; NEXP=5; . configs/config_CPU.sh; set +a; scripts/run_and_time.sh": ("run", SHORT, ABORTED),
    "python -m single_stage_detector score output/results": ("run", "", 0),
    "set -a; . configs/config_DGXA100.sh; set +a; DATADIR=/raid/ssd scripts/run_and_time.sh": ("skip", "8 GPUs"),
    "python -m mlperf_logging.compliance_checker --usage training --ruleset 1.0.0 "
    '--log_output "${LOGDIR}/compliance_checker.log" "${LOGDIR}/${DATESTAMP}_1.log"': ("run", "", 0),
    "torchrun --standalone --nproc_per_node 8 -m single_stage_detector train": ("skip", "8 GPUs"),
    "srun --nodes": ("skip", "SLURM"),
    'torchrun --nnodes "$DGXNNODES"': ("skip", "several GPU nodes"),
    'pip install -e ".[dali]"': ("skip", "internet"),
    "python -m single_stage_detector train --data-dir /data/coco2017 --data-backend dali ...": (
        "skip", "needs the real COCO"),
    "python -m single_stage_detector check-logs output/demo/mlperf.log": ("run", "", 0),
    "python -m single_stage_detector plot output/demo": ("run", "", 0),
    "python -m single_stage_detector plot output/results": ("run", "", 0),
    "python -m single_stage_detector show-detections output/demo/checkpoint.pt": ("run", "", 0),
    "python -m single_stage_detector benchmark --preset ssd300_resnet34 --batch-size 114": ("skip", "a GPU"),
    "python -m single_stage_detector benchmark --parts data --data-backends torch dali --num-workers 8": (
        "run", BENCH_SHORT, 0),
    "python -m single_stage_detector benchmark --parts components": ("run", BENCH_SHORT, 0),
    "python -m single_stage_detector benchmark --parts data --photos --num-workers 2": ("run", BENCH_SHORT, 0),
    "make demo PRESET=yolov3_tiny_cpu": ("skip", "the YOLOv3 demo to its target: tests/test_yolo_demo.py "
                                                 "(make test-demos)"),
    "make test-demos": ("skip", "the tests marked demo (the YOLOv1, YOLOv2, YOLOv3 and DALI demos to their targets), "
                                "run apart"),
    "python -m single_stage_detector check-logs output/demo-yolov3_tiny_cpu/mlperf.log": (
        "skip", "needs the YOLOv3 demo's output; its log is checked in tests/test_yolo_demo.py"),
    "python -m single_stage_detector kmeans-anchors data/synthetic/annotations/instances_train2017.json --num 9 "
    "--input-size 128": ("run", "", 0),
    "python -m single_stage_detector darknet-weights import yolov3.weights -o yolov3.pt": (
        "skip", "internet: the published YOLOv3 weights (the round trip is in tests/test_yolo_harness.py)"),
    "python -m single_stage_detector evaluate yolov3.pt --data-dir /data/coco2017": (
        "skip", "needs the real COCO and the published weights"),
    "python -m single_stage_detector predict photos/ --checkpoint output/demo-yolov3_tiny_cpu/checkpoint.pt": (
        "skip", "needs the YOLOv3 demo's checkpoint; predict runs in tests/test_yolo_harness.py"),
    "python -m single_stage_detector benchmark --preset yolov3_darknet53": (
        "skip", "a GPU command (minutes per step on 2 cores); the YOLO benchmark runs in tests/test_yolo_harness.py"),
    "make demo PRESET=yolov1_tiny_cpu": ("skip", "the YOLOv1 demo to its target: tests/test_yolo_demo.py "
                                                 "(make test-demos)"),
    "python -m single_stage_detector demo --preset yolov1_tiny_cpu --anchors kmeans:2 "
    "--output-dir output/demo-yolov1-anchors": ("run", SHORT, ABORTED),
    "python -m single_stage_detector check-logs output/demo-yolov1_tiny_cpu/mlperf.log": (
        "skip", "needs the YOLOv1 demo's output; its log is checked in tests/test_yolo_demo.py"),
    "python -m single_stage_detector train --preset yolov1_resnet34 --data-dir /data/coco2017": (
        "skip", "needs the real COCO, the ImageNet weights and a GPU"),
    "make demo PRESET=yolov2_tiny_cpu": ("skip", "the YOLOv2 demo to its target: tests/test_yolo_demo.py "
                                                 "(make test-demos)"),
    "python -m single_stage_detector evaluate output/demo-yolov2_tiny_cpu/checkpoint.pt --input-sizes 96 128 160": (
        "skip", "needs the YOLOv2 demo's checkpoint; evaluate --input-sizes runs in tests/test_yolov2_harness.py"),
    "python -m single_stage_detector kmeans-anchors data/synthetic/annotations/instances_train2017.json --num 5 "
    "--input-size 128 --units grid": ("run", "", 0),
    "python -m single_stage_detector train --preset yolov2_resnet50 --pretrained-backbone resnet50-0676ba61.pth": (
        "skip", "needs the real COCO, a GPU and torchvision's ImageNet weights"),
    "python -m single_stage_detector evaluate output/run/checkpoint.pt --input-sizes 320 416 512 544 608": (
        "skip", "needs a COCO-trained checkpoint and the real COCO"),
    "make wheelhouse PY=3.12": ("skip", "internet: downloads wheels"),
    "WHEELHOUSE=wheelhouse make gpu-check OUT=output/gpu_check": (
        "skip", "needs the wheel folder of make wheelhouse; the check runs on the CPU in tests/test_gpu_check.py"),
}

SCRIPTS = ["setup.sh", "init_datasets.sh", "run_with_docker.sh", "run.sub", "scripts/run_and_time.sh",
           "scripts/get_resnet34_backbone.sh", "scripts/prepare-json.py", "scripts/torch_to_numpy.py",
           "scripts/verify_dataset.py", "scripts/gpu_check.sh", "scripts/make_wheelhouse.sh"]


def readme_commands(text: str) -> list[str]:
    """The commands of the ``bash`` blocks: continuation lines joined, comments stripped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def plan_for(command: str):
    """The PLAN entry whose key is the command or starts it (for long GPU command lines)."""
    if command in PLAN:
        return PLAN[command]
    keys = [k for k in PLAN if PLAN[k][0] == "skip" and command.startswith(k)]
    return PLAN[keys[0]] if keys else None


def fresh_copy(dest: Path) -> Path:
    """The repository's tracked files (as they are in the working tree), like a fresh clone,
    with a `.venv/bin/python` and `python` on PATH that are the interpreter running the tests."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    bin_dir = dest / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "python3"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    return dest


def user_env(repo: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DGX", "SLURM_", "MLPERF_")) and k not in (
               "EXTRA_PARAMS", "DATADIR", "LOGDIR", "NEXP", "SEED", "RUN_NAME", "DATESTAMP", "PYTHON")}
    env["PATH"] = f"{repo / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"  # an activated venv
    env["PYTHONPATH"] = str(repo)  # this copy's package, whatever the venv has installed
    env.update(extra)
    return env


def test_every_readme_command_has_a_plan():
    commands = readme_commands((REPO / "README.md").read_text())
    assert len(commands) >= 20
    missing = [c for c in commands if plan_for(c) is None]
    assert not missing, f"README commands without an entry in PLAN: {missing}"


def test_walk_the_readme(demo_run, tmp_path):
    assert demo_run["proc"].returncode == 0, demo_run["proc"].stdout[-2000:] + demo_run["proc"].stderr[-2000:]
    repo = fresh_copy(tmp_path / "repo")
    # The demo as `make demo` leaves it: output/demo and its dataset in data/synthetic.
    shutil.copytree(demo_run["out"], repo / "output" / "demo")
    (repo / "data").mkdir()
    (repo / "data" / "synthetic").symlink_to(demo_run["data"])
    env = user_env(repo, DATESTAMP="trial", LOGDIR=str(repo / "output" / "results"))
    ran = []
    launches = 0
    for command in readme_commands((REPO / "README.md").read_text()):
        plan = plan_for(command)
        if plan[0] == "skip":
            continue
        _, extra, expected = plan
        full = f"{command} {extra}".strip()
        # Each launcher command names its trials trial<k>_<i>; the checker command reads trial0_1.
        step_env = env
        if "${DATESTAMP}" in command:
            step_env = {**env, "DATESTAMP": "trial0"}
        if "run_and_time.sh" in command:
            step_env = {**env, "DATESTAMP": f"trial{launches}"}
            launches += 1
        proc = subprocess.run(["bash", "-c", full], cwd=repo, env=step_env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == expected, f"{full}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{full}\n{proc.stderr[-3000:]}"
        ran.append((command, proc))
    assert {c for c, _ in ran} == {k for k, p in PLAN.items() if p[0] == "run"}
    out = dict((c, p.stdout) for c, p in ran)
    # The synthetic dataset was generated once, by the demo, and said so; the trials reuse it.
    assert "generated the synthetic dataset in" in demo_run["proc"].stdout
    assert not any("generated the synthetic dataset" in p.stdout for _, p in ran)

    # The checker command leaves its own log where it was told, not in the working folder.
    assert not (repo / "compliance_checker.log").exists()
    assert (repo / "output" / "demo" / "compliance_checker.log").is_file()
    # Seven trials: 1 + 1 (two processes) + 5, each a log, a console copy and a run folder.
    results = repo / "output" / "results"
    logs = sorted(results.glob("*.log"))
    names = [p.stem for p in logs if p.name != "compliance_checker.log"]
    assert names == ["trial0_1", "trial1_1", "trial2_1", "trial2_2", "trial2_3", "trial2_4", "trial2_5"]
    for name in names:
        assert (results / f"{name}.out").is_file() and (results / name / "metrics.jsonl").is_file()
    five = out["set -a; NEXP=5; . configs/config_CPU.sh; set +a; scripts/run_and_time.sh"]
    assert five.count("RESULT,SINGLE_STAGE_DETECTOR") == 5 and "=== trial 5/5" in five
    seeds = [re.search(r'"key": "seed", "value": (\d+)', (results / f"trial2_{i}.log").read_text()).group(1)
             for i in range(1, 6)]
    assert len(set(seeds)) == 5, seeds  # independent trials
    score = out["python -m single_stage_detector score output/results"]
    for name in names:
        assert re.search(rf"^{name}\.log\s+aborted\s+no\b", score, re.M), score
    assert "MLPerf score: none" in score and "note: an MLPerf score needs 5 runs, got 7" in score
    # plot on the launchers' layout: per-run charts with loss and LR read from LOGDIR/RUN/.
    from single_stage_detector.tools.plots import load_run

    plot = out["python -m single_stage_detector plot output/results"]
    assert "no metrics.jsonl" not in plot
    for name in names:
        assert (results / "plots" / name / "metrics_vs_time.png").is_file()
        curves = load_run(results / f"{name}.log")  # what the loss and LR panels drew
        assert any("loss" in r for r in curves.train) and any("lr" in r for r in curves.train), name
    assert (results / "plots" / "overlay.png").is_file()
    assert (repo / "output" / "demo" / "plots" / "loss_map.png").is_file()
    assert (repo / "output" / "demo" / "detections.png").is_file()
    # Nothing was written into the repository outside output/ and data/.
    stray = [p.name for p in repo.iterdir() if p.name not in {".venv", "output", "data"}
             and not (REPO / p.name).exists()]
    assert not stray, stray


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_and_does_nothing_else(script, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    status = ["git", "status", "--porcelain", "--untracked-files=all"]
    before = subprocess.run(status, cwd=REPO, capture_output=True, text=True).stdout
    cmd = [sys.executable, str(REPO / script), "-h"] if script.endswith(".py") else ["bash", str(REPO / script), "-h"]
    env = user_env(REPO)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) >= 3, proc.stdout  # a usage text, not one stray line
    assert "RESULT," not in proc.stdout and "error" not in proc.stderr.lower(), proc.stdout + proc.stderr
    assert list(work.iterdir()) == []
    assert subprocess.run(status, cwd=REPO, capture_output=True, text=True).stdout == before
