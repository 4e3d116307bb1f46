"""Measured peak memory per phase: the numbers reported beside the estimator's.

GPU: `torch.cuda.max_memory_allocated` / `max_memory_reserved`, and the device's used memory as
nvidia-smi sees it (total - free from cudaMemGetInfo). Host RAM, on either device: the process's
peak resident set size (VmHWM), reset at the start of each phase through /proc/self/clear_refs, so
it is that phase's peak (where the kernel refuses the reset, it is the process's peak so far).
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch


def _vm_hwm() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def _reset_hwm() -> None:
    """Return freed heap to the OS first (glibc keeps it, and RSS with it), then reset VmHWM, so a
    phase's peak is that phase's, not the high-water mark of memory freed long ago."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@dataclass
class MemoryMeter:
    """Peaks per named phase; `with meter.phase("generation"): ...`."""

    device: str = "cpu"
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        _reset_hwm()  # on CUDA too: the host figure of a phase is that phase's, not the process's peak
        try:
            yield
        finally:
            self.peaks[name] = self._merge(self.peaks.get(name), self.read())

    def read(self) -> dict[str, int]:
        if self.device == "cuda":
            torch.cuda.synchronize()
            free, total = torch.cuda.mem_get_info()
            return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
                    "device": total - free, "cpu_ram": _vm_hwm()}
        return {"cpu_ram": _vm_hwm()}

    @staticmethod
    def _merge(old: dict | None, new: dict) -> dict:
        if not old:
            return new
        return {k: max(old.get(k, 0), v) for k, v in new.items()}

