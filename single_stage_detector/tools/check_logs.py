"""``check-logs``: the official MLPerf compliance checker over one log or a folder of logs."""
from __future__ import annotations

import argparse
import json
import re

from ..compliance import HARNESS_RULES, check_log, crash_line, default_ruleset, is_mlperf_log, read_log, require_logs

RULESETS = ("0.7.0", "1.0.0", "1.1.0")  # the training rulesets under which "ssd" is SSD300-ResNet34


def checker_reasons(output: str) -> list[str]:
    """The compliance checker's reasons, one line each: its WARNING / ERROR lines (but the final
    verdict), "Failed checks for KEY : CHECK" lines, and the "failed test: ..." line that follows
    a "CHECK for 'KEY' failed in line N" warning, joined to it."""
    reasons: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        m = re.match(r"^(WARNING|ERROR)\s*-\s*(.*)$", line)
        if m:
            text = m.group(2).strip()
            if text and text not in ("FAILED",) and not text.startswith("Compliance checks"):
                reasons.append(text)
        elif line.startswith("Failed checks for"):
            reasons.append(line)
        elif line.startswith("failed test:") and reasons:
            reasons[-1] = f"{reasons[-1].rstrip(':')}: {line}"
    seen: set[str] = set()
    return [r for r in reasons if not (r in seen or seen.add(r))]


def crash_reason(output: str) -> str | None:
    """When the checker itself crashed (a Python traceback rather than a verdict), one line
    saying so with the exception it ended on; None otherwise."""
    last = crash_line(output)
    if last is None:
        return None
    return f"the official compliance checker crashed on this log ({last}); run it with --verbose for its output"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "check-logs", help="the official MLPerf compliance checker on logs, with reasons",
        description="Check each MLPerf log with mlperf_logging.compliance_checker and print pass/fail with the "
                    "checker's reasons. A log continued by `train --resume` is reported as RESUMED (not a valid "
                    "timed result) without running the checker. Exit status 1 if any log fails or was resumed.")
    p.add_argument("logs", nargs="+", help="log files, or folders searched for *.log / result_*.txt logs")
    p.add_argument("--ruleset", choices=RULESETS, default=None,
                   help="training ruleset (default per log: 1.1.0 for closed logs with the 119 "
                        "weights_initialization events, else 1.0.0; logs of other families (YOLO), which no "
                        "MLPerf ruleset covers, are checked against the harness's rules, docs/RESULTS.md)")
    p.add_argument("--verbose", action="store_true", help="print the checker's full output for failing logs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.set_defaults(func=run)


def resumed_reason(log) -> str | None:
    """Why a log continued by ``--resume`` is no timed result (None for a log of one run)."""
    from ..mlperf_log import RESUMED_KEY  # here: it loads mlperf_logging, too slow for `--help`

    marks = [r for r in read_log(log) if r.key == RESUMED_KEY]
    if not marks:
        return None
    where = ", ".join(f"epoch {r.metadata.get('epoch_num', '?')} step {r.metadata.get('step', '?')}" for r in marks)
    return (f"resumed {len(marks)} time(s) from a checkpoint (at {where}): not a valid timed result, the MLPerf "
            "rules time one uninterrupted run; the compliance checker was not run")


def run(args: argparse.Namespace) -> int:
    logs = require_logs(args.logs)
    report = []
    for log in logs:
        ruleset = args.ruleset or default_ruleset(log)
        if not is_mlperf_log(log):
            # Named explicitly but no MLPerf log at all: the checker's first complaint
            # (a missing submission_org) would hide the real problem.
            report.append({"log": str(log), "ruleset": ruleset, "ok": False, "resumed": False, "output": "",
                           "reasons": ["not an MLPerf log: no ':::MLLOG' lines in the file"]})
            continue
        resumed = resumed_reason(log)
        if resumed is not None:
            # The checker would fail it on duplicated keys, far from the cause: say the cause.
            report.append({"log": str(log), "ruleset": ruleset, "ok": False, "resumed": True, "reasons": [resumed],
                           "output": ""})
            continue
        res = check_log(log, ruleset)
        crashed = crash_reason(res.output) if not res.ok else None
        reasons = [crashed] if crashed else (checker_reasons(res.output) if not res.ok else [])
        if not res.ok and not reasons:
            reasons = [ln.strip() for ln in res.output.splitlines() if ln.strip()][-3:]
        report.append({"log": str(log), "ruleset": ruleset, "ok": res.ok, "resumed": False, "reasons": reasons,
                       "output": res.output})
    failed = sum(not r["ok"] for r in report)
    if args.json:
        print(json.dumps({"logs": [{k: v for k, v in r.items() if k != "output"} for r in report],
                          "passed": len(report) - failed, "failed": failed}, indent=2))
        return 1 if failed else 0
    for r in report:
        verdict = "PASS" if r["ok"] else "RESUMED" if r["resumed"] else "FAIL"
        where = ("harness rules: no MLPerf ruleset covers this benchmark" if r["ruleset"] == HARNESS_RULES
                 else f"training {r['ruleset']}")
        print(f"{verdict}  {r['log']}  ({where})")
        for reason in r["reasons"]:
            print(f"      {reason}")
        if args.verbose and not r["ok"]:
            print("      --- checker output ---")
            print("\n".join("      " + ln for ln in r["output"].splitlines()))
    resumed = sum(r["resumed"] for r in report)
    print(f"{len(report) - failed} of {len(report)} logs pass the official compliance checker"
          + (f"; {resumed} resumed from a checkpoint (not checked)" if resumed else ""))
    return 1 if failed else 0
