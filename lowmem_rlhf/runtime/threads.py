"""torch's CPU thread count from the cores other processes leave free.

On a shared machine, intra-op threads that outnumber the free cores wait for each other at every
operator's barrier; generation, thousands of tiny operators per rollout, slows the most (measured
on 2 cores with two busy-loop neighbours: 8 tokens x 8 rows took 6.4 s with 2 threads, 3.3 s
with 1, 1.35 s with 2 threads on the quiet machine; docs/speed.md). A passive OpenMP wait policy
helps the busy case but costs 75% on the quiet one, so the count is adapted instead.

`ThreadGovernor.update()` reads the machine's busy time (/proc/stat) and this process's own CPU
time since the last call: the cores others used are the difference. The stages call it at every
step; it changes torch.set_num_threads only when the free cores change.
"""

from __future__ import annotations

import os
import time

import torch

MIN_INTERVAL = 1.0  # seconds between two decisions


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _busy_seconds() -> float | None:
    """Seconds all CPUs spent busy since boot (not idle, not waiting for I/O), or None off Linux."""
    try:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def free_cores(busy: float, own: float, wall: float, cores: int) -> float:
    """Cores left to this process: all usable cores minus what others used over `wall` seconds
    (`busy`: the machine's busy CPU-seconds, `own`: this process's, over the same interval)."""
    others = max(0.0, busy - own) / max(wall, 1e-9)
    return cores - others


def threads_for(free: float, cores: int) -> int:
    """The thread count for `free` cores: rounded, at least 1, at most the usable cores."""
    return max(1, min(cores, int(free + 0.5)))


class ThreadGovernor:
    """Keeps torch.get_num_threads() at the cores others leave free. fixed: a set count (no
    adapting); 0/None: adapt. The first decision waits `probe` seconds to measure the neighbours."""

    def __init__(self, fixed: int | None = None, probe: float = 0.3):
        self.cores = _usable_cores()
        self.fixed = fixed or None
        self.changes: list[tuple[float, int]] = []  # (time, threads) each time the count changed
        if self.fixed:
            self._set(self.fixed)
            return
        self.last = (time.monotonic(), _busy_seconds(), _own_seconds())
        if self.last[1] is not None and probe > 0:
            time.sleep(probe)
            self.update(force=True)

    def _set(self, n: int) -> None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
            self.changes.append((time.time(), n))

    def update(self, force: bool = False) -> int:
        """Re-decide from the interval since the last decision (at least MIN_INTERVAL apart) -> threads."""
        if self.fixed or self.last[1] is None:
            return torch.get_num_threads()
        now = (time.monotonic(), _busy_seconds(), _own_seconds())
        wall = now[0] - self.last[0]
        if wall < MIN_INTERVAL and not force:
            return torch.get_num_threads()
        free = free_cores(now[1] - self.last[1], now[2] - self.last[2], wall, self.cores)
        self.last = now
        self._set(threads_for(free, self.cores))
        return torch.get_num_threads()


__all__ = ["ThreadGovernor", "free_cores", "threads_for"]
