"""The phase meter: per-phase host peaks sampled from a thread, without resetting the process's
own high-water mark (issue 17: the old reset made `/usr/bin/time -v` and ru_maxrss report
1.59 GiB for a run that peaked at 1.99 GiB)."""

from __future__ import annotations

import resource
import time

import torch

from lowmem_rlhf.measure.memory import MemoryMeter, rss

MB = 2**20


def _hold(mb: int, seconds: float) -> None:
    x = torch.ones(mb * MB // 4)  # touched: resident
    time.sleep(seconds)
    del x


def test_phase_peaks_are_each_phases_and_the_process_peak_stays():
    meter = MemoryMeter("cpu")
    base = rss()
    with meter.phase("big"):
        _hold(400, 0.1)
    with meter.phase("small"):
        _hold(40, 0.1)
    with meter.phase("small"):
        _hold(20, 0.1)
    big, small = meter.last["big"]["cpu_ram"], meter.last["small"]["cpu_ram"]
    assert big >= base + 350 * MB  # the transient 400 MB was seen, though freed before the phase ended
    assert small < big - 300 * MB  # the next phase's peak is its own, not the process's so far
    assert meter.peaks["small"]["cpu_ram"] >= small  # peaks: the largest of every run of the phase
    # VmHWM was never reset: the kernel's peak of this process still holds the big phase
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 >= big - 16 * MB
