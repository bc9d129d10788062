"""Reading and writing darknet ``.weights`` files (``yolov3.weights``, ``darknet53.conv.74``).

The format (darknet ``src/parser.c``, ``load_weights_upto`` / ``save_weights_upto`` and
``load_convolutional_weights``), all little-endian:

* header: int32 ``major``, ``minor``, ``revision``; then ``seen`` (images trained on) as an
  int64 when ``major * 10 + minor >= 2 and major < 1000 and minor < 1000``, else as an int32
  (a 20- or 16-byte header). This module writes version 0.2.0 (20 bytes), as darknet does.
* then, for every ``[convolutional]`` layer in cfg order (up to the cut-off), float32 arrays:
  with BatchNorm: biases (BatchNorm shift, beta) [n], scales (gamma) [n], rolling mean [n],
  rolling variance [n]; without: biases [n]; then the weights [n * c * k * k], row-major as
  PyTorch's ``[n, c, k, k]``. Nothing else: no shapes, no layer count, no end marker.

So the file only fits a model whose conv list (``model.darknet_conv_layers()``, see
:class:`~single_stage_detector.detectors.yolo.network.YOLOv3Network`) has the same shapes,
and the only check possible is the size. Both functions therefore plan the whole transfer
first and read or write nothing until it fits:

* a full read (``max_conv_layers=None``) must consume the file exactly: 248,007,048 bytes for
  ``yolov3.weights`` (80 classes);
* ``max_conv_layers=n`` reads the first n convs only, leaving the others as they are; the file
  must then end exactly after them too (``darknet53.conv.74``, 162,482,580 bytes, with n = 52
  into a YOLOv3 model: the backbone). Floats after the last layer read are refused unless
  ``allow_trailing=True`` asks for them to be ignored (the backbone out of a full
  ``yolov3.weights``): a file too long usually means a different model (another class count),
  and loading part of it silently would hide that.

A refused read raises :class:`DarknetWeightsError` and leaves the model unchanged.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ...backbones.darknet import DarknetConvLayer
from ...checkpoint import atomic_write

__all__ = [
    "DarknetWeightsError",
    "read_darknet_weights",
    "read_backbone_file",
    "write_darknet_weights",
    "darknet_weights_nbytes",
    "WRITE_VERSION",
]

WRITE_VERSION: tuple[int, int, int] = (0, 2, 0)
"""(major, minor, revision) written, as darknet's ``save_weights_upto``: ``seen`` is an int64."""

_FLOAT = np.dtype("<f4")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save files are zip archives
_PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # legacy torch.save: pickle 2-5


class DarknetWeightsError(ValueError):
    """A darknet ``.weights`` file does not fit the model, or is not a darknet weights file.

    The message names the file, the darknet layer (number and kind) where the file and the
    model part ways, and how many floats were needed against how many the file has.
    """


def _seen_is_int64(major: int, minor: int) -> bool:
    # The rule of darknet's load_weights_upto (src/parser.c).
    return major * 10 + minor >= 2 and major < 1000 and minor < 1000


def _describe(number: int, conv: nn.Conv2d) -> str:
    k_h, k_w = conv.kernel_size
    return f"layer {number} (convolutional, {conv.out_channels} filters, {k_h}x{k_w})"


