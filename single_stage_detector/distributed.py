"""Process-group set-up and rank helpers (torchrun or SLURM environment; single process otherwise)."""
from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

from torch import nn

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["DistInfo", "LaunchEnv", "launch_env", "expand_slurm_nodelist", "first_slurm_host",
           "init_distributed", "sync_batch_norm", "CpuSyncBatchNorm", "shutdown", "broadcast_seed", "seed_everything", "barrier",
           "broadcast_float", "select_device", "to_device_async", "cuda_unavailable_reason", "DeviceUnavailableError", "average_batch_norm_stats", "sum_over_ranks"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def cuda_unavailable_reason() -> str | None:
    """Why CUDA cannot be used by this process (None when it can), in words a user can act on:
    a CPU-only torch build, no GPU visible (none requested from the scheduler,
    ``CUDA_VISIBLE_DEVICES`` empty), or the driver refusing the build (too old)."""
    if torch.version.cuda is None:
        return f"this PyTorch build ({torch.__version__}) has no CUDA support"
    try:
        if torch.cuda.device_count() == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            return f"no GPU is visible to this process{hint}; was one requested from the scheduler?"
        torch.cuda.init()
    except (RuntimeError, AssertionError) as e:  # e.g. a driver older than the build's CUDA
        return f"CUDA does not initialise: {str(e).strip().splitlines()[0]}"
    return None


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks the process's local GPU when CUDA works, else the CPU (with a warning
    naming why); ``cuda``/``cuda:N`` requires a usable GPU.

    Raises:
        DeviceUnavailableError: ``cuda`` requested and CUDA is unusable (the message says why).
    """
    if requested == "auto":
        reason = cuda_unavailable_reason()
        if reason is None:
            return torch.device("cuda", _local_gpu(local_rank))
        if torch.version.cuda is not None:  # a CUDA build on a machine without a usable GPU: say so
            print(f"WARNING: --device auto: running on the CPU ({reason}). GPU configurations pass "
                  "--device cuda, which stops here instead.", flush=True)
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            raise DeviceUnavailableError(f"--device {requested}: {reason}")
        if device.index is None:
            device = torch.device("cuda", _local_gpu(local_rank))
        elif device.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"--device {requested}: only {torch.cuda.device_count()} GPU(s) are "
                                         f"visible to this process (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def to_device_async(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` (host memory) on ``device`` without a host synchronisation.

    A CUDA copy from pageable host memory may wait for the stream's queued work (the driver
    stages it through pinned memory), which would make the host wait for the previous
    training step every step; a small per-step tensor (targets, an index) is therefore pinned
    first (torch's caching host allocator: no allocation after the first steps) and copied
    with ``non_blocking=True``. Other devices: a plain ``.to``.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class DeviceUnavailableError(RuntimeError):
    """The requested device cannot be used (the message names the reason)."""


def _local_gpu(local_rank: int) -> int:
    """GPU index of this process: its local rank, or 0 when the launcher made only one GPU
    visible per task (SLURM ``--gpus-per-task=1`` / per-task ``CUDA_VISIBLE_DEVICES``)."""
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise RuntimeError(f"local rank {local_rank} but only {count} GPUs are visible to this process: "
                       "start one process per GPU (torchrun --nproc_per_node / srun --ntasks-per-node)")


def _env_int(*names: str, environ=None) -> int | None:
    env = os.environ if environ is None else environ
    for n in names:
        if env.get(n, "") != "":
            return int(env[n])
    return None


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM compact node list, in order.

    ``node[01-04,07],gpu5`` -> node01 node02 node03 node04 node07 gpu5. Zero padding is
    kept; several bracket groups in one name (``r[1-2]n[1-2]``) expand as a product.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"bad SLURM node list {s!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"bad SLURM node list {s!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_one(item: str) -> list[str]:
    i = item.find("[")
    if i < 0:
        return [item]
    j = item.index("]", i)
    prefix, body, rest = item[:i], item[i + 1:j], item[j + 1:]
    values: list[str] = []
    for r in body.split(","):
        r = r.strip()
        if "-" in r:
            lo, hi = r.split("-", 1)
            width = len(lo)
            if int(hi) < int(lo):
                raise ValueError(f"bad SLURM node range {r!r} in {item!r}")
            values.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1))
        elif r:
            values.append(r)
    if not values:
        raise ValueError(f"bad SLURM node list {item!r}: empty range")
    tails = _expand_one(rest) if rest else [""]
    return [prefix + v + t for v in values for t in tails]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM compact node list (where SLURM puts task 0)."""
    hosts = expand_slurm_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts[0]


DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    launcher: str  # "torchrun" | "slurm" | "none"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_env(environ=None) -> LaunchEnv:
    """Rank, world size, local rank and rendezvous address from the environment.

    * torchrun (or any launcher setting ``RANK``/``WORLD_SIZE``): those, plus
      ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. Takes precedence over SLURM, so
      ``srun torchrun ...`` (one torchrun per node) works.
    * SLURM ``srun`` with one task per GPU: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``
      (else ``SLURM_NTASKS``), ``SLURM_LOCALID``; ``MASTER_ADDR`` (if not set) is the
      first host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``/``SLURM_NODELIST``),
      ``MASTER_PORT`` (if not set) 29500 + ``SLURM_JOB_ID`` mod 1000, so that jobs sharing
      a node do not collide.
    * neither: one process.
    """
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR") or None
    port = _env_int("MASTER_PORT", environ=env)
    if env.get("RANK", "") != "" and env.get("WORLD_SIZE", "") != "":
        rank = _env_int("RANK", environ=env)
        world = _env_int("WORLD_SIZE", environ=env)
        local = _env_int("LOCAL_RANK", environ=env)
        return LaunchEnv("torchrun", rank, world, local if local is not None else 0,
                         addr or "127.0.0.1", port or DEFAULT_MASTER_PORT)
    if env.get("SLURM_PROCID", "") != "":
        world = _env_int("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", environ=env) or 1
        rank = _env_int("SLURM_PROCID", environ=env)
        local = _env_int("SLURM_LOCALID", environ=env) or 0
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            addr = first_slurm_host(nodelist) if nodelist else "127.0.0.1"
        if port is None:
            job = _env_int("SLURM_JOB_ID", environ=env)
            port = DEFAULT_MASTER_PORT + (job % 1000 if job is not None else 0)
        return LaunchEnv("slurm", rank, world, local, addr, port)
    return LaunchEnv("none", 0, 1, 0, addr or "127.0.0.1", port or DEFAULT_MASTER_PORT)


def init_distributed(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the process group described by the environment (:func:`launch_env`), if any.

    One GPU per process (``cuda:LOCAL_RANK``); NCCL on CUDA, gloo on CPU; collectives
    time out after ``timeout_s`` seconds (an error, not a hang, when a rank died).
    """
    env = launch_env()
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise RuntimeError(f"bad distributed environment: rank {env.rank} of world size {env.world_size}")
    dev = select_device(device, env.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if env.world_size > 1 and not dist.is_initialized():
        os.environ["MASTER_ADDR"] = env.master_addr
        os.environ["MASTER_PORT"] = str(env.master_port)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            init_method="env://",
            rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_float(value: float, info: DistInfo) -> float:
    """Rank 0's ``value`` on every rank."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())


def sum_over_ranks(value: int, info: DistInfo) -> int:
    """The sum of ``value`` over all ranks, on every rank (one all-reduce; once per epoch, not per step)."""
    if not info.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return int(t.item())


def average_batch_norm_stats(module: nn.Module, group=None) -> int:
    """Replace every BatchNorm ``running_mean`` / ``running_var`` of ``module`` by its mean over
    the ranks of ``group`` (default: all), in place. Collective: every rank must call it.

    The MLPerf reference (mlcommons/training ``single_stage_detector/ssd/train.py``) and
    NVIDIA's v0.7 submission (``--allreduce-running-stats``, on by default) do this before
    each evaluation: with plain (or group-synchronised) BatchNorm each rank's running
    statistics come from its own data. The buffers go through one all-reduce per dtype
    (NCCL on GPUs, gloo on CPUs). Returns the number of buffers averaged (0 without a
    process group).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    world = dist.get_world_size(group)
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var) if b is not None]
    if world == 1 or not buffers:
        return 0
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for b in buffers:
        by_kind.setdefault((b.dtype, b.device), []).append(b)
    with torch.no_grad():
        for bufs in by_kind.values():
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat /= world
            offset = 0
            for b in bufs:
                b.copy_(flat[offset:offset + b.numel()].view_as(b))
                offset += b.numel()
    return len(buffers)


def broadcast_seed(seed: int | None, info: DistInfo) -> int:
    """The run's seed: the given one, or one drawn by rank 0, identical on all ranks."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**31 - 1) if info.is_main else 0
    return int(broadcast_float(float(seed), info))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over a process group for CPU tensors (gloo), where ``nn.SyncBatchNorm``
    refuses to run (its kernels and DDP's check are GPU-only).

    In training mode the statistics are taken over the group with the differentiable
    ``torch.distributed.nn`` all-reduce (sum and count, then the centred sum of squares),
    which gives the forward and backward of batch norm over the union of the group's
    batches, and the same running-statistics update as ``nn.SyncBatchNorm``. Otherwise
    (eval mode, no process group, a group of one) it is plain batch norm. Its state dict
    is that of the BatchNorm it replaces.
    """

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(input)
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        count_local = input.numel() // input.size(1)
        sums = all_reduce(torch.cat([input.sum(dims), input.new_tensor([float(count_local)])]), group=group)
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = input - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims), group=group) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out


def sync_batch_norm(module: nn.Module, process_group=None, device_type: str = "cuda") -> nn.Module:
    """Every BatchNorm of ``module`` synchronised over ``process_group`` (state-dict compatible).

    ``nn.SyncBatchNorm`` on GPUs; :class:`CpuSyncBatchNorm` for a CPU (gloo) run.
    """
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group=process_group)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm):
            m.__class__ = CpuSyncBatchNorm
            m.process_group = process_group
    return module
