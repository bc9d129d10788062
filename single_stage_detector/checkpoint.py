"""Writing run outputs atomically, and reading back the checkpoints that ``train`` writes.

Two kinds of checkpoint, one format (a ``torch.save`` dict):

* ``OUTPUT_DIR/checkpoint.pt``: the model of the finished run (BatchNorm statistics averaged
  over the ranks, as evaluated), for ``evaluate`` / ``show-detections`` / ``--init-checkpoint``.
* ``OUTPUT_DIR/checkpoints/resume-eEEEE-sSSSSSSSS.pt``: everything ``--resume`` needs to
  continue a run exactly (see :func:`resume_state_keys`), written every ``--checkpoint-every``
  epochs, at the end of a run, and when a signal stops it.

Every file is written to a temporary name beside its target, flushed to disk (fsync) and
renamed, so a reader, a crash or a full disk never leaves a partial file under the real name.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "write_json", "save_checkpoint", "load_checkpoint", "checkpoint_data_dir",
           "OutputWriteError", "STORAGE_ERRNOS", "RESUME_DIR", "RESUME_FORMAT", "resume_checkpoint_name",
           "list_resume_checkpoints", "prune_resume_checkpoints", "load_resume_checkpoint"]

RESUME_DIR = "checkpoints"
RESUME_FORMAT = 1  # bumped when the resume state changes incompatibly
_RESUME_NAME = re.compile(r"^resume-e(\d{5})-s(\d{8})\.pt$")
_TEMP_PREFIX = ".tmp-"
# Errors of a write that no retry fixes: the folder or the disk refuses.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


class OutputWriteError(OSError):
    """An output file (checkpoint, JSON) could not be written: full disk, read-only folder, ...

    Raised mid-run by :func:`atomic_write`; the previous complete file under that name, if
    any, is untouched and no temporary file is left behind.
    """


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, fsync it, then rename it over ``path``.

    Readers never see half a file. The file gets the permissions of a plain ``open()``
    (0666 minus the umask, 0644 typically), not the 0600 of the temp file. A failing write
    (``OSError``) removes the temp file and raises :class:`OutputWriteError` naming ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".part", dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as fh:  # the data on disk before the rename makes it visible
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        try:  # the rename itself durable
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass  # some filesystems cannot fsync a folder; the rename is still atomic
    except OSError as e:
        raise OutputWriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except RuntimeError as e:
        # torch.save reports a failed write as a RuntimeError about its zip writer; the
        # OSError of the file object it wrote to (e.g. ENOSPC) is in the exception's context.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, OSError):
            raise OutputWriteError(cause.errno, f"cannot write {path}: {cause.strerror or cause}") from e
        raise OutputWriteError(errno.EIO, f"cannot write {path}: {e}") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """``obj`` as indented JSON at ``path``, atomically (:func:`atomic_write`)."""
    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")

    atomic_write(path, dump)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``state`` holds at least ``model`` (state dict) and ``preset`` (name). Atomic; OutputWriteError on failure."""
    def dump(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a Python file object: its write errors keep their errno
            torch.save(state, fh)

    atomic_write(path, dump)


def load_error_reason(e: BaseException) -> str:
    """The cause of a ``torch.load`` failure in one line, ``"<type>: <first line>"``. The
    weights-only unpickler wraps its cause in a paragraph of advice (re-run with
    ``weights_only=False``) that does not apply to a file that is not a checkpoint at all; only
    the cause after ``WeightsUnpickler error:`` is kept."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    cause = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {cause}" if cause else type(e).__name__


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint of ``train`` (tensors on the CPU).

    Raises ConfigError naming the file if it does not exist, is truncated, or is not a
    checkpoint of ``train`` (a foreign ``torch.save`` file, or any other file).
    """
    from .config import ConfigError

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"checkpoint {path} is a folder, not a file") from None
    except Exception as e:  # zip/pickle errors of a truncated or foreign file
        reason = load_error_reason(e)
        raise ConfigError(f"{path} is not a readable checkpoint of `train` (truncated or foreign file: "
                          f"{reason[:160]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "preset" not in ckpt:
        raise ConfigError(f"{path} is not a checkpoint.pt of `train` (needs 'model' and 'preset')")
    return ckpt


def checkpoint_data_dir(ckpt: dict, path: str | os.PathLike, override: str | os.PathLike | None = None) -> str:
    """``override``, else the (absolute) ``data_dir`` the run that wrote the checkpoint trained on.

    Raises ConfigError suggesting ``--data-dir`` when the checkpoint records none, or one
    that does not exist here (a checkpoint copied to another machine or folder).
    """
    from .config import ConfigError

    if override:
        return os.fspath(override)
    data_dir = ckpt.get("config", {}).get("data_dir")
    if not data_dir:
        raise ConfigError(f"{path} records no data_dir; pass --data-dir")
    if not os.path.isdir(data_dir):
        raise ConfigError(f"{path} was trained on data_dir {data_dir}, which does not exist here; "
                          "pass --data-dir")
    return os.fspath(data_dir)


# -- resume checkpoints -----------------------------------------------------------------------
def resume_checkpoint_name(epoch: int, step: int) -> str:
    """``resume-eEEEEE-sSSSSSSSS.pt``: ``epoch`` completed epochs, ``step`` optimiser steps in all."""
    return f"resume-e{epoch:05d}-s{step:08d}.pt"


def list_resume_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete resume checkpoints of ``output_dir``, oldest first (by step).

    Only renamed (complete) files count: temporary ``.tmp-*.part`` files of an
    interrupted write are never listed.
    """
    folder = Path(output_dir) / RESUME_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := _RESUME_NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def move_aside_resume_checkpoints(output_dir: str | os.PathLike) -> Path | None:
    """Rename the ``checkpoints/`` folder of an earlier run in ``output_dir`` to the first free
    ``checkpoints.N/`` and return the new name (None when it holds no resume checkpoint).

    A fresh run (no ``--resume``) must not mix its resume points with an earlier run's: pruning
    keeps the highest steps, so the earlier run's later checkpoints would survive and this run's
    own be deleted, and ``--resume auto`` would then pick the earlier run's.
    """
    from .mlperf_log import rename_to_first_free  # here: it loads mlperf_logging

    if not list_resume_checkpoints(output_dir):
        return None
    return rename_to_first_free(Path(output_dir) / RESUME_DIR)


def prune_resume_checkpoints(output_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` resume checkpoints (and stale temp files); return the deleted."""
    folder = Path(output_dir) / RESUME_DIR
    removed = []
    for p in list_resume_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
        removed.append(p)
    if folder.is_dir():
        for p in folder.glob(f"{_TEMP_PREFIX}*.part"):  # left by a process killed mid-write
            p.unlink(missing_ok=True)
    return removed


def load_resume_checkpoint(path: str | os.PathLike) -> dict:
    """A resume checkpoint (tensors on the CPU); ConfigError naming the file if it is not one."""
    from .config import ConfigError

    ckpt = load_checkpoint(path)
    if "resume" not in ckpt:
        raise ConfigError(f"{path} is a model checkpoint without the training state; --resume needs one of "
                          f"OUTPUT_DIR/{RESUME_DIR}/resume-*.pt")
    if ckpt["resume"].get("format") != RESUME_FORMAT:
        raise ConfigError(f"{path} holds resume format {ckpt['resume'].get('format')!r}; this version reads "
                          f"{RESUME_FORMAT}")
    return ckpt
