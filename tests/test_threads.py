"""torch's thread count follows the cores other processes leave free (issue 17: beside two busy
neighbours, 2 threads on 2 cores made a PPO iteration 92.8 s, 1 thread 43.7 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from lowmem_rlhf.runtime.threads import ThreadGovernor, free_cores, threads_for


def test_free_cores_and_thread_counts():
    assert free_cores(busy=3.0, own=1.0, wall=1.0, cores=4) == 2.0  # others used 2 of 4 cores
    assert free_cores(busy=0.5, own=1.0, wall=1.0, cores=2) == 2.0  # never negative use by others
    assert [threads_for(f, 2) for f in (-1.0, 0.4, 1.0, 1.4, 1.6, 2.0, 3.0)] == [1, 1, 1, 1, 2, 2, 2]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_a_busy_neighbour_takes_a_thread_and_gives_it_back():
    """A real neighbour process burning all cores but one: the governor drops to one thread; once
    it is gone, back to every core. A fixed count is never changed."""
    cores, before = len(os.sched_getaffinity(0)), torch.get_num_threads()
    try:
        torch.set_num_threads(cores)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores - 1)]
        try:
            time.sleep(0.5)  # the neighbours are running
            gov = ThreadGovernor(probe=1.0)
            assert torch.get_num_threads() == 1, gov.changes
        finally:
            for b in busy:
                b.kill()
                b.wait()
        time.sleep(1.1)  # a quiet interval of at least MIN_INTERVAL
        assert gov.update() == cores
        assert [n for _, n in gov.changes] == [1, cores]
        fixed = ThreadGovernor(fixed=1)
        assert torch.get_num_threads() == 1 and fixed.update() == 1
    finally:
        torch.set_num_threads(before)
