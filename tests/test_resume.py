"""Reliability: a run killed at a random step resumes to the same adapters, bit for bit; SIGTERM
checkpoints and exits cleanly; an out-of-memory step halves the micro-batch and trains the same
samples. Real subprocesses, real signals, real `torch.OutOfMemoryError` from the step's
fault-injection switch (lowmem_rlhf/runtime/oom.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_rlhf.config import load_profile
from lowmem_rlhf.data import bundled_path
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.plan.planner import machine_profile
from lowmem_rlhf.runtime import checkpoint
from lowmem_rlhf.runtime.oom import FAULT_ENV
from lowmem_rlhf.runtime.runs import partial_dir
from lowmem_rlhf.stages.sft import SFTConfig, run_sft

SEED_TASKS = str(bundled_path("self-instruct-seed-tasks.jsonl"))
HH = str(bundled_path("hh-rlhf-harmless-base-test-600.jsonl.gz"))
PROMPTS = str(bundled_path("demo-prompts.jsonl"))
REWARDS = Path(__file__).parent / "assets" / "rewards.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    from lowmem_rlhf.model.random_models import save_random, tiny_llama_config

    cfg = tiny_llama_config()
    cfg.vocab_size = 260
    cfg.initializer_range = 0.2
    return save_random(cfg, tmp_path_factory.mktemp("byte-llama"))


def _args(stage: str, model: Path, run: Path) -> list[str]:
    common = ["--model", str(model), "--out", str(run), "--profile", "qlora-shared", "--seed", "3",
              "--save-every", "1"]
    if stage == "sft":
        return ["sft", "--data", SEED_TASKS, "--max-steps", "24", "--batch", "4", "--max-len", "64", *common]
    if stage == "rm":
        return ["rm", "--data", HH, "--max-steps", "24", "--batch", "4", "--max-len", "64", "--max-pairs", "60",
                *common]
    if stage == "grpo":  # hybrid: a function and an evaluator process, weighted
        return ["grpo", "--prompts", PROMPTS, "--reward", f"{REWARDS}:ascii_share", "--reward-cmd",
                f"{sys.executable} {REWARDS} inverse", "--reward-weights", "1,0.5", "--iterations", "6",
                "--rollout-batch", "4", "--group-size", "2", "--prompt-len", "32", "--response-len", "4", *common]
    return ["ppo", "--prompts", PROMPTS, "--reward", f"{REWARDS}:ascii_share", "--iterations", "10",
            "--rollout-batch", "4", "--prompt-len", "32", "--response-len", "4", "--ppo-epochs", "2", *common]


def _cli(args: list[str], cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lowmem_rlhf", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def _finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out + err


def _logged(run: Path, stage: str) -> int:
    path = partial_dir(run, stage) / "metrics.jsonl"
    try:
        return sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    except FileNotFoundError:
        return 0


def _stop_at(p: subprocess.Popen, run: Path, stage: str, k: int, sig: int) -> None:
    """Send `sig` once the stage has logged k steps (the run is in its loop, mid-way)."""
    deadline = time.time() + 600
    while _logged(run, stage) < k:
        assert p.poll() is None, f"the run ended before step {k}: {_finish(p)[1][-2000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    p.send_signal(sig)


def _adapters(run: Path, stage: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / stage).rglob("adapter_model.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    assert out
    return out


def _metrics(run: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(byte_llama, tmp_path_factory):
    """Uninterrupted runs of each stage, started at once and run side by side."""
    root = tmp_path_factory.mktemp("reference")
    procs = {s: _cli(_args(s, byte_llama, root / s)) for s in ("sft", "rm", "ppo", "grpo")}
    for s, p in procs.items():
        code, log = _finish(p)
        assert code == 0, log[-3000:]
    return {s: root / s for s in procs}


@pytest.mark.parametrize("stage", ["sft", "ppo", "grpo"])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(byte_llama, tmp_path, reference, stage):
    total = {"sft": 24, "ppo": 10, "grpo": 6}[stage]
    k = random.randint(2, total // 2)
    run = tmp_path / "run"
    p = _cli(_args(stage, byte_llama, run))
    _stop_at(p, run, stage, k, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not (run / stage).exists(), "a killed stage must not look finished"
    ckpt = checkpoint.latest(partial_dir(run, stage))
    assert ckpt is not None and checkpoint.step_of(ckpt) >= k - 1, (k, ckpt)
    code, log = _finish(_cli(_args(stage, byte_llama, run) + ["--resume"]))
    assert code == 0, log[-3000:]
    assert "resuming" in log
    ref, got = _adapters(reference[stage], stage), _adapters(run, stage)
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.equal(ref[name], got[name]), f"killed at step {k}: {name} differs after resume"
    key = "step" if stage == "sft" else "iteration"
    rows = _metrics(run, stage)
    assert [r[key] for r in rows] == list(range(1, total + 1)), f"a step was trained twice or skipped (k={k})"
    loss = "loss" if stage == "sft" else "reward_mean"
    assert [r[loss] for r in rows] == [r[loss] for r in _metrics(reference[stage], stage)]
    assert not (run / stage / checkpoint.CKPT_DIR).exists() and not partial_dir(run, stage).exists()


def test_sigterm_checkpoints_at_the_step_boundary_and_resume_matches(byte_llama, tmp_path, reference):
    run = tmp_path / "run"
    p = _cli(_args("rm", byte_llama, run) + ["--save-every", "0"])  # only the signal saves
    _stop_at(p, run, "rm", 5, signal.SIGTERM)
    code, log = _finish(p)
    assert code == 130, log[-3000:]
    assert "stopped: RM stopped by SIGTERM after step" in log and "--resume" in log
    ckpt = checkpoint.latest(partial_dir(run, "rm"))
    assert ckpt is not None and checkpoint.step_of(ckpt) >= 5
    assert _logged(run, "rm") == checkpoint.step_of(ckpt)  # the step in flight finished, then it stopped
    # resumed from another directory with a relative --out: the same run folder
    code, log = _finish(_cli(_args("rm", byte_llama, Path("run")) + ["--save-every", "0", "--resume"], cwd=tmp_path))
    assert code == 0, log[-3000:]
    ref, got = _adapters(reference["rm"], "rm"), _adapters(run, "rm")
    assert all(torch.equal(ref[n], got[n]) for n in ref)


def test_resume_refuses_other_settings_and_a_fresh_start_refuses_to_clobber(byte_llama, tmp_path):
    run = tmp_path / "run"
    p = _cli(_args("sft", byte_llama, run))
    _stop_at(p, run, "sft", 2, signal.SIGKILL)
    p.wait()
    code, log = _finish(_cli(_args("sft", byte_llama, run)[:-2] + ["--max-steps", "30", "--resume"]))
    assert code == 2 and "was started with max_steps=24, now 30" in log, log[-2000:]
    code, log = _finish(_cli(_args("sft", byte_llama, run)))
    assert code == 2 and "holds an unfinished sft run" in log and "--resume" in log, log[-2000:]
    assert checkpoint.latest(partial_dir(run, "sft")) is not None  # refusing did not delete it


def _sft(model, out, micro_batch=4, **kw):
    prof = machine_profile(replace(load_profile("qlora-shared"), lora_r=8, micro_batch=micro_batch, grad_ckpt=False,
                                   lora_dropout=0.0))
    return SFTConfig(model=str(model), data=SEED_TASKS, out=out, profile=prof, max_len=64, batch=8, max_steps=5,
                     seed=1, progress=False, **kw)


def test_injected_oom_halves_the_micro_batch_and_trains_the_same_samples(byte_llama, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "sft:3:1")  # step 3 runs out of memory at any micro-batch above 1
    s = run_sft(_sft(byte_llama, tmp_path))
    rows = _metrics(tmp_path, "sft")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["micro_batch"] for r in rows] == [4, 4, 1, 1, 1]
    assert [r["oom_retries"] for r in rows] == [0, 0, 2, 0, 0]  # 4 -> 2 -> 1
    assert all(r["samples"] == 8 for r in rows)  # the effective batch never changed
    assert [(e["failed_micro_batch"], e["micro_batch"]) for e in s["oom_events"]] == [(4, 2), (2, 1)]
    log = [json.loads(x) for x in (tmp_path / "oom.jsonl").read_text().splitlines()]
    assert log[-1]["stage"] == "sft" and log[-1]["micro_batch"] == 1  # written next to the plan
    # the retried step trained what an undisturbed step trains: same loss as a run without the fault
    monkeypatch.delenv(FAULT_ENV)
    clean = tmp_path / "clean"
    run_sft(_sft(byte_llama, clean))
    ref = _metrics(clean, "sft")
    assert abs(rows[2]["loss"] - ref[2]["loss"]) < 1e-4
    # the planner learned: a later SFT in this run folder starts at the micro-batch that worked
    s2 = run_sft(_sft(byte_llama, tmp_path, overwrite=True))
    assert [r["micro_batch"] for r in _metrics(tmp_path, "sft")] == [1] * 5 and s2["oom_events"] == []


def test_oom_at_micro_batch_one_names_the_knob_and_leaves_nothing_finished(byte_llama, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "sft:2:0")
    with pytest.raises(UserError, match=r"even at micro-batch 1: lower --max-len \(now 64\)"):
        run_sft(_sft(byte_llama, tmp_path, micro_batch=2, save_every=0))
    assert not (tmp_path / "sft").exists() and not partial_dir(tmp_path, "sft").exists()


def test_ppo_oom_in_an_update_is_retried_at_half_the_micro_batch(byte_llama, tmp_path, monkeypatch):
    from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo

    monkeypatch.setenv(FAULT_ENV, "ppo:2:2,ppo-generation:3:1")  # an update, then a long-response rollout
    prof = machine_profile(replace(load_profile("qlora-shared"), lora_r=8, micro_batch=4, grad_ckpt=False))
    s = run_ppo(PPOConfig(model=str(byte_llama), prompts=PROMPTS, out=tmp_path, profile=prof,
                          reward=f"{REWARDS}:ascii_share", iterations=3, rollout_batch=4, prompt_len=32,
                          response_len=4, ppo_epochs=1, progress=False))
    rows = _metrics(tmp_path, "ppo")
    assert [r["micro_batch"] for r in rows] == [4, 2, 2] and [r["samples"] for r in rows] == [4, 4, 4]
    assert [r["generation_batch"] for r in rows] == [4, 4, 1]  # sampled in chunks, joined into one rollout
    assert [r["oom_retries"] for r in rows] == [0, 1, 2] and s["skipped_iterations"] == 0
    assert all(r["response_length"] > 0 for r in rows)


def test_auto_resume_keeps_finished_stages_and_continues_the_one_in_progress(byte_llama, tmp_path):
    run = tmp_path / "auto"
    args = ["auto", "--model", str(byte_llama), "--out", str(run), "--sft-steps", "2", "--rm-steps", "12",
            "--ppo-iterations", "2", "--seq-len", "64", "--prompt-len", "32", "--response-len", "4",
            "--rollout-batch", "4"]
    p = _cli(args)
    _stop_at(p, run, "rm", 11, signal.SIGKILL)  # RM checkpoints every 10 steps: one is on disk
    p.wait()
    sft_mtime = (run / "sft" / "summary.json").stat().st_mtime
    code, log = _finish(_cli(["auto", "--resume", str(run)]))
    assert code == 0, log[-3000:]
    log = " ".join(log.split())  # rich wraps long lines at the terminal width
    assert "finished earlier, kept" in log and "(resuming)" in log and "resuming RM from" in log
    assert (run / "sft" / "summary.json").stat().st_mtime == sft_mtime
    assert [r["step"] for r in _metrics(run, "rm")] == list(range(1, 13))
    assert (run / "ppo" / "summary.json").exists() and (run / "summary.json").exists()