def _layer_tensors(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> list[torch.Tensor]:
    """The tensors of one conv layer in file order (see the module docstring).

    ValueError for a layer darknet cannot store: a BatchNorm conv with a conv bias, a plain
    conv without one, a BatchNorm without running statistics or affine parameters.
    """
    if bn is not None:
        if conv.bias is not None:
            raise ValueError("a darknet conv with batch_normalize has no conv bias; this one has")
        if bn.running_mean is None or bn.running_var is None or bn.weight is None or bn.bias is None:
            raise ValueError("a darknet BatchNorm needs affine parameters and running statistics")
        return [bn.bias, bn.weight, bn.running_mean, bn.running_var, conv.weight]
    if conv.bias is None:
        raise ValueError("a darknet conv without batch_normalize needs a bias; this one has none")
    return [conv.bias, conv.weight]


def _to_bytes(tensor: torch.Tensor) -> bytes:
    """``tensor`` as little-endian float32 bytes, row-major, from any device and dtype."""
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return array.astype(_FLOAT, copy=False).tobytes()


def _conv_layers(model: nn.Module, max_conv_layers: int | None) -> list[DarknetConvLayer]:
    getter = getattr(model, "darknet_conv_layers", None)
    if getter is None:
        raise TypeError(f"{type(model).__name__} has no darknet_conv_layers(): not a darknet-ordered model")
    layers = list(getter())
    if max_conv_layers is not None:
        if not 1 <= max_conv_layers <= len(layers):
            raise ValueError(f"max_conv_layers must be in 1..{len(layers)} (the model's conv layers), "
                             f"got {max_conv_layers}")
        layers = layers[:max_conv_layers]
    return layers


def _layer_floats(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> int:
    return sum(t.numel() for t in _layer_tensors(conv, bn))


def _header_nbytes(major: int, minor: int) -> int:
    return 12 + (8 if _seen_is_int64(major, minor) else 4)


def darknet_weights_nbytes(model: nn.Module, *, max_conv_layers: int | None = None,
                           version: Sequence[int] = WRITE_VERSION) -> int:
    """Size in bytes of the ``.weights`` file of ``model`` (header + 4 bytes per float).

    Works on a model built on the ``meta`` device (shapes only). ``version`` (major, minor,
    revision) sets the header size: 20 bytes for 0.2 and later, 16 for 0.1.
    """
    floats = sum(_layer_floats(conv, bn) for _, conv, bn in _conv_layers(model, max_conv_layers))
    return _header_nbytes(version[0], version[1]) + _FLOAT.itemsize * floats


def _class_count_hint(model: nn.Module, layers: list[DarknetConvLayer], surplus: int) -> str:
    """A hint when a full-model size mismatch is exactly a different number of classes."""
    anchors = getattr(model, "num_anchors", None)
    classes = getattr(model, "num_classes", None)
    outputs = [conv for _, conv, bn in layers if bn is None]
    if anchors is None or classes is None or not outputs:
        return ""
    # Each class adds `anchors` filters to every output conv, each with in_channels weights + 1 bias.
    per_class = anchors * sum(conv.in_channels + 1 for conv in outputs)
    if surplus % per_class:
        return ""
    other = classes + surplus // per_class
    if other < 1:
        return ""
    return f"; the size would fit this network with {other} classes instead of {classes}"


def read_darknet_weights(model: nn.Module, path: str | os.PathLike, *, max_conv_layers: int | None = None,
                         allow_trailing: bool = False) -> dict[str, int]:
    """Load a darknet ``.weights`` file into ``model``'s conv and BatchNorm layers, in place.

    Args:
        model: a module with ``darknet_conv_layers()`` (e.g. ``YOLOv3Network``, ``Darknet53``),
            on any device and dtype (values are converted).
        path: the ``.weights`` file.
        max_conv_layers: read only the first n conv layers (52: the Darknet-53 backbone of a
            YOLOv3 model, from ``darknet53.conv.74``); the others keep their values.
        allow_trailing: ignore floats after the last layer read instead of refusing the file.

    Returns:
        The header: ``{"major", "minor", "revision", "seen"}`` (``seen``: images trained on).

    Raises:
        DarknetWeightsError: header missing or invalid, a PyTorch file instead of a darknet
            one, the file ending inside a layer, or floats left after the last layer read
            (unless ``allow_trailing``). The model is unchanged.
        ValueError: ``max_conv_layers`` out of range. TypeError: a model without
            ``darknet_conv_layers()``. OSError: the file cannot be read.
    """
    path = Path(path)
    layers = _conv_layers(model, max_conv_layers)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(12)
        if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTOCOLS):
            raise DarknetWeightsError(f"{path}: a PyTorch/pickle file, not a darknet .weights file")
        if len(head) < 12:
            raise DarknetWeightsError(f"{path}: {size} bytes, shorter than the darknet header (16 or 20 bytes)")
        major, minor, revision = struct.unpack("<3i", head)
        if min(major, minor, revision) < 0:
            raise DarknetWeightsError(f"{path}: invalid darknet header: version {major}.{minor}.{revision} "
                                      "(negative numbers): not a darknet .weights file")
        seen_format = "<Q" if _seen_is_int64(major, minor) else "<i"  # size_t, else int
        seen_raw = fh.read(struct.calcsize(seen_format))
        if len(seen_raw) < struct.calcsize(seen_format):
            raise DarknetWeightsError(f"{path}: {size} bytes, shorter than the {_header_nbytes(major, minor)}-byte "
                                      f"header of darknet version {major}.{minor}")
        (seen,) = struct.unpack(seen_format, seen_raw)
        payload = size - _header_nbytes(major, minor)
        have = payload // _FLOAT.itemsize

        # Plan: where each layer's floats start; refuse before touching the model.
        need = [_layer_floats(conv, bn) for _, conv, bn in layers]
        total = sum(need)
        if have < total:
            start = 0
            for index, ((number, conv, _), n) in enumerate(zip(layers, need)):
                if start + n > have:
                    if index and start == have:
                        hint = (f"; the file holds exactly the first {index} conv layers (a backbone-only file "
                                f"such as darknet53.conv.74?): pass max_conv_layers={index} to read them")
                    elif max_conv_layers is None:
                        hint = _class_count_hint(model, layers, have - total)
                    else:
                        hint = ""
                    raise DarknetWeightsError(
                        f"{path}: too short: the file ends inside {_describe(number, conv)}, which needs "
                        f"{n:,} floats and has {have - start:,} (the {len(layers)} conv layers read need "
                        f"{total:,} floats after the header, the file has {have:,}){hint}")
                start += n
        odd_bytes = payload % _FLOAT.itemsize
        if (odd_bytes or have > total) and not allow_trailing:
            last_number, last_conv, _ = layers[-1]
            extra = f"{have - total:,} floats" + (f" and {odd_bytes} bytes" if odd_bytes else "")
            if max_conv_layers is None:
                advice = (_class_count_hint(model, layers, have - total)
                          + "; to read the first layers only, pass max_conv_layers and allow_trailing=True")
            else:
                advice = "; to ignore the rest, pass allow_trailing=True"
            raise DarknetWeightsError(
                f"{path}: too long: {extra} left after the last layer read, {_describe(last_number, last_conv)} "
                f"(the {len(layers)} conv layers read need {total:,} floats after the header, the file has "
                f"{have:,}){advice if not odd_bytes else ''}")
        floats = np.fromfile(fh, dtype=_FLOAT, count=total)
    if floats.size != total:  # the file changed under us
        raise DarknetWeightsError(f"{path}: read {floats.size:,} floats, expected {total:,}")

    values = torch.from_numpy(floats)
    with torch.no_grad():
        start = 0
        for _, conv, bn in layers:
            for tensor in _layer_tensors(conv, bn):
                n = tensor.numel()
                tensor.copy_(values[start:start + n].view(tensor.shape))
                start += n
    return {"major": major, "minor": minor, "revision": revision, "seen": int(seen)}


def read_backbone_file(model: nn.Module, path: str | os.PathLike, *, max_conv_layers: int,
                       backbone_file: str) -> dict[str, int]:
    """``--pretrained-backbone``: :func:`read_darknet_weights` of the first ``max_conv_layers``
    convs from a backbone-only file (``backbone_file``: its darknet name, e.g.
    ``darknet53.conv.74``).

    A longer file (a whole network such as ``yolov3.weights``, or a classifier such as
    ``darknet19_448.weights``) is refused with what to pass instead, in the command line's
    terms (the backbone file; or ``darknet-weights import`` + ``--init-checkpoint`` to start
    from a whole network), rather than :func:`read_darknet_weights`'s ``allow_trailing`` advice.

    Raises:
        DarknetWeightsError: as :func:`read_darknet_weights`, or the file is longer than the
            backbone. OSError: the file cannot be read.
    """
    path = Path(path)
    largest = max(darknet_weights_nbytes(model, max_conv_layers=max_conv_layers, version=v)
                  for v in ((0, 1, 0), WRITE_VERSION))
    size = path.stat().st_size
    if size > largest:
        raise DarknetWeightsError(
            f"{path}: {size:,} bytes, more than the {max_conv_layers} backbone conv layers a --pretrained-backbone "
            f"file holds ({backbone_file}: {largest:,} bytes): a whole network or a classifier? Pass the "
            f"backbone file, or `darknet-weights import` a whole network and pass it to --init-checkpoint")
    return read_darknet_weights(model, path, max_conv_layers=max_conv_layers)


def write_darknet_weights(model: nn.Module, path: str | os.PathLike, *, max_conv_layers: int | None = None,
                          seen: int = 0) -> None:
    """Write ``model``'s conv layers as a darknet ``.weights`` file (version 0.2.0), atomically.

    ``max_conv_layers`` writes the first n conv layers only (52 for the ``darknet53.conv.74``
    backbone file of a YOLOv3 model); ``seen`` is the header's count of images trained on
    (0 <= seen < 2**64). The file appears complete or not at all (temp file, fsync, rename:
    :func:`~single_stage_detector.checkpoint.atomic_write`, which raises ``OutputWriteError``
    on a failed write and leaves any previous file under ``path`` intact). ValueError, before
    any file is touched, for ``seen`` or ``max_conv_layers`` out of range, a layer darknet
    cannot store, or a model on the meta device.
    """
    if not 0 <= seen < 2 ** 64:
        raise ValueError(f"seen must be in [0, 2**64), got {seen}")
    layers = _conv_layers(model, max_conv_layers)
    tensors = [t for _, conv, bn in layers for t in _layer_tensors(conv, bn)]  # refuse before any file
    if any(t.is_meta for t in tensors):
        raise ValueError("the model is on the meta device: it has shapes but no values to write")
    header = struct.pack("<3iQ", *WRITE_VERSION, seen)

    def dump(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(header)
            for tensor in tensors:
                fh.write(_to_bytes(tensor))

    atomic_write(path, dump)

