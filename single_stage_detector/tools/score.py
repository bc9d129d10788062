"""``score``: time to train of each run, the MLPerf score of a set of runs, and the official RCP check."""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, dataclass, field

from ..compliance import RCP_VERSION, check_rcp, read_log, require_logs

RUNS_PER_SCORE = 5  # SSD: 5 runs, olympic mean (SPEC.md section 8)
# Logged settings that must agree for runs to be scored together (one configuration).
HYPERPARAMETER_KEYS = ("submission_benchmark", "submission_division", "global_batch_size",
                       "opt_base_learning_rate", "opt_weight_decay", "opt_learning_rate_warmup_steps",
                       "opt_learning_rate_warmup_factor", "opt_learning_rate_decay_boundary_epochs",
                       "max_samples", "model_bn_span", "gradient_accumulation_steps")


@dataclass
class RunSummary:
    log: str
    status: str  # run_stop status ("success", "aborted") or "incomplete"
    converged: bool
    time_to_train_s: float | None  # run_stop - run_start
    epochs_to_converge: float | None  # epoch_num of the last eval_accuracy before a successful run_stop
    best_accuracy: float | None
    evaluations: int
    global_batch_size: int | None
    division: str | None
    seed: int | None
    benchmark: str | None
    hyperparameters: dict = field(default_factory=dict)  # HYPERPARAMETER_KEYS found in the log

    @property
    def minutes(self) -> float | None:
        return None if self.time_to_train_s is None else self.time_to_train_s / 60.0


def summarize_run(log_file) -> RunSummary:
    from ..mlperf_log import RESUMED_KEY  # here: it loads mlperf_logging, too slow for `--help`

    records = read_log(log_file)

    def first(key):
        return next((r for r in records if r.key == key), None)

    start, stop = first("run_start"), first("run_stop")
    status = "incomplete" if stop is None else str(stop.metadata.get("status", "missing"))
    if any(r.key == RESUMED_KEY for r in records):
        status = "resumed"  # two runs' pieces: no time to train (not converged for the score)
    evals = [r for r in records if r.key == "eval_accuracy"]
    before_stop = [r for r in evals if stop is None or r.time_ms <= stop.time_ms]
    converged = status == "success"
    epochs = before_stop[-1].metadata.get("epoch_num") if converged and before_stop else None
    values = [r.value for r in evals if isinstance(r.value, (int, float))]
    value = lambda key: first(key).value if first(key) is not None else None  # noqa: E731
    return RunSummary(
        log=str(log_file), status=status, converged=converged,
        # A resumed log is two runs' pieces: its first run_start .. run_stop is only the first piece.
        time_to_train_s=((stop.time_ms - start.time_ms) / 1000.0
                         if start is not None and stop is not None and status != "resumed" else None),
        epochs_to_converge=epochs, best_accuracy=max(values) if values else None, evaluations=len(evals),
        global_batch_size=value("global_batch_size"), division=value("submission_division"), seed=value("seed"),
        benchmark=value("submission_benchmark"),
        hyperparameters={k: value(k) for k in HYPERPARAMETER_KEYS if first(k) is not None})


def hyperparameter_differences(runs: list[RunSummary]) -> dict[str, dict[str, int]]:
    """The logged settings on which ``runs`` disagree: ``{key: {value as JSON: number of runs}}``."""
    diffs: dict[str, dict[str, int]] = {}
    for key in HYPERPARAMETER_KEYS:
        counts: dict[str, int] = {}
        for r in runs:
            v = json.dumps(r.hyperparameters.get(key))
            counts[v] = counts.get(v, 0) + 1
        if len(counts) > 1:
            diffs[key] = counts
    return diffs


