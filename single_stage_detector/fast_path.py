"""GPU fast-path pieces shared by the trainer and ``benchmark``: fused SGD, cuDNN autotuning,
and a training step captured as one CUDA graph.

Everything here is device-agnostic in its interface: on the CPU the same calls return the
plain implementation (foreach SGD, eager step), so callers need no ``if cuda`` of their own.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .engine import backward, optimizer_step

__all__ = ["make_sgd", "enable_cudnn_autotune", "compile_for_training", "TrainStep", "CudaGraphTrainStep",
           "sgd_supports_fused", "use_tensor_learning_rates", "optimizer_state_dict"]


def sgd_supports_fused(device: torch.device) -> bool:
    """Whether ``torch.optim.SGD(fused=True)`` runs on ``device`` with this torch build.

    Fused SGD exists for CUDA since torch 2.1 (CPU support came later); probing once with a
    one-element parameter avoids relying on a version table.
    """
    try:
        p = nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.zeros_like(p)
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def make_sgd(params: Iterable[nn.Parameter], *, lr: float, momentum: float, weight_decay: float,
             device: torch.device, fused: bool | None = None) -> torch.optim.Optimizer:
    """SGD with momentum: one fused kernel per step on CUDA, ``foreach`` (multi-tensor) elsewhere.

    Args:
        fused: True to require a fused implementation (``ValueError`` if there is none on
            ``device``), False for foreach, None (default) for fused on CUDA when available.
            A fused step is PyTorch's (``SGD(fused=True)``); on CUDA with a torch that lacks
            it, apex's ``FusedSGD`` when apex is importable (never required).
    Same update rule either way (PyTorch's SGD: ``v = m v + g + wd p; p -= lr v``).
    """
    if fused or (fused is None and device.type == "cuda"):
        if sgd_supports_fused(device):
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
        apex_sgd = _apex_fused_sgd() if device.type == "cuda" else None
        if apex_sgd is not None:
            return apex_sgd(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        if fused:
            raise ValueError(f"fused SGD is not supported on {device} by torch {torch.__version__} (nor apex)")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)


def _apex_fused_sgd():
    try:
        from apex.optimizers import FusedSGD
    except ImportError:
        return None
    return FusedSGD


def enable_cudnn_autotune(device: torch.device) -> None:
    """cuDNN benchmark mode on CUDA: every convolution shape picks its fastest algorithm once
    (input shapes are fixed during training, so the one-off tuning pays back within steps)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compile_for_training(train_module: nn.Module, detector: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` for training; returns the module the training step calls.

    On CUDA the whole ``train_module`` (network and loss; DDP-wrapped or not) is compiled:
    the GPU loss has static shapes and no host synchronisation, so it fuses. On the CPU only
    the network (``detector.model``) is compiled, in place (its state_dict keys unchanged):
    the CPU loss takes data-dependent shortcuts (``nonzero``, ``topk`` of a computed k) that
    would split the graph and recompile in every step (ssd_tiny, 5 steps on 2 cores: about
    95 s with the loss compiled, 8 s without).
    """
    if device.type == "cuda":
        return torch.compile(train_module)
    detector.model.compile()
    return train_module


class TrainStep:
    """One eager training step on pre-encoded targets: forward, loss, backward, optimiser step.

    ``step(images [B, 3, S, S], loc_t [B, A, 4], labels_t [B, A]) -> {"loc": Tensor[], "cls": Tensor[]}``
    (the loss terms, on the device; reading them synchronises, so callers do it only when logging).
    ``detector`` is a training-mode :class:`~single_stage_detector.detector.SSDDetector` (or
    a compiled / DDP wrapper of one); ``autocast`` a context factory (``AmpSettings.autocast``).
    With a ``scaler`` (fp16) the loss is scaled and the step skipped on inf/NaN gradients.
    ``clip_grad_norm``: the global gradient norm is clipped to it before the optimiser step
    (no host sync). ``encode_targets`` (optional, ``(boxes, labels) -> (loc_t, labels_t)``):
    the detector's target encoding, for callers that hold raw boxes (the trainer); it gives
    static shapes ([B, A, 4], [B, A]) whatever the number of boxes.
    """

    def __init__(self, detector: nn.Module, optimizer: torch.optim.Optimizer,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 scaler: "torch.amp.GradScaler | None" = None, *, clip_grad_norm: float | None = None,
                 encode_targets: Callable[[list, list], tuple[Tensor, Tensor]] | None = None) -> None:
        self.detector, self.optimizer, self.autocast, self.scaler = detector, optimizer, autocast, scaler
        self.clip_grad_norm = clip_grad_norm
        self.encode_targets = encode_targets

    def _forward_backward(self, images: Tensor, loc_t: Tensor, labels_t: Tensor) -> dict[str, Tensor]:
        with self.autocast():
            losses = self.detector(images, {"loc": loc_t, "labels": labels_t})
        backward(sum(losses.values()), self.scaler)
        return losses

    def _eager(self, images: Tensor, loc_t: Tensor, labels_t: Tensor) -> dict[str, Tensor]:
        losses = self._forward_backward(images, loc_t, labels_t)
        optimizer_step(self.optimizer, self.scaler, self.clip_grad_norm)
        return {k: v.detach() for k, v in losses.items()}

    def __call__(self, images: Tensor, loc_t: Tensor, labels_t: Tensor) -> dict[str, Tensor]:
        return self._eager(images, loc_t, labels_t)


class CudaGraphTrainStep(TrainStep):
    """:class:`TrainStep` captured once as a CUDA graph and replayed: one launch per step.

    The first ``warmup`` calls run eager steps on a side stream (required before capture:
    autograd, cuDNN's autotuning and the optimiser's momentum buffers set themselves up on
    them); the next call whose shapes a warm-up step ran (another shape: one more warm-up
    step) captures forward, loss, backward, the optional gradient clipping and the optimiser
    step for those shapes, then replays it. Every call is one real training step on its own inputs. Later calls
    with the same shapes, dtypes and strides copy the inputs into the graph's static buffers
    and replay; any other shape (e.g. an epoch's last, smaller batch) runs the eager step
    instead and is counted in ``fallbacks``.

    The learning rate: a float LR is read when the graph is captured (benchmarks). For a
    schedule, call :func:`use_tensor_learning_rates` on the optimiser first and set the LR
    with :func:`~single_stage_detector.recipe.set_learning_rate`, which then writes into
    the tensors the captured step reads (fused SGD takes a tensor LR without a host sync).

    ``encode_targets`` (see :class:`TrainStep`) runs eagerly, outside the graph.

    Raises:
        ValueError: on a non-CUDA device, with an fp16 ``scaler`` (its step skips are host
            decisions, which a graph cannot take; use bf16), or ``warmup`` < 1 (a captured
            first SGD step would allocate the momentum buffers inside the graph and every
            replay would run without momentum).
    """

    def __init__(self, detector: nn.Module, optimizer: torch.optim.Optimizer,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 scaler: "torch.amp.GradScaler | None" = None, warmup: int = 3, *,
                 clip_grad_norm: float | None = None,
                 encode_targets: Callable[[list, list], tuple[Tensor, Tensor]] | None = None) -> None:
        if scaler is not None:
            raise ValueError("CUDA graphs: fp16 loss scaling cannot be captured; use bf16")
        if warmup < 1:
            raise ValueError(f"CUDA graphs: warmup must be at least 1 eager step, got {warmup}")
        super().__init__(detector, optimizer, autocast, None, clip_grad_norm=clip_grad_norm,
                         encode_targets=encode_targets)
        self.warmup = warmup
        self.fallbacks = 0
        self.replays = 0
        self.warmup_steps = 0
        self._graph: "torch.cuda.CUDAGraph | None" = None
        self._key: tuple | None = None
        self._static: tuple[Tensor, Tensor, Tensor] | None = None
        self._losses: dict[str, Tensor] = {}
        self._warmed: set[tuple] = set()  # the input signatures the warm-up steps ran

    @staticmethod
    def _signature(*tensors: Tensor) -> tuple:
        return tuple((t.device, t.dtype, tuple(t.shape), t.stride()) for t in tensors)

    def _warmup_step(self, images: Tensor, loc_t: Tensor, labels_t: Tensor) -> dict[str, Tensor]:
        main = torch.cuda.current_stream(images.device)
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            losses = self._eager(images, loc_t, labels_t)
        main.wait_stream(side)
        self.warmup_steps += 1
        self._warmed.add(self._signature(images, loc_t, labels_t))
        return losses

    def _capture(self, images: Tensor, loc_t: Tensor, labels_t: Tensor) -> None:
        self._static = (images.clone(memory_format=torch.preserve_format), loc_t.clone(), labels_t.clone())
        torch.cuda.current_stream(images.device).synchronize()  # once: the warm-up's work is done
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread (the DataLoader's pin-memory thread)
        # during the capture is that thread's own business, not an error of the capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            losses = self._forward_backward(*self._static)
            optimizer_step(self.optimizer, None, self.clip_grad_norm, zero_grad=False)
        self._losses = {k: v.detach() for k, v in losses.items()}
        self._graph = graph
        self._key = self._signature(images, loc_t, labels_t)

    def __call__(self, images: Tensor, loc_t: Tensor, labels_t: Tensor) -> dict[str, Tensor]:
        if self._graph is None:
            if images.device.type != "cuda":
                raise ValueError(f"CUDA graphs need CUDA tensors, got {images.device}")
            # Captured only on shapes a warm-up step ran: cuDNN autotunes a new shape on its
            # first use, and that synchronises, which a capture forbids.
            if self.warmup_steps < self.warmup or self._signature(images, loc_t, labels_t) not in self._warmed:
                return self._warmup_step(images, loc_t, labels_t)
            self._capture(images, loc_t, labels_t)  # records the step; the replay below runs it
        elif self._signature(images, loc_t, labels_t) != self._key:
            self.fallbacks += 1
            # Eager on other shapes. The .grad attributes still point at the graph's gradient
            # buffers: dropped first, or backward would add to the last replay's gradients (the
            # buffers stay in the graph's private pool, which the next replay writes again).
            self.optimizer.zero_grad(set_to_none=True)
            return self._eager(images, loc_t, labels_t)
        assert self._static is not None
        for dst, src in zip(self._static, (images, loc_t, labels_t)):
            dst.copy_(src, non_blocking=True)
        self._graph.replay()
        self.replays += 1
        return self._losses


def use_tensor_learning_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Store each parameter group's LR as a 0-d tensor on ``device``, so that a captured
    optimiser step reads the LR of every replay (:func:`~single_stage_detector.recipe.set_learning_rate`
    fills the tensors in place). Needs an optimiser that takes a tensor LR without reading it
    on the host: fused SGD or AdamW.

    Raises:
        ValueError: when ``optimizer`` is not a fused one.
    """
    if not optimizer.defaults.get("fused"):
        raise ValueError(f"a tensor learning rate without host syncs needs a fused optimiser, not "
                         f"{type(optimizer).__name__} without fused=True")
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with tensor LRs (:func:`use_tensor_learning_rates`) as floats,
    so that a checkpoint loads into any run, with or without CUDA graphs."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
    return state
