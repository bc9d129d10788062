"""``plot``: PNG charts of a run (loss, learning rate, images/s, eval mAP against time and epoch) and an
overlay of several runs, from MLPerf logs and the trainer's ``metrics.jsonl``.

Files written (fixed pixel sizes, figure inches x 100 dpi):

* ``metrics_vs_time.png`` (1200 x 800): 2 x 2 panels against seconds since ``run_start``;
* ``metrics_vs_epoch.png`` (1200 x 800): the same against (fractional) epoch;
* ``loss_map.png`` (1000 x 400): training loss and eval mAP with the target, side by side;
* ``loss_map_vs_step.png`` (1000 x 400): batch loss, val loss and eval mAP against optimiser steps;
* ``overlay.png`` (1200 x 450), with several logs: eval mAP of every run against time and epoch.

With several logs the per-run charts go to ``OUTPUT/<run name>/``. The loss panels draw the loss
of each logged batch as a line and, where the run computed it (``--val-loss``), the loss on the
val images at each evaluation as points.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..compliance import read_log, require_logs, run_folder

DPI = 100
SIZES = {"metrics_vs_time.png": (12, 8), "metrics_vs_epoch.png": (12, 8), "loss_map.png": (10, 4),
         "loss_map_vs_step.png": (10, 4), "overlay.png": (12, 4.5)}
DEFAULT_TARGET = 0.23


@dataclass
class RunCurves:
    name: str
    log: Path
    target: float
    status: str = "?"
    evals: list[tuple[float, float, float]] = field(default_factory=list)  # (seconds, epoch, mAP)
    epochs: list[tuple[int, float, float]] = field(default_factory=list)  # (epoch, start s, stop s)
    train: list[dict] = field(default_factory=list)  # metrics.jsonl "train" records with "t" (s)
    epoch_rate: list[tuple[float, float, float]] = field(default_factory=list)  # (s, epoch, images/s)
    eval_records: list[dict] = field(default_factory=list)  # metrics.jsonl "eval" records with "t" (s)
    metrics_file: Path | None = None

    def epoch_at(self, t: float) -> float:
        """Fractional epoch at ``t`` seconds after run_start (interpolated within epoch_start..epoch_stop)."""
        for num, start, stop in self.epochs:
            if t <= stop or num == self.epochs[-1][0]:
                if stop <= start:
                    return float(num)
                return num - 1 + min(max((t - start) / (stop - start), 0.0), 1.0)
        return float("nan")


def _target_from(log: Path, default: float) -> float:
    cfg = run_folder(log) / "config.json"
    try:
        return float(json.loads(cfg.read_text())["config"]["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def load_run(log: Path, metrics: Path | None = None, target: float | None = None, name: str | None = None) -> RunCurves:
    records = read_log(log)
    start = next((r.time_ms for r in records if r.key == "run_start"), records[0].time_ms if records else 0.0)
    stop = next((r for r in records if r.key == "run_stop"), None)
    name = name or (log.parent.name if log.name == "mlperf.log" else log.stem)
    run = RunCurves(name=name, log=log, target=target if target is not None else _target_from(log, DEFAULT_TARGET),
                    status=str(stop.metadata.get("status", "?")) if stop else "incomplete")
    sec = lambda ms: (ms - start) / 1000.0  # noqa: E731
    starts = {r.metadata.get("epoch_num"): sec(r.time_ms) for r in records if r.key == "epoch_start"}
    for r in records:
        if r.key == "epoch_stop" and r.metadata.get("epoch_num") in starts:
            n = r.metadata["epoch_num"]
            run.epochs.append((n, starts[n], sec(r.time_ms)))
    run.epochs.sort()
    for r in records:
        if r.key == "eval_accuracy" and isinstance(r.value, (int, float)):
            run.evals.append((sec(r.time_ms), float(r.metadata.get("epoch_num", math.nan)), float(r.value)))
    train_samples = next((r.value for r in records if r.key == "train_samples"), None)
    metrics = metrics if metrics is not None else run_folder(log) / "metrics.jsonl"
    if metrics.is_file():
        run.metrics_file = metrics
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or "time" not in rec:
                continue
            t = float(rec["time"]) - start / 1000.0
            if rec.get("kind") == "train":
                run.train.append({**rec, "t": t})
            elif rec.get("kind") == "eval":
                run.eval_records.append({**rec, "t": t})
            elif rec.get("kind") == "epoch" and "images_per_s" in rec:
                run.epoch_rate.append((t, float(rec.get("epoch", math.nan)), float(rec["images_per_s"])))
    if not run.epoch_rate and train_samples:
        run.epoch_rate = [(b, float(n), train_samples / (b - a)) for n, a, b in run.epochs if b > a]
    return run


def _figure(name: str, rows: int, cols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=SIZES[name], dpi=DPI, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays the documented one
    plt.close(fig)
    return path


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=ax.transAxes, color="gray")


def _panel(ax, run: RunCurves, quantity: str, by_epoch: bool) -> None:
    xlabel = "epoch" if by_epoch else "seconds since run_start"
    x_of = (lambda t, e: e) if by_epoch else (lambda t, e: t)  # noqa: E731
    if quantity == "mAP":
        if run.evals:
            ax.plot([x_of(t, e) for t, e, _ in run.evals], [v for _, _, v in run.evals], "o-", color="tab:blue",
                    label="eval mAP")
        else:
            _no_data(ax, "eval_accuracy events")
        ax.axhline(run.target, color="tab:red", linestyle="--", label=f"target {run.target:g}")
        ax.set_ylabel("COCO AP@[.5:.95]")
        ax.legend(loc="lower right", fontsize=8)
    elif quantity == "images/s":
        pts = ([(x_of(r["t"], run.epoch_at(r["t"])), r["images_per_s"]) for r in run.train if "images_per_s" in r]
               if run.train else [])
        if pts:
            ax.plot(*zip(*pts), ".-", color="tab:green", alpha=0.5, label="logging interval")
        if run.epoch_rate:
            ax.plot([x_of(t, e) for t, e, _ in run.epoch_rate], [v for _, _, v in run.epoch_rate], "s-",
                    color="tab:olive", label="epoch mean")
        if not pts and not run.epoch_rate:
            _no_data(ax, "throughput data")
        else:
            ax.legend(loc="lower right", fontsize=8)
        ax.set_ylabel("training images/s")
    else:
        key = "loss" if quantity == "loss" else "lr"
        pts = [(x_of(r["t"], run.epoch_at(r["t"])), r[key]) for r in run.train if key in r]
        val = [(x_of(r["t"], float(r["epoch"])), r["val_loss"]) for r in run.eval_records
               if key == "loss" and "val_loss" in r and "epoch" in r]
        _loss_lines(ax, pts, val, "metrics.jsonl", color="tab:purple" if key == "loss" else "tab:orange",
                    label="batch loss" if key == "loss" else None)
        ax.set_ylabel("loss" if key == "loss" else "learning rate")
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)


def _loss_lines(ax, train: list, val: list, missing: str, color: str, label: str | None) -> None:
    """A line of logged values and, if any, the val loss as points; a log scale when all are positive."""
    if train:
        ax.plot(*zip(*train), "-", color=color, label=label)
    if val:
        ax.plot(*zip(*val), "o-", color="tab:cyan", label="val loss")
    if not train and not val:
        _no_data(ax, missing)
        return
    if all(v > 0 for _, v in train + val):
        ax.set_yscale("log")
    if label is not None or val:
        ax.legend(loc="upper right", fontsize=8)


def _step_panel(ax, run: RunCurves, quantity: str) -> None:
    """``quantity`` ("loss" or "mAP") against optimiser steps (metrics.jsonl ``step``)."""
    evals = [r for r in run.eval_records if "step" in r]
    if quantity == "loss":
        train = [(r["step"], r["loss"]) for r in run.train if "step" in r and "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in evals if "val_loss" in r]
        _loss_lines(ax, train, val, "metrics.jsonl", color="tab:purple", label="batch loss")
        ax.set_ylabel("loss")
    else:
        if evals:
            ax.plot([r["step"] for r in evals], [r["ap"] for r in evals], "o-", color="tab:blue", label="eval mAP")
        else:
            _no_data(ax, "evaluations with a step in metrics.jsonl")
        ax.axhline(run.target, color="tab:red", linestyle="--", label=f"target {run.target:g}")
        ax.set_ylabel("COCO AP@[.5:.95]")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("optimiser step")
    ax.grid(True, alpha=0.3)


def plot_run(run: RunCurves, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for by_epoch, fname in ((False, "metrics_vs_time.png"), (True, "metrics_vs_epoch.png")):
        fig, axes = _figure(fname, 2, 2)
        for ax, q in zip(axes.flat, ("loss", "lr", "images/s", "mAP")):
            _panel(ax, run, q, by_epoch)
        fig.suptitle(f"{run.name}: {run.status}")
        fig.tight_layout()
        written.append(_save(fig, out_dir / fname))
    fig, axes = _figure("loss_map.png", 1, 2)
    _panel(axes[0, 0], run, "loss", False)
    _panel(axes[0, 1], run, "mAP", False)
    fig.suptitle(f"{run.name}: training loss and eval mAP")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "loss_map.png"))
    fig, axes = _figure("loss_map_vs_step.png", 1, 2)
    _step_panel(axes[0, 0], run, "loss")
    _step_panel(axes[0, 1], run, "mAP")
    axes[0, 1].set_xlim(axes[0, 0].get_xlim())  # the same steps under both panels
    fig.suptitle(f"{run.name}: batch loss, val loss and eval mAP")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "loss_map_vs_step.png"))
    return written


def plot_overlay(runs: list[RunCurves], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = _figure("overlay.png", 1, 2)
    for col, by_epoch in enumerate((False, True)):
        ax = axes[0, col]
        for run in runs:
            if run.evals:
                xs = [e if by_epoch else t for t, e, _ in run.evals]
                ax.plot(xs, [v for _, _, v in run.evals], "o-", markersize=3, label=f"{run.name} ({run.status})")
        targets = sorted({r.target for r in runs})
        for tg in targets:
            ax.axhline(tg, color="tab:red", linestyle="--", label=f"target {tg:g}")
        ax.set_xlabel("epoch" if by_epoch else "seconds since run_start")
        ax.set_ylabel("COCO AP@[.5:.95]")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"eval mAP of {len(runs)} runs")
    fig.tight_layout()
    return _save(fig, out_dir / "overlay.png")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot", help="PNG charts of loss, LR, images/s and eval mAP; overlay of runs",
        description="Charts from MLPerf logs and the metrics.jsonl of each run (next to train's mlperf.log; "
                    "in LOGDIR/RUN/ for the launchers' LOGDIR/RUN.log; or --metrics). One log: "
                    "metrics_vs_time.png, metrics_vs_epoch.png, loss_map.png, loss_map_vs_step.png (batch loss, "
                    "val loss and mAP against steps). Several: the same per run "
                    "in OUTPUT/<run>/ plus overlay.png.")
    p.add_argument("logs", nargs="+", help="MLPerf log files, run output folders, or folders of logs")
    p.add_argument("--metrics", default=None, help="metrics.jsonl of a single log (default: the run's own)")
    p.add_argument("--output", "-o", default=None,
                   help="output folder (default: plots/ in the run's folder; for several logs, plots/ "
                        "next to the first log)")
    p.add_argument("--target", type=float, default=None,
                   help=f"target mAP line (default: threshold in config.json next to the log, else {DEFAULT_TARGET})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logs = require_logs(args.logs, mlperf_only=True)
    from ..config import ConfigError

    if args.metrics and len(logs) > 1:
        raise ConfigError(f"--metrics: names the metrics of one log; got {len(logs)} logs")
    if args.metrics and not os.path.isfile(args.metrics):
        raise ConfigError(f"--metrics: no such file: {args.metrics}")
    names: dict[str, int] = {}
    runs = []
    for log in logs:
        r = load_run(log, Path(args.metrics) if args.metrics else None, args.target)
        if r.name in names:  # keep per-run folders distinct
            names[r.name] += 1
            r.name = f"{r.name}_{names[r.name]}"
        else:
            names[r.name] = 0
        runs.append(r)
    out = Path(args.output) if args.output else (run_folder(logs[0]) if len(runs) == 1 else logs[0].parent) / "plots"
    written = []
    if len(runs) == 1:
        written += plot_run(runs[0], out)
    else:
        for r in runs:
            written += plot_run(r, out / r.name)
        written.append(plot_overlay(runs, out))
    for r in runs:
        if r.metrics_file is None:
            print(f"note: no metrics.jsonl for {r.log} (looked in {run_folder(r.log)}): "
                  "loss and learning-rate panels are empty")
    for path in written:
        print(f"wrote {path}")
    print(f"plots: {os.path.abspath(out)}")
    return 0
