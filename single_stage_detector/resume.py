"""What a run needs to stop and continue exactly: per-rank state, finding and checking the
checkpoint to resume from, and a check that the output folder can take the run's files.

A resume checkpoint (see :mod:`single_stage_detector.checkpoint`) holds rank 0's model,
optimiser and grad-scaler state, the EMA of the weights under ``ema`` when the run keeps one
(``--ema``: :meth:`single_stage_detector.recipe.ModelEMA.state_dict`; the same on every
rank), and under ``resume``:

* ``epoch`` (completed epochs), ``step_in_epoch`` (optimiser steps done in the next one),
  ``step`` (optimiser steps in all: the LR schedule's position), ``seed``, ``world_size``;
* ``data``: the backend and the position ``(epoch, batch)`` to restart the input at; the
  batches and their augmentation are functions of (seed, epoch, position) in both backends;
* ``ranks``: for every rank, its RNG states (Python, NumPy, torch CPU, CUDA) and its model
  buffers (the BatchNorm running statistics, which each rank keeps from its own data);
* the run's progress so far (evaluations, skipped samples) for its summary.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import RESUME_DIR, list_resume_checkpoints, load_resume_checkpoint
from .config import ConfigError, TrainConfig
from .distributed import DistInfo

__all__ = ["capture_rank_state", "restore_rank_state", "gather_over_ranks", "find_resume_checkpoint",
           "check_resume_matches", "check_output_writable", "checkpoint_size_estimate"]


def capture_rank_state(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """This process's RNG states and ``model``'s buffers (copies, on the CPU), as plain data
    that ``torch.load(weights_only=True)`` reads back."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "buffers": {name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()},
    }
    return state


def restore_rank_state(state: dict[str, Any], model: nn.Module, device: torch.device) -> None:
    """Undo :func:`capture_rank_state`: the RNG states and the model's buffers, in place."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    buffers = dict(model.named_buffers())
    missing = set(buffers) ^ set(state["buffers"])
    if missing:
        raise ConfigError(f"the checkpoint's model buffers do not match this model ({sorted(missing)[:3]} ...)")
    with torch.no_grad():
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)


def gather_over_ranks(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (one all-gather; at checkpoints only)."""
    if not info.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def find_resume_checkpoint(cfg: TrainConfig, info: DistInfo) -> tuple[Path, dict] | None:
    """The checkpoint ``--resume`` names, loaded, on every rank; None for a fresh start.

    ``auto``: the newest complete checkpoint in ``OUTPUT_DIR/checkpoints/`` (rank 0 picks
    it, so all ranks read the same file), or None when there is none. Raises ConfigError
    naming the file when it is missing, truncated, foreign or not a resume checkpoint.
    Collective when distributed.
    """
    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        found = list_resume_checkpoints(cfg.output_dir) if info.is_main else []
        path = _broadcast_object(str(found[-1]) if found else None, info)
        if path is None:
            return None
    else:
        path = cfg.resume
    return Path(path), load_resume_checkpoint(path)


def check_resume_matches(cfg: TrainConfig, path: Path, ckpt: dict, preset_name: str, info: DistInfo) -> None:
    """Refuse (ConfigError naming the file and the flags) to continue a checkpoint with another
    model, process count or training setting: the continuation would not be that run's."""
    state = ckpt["resume"]
    if ckpt["preset"] != preset_name:
        raise ConfigError(f"--resume: {path} holds preset {ckpt['preset']!r}, this run is {preset_name!r}")
    if state["world_size"] != info.world_size:
        raise ConfigError(f"--resume: {path} was written by {state['world_size']} process(es); this launch has "
                          f"{info.world_size} (the data shards and per-rank states need the same number)")
    if cfg.seed is not None and cfg.seed != state["seed"]:
        raise ConfigError(f"--resume: {path} was trained with --seed {state['seed']}, not {cfg.seed}")
    differ = cfg.differences_for_resume(ckpt.get("config", {}))
    if differ:
        raise ConfigError(f"--resume: {path} was trained with other settings: {'; '.join(differ)}")


def checkpoint_size_estimate(model: nn.Module, extra_copies: int = 0) -> int:
    """Bytes of a resume checkpoint of ``model``: weights and buffers, SGD momentum (or AdamW's
    first moment), per-rank buffers, ``extra_copies`` more parameter-sized tensors (AdamW's
    second moment, an EMA of the weights), plus a margin for the pickled structure (an upper
    bound, for the free-space check)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return int((2 + extra_copies) * params + 2 * buffers + 1_000_000)


def check_output_writable(cfg: TrainConfig, checkpoint_bytes: int) -> None:
    """Before the run logs anything: every output folder can be created and written, and the
    output folder's disk has room for the checkpoints the run will keep.

    Raises ConfigError naming the folder and the flag (``--output-dir``, ``--log-file``,
    ``--metrics-file``, ``--tensorboard-dir``) with the system's reason (read-only, permission,
    no space).
    """
    folders = {os.path.dirname(os.path.abspath(cfg.resolved_log_file())): "--log-file",
               os.path.dirname(os.path.abspath(cfg.resolved_metrics_file())): "--metrics-file",
               os.path.abspath(cfg.output_dir): "--output-dir"}
    if cfg.save_checkpoint:
        folders[os.path.join(os.path.abspath(cfg.output_dir), RESUME_DIR)] = "--output-dir"
    if cfg.tensorboard_dir:
        folders[os.path.abspath(cfg.tensorboard_dir)] = "--tensorboard-dir"
    for folder, flag in folders.items():
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ConfigError(f"{flag} {folder} is a file, not a folder")
        try:
            os.makedirs(folder, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".tmp-write-check-", dir=folder)
            try:
                os.write(fd, b"x")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            raise ConfigError(f"{flag} {folder} is not writable: {e.strerror or e}") from None
    if cfg.save_checkpoint:
        # The kept resume checkpoints, the one being written, and checkpoint.pt (about half one).
        need = checkpoint_bytes * (cfg.keep_checkpoints + 2)
        free = shutil.disk_usage(cfg.output_dir).free
        if free < need:
            raise ConfigError(f"--output-dir {cfg.output_dir}: {free / 2**20:.1f} MiB free, the run's checkpoints "
                              f"need about {need / 2**20:.1f} MiB ({cfg.keep_checkpoints} kept + 1 being written "
                              "+ checkpoint.pt); free space, choose another --output-dir, lower "
                              "--keep-checkpoints, or pass --no-save-checkpoint")
