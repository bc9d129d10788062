"""The detector contract, detector families and the one preset registry.

Contract (what the training loop, evaluation and the tools rely on; nothing else):

* training mode: ``detector(images, targets) -> dict[str, Tensor]`` of named, already
  weighted scalar loss terms (their sum is minimised); ``images`` is ``Tensor[B, 3, H, W]``
  and ``targets`` is ``{"boxes": [Tensor[N_i, 4]], "labels": [Tensor[N_i]]}`` with boxes
  (x1, y1, x2, y2) normalised to [0, 1] of the input and labels 1..80 (the SSD family also
  accepts targets its DALI pipeline already encoded);
* evaluation mode: ``detector(images) -> list[dict]`` per image with ``boxes`` (Tensor[K, 4],
  x1 y1 x2 y2 normalised), ``scores`` (Tensor[K]) and ``labels`` (Tensor[K], 1..80);
  ``detector(images, targets) -> (detections, loss terms)``: the same detections and the
  training loss of the same forward pass on those targets (the val loss), with no state
  advanced (BatchNorm statistics, YOLOv2's image count);
* ``detector.model`` is the network (the checkpoint stores its ``state_dict``), and
  ``detector.model.backbone`` its backbone (freezing, backbone LR multiplier).

A *family* (``ssd``, ``yolov3``) knows how to build its detector from a preset and which
input transforms it trains and evaluates with; a *preset* names its family. The loop, the
launchers and the results tools only ever call :func:`build_detector`, :func:`get_preset`
and :func:`family_of`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from torch import nn

__all__ = ["DetectorFamily", "FAMILIES", "PRESETS", "all_presets", "build_detector", "configure_preset", "family_of",
           "get_preset", "register_family"]


class Preset(Protocol):
    """What every preset offers the harness (the families add their own fields)."""

    name: str
    family: str
    input_size: int
    num_classes: int
    description: str
    is_benchmark: bool
    quality_target: float


@dataclass(frozen=True)
class DetectorFamily:
    """One family's factory functions.

    Attributes:
        name: the family's name in presets and logs (``submission_benchmark`` of open-division
            runs is this name; the closed SSD benchmark logs ``ssd``).
        build: ``(preset, pretrained_backbone=None) -> detector`` following the contract.
        train_transform: ``(preset, cfg) -> callable(PIL image, boxes, labels)`` for the torch
            data path (normalised xyxy boxes in and out).
        eval_transform: ``(preset) -> callable`` (plain resize to the input size + normalisation).
        variable_input_size: whether ``--input-size`` / ``--multi-scale`` may change the input
            side (YOLO: yes, the network is fully convolutional and its anchors are in pixels; SSD:
            no, its default boxes are laid out for one size).
        supports_dali: whether a DALI training graph implements this family's augmentation
            (``--data-backend dali`` is refused, and ``auto`` picks the torch path, for a family
            without one).
        describe: ``(preset, detector) -> str``, one line for the run's summary.
        check_data: ``(preset, box_sizes) -> str | None``: a start-up report on the training
            boxes (``float32[K, 2]`` normalised widths and heights), e.g. YOLO's anchor recall;
            a line starting with ``WARNING`` is a warning. None: nothing to check.
        backbone_weights: ``(preset) -> str | None``: the pretrained backbone file the preset's
            ``--pretrained-backbone`` takes (a description), None when it takes none.
        dali_graph: the DALI training graph when ``supports_dali``: ``"ssd"`` (``data/dali.py``:
            SSD random crop, flip, colour jitter, ImageNet normalisation, targets encoded with the
            preset's default boxes) or ``"yolo"`` (``data/dali_yolo.py``: the affine warp and
            darknet HSV jitter of ``YOLOTrainTransform``, raw boxes; its distributions, fill, box
            keep rule and normalisation are read from the ``train_transform`` object). The DALI
            evaluation graph is the same for every family (resize to the input size) and
            normalises with the ``eval_transform``'s ``mean``/``std`` (ImageNet's when it has none).
        options: the run-config fields (``TrainConfig`` names) this family takes beyond the
            common ones, e.g. YOLOv1's ``anchors``; another family's run refuses them when set.
        configure: ``(preset, options: Mapping[str, Any]) -> preset``: the preset changed by the
            values of ``options`` that are set (not None), from a run's config or a checkpoint's;
            ValueError naming the flag on a bad value. None: the family takes no options.
        prepare: ``(preset, detector, train_set) -> str | None``: data-dependent set-up of the
            built detector at the start of a run, on every process, before the first step
            (``train_set`` a ``CocoDetection``: ``box_sizes()``, ``box_labels()``), e.g. k-means
            anchors or class-frequency weights; returns a line for the log. It must be a
            deterministic function of the training set (a resumed run calls it again).
    """

    name: str
    build: Callable[..., nn.Module]
    train_transform: Callable[[Any, Any], Callable]
    eval_transform: Callable[[Any], Callable]
    supports_dali: bool
    variable_input_size: bool
    describe: Callable[[Any, nn.Module], str]
    backbone_weights: Callable[[Any], "str | None"]
    check_data: Callable[[Any, Any], "str | None"] | None = None
    dali_graph: str = "ssd"
    options: tuple[str, ...] = ()
    configure: Callable[[Any, Mapping[str, Any]], Any] | None = None
    prepare: Callable[[Any, nn.Module, Any], "str | None"] | None = None


FAMILIES: dict[str, DetectorFamily] = {}
PRESETS: dict[str, Any] = {}


def register_family(family: DetectorFamily, presets: tuple[Any, ...]) -> None:
    """Add ``family`` and its ``presets`` to the registries (ValueError on a name clash)."""
    if family.name in FAMILIES:
        raise ValueError(f"detector family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    for preset in presets:
        if preset.name in PRESETS:
            raise ValueError(f"preset {preset.name!r} is already registered")
        if preset.family != family.name:
            raise ValueError(f"preset {preset.name!r} names family {preset.family!r}, not {family.name!r}")
        PRESETS[preset.name] = preset


def _ensure_registered() -> None:
    import importlib

    # Each registers itself on its first import; importing one family directly (its own tests)
    # must not hide the others, so every module is looked up (a dict lookup once imported).
    for module in (".ssd.family", ".yolo.family", ".yolov1.family", ".yolov2.family"):
        importlib.import_module(module, __package__)


def get_preset(name: str):
    """The preset registered as ``name`` (any family); ValueError listing the valid names otherwise."""
    _ensure_registered()
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}") from None


def all_presets() -> dict[str, Any]:
    """Every registered preset by name."""
    _ensure_registered()
    return dict(PRESETS)


def family_of(preset) -> DetectorFamily:
    """The :class:`DetectorFamily` of ``preset`` (a preset or its name)."""
    _ensure_registered()
    if isinstance(preset, str):
        preset = get_preset(preset)
    return FAMILIES[preset.family]


def configure_preset(preset, options: Mapping[str, Any]):
    """``preset`` as changed by the family options set in ``options`` (a run's config as a
    mapping of ``TrainConfig`` field names, e.g. ``cfg.to_dict()`` or a checkpoint's ``config``).

    Raises:
        ValueError: naming the flag, for an option set that the preset's family does not take
            (another family's), or a bad value.
    """
    family = family_of(preset)
    taken = sorted({name for f in FAMILIES.values() for name in f.options} - set(family.options))
    for name in taken:
        if options.get(name) is not None:
            raise ValueError(f"--{name.replace('_', '-')}: preset {preset.name!r} ({family.name}) does not take it "
                             f"(families that do: {', '.join(f.name for f in FAMILIES.values() if name in f.options)})")
    return family.configure(preset, options) if family.configure is not None else preset


def build_detector(preset, *, pretrained_backbone=None) -> nn.Module:
    """The detector of ``preset`` (a preset or its name), randomly initialised except for
    ``pretrained_backbone`` (a file of ImageNet or darknet backbone weights, family-specific).

    Raises:
        ValueError: unknown preset, or a backbone file for a preset that takes none.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    return family_of(preset).build(preset, pretrained_backbone=pretrained_backbone)
