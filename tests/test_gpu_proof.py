"""`scripts/gpu_proof.py --cpu-rehearsal`: the GPU proof's own code path, on a tiny model on the
CPU, so that the one call a short GPU window allows works the first time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_proof_rehearsal_runs_every_stage_of_both_profiles_and_writes_its_table(tmp_path):
    out = tmp_path / "proof.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_proof.py"), "--cpu-rehearsal", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["max_vram_gib"] == 24.0
    assert len(r["profiles"]) == 2 and "qlora-shared" in r["profiles"]
    for name, stages in r["profiles"].items():
        assert set(stages) == {"sft", "rm", "ppo"}, name
        assert set(stages["ppo"]["phases"]) == {"generation", "scoring", "actor_update", "critic_update"}
        for stage, f in stages.items():
            assert f["seconds_per_step"] > 0 and all("cpu_ram" in figs for figs in f["phases"].values()), stage
        assert stages["ppo"]["tokens_per_s_generation"] > 0 and stages["sft"]["tokens_per_s"] > 0
        sims = r["simulated"][name]
        assert all("error" not in sims[st] for st in ("sft", "rm", "ppo")), sims
        assert set(sims["ppo"]["phases"]) == {"generation", "scoring", "actor_update", "critic_update"}
    table = out.with_suffix(".md").read_text()
    rows = [x for x in table.splitlines() if x.startswith("| ") and not x.startswith("| profile")]
    assert table.startswith("Measured on cpu, capped at 24 GiB") and len(rows) == 2 * (1 + 1 + 4)
    assert all(x.split(" | ")[4] != "-" for x in rows)  # every phase has its simulated peak
    assert "[" in p.stdout and "wrote" in p.stdout  # progress lines with times
