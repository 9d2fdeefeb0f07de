"""Process-group setup for `torchrun`: NCCL on CUDA, gloo on CPU; a no-op single process otherwise."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (identity in a single process)."""
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather_objects(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.backend is not None and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None) -> DistEnv:
    """Reads torchrun's WORLD_SIZE / RANK / LOCAL_RANK. device: None = cuda if available, else cpu."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if want.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available on this machine")
        if world > 1:
            want = torch.device("cuda", local)
        torch.cuda.set_device(want)
    backend = None
    if world > 1:
        backend = "nccl" if want.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    return DistEnv(rank, world, local, want, backend)
