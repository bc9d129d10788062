"""Results tooling (check-logs, score, package, plot, show-detections) on logs of short real runs.

One real ssd_tiny run (2 epochs on 32 synthetic images, seconds) feeds every test; the other logs
are hand-edited copies of its MLPerf log (damaged ones, and five "converged" runs of distinct
lengths and seeds for the submission package).
"""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import run_cli
from single_stage_detector.__main__ import main
from single_stage_detector.tools.score import olympic_score, summarize_run

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ACCURACY_CHECK = "v['value'] >= 0.230 and v['value'] < 1.0"
PACKAGE_SUCCESS = "PACKAGE CHECKER FOUND NO ERRORS, SUCCESS !"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Output folder of one short real training run (mlperf.log, metrics.jsonl, checkpoint.pt, ...)."""
    from single_stage_detector.data.synthetic import ensure_synthetic_coco

    root = tmp_path_factory.mktemp("tools")
    ensure_synthetic_coco(root / "data", num_train=32, num_val=8, seed=1)
    out = root / "run"
    proc = run_cli(
        ["train", "--preset", "ssd_tiny", "--data-dir",
         str(root / "data"), "--output-dir", str(out), "--batch-size", "8", "--eval-batch-size", "8",
         "--epochs", "2", "--eval-every", "1", "--num-workers", "0", "--lr", "0.01", "--warmup-steps", "2",
         "--log-every", "1", "--seed", "5"], cwd=root, timeout=600)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]  # not converged: aborted
    return out


def _records(path):
    return [json.loads(ln.split(" ", 1)[1]) for ln in Path(path).read_text().splitlines()
            if ln.startswith(":::MLLOG")]


def _write(path, records):
    path.write_text("".join(f":::MLLOG {json.dumps(r)}\n" for r in records))
    return path


def _edit(src, dst, fn):
    """Copy a log, passing each record through ``fn`` (returns a list of records to write)."""
    out = []
    for r in _records(src):
        out.extend(fn(r))
    return _write(dst, out)


@pytest.fixture(scope="session")
def five_runs(tiny_run, tmp_path_factory):
    """Five 'converged' runs: the real log with run_stop status success, its duration stretched by
    ``extra`` seconds, a seed of its own. Returns (folder, [time to train in minutes])."""
    folder = tmp_path_factory.mktemp("five")
    src = tiny_run / "mlperf.log"
    recs = _records(src)
    base = (next(r for r in recs if r["key"] == "run_stop")["time_ms"]
            - next(r for r in recs if r["key"] == "run_start")["time_ms"])
    minutes = []
    for i, extra in enumerate([30, 10, 50, 20, 45]):
        def fn(r, i=i, extra=extra):
            r = json.loads(json.dumps(r))
            if r["key"] == "seed":
                r["value"] = 100 + i
            if r["key"] == "run_stop":
                r["metadata"]["status"] = "success"
                r["time_ms"] += extra * 1000
            return [r]
        _edit(src, folder / f"run{i}.log", fn)
        minutes.append((base + extra * 1000) / 60000.0)
    return folder, minutes


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    w, h = struct.unpack(">II", data[16:24])  # IHDR
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == (w, h)
    return w, h


# -- check-logs ------------------------------------------------------------------------------

def test_check_logs_takes_paths_relative_to_the_working_folder(tiny_run, monkeypatch, capsys):
    monkeypatch.chdir(tiny_run)
    assert main(["check-logs", "mlperf.log"]) == 0
    assert "PASS  mlperf.log" in capsys.readouterr().out


def test_check_logs_passes_real_log_and_fails_damaged_copies(tiny_run, tmp_path, capsys):
    log = tiny_run / "mlperf.log"
    assert main(["check-logs", str(log)]) == 0
    out = capsys.readouterr().out
    assert f"PASS  {log}  (training 1.0.0)" in out  # open division, no 119 reference names: 1.0.0

    bad = tmp_path / "bad"
    bad.mkdir()

    def no_status(r):
        if r["key"] == "run_stop":
            r["metadata"].pop("status")
        return [r]

    def closed(r):
        if r["key"] == "submission_division":
            r["value"] = "closed"
        return [r]

    def closed_dup_batch(r):
        return closed(r) * (2 if r["key"] == "global_batch_size" else 1)

    _edit(log, bad / "no_status.log", no_status)
    _edit(log, bad / "closed_low_accuracy.log", closed)
    _edit(log, bad / "closed_dup_batch.log", closed_dup_batch)
    assert main(["check-logs", str(bad), str(log)]) == 1
    out = capsys.readouterr().out
    blocks = {}
    for line in out.splitlines():
        if line.startswith(("PASS", "FAIL")):
            current = line.split()[1]
            blocks[current] = [line]
        elif line.startswith("      "):
            blocks[current].append(line.strip())
    assert blocks[str(bad / "no_status.log")][0].startswith("FAIL")
    assert "failed test: 'status' in v['metadata']" in "\n".join(blocks[str(bad / "no_status.log")])
    assert "Required EXACTLY_ONE occurrence of 'global_batch_size' but found 2" in \
        blocks[str(bad / "closed_dup_batch.log")]
    assert f"Failed checks for eval_accuracy : {ACCURACY_CHECK}" in blocks[str(bad / "closed_low_accuracy.log")]
    assert blocks[str(log)][0].startswith("PASS")
    assert "1 of 4 logs pass the official compliance checker" in out

    # --json, and an explicit ruleset
    assert main(["check-logs", "--json", "--ruleset", "1.1.0", str(bad / "no_status.log")]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert rep["failed"] == 1 and rep["logs"][0]["ruleset"] == "1.1.0"


# -- score and package --------------------------------------------------------------------------

def test_score_table_json_and_rcp(five_runs, capsys):
    folder, minutes = five_runs
    expected = sum(sorted(minutes)[1:-1]) / 3  # olympic: drop fastest and slowest
    assert main(["score", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"MLPerf score: {expected:.4f} minutes (olympic mean of 5 runs: 3 counted, 2 dropped)" in out
    assert "RCP check (rcp_checker --rcp_version 1.1.0, global batch size 8)" in out
    # Each run with its part in the score: extra seconds 30, 10, 50, 20, 45 -> run1 fastest, run2 slowest.
    marks = {ln.split()[0]: ln.split("  ")[-1].strip() for ln in out.splitlines() if ln.startswith("run")
             and ".log" in ln.split()[0]}
    assert marks == {"run0.log": "counted", "run1.log": "dropped: fastest", "run2.log": "dropped: slowest",
                     "run3.log": "counted", "run4.log": "counted"}
    counted = sorted(minutes)[1:-1]
    mean = sum(counted) / 3
    std = (sum((m - mean) ** 2 for m in counted) / 2) ** 0.5
    assert (f"spread of the counted runs: {min(counted):.4f} .. {max(counted):.4f} minutes, "
            f"standard deviation {std:.4f} minutes") in out
    assert "warning: the runs differ" not in out and "share a seed" not in out
    assert main(["score", "--json", str(folder)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["score_minutes"] == pytest.approx(expected, rel=1e-9)
    assert [r["converged"] for r in rep["runs"]] == [True] * 5
    assert [r["epochs_to_converge"] for r in rep["runs"]] == [2] * 5
    assert [r["seed"] for r in rep["runs"]] == [100, 101, 102, 103, 104]
    # What the official checker says about batch 8 of a 2-epoch synthetic run (no RCP that small).
    assert rep["rcp"]["version"] == "1.1.0" and rep["rcp"]["passed"] is False
    assert "RCP test FAILED" in rep["rcp"]["message"]


def test_score_warns_when_hyperparameters_differ(five_runs, tmp_path, capsys):
    folder, _ = five_runs
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, p in enumerate(sorted(folder.glob("*.log"))):
        def fn(r, i=i):
            if r["key"] == "opt_base_learning_rate" and i == 4:
                r = {**r, "value": r["value"] * 2}
            return [r]
        _edit(p, mixed / p.name, fn)
    assert main(["score", "--no-rcp", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert "warning: the runs differ in opt_base_learning_rate (" in out and "in 4 run(s)" in out


def test_score_of_several_batch_sizes_says_why_the_rcp_check_is_not_run(five_runs, tmp_path, capsys):
    """The official RCP checker crashes (KeyError: None) on runs of several global batch sizes."""
    folder, _ = five_runs
    mixed = tmp_path / "batches"
    mixed.mkdir()
    for i, p in enumerate(sorted(folder.glob("*.log"))):
        def fn(r, i=i):
            if r["key"] == "global_batch_size" and i == 4:
                r = {**r, "value": 16}
            return [r]
        _edit(p, mixed / p.name, fn)
    assert main(["score", str(mixed)]) == 0
    out = capsys.readouterr().out
    assert ("RCP check (rcp_checker --rcp_version 1.1.0): not run: the runs differ in global batch size (8, 16)"
            in out), out
    assert "KeyError" not in out
    assert main(["score", "--json", str(mixed)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rcp"]["passed"] is None and "differ in global batch size" in rep["rcp"]["message"]


def test_score_gives_a_resumed_log_no_time_to_train(five_runs, tmp_path, capsys):
    """A log continued by --resume is two runs' pieces: no time to train (its first run_stop only
    ends the first piece), not converged."""
    from single_stage_detector.tools.score import summarize_run

    folder, _ = five_runs
    src = sorted(folder.glob("*.log"))[0]

    def fn(r):
        if r["key"] == "run_stop":  # the first piece stopped, the second resumed and finished
            return [r, {**r, "key": "run_resumed", "value": "resume-e00001.pt", "metadata": {}}]
        return [r]
    log = _edit(src, tmp_path / "resumed.log", fn)
    run = summarize_run(log)
    assert run.status == "resumed" and not run.converged and run.time_to_train_s is None and run.minutes is None
    assert main(["score", "--no-rcp", str(log)]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(str(log)))
    assert row.split()[1:6] == ["resumed", "no", "-", "-", "-"], row


def test_olympic_score_non_converged_runs(tiny_run, five_runs):
    folder, minutes = five_runs
    runs = [summarize_run(p) for p in sorted(folder.glob("*.log"))]
    aborted = summarize_run(tiny_run / "mlperf.log")
    assert not aborted.converged and aborted.status == "aborted" and aborted.epochs_to_converge is None
    # One non-converged run is the dropped slowest one: the fastest converged run is dropped
    # too, the score is the mean of the other three.
    s = olympic_score(runs[:4] + [aborted])
    assert s.minutes == pytest.approx(sum(sorted(minutes[:4])[1:]) / 3)
    assert s.dropped == [str(folder / "run1.log"), str(tiny_run / "mlperf.log")]
    # Two: no score.
    assert olympic_score(runs[:3] + [aborted, aborted]).minutes is None


def test_package_passes_official_checker(five_runs, tmp_path, capsys):
    folder, minutes = five_runs
    expected = sum(sorted(minutes)[1:-1]) / 3
    out_dir = tmp_path / "submission"
    # The shipped template: the official summarizer crashes on its FILL fields, and package says so.
    rc = main(["package", str(folder), "--output", str(tmp_path / "template"), "--org", "acme"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert f"  INFO - {PACKAGE_SUCCESS}\npackage_checker: PASS" in out
    assert "result_summarizer (" in out and "crashed: ValueError: invalid literal for int()" in out
    assert "systems/1xCPU-" in out  # the system folder is the platform the logs name
    assert not (tmp_path / "template" / "summary.json").exists() and not Path("summary.json").exists()

    system = json.loads((REPO / "single_stage_detector" / "tools" / "system_template.json").read_text())
    system = {k: ("1" if k.endswith(("per_node", "_count")) else "x") if str(v).startswith("FILL") else v
              for k, v in system.items()}
    system.update(division="open", submitter="acme", status="Available on-premise")
    (tmp_path / "system.json").write_text(json.dumps(system))
    rc = main(["package", str(folder), "--output", str(out_dir), "--org", "acme", "--system", "tiny_cpu",
               "--system-json", str(tmp_path / "system.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    # Every line is the official tools' (quoted or named) or labelled as ours.
    official = lines.index(next(ln for ln in lines if ln.startswith("official mlperf_logging.package_checker")))
    assert lines[official + 1] == f"  INFO - {PACKAGE_SUCCESS}"
    assert lines[official + 2].startswith("package_checker: PASS (exit status 0; its detailed log: ")
    assert (out_dir / "package_checker.log").is_file()  # the pointer names a file that exists
    assert lines[official + 3].endswith(f"result_summarizer ({out_dir / 'acme'} training 1.0.0): "
                                        f"ssd time_to_train {expected:.4f} minutes")
    assert f"ours: score {expected:.4f} minutes (olympic mean of 5 runs, 2 dropped" in out
    org = out_dir / "acme"
    desc = json.loads((org / "systems" / "tiny_cpu.json").read_text())
    assert desc["division"] == "open" and desc["submitter"] == "acme" and desc["system_name"] == "tiny_cpu"
    assert sorted(p.name for p in (org / "results" / "tiny_cpu" / "ssd").iterdir()) == \
        [f"result_{i}.txt" for i in range(5)]
    assert (org / "benchmarks" / "ssd" / "implementations" / "pytorch" / "README.md").is_file()

    # The official checker's own verdict, run directly, agrees; and a 4-run package fails it.
    proc = subprocess.run([sys.executable, "-m", "mlperf_logging.package_checker", str(org), "training", "1.0.0",
                           "--log_output", str(tmp_path / "pc.log")], capture_output=True, text=True)
    assert PACKAGE_SUCCESS in proc.stdout + proc.stderr
    four = tmp_path / "four"
    four.mkdir()
    for p in sorted(folder.glob("*.log"))[:4]:
        (four / p.name).write_text(p.read_text())
    assert main(["package", str(four), "--output", str(tmp_path / "sub4"), "--org", "acme"]) == 1
    assert "found 4, expected 5" in capsys.readouterr().out


def test_system_template_has_every_field_of_the_official_checker():
    import inspect

    from mlperf_logging.system_desc_checker import system_desc_checker

    template = json.loads((REPO / "single_stage_detector" / "tools" / "system_template.json").read_text())
    src = inspect.getsource(system_desc_checker.check_system_desc)
    required = src[src.index("required_fields = ["):src.index("]", src.index("required_fields = ["))]
    for field in [s.strip().strip('",') for s in required.splitlines()[1:] if s.strip()]:
        assert field in template, field


# -- pictures ---------------------------------------------------------------------------------

def test_plots_of_one_run_and_an_overlay(tiny_run, five_runs, tmp_path, capsys):
    out = tmp_path / "plots"
    assert main(["plot", str(tiny_run / "mlperf.log"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"plots: {out}" in printed and "no metrics.jsonl" not in printed
    assert _png_size(out / "metrics_vs_time.png") == (1200, 800)
    assert _png_size(out / "metrics_vs_epoch.png") == (1200, 800)
    assert _png_size(out / "loss_map.png") == (1000, 400)
    assert _png_size(out / "loss_map_vs_step.png") == (1000, 400)

    folder, _ = five_runs  # logs without metrics.jsonl next to them: throughput from the log alone
    several = tmp_path / "overlay"
    assert main(["plot", str(tiny_run), str(folder), "--output", str(several)]) == 0
    printed = capsys.readouterr().out
    assert _png_size(several / "overlay.png") == (1200, 450)
    assert _png_size(several / "run" / "loss_map.png") == (1000, 400)
    assert _png_size(several / "run0" / "metrics_vs_time.png") == (1200, 800)
    assert "no metrics.jsonl" in printed


def test_plot_reads_the_launchers_layout(tiny_run, tmp_path, capsys):
    """run_and_time.sh writes LOGDIR/RUN.log and LOGDIR/RUN/metrics.jsonl: both the log and the
    folder name the run, and the loss and LR panels get the metrics without --metrics."""
    import shutil

    from single_stage_detector.tools.plots import load_run

    logs = tmp_path / "logs"
    shutil.copytree(tiny_run, logs / "r1", ignore=shutil.ignore_patterns("mlperf.log", "plots"))
    shutil.copyfile(tiny_run / "mlperf.log", logs / "r1.log")
    run = load_run(logs / "r1.log")
    assert run.metrics_file == logs / "r1" / "metrics.jsonl"
    assert sum("loss" in r for r in run.train) >= 2 and sum("lr" in r for r in run.train) >= 2
    assert main(["plot", str(logs / "r1")]) == 0
    printed = capsys.readouterr().out
    assert "no metrics.jsonl" not in printed and f"plots: {logs / 'r1' / 'plots'}" in printed
    assert _png_size(logs / "r1" / "plots" / "loss_map.png") == (1000, 400)


def test_show_detections_grid(tiny_run, tmp_path, capsys):
    png = tmp_path / "det.png"
    assert main(["show-detections", str(tiny_run / "checkpoint.pt"), "--output", str(png), "-n", "5",
                 "--cols", "3", "--cell", "200", "--min-score", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "5 images" in out
    assert _png_size(png) == (600, 400)  # 3 x 2 cells of 200 px
    from PIL import Image

    with Image.open(png) as im:
        colors = {c for _, c in im.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (30, 200, 60) in colors  # ground truth drawn in green
    assert (230, 30, 30) in colors  # predictions in red


def test_show_detections_start_past_the_split_is_bad_input(tiny_run, tmp_path, capsys):
    """An index past the split is a bad flag value: one line naming --start, exit status 2."""
    try:
        code = main(["show-detections", str(tiny_run / "checkpoint.pt"), "--output", str(tmp_path / "d.png"),
                     "--start", "999"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --start 999: ") and "8 images" in err[0], err
    assert not (tmp_path / "d.png").exists()


def test_eval_only_announces_an_evaluation_not_a_training_schedule(tiny_run, tmp_path):
    proc = run_cli(["train", "--preset", "ssd_tiny", "--data-dir", str(tiny_run.parent / "data"), "--eval-only",
                    "--init-checkpoint", str(tiny_run / "checkpoint.pt"), "--output-dir", str(tmp_path / "eo"),
                    "--num-workers", "0", "--eval-batch-size", "8"], cwd=tmp_path, timeout=600)
    assert proc.returncode in (0, 3), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--eval-only: one evaluation of the --init-checkpoint weights on 8 val images, no training" in proc.stdout
    assert "evaluating after epochs" not in proc.stdout and "steps/epoch" not in proc.stdout


def test_summary_names_only_the_files_written(tmp_path, capsys):
    """A run stopped by a signal (or without evaluation) has no checkpoint.pt and no AP: the
    summary says so instead of listing the file and printing 'nan'."""
    from single_stage_detector.__main__ import _print_summary
    from single_stage_detector.train import RunResult

    for name in ("config.json", "metrics.jsonl", "result.json", "checkpoint.pt"):  # checkpoint.pt: an earlier run's
        (tmp_path / name).write_text("{}")
    _print_summary(RunResult(status="aborted", ap=float("nan"), epochs=0, time_to_train_s=1.0,
                             log_file=str(tmp_path / "mlperf.log"), output_dir=str(tmp_path), stopped_by="SIGTERM"))
    out = capsys.readouterr().out
    assert f"output folder     {tmp_path} (config.json, metrics.jsonl, result.json)\n" in out, out
    assert "final mAP         none (no evaluation ran)" in out and "nan" not in out, out


# -- demo target and docs -------------------------------------------------------------------------

def test_demo_target_plots_and_keeps_its_exit_status(tmp_path):
    """`make demo` for real (short: 1 epoch of a small synthetic set, so it ends `aborted`)."""
    out = tmp_path / "d"
    args = (f"--data-dir {tmp_path / 'data'} --synthetic-train-images 48 --synthetic-val-images 8 "
            "--epochs 1 --eval-start 1 --batch-size 8 --num-workers 0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE") and k != "MFLAGS"}
    proc = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "demo", f"DEMO_OUT={out}",
                           f"ARGS={args}", f"PY={sys.executable}"],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]  # make's code for a failed recipe
    assert "status            aborted" in proc.stdout  # the training's verdict, not the plots'
    assert f"plots: {out}/plots/" in proc.stdout.splitlines()[-1]
    for name in ("loss_map.png", "metrics_vs_time.png", "detections.png"):
        assert (out / "plots" / name).is_file(), name


def test_results_doc_covers_every_command():
    doc = (REPO / "docs" / "RESULTS.md").read_text()
    for cmd in ("check-logs", "score", "package", "plot", "show-detections"):
        assert f"python -m single_stage_detector {cmd}" in doc, cmd
        assert f"## `{cmd}`" in doc, cmd
    assert "docs/img/loss_map.png" in doc and "docs/img/detections.png" in doc
