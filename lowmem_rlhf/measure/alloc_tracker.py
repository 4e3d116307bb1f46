"""Allocation tracker: live bytes and peaks of every tensor storage created by torch ops.

`AllocTracker` is a `TorchDispatchMode`: every op that runs inside it is seen once, after the
autograd and composite layers, as the kernel the device would run. Each output whose storage is new
is recorded with its `nbytes()` and the current *tag* (a component name such as "activations"); a
`weakref.finalize` on the storage (torch keeps one Python object per live storage) releases it when
the last tensor, view or autograd-saved reference to it dies. The tracker therefore measures what
a caching allocator's `memory_allocated()` would show, to the byte, on any device: real CPU tensors
or **meta** tensors (which have sizes but no data).

Storages that exist before tracking starts (weights, inputs) are added with `register()`.
Phases (`with tracker.phase("actor_update"):`) record their own peak and the bytes per tag at that
peak; `tag()` switches the tag new storages are attributed to, and `retag()` moves a live storage
to another tag (a gradient produced by backward becomes "gradients" once it is a parameter's grad).

Kernel-internal allocations that are not op outputs (a cuBLAS workspace, the 16-bit weight that
bitsandbytes' CUDA `gemm_4bit` dequantizes into for many tokens) are invisible to a dispatch mode;
`transient_rules` lets the caller add such bytes around a given op (see `simulate.py`).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lowmem_rlhf.measure.counting import quant_state_tensors

# (func, args, kwargs) -> extra bytes alive while the op runs (freed when it returns), or 0
TransientRule = Callable[[object, tuple, dict], int]


@dataclass
class PhasePeak:
    """Peak live bytes seen inside one phase, with the bytes of each tag at that moment."""

    name: str
    peak: int = 0
    by_tag: dict[str, int] = field(default_factory=dict)
    start: int = 0  # live bytes when the phase began
    end: int = 0  # live bytes when it ended

    def to_dict(self) -> dict:
        return {"peak": self.peak, "by_tag": dict(self.by_tag), "start": self.start, "end": self.end}


class AllocTracker(TorchDispatchMode):
    """Counts bytes of new output storages of every op; frees them when the storage dies.

    Usage::

        with AllocTracker() as tr:
            tr.register_module(model, "weights")
            with tr.phase("step"), tr.tag("activations"):
                loss = model(x).sum()
            with tr.phase("step"), tr.tag("backward"):
                loss.backward()
        tr.peak, tr.phases["step"].by_tag
    """

    def __init__(self, transient_rules: Iterable[TransientRule] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.peak_by_tag: dict[str, int] = {}
        self.by_tag: dict[str, int] = {}
        self.phases: dict[str, PhasePeak] = {}
        self.transient_rules = list(transient_rules)
        self._entries: dict[int, list] = {}  # storage _cdata -> [nbytes, tag]
        self._tag = "other"
        self.auto_tags: set[str] = set()
        self.device_type: str | None = None  # count only storages on this device type (None: every one)
        self._in_step = False
        self._phase: PhasePeak | None = None
        self.ops = 0

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _add(self, storage: torch.UntypedStorage, tag: str | None = None) -> int:
        key = storage._cdata
        if key in self._entries:
            return 0
        n = int(storage.nbytes())
        t = tag or self._tag
        self._entries[key] = [n, t]
        weakref.finalize(storage, self._free, key)
        self.live += n
        self.by_tag[t] = self.by_tag.get(t, 0) + n
        self._check_peak()
        return n

    def _free(self, key: int) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        n, t = entry
        self.live -= n
        self.by_tag[t] -= n

    def _check_peak(self, extra: int = 0, extra_tag: str = "transient") -> None:
        now = self.live + extra
        if now > self.peak:
            self.peak = now
            self.peak_by_tag = self._snapshot(extra, extra_tag)
        ph = self._phase
        if ph is not None and now > ph.peak:
            ph.peak = now
            ph.by_tag = self._snapshot(extra, extra_tag)

    def _snapshot(self, extra: int, extra_tag: str) -> dict[str, int]:
        snap = {k: v for k, v in self.by_tag.items() if v}
        if extra:
            snap[extra_tag] = snap.get(extra_tag, 0) + extra
        return snap

    def register(self, tensors: Iterable[torch.Tensor] | torch.Tensor, tag: str) -> int:
        """Count storages that already exist (weights, inputs) under `tag`; returns bytes added."""
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        return sum(self._add(t.untyped_storage(), tag) for t in tensors if isinstance(t, torch.Tensor))

    def register_module(self, module: torch.nn.Module, tag: str | Callable[[str], str]) -> int:
        """Register every parameter and buffer of `module` (bitsandbytes quantization state too).

        `tag` is a name, or a function of the parameter's qualified name returning one."""
        total = 0
        for name, p in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers()):
            t = tag(name) if callable(tag) else tag
            total += self.register(p, t)
            total += self.register(list(quant_state_tensors(getattr(p, "quant_state", None))), t)
        return total

    def retag(self, tensor: torch.Tensor, tag: str) -> None:
        """Attribute a live storage to another tag (e.g. a parameter's .grad -> "gradients")."""
        entry = self._entries.get(tensor.untyped_storage()._cdata)
        if entry is None or entry[1] == tag:
            return
        n, old = entry
        self.by_tag[old] -= n
        self.by_tag[tag] = self.by_tag.get(tag, 0) + n
        entry[1] = tag

    def bytes_of(self, tensors: Iterable[torch.Tensor]) -> int:
        """Bytes of the distinct tracked storages behind `tensors`."""
        seen: set[int] = set()
        total = 0
        for t in tensors:
            key = t.untyped_storage()._cdata
            if key in self._entries and key not in seen:
                seen.add(key)
                total += self._entries[key][0]
        return total

    def _auto_tag(self) -> str | None:
        """Inside autograd's backward or an optimizer step, storages are attributed to "backward" /
        "optimizer_step" (unless a tag() context names another), so a caller that runs the real
        training code needs no tags of its own; else None: the current tag."""
        if self._tag not in self.auto_tags:
            return None
        if self._in_step:
            return "optimizer_step"
        return "backward" if torch._C._current_graph_task_id() != -1 else None

    @contextlib.contextmanager
    def auto_tagging(self, *tags: str) -> Iterator[None]:
        """Attribute storages created by backward and optimizer steps automatically while the
        current tag is one of `tags` (see `_auto_tag`)."""
        def pre(opt, args, kwargs):
            self._in_step = True

        def post(opt, args, kwargs):
            self._in_step = False

        hooks = [register_optimizer_step_pre_hook(pre),
                 register_optimizer_step_post_hook(post)]
        old, self.auto_tags = self.auto_tags, set(tags)
        try:
            yield
        finally:
            self.auto_tags = old
            for h in hooks:
                h.remove()

    # ---- contexts ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def tag(self, name: str) -> Iterator[None]:
        """Attribute storages created inside to `name`."""
        old, self._tag = self._tag, name
        try:
            yield
        finally:
            self._tag = old

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhasePeak]:
        """Record the peak (and bytes by tag at that peak) of everything run inside; re-entering a
        phase of the same name keeps the larger peak."""
        ph = self.phases.get(name) or PhasePeak(name)
        self.phases[name] = ph
        prev, self._phase = self._phase, ph
        if ph.peak == 0:
            ph.start = self.live
        ph.peak = max(ph.peak, self.live)
        if not ph.by_tag:
            ph.by_tag = self._snapshot(0, "")
        try:
            yield ph
        finally:
            ph.end = self.live
            self._phase = prev

    @contextlib.contextmanager
    def paused_peak(self) -> Iterator[None]:
        """Track allocations but ignore their peak (live bytes stay exact): for shortcuts the
        simulation takes that the real run does not (e.g. growing a KV cache in one chunk)."""
        saved = (self.peak, dict(self.peak_by_tag), self._phase)
        ph_saved = (self._phase.peak, dict(self._phase.by_tag)) if self._phase else None
        try:
            yield
        finally:
            self.peak, self.peak_by_tag, self._phase = saved
            if self._phase is not None and ph_saved is not None:
                self._phase.peak, self._phase.by_tag = ph_saved
            self._check_peak()

    # ---- the dispatch hook ---------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        extra = 0
        for rule in self.transient_rules:
            extra += rule(func, args, kwargs)
        if extra:
            self._check_peak(extra)  # the op's workspace exists before its output
        out = func(*args, **kwargs)
        self.ops += 1
        inputs = None
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (self.device_type is None or t.device.type == self.device_type):
                key = t.untyped_storage()._cdata
                if key not in self._entries:
                    if inputs is None:  # views and in-place ops return an input's storage: not new
                        inputs = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs))
                                  if isinstance(a, torch.Tensor)}
                    if key in inputs:
                        continue
                    n = int(t.untyped_storage().nbytes())
                    if extra:
                        self._check_peak(extra + n)
                    self._add(t.untyped_storage(), self._auto_tag())
        return out


def cpu_allocator_peak(fn: Callable[[], object]) -> tuple[int, object]:
    """Run `fn` and return (peak bytes the CPU allocator held above its level at the start, result).

    Read from the profiler's allocation events (`profile_memory=True`): every CPU allocation and
    free torch makes, kernel-internal ones included. For validating `AllocTracker` on real tensors."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak, result


__all__ = ["AllocTracker", "PhasePeak", "TransientRule", "cpu_allocator_peak"]
