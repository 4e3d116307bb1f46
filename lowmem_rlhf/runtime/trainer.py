"""The optimizer side of a single-adapter stage (SFT, RM) behind one small interface, so a stage's
loop reads the same with plain torch and with DeepSpeed ZeRO-3 offload:

    trainer.forward(fn, *args, last=True)
                                 run a loss helper (through the DeepSpeed engine under ZeRO-3; through
                                 the adapter's DDP wrapper in a data-parallel run, where `last` marks
                                 the step's last micro-batch: its backward averages the gradients)
    trainer.backward(loss)       one micro-batch, while the adapter is active; on a CPU the heap it
                                 freed then goes back to the OS (runtime.host_heap)
    trainer.step(fault)          clip 1.0 + AdamW + warmup-cosine; returns {"grad_norm", "lr", "skipped"}:
                                 a NaN/inf gradient norm skips the update
    trainer.reset()              undo a partial step (out of memory mid-step): its gradients, and a
                                 half-applied optimizer step
    trainer.save_adapter(...)    PEFT layout (gathered first under ZeRO-3), written by rank 0 alone
    trainer.offloaded_bytes()    host bytes DeepSpeed holds (ZeRO-3 only; measure.report reads it)
    trainer.checkpoint_parts()   what `checkpoint.capture/restore` needs (None: not resumable)
"""

from __future__ import annotations

from pathlib import Path

import torch

from lowmem_rlhf.config import Profile
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.runtime.distributed import AdapterSync, world
from lowmem_rlhf.runtime.host_heap import release_freed_heap
from lowmem_rlhf.runtime.optim import (
    StepUndo,
    default_warmup,
    finite,
    make_optimizer,
    make_scaler,
    optimizer_step,
    overflow_is_expected,
    warmup_cosine,
)


class PlainTrainer:
    """torch (or bitsandbytes 8-bit/paged) AdamW on the adapter's parameters."""

    resumable = True  # checkpoints hold its optimizer/scheduler states
    elastic = True  # the micro-batch may change between steps (OOM recovery)

    def __init__(self, shared: SharedBase, adapter: str, profile: Profile, lr: float, total_steps: int,
                 warmup_steps: int):
        self.shared, self.adapter = shared, adapter
        self.device = shared.loaded.device
        self.optimizer = make_optimizer(shared.parameters_of(adapter), profile.optimizer, lr, device=self.device)
        self.scheduler = warmup_cosine(self.optimizer, total_steps, warmup_steps)
        self.scaler = make_scaler(profile.dtype, self.device)
        if self.scaler is not None:
            shared.scalers[adapter] = self.scaler
        self.undo = StepUndo(shared.parameters_of(adapter), self.optimizer, self.scaler)

    def forward(self, fn, *args, last: bool = True):
        return self.shared.train_forward(fn, *args, last=last)

    def backward(self, loss: torch.Tensor) -> None:
        self.shared.backward(loss)
        if self.device.type == "cpu":
            # the next micro-batch, padded to another length, would land beside the holes this one
            # left in glibc's heap and grow the process past what it holds. Measured at the CPU
            # defaults (docs/speed.md): SFT peak 4.4 -> 3.6-3.95 GiB at ~13% longer steps, RM 7.3 ->
            # 6.1 GiB at about the same. Not in the RL updates: their peak is under the estimate, and
            # `auto` took 6:20 with them trimmed too (5:50 without; 5:23 with no trim at all)
            release_freed_heap()

    def step(self, fault: tuple[str, int, int] | None = None) -> dict:
        """fault: (stage, step, micro_batch) for the fault-injection switches (runtime.oom)."""
        norm = optimizer_step(self.optimizer, self.shared.parameters_of(self.adapter), self.scheduler,
                              undo=self.undo, fault=fault, scaler=self.scaler)
        skipped = not finite(norm)
        out = {"grad_norm": float(norm), "lr": self.scheduler.get_last_lr()[0], "skipped": skipped,
               "overflow": skipped and overflow_is_expected(self.scaler)}
        if self.scaler is not None:
            out["loss_scale"] = self.scaler.get_scale()
        return out

    def reset(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.shared.abandon()
        self.undo.undo()

    def save_adapter(self, out_dir: Path, extra_meta: dict | None = None) -> Path:
        """The adapter in PEFT layout; in a data-parallel run rank 0 alone writes it (every rank
        calls this: under ZeRO-3 the gather before the write is collective)."""
        if not world().main:
            return Path(out_dir)
        return self.shared.save_adapter(self.adapter, out_dir, extra_meta=extra_meta)

    def checkpoint_parts(self) -> dict:
        scalers = {} if self.scaler is None else {f"{self.adapter}-loss-scale": self.scaler}
        return dict(models={self.adapter: (self.shared.model, self.shared.owns(self.adapter))},
                    optimizers={self.adapter: self.optimizer}, schedulers={self.adapter: self.scheduler, **scalers})



def make_trainer(shared: SharedBase, adapter: str, profile: Profile, lr: float, total_steps: int,
                 micro_batch: int, grad_accum: int):
    """PlainTrainer, or Zero3Trainer for the zero3-offload profile (one process, params and
    optimizer in CPU RAM). In a data-parallel run the adapter's gradients are averaged across the
    ranks by DDP over its parameters (`runtime.distributed.AdapterSync`)."""
    warmup = default_warmup(total_steps)
    w = world()
    if profile.offload == "zero3":
        from lowmem_rlhf.runtime.zero3 import Zero3Trainer

        return Zero3Trainer(shared, adapter, lr=lr, total_steps=total_steps, warmup_steps=warmup,
                            micro_batch=micro_batch, grad_accum=grad_accum)
    trainer = PlainTrainer(shared, adapter, profile, lr, total_steps, warmup)
    if w.size > 1:
        shared.grad_sync[adapter] = AdapterSync(shared.parameters_of(adapter), trainer.device)
    return trainer


__all__ = ["PlainTrainer", "make_trainer"]
