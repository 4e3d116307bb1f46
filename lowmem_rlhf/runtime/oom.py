"""Out-of-memory recovery: on `torch.OutOfMemoryError` inside a step, free memory, halve the
micro-batch (the step's samples stay the same: gradient accumulation takes more, smaller chunks),
and retry the same step. Each failure is appended to RUN/oom.jsonl, next to plan.json, and later
runs of that stage in the same run folder start from the micro-batch that worked.

Fault injection (tests, rehearsals): LOWMEM_RLHF_INJECT_OOM="stage:step:max_micro_batch[,...]" makes
that stage's step raise a real `torch.OutOfMemoryError` while the micro-batch is above
max_micro_batch (0: at every size).
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

from lowmem_rlhf.errors import UserError

FAULT_ENV = "LOWMEM_RLHF_INJECT_OOM"
LOG = "oom.jsonl"
T = TypeVar("T")


def maybe_inject(stage: str, step: int, micro_batch: int) -> None:
    """The fault-injection switch, called at the top of each micro-batch of a step."""
    for spec in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        try:
            s, k, limit = spec.strip().split(":")
            k, limit = int(k), int(limit)
        except ValueError:
            raise UserError(f"{FAULT_ENV}={spec!r}: expected stage:step:max_micro_batch, e.g. sft:3:1") from None
        if s == stage and k == step and micro_batch > limit:
            raise torch.OutOfMemoryError(f"injected out-of-memory ({FAULT_ENV}={spec}) at micro-batch {micro_batch}")


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

    def __init__(self, size: int, stage: str, run_dir: Path, profile: str, knob: str, elastic: bool = True):
        self.size = max(1, int(size))
        self.elastic = elastic  # False: the trainer fixes the micro-batch (ZeRO-3), stop at once
        self.stage, self.run_dir, self.profile, self.knob = stage, Path(run_dir), profile, knob
        self.events: list[dict] = []

    def run(self, step: int, body: Callable[[int], T], reset: Callable[[], None]) -> T:
        """body(micro_batch) for one step, retried at half the micro-batch after an OOM; reset()
        drops the partial step's gradients before a retry."""
        while True:
            try:
                return body(self.size)
            except torch.OutOfMemoryError as e:
                reset()
                free_memory()
                failed = self.size
                if not self.elastic and failed > 1:
                    self._log(step, failed, failed, e)
                    raise UserError(
                        f"out of memory in {self.stage} step {step} at micro-batch {failed}, which this profile "
                        f"({self.profile}) cannot change mid-run: set micro_batch: {failed // 2} in a copy of the "
                        f"profile (--profile my.yaml) or lower {self.knob}; logged in {self.run_dir / LOG}") from None
                if failed == 1:
                    self._log(step, failed, failed, e)
                    raise UserError(
                        f"out of memory in {self.stage} step {step} even at micro-batch 1: lower {self.knob}, or "
                        f"pick a lighter profile (--profile qlora-shared: 4-bit base + gradient checkpointing); "
                        f"logged in {self.run_dir / LOG}") from None
                self.size = failed // 2
                self._log(step, failed, self.size, e)

    def _log(self, step: int, failed: int, now: int, e: BaseException) -> None:
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": self.stage, "step": step,
               "profile": self.profile, "failed_micro_batch": failed, "micro_batch": now,
               "error": str(e).splitlines()[0][:200]}
        self.events.append(row)
        with (self.run_dir / LOG).open("a") as f:
            f.write(json.dumps(row) + "\n")


__all__ = ["MicroBatch", "maybe_inject", "learned_cap", "free_memory", "FAULT_ENV"]
