"""Runs that survive: exact resume, signals and injected faults, through the real CLI.

Real processes, real signals (SIGTERM, SIGINT, SIGKILL), real file systems (a small tmpfs
mounted in a private mount namespace for a read-only folder and a full disk). Every test
checks the exit status, the message, that the MLPerf log is well-formed and ends with
``run_stop``, and that no checkpoint file is partial.

Exactness: augmentation is seeded per sample from (seed, epoch, index), so the resumed runs
at 2 workers are compared with the uninterrupted run at 0 workers: the same weights, bit for bit.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from single_stage_detector.checkpoint import (RESUME_DIR, checkpoint_data_dir, list_resume_checkpoints,
                                              load_checkpoint, load_resume_checkpoint)
from single_stage_detector.config import ConfigError
from single_stage_detector.data.dali import dali_available
from single_stage_detector.data.synthetic import ensure_synthetic_coco
from single_stage_detector.tools import check_logs

pytestmark = pytest.mark.slow

# 8 training images, batch 2: 4 steps per epoch; warm-up over 6 steps, so a resume after
# epoch 1 or inside epoch 2 is inside the warm-up; one LR decay at epoch 3.
RUN = ["--preset", "ssd_tiny", "--device", "cpu", "--amp", "off", "--seed", "5", "--batch-size", "2",
       "--eval-batch-size", "4", "--max-train-images", "8", "--max-eval-images", "4", "--lr", "0.02",
       "--warmup-steps", "6", "--lr-decay-epochs", "3", "--eval-epochs", "2", "4", "--threshold", "0.99",
       "--log-every", "1", "--dist-timeout-s", "60"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                      "MASTER_PORT", "SSD_FAULT_INJECT_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(args, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "single_stage_detector", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "single_stage_detector", "train", *args]


def _train(args, cwd, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    if nproc == 1:  # a process forked from one that has imported torch (cli_runner)
        return run_cli(["train", *args], cwd=cwd, timeout=timeout, env=_env())
    return subprocess.run(_cmd(args, nproc), capture_output=True, text=True, cwd=cwd, timeout=timeout, env=_env())


def _train_until(args, cwd, marker: str, signals=(signal.SIGTERM,), nproc: int = 1, gap: float = 0.0,
                 timeout: float = 300):
    """Start a run, send ``signals`` (``gap`` s apart) when its output shows ``marker``; (status, output, s)."""
    proc = subprocess.Popen(_cmd(args, nproc), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd, env=_env())
    lines, sent_at = [], None
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if sent_at is None and marker in line:
            for i, sig in enumerate(signals):
                if i:
                    time.sleep(gap)
                proc.send_signal(sig)
            sent_at = time.monotonic()
        if time.monotonic() > deadline:
            proc.kill()
            break
    rc = proc.wait(timeout=60)
    assert sent_at is not None, "".join(lines)[-3000:]
    return rc, "".join(lines), time.monotonic() - sent_at


def _mllog(path: Path) -> list[dict]:
    """The log's records; asserts that every line is a complete MLLOG record and the last is run_stop."""
    text = path.read_text()
    assert text.endswith("\n"), "the log ends inside a line"
    recs = []
    for line in text.splitlines():
        assert line.startswith(":::MLLOG "), line
        recs.append(json.loads(line.split(" ", 1)[1]))
    assert recs[-1]["key"] == "run_stop", recs[-1]
    keys = [r["key"] for r in recs]
    assert keys.count("run_start") == 1 and keys.index("run_start") < keys.index("run_stop")
    return recs


def _assert_no_partial_checkpoint(out: Path) -> list[Path]:
    """No temporary file is left, and every checkpoint under ``out`` loads completely."""
    assert not [p for p in out.rglob("*.part")], list(out.rglob("*"))
    files = sorted(out.rglob("*.pt"))
    for p in files:
        load_checkpoint(p)
    return files


def _weights(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]


