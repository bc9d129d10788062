"""Runs the official MLPerf compliance checker (``mlperf_logging.compliance_checker``) on a log."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

__all__ = ["ComplianceResult", "check_log"]

_FAILED_CHECK = re.compile(r"Failed checks for (\S+)\s*:\s*(.*)")


@dataclass
class ComplianceResult:
    ok: bool
    ruleset: str
    output: str
    failed_checks: list[tuple[str, str]] = field(default_factory=list)  # (key, check expression)
    problems: list[str] = field(default_factory=list)  # every WARNING / ERROR line but the verdict


def check_log(log_file: str | os.PathLike, ruleset: str = "1.0.0", usage: str = "training") -> ComplianceResult:
    """Check ``log_file`` with the official checker (in a subprocess: it keeps global state).

    ``ok`` is the checker's own verdict (exit status 0 and "SUCCESS").
    """
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", usage, "--ruleset", ruleset,
             "--log_output", os.path.join(tmp, "checker.log"), os.fspath(log_file)],
            capture_output=True, text=True, cwd=tmp, check=False,
        )
    output = proc.stdout + proc.stderr
    failed = [(m.group(1), m.group(2).strip()) for m in map(_FAILED_CHECK.search, output.splitlines()) if m]
    problems = [ln.strip() for ln in output.splitlines()
                if (ln.startswith("WARNING") or ln.startswith("ERROR")) and "FAILED" not in ln]
    ok = proc.returncode == 0 and "SUCCESS" in output
    return ComplianceResult(ok=ok, ruleset=ruleset, output=output, failed_checks=failed, problems=problems)
