"""Typed run configuration: defaults are the benchmark's; the CLI flags are generated from it.

Every field is one ``--flag`` (underscores become dashes). ``validate()`` applies the
MLPerf SSD rules (SPEC.md section 7) and names the offending flag on error.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from .data.synthetic_params import DEFAULT_PARAMS as SYNTHETIC_DEFAULTS
from .data.synthetic_params import is_synthetic_dataset

__all__ = ["ConfigError", "TrainConfig", "HelpFormatter", "RESUME_MAY_DIFFER", "add_arguments", "config_from_args",
           "check_device", "default_num_workers"]


class ConfigError(ValueError):
    """A bad configuration value; the message names the flag (or environment variable)."""


def default_num_workers(limit: int = 4) -> int:
    """Data-loader workers by default: the CPU cores this process may use, at most ``limit``.

    More workers than cores only adds context switches (and a DataLoader warning).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(limit, cores))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every flag whose help does not already state its default.

    A default of None shows as "none" (the flag is off unless given).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def check_device(value: str, flag: str = "--device") -> None:
    """Raise :class:`ConfigError` naming ``flag`` unless ``value`` is auto, cpu, cuda or cuda:N
    and, for CUDA, a GPU is there (imports torch)."""
    import re

    if value == "auto":
        return
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise ConfigError(f"{flag}: expected auto | cpu | cuda | cuda:N, got {value!r}")
    if value.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {value}: CUDA is not available on this machine (use --device cpu or auto)")
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {value}: only {torch.cuda.device_count()} GPU(s) visible")


