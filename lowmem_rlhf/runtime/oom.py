"""Out-of-memory recovery: on an out-of-memory inside a step (`is_oom`: torch's own error, or the
plain RuntimeError that cuBLAS and bitsandbytes kernels raise), undo the partial step (gradients,
and a half-applied optimizer step: `runtime.optim.StepUndo`), free memory, halve the micro-batch (the
step's samples stay the same: gradient accumulation takes more, smaller chunks), and retry the same
step. Each failure is appended to RUN/oom.jsonl, next to plan.json, and later runs of that stage in
the same run folder start from the micro-batch that worked.

Fault injection (tests, rehearsals):
  LOWMEM_RLHF_INJECT_OOM="stage:step:max_micro_batch[:at[:form]][,...]" makes that stage's step
  run out of memory while the micro-batch is above max_micro_batch (0: at every size).
    at:   start (default: the first micro-batch), mid (the second micro-batch, after the first
          has added its gradients), clip (in the gradient clipping, after fp16's unscale_), optim
          (inside the optimizer step, after the update is applied)
    form: torch (default: torch.OutOfMemoryError), cuda (RuntimeError "CUDA out of memory"),
          cublas (RuntimeError "CUBLAS_STATUS_ALLOC_FAILED")
  LOWMEM_RLHF_INJECT_NAN="stage:step[:role][,...]" makes that step's gradient NaN before it is
  applied (role: only that adapter's step, e.g. ppo:2:actor).
"""

from __future__ import annotations

import functools
import gc
import json
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from lowmem_rlhf.errors import UserError

FAULT_ENV = "LOWMEM_RLHF_INJECT_OOM"
NAN_ENV = "LOWMEM_RLHF_INJECT_NAN"
LOG = "oom.jsonl"
T = TypeVar("T")

# torch.OutOfMemoryError is new in torch 2.5; torch.cuda.OutOfMemoryError is the older name of the same class
OOM_TYPES = tuple({t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                   if t is not None})
# what the RuntimeError of a failed CUDA allocation outside torch's allocator says
OOM_MARKERS = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
               "CUDA error: out of memory", "cudaErrorMemoryAllocation")
AT = ("start", "mid", "clip", "optim")
FORMS = {
    "torch": lambda msg: OOM_TYPES[0](msg),
    "cuda": lambda msg: RuntimeError(f"CUDA out of memory. Tried to allocate 2.00 GiB ({msg})"),
    "cublas": lambda msg: RuntimeError(f"CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)` "
                                       f"({msg})"),
}


def is_oom(e: BaseException) -> bool:
    """An out-of-memory: torch's own error, or a RuntimeError whose message marks a failed CUDA,
    cuBLAS or cuDNN allocation (how cuBLAS and bitsandbytes kernels report it)."""
    if isinstance(e, OOM_TYPES):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MARKERS)


def _specs(env: str, fields: int) -> list[list[str]]:
    return _parse(env, os.environ.get(env, ""), fields)


@functools.lru_cache(maxsize=16)
def _parse(env: str, value: str, fields: int) -> list[list[str]]:
    """The switch's specs, parsed once per value (the switches are read at every micro-batch)."""
    out = []
    for spec in filter(None, value.split(",")):
        parts = spec.strip().split(":")
        if len(parts) < fields:
            raise UserError(f"{env}={spec!r}: too few fields; see `lowmem_rlhf.runtime.oom` for the format, "
                            "e.g. sft:3:1")
        out.append(parts)
    return out


def maybe_inject(stage: str, step: int, micro_batch: int, at: str = "start") -> None:
    """The out-of-memory fault-injection switch, called at each injection point of a step: the top
    of the first micro-batch (at="start"), of the second (at="mid"), in the clipping (at="clip")
    and inside the optimizer step after the update (at="optim")."""
    for parts in _specs(FAULT_ENV, 3):
        spec = ":".join(parts)
        try:
            s, k, limit = parts[0], int(parts[1]), int(parts[2])
        except ValueError:
            raise UserError(f"{FAULT_ENV}={spec!r}: expected stage:step:max_micro_batch[:at[:form]], "
                            "e.g. sft:3:1 or ppo:2:1:optim:cublas") from None
        where, form = (parts[3:4] or ["start"])[0], (parts[4:5] or ["torch"])[0]
        if where not in AT or form not in FORMS:
            raise UserError(f"{FAULT_ENV}={spec!r}: at must be one of {', '.join(AT)} and form one of "
                            f"{', '.join(FORMS)}")
        if s == stage and k == step and micro_batch > limit and where == at:
            raise FORMS[form](f"injected out-of-memory ({FAULT_ENV}={spec}) at micro-batch {micro_batch}")