def _assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _lrs(out: Path) -> dict[int, float]:
    """Optimiser step -> LR of every step a run (and its continuations) trained, from metrics.jsonl."""
    lrs: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            assert rec["step"] not in lrs, f"step {rec['step']} trained twice"
            lrs[rec["step"]] = rec["lr"]
    return lrs


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel_coco")
    ensure_synthetic_coco(root, num_train=8, num_val=4, seed=3, min_size=64, max_size=96)
    return root


@pytest.fixture(scope="module")
def reference(coco, tmp_path_factory):
    """The uninterrupted 4-epoch run (torch backend, no worker)."""
    cwd = tmp_path_factory.mktemp("reference")
    proc = _train([*RUN, "--data-dir", str(coco), "--output-dir", "out", "--epochs", "4", "--num-workers", "0"], cwd)
    assert proc.returncode == 3, proc.stderr[-3000:]
    return cwd / "out"


# -- exact resume ------------------------------------------------------------------------------
def test_resume_after_epoch_limit_is_exact_lr_included(coco, reference, tmp_path, capsys):
    """`--epochs 2`, then `--epochs 4 --resume auto`: bit-identical weights, every step's LR equal."""
    (tmp_path / "data").symlink_to(coco)  # a relative --data-dir, which checkpoints store absolute
    args = [*RUN, "--data-dir", "data", "--output-dir", "out", "--num-workers", "0"]
    first = _train([*args, "--epochs", "2"], tmp_path)
    assert first.returncode == 3, first.stderr[-3000:]
    second = _train([*args, "--epochs", "4", "--resume", "auto"], tmp_path)
    assert second.returncode == 3, second.stderr[-3000:]
    out = tmp_path / "out"
    _assert_bit_identical(_weights(reference), _weights(out))
    full, resumed = _lrs(reference), _lrs(out)
    assert sorted(full) == list(range(1, 17)) and resumed == full  # warm-up (steps 1-6) and decay included
    assert full[1] < full[6] and full[13] < full[12]
    recs = _mllog(out / "mlperf.log")
    keys = [r["key"] for r in recs]
    assert keys.count("run_resumed") == 1 and keys.count("run_stop") == 2
    assert [r["metadata"]["epoch_num"] for r in recs if r["key"] == "epoch_start"] == [1, 2, 3, 4]
    _assert_no_partial_checkpoint(out)
    # Outputs as readable as the log (the umask's mode, not the temp file's 0600), and a
    # checkpoint that finds its dataset from any working folder, or says which flag to pass.
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "result.json", "checkpoint.pt", "mlperf.log"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["config"]["data_dir"] == str(tmp_path / "data")
    assert checkpoint_data_dir(ckpt, "checkpoint.pt") == str(tmp_path / "data")
    ckpt["config"]["data_dir"] = str(tmp_path / "moved")
    with pytest.raises(ConfigError, match=r"moved, which does not exist here; pass --data-dir"):
        checkpoint_data_dir(ckpt, "checkpoint.pt")
    # check-logs says why the log is no timed result, instead of failing it on duplicated keys.
    status = check_logs.run(argparse.Namespace(logs=[str(out / "mlperf.log")], ruleset=None, verbose=False,
                                               json=False))
    report = capsys.readouterr().out
    assert status == 1 and report.startswith("RESUMED"), report
    assert "not a valid timed result" in report


