"""Data parallel: the stages under `torchrun --nproc_per_node 2` (gloo, CPU, the tiny model) train
what one process trains with twice the batch (runtime/distributed.py).

Equivalence is tested with an fp32 profile without LoRA dropout (tests/assets/lora-fp32-exact.yaml):
dropout masks depend on how the rows are split, so no split can reproduce another's. What remains
is fp32 summation order (two per-rank sums averaged by DDP against one sum over all rows).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowmem_rlhf.data import bundled_path
from lowmem_rlhf.runtime import checkpoint
from lowmem_rlhf.runtime.runs import partial_dir

SEED_TASKS = str(bundled_path("self-instruct-seed-tasks.jsonl"))
HH = str(bundled_path("hh-rlhf-harmless-base-test-600.jsonl.gz"))
PROMPTS = str(bundled_path("demo-prompts.jsonl"))
REWARDS = Path(__file__).parent / "assets" / "rewards.py"
EXACT = str(Path(__file__).parent / "assets" / "lora-fp32-exact.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("WORLD_SIZE", None)


@pytest.fixture(scope="module")
def strong_llama(tmp_path_factory):
    """The byte-vocabulary tiny Llama with larger initial weights (as test_resume's): its sampled
    answers differ, so the rewards and the first iteration's gradients are not all zero."""
    from lowmem_rlhf.model.random_models import save_random, tiny_llama_config

    cfg = tiny_llama_config()
    cfg.vocab_size = 260
    cfg.initializer_range = 0.2
    return save_random(cfg, tmp_path_factory.mktemp("byte-llama"))


def _cmd(args: list[str], procs: int) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "lowmem_rlhf", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
            "-m", "lowmem_rlhf", *args]


