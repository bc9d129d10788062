"""Runs the official MLPerf compliance checker (``mlperf_logging.compliance_checker``) on a log."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

__all__ = ["ComplianceResult", "check_log", "HARNESS_RULES", "FAMILY_RULES_FILE"]

# Logs of detector families that no MLPerf ruleset covers (YOLO) are checked by the official
# checker's engine against the harness's own rules file (the benchmark-independent training
# rules plus what every open run of the harness logs); "harness" names that pseudo-ruleset.
HARNESS_RULES = "harness"
FAMILY_RULES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compliance_rules",
                                 "open_detector_family.yaml")

_FAILED_CHECK = re.compile(r"Failed checks for (\S+)\s*:\s*(.*)")


@dataclass
class ComplianceResult:
    ok: bool
    ruleset: str
    output: str
    failed_checks: list[tuple[str, str]] = field(default_factory=list)  # (key, check expression)
    problems: list[str] = field(default_factory=list)  # every WARNING / ERROR line but the verdict


def _run_module(args: list[str], cwd: str) -> subprocess.CompletedProcess:
    """``python -m <args>`` with this interpreter, in ``cwd`` (the checkers write files into it)."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, check=False)


def check_log(log_file: str | os.PathLike, ruleset: str = "1.0.0", usage: str = "training") -> ComplianceResult:
    """Check ``log_file`` with the official checker (in a subprocess: it keeps global state).

    ``ok`` is the checker's own verdict (exit status 0 and "SUCCESS"). ``ruleset`` ``harness``
    (:data:`HARNESS_RULES`) runs the checker with :data:`FAMILY_RULES_FILE` instead of an MLPerf
    ruleset's files (the 1.0.0 log parser).
    """
    rules = ["--ruleset", ruleset] if ruleset != HARNESS_RULES else \
        ["--ruleset", "1.0.0", "--config", FAMILY_RULES_FILE]
    with tempfile.TemporaryDirectory() as tmp:
        proc = _run_module(["mlperf_logging.compliance_checker", "--usage", usage, *rules,
                            "--log_output", os.path.join(tmp, "checker.log"), os.path.abspath(log_file)], cwd=tmp)
    output = proc.stdout + proc.stderr
    failed = [(m.group(1), m.group(2).strip()) for m in map(_FAILED_CHECK.search, output.splitlines()) if m]
    problems = [ln.strip() for ln in output.splitlines()
                if (ln.startswith("WARNING") or ln.startswith("ERROR")) and "FAILED" not in ln]
    ok = proc.returncode == 0 and "SUCCESS" in output
    return ComplianceResult(ok=ok, ruleset=ruleset, output=output, failed_checks=failed, problems=problems)


# --------------------------------------------------------------------------------------------
# Reading logs back, and the other official checkers (RCP, package), for the results tooling.
# --------------------------------------------------------------------------------------------
import json as _json
from pathlib import Path as _Path

__all__ += ["LogRecord", "read_log", "is_mlperf_log", "find_logs", "require_logs", "default_ruleset", "run_folder", "RCP_VERSION",
            "CheckerRun",
            "check_rcp", "check_package", "NUM_REFERENCE_WEIGHTS", "crash_line", "SummarizerRun",
            "run_result_summarizer"]

_TOKEN = ":::MLLOG"
# The 1.1.0 closed rules want exactly the tensors of the MXNet reference model (SPEC.md section 8).
NUM_REFERENCE_WEIGHTS = 119
# RCPs of SSD300 (benchmark "ssd") are in mlperf_logging/rcp_checker/training_1.1.0/rcps_ssd.json.
RCP_VERSION = "1.1.0"


@dataclass
class LogRecord:
    key: str
    value: object
    time_ms: float
    event_type: str
    metadata: dict


