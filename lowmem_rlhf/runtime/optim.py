"""Optimizers named in profiles: torch AdamW, or bitsandbytes 8-bit / paged variants."""

from __future__ import annotations

import math

import torch

NON_PAGED = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw"}


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0,
                   device: str | torch.device = "cpu") -> torch.optim.Optimizer:
    """Paged optimizers need CUDA unified memory; on the CPU their non-paged twin is the same math."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    if torch.device(device).type != "cuda":
        name = NON_PAGED.get(name, name)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def default_warmup(total_steps: int) -> int:
    """Warmup steps of a run of `total_steps`: a tenth, at most 10."""
    return min(10, total_steps // 10)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                  min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to `min_ratio` of the peak learning rate."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(optimizer: torch.optim.Optimizer, params, scheduler=None, max_norm: float = 1.0) -> torch.Tensor:
    """The one optimizer step of every stage: clip the gradient norm of `params` to `max_norm`,
    step, advance the scheduler (if any), zero the gradients. Returns the norm before clipping
    (a 0-d tensor: reading it synchronises, so callers read it only when they log it)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
