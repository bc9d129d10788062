"""One training run, from a :class:`TrainConfig` to a finished MLPerf log.

Order of events follows the MLPerf rules: everything before ``init_stop`` is set-up
(model, optimiser, hyperparameters); the timed region ``run_start``..``run_stop``
includes reading the dataset, training and every evaluation.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from . import __version__
from .async_eval import AsyncScorer
from .checkpoint import (RESUME_DIR, RESUME_FORMAT, STORAGE_ERRNOS, OutputWriteError, load_checkpoint,
                         move_aside_resume_checkpoints, prune_resume_checkpoints, resume_checkpoint_name,
                         save_checkpoint, write_json)
from .config import ConfigError, TrainConfig
from .data.coco import COCO_CATEGORY_IDS
from .data.pipeline import build_data_pipeline
from .distributed import (DistInfo, average_batch_norm_stats, barrier, broadcast_float, broadcast_seed,
                          init_distributed, seed_everything, shutdown, sum_over_ranks, sync_batch_norm)
from .engine import (AmpSettings, Inference, MetricsWriter, ShardedEvalResult, infer, multi_scale_size, scored,
                     train_one_epoch)
from .evaluation import CocoEvaluator, UndefinedAPError, resolve_coco_eval_backend
from .fast_path import (CudaGraphTrainStep, compile_for_training, enable_cudnn_autotune, optimizer_state_dict,
                        use_tensor_learning_rates)
from .mlperf_log import RESUMED_KEY, C, MLPerfLogger, move_aside
from .detectors.base import build_detector, family_of
from .models import count_parameters
from .models.mlperf_names import mlperf_tensor_names
from .recipe import (BackboneFreeze, ModelEMA, extra_state_copies, make_optimizer, make_schedule,
                     recipe_hyperparameters)
from .resume import (capture_rank_state, check_output_writable, check_resume_matches, checkpoint_size_estimate,
                     find_resume_checkpoint, gather_over_ranks, restore_rank_state)
from .signals import StopSignals

__all__ = ["RunResult", "run_training", "prepare_dataset_dir"]


@dataclass
class RunResult:
    status: str  # "success" | "aborted"
    epochs: int
    ap: float
    time_to_train_s: float
    log_file: str
    output_dir: str
    evaluations: list[dict] = field(default_factory=list)
    skipped_samples: int = 0
    dataset_stats: dict = field(default_factory=dict)
    world_size: int = 1
    device: str = "cpu"
    rank: int = 0
    stopped_by: str | None = None  # "SIGTERM" / "SIGINT": stopped early with a resume checkpoint
    resumed_from: str | None = None  # the checkpoint this run continued


def prepare_dataset_dir(cfg: TrainConfig, info: DistInfo) -> None:
    """With ``--synthetic``, write the embedded dataset into ``--data-dir`` (rank 0) if absent."""
    if not cfg.synthetic:
        return
    from .data.synthetic import ensure_synthetic_coco

    if info.is_main:
        made = ensure_synthetic_coco(cfg.data_dir, num_train=cfg.synthetic_train_images,
                                     num_val=cfg.synthetic_val_images, seed=0)
        if made["generated"]:
            print(f"generated the synthetic dataset in {cfg.data_dir} ({made['train_images']} train, "
                  f"{made['val_images']} val images, {made['seconds']:.1f} s); later runs reuse it", flush=True)
    barrier()


def _platform_name(info: DistInfo) -> str:
    if info.device.type == "cuda":
        return f"{info.world_size}x{torch.cuda.get_device_name(info.device)}"
    return f"{info.world_size}xCPU-{os.cpu_count()}cores-{platform.machine()}"


def _build_sync_bn(model: nn.Module, cfg: TrainConfig, info: DistInfo) -> nn.Module:
    """Batch norm over ``bn_span`` images: plain BN when it equals the local batch,
    else SyncBatchNorm over groups of span / batch consecutive ranks (0..g-1, g..2g-1, ...).

    The span is per micro-batch: gradient accumulation does not widen it (each micro-batch
    normalises with its own statistics), so global batch = bn_span x (processes / g) x accumulation.
    """
    span = cfg.resolved_bn_span()
    if span == cfg.batch_size:
        return model
    if span % cfg.batch_size != 0:
        raise ConfigError(f"--bn-span {span} must be a multiple of --batch-size {cfg.batch_size}")
    group_size = span // cfg.batch_size
    if group_size > info.world_size or info.world_size % group_size != 0:
        raise ConfigError(f"--bn-span {span} needs groups of {group_size} processes, "
                          f"which do not divide the {info.world_size} processes of this run")
    if group_size == 1:
        return model
    import torch.distributed as dist

    # Every rank must create every group, in the same order.
    groups = [dist.new_group(list(range(s, s + group_size))) for s in range(0, info.world_size, group_size)]
    return sync_batch_norm(model, process_group=groups[info.rank // group_size], device_type=info.device.type)


def _load_init_checkpoint(model: nn.Module, path: str, preset_name: str) -> None:
    """Model weights (only) from a checkpoint.pt written by this trainer."""
    try:
        ckpt = load_checkpoint(path)
    except ConfigError as e:
        raise ConfigError(f"--init-checkpoint: {e}") from None
    if ckpt["preset"] != preset_name:
        raise ConfigError(f"--init-checkpoint: {path} holds preset {ckpt['preset']!r}, this run is {preset_name!r}")
    model.load_state_dict(ckpt["model"], strict=True)


@dataclass
class _ModelParts:
    model: nn.Module          # the network (parameters named as the checkpoint stores them)
    detector: nn.Module       # network + target coding + loss + post-processing (detectors.base contract)
    train_module: nn.Module   # what the training step calls: the detector, maybe DDP- and compile-wrapped
    amp: AmpSettings
    eval_amp: AmpSettings
    channels_last: bool


def _wrap_ddp(detector: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` without buffer broadcasts (see :func:`_build_model`).

    torch 2.14 deprecates ``broadcast_buffers`` with a FutureWarning on every rank, and its
    replacement, ``forward_sync_buffers=False``, still copies rank 0's buffers at start-up (the
    warning itself says to keep ``broadcast_buffers=False`` for rank-local buffers); the warning
    is silenced for this one call.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(
            detector, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True)


def _build_model(cfg: TrainConfig, preset, info: DistInfo, say) -> _ModelParts:
    """The model of ``preset`` with its weights, BN mode, device, memory format and wrappers."""
    detector = build_detector(preset, pretrained_backbone=cfg.pretrained_backbone)
    if cfg.init_checkpoint:
        _load_init_checkpoint(detector.model, cfg.init_checkpoint, preset.name)
    if preset.is_benchmark and not detector.backbone_pretrained and not cfg.init_checkpoint:
        say("WARNING: the ResNet-34 backbone is RANDOMLY INITIALISED (no --pretrained-backbone). "
            "The benchmark needs ImageNet weights to reach 0.23 mAP: run scripts/get_resnet34_backbone.sh.")
    detector.model = _build_sync_bn(detector.model, cfg, info)
    model = detector.model
    enable_cudnn_autotune(info.device)
    detector = detector.to(info.device)
    amp = AmpSettings.resolve(cfg.amp, info.device)
    eval_amp = AmpSettings.resolve_eval(cfg.eval_amp, info.device)
    channels_last = cfg.channels_last if cfg.channels_last is not None else info.device.type == "cuda"
    if channels_last:
        detector = detector.to(memory_format=torch.channels_last)
    train_module: nn.Module = detector
    if info.distributed:
        # broadcast_buffers=False: each rank keeps the BN running statistics of its own data,
        # averaged over the ranks before each evaluation (engine.evaluate), as the reference
        # and NVIDIA's v0.7 code do (apex DDP), rather than rank 0's copied at every step.
        # gradient_as_bucket_view: the gradients are views of the all-reduce buckets (no copy
        # between them after each all-reduce, one gradient-sized buffer less).
        train_module = _wrap_ddp(detector, info.device)
    if cfg.compile:
        train_module = compile_for_training(train_module, detector, info.device)
    return _ModelParts(model, detector, train_module, amp, eval_amp, channels_last)


def _derived_settings(cfg: TrainConfig, info: DistInfo, division: str, seed: int, global_batch: int, lr: float,
                      amp: AmpSettings, eval_amp: AmpSettings, channels_last: bool, model: nn.Module,
                      log_file: str) -> dict:
    """The values the run computed from its flags and its launch (recorded in config.json)."""
    return {
        "division": division, "seed": seed, "world_size": info.world_size, "device": str(info.device),
        "global_batch_size": global_batch, "learning_rate": lr, "bn_span": cfg.resolved_bn_span(),
        "amp": amp.describe(), "eval_amp": eval_amp.describe(),
        "channels_last": channels_last, "evaluation_epochs": cfg.evaluation_epochs(),
        "parameters": count_parameters(model), "backbone_pretrained": getattr(model, "backbone_pretrained", False),
        "log_file": log_file,
    }


def _resolved_config(cfg: TrainConfig, derived: dict) -> dict:
    return {
        "config": cfg.to_dict(),
        "derived": derived,
        "versions": {"single_stage_detector": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }


@record
def run_training(cfg: TrainConfig) -> RunResult:
    """Train to the target (or the epoch limit) and write the MLPerf log. Collective: call on every rank.

    Under torchrun, an exception on any rank is written to torchrun's error file
    (``@record``), so the launcher names the failing rank and shows its traceback, and
    stops the other ranks.
    """
    info = init_distributed(cfg.device, cfg.dist_timeout_s)
    try:
        return _run(cfg, info)
    finally:
        shutdown()


def resolve_preset(cfg: TrainConfig) -> tuple[object, TrainConfig]:
    """The run's preset (its input size set by ``--input-size``) and ``cfg`` with the preset's
    quality target filled in; ConfigError naming the flag for options the family does not take."""
    import dataclasses

    from .detectors.base import configure_preset, get_preset

    try:
        preset = get_preset(cfg.preset)
    except ValueError as e:
        raise ConfigError(f"--preset: {e}") from None
    family = family_of(preset)
    if (cfg.input_size is not None or cfg.multi_scale) and not family.variable_input_size:
        flag = "--input-size" if cfg.input_size is not None else "--multi-scale"
        raise ConfigError(f"{flag}: preset {preset.name!r} ({family.name}) has a fixed input size "
                          f"({preset.input_size}: its default boxes depend on it)")
    if cfg.data_backend == "dali" and not family.supports_dali:
        raise ConfigError(f"--data-backend dali: no DALI graph implements the augmentation of preset "
                          f"{preset.name!r} ({family.name}); it reads its data with --data-backend torch")
    if cfg.data_backend == "auto" and not family.supports_dali:
        cfg = dataclasses.replace(cfg, data_backend="torch")
    try:
        preset = configure_preset(preset, cfg.to_dict())  # the family's own options (YOLOv1: --anchors, ...)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.input_size is not None:
        if cfg.input_size < 32 or cfg.input_size % 32:
            raise ConfigError(f"--input-size: must be a positive multiple of 32, got {cfg.input_size}")
        preset = dataclasses.replace(preset, input_size=cfg.input_size)
    if cfg.threshold is None:
        cfg = dataclasses.replace(cfg, threshold=preset.quality_target)
    return preset, cfg


def _check_cuda_graphs(preset, family, info: DistInfo) -> None:
    """``--cuda-graphs``: ConfigError, before the run starts, when this launch cannot capture its step."""
    if info.device.type != "cuda":
        raise ConfigError(f"--cuda-graphs: needs a CUDA device; this run is on {info.device}")
    if info.distributed:
        raise ConfigError("--cuda-graphs: one process only (DDP's all-reduce inside a captured step "
                          f"is not supported here yet); this launch has {info.world_size}")
    if not hasattr(preset, "box_spec"):
        raise ConfigError(f"--cuda-graphs: preset {preset.name!r} ({family.name}) computes its targets inside "
                          "the loss, with shapes that follow the boxes; SSD presets only")


def _graph_step(cfg: TrainConfig, detector: nn.Module, train_module: nn.Module, optimizer: torch.optim.Optimizer,
                amp: AmpSettings, device: torch.device) -> CudaGraphTrainStep:
    """The captured training step of ``--cuda-graphs`` (checked by :func:`_check_cuda_graphs`)."""
    try:
        use_tensor_learning_rates(optimizer, device)
    except ValueError as e:
        raise ConfigError(f"--cuda-graphs: {e} (torch {torch.__version__})") from None

    return CudaGraphTrainStep(train_module, optimizer, functools.partial(amp.autocast, cache_enabled=False),
                              clip_grad_norm=cfg.clip_grad_norm, encode_targets=detector.encode_targets)


def _run(cfg: TrainConfig, info: DistInfo) -> RunResult:
    with StopSignals(announce=info.is_main) as stop:
        return _run_with_signals(cfg, info, stop)


def _meta_model_bytes(preset, extra_copies: int = 0) -> int:
    """The resume checkpoint size of ``preset``'s model, from a model on the meta device (no memory, no I/O);
    ``extra_copies`` more parameter-sized tensors (AdamW's second moment, an EMA)."""
    with torch.device("meta"):
        return checkpoint_size_estimate(build_detector(preset).model, extra_copies)


def _resume_position(resumed: tuple[Path, dict] | None) -> dict:
    """Where the loop starts: completed epochs, steps into the next one, total steps, and the run's record so far."""
    if resumed is None:
        return {"epoch": 0, "step_in_epoch": 0, "step": 0, "evaluations": [], "skipped": 0, "ap": float("nan")}
    state = resumed[1]["resume"]
    return {"epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"], "step": state["step"],
            "evaluations": list(state.get("evaluations", [])), "skipped": int(state.get("skipped", 0)),
            "ap": float(resumed[1].get("ap", float("nan")))}