def read_log(log_file: str | os.PathLike) -> list[LogRecord]:
    """The ``:::MLLOG`` records of a log, in file order (other lines and broken JSON are skipped)."""
    records = []
    with open(log_file, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            pos = line.find(_TOKEN)
            if pos < 0:
                continue
            try:
                obj = _json.loads(line[pos + len(_TOKEN):])
            except ValueError:
                continue
            if not isinstance(obj, dict) or "key" not in obj:
                continue
            try:
                time_ms = float(obj.get("time_ms", 0))
            except (TypeError, ValueError):
                continue  # a damaged record: the official checker reports it, the tools skip it
            metadata = obj.get("metadata")
            records.append(LogRecord(key=obj["key"], value=obj.get("value"), time_ms=time_ms,
                                     event_type=obj.get("event_type", ""),
                                     metadata=metadata if isinstance(metadata, dict) else {}))
    return records


def is_mlperf_log(path: str | os.PathLike) -> bool:
    """True when the file holds an ":::MLLOG" line in its first 64 KiB."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            head = fh.read(1 << 16)
    except OSError:
        return False
    return _TOKEN in head


def require_logs(paths, *, mlperf_only: bool = False) -> list[_Path]:
    """:func:`find_logs`, but a :class:`~single_stage_detector.config.ConfigError` (exit status 2
    with one line on stderr from the CLI) when nothing is found, and with ``mlperf_only`` when
    a file named directly holds no ``:::MLLOG`` line (tools that read the records, not a checker
    that reports such a file as failing)."""
    from .config import ConfigError

    try:
        logs = find_logs(paths)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if not logs:
        names = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]
        raise ConfigError(f"no MLPerf logs found in {' '.join(names)}")
    if mlperf_only:
        for log in logs:
            if not is_mlperf_log(log):
                raise ConfigError(f"{log}: not an MLPerf log (no ':::MLLOG' lines in the file)")
    return logs


def find_logs(paths) -> list[_Path]:
    """MLPerf logs named by ``paths`` (files, or folders searched recursively for ``*.log`` /
    ``result_*.txt`` files holding ``:::MLLOG`` lines), sorted, without duplicates.

    A run folder of the launchers (``LOGDIR/RUN/``, whose log is ``LOGDIR/RUN.log`` beside it)
    stands for that log. Raises FileNotFoundError for a path that does not exist.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[_Path] = []
    for p in map(_Path, paths):
        if p.is_dir():
            cands = sorted(set(p.rglob("*.log")) | set(p.rglob("result_*.txt")))
            logs = [c for c in cands if c.is_file() and is_mlperf_log(c)]
            beside = p.parent / f"{p.name}.log"
            if not logs and beside.is_file() and is_mlperf_log(beside):
                logs = [beside]
            found.extend(logs)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such log file or folder: {p}")
    seen: set[_Path] = set()
    out = []
    for f in found:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


def run_folder(log_file: str | os.PathLike) -> _Path:
    """The folder holding a run's config.json, metrics.jsonl, result.json and checkpoint.pt:
    the log's own folder for ``train``'s ``OUTPUT/mlperf.log``, ``LOGDIR/RUN/`` for the
    launchers' ``LOGDIR/RUN.log``."""
    log = _Path(log_file)
    beside = log.with_suffix("")
    if log.name != "mlperf.log" and beside.is_dir():
        return beside
    return log.parent


def default_ruleset(log_file: str | os.PathLike) -> str:
    """The newest ruleset under which "ssd" means SSD300-ResNet34 and that this log can meet:
    1.1.0 for a closed-division log carrying the 119 ``weights_initialization`` events, else 1.0.0;
    :data:`HARNESS_RULES` for a log of another benchmark (a YOLO family: no MLPerf ruleset has it)."""
    records = read_log(log_file)
    benchmark = next((r.value for r in records if r.key == "submission_benchmark"), "ssd")
    if benchmark != "ssd":
        return HARNESS_RULES
    division = next((r.value for r in records if r.key == "submission_division"), None)
    n_weights = sum(r.key == "weights_initialization" for r in records)
    return "1.1.0" if division == "closed" and n_weights == NUM_REFERENCE_WEIGHTS else "1.0.0"


@dataclass
class CheckerRun:
    """Verdict and full output of one official checker run (a subprocess)."""
    ok: bool
    message: str  # the checker's one-line verdict / reason
    output: str
    returncode: int


def check_rcp(log_files, rcp_version: str = RCP_VERSION, usage: str = "training") -> CheckerRun:
    """Run the official RCP checker (``mlperf_logging.rcp_checker``) over ``log_files``.

    The checker reads a folder of ``result_*.txt`` files; they are copied to a temporary one.
    """
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "ssd")
        os.makedirs(results)
        for i, f in enumerate(log_files):
            shutil.copyfile(f, os.path.join(results, f"result_{i}.txt"))
        proc = _run_module(["mlperf_logging.rcp_checker", results, "--rcp_usage", usage, "--rcp_version", rcp_version,
                            "--log_output", os.path.join(tmp, "rcp_checker.log")], cwd=tmp)
    output = proc.stdout + proc.stderr
    verdict = [ln for ln in output.splitlines() if "RCP test PASSED" in ln or "RCP test FAILED" in ln]
    if verdict:
        message = re.sub(r"^(INFO|ERROR|WARNING) - ", "", verdict[-1]).strip()
        message = message.split(", consider adding")[0]
    else:
        tail = [ln for ln in output.splitlines() if ln.strip()]
        message = tail[-1].strip() if tail else f"rcp_checker exited with status {proc.returncode}"
    ok = proc.returncode == 0 and any("RCP test PASSED" in v for v in verdict)
    return CheckerRun(ok=ok, message=message, output=output, returncode=proc.returncode)