def maybe_poison(stage: str, step: int, params, role: str = "") -> None:
    """The non-finite fault-injection switch: makes this step's gradients NaN when NAN_ENV names it
    (stage:step, or stage:step:role for one of PPO's adapters)."""
    for parts in _specs(NAN_ENV, 2):
        if parts[0] == stage and parts[1] == str(step) and parts[2:3] in ([], [role]):
            for p in params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))


ALLOC_ENVS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the second is torch >= 2.9's name for it
ALLOC_DEFAULT = "expandable_segments:True"


def shape_allocator(environ=os.environ) -> str | None:
    """Before torch initialises CUDA: let the caching allocator grow segments in place, so PPO's
    alternating shapes (generation's KV cache, then the training step's activations) do not
    fragment the card. A value the user set is kept. -> the value now in effect (None: unset)."""
    for name in ALLOC_ENVS:
        if environ.get(name):
            return environ[name]
    environ[ALLOC_ENVS[0]] = ALLOC_DEFAULT
    return ALLOC_DEFAULT


def cap_vram(gib: float | None) -> float | None:
    """--max-vram: this process may allocate at most `gib` GiB on the GPU (the caching allocator
    then raises out-of-memory above it, as a smaller card would), to rehearse a 24 GiB card on a
    bigger one. -> the fraction of the card set, or None (no cap asked, or no CUDA here)."""
    if gib is None or not torch.cuda.is_available():
        return None
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    fraction = min(1.0, gib * (1 << 30) / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def learned_cap(run_dir: Path, stage: str, profile: str) -> int | None:
    """The smallest micro-batch an earlier OOM of this stage and profile fell back to, if any."""
    path = Path(run_dir) / LOG
    if not path.exists():
        return None
    caps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("stage") == stage and row.get("profile") == profile:
            caps.append(int(row["micro_batch"]))
    return min(caps) if caps else None


class MicroBatch:
    """The micro-batch a stage trains with, halved on OOM. `knob` names what to change when even a
    micro-batch of 1 does not fit (e.g. "--max-len 512")."""

    def __init__(self, size: int, stage: str, run_dir: Path, profile: str, knob: str, elastic: bool = True,
                 fixed: str = ""):
        self.size = max(1, int(size))
        self.elastic = elastic  # False: the trainer fixes the micro-batch (ZeRO-3), stop at once
        self.fixed = fixed  # what fixes it, when not the profile (a data-parallel run)
        self.stage, self.run_dir, self.profile, self.knob = stage, Path(run_dir), profile, knob
        self.events: list[dict] = []

    def run(self, step: int, body: Callable[[int], T], reset: Callable[[], None]) -> T:
        """body(micro_batch) for one step, retried at half the micro-batch after an out-of-memory;
        reset() undoes the partial step (gradients, a half-applied optimizer step) before a retry.
        Memory is freed after the except block: inside it the traceback still holds the failed
        step's tensors."""
        while True:
            error = None
            try:
                return body(self.size)
            except Exception as e:  # noqa: BLE001 - anything but an out-of-memory is re-raised
                if not is_oom(e):
                    raise
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            reset()
            free_memory()
            failed = self.size
            if not self.elastic and failed > 1:
                self._log(step, failed, failed // 2, error)  # a re-run starts at the size advised below
                raise UserError(
                    f"out of memory in {self.stage} step {step} at micro-batch {failed}, which "
                    f"{self.fixed or f'this profile ({self.profile})'} cannot change mid-run: set micro_batch: {failed // 2} in a copy of the "
                    f"profile (--profile my.yaml) or lower {self.knob}; logged in {self.run_dir / LOG}")
            if failed == 1:
                self._log(step, failed, failed, error)
                raise UserError(
                    f"out of memory in {self.stage} step {step} even at micro-batch 1: lower {self.knob}, or "
                    f"pick a lighter profile (--profile qlora-shared: 4-bit base + gradient checkpointing); "
                    f"logged in {self.run_dir / LOG}")
            self.size = failed // 2
            self._log(step, failed, self.size, error)

    def _log(self, step: int, failed: int, now: int, error: str) -> None:
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": self.stage, "step": step,
               "profile": self.profile, "failed_micro_batch": failed, "micro_batch": now,
               "error": error}
        self.events.append(row)
        from lowmem_rlhf.runtime.distributed import world

        if not world().main:  # rank 0 alone writes the run folder (this rank's error line says it all)
            return
        with (self.run_dir / LOG).open("a") as f:
            f.write(json.dumps(row) + "\n")


__all__ = ["MicroBatch", "maybe_inject", "maybe_poison", "is_oom", "shape_allocator", "cap_vram", "learned_cap",
           "free_memory", "FAULT_ENV", "NAN_ENV"]
