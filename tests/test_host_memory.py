"""Host RAM: importing lowmem_rlhf before torch turns on torch's transparent-huge-page allocation
(docs/speed.md: SFT peak RSS 4.46 -> 3.83 GiB at the CPU defaults), and a user's explicit value wins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# 64 MiB of touched float32 tensors, then the process's anonymous huge pages in kB
PROBE = ("import lowmem_rlhf, os, re, torch; ts = [torch.ones(1 << 22) for _ in range(4)]; "
         "kb = re.search(r'AnonHugePages:\\s+(\\d+)', open('/proc/self/smaps_rollup').read()).group(1); "
         "print(os.environ.get(lowmem_rlhf.THP_ENV), kb)")


def _probe(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    value, kb = out.stdout.split()
    return value, int(kb)


@pytest.mark.skipif(not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
                    reason="needs Linux with transparent huge pages on request (madvise): under 'always' every "
                           "process gets them, under 'never' none does")
def test_importing_lowmem_rlhf_first_backs_large_cpu_tensors_with_huge_pages_unless_told_not_to():
    value, kb = _probe(None)
    assert value == "1" and kb >= 32 * 1024  # most of the 64 MiB is in 2 MiB pages
    value, kb = _probe("0")
    assert value == "0" and kb == 0


def test_the_variable_is_left_alone_when_torch_was_imported_first():
    """torch reads it once, when it loads: setting it later would claim an effect it cannot have."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    code = "import torch, os, lowmem_rlhf; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