def test_fresh_run_in_an_earlier_runs_folder_keeps_its_own_resume_checkpoints(coco, reference, tmp_path):
    """An earlier run's resume checkpoints (epochs 3, 4) are moved to checkpoints.1/: otherwise
    pruning (newest steps kept) deletes the new run's own, and --resume auto picks the earlier run's."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference, out)
    earlier = sorted(p.name for p in (out / RESUME_DIR).iterdir())
    args = [*RUN, "--data-dir", str(coco), "--output-dir", str(out), "--num-workers", "0", "--seed", "6",
            "--eval-epochs", "1", "2"]
    proc = _train([*args, "--epochs", "1"], tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert f"were kept as {out / (RESUME_DIR + '.1')}" in proc.stdout
    assert sorted(p.name for p in (out / f"{RESUME_DIR}.1").iterdir()) == earlier
    assert [p.name for p in list_resume_checkpoints(out)] == ["resume-e00001-s00000004.pt"]
    proc = _train([*args, "--epochs", "2", "--resume", "auto"], tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "resume-e00001-s00000004.pt" in proc.stdout, proc.stdout[-2000:]


def test_sigterm_mid_epoch_then_resume_with_workers_is_exact(coco, reference, tmp_path):
    """SIGTERM inside epoch 3 (2 workers): the step finishes, a checkpoint is written, exit 5; the
    resumed run ends bit-identical to the uninterrupted one (which had no worker)."""
    args = [*RUN, "--data-dir", str(coco), "--output-dir", "out", "--num-workers", "2", "--epochs", "4"]
    rc, output, seconds = _train_until(args, tmp_path, "epoch 3/4 step 1/4")
    assert rc == 5, output[-3000:]
    assert "stopped by SIGTERM after writing a checkpoint; continue with --resume auto" in output
    out = tmp_path / "out"
    recs = _mllog(out / "mlperf.log")
    assert recs[-1]["metadata"]["status"] == "aborted"
    saved = _assert_no_partial_checkpoint(out)
    newest = load_resume_checkpoint(list_resume_checkpoints(out)[-1])["resume"]
    assert (newest["epoch"], newest["step_in_epoch"]) in ((2, 2), (2, 3), (3, 0)), newest  # after the next step
    assert not (out / "checkpoint.pt").exists() and saved
    second = _train([*args, "--resume", "auto"], tmp_path)
    assert second.returncode == 3, second.stderr[-3000:]
    _assert_bit_identical(_weights(reference), _weights(out))
    assert _lrs(out) == _lrs(reference)


def test_stop_before_the_first_evaluation_writes_strict_json(coco, tmp_path):
    """No AP yet: result.json says null (NaN is not JSON; strict readers such as jq or JavaScript refuse it)."""
    args = [*RUN, "--data-dir", str(coco), "--output-dir", "out", "--num-workers", "0", "--epochs", "4"]
    rc, output, _ = _train_until(args, tmp_path, "epoch 1/4 step 1/4")
    assert rc == 5, output[-3000:]

    def refuse(constant):
        raise AssertionError(f"{constant} in result.json")

    result = json.loads((tmp_path / "out" / "result.json").read_text(), parse_constant=refuse)
    assert result["ap"] is None and result["stopped_by"] == "SIGTERM"
    assert "final mAP         none (no evaluation ran)" in output


DALI_ARGS = ["--num-workers", "1", "--data-backend", "dali"]


@pytest.fixture(scope="module")
def dali_reference(coco, tmp_path_factory):
    """The uninterrupted 4-epoch run with the DALI pipelines (CPU graph)."""
    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    cwd = tmp_path_factory.mktemp("dali_reference")
    proc = _train([*RUN, *DALI_ARGS, "--data-dir", str(coco), "--output-dir", "out", "--epochs", "4"], cwd)
    assert proc.returncode == 3, proc.stderr[-3000:]
    return cwd / "out"


def test_dali_sigterm_then_resume_is_exact(coco, dali_reference, tmp_path):
    args = [*RUN, "--data-dir", str(coco), *DALI_ARGS, "--epochs", "4"]
    rc, output, _ = _train_until([*args, "--output-dir", "out"], tmp_path, "epoch 3/4 step 1/4")
    assert rc == 5, output[-3000:]
    _mllog(tmp_path / "out" / "mlperf.log")
    second = _train([*args, "--output-dir", "out", "--resume", "auto"], tmp_path)
    assert second.returncode == 3, second.stderr[-3000:]
    _assert_bit_identical(_weights(dali_reference), _weights(tmp_path / "out"))
    assert _lrs(tmp_path / "out") == _lrs(dali_reference)


@pytest.mark.parametrize("stop, backend", [("sigterm", "torch, 0 workers"), ("epochs", "torch, 2 workers"),
                                           ("epochs", "dali")])
def test_the_other_stops_and_backends_resume_exactly(stop, backend, coco, reference, request, tmp_path):
    """The rest of the matrix (stop by SIGTERM or by `--epochs 2`) x (torch at 0 and 2 workers,
    DALI); the tests above cover `--epochs` at 0 workers and SIGTERM at 2 workers and with DALI."""
    flags = {"torch, 0 workers": ["--num-workers", "0"], "torch, 2 workers": ["--num-workers", "2"],
             "dali": DALI_ARGS}[backend]
    expected = request.getfixturevalue("dali_reference") if backend == "dali" else reference
    args = [*RUN, "--data-dir", str(coco), "--output-dir", "out", *flags]
    if stop == "epochs":
        first = _train([*args, "--epochs", "2"], tmp_path)
        assert first.returncode == 3, first.stderr[-3000:]
    else:
        rc, output, _ = _train_until([*args, "--epochs", "4"], tmp_path, "epoch 3/4 step 1/4")
        assert rc == 5, output[-3000:]
    _assert_no_partial_checkpoint(tmp_path / "out")
    second = _train([*args, "--epochs", "4", "--resume", "auto"], tmp_path)
    assert second.returncode == 3, second.stderr[-3000:]
    _assert_bit_identical(_weights(expected), _weights(tmp_path / "out"))
    assert _lrs(tmp_path / "out") == _lrs(expected)
    assert [r["key"] for r in _mllog(tmp_path / "out" / "mlperf.log")].count("run_resumed") == 1


def _assert_workers_exited(proc: subprocess.CompletedProcess, status: int) -> None:
    """torchrun exits 1 when a worker exits non-zero; its report names the first one's status (the
    other may be stopped by torchrun after its work is done, before it exits by itself)."""
    assert proc.returncode == 1 and f"exitcode  : {status} " in proc.stderr, proc.stderr[-3000:]


def test_two_gloo_processes_resume_exactly(coco, tmp_path):
    """2 processes under torchrun: stopped by `--epochs 2`, resumed and stopped by a SIGTERM to
    torchrun inside epoch 3 (both ranks stop at the same step), resumed to the end: the
    weights of the uninterrupted run, bit for bit, and the same LR at every step."""
    args = [*RUN, "--data-dir", str(coco), "--num-workers", "0", "--batch-size", "1"]
    full = _train([*args, "--output-dir", "full", "--epochs", "4"], tmp_path, nproc=2)
    _assert_workers_exited(full, 3)
    first = _train([*args, "--output-dir", "out", "--epochs", "2"], tmp_path, nproc=2)
    _assert_workers_exited(first, 3)
    ranks = load_resume_checkpoint(list_resume_checkpoints(tmp_path / "out")[-1])["resume"]["ranks"]
    assert len(ranks) == 2  # each rank's RNG states and BN statistics
    resume = [*args, "--output-dir", "out", "--epochs", "4", "--resume", "auto"]
    rc, output, _ = _train_until(resume, tmp_path, "epoch 3/4 step 1/4", nproc=2)
    # torchrun forwards the signal and re-raises it (exit 1); both ranks stopped by themselves in time.
    assert rc == 1 and "stopped by SIGTERM after writing a checkpoint" in output, output[-3000:]
    assert "SIGKILL" not in output, output[-3000:]
    _assert_no_partial_checkpoint(tmp_path / "out")
    assert _mllog(tmp_path / "out" / "mlperf.log")[-1]["metadata"]["status"] == "aborted"
    last = _train(resume, tmp_path, nproc=2)
    _assert_workers_exited(last, 3)
    _assert_bit_identical(_weights(tmp_path / "full"), _weights(tmp_path / "out"))
    assert _lrs(tmp_path / "out") == _lrs(tmp_path / "full")
    recs = _mllog(tmp_path / "out" / "mlperf.log")
    assert [r["key"] for r in recs].count("run_resumed") == 2


# -- signals and dead ranks ----------------------------------------------------------------------
def test_second_signal_stops_at_once(coco, tmp_path):
    # The benchmark model: steps of seconds on a CPU, so that the second SIGINT (1.2 s after the
    # first, past the window in which a repeat counts as the same request) lands inside one.
    args = [*RUN, "--data-dir", str(coco), "--output-dir", "out", "--num-workers", "0", "--epochs", "4",
            "--preset", "ssd300_resnet34", "--division", "open", "--batch-size", "4"]
    rc, output, seconds = _train_until(args, tmp_path, "epoch 1/4 step 1/2", signals=(signal.SIGINT,) * 2, gap=1.2)
    assert rc == 128 + signal.SIGINT, output[-3000:]
    assert "second SIGINT: stopped at once, without a new checkpoint" in output
    assert "Traceback" not in output and seconds < 20
    recs = _mllog(tmp_path / "out" / "mlperf.log")
    assert recs[-1]["metadata"]["status"] == "aborted"
    _assert_no_partial_checkpoint(tmp_path / "out")


def _rank_pid(launcher_pid: int, rank: int, timeout: float = 60) -> int:
    """The pid of the worker of ``rank`` among the launcher's children (from /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{launcher_pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(child)
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher_pid}")


