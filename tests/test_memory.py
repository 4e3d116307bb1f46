"""The phase meter: per-phase host peaks sampled from a thread, without resetting the process's
own high-water mark (issue 17: the old reset made `/usr/bin/time -v` and ru_maxrss report
1.59 GiB for a run that peaked at 1.99 GiB); and an SFT/RM micro-batch's backward on a CPU
handing back the heap glibc kept."""

from __future__ import annotations

import resource
import time
from dataclasses import replace

import pytest
import torch

from lowmem_rlhf.config import load_profile
from lowmem_rlhf.measure.memory import MemoryMeter, rss
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import load_model
from lowmem_rlhf.runtime.host_heap import _libc
from lowmem_rlhf.runtime.trainer import make_trainer

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


def _heap_holes(n: int, mb: int) -> list[torch.Tensor]:
    """Leave n freed blocks of `mb` MiB inside glibc's heap, each between two live 1 MiB blocks, so
    neither coalescing nor shrinking the heap's top can give them back: resident memory that
    nothing holds, as a micro-batch's activations leave it. Returns the live blocks."""
    torch.empty(16 * MB, dtype=torch.uint8).fill_(1)  # freed at once: glibc's mmap threshold rises to 16 MiB
    holes, pins = [], []
    for _ in range(n):
        holes.append(torch.ones(mb * MB // 4))  # below the threshold: from the heap, and touched
        pins.append(torch.ones(MB // 4))
    del holes
    return pins


@pytest.mark.skipif(_libc() is None, reason="malloc_trim is glibc's")
def test_a_cpu_training_backward_gives_back_the_heap_glibc_kept(tiny_llama):
    prof = replace(load_profile("lora-bf16-shared"), lora_r=8, dtype="fp32")
    eng = SharedBase(load_model(str(tiny_llama), prof), prof)
    eng.add_adapter("sft")
    trainer = make_trainer(eng, "sft", prof, lr=1e-3, total_steps=1, micro_batch=2, grad_accum=1)
    eng.use("sft")
    eng.model.train()
    ids = torch.randint(4, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = eng.logits(eng.hidden_states(ids, torch.ones_like(ids))).float().logsumexp(-1).mean()
    start = rss()
    pins = _heap_holes(50, 4)  # 200 MiB freed, still resident, beside 50 MiB of live blocks
    kept = rss() - start
    assert kept >= 230 * MB, f"glibc returned the freed blocks itself ({kept / MB:.0f} MiB kept): nothing to show"
    trainer.backward(loss)  # what the SFT and RM stages call after each micro-batch
    assert all(p.grad is not None for p in eng.parameters_of("sft"))
    # the freed 200 MiB went back; the 50 MiB of live blocks stay
    assert rss() - start <= kept - 150 * MB
    del pins