PACKAGE_SUCCESS = "PACKAGE CHECKER FOUND NO ERRORS, SUCCESS !"


def check_package(org_folder: str | os.PathLike, ruleset: str, usage: str = "training",
                  extra_args: tuple[str, ...] = (), log_output: str | os.PathLike | None = None) -> CheckerRun:
    """Run the official package checker (``mlperf_logging.package_checker``) on an org folder.

    ``log_output``: where the checker writes its detailed log (default: a temporary file,
    deleted afterwards, so its output's pointer to it is then stale).
    """
    with tempfile.TemporaryDirectory() as tmp:
        log_path = os.path.abspath(log_output) if log_output else os.path.join(tmp, "package_checker.log")
        proc = _run_module(["mlperf_logging.package_checker", os.fspath(os.path.abspath(org_folder)), usage, ruleset,
                            "--log_output", log_path, *extra_args], cwd=tmp)
    output = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and PACKAGE_SUCCESS in output
    lines = [ln.strip() for ln in output.splitlines()]
    if ok:
        message = PACKAGE_SUCCESS
    else:
        errors = [re.sub(r"^ERROR - ", "", ln).strip() for ln in lines if ln.startswith("ERROR")]
        message = "; ".join(errors) if errors else (next((ln for ln in reversed(lines) if ln), "")
                                                     or f"package_checker exited with status {proc.returncode}")
    return CheckerRun(ok=ok, message=message, output=output, returncode=proc.returncode)


def crash_line(output: str) -> str | None:
    """The exception line ending a Python traceback in ``output`` ("ValueError: ..."), or None
    when the output holds no traceback."""
    if "Traceback (most recent call last)" not in output:
        return None
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return next((ln for ln in reversed(lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", ln)),
                lines[-1] if lines else "")


@dataclass
class SummarizerRun:
    """What the official result summarizer made of an org folder."""
    ok: bool
    minutes: float | None  # its "ssd:time_to_train" (the olympic score), None if it gave none
    message: str  # its verdict in one line: the score, or the exception it ended on
    output: str


def run_result_summarizer(org_folder: str | os.PathLike, ruleset: str, usage: str = "training",
                          benchmark: str = "ssd") -> SummarizerRun:
    """Run ``python -m mlperf_logging.result_summarizer ORG usage ruleset`` as a submitter would (in a
    temporary working folder: it writes summary files there) and read its score for ``benchmark``."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = _run_module(["mlperf_logging.result_summarizer", os.fspath(os.path.abspath(org_folder)), usage,
                            ruleset], cwd=tmp)
        summary = os.path.join(tmp, "summary.json")
        rows = []
        if os.path.isfile(summary):
            try:
                with open(summary, encoding="utf-8") as fh:
                    rows = _json.load(fh)
            except ValueError:
                rows = []
    output = proc.stdout + proc.stderr
    crashed = crash_line(output)
    if crashed is not None or proc.returncode != 0:
        return SummarizerRun(False, None, f"crashed: {crashed}" if crashed else
                             f"exited with status {proc.returncode}", output)
    values = [r.get(f"{benchmark}:time_to_train", r.get(benchmark)) for r in rows if isinstance(r, dict)]
    values = [float(v) for v in values if isinstance(v, (int, float))]
    if not values:
        return SummarizerRun(False, None, f"no {benchmark} score in its summary", output)
    return SummarizerRun(True, values[0], f"{benchmark} time_to_train {values[0]:.4f} minutes", output)