def _f(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # -- what to train, on what --------------------------------------------------------
    preset: str = _f("ssd300_resnet34", "model preset: ssd300_resnet34 (the benchmark), ssd_tiny (SSD CPU demo), "
                                         "yolov3_darknet53, yolov3_tiny_cpu (YOLOv3 CPU demo), yolov1_resnet34, "
                                         "yolov1_coursework, yolov1_tiny_cpu (YOLOv1 CPU demo), yolov2_darknet19, "
                                         "yolov2_resnet50, yolov2_tiny_cpu (YOLOv2 CPU demo)")
    input_size: Optional[int] = _f(None, "network input side in pixels (default: the preset's); YOLO presets "
                                         "only (a multiple of 32, anchors unchanged); SSD's default boxes fix its size")
    anchors: Optional[tuple[str, ...]] = _f(
        None, "YOLOv1 presets: prior shapes of a cell's B predictors: kmeans:N (k-means on the training boxes at "
              "start, B = N) | W,H W,H ... (fractions of the input side, B = their count) | none (the paper's; "
              "default: the preset's)", metavar="SPEC")
    confidence_target: Optional[str] = _f(None, "YOLOv1 presets: confidence target of a responsible predictor: iou "
                                                "(the paper's) | one (default: the preset's)")
    class_weights: Optional[str] = _f(None, "YOLOv1 presets: class-term weights: none (the paper's) | "
                                            "inverse-frequency (from the training boxes at start; default: the preset's)")
    data_dir: Optional[str] = _f(None, "COCO 2017 folder (train2017/, val2017/, annotations/)")
    synthetic: bool = _f(False, "generate the embedded synthetic dataset into --data-dir if it holds none")
    synthetic_train_images: int = _f(SYNTHETIC_DEFAULTS.num_train, "synthetic dataset: training images")
    synthetic_val_images: int = _f(SYNTHETIC_DEFAULTS.num_val, "synthetic dataset: validation images")
    pretrained_backbone: Optional[str] = _f(
        None, "ImageNet ResNet-34 weights (.npz from scripts/get_resnet34_backbone.sh, or resnet34-333f7ec4.pth)")
    output_dir: str = _f("output/run", "folder for the resolved config, metrics, checkpoint")
    log_file: Optional[str] = _f(None, "MLPerf log path (default: OUTPUT_DIR/mlperf.log)")
    metrics_file: Optional[str] = _f(None, "per-step metrics JSON lines (default: OUTPUT_DIR/metrics.jsonl)")
    tensorboard_dir: Optional[str] = _f(
        None, "also write TensorBoard scalars (loss, LR, images/s, mAP) there; needs `pip install tensorboard`")
    save_checkpoint: bool = _f(True, "write OUTPUT_DIR/checkpoint.pt and the resume checkpoints (atomically); "
                                     "--no-save-checkpoint: write neither")
    checkpoint_every: int = _f(1, "write a resume checkpoint (OUTPUT_DIR/checkpoints/) every N epochs; "
                                  "0: only at the end and when a signal stops the run")
    keep_checkpoints: int = _f(2, "keep the newest K resume checkpoints, delete older ones")
    resume: Optional[str] = _f(None, "continue the run of this resume checkpoint exactly (PATH), or of the newest "
                                     "one in OUTPUT_DIR/checkpoints/ (auto; a fresh start when there is none)")
    include_crowd: bool = _f(True, "train on iscrowd=1 boxes too, as the MLPerf reference (--no-include-crowd: "
                                   "drop them; open division only)")
    check_images: bool = _f(True, "before training, check every image header (size against the annotation, "
                                  "truncation, format) and skip bad files in every backend; --no-check-images "
                                  "only for datasets verified by scripts/verify_dataset.py")

    # -- batch and optimiser -----------------------------------------------------------
    batch_size: int = _f(32, "training images per process per step")
    eval_batch_size: int = _f(64, "evaluation images per process per step")
    gradient_accumulation_steps: int = _f(1, "micro-batches accumulated per optimiser step")
    bn_span: Optional[int] = _f(None, "images over which batch norm statistics are taken (default: --batch-size)")
    base_lr: float = _f(2.5e-3, "learning rate per 32 images; LR = base_lr * global_batch / 32")
    lr: Optional[float] = _f(None, "learning rate for the whole global batch (default: --base-lr scaled to the global batch)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "weight decay (SGD: L2 on the gradient; AdamW: decoupled)")
    warmup_steps: int = _f(300, "warm-up iterations (optimiser steps)")
    warmup_factor: int = _f(0, "mlperf warm-up starts at lr * (1 - 2**-factor); 0 = from zero "
                               "(MLPerf: integer >= 0)")
    lr_decay_epochs: tuple[int, ...] = _f((40, 50), "epochs at which the LR is multiplied by --lr-decay-factor",
                                          metavar="EPOCH")
    lr_decay_factor: float = _f(0.1, "LR multiplier at each decay epoch")
    max_samples: int = _f(1, "SSD random-crop tries per mode (MLPerf allows 1 or 50)")
    color_jitter: str = _f("torchvision", "colour jitter of the torch input pipeline: torchvision (torchvision's "
                                          "ColorJitter ops, pixel-exact to the MLPerf reference) | fused (the four "
                                          "ops as one colour matrix, hue rotated in YIQ as DALI's graph does, on the "
                                          "fast pixel path: uint8 tensors from the JPEG decode on, crop at whole "
                                          "pixels, torch's antialiased resize; half the CPU time per image)")
    augment: bool = _f(True, "the preset family's training augmentation (SSD: random crop, flip, colour "
                             "jitter; YOLO: flip, random affine, HSV jitter); --no-augment: resize + "
                             "normalise only, for exactness tests")
    multi_scale: tuple[int, ...] = _f((), "MIN MAX: every 10 optimiser steps a new input side, a multiple of 32 "
                                          "in [MIN, MAX], drawn from (seed, step) so every rank and a resumed "
                                          "run use the same (YOLO presets; e.g. 320 608, darknet's)", metavar="SIDE")

    # -- recipe options (open division; defaults: the MLPerf SSD recipe) --------------------
    optimizer: str = _f("sgd", "sgd (with --momentum; the benchmark's) | adamw (with --adam-betas)")
    adam_betas: tuple[float, ...] = _f((0.9, 0.999), "AdamW's two moment decays (beta1 beta2)", metavar="BETA")
    lr_schedule: str = _f("step", "step (x --lr-decay-factor at each --lr-decay-epochs; the benchmark's) | cosine "
                                  "(from the LR to --min-lr over the run's --epochs after the warm-up)")
    min_lr: float = _f(0.0, "the LR a cosine schedule ends at")
    warmup_type: str = _f("mlperf", "mlperf (the reference's linear ramp, with --warmup-factor) | linear "
                                    "(lr * n / W, n = 1..W) | power (darknet's burn-in: lr * (n / W)^--warmup-power)")
    warmup_power: float = _f(4.0, "exponent of the power warm-up (darknet's default 4)")
    clip_grad_norm: Optional[float] = _f(None, "clip the global gradient L2 norm to this before each optimiser step")
    freeze_backbone_epochs: int = _f(0, "the backbone gets no updates (LR 0, BatchNorm statistics frozen) during "
                                        "the first N epochs")
    backbone_lr_mult: float = _f(1.0, "the backbone trains at LR x this (after --freeze-backbone-epochs)")
    ema: Optional[float] = _f(None, "keep an exponential moving average of the weights with this decay (e.g. "
                                    "0.9999); evaluation and checkpoint.pt use it")
    ema_warmup_steps: int = _f(2000, "EMA decay ramp: decay x (1 - exp(-step / N)); 0: constant decay")

    # -- schedule ----------------------------------------------------------------------
    epochs: int = _f(80, "stop (status aborted) after this many epochs without reaching the target")
    threshold: Optional[float] = _f(None, "target COCO AP@[.5:.95]; training stops at the first evaluation "
                                          "reaching it (default: the preset's quality target, 0.23 for SSD)")
    eval_every: int = _f(5, "evaluate after every N epochs")
    eval_start: Optional[int] = _f(None, "first epoch to evaluate after (default: --eval-every)")
    eval_epochs: Optional[tuple[int, ...]] = _f(
        None, "explicit evaluation epochs (overrides --eval-every), e.g. the v0.7 list 40 50 55 60 65 70 75 80",
        metavar="EPOCH")
    async_eval: str = _f("auto", "score each evaluation (COCOeval) in a background process while the next epoch "
                                 "trains; the stop decision is taken at the next epoch boundary, eval_accuracy "
                                 "keeps the evaluated epoch: on | off | auto (on with CUDA, off on the CPU, "
                                 "where the scorer would take cores from training)")
    coco_eval: str = _f("auto", "COCO scorer: pycocotools (the reference) | faster-coco-eval (C++, the same 13 "
                                "stats on the tests, several times faster) | auto (faster-coco-eval when "
                                "installed, else pycocotools)")
    val_loss: str = _f("auto", "also compute the training loss on the val images at each evaluation, from the "
                               "same forward pass (metrics.jsonl val_loss, plotted): on | off | auto (on, except "
                               "for the MLPerf benchmark preset, where it would add to the timed evaluations)")
    eval_all_images: bool = _f(False, "also evaluate val images without annotations (default: the reference's 4,952)")
    max_train_images: Optional[int] = _f(None, "use only the first N training images (smoke tests)")
    max_eval_images: Optional[int] = _f(None, "evaluate only the first N val images (smoke tests)")

    # -- execution ---------------------------------------------------------------------
    seed: Optional[int] = _f(None, "random seed (default: drawn by rank 0 and broadcast); logged")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    amp: str = _f("auto", "mixed precision: auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16")
    eval_amp: str = _f("auto", "evaluation precision: auto (= off: fp32, see docs/ACCURACY.md) | off | bf16 | fp16")
    channels_last: Optional[bool] = _f(None, "NHWC memory format (default: on for CUDA)")
    compile: bool = _f(False, "torch.compile the model")
    cuda_graphs: bool = _f(False, "capture the SSD training step (forward, loss, backward, SGD) as one CUDA graph "
                                  "and replay it; targets encoded on the GPU outside the graph, with static shapes. "
                                  "One CUDA process, bf16 or fp32, fused SGD; other batch shapes run eagerly")
    num_workers: int = _f(default_num_workers(), "data-loader worker processes per training process "
                          "(default: %(default)s, the CPU cores available up to 4)")
    data_backend: str = _f("auto", "input pipeline: torch (DataLoader) | dali (NVIDIA DALI; CPU-only without a GPU) "
                           "| auto (dali when it is installed and the run is on a GPU, else torch)")
    log_every: int = _f(20, "print progress every N iterations")
    dist_timeout_s: int = _f(600, "timeout of collective operations, seconds")
    init_checkpoint: Optional[str] = _f(None, "start from the model weights of this checkpoint.pt (not a resume)")
    eval_only: bool = _f(False, "no training: evaluate the (initial) model once and stop (not a benchmark log)")

    # -- MLPerf submission fields (environment: MLPERF_SUBMISSION_*) ---------------------
    division: str = _f("auto", "closed | open | auto (closed for the benchmark preset on real COCO, open for "
                               "the small presets and the synthetic dataset)")
    submission_org: str = _f(os.environ.get("MLPERF_SUBMISSION_ORG", "single_stage_detector"), "submitting org")
    submission_platform: Optional[str] = _f(
        os.environ.get("MLPERF_SUBMISSION_PLATFORM"), "system name (default: N x device name)")
    submission_status: str = _f(os.environ.get("MLPERF_SUBMISSION_STATUS", "onprem"),
                                "onprem | cloud | research | preview")
    cache_cleared: bool = _f(os.environ.get("CLEAR_CACHES", "0") == "1",
                             "the page cache was cleared before this run (logged as cache_clear)")

    # -- derived -----------------------------------------------------------------------
    def resolved_log_file(self) -> str:
        return self.log_file or os.path.join(self.output_dir, "mlperf.log")

    def resolved_metrics_file(self) -> str:
        return self.metrics_file or os.path.join(self.output_dir, "metrics.jsonl")

    def global_batch_size(self, world_size: int) -> int:
        return self.batch_size * world_size * self.gradient_accumulation_steps

    def learning_rate(self, world_size: int) -> float:
        if self.lr is not None:
            return self.lr
        return self.base_lr * self.global_batch_size(world_size) / 32.0

    def resolved_bn_span(self) -> int:
        return self.bn_span if self.bn_span is not None else self.batch_size

    def evaluation_epochs(self) -> list[int]:
        """1-based epochs after which to evaluate, up to ``epochs``."""
        if self.eval_epochs:
            return sorted(e for e in set(self.eval_epochs) if e <= self.epochs)
        start = self.eval_start if self.eval_start is not None else self.eval_every
        return list(range(start, self.epochs + 1, self.eval_every))

    def resolved_async_eval(self, device_type: str) -> bool:
        """Whether evaluations are scored in the background (``--async-eval``; auto: with CUDA;
        never with ``--eval-only``, which has no next epoch to overlap)."""
        if self.eval_only:
            return False
        return self.async_eval == "on" or (self.async_eval == "auto" and device_type == "cuda")

    def resolved_val_loss(self, benchmark_preset: bool) -> bool:
        """Whether evaluations also compute the val loss (``--val-loss``; auto: not for the benchmark)."""
        return self.val_loss == "on" or (self.val_loss == "auto" and not benchmark_preset)

    def resolved_division(self, benchmark_preset: bool) -> str:
        if self.division != "auto":
            return self.division
        # Closed results are about the benchmark on COCO: the synthetic data (generated now or
        # earlier, recognised by its marker file) makes any run open.
        real_coco = not self.synthetic and not is_synthetic_dataset(self.data_dir)
        return "closed" if (benchmark_preset and real_coco) else "open"

    # -- rules ---------------------------------------------------------------------------
    def validate(self, *, closed: bool = False) -> None:
        """Raise :class:`ConfigError` naming the flag for any value the harness or the rules reject."""

        def bad(flag: str, msg: str) -> ConfigError:
            return ConfigError(f"--{flag.replace('_', '-')}: {msg}")

        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "epochs", "eval_every",
                     "log_every"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise bad("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.checkpoint_every < 0:
            raise bad("checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}")
        if self.resume is not None and self.eval_only:
            raise bad("resume", "has nothing to continue with --eval-only")
        if self.resume is not None and not self.save_checkpoint:
            raise bad("resume", "needs the checkpoints that --no-save-checkpoint turns off")
        if self.bn_span is not None and self.bn_span < 1:
            raise bad("bn_span", f"must be >= 1, got {self.bn_span}")
        if self.max_samples not in (1, 50):
            raise bad("max_samples", f"MLPerf allows 1 or 50, got {self.max_samples}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise bad("threshold", f"must be in (0, 1], got {self.threshold}")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        # The rules (and the reference's argparse) make the factor an integer >= 0.
        if isinstance(self.warmup_factor, bool) or not isinstance(self.warmup_factor, int) \
                or self.warmup_factor < 0:
            raise bad("warmup_factor", f"must be an integer >= 0, got {self.warmup_factor!r}")
        for name in ("max_train_images", "max_eval_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if (self.lr if self.lr is not None else self.base_lr) <= 0:
            raise bad("lr", "learning rate must be > 0")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise bad("weight_decay", "weight decay must be >= 0 and momentum in [0, 1)")
        self._validate_recipe(bad)
        for name in ("amp", "eval_amp"):
            if getattr(self, name) not in ("auto", "off", "bf16", "fp16"):
                raise bad(name, f"expected auto|off|bf16|fp16, got {getattr(self, name)!r}")
        if self.async_eval not in ("auto", "on", "off"):
            raise bad("async_eval", f"expected auto|on|off, got {self.async_eval!r}")
        if self.coco_eval not in ("auto", "pycocotools", "faster-coco-eval"):
            raise bad("coco_eval", f"expected auto|pycocotools|faster-coco-eval, got {self.coco_eval!r}")
        if self.coco_eval == "faster-coco-eval" and importlib.util.find_spec("faster_coco_eval") is None:
            raise bad("coco_eval", "faster-coco-eval is not installed (pip install faster-coco-eval, or "
                                   "--coco-eval pycocotools)")
        if self.val_loss not in ("auto", "on", "off"):
            raise bad("val_loss", f"expected auto|on|off, got {self.val_loss!r}")
        if self.color_jitter not in ("fused", "torchvision"):
            raise bad("color_jitter", f"expected fused|torchvision, got {self.color_jitter!r}")
        if self.data_backend not in ("torch", "dali", "auto"):
            raise bad("data_backend", f"expected torch|dali|auto, got {self.data_backend!r}")
        if self.division not in ("auto", "closed", "open"):
            raise bad("division", f"expected auto|closed|open, got {self.division!r}")
        if self.submission_status not in ("onprem", "cloud", "research", "preview"):
            raise bad("submission_status", f"expected onprem|cloud|research|preview, got {self.submission_status!r} "
                      "(environment MLPERF_SUBMISSION_STATUS)")
        if not self.submission_org:
            raise bad("submission_org", "must not be empty (environment MLPERF_SUBMISSION_ORG)")
        if self.eval_epochs is not None and any(e < 1 for e in self.eval_epochs):
            raise bad("eval_epochs", f"epochs are 1-based, got {list(self.eval_epochs)}")
        if list(self.lr_decay_epochs) != sorted(self.lr_decay_epochs) or any(e < 1 for e in self.lr_decay_epochs):
            raise bad("lr_decay_epochs", f"must be increasing positive epochs, got {list(self.lr_decay_epochs)}")
        if self.input_size is not None and (self.input_size < 32 or self.input_size % 32):
            raise bad("input_size", f"must be a positive multiple of 32, got {self.input_size}")
        if self.multi_scale:
            lo_hi = list(self.multi_scale)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1] or any(v < 32 or v % 32 for v in lo_hi):
                raise bad("multi_scale", f"expected MIN MAX, multiples of 32 with MIN <= MAX, got {lo_hi}")
        if self.cuda_graphs:
            # What a captured step cannot hold (device- and preset-dependent checks: train._graph_step).
            for flag, value, why in (("compile", self.compile, "torch.compile takes the step instead (a flag of "
                                      "its own, mode reduce-overhead)"),
                                     ("amp", self.amp == "fp16", "fp16's loss scaler skips steps on the host; "
                                      "use --amp bf16"),
                                     ("gradient_accumulation_steps", self.gradient_accumulation_steps > 1,
                                      "the graph is one whole optimiser step"),
                                     ("freeze_backbone_epochs", self.freeze_backbone_epochs > 0,
                                      "BatchNorm changes mode when the backbone thaws"),
                                     ("multi_scale", bool(self.multi_scale), "every new input side would re-capture"),
                                     ("optimizer", self.optimizer != "sgd", "fused AdamW refuses a capture unless "
                                      "built capturable; the graphed step is fused SGD's (--optimizer sgd)")):
                if value:
                    raise bad("cuda_graphs", f"cannot be combined with --{flag.replace('_', '-')}: {why}")
        if self.data_dir is None:
            raise bad("data_dir", "is required (a COCO 2017 folder, or an empty folder with --synthetic)")
        if not self.eval_only and not self.evaluation_epochs():
            # Such a run trains to the epoch limit and writes a log no checker can pass.
            flags = ("--eval-epochs " + " ".join(map(str, self.eval_epochs)) if self.eval_epochs else
                     f"--eval-every {self.eval_every}"
                     + (f" --eval-start {self.eval_start}" if self.eval_start is not None else ""))
            raise bad("epochs", f"{self.epochs} with {flags} schedules no evaluation; "
                      "evaluate at least once within --epochs")
        if closed:
            self._validate_closed(bad)

    def _validate_recipe(self, bad) -> None:
        """The recipe options' values (any division)."""
        for name, allowed in (("optimizer", ("sgd", "adamw")), ("lr_schedule", ("step", "cosine")),
                              ("warmup_type", ("mlperf", "linear", "power"))):
            if getattr(self, name) not in allowed:
                raise bad(name, f"expected {'|'.join(allowed)}, got {getattr(self, name)!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise bad("adam_betas", f"expected two values in [0, 1), got {list(self.adam_betas)}")
        if not self.warmup_power > 0:
            raise bad("warmup_power", f"must be > 0, got {self.warmup_power}")
        if self.min_lr < 0:
            raise bad("min_lr", f"must be >= 0, got {self.min_lr}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise bad("clip_grad_norm", f"must be > 0, got {self.clip_grad_norm}")
        if self.freeze_backbone_epochs < 0:
            raise bad("freeze_backbone_epochs", f"must be >= 0, got {self.freeze_backbone_epochs}")
        if not self.backbone_lr_mult > 0:
            raise bad("backbone_lr_mult", f"must be > 0 (use --freeze-backbone-epochs to keep the backbone "
                      f"fixed), got {self.backbone_lr_mult}")
        if self.ema is not None and not 0 < self.ema < 1:
            raise bad("ema", f"the decay must be in (0, 1), e.g. 0.9999, got {self.ema}")
        if self.ema_warmup_steps < 0:
            raise bad("ema_warmup_steps", f"must be >= 0, got {self.ema_warmup_steps}")

    def _validate_closed(self, bad) -> None:
        """The closed-division rules of MLPerf SSD (SPEC.md section 7): only batch size, LR,
        weight decay, warm-up and the decay boundaries (one k) are free."""
        bounds = list(self.lr_decay_epochs)
        # [40, 50] x (1 + k/10) with one integer k for both: 40 + 4k and 50 + 5k.
        k = (bounds[0] - 40) / 4 if len(bounds) == 2 else None
        if k is None or k != int(k) or bounds != [40 + 4 * int(k), 50 + 5 * int(k)]:
            raise bad("lr_decay_epochs", "closed division needs the two boundaries [40, 50] x (1 + k/10) "
                      f"with one integer k (e.g. 40 50, 44 55, 48 60), got {bounds}")
        if self.warmup_steps < 1:
            raise bad("warmup_steps", "closed division needs at least 1 warm-up step")
        # Fixed by the benchmark: the quality target, SGD momentum and the decay factor.
        for name, fixed in (("threshold", 0.23), ("lr_decay_factor", 0.1), ("momentum", 0.9)):
            if getattr(self, name) is not None and abs(getattr(self, name) - fixed) > 1e-12:
                raise bad(name, f"is fixed at {fixed} in the closed division, got {getattr(self, name)} "
                          "(use --division open to change it)")
        if not self.include_crowd:
            raise bad("include_crowd", "the closed division trains on crowd boxes as the reference does "
                      "(--no-include-crowd needs --division open)")
        # The reference's recipe: SGD, its warm-up, step decay, one LR for every weight, the raw
        # weights evaluated, no gradient clipping (SPEC.md section 7 frees none of these).
        for name, fixed, what in (("optimizer", "sgd", "SGD with momentum"),
                                  ("lr_schedule", "step", "the step decay at --lr-decay-epochs"),
                                  ("warmup_type", "mlperf", "the reference's warm-up"),
                                  ("ema", None, "the trained weights, not an EMA of them"),
                                  ("clip_grad_norm", None, "no gradient clipping"),
                                  ("freeze_backbone_epochs", 0, "every weight trained from the first step"),
                                  ("backbone_lr_mult", 1.0, "one LR for every weight")):
            if getattr(self, name) != fixed:
                raise bad(name, f"the closed division uses {what}, got {getattr(self, name)!r} "
                          "(use --division open to change it)")

    def differences_for_resume(self, saved: dict[str, Any]) -> list[str]:
        """The flags whose values differ from ``saved`` (a checkpoint's ``config``) and would
        change the training itself, so that a resumed run could not continue it exactly."""
        mine = self.to_dict()
        may_differ = RESUME_MAY_DIFFER
        if self.lr_schedule == "cosine":
            may_differ = may_differ - {"epochs"}  # the cosine spans the planned epochs
        return [f"--{k.replace('_', '-')} {mine[k]!r} (checkpoint: {saved.get(k)!r})"
                for k in mine if k not in may_differ and k in saved and mine[k] != saved[k]]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# Flags that a resumed run may change: where outputs go, evaluation and stopping, how the
# data are read (augmentation does not depend on the worker count), the launch's timeouts.
RESUME_MAY_DIFFER = frozenset({
    "data_dir", "synthetic", "synthetic_train_images", "synthetic_val_images", "pretrained_backbone", "output_dir",
    "log_file", "metrics_file", "tensorboard_dir", "save_checkpoint", "checkpoint_every", "keep_checkpoints",
    "resume", "check_images", "epochs", "threshold", "eval_every", "eval_start", "eval_epochs", "eval_all_images",
    "val_loss", "async_eval", "coco_eval", "cuda_graphs",
    # The run's starting weights: a resumed run takes its weights from the resume checkpoint.
    "init_checkpoint",
    "eval_batch_size", "max_eval_images", "eval_amp", "seed", "device", "num_workers", "log_every",
    "dist_timeout_s", "division", "submission_org", "submission_platform", "submission_status", "cache_cleared",
})


# -- argparse glue ------------------------------------------------------------------------
def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, defaults: Optional[dict[str, Any]] = None) -> None:
    """Add one flag per :class:`TrainConfig` field (``defaults`` overrides the dataclass defaults)."""
    hints = typing.get_type_hints(TrainConfig)
    defaults = defaults or {}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = _unwrap_optional(hints[f.name])
        default = defaults.get(f.name, f.default)
        help_text = f.metadata.get("help", "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(tp) is tuple:
            (elem, *_rest) = typing.get_args(tp)
            parser.add_argument(flag, type=elem, nargs="+", default=default, metavar=f.metadata.get("metavar", "N"),
                                help=help_text)
        else:
            parser.add_argument(flag, type=tp, default=default, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if isinstance(v, list):
            v = tuple(v)
        values[f.name] = v
    return TrainConfig(**values)
