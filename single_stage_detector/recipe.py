"""Training-recipe pieces shared by every detector family: optimiser, LR schedule, backbone
freezing, gradient clipping and an exponential moving average (EMA) of the weights.

The defaults reproduce the MLPerf SSD recipe exactly (SGD with momentum, linear warm-up,
step decay at epoch boundaries); the other choices are the open-division options used by
the YOLO family (darknet's burn-in, cosine annealing, AdamW, EMA).

Everything the training loop needs to continue a run exactly is either a pure function of
the optimiser step (the learning rate, the EMA decay, the backbone's LR multiplier of an
epoch) or state with a ``state_dict`` (the optimiser, the EMA), so that a resumed run takes
the same steps as an uninterrupted one, bit for bit.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .config import ConfigError

__all__ = ["LRSchedule", "SCHEDULES", "WARMUPS", "OPTIMIZERS", "make_schedule", "make_optimizer", "make_adamw",
           "adamw_supports_fused", "set_learning_rate", "backbone_module", "backbone_parameters",
           "BackboneFreeze", "set_batch_norm_eval", "clip_gradients", "ModelEMA", "recipe_hyperparameters",
           "extra_state_copies", "ADAMW_EPS"]

SCHEDULES = ("step", "cosine")
WARMUPS = ("mlperf", "linear", "power")
OPTIMIZERS = ("sgd", "adamw")
# torch.optim.AdamW's default epsilon (added to the root of the second moment); logged.
ADAMW_EPS = 1e-8


# -- learning rate --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LRSchedule:
    """Learning rate of optimiser step ``step`` (0-based: the step about to be taken).

    A pure function of the step, so that a resumed run continues the schedule exactly.

    Warm-up, during the first ``warmup_steps`` steps (``W``), towards ``base_lr``:

    * ``mlperf`` (default; the MLPerf SSD reference):
      ``base_lr * (1 - (W - step) / (W * 2**warmup_factor))``, a ramp from
      ``base_lr * (1 - 2**-warmup_factor)`` (0 for factor 0) to ``base_lr``;
    * ``power``: darknet's burn-in (``src/network.c``, ``get_current_rate``):
      ``base_lr * (n / W) ** warmup_power`` with ``n = step + 1``, darknet's batch number
      (``get_current_batch`` counts the images of the update being made, so its first
      update has n = 1); ``cfg/yolov3.cfg`` has ``burn_in=1000`` and darknet's default
      ``power=4``;
    * ``linear``: the same with power 1, ``base_lr * (step + 1) / W`` (unlike ``mlperf``
      with factor 0, the first step does not have LR 0).

    After the warm-up:

    * ``step`` (default): ``base_lr`` multiplied by ``decay_factor`` once for every
      boundary in ``decay_epochs`` that is ``<=`` the step's 0-based epoch
      (``step // steps_per_epoch``); the decay applies during the warm-up too, as in the
      reference;
    * ``cosine``: ``min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2`` with
      ``t = (step - W) / (total_steps - W)`` clamped to [0, 1] (Loshchilov & Hutter,
      SGDR, arXiv:1608.03983, without restarts): ``base_lr`` right after the warm-up,
      ``min_lr`` at ``total_steps`` (the run's planned steps, epochs x steps per epoch).

    Raises ValueError for an unknown ``kind`` or ``warmup``.
    """

    base_lr: float
    warmup_steps: int
    warmup_factor: float
    decay_epochs: tuple[int, ...]
    decay_factor: float
    steps_per_epoch: int
    kind: str = "step"
    warmup: str = "mlperf"
    warmup_power: float = 4.0
    min_lr: float = 0.0
    total_steps: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {self.kind!r}; expected one of {', '.join(SCHEDULES)}")
        if self.warmup not in WARMUPS:
            raise ValueError(f"unknown warm-up {self.warmup!r}; expected one of {', '.join(WARMUPS)}")

    def __call__(self, step: int) -> float:
        if self.kind == "cosine":
            if step < self.warmup_steps:
                return self._warmup(step)
            span = max(1, self.total_steps - self.warmup_steps)
            t = min(1.0, (step - self.warmup_steps) / span)
            return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        lr = self.base_lr
        if step < self.warmup_steps:
            lr = self._warmup(step)
        epoch = step // max(1, self.steps_per_epoch)
        decays = sum(1 for b in self.decay_epochs if epoch >= b)
        return lr * self.decay_factor ** decays

    def _warmup(self, step: int) -> float:
        if self.warmup == "mlperf":
            return self.base_lr * (1.0 - (self.warmup_steps - step) / (self.warmup_steps * 2.0 ** self.warmup_factor))
        ramp = (step + 1) / self.warmup_steps
        return self.base_lr * (ramp if self.warmup == "linear" else ramp ** self.warmup_power)


def make_schedule(cfg, lr: float, steps_per_epoch: int) -> LRSchedule:
    """The schedule of a :class:`~single_stage_detector.config.TrainConfig` at peak LR ``lr``
    (the global batch's) with ``steps_per_epoch`` optimiser steps per epoch.

    Raises ConfigError naming ``--min-lr`` when a cosine schedule would anneal upwards.
    """
    if cfg.lr_schedule == "cosine" and cfg.min_lr > lr:
        raise ConfigError(f"--min-lr {cfg.min_lr} is above this run's LR {lr:.6g}: cosine annealing goes down "
                          "to it")
    return LRSchedule(lr, cfg.warmup_steps, cfg.warmup_factor, tuple(cfg.lr_decay_epochs), cfg.lr_decay_factor,
                      steps_per_epoch, kind=cfg.lr_schedule, warmup=cfg.warmup_type,
                      warmup_power=cfg.warmup_power, min_lr=cfg.min_lr,
                      total_steps=cfg.epochs * steps_per_epoch)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's LR: ``lr`` times the group's ``lr_mult`` (1 when it has none).

    The multiplier lives in the group (``group["lr_mult"]``), so it is saved with the
    optimiser's state and survives the schedule setting the LR at every step.
    """
    for group in optimizer.param_groups:
        value = lr * group.get("lr_mult", 1.0)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)  # a captured CUDA-graph step reads this tensor (fast_path)
        else:
            group["lr"] = value


# -- optimiser ----------------------------------------------------------------------------------
def backbone_module(detector: nn.Module) -> nn.Module:
    """``detector.model.backbone``: the feature extractor of a detector that follows the
    contract of :mod:`single_stage_detector.detector` (SSD's ResNet, YOLO's Darknet).

    ``detector`` may be wrapped (DistributedDataParallel, ``torch.compile``): the wrapped
    module is looked up. Raises ConfigError naming the backbone flags when the network has
    no ``backbone`` attribute.
    """
    inner = getattr(detector, "module", detector)        # DDP
    inner = getattr(inner, "_orig_mod", inner)            # torch.compile
    network = getattr(inner, "model", None)
    backbone = getattr(network, "backbone", None) if network is not None else None
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"--freeze-backbone-epochs / --backbone-lr-mult: the detector's network "
                          f"({type(network).__name__ if network is not None else type(inner).__name__}) has no "
                          "`backbone` module (expected detector.model.backbone)")
    return backbone


def backbone_parameters(detector: nn.Module) -> list[nn.Parameter]:
    """The parameters of :func:`backbone_module` (``detector.model.backbone``), in module order."""
    return list(backbone_module(detector).parameters())


def _param_groups(detector: nn.Module, split_backbone: bool, backbone_lr_mult: float) -> list[dict[str, Any]]:
    params = list(detector.parameters())
    if not split_backbone:
        return [{"params": params}]
    backbone = backbone_parameters(detector)
    ids = {id(p) for p in backbone}
    rest = [p for p in params if id(p) not in ids]
    return [{"params": backbone, "lr_mult": backbone_lr_mult, "name": "backbone"},
            {"params": rest, "lr_mult": 1.0, "name": "rest"}]


def adamw_supports_fused(device: torch.device) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` runs on ``device`` with this torch build
    (probed once with a one-element parameter, as :func:`~single_stage_detector.fast_path.sgd_supports_fused`)."""
    try:
        p = nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros_like(p)
        torch.optim.AdamW([p], lr=0.1, fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def make_adamw(params, *, lr: float, betas: Sequence[float], weight_decay: float,
               device: torch.device) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (decoupled weight decay, Loshchilov & Hutter, arXiv:1711.05101):
    fused on CUDA when this torch has it (where :func:`~single_stage_detector.fast_path.make_sgd`
    fuses SGD), ``foreach`` (multi-tensor) elsewhere. Epsilon: :data:`ADAMW_EPS`."""
    b1, b2 = (float(b) for b in betas)
    if device.type == "cuda" and adamw_supports_fused(device):
        return torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=ADAMW_EPS, weight_decay=weight_decay,
                                 fused=True)
    return torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=ADAMW_EPS, weight_decay=weight_decay, foreach=True)


def make_optimizer(cfg, detector: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """The optimiser of ``cfg`` (``--optimizer``) over ``detector``'s parameters.

    One parameter group (today's SGD, exactly) unless the backbone is frozen for some
    epochs or trains at another LR (``--freeze-backbone-epochs``, ``--backbone-lr-mult``):
    then two, ``backbone`` (:func:`backbone_parameters`) and ``rest``, each with its
    ``lr_mult`` (:func:`set_learning_rate`; :class:`BackboneFreeze` sets the backbone's
    per epoch). Weight decay (``--weight-decay``) applies to every parameter in both
    optimisers (SGD: L2 added to the gradient; AdamW: decoupled).
    """
    from .fast_path import make_sgd

    split = cfg.freeze_backbone_epochs > 0 or cfg.backbone_lr_mult != 1.0
    groups = _param_groups(detector, split, cfg.backbone_lr_mult)
    if not split:
        groups = groups[0]["params"]
    if cfg.optimizer == "adamw":
        return make_adamw(groups, lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, device=device)
    if cfg.optimizer != "sgd":
        raise ConfigError(f"--optimizer: expected {' | '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    return make_sgd(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, device=device)


# -- backbone freezing --------------------------------------------------------------------------
def set_batch_norm_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in eval mode: it normalises with its running
    statistics and no longer updates them (call after the model's ``train()``)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class BackboneFreeze:
    """The backbone's state in each epoch: frozen during epochs ``1..freeze_epochs``
    (1-based), then trained at LR x ``lr_mult``.

    Frozen means: the backbone's parameter group has LR multiplier 0 and its BatchNorm
    layers are in eval mode (they normalise with their running statistics, which stay
    unchanged, as in detection fine-tuning with a "frozen BN" backbone).

    Why a zero LR rather than ``requires_grad = False``: the set of parameters that get
    gradients stays the same in every step, which DistributedDataParallel (its gradient
    buckets are fixed when it wraps the model) and ``torch.compile`` (no recompilation of
    the backward) need; the optimiser keeps one fixed set of groups, so its state_dict and
    a resume are the same whether the run stopped inside the frozen epochs or after them.
    With LR 0 neither optimiser moves a weight: SGD's update is ``p -= lr * v`` and weight
    decay enters only through ``v``; AdamW's decay is ``p *= 1 - lr * wd`` and its step is
    ``lr / bias_correction``, both exact no-ops at LR 0. The cost is the backbone's weight
    gradients, still computed while frozen; the optimiser's momentum (SGD) and moments
    (AdamW) of the backbone keep tracking those gradients, so they are warm, not zero, when
    the backbone starts training.

    Args:
        detector: a detector with ``detector.model.backbone`` (:func:`backbone_module`).
        optimizer: made by :func:`make_optimizer` (it has a group named ``backbone``).
        freeze_epochs: N >= 0, the number of leading epochs without backbone updates.
        lr_mult: the backbone's LR multiplier from epoch N + 1 on.
    Raises ValueError when ``optimizer`` has no ``backbone`` group.
    """

    def __init__(self, detector: nn.Module, optimizer: torch.optim.Optimizer, freeze_epochs: int,
                 lr_mult: float) -> None:
        self.backbone = backbone_module(detector)
        self.optimizer = optimizer
        self._group()  # fails now rather than at the first epoch
        self.freeze_epochs = freeze_epochs
        self.lr_mult = lr_mult

    def _group(self) -> dict[str, Any]:
        # Looked up every time: Optimizer.load_state_dict (resume) replaces the group dicts.
        groups = [g for g in self.optimizer.param_groups if g.get("name") == "backbone"]
        if len(groups) != 1:
            raise ValueError("the optimiser has no `backbone` parameter group (make it with make_optimizer)")
        return groups[0]

    def frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen in 1-based ``epoch``."""
        return epoch <= self.freeze_epochs

    def start_epoch(self, epoch: int) -> nn.Module | None:
        """Set the backbone group's LR multiplier for 1-based ``epoch``; return the module whose
        BatchNorm layers must stay in eval mode during it (the backbone), or None."""
        self._group()["lr_mult"] = 0.0 if self.frozen(epoch) else self.lr_mult
        return self.backbone if self.frozen(epoch) else None


# -- gradient clipping --------------------------------------------------------------------------
def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float,
                   scaler: "torch.amp.GradScaler | None" = None) -> Tensor:
    """Scale the gradients of every parameter of ``optimizer`` so that their global L2 norm is
    at most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``); returns the norm before clipping
    (a 0-d tensor on the parameters' device).

    With a grad scaler the gradients are unscaled first (``scaler.unscale_``; the scaler's
    ``step`` then does not unscale them again). No host synchronisation: the norm stays on
    the device and a non-finite norm raises nothing (``error_if_nonfinite=False``): the
    scaler skips such a step, and a non-finite loss stops the run (FiniteLossMonitor).
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)


# -- EMA of the weights -------------------------------------------------------------------------
class ModelEMA:
    """An exponential moving average of ``model``'s parameters (Polyak averaging; Polyak &
    Juditsky 1992), updated after every optimiser step.

    ``ema = d * ema + (1 - d) * weights`` with ``d = decay * (1 - exp(-step / warmup_steps))``
    at global optimiser step ``step`` (1 after the first): the ramp of YOLOv4/YOLOv5
    training practice (their EMA uses decay 0.9999 and ramp 2000 steps), so that the early
    average follows the fast-changing weights; ``warmup_steps`` 0: constant ``decay``.
    The decay is a function of the step alone and the average is saved in every resume
    checkpoint (:meth:`state_dict`), so a resumed run continues it exactly.

    The BatchNorm running statistics (and every other buffer) are not averaged: the EMA
    weights use the model's own buffers, read when the EMA weights are (the same as copying
    them after every update, since buffers only change in training steps; and in a
    multi-process run it is the per-rank buffers that the resume checkpoint stores).

    Args:
        model: the network whose parameters are averaged (``detector.model``: the module
            whose ``state_dict`` the checkpoints store). Parameters must not be replaced
            afterwards (in-place updates only, as every optimiser does).
        decay: in (0, 1), e.g. 0.9999.
        warmup_steps: the ramp's time constant tau, in optimiser steps (>= 0).
    Raises ValueError for a decay outside (0, 1) or negative ``warmup_steps``.
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 2000) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"EMA warm-up steps must be >= 0, got {warmup_steps}")
        self.model = model
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        named = [(n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point]
        self.names = [n for n, _ in named]
        self._live = [p.detach() for _, p in named]  # views of the parameters' storage, updated in place
        with torch.no_grad():
            self.shadow = [p.clone() for p in self._live]
        self.step = 0

    def decay_at(self, step: int) -> float:
        """The decay used by the update of global optimiser step ``step`` (1-based)."""
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-step / self.warmup_steps))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the model's current parameters in, after optimiser step ``step`` (1-based, the
        run's global count). One multi-tensor lerp, no host synchronisation."""
        d = self.decay_at(step)
        torch._foreach_lerp_(self.shadow, self._live, 1.0 - d)
        self.step = step

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the EMA parameters (in place, same tensors, so
        wrappers and compiled graphs see them); its own are copied back, bit for bit, after."""
        with torch.no_grad():
            saved = [t.clone() for t in self._live]
            torch._foreach_copy_(self._live, self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._live, saved)

    def model_state_dict(self) -> dict[str, Tensor]:
        """``model.state_dict()`` with the EMA parameters in place of the live ones (buffers:
        the model's). What evaluation uses and the final checkpoint stores."""
        sd = self.model.state_dict()
        for name, t in zip(self.names, self.shadow):
            sd[name] = t.detach().clone()
        return sd

    def state_dict(self) -> dict[str, Any]:
        """The EMA's state for a resume checkpoint (tensors on their device; plain data
        that ``torch.load(weights_only=True)`` reads back)."""
        return {"decay": self.decay, "warmup_steps": self.warmup_steps, "step": self.step,
                "params": {n: t.detach().clone() for n, t in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Undo :meth:`state_dict`. Raises ValueError when ``state`` belongs to another model
        or another decay / warm-up."""
        if state is None:
            raise ValueError("the checkpoint holds no EMA of the weights")
        if (state["decay"], state["warmup_steps"]) != (self.decay, self.warmup_steps):
            raise ValueError(f"the checkpoint's EMA has decay {state['decay']} and warm-up {state['warmup_steps']}, "
                             f"this run {self.decay} and {self.warmup_steps}")
        params = state["params"]
        if set(params) != set(self.names):
            raise ValueError(f"the checkpoint's EMA does not match this model "
                             f"({sorted(set(params) ^ set(self.names))[:3]} ...)")
        with torch.no_grad():
            for t, name in zip(self.shadow, self.names):
                t.copy_(params[name])
        self.step = int(state["step"])


# -- logging and sizes --------------------------------------------------------------------------
def recipe_hyperparameters(cfg) -> dict[str, Any]:
    """The recipe options as MLPerf log keys (``mlperf_logging`` constants where they exist,
    ``opt_*`` / ``model_*`` names otherwise), for open-division logs: the closed division
    allows none of these options, and its log holds only the keys its rules know."""
    from .mlperf_log import C

    values: dict[str, Any] = {C.OPT_NAME: C.ADAMW if cfg.optimizer == "adamw" else C.SGD,
                              C.OPT_LR_DECAY_SCHEDULE: cfg.lr_schedule,
                              "opt_learning_rate_warmup_type": cfg.warmup_type}
    if cfg.optimizer == "adamw":
        values.update({C.OPT_ADAMW_BETA_1: float(cfg.adam_betas[0]), C.OPT_ADAMW_BETA_2: float(cfg.adam_betas[1]),
                       C.OPT_ADAMW_EPSILON: ADAMW_EPS, C.OPT_ADAMW_WEIGHT_DECAY: cfg.weight_decay})
    if cfg.warmup_type == "power":
        values["opt_learning_rate_warmup_power"] = cfg.warmup_power
    if cfg.lr_schedule == "cosine":
        values[C.OPT_END_LR] = cfg.min_lr
    if cfg.clip_grad_norm is not None:
        values[C.OPT_GRADIENT_CLIP_NORM] = cfg.clip_grad_norm
    if cfg.ema is not None:
        values[C.MODEL_EVAL_EMA_FACTOR] = cfg.ema
        values["model_eval_ema_warmup_steps"] = cfg.ema_warmup_steps
    if cfg.freeze_backbone_epochs or cfg.backbone_lr_mult != 1.0:
        values["opt_backbone_freeze_epochs"] = cfg.freeze_backbone_epochs
        values["opt_backbone_learning_rate_multiplier"] = cfg.backbone_lr_mult
    return values


def extra_state_copies(cfg) -> int:
    """Parameter-sized tensors a resume checkpoint holds beyond the weights and SGD's momentum:
    AdamW's second moment, the EMA's weights (for the free-space check)."""
    return int(cfg.optimizer == "adamw") + int(cfg.ema is not None)
