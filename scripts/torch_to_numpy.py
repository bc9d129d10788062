#!/usr/bin/env python3
"""Convert torchvision's ImageNet ResNet-34 checkpoint into the SSD backbone file.

Usage::

    torch_to_numpy.py IN.pth OUT.npz

IN.pth is a torchvision ResNet-34 state dict, normally ``resnet34-333f7ec4.pth``
(a dict wrapped as ``{"state_dict": ...}`` is accepted too).  OUT.npz is an
uncompressed numpy ``.npz`` archive that the trainer loads without torchvision
(``single_stage_detector.models.backbone_weights.load_backbone_state_dict``):

- one float32 array per tensor, keyed by its torchvision state-dict name, for the
  stem and the first three stages only (the SSD300 backbone ends at ``layer3``)::

      conv1.weight                                  [64, 3, 7, 7]
      bn1.{weight,bias,running_mean,running_var}    [64]
      layer1.{0..2}.conv{1,2}.weight                [64, 64, 3, 3]
      layer1.{0..2}.bn{1,2}.{weight,bias,running_mean,running_var}
      layer2.{0..3}.conv{1,2}.weight, .bn{1,2}.*    (128 channels)
      layer2.0.downsample.0.weight                  [128, 64, 1, 1]
      layer2.0.downsample.1.{weight,bias,running_mean,running_var}
      layer3.{0..5}.conv{1,2}.weight, .bn{1,2}.*    (256 channels)
      layer3.0.downsample.0.weight                  [256, 128, 1, 1]
      layer3.0.downsample.1.{weight,bias,running_mean,running_var}

  145 arrays in all; ``layer4.*``, ``fc.*`` and every ``*.num_batches_tracked`` are
  dropped;
- ``__format__``: a 0-d string array ``ssd-resnet34-backbone-v1``.

Values are copied bit for bit (float16/bfloat16 inputs are widened to float32, which is
exact).  The key set and every shape are checked against ResNet-34, so a checkpoint of a
different network is refused.  OUT.npz is written to a temporary file next to it and
moved into place, so an interrupted run never leaves a half-written file.

Needs only torch and numpy (not torchvision, not this repository's package).
Exit status: 0 on success, 2 on a missing or unusable input.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import NoReturn

PROG = "torch_to_numpy.py"
FORMAT = "ssd-resnet34-backbone-v1"
DROPPED_PREFIXES = ("layer4.", "fc.")

# (stage name, blocks, output channels, input channels) of ResNet-34 up to layer3.
STAGES = (("layer1", 3, 64, 64), ("layer2", 4, 128, 64), ("layer3", 6, 256, 128))
BN_PARTS = ("weight", "bias", "running_mean", "running_var")


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the backbone tensors the output file must contain."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    shapes.update({f"bn1.{p}": (64,) for p in BN_PARTS})
    for stage, blocks, out_ch, in_ch in STAGES:
        for b in range(blocks):
            prefix = f"{stage}.{b}."
            first_in = in_ch if b == 0 else out_ch
            shapes[prefix + "conv1.weight"] = (out_ch, first_in, 3, 3)
            shapes[prefix + "conv2.weight"] = (out_ch, out_ch, 3, 3)
            for bn in ("bn1", "bn2"):
                shapes.update({f"{prefix}{bn}.{p}": (out_ch,) for p in BN_PARTS})
            if b == 0 and in_ch != out_ch:
                shapes[prefix + "downsample.0.weight"] = (out_ch, in_ch, 1, 1)
                shapes.update({f"{prefix}downsample.1.{p}": (out_ch,) for p in BN_PARTS})
    return shapes


def fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def keep(name: str) -> bool:
    return not name.startswith(DROPPED_PREFIXES) and not name.endswith("num_batches_tracked")


def convert(src: str) -> dict:
    import numpy as np
    import torch

    if not os.path.isfile(src):
        fail(f"{src}: no such file")
    try:
        try:
            state = torch.load(src, map_location="cpu", weights_only=True)
        except TypeError:  # torch < 1.13 has no weights_only
            state = torch.load(src, map_location="cpu")
    except Exception as exc:  # torch raises many types for a corrupt/foreign file
        text = str(exc)
        # The weights-only unpickler's cause follows a paragraph of advice about weights_only=False.
        text = text.split("WeightsUnpickler error:", 1)[-1]
        first_line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        fail(f"{src}: cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {first_line})")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        fail(f"{src}: expected a state dict (names -> tensors), got {type(state).__name__}")

    want = expected_shapes()
    arrays = {}
    for name, tensor in state.items():
        if keep(name):
            arrays[name] = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    missing = sorted(set(want) - set(arrays))
    unexpected = sorted(set(arrays) - set(want))
    if missing or unexpected:
        fail(f"{src}: not a torchvision ResNet-34 state dict: "
             f"{len(missing)} missing key(s) {missing[:5]}, "
             f"{len(unexpected)} unexpected key(s) {unexpected[:5]}")
    wrong = [f"{k} {tuple(arrays[k].shape)} (expected {want[k]})"
             for k in want if tuple(arrays[k].shape) != want[k]]
    if wrong:
        fail(f"{src}: tensor shapes do not match ResNet-34: {'; '.join(wrong[:5])}")
    arrays["__format__"] = np.array(FORMAT)
    return arrays


def save_atomic(arrays: dict, dst: str) -> None:
    import numpy as np

    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        fail(f"{dst}: output folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dst) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # a file object, so numpy does not append ".npz"
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    if len(args) != 2:
        print(f"usage: {PROG} IN.pth OUT.npz   (-h for details)", file=sys.stderr)
        return 2
    src, dst = args
    arrays = convert(src)
    save_atomic(arrays, dst)
    n = len(arrays) - 1
    params = sum(a.size for k, a in arrays.items() if k != "__format__")
    print(f"{src} -> {dst}: {n} float32 arrays ({params:,} values), format {FORMAT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
