"""The processes of one training run: a single one, or those ``torchrun`` starts (DDP).

Each process takes a slice of every global batch; the model is wrapped in
``DistributedDataParallel`` so the gradients are averaged. Rank 0 alone writes the run
folder, and gives the others its BatchNorm statistics before anything is validated or saved.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["Processes"]


class Processes:
    """Process-group facts (a single process when not launched by torchrun)."""

    def __init__(self, device: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.world_size > 1:
            device = f"cuda:{self.local_rank}"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("run.device asks for CUDA but no GPU is visible")
            torch.cuda.set_device(self.device)
        self.initialised_here = False
        if self.world_size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
                self.initialised_here = True

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes the run folder."""
        return self.rank == 0

    def local_slice(self, index: Tensor) -> Tensor:
        """This process's share of a global batch."""
        return index[self.rank :: self.world_size]

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` in DistributedDataParallel when there are several processes, else itself."""
        if self.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def share_buffers(self, model: nn.Module) -> None:
        """Give every process rank 0's BatchNorm statistics before evaluating or saving."""
        if self.world_size > 1:
            import torch.distributed as dist

            for buf in model.buffers():
                dist.broadcast(buf, 0)

    def replicas_identical(self, model: nn.Module, buffers_of: nn.Module) -> Optional[bool]:
        """Under DDP, confirm that every process ends with identical weights of ``model``
        (after sharing the buffers of ``buffers_of``, the weights that are shipped)."""
        if self.world_size == 1:
            return None
        import torch.distributed as dist

        self.share_buffers(buffers_of)
        checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
        gathered = [torch.zeros_like(checksum) for _ in range(self.world_size)]
        dist.all_gather(gathered, checksum)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        if not same:
            raise RuntimeError(f"DDP replicas diverged: parameter checksums {[float(g) for g in gathered]}")
        return same

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist

            # every process waits for rank 0's final writes; exiting while a peer still
            # talks to gloo aborts the process ("terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()
            self.initialised_here = False
