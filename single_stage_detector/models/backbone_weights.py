"""Reading and writing the ResNet-34 backbone weights (ImageNet initialisation).

Two file formats are accepted (docs/CONTRACTS.md):

* torchvision's ``resnet34-333f7ec4.pth``: a pickled state dict, read with
  ``torch.load(weights_only=True)``; ``layer4.*`` and ``fc.*`` are dropped;
* the converted ``.npz`` (``scripts/torch_to_numpy.py`` via :func:`save_backbone_npz`):
  float32 arrays keyed by torchvision names, ``layer4``/``fc`` already dropped, plus a
  ``__format__`` entry (``ssd-resnet34-backbone-v1``). Loads without pickle.

BatchNorm ``num_batches_tracked`` counters are optional in both (the 2017 torchvision
file predates them); missing ones are filled with 0, and the ``.npz`` does not store them.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BackboneWeightsError",
    "NPZ_FORMAT",
    "load_backbone_state_dict",
    "load_backbone_into",
    "save_backbone_npz",
]

NPZ_FORMAT = "ssd-resnet34-backbone-v1"
_FORMAT_KEY = "__format__"
_DROPPED_PREFIXES = ("layer4.", "fc.")  # torchvision ResNet-34 parts the SSD backbone lacks
_COUNTER_SUFFIX = "num_batches_tracked"
_GET_HINT = "download and convert it with scripts/get_resnet34_backbone.sh"
_MAX_LISTED = 5


class BackboneWeightsError(Exception):
    """A backbone weights file is missing, unreadable, or does not fit the backbone."""


def _fmt_list(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def _reference_shapes(reference: nn.Module | None) -> dict[str, torch.Size]:
    if reference is None:
        from .resnet import ResNet34Backbone

        # Meta device: shapes only, no memory, no init cost.
        with torch.device("meta"):
            reference = ResNet34Backbone()
    return {k: v.shape for k, v in reference.state_dict().items()}


def _is_npz(path: Path) -> bool:
    # torch.save also writes zip archives, but their members are not *.npy files.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith(".npy") for name in zf.namelist())


def _read_npz(path: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            arr = data[key]
            if key == _FORMAT_KEY:
                if str(arr) != NPZ_FORMAT:
                    raise BackboneWeightsError(
                        f"{path}: unknown backbone file format {str(arr)!r} (expected {NPZ_FORMAT!r})"
                    )
                continue
            out[key] = torch.from_numpy(np.array(arr))  # own, writable copy
    return out


def _read_torch(path: Path) -> dict[str, Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise BackboneWeightsError(f"{path}: not a state dict of tensors (entries {_fmt_list(bad)})")
    return dict(obj)


def _read_raw(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise BackboneWeightsError(f"backbone weights file not found: {path} ({_GET_HINT})")
    if not path.is_file():
        raise BackboneWeightsError(f"backbone weights path is not a file: {path}")
    try:
        return _read_npz(path) if _is_npz(path) else _read_torch(path)
    except BackboneWeightsError:
        raise
    except Exception as exc:  # pickle, zip, numpy and torch all raise their own types
        from ..checkpoint import load_error_reason

        raise BackboneWeightsError(
            f"{path}: cannot read backbone weights ({load_error_reason(exc)}); the file may be "
            f"truncated or corrupt, {_GET_HINT}"
        ) from exc


def _normalise(state: Mapping[str, Tensor], expected: Mapping[str, torch.Size], source: str,
               dropped: tuple[str, ...] = _DROPPED_PREFIXES) -> dict[str, Tensor]:
    """Drop ``dropped`` (layer4/fc), check keys and shapes against ``expected``, set dtypes (float32, int64)."""
    state = {k: v for k, v in state.items() if not k.startswith(dropped)}
    required = [k for k in expected if not k.endswith(_COUNTER_SUFFIX)]
    missing = [k for k in required if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k])}"
        for k, v in state.items()
        if k in expected and not k.endswith(_COUNTER_SUFFIX) and v.shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt_list(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_fmt_list(mismatched)}")
    if problems:
        raise BackboneWeightsError(f"{source}: does not fit the ResNet-34 backbone; " + "; ".join(problems))

    out: dict[str, Tensor] = {}
    for key in expected:  # model order
        if key.endswith(_COUNTER_SUFFIX):
            value = state.get(key)
            out[key] = torch.tensor(0 if value is None else int(value.item()), dtype=torch.int64)
            continue
        value = state[key]
        if not value.is_floating_point():
            raise BackboneWeightsError(f"{source}: {key} has dtype {value.dtype}, expected floating point")
        out[key] = value.to(torch.float32)  # no copy (bit-identical) when already float32
    return out


def load_backbone_state_dict(
    path: str | os.PathLike[str], reference: nn.Module | None = None, *,
    dropped_prefixes: tuple[str, ...] = _DROPPED_PREFIXES,
) -> dict[str, Tensor]:
    """Read a backbone weights file (torchvision ``.pth`` or converted ``.npz``).

    Args:
        path: the file.
        reference: the backbone the weights are for (only its state-dict keys and shapes are
            used); default: the SSD ResNet-34 backbone.
        dropped_prefixes: torchvision entries the backbone lacks, ignored in the file
            (default ``layer4.``, ``fc.``: SSD's backbone; a backbone with ``layer4`` passes ``("fc.",)``).

    Returns:
        ``{torchvision name: Tensor}`` with exactly the reference's keys, float32 weights and
        running statistics, int64 ``num_batches_tracked`` (0 where the file has none).

    Raises:
        BackboneWeightsError: missing or unreadable file, missing/unexpected keys, shape
            mismatches; the message names the file.
    """
    path = Path(path)
    return _normalise(_read_raw(path), _reference_shapes(reference), str(path), tuple(dropped_prefixes))


def load_backbone_into(backbone: nn.Module, path: str | os.PathLike[str], *,
                       dropped_prefixes: tuple[str, ...] = _DROPPED_PREFIXES) -> None:
    """Load a backbone weights file into ``backbone`` with ``strict=True`` semantics.

    Values are copied bit for bit (float32 file -> float32 parameters).

    Raises:
        BackboneWeightsError: as :func:`load_backbone_state_dict`.
    """
    state = load_backbone_state_dict(path, reference=backbone, dropped_prefixes=dropped_prefixes)
    backbone.load_state_dict(state, strict=True)


def save_backbone_npz(state_dict: Mapping[str, Tensor], path: str | os.PathLike[str]) -> Path:
    """Write the backbone part of a (torchvision ResNet-34) state dict as an ``.npz`` file.

    ``layer4.*``, ``fc.*`` and ``num_batches_tracked`` entries are dropped; the rest is
    checked against the SSD ResNet-34 backbone and written as float32 arrays with a
    ``__format__`` entry. The write is atomic (temporary file in the same directory, then
    ``os.replace``), so a crash never leaves a half-written file under ``path``.

    Returns:
        ``path`` as a Path.

    Raises:
        BackboneWeightsError: the state dict does not fit the backbone.
    """
    path = Path(path)
    state = _normalise(state_dict, _reference_shapes(None), "state dict to save")
    arrays = {
        k: v.detach().cpu().numpy().astype(np.float32, copy=False)
        for k, v in state.items()
        if not k.endswith(_COUNTER_SUFFIX)
    }
    arrays[_FORMAT_KEY] = np.array(NPZ_FORMAT)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # a file object: numpy does not append ".npz" to the name
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; the file is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path