def test_sigkill_of_one_rank_ends_the_launch_naming_it(coco, tmp_path):
    args = [*RUN, "--data-dir", str(coco), "--output-dir", "out", "--num-workers", "0", "--batch-size", "1",
            "--epochs", "50", "--eval-epochs", "50"]
    proc = subprocess.Popen(_cmd(args, nproc=2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, env=_env())
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "epoch 1 done" in line:
            break
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    lines += proc.stdout.readlines()
    rc = proc.wait(timeout=120)
    seconds = time.monotonic() - killed_at
    output = "".join(lines)
    assert rc != 0 and seconds < 60, (rc, seconds)
    assert "rank      : 1" in output and "Signal 9 (SIGKILL)" in output, output[-4000:]
    recs = _mllog(tmp_path / "out" / "mlperf.log")
    assert recs[-1]["metadata"]["status"] == "aborted"
    _assert_no_partial_checkpoint(tmp_path / "out")


# -- storage ------------------------------------------------------------------------------------
def _namespace_tmpfs_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m none $d"],
                           capture_output=True)
    return probe.returncode == 0


NAMESPACE_TMPFS = _namespace_tmpfs_works()
needs_tmpfs = pytest.mark.skipif(not NAMESPACE_TMPFS, reason="needs `unshare -rm` (a private mount namespace) "
                                                            "to mount a small tmpfs")