def _run(args: list[str], procs: int, timeout: float = 600) -> str:
    p = subprocess.run(_cmd(args, procs), env=ENV, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout + p.stderr


def _adapters(stage_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(stage_dir.rglob("adapter_model.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    assert out
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _rows(stage_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _sft(model: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["sft", "--model", str(model), "--data", SEED_TASKS, "--out", str(out), "--max-steps", "6", "--batch",
            str(batch), "--max-len", "64", "--seed", "3", "--lr", "1e-3", *extra]


def _rm(model: Path, out: Path, batch: int) -> list[str]:
    return ["rm", "--model", str(model), "--data", HH, "--out", str(out), "--max-steps", "6", "--batch", str(batch),
            "--max-len", "64", "--max-pairs", "60", "--seed", "3", "--lr", "1e-3", "--profile", EXACT]


def _check_rank0_outputs(stage_dir: Path, log: str, stage: str, global_batch: int) -> None:
    """What rank 0 alone wrote: config.json and summary.json with world_size 2, one metrics row per
    step, and the run printed once."""
    assert json.loads((stage_dir / "config.json").read_text())["world_size"] == 2
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == global_batch
    assert [r["step"] for r in _rows(stage_dir)] == list(range(1, 7))
    assert all(r["samples"] == global_batch for r in _rows(stage_dir))
    assert log.count(f"{stage.upper()} summary") == 1, log[-3000:]


@pytest.mark.slow
def test_sft_two_processes_equal_one_with_twice_the_batch(byte_llama, tmp_path):
    """2 ranks x batch 4 (two micro-batches of 2 each: DDP's no_sync on the first) against one
    process with batch 8: the same adapter within 1e-5 after 6 AdamW steps. One process with rank
    0's batch alone ends elsewhere: the ranks' gradients are combined, not each rank's own."""
    two, one, half = tmp_path / "two", tmp_path / "one", tmp_path / "half"
    log = _run(_sft(byte_llama, two, 4, "--profile", EXACT), 2)
    _run(_sft(byte_llama, one, 8, "--profile", EXACT), 1)
    _run(_sft(byte_llama, half, 4, "--profile", EXACT), 1)
    a, b, c = _adapters(two / "sft"), _adapters(one / "sft"), _adapters(half / "sft")
    print(f"sft: 2 x 4 vs 1 x 8 max |diff| {_max_diff(a, b):.2e}; vs rank 0's rows alone {_max_diff(a, c):.2e}")
    assert _max_diff(a, b) <= 1e-5
    assert _max_diff(a, c) > 1e-4
    _check_rank0_outputs(two / "sft", log, "sft", 8)
    loss_two = [r["loss"] for r in _rows(two / "sft")]
    loss_one = [r["loss"] for r in _rows(one / "sft")]
    assert loss_two == pytest.approx(loss_one, rel=1e-5)  # the logged loss is the global batch's
    assert sorted(p.name for p in two.iterdir()) == ["sft"]  # nothing else in the run folder


@pytest.mark.slow
def test_zero3_two_processes_equal_one_with_twice_the_batch(byte_llama, tmp_path):
    """The zero3-offload trainer (DeepSpeed ZeRO-3, parameters and optimizer in CPU RAM) under the
    launcher: DeepSpeed partitions the model over the 2 ranks and averages the adapter's gradients;
    the adapter equals one ZeRO-3 process with twice the batch within 1e-5."""
    profile = tmp_path / "zero3-fp32-exact.yaml"
    profile.write_text(Path(EXACT).read_text().replace("name: lora-fp32-exact", "name: zero3-fp32-exact")
                       .replace("offload: none", "offload: zero3"))
    two, one = tmp_path / "two", tmp_path / "one"
    log = _run(_sft(byte_llama, two, 4, "--profile", str(profile)), 2)
    _run(_sft(byte_llama, one, 8, "--profile", str(profile)), 1)
    diff = _max_diff(_adapters(two / "sft"), _adapters(one / "sft"))
    print(f"zero3 sft: 2 x 4 vs 1 x 8 max |diff| {diff:.2e}")
    assert diff <= 1e-5
    _check_rank0_outputs(two / "sft", log, "sft", 8)


@pytest.mark.slow
def test_rm_two_processes_equal_one_with_twice_the_batch(byte_llama, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    log = _run(_rm(byte_llama, two, 4), 2)
    _run(_rm(byte_llama, one, 8), 1)
    diff = _max_diff(_adapters(two / "rm"), _adapters(one / "rm"))
    print(f"rm: 2 x 4 vs 1 x 8 max |diff| {diff:.2e}")
    assert diff <= 1e-5
    _check_rank0_outputs(two / "rm", log, "rm", 8)
    acc_two = [r["accuracy"] for r in _rows(two / "rm")]
    assert acc_two == [r["accuracy"] for r in _rows(one / "rm")]


def _rl(stage: str, model: Path, out: Path, rollout: int, *extra: str) -> list[str]:
    return [stage, "--model", str(model), "--prompts", PROMPTS, "--reward", f"{REWARDS}:ascii_share", "--out",
            str(out), "--profile", EXACT, "--iterations", "2", "--rollout-batch", str(rollout), "--prompt-len",
            "32", "--response-len", "4", "--minibatches", "1", "--seed", "3", "--lr", "1e-3",
            "--no-sampler-logprobs", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_two_processes_sample_and_update_as_one_with_twice_the_rollout(strong_llama, tmp_path, stage):
    """2 ranks x rollout 2 against one process with rollout 4, one minibatch, one epoch: each rank
    samples its rows of the global rollout with the seeds one process gives them, so the rollouts
    are the same (the same lengths and rewards); advantages are whitened with the global batch's
    moments, the loss is a token mean over the global batch, and DDP averages the gradients: the
    gradient norms before clipping agree within 1e-5 (relative; measured <= 1.3e-6). PPO runs with
    --reward-norm: the running score moments are the global batch's too.

    The adapters are compared against the learning rate, and this is why: AdamW moves each
    coordinate by about lr * g / (|g| + eps) whatever the gradient's size, so a coordinate whose
    gradient is tiny (LoRA A while B is near zero) turns the gradient's fp32 summation-order noise
    (the 1e-6 above) into a visible fraction of lr. Bounds: RMS difference <= 1e-3 lr (measured
    7e-5 lr for PPO's actor, 4e-5 lr for GRPO's), largest coordinate <= 0.1 lr (measured 0.015 lr).
    --no-sampler-logprobs: the
    sampler's log-probs carry the KV cache's rounding, which depends on the generation batch
    (2e-5 nats), so the old log-probs come from the scoring forward, as the update's do."""
    extra = ["--ppo-epochs", "1", "--reward-norm"] if stage == "ppo" else ["--epochs", "1", "--group-size", "2"]
    two, one = tmp_path / "two", tmp_path / "one"
    log = _run(_rl(stage, strong_llama, two, 2, *extra), 2)
    _run(_rl(stage, strong_llama, one, 4, *extra), 1)
    r2, r1 = _rows(two / stage), _rows(one / stage)
    # the same responses: equal lengths, and rewards equal up to the fp32 sum that averages them
    assert [r["reward_mean"] for r in r2] == pytest.approx([r["reward_mean"] for r in r1], rel=1e-6)
    assert [r["response_length"] for r in r2] == [r["response_length"] for r in r1]
    assert all(r["samples"] == 4 for r in r2)
    assert all(r["grad_norm_actor"] > 0.1 for r in r1)  # every update has a signal to compare
    roles = ("actor", "critic") if stage == "ppo" else ("actor",)
    for role in roles:
        g2, g1 = [r[f"grad_norm_{role}"] for r in r2], [r[f"grad_norm_{role}"] for r in r1]
        print(f"{stage} {role}: grad norms {g2} vs {g1}, max rel diff "
              f"{max(abs(a - b) / max(b, 1e-30) for a, b in zip(g2, g1)):.2e}")
        assert g2 == pytest.approx(g1, rel=1e-5)
    a2, a1 = _adapters(two / stage), _adapters(one / stage)
    lr = 1e-3
    for role in roles:
        keys = [k for k in a1 if k.startswith(f"{role}/")]
        d = torch.cat([(a2[k] - a1[k]).flatten() for k in keys])
        rms, worst = float(d.pow(2).mean().sqrt()), float(d.abs().max())
        print(f"{stage} {role}: adapter rms |diff| {rms:.2e} = {rms / lr:.1e} lr, max {worst:.2e} = {worst / lr:.1e} lr")
        assert rms <= 1e-3 * lr and worst <= 0.1 * lr
    summary = json.loads((two / stage / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_rollout_batch"] == 4
    assert log.count(f"{stage.upper()} summary") == 1, log[-3000:]


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun starts its workers in sessions of their
    own, so killing its process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for q in tree:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_same_adapter(byte_llama, tmp_path):
    """qlora-shared (LoRA dropout 0.05: each rank's random state is checkpointed and restored) with a
    checkpoint every step; the whole launcher is SIGKILLed mid-run and resumed under the same
    world: the adapter equals an uninterrupted 2-process run bit for bit. Resuming it in one
    process is refused with one line."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    common = ("--profile", "qlora-shared", "--save-every", "1")
    _run(_sft(byte_llama, ref, 2, *common), 2)
    p = subprocess.Popen(_cmd(_sft(byte_llama, run, 2, *common), 2), env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = partial_dir(run, "sft") / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.01)
    _kill_tree(p.pid)
    p.wait()
    assert not (run / "sft").exists()
    ckpt = checkpoint.latest(partial_dir(run, "sft"))
    assert ckpt is not None and 2 <= checkpoint.step_of(ckpt) < 6
    assert len(checkpoint.load(ckpt)["rng_ranks"]) == 2

    one = subprocess.run(_cmd(_sft(byte_llama, run, 2, *common, "--resume"), 1), env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 2
    errors = [x for x in one.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "run by 2 process(es), this is 1" in errors[0] and "--nproc_per_node 2" in errors[0]

    log = _run(_sft(byte_llama, run, 2, *common, "--resume"), 2)
    assert "resuming SFT" in log
    assert _max_diff(_adapters(ref / "sft"), _adapters(run / "sft")) == 0.0
    assert [r["step"] for r in _rows(run / "sft")] == list(range(1, 7))


@pytest.mark.slow
def test_commands_other_than_the_stages_are_refused_under_a_launcher(byte_llama, tmp_path):
    p = subprocess.run(_cmd(["plan", "--gpu", "3090", "--model", "llama-2-7b"], 2), env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0
    assert "`plan` runs in one process" in p.stderr


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_ddp_buckets_are_what_the_estimator_counts(tiny_llama, stage, monkeypatch):
    """DDP over each trained adapter allocates its flat gradient buckets when it is built: the
    allocation tracker counts exactly `estimate(..., data_parallel=True)`'s ddp_buckets (a world
    of one gloo process; the buckets do not depend on the world size)."""
    from lowmem_rlhf.config import Shape, load_profile
    from lowmem_rlhf.measure.alloc_tracker import AllocTracker
    from lowmem_rlhf.model.adapters import SharedBase
    from lowmem_rlhf.model.loading import load_model
    from lowmem_rlhf.plan.estimator import estimate
    from lowmem_rlhf.runtime.distributed import AdapterSync

    prof = load_profile(EXACT)
    shared = SharedBase(load_model(str(tiny_llama), prof), prof)
    trained = {"sft": [("sft", False)], "rm": [("reward", True)], "ppo": [("actor", False), ("critic", True)]}[stage]
    for name, head in trained:
        shared.add_adapter(name, with_head=head)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    torch.distributed.init_process_group("gloo")
    try:
        tracker = AllocTracker()
        syncs = []
        with tracker:
            for name, _ in trained:
                shared.use(name)
                syncs.append(AdapterSync(shared.parameters_of(name), torch.device("cpu")))
        counted = tracker.live
    finally:
        torch.distributed.destroy_process_group()
    est = estimate(shared.loaded.spec, prof, stage, Shape(seq_len=64, batch=2, prompt_len=16, response_len=8,
                                                          rollout_batch=2), target="cpu", data_parallel=True)
    assert all(ph.components["ddp_buckets"] == counted for ph in est.phases), (counted, est.phases[0].components)
    assert "ddp_buckets" not in estimate(shared.loaded.spec, prof, stage, Shape(seq_len=64, batch=2, prompt_len=16,
                                                                                 response_len=8, rollout_batch=2),
                                         target="cpu").phases[0].components


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_rank_at_one_step_with_one_checkpoint(byte_llama, tmp_path):
    """torchrun passes SIGTERM to its workers; the ranks agree on the step to stop after, rank 0
    writes the checkpoint, and every rank waits for it before exiting (torchrun kills the rest once
    one exits)."""
    run = tmp_path / "run"
    p = subprocess.Popen(_cmd(_sft(byte_llama, run, 2, "--profile", "qlora-shared", "--max-steps", "400"), 2),
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = partial_dir(run, "sft") / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0
    ckpt = checkpoint.latest(partial_dir(run, "sft"))
    assert ckpt is not None
    k = checkpoint.step_of(ckpt)
    assert 2 <= k < 400 and len(metrics.read_text().splitlines()) == k
    assert f"stopped: SFT stopped by SIGTERM after step {k} of 400; checkpoint saved" in err
    assert f"rank 1: stopped: SFT stopped by SIGTERM after step {k} of 400 (rank 0 saved the checkpoint)" in err


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_data_parallel_stage(byte_llama, tmp_path):
    """The README's `accelerate launch --multi_gpu --num_processes 2` (accelerate starts torchrun;
    gloo where there is no GPU): a world of 2, as torchrun's."""
    run = tmp_path / "run"
    args = _sft(byte_llama, run, 2, "--profile", EXACT, "--max-steps", "2")
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lowmem_rlhf",
                        *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    summary = json.loads((run / "sft" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4
