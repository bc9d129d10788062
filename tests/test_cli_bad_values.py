"""Every subcommand with bad values: one line on stderr naming the flag or the file, exit status
2, no traceback; and the CLI's start-up and help.

A few cases run as real processes (what a user sees, exit status included; forked by
``cli_runner`` from a process that has imported torch already); the others call the same
entry point in this process. Files of the wrong kind: a
text file, a folder, a torch file that is not a checkpoint.
"""
import argparse
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cli_runner import run_cli

CLI = [sys.executable, "-m", "single_stage_detector"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Stand-ins for the files the commands take: wrong kinds and missing ones."""
    import torch

    root = tmp_path_factory.mktemp("bad_values")
    (root / "notes.log").write_text("not an MLPerf log\n")
    (root / "folder").mkdir()
    torch.save({"weights": 1}, root / "other.pt")
    return root


# (id, arguments with {d} = the files folder, what the one line must name)
CASES = [
    ("train-unknown-preset", "train --preset foo --data-dir {d}/folder", "--preset"),
    ("train-unknown-device", "train --device tpu --data-dir {d}/folder", "--device"),
    ("train-backbone-for-tiny", "train --preset ssd_tiny --pretrained-backbone {d}/other.pt --data-dir {d}/folder",
     "--pretrained-backbone"),
    ("train-init-checkpoint-kind", "train --preset ssd_tiny --init-checkpoint {d}/notes.log --data-dir {d}/folder",
     "--init-checkpoint"),
    ("train-init-checkpoint-missing", "train --preset ssd_tiny --init-checkpoint {d}/none.pt --data-dir {d}",
     "{d}/none.pt"),
    ("train-tensorboard-dir-file", "train --preset ssd_tiny --data-dir {d}/folder --output-dir {d}/tb_run "
     "--tensorboard-dir {d}/notes.log", "--tensorboard-dir"),
    ("train-output-dir-file", "train --preset ssd_tiny --data-dir {d}/folder --output-dir {d}/notes.log",
     "--output-dir {d}/notes.log is a file, not a folder"),
    ("train-type", "train --epochs many", "--epochs"),
    ("train-unknown-flag", "train --no-such-flag", "--no-such-flag"),
    ("train-range", "train --batch-size 0 --data-dir {d}/folder", "--batch-size"),
    ("train-val-loss", "train --val-loss sometimes --data-dir {d}/folder", "--val-loss"),
    ("train-async-eval", "train --async-eval later --data-dir {d}/folder", "--async-eval"),
    ("train-coco-eval", "train --coco-eval fast --data-dir {d}/folder", "--coco-eval"),
    ("train-cuda-graphs-compile", "train --cuda-graphs --compile --data-dir {d}/folder", "--cuda-graphs"),
    ("train-anchors-value", "train --preset yolov1_tiny_cpu --anchors kmeans:0 --data-dir {d}/folder", "--anchors"),
    ("train-anchors-other-family", "train --preset ssd_tiny --anchors kmeans:5 --data-dir {d}/folder", "--anchors"),
    ("train-confidence-target", "train --preset yolov1_tiny_cpu --confidence-target two --data-dir {d}/folder",
     "--confidence-target"),
    ("train-class-weights", "train --preset yolov1_tiny_cpu --class-weights sqrt --data-dir {d}/folder",
     "--class-weights"),
    ("demo-unknown-device", "demo --device tpu", "--device"),
    ("demo-unknown-preset", "demo --preset foo", "--preset"),
    ("benchmark-unknown-preset", "benchmark --preset foo", "--preset"),
    ("benchmark-unknown-device", "benchmark --device tpu", "--device"),
    ("benchmark-range", "benchmark --iters 0", "--iters"),
    ("benchmark-choice", "benchmark --parts everything", "--parts"),
    ("benchmark-cuda-graphs-fp16", "benchmark --cuda-graphs --amp fp16", "--cuda-graphs"),
    ("benchmark-cuda-graphs-cpu", "benchmark --preset ssd_tiny --device cpu --cuda-graphs --parts eval",
     "--cuda-graphs"),
    ("benchmark-mode-graphs-cpu", "benchmark --preset ssd_tiny --device cpu --mode bf16-cl-graphs --parts eval",
     "--mode bf16-cl-graphs"),
    ("benchmark-components-yolo", "benchmark --preset yolov3_tiny_cpu --parts components", "--parts components"),
    ("train-device-index", "train --device cuda:99 --data-dir {d}/folder", "--device cuda:99"),
    ("evaluate-missing", "evaluate {d}/none.pt", "{d}/none.pt"),
    ("evaluate-log-as-checkpoint", "evaluate {d}/notes.log", "{d}/notes.log"),
    ("evaluate-folder-as-checkpoint", "evaluate {d}/folder", "{d}/folder"),
    ("evaluate-other-torch-file", "evaluate {d}/other.pt", "{d}/other.pt"),
    ("evaluate-unknown-device", "evaluate {d}/other.pt --device tpu", "--device"),
    ("evaluate-range", "evaluate {d}/other.pt --batch-size 0", "--batch-size"),
    ("evaluate-coco-eval", "evaluate {d}/other.pt --coco-eval fast", "--coco-eval"),
    ("evaluate-input-sizes", "evaluate {d}/other.pt --input-sizes 416 300", "--input-sizes"),
    ("show-detections-missing", "show-detections {d}/none.pt", "{d}/none.pt"),
    ("show-detections-log", "show-detections {d}/notes.log", "{d}/notes.log"),
    ("show-detections-range", "show-detections {d}/other.pt --cols 0", "--cols"),
    ("make-synthetic-dataset-file", "make-synthetic-dataset {d}/notes.log", "{d}/notes.log"),
    ("make-synthetic-dataset-range", "make-synthetic-dataset {d}/s --train-images 0", "--train-images"),
    ("check-logs-missing", "check-logs {d}/none.log", "{d}/none.log"),
    ("check-logs-empty-folder", "check-logs {d}/folder", "{d}/folder"),
    ("check-logs-ruleset", "check-logs {d}/notes.log --ruleset 9.9.9", "--ruleset"),
    ("score-missing", "score {d}/none.log", "{d}/none.log"),
    ("score-empty-folder", "score {d}/folder", "{d}/folder"),
    ("score-not-a-log", "score {d}/notes.log", "{d}/notes.log: not an MLPerf log"),
    ("package-missing", "package {d}/none.log", "{d}/none.log"),
    ("package-system-json-missing", "package {d}/notes.log --system-json {d}/none.json", "--system-json"),
    ("plot-missing", "plot {d}/none.log", "{d}/none.log"),
    ("plot-empty-folder", "plot {d}/folder", "{d}/folder"),
    ("plot-not-a-log", "plot {d}/notes.log", "{d}/notes.log: not an MLPerf log"),
    ("predict-missing-image", "predict {d}/none.jpg --checkpoint {d}/other.pt", "{d}/none.jpg"),
    ("predict-empty-folder", "predict {d}/folder --checkpoint {d}/notes.log", "{d}/folder"),
    ("darknet-weights-missing", "darknet-weights import {d}/none.weights -o {d}/x.pt", "{d}/none.weights"),
    ("darknet-weights-not-weights", "darknet-weights import {d}/notes.log -o {d}/x.pt", "{d}/notes.log"),
    ("darknet-weights-export-log", "darknet-weights export {d}/notes.log -o {d}/x.weights", "{d}/notes.log"),
    ("kmeans-anchors-missing", "kmeans-anchors {d}/none.json", "{d}/none.json"),
    ("kmeans-anchors-not-json", "kmeans-anchors {d}/notes.log", "{d}/notes.log"),
    ("kmeans-anchors-range", "kmeans-anchors {d}/notes.log --num 0", "--num"),
]


# Real processes for these (one per kind of failure: preset, a rule checked inside the run,
# a file of the wrong kind, a missing file, an argparse choice).
IN_SUBPROCESS = {"train-unknown-preset", "train-range", "evaluate-log-as-checkpoint", "check-logs-missing",
                 "benchmark-choice"}


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
    return run_cli(args, cwd=cwd, timeout=300)


def _run_here(args: list[str], capsys) -> subprocess.CompletedProcess:
    """``main(args)`` in this process, as a CompletedProcess (argparse's exit included)."""
    from single_stage_detector.__main__ import main

    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_bad_values_of_every_subcommand(files, capsys, monkeypatch):
    from single_stage_detector.__main__ import build_parser

    commands = {name for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
                for name in a.choices}
    assert commands == {c[1].split()[0] for c in CASES}, "every subcommand needs a bad-value case"
    assert IN_SUBPROCESS <= {c[0] for c in CASES}
    d = str(files)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c[0]: pool.submit(_run, c[1].format(d=d).split(), files) for c in CASES if c[0] in IN_SUBPROCESS}
        monkeypatch.chdir(files)
        procs = [futures[c[0]].result() if c[0] in IN_SUBPROCESS else _run_here(c[1].format(d=d).split(), capsys)
                 for c in CASES]
    failures = []
    for (name, _, names), proc in zip(CASES, procs):
        lines = proc.stderr.strip().splitlines()
        ok = (proc.returncode == 2 and len(lines) == 1 and "error" in lines[0]
              and names.format(d=d) in lines[0] and "Traceback" not in proc.stderr + proc.stdout)
        if not ok:
            failures.append(f"{name}: exit {proc.returncode}, stderr {proc.stderr[-600:]!r}")
    assert not failures, "\n".join(failures)
    assert not (files / "s").exists()  # refused before anything was written
    assert not (files / "tb_run" / "mlperf.log").exists()


def test_a_file_that_is_no_checkpoint_gets_its_cause_not_torch_advice(files):
    """torch's weights-only unpickler wraps the cause in advice to re-run with weights_only=False,
    which the one line must not repeat (nor cut off mid-sentence)."""
    from single_stage_detector.config import ConfigError
    from single_stage_detector.tools.cli import load_checkpoint_arg

    with pytest.raises(ConfigError) as e:
        load_checkpoint_arg(str(files / "notes.log"))
    message = str(e.value)
    assert message.startswith(f"{files / 'notes.log'} is not a readable checkpoint of `train`"), message
    assert "weights_only" not in message and message.endswith(")") and "UnpicklingError: " in message, message


def test_check_logs_explains_a_non_mlperf_log(files):
    proc = _run(["check-logs", str(files / "notes.log")], files)
    assert proc.returncode == 1
    assert "not an MLPerf log: no ':::MLLOG' lines" in proc.stdout and "submission_org" not in proc.stdout


def test_help_is_fast_and_lists_every_command_on_one_line():
    from single_stage_detector.__main__ import build_parser

    _run(["--help"], None)  # warm the file cache (a loaded machine still answers well under 1 s)
    start = time.perf_counter()
    proc = _run(["--help"], None)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and elapsed < 1.0, elapsed
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        assert re.search(rf"^    {re.escape(name)} +\S", proc.stdout, re.M), f"{name} not on one line"
    # No heavy import at start-up.
    code = ("import sys; from single_stage_detector.__main__ import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'nvidia.dali', 'numpy') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_every_flag_has_help_and_one_shown_default():
    from single_stage_detector.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    problems = []
    for name, parser in sub.choices.items():
        parser.format_help()  # fills in the lazily added flags
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                problems.append(f"{name} {action.dest}: no help")
                continue
            text = formatter._expand_help(action)
            if action.option_strings and text.count("default") < 1:
                problems.append(f"{name} {action.option_strings[0]}: no default shown")
            if text.count("(default") > 1:
                problems.append(f"{name} {action.option_strings[0]}: default shown twice: {text}")
        if "``" in parser.format_help():
            problems.append(f"{name}: reStructuredText markup (``) in its help")
    assert not problems, "\n".join(problems)


def test_list_flags_name_what_they_take():
    """A list flag's metavar says what each value is (not N for anchor specs, sides and betas)."""
    from single_stage_detector.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["train"].format_help()
    for usage in ("--anchors SPEC [SPEC ...]", "--multi-scale SIDE [SIDE ...]", "--adam-betas BETA [BETA ...]",
                  "--lr-decay-epochs EPOCH [EPOCH ...]", "--eval-epochs EPOCH [EPOCH ...]"):
        assert usage in text, usage


def test_warmup_longer_than_the_run_gets_a_hint(capsys):
    from single_stage_detector.__main__ import _warmup_hint
    from single_stage_detector.config import TrainConfig

    _warmup_hint(TrainConfig(data_dir="d", max_train_images=64, batch_size=8, epochs=2))  # 16 steps < 300
    assert "--warmup-steps 300 is at least the whole run (about 16 steps" in capsys.readouterr().out
    _warmup_hint(TrainConfig(data_dir="d", max_train_images=64, batch_size=8, epochs=2, warmup_steps=4))
    assert capsys.readouterr().out == ""