def _in_tmpfs(script: str, mount_opts: str, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) with $D a fresh tmpfs mounted with ``mount_opts``, in a private mount namespace."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    wrapped = f'set -u; D={mnt}; mount -t tmpfs -o {mount_opts} none "$D" || exit 99\n{script}'
    return subprocess.run(["unshare", "-rm", "sh", "-c", wrapped], capture_output=True, text=True, cwd=tmp_path,
                          timeout=timeout, env=_env())


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _refused_in_tmpfs(coco, tmp_path, mount_options: str) -> str:
    """A one-epoch run whose output folder is on a tmpfs mounted with ``mount_options``: it must be
    refused with exit 2 before ``run_start``; returns its one error line."""
    train = " ".join(_cmd([*RUN, "--data-dir", str(coco), "--output-dir", '"$D/out"', "--epochs", "1",
                           "--eval-epochs", "1"]))
    proc = _in_tmpfs(f"exec {train}", mount_options, tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "run_start" not in proc.stdout
    return _one_error_line(proc.stderr)


@needs_tmpfs
def test_read_only_output_folder_refused_before_anything_is_logged(coco, tmp_path):
    line = _refused_in_tmpfs(coco, tmp_path, "ro,size=1m")
    assert "--output-dir" in line and "/out is not writable: Read-only file system" in line, line


@needs_tmpfs
def test_full_disk_refused_before_run_start_and_mid_run_keeps_every_file_whole(coco, tmp_path):
    line = _refused_in_tmpfs(coco, tmp_path, "size=8m")
    assert "MiB free, the run's checkpoints need about" in line and "--output-dir" in line, line

    # Room for the checkpoints at the start; after epoch 1 the disk is filled to 64 KiB, so the
    # next checkpoint cannot be written while the log still takes its last lines.
    (tmp_path / "mnt").rmdir()
    train = " ".join(_cmd([*RUN, "--data-dir", str(coco), "--output-dir", '"$D/out"', "--epochs", "4",
                           "--num-workers", "0", "--keep-checkpoints", "1"]))
    script = f'''
{train} > run.txt 2>&1 &
pid=$!
while ! grep -q "epoch 1 done" run.txt; do kill -0 $pid 2>/dev/null || break; sleep 0.2; done
# A checkpoint may be growing meanwhile: retry until the fill fits (tmpfs undoes a failed one).
for _ in $(seq 100); do
    avail=$(df -B1 --output=avail "$D" | tail -n 1)
    fallocate -l $((avail - 65536)) "$D/fill" 2> /dev/null && break
    sleep 0.05
done
wait $pid; rc=$?
rm -f "$D/fill"; cp -a "$D/out" kept
exit $rc
'''
    proc = _in_tmpfs(script, "size=80m", tmp_path)
    output = (tmp_path / "run.txt").read_text()
    assert proc.returncode == 6, output[-3000:] + proc.stderr[-2000:]
    line = _one_error_line(output)
    assert "No space left on device" in line and f"/{RESUME_DIR}/resume-" in line, line
    recs = _mllog(tmp_path / "kept" / "mlperf.log")
    assert recs[-1]["metadata"]["status"] == "aborted"
    _assert_no_partial_checkpoint(tmp_path / "kept")


# -- bad checkpoints, NaN ---------------------------------------------------------------------------
def test_truncated_or_foreign_checkpoint_refused_naming_the_file(coco, reference, tmp_path):
    out = tmp_path / "out"
    (out / RESUME_DIR).mkdir(parents=True)
    good = list_resume_checkpoints(reference)[-1]
    bad = out / RESUME_DIR / good.name
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # e.g. copied by a job killed meanwhile
    proc = _train([*RUN, "--data-dir", str(coco), "--output-dir", str(out), "--epochs", "6", "--resume", "auto"],
                  tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert str(bad) in line and "truncated or foreign" in line, line
    assert not (out / "mlperf.log").exists()

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    for path, reason in ((foreign, "is not a checkpoint.pt of `train`"),
                         (reference / "checkpoint.pt", "without the training state"),
                         (coco / "annotations" / "instances_val2017.json", "truncated or foreign")):
        with pytest.raises(ConfigError, match=reason) as e:
            load_resume_checkpoint(path)
        assert str(path) in str(e.value)


def test_nan_loss_stops_with_every_term(coco, tmp_path):
    proc = _train([*RUN, "--data-dir", str(coco), "--output-dir", "out", "--num-workers", "0", "--epochs", "2",
                   "--lr", "1e12", "--warmup-steps", "0"], tmp_path)
    assert proc.returncode == 4, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert "non-finite loss" in line and "loc=" in line and "cls=" in line, line
    recs = _mllog(tmp_path / "out" / "mlperf.log")
    assert recs[-1]["metadata"]["status"] == "aborted"
    _assert_no_partial_checkpoint(tmp_path / "out")
