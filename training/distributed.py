"""Process-group set-up and model wrapping for torchrun (DDP or FSDP2); a no-op in one process.

State dicts go through torch.distributed.checkpoint.state_dict in "full" form (plain tensors keyed
by parameter name, gathered to rank 0 and offloaded to CPU), which is the same for a bare module,
DDP and FSDP2 and for any world size: a checkpoint written by 4 ranks resumes on 1, and the reverse.

Ranks must issue the same collectives in the same order, or they wait for each other forever. Work
that can fail before the collectives start (config checks, data preparation on rank 0, reading a
checkpoint, writing one on rank 0) runs inside `fail_together`: if it raises on any rank, it
raises on every rank, and the error is printed once (see `reports_error`).
"""

import contextlib
import os
import pickle
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from .errors import TrainConfigError

# Ranks wait for rank 0 to tokenize a corpus or write a checkpoint: that can take far longer than the
# default collective timeout (10 min on NCCL), so that waiting happens on a CPU (gloo) group with a
# long timeout of its own. A rank that dies is noticed by torchrun, which stops the others.
COORDINATION_TIMEOUT = timedelta(hours=12)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    cpu_group: Optional[Any] = field(default=None, repr=False)  # gloo group for object collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int) -> torch.device:
    """train.device as a torch device: auto is this process's GPU if there is one, else the CPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainConfigError(f"train.device={name} but CUDA is not available: use train.device=cpu (or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)  # one GPU per process under torchrun


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR... in the environment), training on
    `device` (the plan's, pick_device's choice for this process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    cpu_group = dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT)
    return DistInfo(dist.get_rank(), world_size, device, cpu_group)


def _portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (to travel to the other ranks), else a RuntimeError saying it."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{error.__class__.__name__}: {error}")


@contextlib.contextmanager
def fail_together(info: DistInfo):
    """Run a block that holds no collective on every rank; if it raises on any rank, raise on all.

    Every rank then raises: its own error if it had one, else the error of the lowest failing rank.
    `error.reported_by` names the one rank that should print it (the lowest rank that raised that
    message), so a config error seen by 8 ranks is printed once. Also a barrier: a rank leaves the
    block only when all have finished it (e.g. the others wait here while rank 0 prepares data).
    """
    if not info.distributed:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        error = e
    outcomes: list = [None] * info.world_size
    dist.all_gather_object(outcomes, None if error is None else _portable(error), group=info.cpu_group)
    failed = [(rank, e) for rank, e in enumerate(outcomes) if e is not None]
    if not failed:
        return
    if error is None:  # the lowest failing rank's
        error = failed[0][1]
    error.reported_by = next((rank for rank, e in failed if type(e) is type(error) and str(e) == str(error)),
                             info.rank)
    raise error


def reports_error(error: BaseException) -> bool:
    """Whether this rank prints `error` (see fail_together): one line per distinct failure."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return getattr(error, "reported_by", rank) == rank


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if `flag` is true on any (e.g. one rank's clock says the time budget is spent)."""
    if not info.distributed:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.cpu_group)
    return bool(t.item())


def sum_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    return sum_across_ranks(value, info) / info.world_size  # (gloo has no AVG)


def wrap_model(model: torch.nn.Module, info: DistInfo, parallel: str) -> torch.nn.Module:
    """DDP (a full replica per rank) or FSDP2 (each rank keeps 1/world of every parameter, gradient
    and optimizer state; each block all-gathers its weights for its forward and backward)."""
    if not info.distributed:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The model's only buffers are the constant RoPE tables: no need to broadcast them every forward.
        return DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                       broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 compute with fp32 gradient reduction on CUDA; plain fp32 on CPU (bf16 matmuls are slow there).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if info.device.type == "cuda" else MixedPrecisionPolicy()
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def forward_is_collective(model: torch.nn.Module) -> bool:
    """FSDP2: every forward all-gathers weights, so all ranks must run it (e.g. sampling text)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: torch.nn.Module, enabled: bool):
    """The context of one micro-batch's backward: it reduces gradients across ranks only if `enabled` (the last
    micro-batch of a step); otherwise they accumulate locally (DDP's no_sync; FSDP2's requires_gradient_sync, set
    for each micro-batch: the last one turns it back on)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return model.no_sync() if not enabled and hasattr(model, "no_sync") else contextlib.nullcontext()


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as plain CPU tensors keyed by parameter name.

    Collective under FSDP (every rank must call it); with cpu_offload only rank 0 receives the
    tensors (the other ranks get empty dicts), so only rank 0 needs the memory for a full copy.
    """
    return get_model_state_dict(model, options=_FULL), get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optim_state: dict) -> None:
    """Load a full (unsharded) state on every rank; under FSDP each rank keeps its own shard."""
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
