"""``package``: lay out an MLPerf training submission folder from logs and run the official package checker.

Layout (SPEC.md section 8)::

    OUTPUT/<org>/systems/<system>.json
    OUTPUT/<org>/results/<system>/ssd/result_0.txt .. result_4.txt
    OUTPUT/<org>/benchmarks/ssd/implementations/<impl>/   (a copy of the code, or a README pointer)
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

from .. import __version__
from ..compliance import check_package, default_ruleset, read_log, require_logs, run_result_summarizer
from .score import drop_reasons, olympic_score, spread, summarize_run

TEMPLATE = Path(__file__).with_name("system_template.json")
BENCHMARK = "ssd"
# submission_status in the logs -> "status" of the system description (wording of the 4.x checker).
STATUS_WORDS = {
    "onprem": "Available on-premise",
    "cloud": "Available cloud",
    "research": "Research, Development, or Internal (RDI)",
    "preview": "Preview",
}
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "system"


def _first_value(log, key):
    return next((r.value for r in read_log(log) if r.key == key), None)


def load_system_description(path: str | None, *, org: str, division: str, status: str, system: str | None,
                            platform: str | None = None) -> dict:
    """The filled system description, or the shipped template with the fields the logs determine filled in.

    ``system_name``: ``system`` if given, else the description's own, else ``platform`` (the
    logs' submission_platform), else "system".
    """
    with open(path or TEMPLATE, encoding="utf-8") as fh:
        desc = json.load(fh)
    if path is None or str(desc.get("submitter", "")).startswith("FILL"):
        desc["submitter"] = org
    if path is None or str(desc.get("division", "")).startswith("FILL"):
        desc["division"] = division
    if path is None or str(desc.get("status", "")).startswith("FILL"):
        desc["status"] = STATUS_WORDS.get(status, status)
    if system or str(desc.get("system_name", "")).startswith("FILL"):
        desc["system_name"] = system or platform or "system"
    return desc


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def write_implementation(dest: Path, copy: bool) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if copy:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        shutil.copytree(_REPO_ROOT / "single_stage_detector", dest / "single_stage_detector", ignore=ignore,
                        dirs_exist_ok=True)
        for name in ("pyproject.toml", "Makefile", "README.md", "init_datasets.sh"):
            if (_REPO_ROOT / name).is_file():
                shutil.copy2(_REPO_ROOT / name, dest / name)
        if (_REPO_ROOT / "scripts").is_dir():
            shutil.copytree(_REPO_ROOT / "scripts", dest / "scripts", ignore=ignore, dirs_exist_ok=True)
        return
    commit = _git_commit()
    (dest / "README.md").write_text(
        "# SSD300-ResNet34, PyTorch (single_stage_detector)\n\n"
        f"Implementation: the `single_stage_detector` package, version {__version__}"
        + (f", commit `{commit}`" if commit else "") + ".\n\n"
        "This folder holds a pointer, not a copy: run `python -m single_stage_detector package --copy-implementation"
        " ...` to place the source here.\n\n"
        "Reproduce one result file:\n\n"
        "```\nmake venv\n.venv/bin/python -m single_stage_detector train --data-dir /data/coco --output-dir out/run0\n```\n",
        encoding="utf-8")


def build_package(logs: list[Path], output: Path, *, org: str | None = None, system: str | None = None,
                  system_json: str | None = None, impl: str = "pytorch", copy_implementation: bool = False) -> dict:
    """Write the submission folder. Returns where things went and the fields read from the logs."""
    org = org or _first_value(logs[0], "submission_org") or "org"
    division = _first_value(logs[0], "submission_division") or "open"
    status = _first_value(logs[0], "submission_status") or "onprem"
    desc = load_system_description(system_json, org=org, division=division, status=status, system=system,
                                   platform=_first_value(logs[0], "submission_platform"))
    system_name = _safe_name(desc["system_name"])
    org_dir = output / _safe_name(org)
    if org_dir.exists():
        shutil.rmtree(org_dir)
    (org_dir / "systems").mkdir(parents=True)
    with open(org_dir / "systems" / f"{system_name}.json", "w", encoding="utf-8") as fh:
        json.dump(desc, fh, indent=4)
        fh.write("\n")
    results = org_dir / "results" / system_name / BENCHMARK
    results.mkdir(parents=True)
    for i, log in enumerate(logs):
        shutil.copyfile(log, results / f"result_{i}.txt")
    write_implementation(org_dir / "benchmarks" / BENCHMARK / "implementations" / _safe_name(impl),
                         copy_implementation)
    unfilled = sorted(k for k, v in desc.items() if isinstance(v, str) and v.startswith("FILL"))
    return {"org_dir": org_dir, "results": results, "system": system_name, "division": desc["division"],
            "log_division": division, "unfilled": unfilled}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "package", help="MLPerf submission folder, official package checker and summarizer",
        description="Write OUTPUT/<org>/{systems/<system>.json, results/<system>/ssd/result_N.txt, "
                    "benchmarks/ssd/implementations/<impl>/}, run the official mlperf_logging.package_checker "
                    "and result_summarizer on it and print their verdicts as they give them; lines starting "
                    "with 'ours:' are this tool's own summary. Exit status 1 when an official tool fails, "
                    "warns or crashes.")
    p.add_argument("logs", nargs="+", help="the run logs (5 for a submission): files or folders")
    p.add_argument("--output", default="output/submission", help="folder that gets <org>/")
    p.add_argument("--system-json", default=None,
                   help=f"filled-in system description (template: {TEMPLATE.relative_to(_REPO_ROOT)}); "
                        "default: the template, with submitter/division/status taken from the logs")
    p.add_argument("--org", default=None, help="organisation folder name (default: submission_org of the logs)")
    p.add_argument("--system", default=None,
                   help="system name (default: the logs' submission_platform, else system_name of the system json)")
    p.add_argument("--impl", default="pytorch", help="implementation folder name")
    p.add_argument("--copy-implementation", action="store_true",
                   help="copy the source into the implementation folder (default: a README pointer)")
    p.add_argument("--ruleset", default=None, choices=("1.0.0", "1.1.0"),
                   help="package checker ruleset (default: 1.1.0 for closed logs with the 119 "
                        "weights_initialization events, else 1.0.0)")
    p.add_argument("--no-check", action="store_true", help="only write the folder")
    p.add_argument("--verbose", action="store_true", help="print the official tools' full output")
    p.set_defaults(func=run)


def _official_lines(output: str) -> list[str]:
    """The lines in which an official tool gives a verdict: its WARNING and ERROR lines and its
    final SUCCESS line, verbatim."""
    keep = []
    for line in output.splitlines():
        text = line.rstrip()
        if text.startswith(("WARNING", "ERROR")) or "PACKAGE CHECKER FOUND" in text:
            keep.append(text)
    return keep


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    logs = require_logs(args.logs)
    if args.system_json is not None and not Path(args.system_json).is_file():
        raise ConfigError(f"--system-json: no such file: {args.system_json}")
    if args.system_json is not None:
        try:
            json.loads(Path(args.system_json).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"--system-json: {args.system_json} is not a JSON file ({e})") from None
    if len(logs) != 5:
        print(f"ours: {len(logs)} logs; an SSD submission has exactly 5 (the package checker will say so)")
    ruleset = args.ruleset or min(default_ruleset(f) for f in logs)
    info = build_package(logs, Path(args.output), org=args.org, system=args.system, system_json=args.system_json,
                         impl=args.impl, copy_implementation=args.copy_implementation)
    org_dir = info["org_dir"]
    print(f"package: {org_dir}")
    print(f"  systems/{info['system']}.json")
    for i, log in enumerate(logs):
        print(f"  results/{info['system']}/{BENCHMARK}/result_{i}.txt  <- {log}")
    print(f"  benchmarks/{BENCHMARK}/implementations/{_safe_name(args.impl)}/"
          f" ({'source copy' if args.copy_implementation else 'README pointer'})")
    if info["unfilled"]:
        print(f"ours: {len(info['unfilled'])} system fields still say FILL (e.g. {info['unfilled'][0]}); "
              f"fill in {TEMPLATE.name} and pass it with --system-json (the result summarizer needs them)")
    if info["division"] != info["log_division"]:
        print(f"ours: warning: system division {info['division']!r} != log division {info['log_division']!r}")

    runs = [summarize_run(f) for f in logs]
    score = olympic_score(runs)
    reasons = drop_reasons(runs, score)
    for i, r in enumerate(runs):
        if not r.converged:
            print(f"ours: result_{i}.txt ({r.log}) did not converge (status {r.status})"
                  + (f"; {reasons[r.log]}" if r.log in reasons else ""))
    if score.minutes is not None:
        counted = [r.minutes for r in runs if r.log not in reasons and r.minutes is not None]
        sp = spread(counted)
        print(f"ours: score {score.minutes:.4f} minutes (olympic mean of {score.runs} runs, "
              f"{len(score.dropped)} dropped"
              + (f"; counted runs {sp['min']:.4f} .. {sp['max']:.4f} min, std {sp['std']:.4f}" if sp else "") + ")")
    else:
        print(f"ours: no score ({score.note})")
    if args.no_check:
        return 0

    failed = False
    # The checker's detailed log goes next to the org folder (not inside: it would be checked).
    checker_log = Path(args.output) / "package_checker.log"
    res = check_package(org_dir, ruleset, log_output=checker_log)
    official = _official_lines(res.output)
    warnings = [ln for ln in official if ln.startswith("WARNING")]
    if args.verbose:
        print(res.output.rstrip())
    print(f"official mlperf_logging.package_checker ({org_dir} training {ruleset}), its verdict lines:")
    for line in official or [f"(no verdict line; exit status {res.returncode})"]:
        print(f"  {line}")
    verdict = "PASS" if res.ok and not warnings else ("PASS with warnings" if res.ok else "FAIL")
    failed |= verdict != "PASS"
    print(f"package_checker: {verdict} (exit status {res.returncode}; its detailed log: {checker_log})")

    summ = run_result_summarizer(org_dir, ruleset)
    if args.verbose:
        print(summ.output.rstrip())
    print(f"official mlperf_logging.result_summarizer ({org_dir} training {ruleset}): {summ.message}")
    failed |= not summ.ok
    if summ.ok and score.minutes is not None and abs(summ.minutes - score.minutes) > 1e-6:
        print(f"ours: warning: our score {score.minutes:.4f} differs from the summarizer's {summ.minutes:.4f}")
    return 1 if failed else 0