def spread(minutes: list[float]) -> dict[str, float] | None:
    """Min, max, sample standard deviation and its share of the mean (%), of run times in minutes;
    None for fewer than 2 runs."""
    if len(minutes) < 2:
        return None
    mean = sum(minutes) / len(minutes)
    std = math.sqrt(sum((m - mean) ** 2 for m in minutes) / (len(minutes) - 1))
    return {"min": min(minutes), "max": max(minutes), "std": std, "rel_std_percent": 100.0 * std / mean}


def drop_reasons(runs: list[RunSummary], score: "Score") -> dict[str, str]:
    """Why each dropped log is left out of the mean: fastest, slowest or not converged."""
    converged = sorted((r for r in runs if r.converged and r.time_to_train_s is not None),
                       key=lambda r: r.time_to_train_s)
    reasons = {}
    for log in score.dropped:
        if converged and log == converged[0].log:
            reasons[log] = "dropped: fastest"
        elif converged and log == converged[-1].log:
            reasons[log] = "dropped: slowest"
        else:
            reasons[log] = "dropped: not converged"
    return reasons


@dataclass
class Score:
    minutes: float | None  # None: no score (too few runs converged)
    runs: int
    converged: int
    dropped: list[str] = field(default_factory=list)  # logs left out of the mean
    note: str = ""


