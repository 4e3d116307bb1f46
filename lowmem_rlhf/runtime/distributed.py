"""Data parallel over torch.distributed: the same stage in N processes (`torchrun --nproc_per_node N`
or `accelerate launch`), each holding the whole shared base and its adapters, each training on its
share of the global batch; the trained adapter's gradients averaged across processes by torch's
DistributedDataParallel.

    world()                the process group of this run (one process: size 1, nothing to reduce)
    world().sum(t)         a tensor summed over the ranks (statistics: token counts, whitening moments)
    AdapterSync(params)    DDP over one adapter's trainable parameters (LoRA A/B and its head), not
                           the model: the base is frozen and shared by every adapter, so DDP must
                           neither bucket it nor broadcast it. Training forwards run through it:
                           sync(fn, *args, last=...) = fn(*args), with DDP's gradient hooks armed
                           on the last micro-batch of an optimizer step and `no_sync` before it.

How it meets the single-base rules. Each trained adapter has its own DDP reducer (built while it is
active: peft marks only the active adapter's parameters trainable, and DDP ignores the others).
The actor's backward runs while the actor is active, the critic's while the critic is (pitfall #2
in docs/pitfalls.md), so each backward reaches its own adapter's parameters only, and exactly the
reducer that armed its hooks in the forward completes. Gradient accumulation arms the hooks on the
last micro-batch only: the earlier ones accumulate locally, and one all-reduce per step averages
the sum. DDP divides by the world size, so a loss that should be a mean over the *global* batch is
divided by the global count over the world size (`World.mean` of the ranks' counts).

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; gloo on CPUs, nccl on
CUDA (each rank on cuda:LOCAL_RANK).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from lowmem_rlhf.errors import UserError


@dataclass
class World:
    """This run's processes. size 1: every collective is the identity."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes outputs, checkpoints and metrics."""
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over the ranks (a new tensor)."""
        if self.size == 1:
            return t
        out = t.detach().clone()
        torch.distributed.all_reduce(out)
        return out

    def total(self, x: float) -> float:
        """A Python number summed over the ranks."""
        if self.size == 1:
            return float(x)
        return float(self.sum(torch.tensor(float(x), dtype=torch.float64, device=self.device)))

    def mean(self, x: float) -> float:
        """A Python number averaged over the ranks (each rank's share is the same size)."""
        return self.total(x) / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (a stop request seen by one process)."""
        return self.total(float(flag)) > 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (pickled: small objects only)."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def mine(self, rows: list) -> list:
        """This rank's share of a global batch's `rows`: contiguous, len / size of them."""
        per = len(rows) // self.size
        return rows[self.rank * per: (self.rank + 1) * per]


_WORLD: World | None = None


def launched() -> int:
    """The WORLD_SIZE a launcher set (1 when none did)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun "
                        "--nproc_per_node N") from None


def local_processes() -> int:
    """Processes of this run on this node (torchrun's LOCAL_WORLD_SIZE; 1 without a launcher):
    they share the node's CPU RAM."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", launched()))


def world() -> World:
    """The process group of this run, joined on first use: under a launcher (WORLD_SIZE > 1) with
    gloo on CPUs or nccl on CUDA; otherwise a world of one, with no process group."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = launched()
    if size <= 1:
        _WORLD = World()
        return _WORLD
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but {torch.cuda.device_count()} CUDA device(s) here; "
                            "--nproc_per_node must not exceed the GPUs of a node")
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    _WORLD = World(rank=rank, size=size, local_rank=local, backend=backend)
    return _WORLD


def shutdown() -> None:
    """Leave the process group once a command has finished on every rank: a barrier, so no rank
    tears its connections down while another still talks to it, then `destroy_process_group`.
    Left to interpreter teardown, gloo's threads can die with the process: once in CI
    (2026-12-01) a rank of a 2-process ZeRO-3 SFT exited with SIGABRT ("terminate called without
    an active exception") and failed the run. Without a launcher nothing changes (a one-process
    ZeRO-3 run keeps the group DeepSpeed made, as before: tests run several in one process)."""
    global _WORLD
    if launched() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _WORLD = None


class _Params(torch.nn.Module):
    """The trainable parameters of one adapter, as a module DDP can wrap; forward(fn, *a) runs fn."""

    def __init__(self, params: list[torch.nn.Parameter]):
        super().__init__()
        self.params = torch.nn.ParameterList(params)

    def forward(self, fn: Callable, *args: Any, **kw: Any) -> Any:
        return fn(*args, **kw)


class AdapterSync:
    """DDP over one adapter's parameters `params` (build it while that adapter is active, so they
    are the ones marked trainable). sync(fn, *args, last=True): fn(*args) as a DDP forward; with
    last False inside `no_sync` (an earlier micro-batch of a step: gradients accumulate locally).
    Construction broadcasts rank 0's values, so every rank starts from the same adapter."""

    def __init__(self, params: list[torch.nn.Parameter], device: torch.device):
        from torch.nn.parallel import DistributedDataParallel as DDP

        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise RuntimeError("AdapterSync: no trainable parameter; build it while the adapter is active")
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
            else None
        self.ddp = DDP(_Params(trainable), device_ids=cuda,
                       find_unused_parameters=False)

    def __call__(self, fn: Callable, *args: Any, last: bool = True, **kw: Any) -> Any:
        ctx = contextlib.nullcontext() if last else self.ddp.no_sync()
        with ctx:
            return self.ddp(fn, *args, **kw)


__all__ = ["World", "world", "launched", "local_processes", "AdapterSync"]
