"""Multi-process training on torch.distributed: which process am I, and the few
places where a distributed run differs from a single one.

A run launched by ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) joins the process group here: ``nccl`` on GPUs,
``gloo`` on CPU. Every process holds the same models; DistributedDataParallel
averages their gradients. Each global batch of ``train.batch_size`` is split
into equal contiguous shares, one per process, so that a run on N processes
sees exactly the batches of a single-process run and (up to the order of float
sums) trains the same generator.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError, TargetgenError

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, samples, checkpoints and evaluations."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def join(device: str) -> Processes:
    """This process's place: from an initialised process group, from torchrun's
    environment (initialising the group), or alone."""
    if not dist.is_available():
        return Processes()
    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return Processes()
        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank)


def on_main(processes: Processes, action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 alone and hand its result (or its error) to every process."""
    if not processes.distributed:
        return action()
    outcome: list = [None, None]
    if processes.is_main:
        try:
            outcome = [action(), None]
        except TargetgenError as err:
            outcome = [None, err]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def leave(processes: Processes) -> None:
    """Take down the process group this run joined (torchrun's processes then exit)."""
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(batch_size: int, drop_last: bool, processes: Processes) -> None:
    if not processes.distributed:
        return
    if batch_size % processes.world_size:
        raise ConfigError(
            f"train.batch_size: {batch_size} does not split evenly over {processes.world_size} "
            "processes; use a multiple of the number of processes"
        )
    if not drop_last:
        raise ConfigError(
            "train.drop_last: distributed runs need every global batch complete, so that each "
            "process gets an equal share; set train.drop_last=true or leave it unset (the last "
            "len(data) mod batch_size images of each epoch are then skipped)"
        )


def local_share(batch: Tensor, processes: Processes) -> Tensor:
    """This process's contiguous share of a global batch (indices or latents)."""
    if not processes.distributed:
        return batch
    share = len(batch) // processes.world_size
    return batch[processes.rank * share : (processes.rank + 1) * share]


class Autocast(nn.Module):
    """Runs ``module`` under bf16 autocast and hands back float32 outputs, so that
    every loss and every input gradient outside it is computed in float32."""

    def __init__(self, module: nn.Module, device_type: str):
        super().__init__()
        self.module = module
        self.device_type = device_type

    def forward(self, *inputs: Tensor) -> Tensor:
        return in_bf16(self.module, self.device_type)(*inputs)


def in_bf16(network: Callable[..., Tensor], device_type: str) -> Callable[..., Tensor]:
    """``network`` (a module or a function of one, as ``models.frozen``'s) under bf16 autocast, handing back
    float32 as ``Autocast``: its matrix products in bf16, what comes out of it and its input gradients float32."""

    def call(*inputs: Tensor) -> Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return network(*inputs).float()

    return call


def wrap(module: nn.Module, processes: Processes, device: torch.device, bf16: bool = False) -> nn.Module:
    """The module as training calls it: under autocast when ``bf16``, inside DDP when distributed."""
    if bf16:
        module = Autocast(module, device.type)
    if processes.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=device_ids)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The plain network inside DDP and autocast wrappers: for checkpoints, samples,
    evaluation (rank 0 alone) and input gradients (inverse examples)."""
    while isinstance(module, (DistributedDataParallel, Autocast)):
        module = module.module
    return module


def _communication_device() -> torch.device:
    """nccl moves CUDA tensors only; gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average(stats: dict[str, float], processes: Processes) -> dict[str, float]:
    """Log statistics averaged over processes (every process must call this together)."""
    if not processes.distributed or not stats:
        return stats
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_communication_device())
    dist.all_reduce(values)
    return {k: v / processes.world_size for k, v in zip(keys, values.tolist())}


def all_sum(values: Tensor, world_size: int) -> Tensor:
    """``values`` summed over the processes (every process must call this together); alone, ``values``."""
    if world_size <= 1:
        return values
    summed = values.to(_communication_device(), copy=True)
    dist.all_reduce(summed)
    return summed.to(values.device)


def anywhere(flag: bool, processes: Processes) -> bool:
    """Whether ``flag`` holds in any process (every process must call this together), so that all act alike."""
    if not processes.distributed:
        return flag
    return bool(all_sum(torch.tensor([float(flag)]), processes.world_size).item() > 0)


def _all_gather(tensor: Tensor, processes: Processes) -> Tensor:
    device = _communication_device()
    parts = [torch.empty_like(tensor, device=device) for _ in range(processes.world_size)]
    dist.all_gather(parts, tensor.to(device).contiguous())
    return torch.stack(parts).to(tensor.device)


def gather_nearest(
    distance: Tensor, pool_index: Tensor, payload: Tensor, processes: Processes
) -> tuple[Tensor, Tensor, Tensor]:
    """Per query, the nearest candidate over all processes: the smallest distance,
    ties going to the lowest pool index, as a single process scanning the whole
    pool in order keeps the first of equal neighbours."""
    if not processes.distributed:
        return distance, pool_index, payload
    distances, indices, payloads = (_all_gather(t, processes) for t in (distance, pool_index, payload))
    queries = torch.arange(len(distance))
    best = torch.zeros(len(distance), dtype=torch.int64)
    for r in range(1, processes.world_size):
        d_best, i_best = distances[best, queries], indices[best, queries]
        better = (distances[r] < d_best) | ((distances[r] == d_best) & (indices[r] < i_best))
        best[better] = r
    return (
        distances[best, queries],
        indices[best, queries],
        payloads[best.to(payloads.device), queries.to(payloads.device)],
    )
