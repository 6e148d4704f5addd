"""Training across processes with torch.distributed (the process group Ray Train sets up).

    parallel = Parallel.current(device)           # world 1 when no process group exists
    engine = Engine(model, stages, device, parallel=parallel)

What the engine needs from the other ranks, and nothing about how they were started:
  wrap      the dense model in DDP (re-wrapped each stage, after the stage decides what trains;
            the TorchRec tables are outside it: sharded, and updated in their own kernels)
  gather    every rank's predictions, so validation and test metrics are exact over the split
  lockstep  evaluation batches padded with None until every rank is done: sharded lookups are
            collective, so a rank whose shard ran out still joins the others' lookups
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from hilomoe.config import TrainConfig

if TYPE_CHECKING:
    from hilomoe.engine.metrics import Predictions


@dataclass
class Parallel:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    compile: bool = False

    @classmethod
    def current(cls, device: torch.device | str = "cpu", compile: bool = False) -> Parallel:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), torch.device(device), compile)
        return cls(device=torch.device(device), compile=compile)

    @classmethod
    def single(cls, cfg: TrainConfig, device: torch.device | str = "cpu") -> Parallel:
        """This process alone (whatever process group exists), compiling as `cfg` asks."""
        return cls(device=torch.device(device), compile=cfg.runtime.compile)

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return torch.compile(module) if self.compile else module

    def gather(self, p: Predictions) -> Predictions:
        """All ranks' predictions, concatenated on every rank (each row lives on one rank)."""
        if self.world == 1:
            return p
        return type(p).concat(self.all_gather(p))

    def all_gather(self, obj) -> list:
        """`obj` of every rank, in rank order."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def lockstep(self, batches: Iterable) -> Iterator:
        """`batches`, then None while any other rank still has batches."""
        if self.world == 1:
            yield from batches
            return
        it = iter(batches)
        while True:
            batch = next(it, None)
            more = torch.tensor([int(batch is not None)])
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                return
            yield batch