def olympic_score(runs: list[RunSummary]) -> Score:
    """MLPerf score: drop the fastest and the slowest run, mean of the rest, minutes.

    A run that did not converge counts as infinitely slow (it is the slowest, dropped); with
    more than one such run there is no score. The mean itself is the official result
    summarizer's ``_compute_olympic_average``.
    """
    from mlperf_logging.result_summarizer.result_summarizer import _compute_olympic_average

    ok = [r for r in runs if r.converged and r.time_to_train_s is not None]
    not_ok = [r for r in runs if r not in ok]
    n_conv = len(ok)
    note = ""
    if len(runs) != RUNS_PER_SCORE:
        note = f"an MLPerf score needs {RUNS_PER_SCORE} runs, got {len(runs)}"
    if len(not_ok) > 1 or len(runs) < 3:
        reason = (f"{len(not_ok)} of {len(runs)} runs did not converge (at most 1 may be dropped)"
                  if len(not_ok) > 1 else f"{len(runs)} runs: need at least 3")
        return Score(None, len(runs), n_conv, [r.log for r in not_ok], "; ".join(x for x in (note, reason) if x))
    ordered = sorted(ok, key=lambda r: r.time_to_train_s)
    dropped = [r.log for r in not_ok]
    minutes = [r.minutes for r in ordered]
    mean = _compute_olympic_average(list(minutes), len(not_ok), 1)
    # The fastest is always dropped; the slowest too unless a non-converged run took its place.
    dropped = [ordered[0].log] + ([ordered[-1].log] if not not_ok else []) + dropped
    return Score(mean, len(runs), n_conv, dropped, note)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "score", help="time to train per run, MLPerf score and spread, RCP check",
        description="Per run: time to train (run_stop - run_start), converged or not, epochs to converge. "
                    "For the set: the MLPerf score (5 runs, drop fastest and slowest, mean of the rest, "
                    "minutes) and the official RCP check (mlperf_logging.rcp_checker) for the global batch size.")
    p.add_argument("logs", nargs="+", help="log files, or folders searched for *.log / result_*.txt logs")
    p.add_argument("--rcp-version", default=RCP_VERSION, help="RCP version (training_X RCP tables of mlperf_logging)")
    p.add_argument("--no-rcp", action="store_true", help="skip the RCP check")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def run(args: argparse.Namespace) -> int:
    logs = require_logs(args.logs, mlperf_only=True)
    runs = [summarize_run(f) for f in logs]
    score = olympic_score(runs)
    batch_sizes = sorted({r.global_batch_size for r in runs if r.global_batch_size is not None})
    # The RCP checker compares the runs of one global batch size with that size's reference
    # points; given several sizes it crashes (KeyError: None) instead of saying so.
    rcp_skipped = (f"not run: the runs differ in global batch size ({', '.join(map(str, batch_sizes))}); "
                   f"the RCP check is over runs of one batch size") if len(batch_sizes) > 1 else None
    rcp = None if args.no_rcp or rcp_skipped else check_rcp(logs, args.rcp_version)
    reasons = drop_reasons(runs, score)
    counted = [r for r in runs if r.log not in reasons and r.minutes is not None] if score.minutes is not None else []
    counted_spread = spread([r.minutes for r in counted])
    diffs = hyperparameter_differences(runs)
    if args.json:
        out = {
            "runs": [{**asdict(r), "minutes": r.minutes,
                      "in_score": reasons.get(r.log, "counted" if r in counted else "no score")} for r in runs],
            "score_minutes": score.minutes, "score_runs": score.runs, "converged_runs": score.converged,
            "dropped": score.dropped, "note": score.note, "global_batch_size": batch_sizes,
            "spread_minutes": counted_spread, "hyperparameter_differences": diffs,
            "rcp": ({"version": args.rcp_version, "passed": None, "message": rcp_skipped}
                    if rcp_skipped and not args.no_rcp else
                    None if rcp is None else {"version": args.rcp_version, "passed": rcp.ok, "message": rcp.message}),
        }
        print(json.dumps(out, indent=2))
        return 0
    common = os.path.commonpath([os.path.abspath(r.log) for r in runs]) if len(runs) > 1 else ""
    name = lambda r: os.path.relpath(os.path.abspath(r.log), common) if common else r.log  # noqa: E731
    width = max(12, *(len(name(r)) for r in runs))
    print(f"{'run':<{width}}  {'status':<10} {'converged':<9} {'seconds':>9} {'minutes':>8} {'epochs':>6} "
          f"{'best acc':>8} {'batch':>6} {'seed':>10}  in score")
    for r in runs:
        used = reasons.get(r.log, "counted" if r in counted else "-")
        print(f"{name(r):<{width}}  {r.status:<10} {'yes' if r.converged else 'no':<9} "
              f"{_fmt(r.time_to_train_s, '.1f'):>9} {_fmt(r.minutes, '.3f'):>8} {_fmt(r.epochs_to_converge, 'g'):>6} "
              f"{_fmt(r.best_accuracy, '.4f'):>8} {_fmt(r.global_batch_size, 'd'):>6} {_fmt(r.seed, 'd'):>10}  {used}")
    if common:
        print(f"(runs under {common})")
    if score.minutes is not None:
        print(f"MLPerf score: {score.minutes:.4f} minutes (olympic mean of {score.runs} runs: "
              f"{len(counted)} counted, {len(score.dropped)} dropped)")
        if counted_spread:
            print(f"spread of the counted runs: {counted_spread['min']:.4f} .. {counted_spread['max']:.4f} minutes, "
                  f"standard deviation {counted_spread['std']:.4f} minutes "
                  f"({counted_spread['rel_std_percent']:.1f} % of their mean)")
    else:
        print("MLPerf score: none")
    if score.note:
        print(f"note: {score.note}")
    for key, counts in diffs.items():
        detail = ", ".join(f"{v} in {n} run(s)" for v, n in counts.items())
        print(f"warning: the runs differ in {key} ({detail}): an MLPerf score is over runs of one configuration")
    seeds = [r.seed for r in runs if r.seed is not None]
    if len(seeds) > 1 and len(set(seeds)) < len(seeds):
        print("warning: several runs share a seed: they are repeats of one run, not independent trials")
    if rcp_skipped and not args.no_rcp:
        print(f"RCP check (rcp_checker --rcp_version {args.rcp_version}): {rcp_skipped}")
    if rcp is not None:
        bs = ", ".join(map(str, batch_sizes)) or "?"
        print(f"RCP check (rcp_checker --rcp_version {args.rcp_version}, global batch size {bs}): "
              f"{'PASSED' if rcp.ok else 'FAILED'}: {rcp.message}")
    return 0
