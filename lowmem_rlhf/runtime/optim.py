"""Optimizers named in profiles: torch AdamW, or bitsandbytes 8-bit / paged variants."""

from __future__ import annotations

import contextlib
import math

import torch

from lowmem_rlhf.plan.estimator import (  # the rules the estimator counts
    parks_idle_state,
    undo_host_bytes,
)

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


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def make_scaler(dtype: str, device) -> "torch.amp.GradScaler | None":
    """fp16 compute (cards without native bf16: T4, V100, 2080 Ti) gets a dynamic loss scale:
    torch's GradScaler. The adapter weights stay fp32 (peft keeps them so on a 16-bit base); the
    loss is scaled before backward, so the small gradients through the fp16 base do not flush to
    zero, and unscaled before clipping. An overflow (inf/NaN at this scale) skips the step and
    halves the scale. bf16 and fp32 need none: None."""
    if dtype != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def overflow_is_expected(scaler) -> bool:
    """An inf/NaN gradient under a loss scale still above 1 is the scale being too high, which
    the scaler corrects by halving it: not counted towards --max-nonfinite."""
    return scaler is not None and scaler.get_scale() > 1.0


class StepUndo:
    """The trained parameters and their optimizer's state from before an optimizer step, copied to
    the CPU (no accelerator memory), so an out-of-memory inside the step, after part of the update
    was applied, is undone exactly. `optimizer_step` calls take() right before `optimizer.step()`
    and drop() after it; undo() (the out-of-memory retry's reset) puts the copy back when a step
    was under way. Cost: one host copy of the trained parameters and their optimizer state per
    step (adapters: a few MB to a few hundred). Parameters too large to copy every step (above
    UNDO_MAX_BYTES / 3: full fine-tuning) are not copied, and an out-of-memory inside their
    optimizer step stops the stage instead of being retried. On meta tensors (the simulation)
    there is nothing to copy."""

    def __init__(self, params, optimizer: torch.optim.Optimizer, scaler=None):
        self.params, self.optimizer, self.scaler = [p for p in params if p.requires_grad], optimizer, scaler
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        # why no copy is kept, or None: meta tensors (nothing to undo), or too large to copy
        self.no_copy = "meta" if any(p.is_meta for p in self.params) else \
            None if undo_host_bytes(self.param_bytes, 0) > 0 or not self.params else "large"
        self.saved: tuple[list[torch.Tensor], list[dict], dict | None] | None = None
        self.pending = False

    def take(self) -> None:
        self.pending = True
        if self.no_copy is None:
            self.saved = ([p.detach().to("cpu", copy=True) for p in self.params],
                          [_to_cpu(dict(self.optimizer.state.get(p, {}))) for p in self.params],
                          None if self.scaler is None else _to_cpu(self.scaler.state_dict()))

    def drop(self) -> None:
        self.saved, self.pending = None, False

    def undo(self) -> None:
        """Puts the parameters, their optimizer state and the loss scale back as take() found them.
        The optimizer's state tensors are written in place (not through load_state_dict, which
        would replace a paged optimizer's unified-memory buffers with ordinary device tensors); a
        state the step created (the first step) is removed, so the retried step creates it again."""
        if not self.pending:
            return
        if self.saved is None:
            from lowmem_rlhf.errors import UserError

            self.pending = False
            if self.no_copy == "meta":
                return
            raise UserError(
                f"out of memory inside the optimizer step, whose update cannot be undone: the trained "
                f"parameters ({self.param_bytes / (1 << 30):.1f} GiB) are too large to copy every step; pick "
                f"a LoRA profile (--profile qlora-shared) or a smaller model")
        values, states, scale = self.saved
        with torch.no_grad():
            for p, v, before in zip(self.params, values, states):
                p.copy_(v)
                now = self.optimizer.state.get(p)
                if not before:
                    self.optimizer.state.pop(p, None)
                    continue
                for k, old in before.items():
                    if isinstance(old, torch.Tensor) and isinstance(now.get(k), torch.Tensor) \
                            and now[k].shape == old.shape:
                        now[k].copy_(old)
                    else:
                        now[k] = old.to(p.device) if isinstance(old, torch.Tensor) and k != "step" else old
                for k in [k for k in now if k not in before]:
                    del now[k]
        if self.scaler is not None:  # end the scaler's half-done step (its unscale_), then put its scale back
            try:
                self.scaler.update()
            except AssertionError:
                pass
            self.scaler.load_state_dict(scale)
        self.optimizer.zero_grad(set_to_none=True)
        self.drop()


def parks(optimizer: str, device) -> bool:
    """Whether `OptimizerParking` moves idle optimizer state off this device (the estimator's rule,
    `plan.estimator.parks_idle_state`)."""
    return parks_idle_state(optimizer, torch.device(device).type)


def _to_host(v: torch.Tensor) -> torch.Tensor:
    if v.is_meta:  # the simulation: no data to copy, and a host buffer it does not count
        return torch.empty(v.shape, dtype=v.dtype, device="cpu")
    out = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=v.is_cuda)
    return out.copy_(v, non_blocking=v.is_cuda)  # park() synchronizes before anything reads it


def _to_home(v: torch.Tensor, home: torch.device) -> torch.Tensor:
    if home.type == "meta":
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    return v.to(home, copy=True, non_blocking=v.is_pinned())


