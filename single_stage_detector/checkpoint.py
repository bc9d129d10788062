"""Writing run outputs atomically, and reading back the ``checkpoint.pt`` that ``train`` writes."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import torch

__all__ = ["atomic_write", "write_json", "save_checkpoint", "load_checkpoint", "checkpoint_data_dir"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, then rename it: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(obj: Any, path: str | os.PathLike) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=str)
            fh.write("\n")

    atomic_write(path, dump)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """``state`` holds at least ``model`` (state dict) and ``preset`` (name)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A ``checkpoint.pt`` of ``train`` (tensors on the CPU); ConfigError naming the file if it is not one."""
    from .config import ConfigError

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "preset" not in ckpt:
        raise ConfigError(f"{path} is not a checkpoint.pt of `train` (needs 'model' and 'preset')")
    return ckpt


def checkpoint_data_dir(ckpt: dict, path: str | os.PathLike, override: str | os.PathLike | None = None) -> str:
    """``override``, else the ``data_dir`` the run that wrote the checkpoint trained on."""
    from .config import ConfigError

    data_dir = override or ckpt.get("config", {}).get("data_dir")
    if not data_dir:
        raise ConfigError(f"{path} records no data_dir; pass --data-dir")
    return os.fspath(data_dir)
