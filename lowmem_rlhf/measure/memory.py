"""Measured peak memory per phase: the numbers reported beside the estimator's.

GPU: `torch.cuda.max_memory_allocated` / `max_memory_reserved` (the allocator's own counters,
reset at each phase start), and the device's used memory as nvidia-smi sees it (total - free from
cudaMemGetInfo). Host RAM, on either device: the resident set size sampled every few milliseconds
from a thread while a phase runs (and at its start and end); the maximum is that phase's peak.

The process's own high-water mark (VmHWM, what `/usr/bin/time -v` and `ru_maxrss` report) is never
reset, so those tools stay true for the whole run. Nothing here collects garbage or synchronizes
the device on the hot path: the counters are read as the allocator keeps them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from lowmem_rlhf.runtime.host_heap import release_freed_heap

SAMPLE_SECONDS = 0.005  # RSS sampling period inside a phase
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss() -> int:
    """The process's resident set size now, bytes (/proc/self/statm; psutil elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return psutil.Process().memory_info().rss


class RssSampler:
    """One daemon thread per process sampling RSS while any window is open; `open()` -> a token,
    `close(token)` -> the largest RSS seen since that window opened."""

    def __init__(self, period: float = SAMPLE_SECONDS):
        self.period = period
        self.windows: dict[int, int] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.next_token = 0

    def _run(self) -> None:
        while True:
            self.wake.wait()
            now = rss()
            with self.lock:
                if not self.windows:
                    self.wake.clear()
                    continue
                for k, v in self.windows.items():
                    if now > v:
                        self.windows[k] = now
            time.sleep(self.period)

    def open(self) -> int:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="lowmem-rss", daemon=True)
                self.thread.start()
            self.next_token += 1
            self.windows[self.next_token] = rss()
            self.wake.set()
            return self.next_token

    def close(self, token: int) -> int:
        now = rss()
        with self.lock:
            return max(self.windows.pop(token, 0), now)


SAMPLER = RssSampler()


@dataclass
class MemoryMeter:
    """Peaks per named phase; `with meter.phase("generation"): ...`."""

    device: str = "cpu"
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)  # per phase name: the largest of every run of it
    last: dict[str, dict[str, int]] = field(default_factory=dict)  # per phase name: its latest run's peaks

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        release_freed_heap()  # the phase's peak is what it holds, not heap freed long ago (VmHWM untouched)
        token = SAMPLER.open()
        try:
            yield
        finally:
            self.last[name] = self.read(SAMPLER.close(token))
            self.peaks[name] = self._merge(self.peaks.get(name), self.last[name])

    def read(self, host: int | None = None) -> dict[str, int]:
        """The figures now: the allocator's peaks since the phase began (CUDA) and `host`, the
        sampled RSS peak (default: the RSS at this moment)."""
        host = rss() if host is None else host
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
                    "device": total - free, "cpu_ram": host}
        return {"cpu_ram": host}

    @staticmethod
    def _merge(old: dict | None, new: dict) -> dict:
        if not old:
            return new
        return {k: max(old.get(k, 0), v) for k, v in new.items()}