def _run_with_signals(cfg: TrainConfig, info: DistInfo, stop: StopSignals) -> RunResult:
    say = (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)
    preset, cfg = resolve_preset(cfg)
    family = family_of(preset)
    division = cfg.resolved_division(preset.is_benchmark)
    cfg.validate(closed=division == "closed")
    if cfg.cuda_graphs:
        _check_cuda_graphs(preset, family, info)
    # Before anything is logged: a read-only or full output folder is a one-line error.
    check_output_writable(cfg, _meta_model_bytes(preset, extra_state_copies(cfg)))
    resumed = find_resume_checkpoint(cfg, info)  # collective; ConfigError naming a bad file
    if resumed is not None:
        check_resume_matches(cfg, resumed[0], resumed[1], preset.name, info)
    position = _resume_position(resumed)

    log_file = cfg.resolved_log_file()
    # A resumed run continues its log (marked below) rather than starting a new one.
    mlog = MLPerfLogger(log_file, rank=info.rank, keep_existing=resumed is None)
    if mlog.previous_log is not None:
        say(f"note: the log of an earlier run at {log_file} was kept as {mlog.previous_log}")
    if info.is_main and resumed is None:
        move_aside(Path(cfg.resolved_metrics_file()))  # one run per metrics file too
        kept = move_aside_resume_checkpoints(cfg.output_dir)  # and one run per checkpoints/ folder
        if kept is not None:
            say(f"note: the resume checkpoints of an earlier run in {Path(cfg.output_dir) / RESUME_DIR} "
                f"were kept as {kept}")
    metrics = MetricsWriter(cfg.resolved_metrics_file(), enabled=info.is_main, tensorboard_dir=cfg.tensorboard_dir)
    if resumed is not None:
        # Not an MLPerf key: the checkers (and check-logs) must see that this log is two runs' pieces.
        mlog.event(RESUMED_KEY, str(resumed[0]),
                   metadata={C.EPOCH_NUM: position["epoch"], "step": position["step"],
                             "note": "resumed from a checkpoint: not a valid timed result"})
        say(f"resuming {resumed[0]}: {position['epoch']} epoch(s) and {position['step_in_epoch']} step(s) done, "
            f"step {position['step']} of the LR schedule")
    else:
        mlog.event(C.CACHE_CLEAR, cfg.cache_cleared)
        mlog.start(C.INIT_START)
        mlog.submission_info(benchmark=family.name, org=cfg.submission_org, division=division,
                             status=cfg.submission_status,
                             platform=cfg.submission_platform or _platform_name(info))
    seed = resumed[1]["resume"]["seed"] if resumed is not None else broadcast_seed(cfg.seed, info)
    if resumed is None:
        mlog.event(C.SEED, seed)
    # Same model init on every rank; data order/augmentation differ by rank through the loaders.
    seed_everything(seed)

    # -- model, optimiser --------------------------------------------------------------------
    # Resumed: the weights come from the resume checkpoint, not from --init-checkpoint.
    m = _build_model(dataclasses.replace(cfg, init_checkpoint=None) if resumed is not None else cfg, preset, info, say)
    model, detector, train_module, amp, channels_last = m.model, m.detector, m.train_module, m.amp, m.channels_last
    eval_amp = m.eval_amp
    global_batch = cfg.global_batch_size(info.world_size)
    lr = cfg.learning_rate(info.world_size)
    # SGD (the benchmark's) or AdamW, fused on CUDA; a backbone group when it is frozen or has its own LR.
    optimizer = make_optimizer(cfg, detector, lr, info.device)
    scaler = torch.amp.GradScaler(info.device.type) if amp.needs_scaler else None
    # After the DDP wrapper's broadcast: the same initial average on every rank.
    ema = ModelEMA(model, cfg.ema, cfg.ema_warmup_steps) if cfg.ema is not None else None
    if resumed is not None:
        # After the DDP wrapper's broadcast of rank 0's state: each rank then gets its own buffers back.
        ckpt = resumed[1]
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            try:
                ema.load_state_dict(ckpt.get("ema"))
            except ValueError as e:
                raise ConfigError(f"--resume: {resumed[0]}: {e}") from None
    freeze = (BackboneFreeze(detector, optimizer, cfg.freeze_backbone_epochs, cfg.backbone_lr_mult)
              if cfg.freeze_backbone_epochs or cfg.backbone_lr_mult != 1.0 else None)
    graph_step = _graph_step(cfg, detector, train_module, optimizer, amp, info.device) if cfg.cuda_graphs else None

    if resumed is None:
        mlog.hyperparameters({
            C.GLOBAL_BATCH_SIZE: global_batch,
            C.OPT_BASE_LR: lr,
            C.OPT_WEIGHT_DECAY: cfg.weight_decay,
            C.MODEL_BN_SPAN: cfg.resolved_bn_span(),
            C.OPT_LR_WARMUP_STEPS: cfg.warmup_steps,
            C.OPT_LR_WARMUP_FACTOR: int(cfg.warmup_factor),  # an integer in the rules (logged 1, not 1.0)
            C.MAX_SAMPLES: cfg.max_samples,
            C.OPT_LR_DECAY_BOUNDARY_EPOCHS: list(cfg.lr_decay_epochs),
            C.GRADIENT_ACCUMULATION_STEPS: cfg.gradient_accumulation_steps,
            # The recipe options: open division only (the closed one allows none of them, and its log
            # holds only the keys its rules know).
            **(recipe_hyperparameters(cfg) if division != "closed" else {}),
        })
        if preset.is_benchmark:
            mlog.weights_initialization(list(mlperf_tensor_names(model).values()))

    derived = _derived_settings(cfg, info, division, seed, global_batch, lr, amp, eval_amp, channels_last, model,
                                log_file)
    derived["family"] = family.name
    derived["async_eval"] = cfg.resolved_async_eval(info.device.type)
    derived["coco_eval"] = resolve_coco_eval_backend(cfg.coco_eval)
    derived["val_loss"] = cfg.resolved_val_loss(preset.is_benchmark)
    derived["eval_policy"] = getattr(detector, "eval_policy", None)
    if resumed is not None:
        derived["resumed_from"] = str(resumed[0])
    if info.is_main:
        write_json(_resolved_config(cfg, derived), os.path.join(cfg.output_dir, "config.json"))
    say(f"preset {preset.name} ({family.name}): {count_parameters(model) / 1e6:.2f} M parameters, "
        f"{family.describe(preset, detector)}; device {info.device} x {info.world_size}, "
        f"amp {derived['amp']} (eval {derived['eval_amp']}), global batch {global_batch}, lr {lr:.4g}, "
        f"division {division}")

    if resumed is None:
        mlog.end(C.INIT_STOP)
    barrier()
    if resumed is None:
        mlog.start(C.RUN_START)
    run_start = time.time()
    status = "aborted"
    epochs_done = position["epoch"]
    last_ap = position["ap"]
    evaluations: list[dict] = position["evaluations"]
    skipped = position["skipped"]
    data = None
    step = position["step"]
    step_in_epoch = position["step_in_epoch"]
    stopped_by: str | None = None
    scorer: AsyncScorer | None = None  # --async-eval: rank 0's background COCO scoring
    pending: _Evaluation | None = None  # an evaluation whose scoring runs while the next epoch trains
    reached: _Evaluation | None = None  # a target-reaching evaluation scored in the background (its weights)

    def agreed_stop(steps_in_epoch: int | None = None) -> bool:
        """Whether every rank should stop here. One process: the signal flag (a Python bool).
        Several: the flag of any rank, all-reduced every --log-every steps (where the loss
        print syncs anyway) and between epochs, so that all ranks stop at the same step."""
        if not info.distributed:
            return stop.requested
        if steps_in_epoch is not None and steps_in_epoch % cfg.log_every != 0:
            return False
        return sum_over_ranks(int(stop.requested), info) > 0

    def save_resume(epoch_done: int, in_epoch: int, data_backend: str) -> None:
        """The resume checkpoint at this position (collective: every rank's state goes to rank 0)."""
        ranks = gather_over_ranks(capture_rank_state(model, info.device), info)
        error: BaseException | None = None
        if info.is_main:
            path = Path(cfg.output_dir) / RESUME_DIR / resume_checkpoint_name(epoch_done, step)
            try:
                save_checkpoint({
                    "model": model.state_dict(), "optimizer": optimizer_state_dict(optimizer),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema": ema.state_dict() if ema is not None else None,
                    "epoch": epoch_done, "step": step, "preset": preset.name, "config": _config_to_save(cfg),
                    "ap": last_ap,
                    "resume": {"format": RESUME_FORMAT, "epoch": epoch_done, "step_in_epoch": in_epoch,
                               "step": step, "seed": seed, "world_size": info.world_size,
                               "lr": schedule(step), "data": {"backend": data_backend, "epoch": epoch_done + 1,
                                                              "batch": in_epoch * cfg.gradient_accumulation_steps},
                               "ranks": ranks, "skipped": skipped,
                               # an evaluation still being scored: the resumed run evaluates these weights again
                               "pending_eval": pending.epoch if pending is not None else None,
                               # plain floats (no numpy scalars), as weights-only loading wants
                               "evaluations": json.loads(json.dumps(evaluations, default=float))},
                }, path)
                prune_resume_checkpoints(cfg.output_dir, cfg.keep_checkpoints)
                say(f"checkpoint {path}")
            except OutputWriteError as e:
                error = e
        # Every rank learns whether the file is complete before going on (or stopping).
        if broadcast_float(0.0 if error is not None else 1.0, info) == 0.0:
            if error is not None:
                raise error
            raise OutputWriteError(errno.EIO, "rank 0 could not write the checkpoint (see its error)")

    input_size_at = None
    if cfg.multi_scale:
        low, high = cfg.multi_scale
        input_size_at = functools.partial(multi_scale_size, seed, low=low, high=high)

    try:
        # -- data (inside the timed region, as the rules require) --------------------------
        prepare_dataset_dir(cfg, info)
        data = build_data_pipeline(cfg, input_size=preset.input_size, seed=seed, rank=info.rank,
                                   transforms=(family.train_transform(preset, cfg), family.eval_transform(preset)),
                                   dali_graph=family.dali_graph, world_size=info.world_size, device=info.device)
        if family.check_data is not None and data.train_set is not None and info.is_main:
            report = family.check_data(preset, data.train_set.box_sizes())
            if report:
                say(report)
        if family.prepare is not None and data.train_set is not None:
            # Data-dependent set-up (YOLOv1's k-means anchors, class weights), on every process.
            report = family.prepare(preset, detector, data.train_set)
            if report:
                say(report)
        if resumed is None:
            mlog.event(C.TRAIN_SAMPLES, data.train_samples)
            mlog.event(C.EVAL_SAMPLES, data.eval_samples)
        evaluator = CocoEvaluator(data.val_annotation_file, backend=cfg.coco_eval) if info.is_main else None
        _check_val_has_ground_truth(data, evaluator, info)
        label_to_category = torch.tensor([0] + list(COCO_CATEGORY_IDS), dtype=torch.int64)
        # Every image once per epoch (the last partial batch kept, as the reference): the last
        # optimiser step of an epoch may hold fewer micro-batches and images.
        steps_per_epoch = -(-data.train_steps // cfg.gradient_accumulation_steps)
        if global_batch > data.train_samples and not cfg.eval_only:  # --eval-only trains nothing
            raise ConfigError(f"--batch-size {cfg.batch_size} x {info.world_size} processes x accumulation "
                              f"{cfg.gradient_accumulation_steps} exceeds the {data.train_samples} training images")
        if resumed is not None:
            saved_steps = resumed[1]["resume"]["step"] - resumed[1]["resume"]["step_in_epoch"]
            if saved_steps != position["epoch"] * steps_per_epoch:
                raise ConfigError(f"--resume: {resumed[0]} was written with another dataset ({saved_steps} steps "
                                  f"in {position['epoch']} epoch(s); this one has {steps_per_epoch} steps/epoch)")
            if resumed[1]["resume"]["data"]["backend"] != data.backend:
                raise ConfigError(f"--resume: {resumed[0]} was trained with --data-backend "
                                  f"{resumed[1]['resume']['data']['backend']}, this run reads with {data.backend}")
        schedule = make_schedule(cfg, lr, steps_per_epoch)  # a pure function of the step
        eval_epochs = set(cfg.evaluation_epochs())
        val_loss = cfg.resolved_val_loss(preset.is_benchmark)
        async_eval = cfg.resolved_async_eval(info.device.type)
        if cfg.eval_only:
            say(f"--eval-only: one evaluation of the --init-checkpoint weights on {data.eval_samples} val images, "
                f"no training")
        else:
            say(f"train: {data.train_samples} images ({data.backend} pipeline), {steps_per_epoch} steps/epoch; "
                f"val: {data.eval_samples} images; "
                f"evaluating after epochs {sorted(eval_epochs)[:8]}{' ...' if len(eval_epochs) > 8 else ''}"
                f"{' (scored in the background while the next epoch trains)' if async_eval else ''}")
        if async_eval and info.is_main:
            # Starts now, scores from the first evaluation on.
            scorer = AsyncScorer(data.val_annotation_file, backend=cfg.coco_eval)
        if resumed is not None and resumed[1]["resume"].get("pending_eval") == epochs_done and epochs_done > 0:
            # Saved while its scoring ran in the background: the restored weights are the ones it
            # evaluated, so evaluate them again (before the RNG state is restored: the uninterrupted run
            # had drawn the evaluation loader's seed before saving).
            with _ema_applied(ema):
                pending = _start_evaluation(epochs_done, detector, data, label_to_category, eval_amp, info,
                                            channels_last, mlog, step=step, val_loss=val_loss, scorer=scorer,
                                            keep_weights=cfg.save_checkpoint)
        if resumed is not None:
            # Last: everything above may draw random numbers; the uninterrupted run was here.
            restore_rank_state(resumed[1]["resume"]["ranks"][info.rank], model, info.device)
            resumed = (resumed[0], {"resume": resumed[1]["resume"]})  # drop the tensors we no longer need

        def finish_pending() -> bool:
            """Log the evaluation scored in the background, if any; whether it reached the target."""
            nonlocal pending, last_ap, status, reached
            if pending is None:
                return False
            evaluation, pending = pending, None
            ap, record_ = _finish_evaluation(evaluation, data, evaluator, info, mlog, metrics, run_start, say, cfg)
            last_ap = ap
            evaluations.append(record_)
            if ap >= cfg.threshold:
                status = "success"
                reached = evaluation if evaluation.weights is not None else None
                return True
            return False

        if cfg.eval_only:
            # No training: one evaluation of the initial (--init-checkpoint) weights, epoch_num 0.
            with _ema_applied(ema):
                evaluation = _start_evaluation(0, detector, data, label_to_category, eval_amp, info, channels_last,
                                               mlog, step=step, val_loss=val_loss, scorer=None)
            last_ap, record_ = _finish_evaluation(evaluation, data, evaluator, info, mlog, metrics, run_start, say,
                                                  cfg)
            evaluations.append(record_)
            status = "success" if last_ap >= cfg.threshold else "aborted"
        for epoch in range(epochs_done + 1, 0 if cfg.eval_only else cfg.epochs + 1):
            if agreed_stop():
                stopped_by = stop.name or "signal"
                finish_pending()  # logged before the checkpoint, which then holds no pending evaluation
                save_resume(epochs_done, step_in_epoch, data.backend)
                break
            mlog.start(C.EPOCH_START, metadata={C.EPOCH_NUM: epoch})
            data.set_epoch(epoch, start_batch=step_in_epoch * cfg.gradient_accumulation_steps)
            frozen_bn = freeze.start_epoch(epoch) if freeze is not None else None  # backbone LR x 0 or x mult
            stats = train_one_epoch(train_module, optimizer, data.train, epoch=epoch, num_epochs=cfg.epochs,
                                    start_step=step, schedule=schedule, amp=amp, scaler=scaler, info=info,
                                    accumulation_steps=cfg.gradient_accumulation_steps,
                                    channels_last=channels_last, log_every=cfg.log_every, metrics=metrics,
                                    steps_per_epoch=steps_per_epoch, epoch_samples=data.train_samples,
                                    batch_size=cfg.batch_size,
                                    start_batch=step_in_epoch * cfg.gradient_accumulation_steps,
                                    should_stop=agreed_stop, clip_grad_norm=cfg.clip_grad_norm, ema=ema,
                                    frozen_bn=frozen_bn, input_size_at=input_size_at, graph_step=graph_step)
            step += stats.steps
            skipped += stats.skipped_samples
            if stats.stopped:
                # Mid-epoch: no epoch_stop (the epoch is not over); the resumed run starts it again.
                stopped_by = stop.name or "signal"
                finish_pending()
                save_resume(epoch - 1, step_in_epoch + stats.steps, data.backend)
                break
            step_in_epoch = 0
            epochs_done = epoch
            mlog.end(C.EPOCH_STOP, metadata={C.EPOCH_NUM: epoch})
            trained = sum_over_ranks(stats.images, info)  # every image once per epoch: == train_samples
            graph_text = (f", CUDA graph: {graph_step.replays} replayed, {graph_step.warmup_steps} warm-up and "
                          f"{graph_step.fallbacks} other-shape steps eager so far" if graph_step is not None else "")
            say(f"epoch {epoch} done: {trained} images, {trained / max(stats.seconds, 1e-9):.0f} img/s, "
                f"{stats.seconds:.1f} s{graph_text}")
            metrics.write(kind="epoch", epoch=epoch, seconds=stats.seconds, images=trained,
                          images_per_s=trained / max(stats.seconds, 1e-9))
            if finish_pending():  # the previous evaluation, scored while this epoch trained
                break
            if epoch in eval_epochs:
                with _ema_applied(ema):  # the EMA weights evaluated, the trained ones restored after
                    pending = _start_evaluation(epoch, detector, data, label_to_category, eval_amp, info,
                                                channels_last, mlog, step=step, val_loss=val_loss, scorer=scorer,
                                                keep_weights=cfg.save_checkpoint)
                if not async_eval and finish_pending():  # scored here and now (on every rank: collective)
                    break
            if cfg.save_checkpoint and cfg.checkpoint_every and epoch % cfg.checkpoint_every == 0 \
                    and epoch < cfg.epochs:  # the last epoch's checkpoint is written after run_stop
                save_resume(epoch, 0, data.backend)
        else:
            finish_pending()  # the last epoch's evaluation, when it was scored in the background
    except BaseException as e:
        if scorer is not None:
            scorer.close(wait=False)
        try:
            mlog.end(C.RUN_STOP, metadata={C.STATUS: C.ABORTED, C.EPOCH_NUM: epochs_done})
        except OSError as log_error:  # the log's own disk refuses: say so, keep the first error
            print(f"error: could not append run_stop to {log_file}: {log_error}", file=sys.stderr, flush=True)
        mlog.close()
        metrics.close()
        if data is not None:
            data.close()
        if isinstance(e, OSError) and not isinstance(e, OutputWriteError) and e.errno in STORAGE_ERRNOS:
            raise OutputWriteError(e.errno, f"cannot write the run's outputs: {e}") from e
        raise
    mlog.end(C.RUN_STOP, metadata={C.STATUS: status, C.EPOCH_NUM: epochs_done})
    time_to_train = time.time() - run_start
    if scorer is not None:
        scorer.close()
    mlog.close()
    metrics.close()
    backend = data.backend
    data.close()  # stop loader workers / DALI pipelines before writing the checkpoint

    if cfg.save_checkpoint and stopped_by is None and not cfg.eval_only:
        # The end of the run as a resume point too (before BN statistics are averaged below):
        # `--epochs` can be raised and the run continued with --resume.
        save_resume(epochs_done, step_in_epoch, backend)  # mid-epoch only when no epoch ran here
    if cfg.save_checkpoint and info.distributed and stopped_by is None:
        average_batch_norm_stats(detector)  # the saved model is the one all ranks evaluate (collective)
    if cfg.save_checkpoint and info.is_main and stopped_by is None:
        save_checkpoint({
            # The weights evaluated: the EMA's when there is one; with --async-eval, those of the
            # evaluation that reached the target (the model trained one more epoch meanwhile).
            "model": reached.weights if reached is not None else (
                ema.model_state_dict() if ema is not None else detector.model.state_dict()),
            "optimizer": optimizer_state_dict(optimizer),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "epoch": reached.epoch if reached is not None else epochs_done,
            "step": reached.step if reached is not None else step, "preset": preset.name,
            "config": _config_to_save(cfg), "ap": last_ap,
        }, os.path.join(cfg.output_dir, "checkpoint.pt"))

    barrier()  # no rank leaves (and tears down the process group) while rank 0 still writes
    dataset_stats = dict(data.stats) if data is not None else {}
    result = RunResult(status=status, epochs=epochs_done, ap=last_ap, time_to_train_s=time_to_train,
                       log_file=log_file, output_dir=cfg.output_dir, evaluations=evaluations,
                       skipped_samples=skipped, dataset_stats=dataset_stats, world_size=info.world_size,
                       device=str(info.device), rank=info.rank, stopped_by=stopped_by,
                       resumed_from=str(resumed[0]) if resumed is not None else None)
    if info.is_main:
        # Strict JSON: no NaN (a run stopped by a signal before its first evaluation has no AP).
        write_json({**result.__dict__, "ap": None if math.isnan(result.ap) else result.ap},
                   os.path.join(cfg.output_dir, "result.json"))
    return result


def _ema_applied(ema: ModelEMA | None):
    """The EMA weights in the model for the block (evaluation), or nothing without an EMA."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


def _config_to_save(cfg: TrainConfig) -> dict:
    """The run's flags as a checkpoint records them: ``data_dir`` absolute, so that a checkpoint
    read from another working folder still finds its dataset."""
    d = cfg.to_dict()
    if d.get("data_dir"):
        d["data_dir"] = os.path.abspath(d["data_dir"])
    return d


def _check_val_has_ground_truth(data, evaluator: CocoEvaluator | None, info: DistInfo) -> None:
    """Refuse, on every rank, a val split on which COCO AP is undefined (no ground-truth box),
    before any training: such a run would log AP 0.0 or pycocotools' sentinel -1."""
    message = f"val annotation file {data.val_annotation_file} has no annotations: AP is undefined"
    if data.eval_samples == 0:  # the reader kept no val image: none has a usable box
        raise ConfigError(message)
    # --eval-all-images keeps images without boxes: count the ground truth itself (rank 0 has it).
    count = broadcast_float(float(evaluator.num_annotations) if evaluator is not None else 0.0, info)
    if count == 0:
        raise ConfigError(message)


@dataclass
class _Evaluation:
    """An evaluation whose inference is done: rank 0 holds the gathered detections and, when they
    are scored in the background (``--async-eval``), the scoring's future."""

    epoch: int
    step: int
    inference: Inference | None
    future: Future | None = None
    weights: dict | None = None  # rank 0, scored in the background: the evaluated weights (CPU copy)


def _start_evaluation(epoch, detector, data, label_to_category, amp, info, channels_last, mlog, *, step: int,
                      val_loss: bool, scorer: AsyncScorer | None, keep_weights: bool = False) -> _Evaluation:
    """The inference half of one evaluation on every rank (``eval_start`` logged); with a
    ``scorer``, rank 0 hands the detections to it and returns at once, keeping a CPU copy of the
    evaluated weights when ``keep_weights`` (the run's ``checkpoint.pt`` if this evaluation
    reaches the target: by then the model has trained one more epoch)."""
    mlog.start(C.EVAL_START, metadata={C.EPOCH_NUM: epoch})
    inference = infer(detector, data.eval, label_to_category, amp=amp, info=info, channels_last=channels_last,
                      val_loss=val_loss)
    evaluation = _Evaluation(epoch=epoch, step=step, inference=inference)
    if scorer is not None and inference is not None:
        evaluation.future = scorer.submit(inference.results, inference.image_ids)
        if keep_weights:
            evaluation.weights = {k: v.detach().to("cpu", copy=True) for k, v in detector.model.state_dict().items()}
    return evaluation


def _finish_evaluation(evaluation: _Evaluation, data, evaluator, info, mlog, metrics, run_start, say,
                       cfg) -> tuple[float, dict]:
    """The scoring half: rank 0 scores (or waits for the background scoring), every rank gets its
    AP, rank 0 logs ``eval_accuracy`` and ``eval_stop`` with the evaluated epoch's ``epoch_num``,
    the ``metrics.jsonl`` record (``step``: optimiser steps when the evaluated weights were taken;
    ``val_loss`` and ``val_loss_<term>`` with ``--val-loss``) and a line. Collective.

    An undefined AP (no ground truth among the evaluated images) stops every rank with
    :class:`UndefinedAPError`; nothing is logged as ``eval_accuracy`` then."""
    epoch = evaluation.epoch
    undefined: UndefinedAPError | None = None
    result = ShardedEvalResult(ap=math.nan)
    waited = 0.0
    if evaluation.inference is not None:  # rank 0
        try:
            if evaluation.future is not None:
                t0 = time.perf_counter()
                scoring = evaluation.future.result()
                waited = time.perf_counter() - t0
            else:
                scoring = evaluator.evaluate(evaluation.inference.results, evaluation.inference.image_ids)
            result = scored(evaluation.inference, scoring)
        except UndefinedAPError as e:  # raised on rank 0 only: tell the others through the broadcast
            undefined = e
    ap = broadcast_float(float("nan") if undefined is not None else result.ap, info)
    if undefined is not None:
        raise undefined
    if math.isnan(ap):
        raise UndefinedAPError(f"rank 0 could not compute the COCO AP on {data.val_annotation_file} "
                               "(see its error)")
    mlog.event(C.EVAL_ACCURACY, ap, metadata={C.EPOCH_NUM: epoch})
    mlog.end(C.EVAL_STOP, metadata={C.EPOCH_NUM: epoch})
    record_ = {"epoch": epoch, "step": evaluation.step, "ap": ap, "seconds": result.seconds,
               "elapsed_s": time.time() - run_start,
               "num_images": result.num_images, "num_detections": result.num_detections,
               "images_per_rank": result.images_per_rank, "scorer": result.backend,
               **{f"coco_{k}": v for k, v in result.stats.items()}}
    if evaluation.future is not None:
        record_["scored_in_background"] = True
        record_["wait_s"] = waited  # how long the trainer waited for the scoring at the epoch boundary
    if result.val_loss is not None:
        record_["val_loss"] = result.val_loss
        record_.update({f"val_loss_{k}": v for k, v in result.val_loss_terms.items()})
    metrics.write(kind="eval", **record_)
    loss_text = f", val loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    background = f", scored in the background (waited {waited:.1f} s)" if evaluation.future is not None else ""
    say(f"eval after epoch {epoch}: AP {ap:.4f} (AP50 {result.stats.get('AP50', float('nan')):.4f}, "
        f"VOC mAP@0.5 {result.stats.get('VOC_mAP50', float('nan')):.4f}{loss_text}, "
        f"{result.num_images} images, {result.seconds:.1f} s by {result.backend}{background}), target {cfg.threshold}")
    return ap, record_
