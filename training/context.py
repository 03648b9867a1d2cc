"""Where a train function runs: its rank, the world size and its device, from Ray Train
inside a worker, else one process; and the collectives that need to know."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorkerContext:
    """Rank, world size and device of this process.

    Args:
        rank: this worker's rank (0 outside Ray Train).
        world: the number of workers (1 outside Ray Train).
        in_ray: whether this process is a Ray Train worker (it reports and checkpoints).
        device: where the model and batches live.
    """

    rank: int
    world: int
    in_ray: bool
    device: torch.device

    @classmethod
    def current(cls, use_gpu: bool = False) -> WorkerContext:
        try:
            import ray.train

            ctx = ray.train.get_context()
            rank, world = ctx.get_world_rank(), ctx.get_world_size()
        except Exception:  # outside a Ray Train worker (direct call in a test or benchmark)
            return cls(0, 1, False, _local_device(use_gpu))
        import ray.train.torch

        return cls(rank, world, True, ray.train.torch.get_device())

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world > 1

    def mean(self, value: torch.Tensor) -> float:
        """The mean of `value` over every worker (a collective: all must call it)."""
        if self.distributed:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return float(value.item())

    def sum_int(self, value: int) -> int:
        """The sum of an integer over every worker (a collective when distributed)."""
        if not self.distributed:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(total)
        return int(total.item())


def _local_device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    # A single-process run (tests, benchmarks) honours scaling.use_gpu like a worker.
    if not torch.cuda.is_available():
        raise RuntimeError("scaling.use_gpu is true but this process sees no CUDA device")
    return torch.device("cuda", torch.cuda.current_device())