class OptimizerParking:
    """PPO keeps one optimizer per trained adapter (actor, critic); only the one training needs its
    state on the device. `active(name)` brings that optimizer's state home for the update and
    parks it in (pinned) host RAM after; every other optimizer stays parked, so generation and
    scoring hold no optimizer state at all. The values move unchanged: the update is bit for bit
    the one with the state resident (tests/test_parking.py). Cost: each update moves its
    optimizer's state in and out (the estimator notes the bytes; about 12 GB/s over PCIe 4 x16).
    enabled False: a no-op (see `parks`)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], enabled: bool):
        self.optimizers, self.enabled = optimizers, enabled
        self.homes: dict[str, dict[tuple[int, str], torch.device]] = {k: {} for k in optimizers}
        self.moved_bytes = 0  # state bytes moved either way so far
        self.around_moves = contextlib.nullcontext  # the simulation attributes the moved state to "optimizer"

    def park(self, name: str) -> None:
        """Every state tensor of optimizer `name` that lives with its parameter goes to host RAM."""
        if not self.enabled:
            return
        homes, cuda = self.homes[name], False
        for p, st in self.optimizers[name].state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and (id(p), k) not in homes and v.device == p.device:
                    st[k] = _to_host(v)
                    homes[(id(p), k)] = v.device
                    self.moved_bytes += v.numel() * v.element_size()
                    cuda = cuda or v.is_cuda
        if cuda:  # the host copies are complete before a checkpoint (or anything else) reads them
            torch.cuda.current_stream().synchronize()

    def unpark(self, name: str) -> None:
        if not self.enabled:
            return
        homes = self.homes[name]
        with self.around_moves():
            for p, st in self.optimizers[name].state.items():
                for k, v in st.items():
                    if (id(p), k) in homes:  # copied first, forgotten after: an OOM here leaves it parked
                        st[k] = _to_home(v, homes[(id(p), k)])
                        del homes[(id(p), k)]
                        self.moved_bytes += v.numel() * v.element_size()

    def park_all(self) -> None:
        for name in self.optimizers:
            self.park(name)

    def parked_bytes(self, name: str) -> int:
        st = self.optimizers[name].state
        return sum(v.numel() * v.element_size() for p, s in st.items() for k, v in s.items()
                   if (id(p), k) in self.homes[name])

    @contextlib.contextmanager
    def active(self, name: str):
        """Optimizer `name`'s state on the device inside, parked again after (also on an error:
        the out-of-memory retry happens inside)."""
        try:
            self.unpark(name)
            yield
        finally:
            self.park(name)


def finite(norm: torch.Tensor) -> bool:
    """A gradient norm is finite (a host sync on CUDA). On meta tensors (the simulation) there is
    no value: the step is taken as finite, as the real run's would be."""
    return norm.is_meta or bool(torch.isfinite(norm))


def optimizer_step(optimizer: torch.optim.Optimizer, params, scheduler=None, max_norm: float = 1.0,
                   undo: StepUndo | None = None, fault: tuple[str, int, int] | None = None,
                   scaler=None) -> torch.Tensor:
    """The one optimizer step of every stage: clip the gradient norm of `params` to `max_norm`,
    step, advance the scheduler (if any), zero the gradients. Returns the norm before clipping (a
    0-d tensor). A non-finite norm (a NaN/inf loss or gradient) skips the step: the gradients are
    dropped and the parameters, the optimizer state and the schedule stay as they were; the
    caller sees the skip in the returned norm (`NonFiniteGuard`). undo: taken before the update,
    so an out-of-memory inside it can be undone; fault: (stage, step, micro_batch[, role]) for the
    fault-injection switches (`runtime.oom`); scaler: fp16's loss scale (`make_scaler`), whose
    gradients are unscaled before clipping, and whose scale is updated after the step (halved on
    an overflow, which skips the step)."""
    from lowmem_rlhf.runtime.oom import maybe_inject, maybe_poison

    params = [p for p in params if p.requires_grad]
    if fault is not None:
        maybe_poison(fault[0], fault[1], params, *fault[3:])
    if undo is not None:  # before unscale_: an out-of-memory in the clipping must undo the scaler's step too
        undo.take()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if fault is not None:
        maybe_inject(*fault[:3], at="clip")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not finite(norm):
        if scaler is not None:
            scaler.update()  # the overflow recorded by unscale_ halves the scale
        optimizer.zero_grad(set_to_none=True)
        if undo is not None:
            undo.drop()
        return norm
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()
    if fault is not None:
        maybe_inject(*fault[:3], at="optim")
    if scaler is not None:
        scaler.update()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if undo is not None:
        undo.drop()
    return norm


class NonFiniteGuard:
    """Counts optimizer steps skipped for a non-finite gradient norm; `limit` skips in a row stop
    the stage with one line (its last checkpoint stays in RUN/.<stage>.partial for --resume)."""

    def __init__(self, stage: str, limit: int, lr_knob: str):
        self.stage, self.limit, self.lr_knob = stage, max(1, int(limit)), lr_knob
        self.total = self.in_row = 0

    def record(self, skipped: bool, step: int) -> bool:
        """Counts a skipped (True) or applied step; raises UserError at `limit` skips in a row."""
        self.total += skipped
        self.in_row = self.in_row + 1 if skipped else 0
        if self.in_row >= self.limit:
            from lowmem_rlhf.errors import UserError

            raise UserError(
                f"{self.stage}: {self.in_row} optimizer steps in a row skipped for a NaN/inf loss or gradient "
                f"(last at step {step}): start over (--overwrite) with a lower learning rate ({self.lr_knob}), "
                f"or in bf16 or fp32 rather than fp16; the last checkpoint, if any, is kept for --resume, "
                f"which may raise --max-nonfinite (how many skips in a row stop the stage)")
        return skipped
