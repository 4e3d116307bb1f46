"""The CUDA path's failure handling, run on the CPU with the fault-injection switches: an
out-of-memory in any form and at any point of a step is undone and retried, a NaN/inf gradient
skips the step, and a finished stage's 4-bit layers are gone when the next stage loads."""

from __future__ import annotations

import gc
import json
import weakref
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
from lowmem_rlhf.runtime.oom import FAULT_ENV, NAN_ENV, MicroBatch, is_oom
from lowmem_rlhf.runtime.runs import partial_dir
from lowmem_rlhf.stages.sft import SFTConfig, run_sft

ASSETS = Path(__file__).parent / "assets"
SEED_TASKS = str(bundled_path("self-instruct-seed-tasks.jsonl"))
PROMPTS = str(bundled_path("demo-prompts.jsonl"))


def _sft(model, out, **kw):
    """qlora-shared without dropout: a retried micro-batch must see the same forward."""
    prof = machine_profile(replace(load_profile("qlora-shared"), lora_r=8, micro_batch=4, lora_dropout=0.0))
    base = dict(model=str(model), data=SEED_TASKS, out=out, profile=prof, max_len=64, batch=8, max_steps=4,
                seed=1, progress=False)
    return SFTConfig(**{**base, **kw})


def _adapter(stage_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(stage_dir.rglob("adapter_model.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    assert out
    return out


def _rows(stage_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_is_oom_knows_the_runtime_error_forms():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_oom(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 4x8)"))
    assert not is_oom(ValueError("CUDA out of memory"))  # only a RuntimeError carries it


def test_memory_is_freed_outside_the_except_block(tmp_path):
    """The failed attempt's tensors are gone when reset() runs: inside the except block the
    traceback would still hold the attempt's frame and its tensors."""
    alive = []

    def body(size: int) -> int:
        big = torch.empty(1024)
        alive.append(weakref.ref(big))
        if size > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 KiB")
        return size

    seen = []
    mb = MicroBatch(2, "sft", tmp_path, "qlora-shared", knob="--max-len")
    assert mb.run(1, body, lambda: seen.append(alive[-1]() is None)) == 1
    assert seen == [True]
    assert json.loads((tmp_path / "oom.jsonl").read_text())["error"].startswith("RuntimeError: CUDA out of memory")


def test_an_error_that_is_not_out_of_memory_is_not_retried(tmp_path):
    mb = MicroBatch(4, "sft", tmp_path, "qlora-shared", knob="--max-len")
    with pytest.raises(RuntimeError, match="shapes"):
        mb.run(1, lambda size: (_ for _ in ()).throw(RuntimeError("shapes cannot be multiplied")), lambda: None)
    assert mb.size == 4 and not (tmp_path / "oom.jsonl").exists()


@pytest.fixture(scope="module")
def clean_sft(byte_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    run_sft(_sft(byte_llama, out))
    return _adapter(out / "sft"), _rows(out / "sft")


# (fault, micro-batches of the run's steps, what it tests)
SFT_FAULTS = [
    ("sft:3:1:mid:cuda", [4, 4, 1, 1], "after the first micro-batch added its gradients, RuntimeError form"),
    ("sft:3:2:optim:cublas", [4, 4, 2, 2], "inside the optimizer step, after the update was applied"),
    ("sft:2:2:optim", [4, 2, 2, 2], "inside the optimizer step, torch's own error"),
]


@pytest.mark.parametrize("fault,micro_batches,what", SFT_FAULTS, ids=[f[0] for f in SFT_FAULTS])
def test_sft_oom_anywhere_in_a_step_is_undone_and_the_adapter_equals_a_clean_run(
        byte_llama, clean_sft, tmp_path, monkeypatch, fault, micro_batches, what):
    """An out-of-memory mid-step is undone (partial gradients, and an optimizer update already
    applied) and the step retried at half the micro-batch. The run ends bit for bit where the same
    out-of-memory at the start of the step (nothing to undo) ends, and within 1e-5 of a run without
    any fault: smaller micro-batches pad and sum differently (measured 2.3e-6 on the adapter and
    3e-4 on a step's loss at micro-batch 2 against 4; applying an update twice moves the adapter by
    about the learning rate, 2e-4)."""
    def run(name, spec):
        monkeypatch.setenv(FAULT_ENV, spec)
        s = run_sft(_sft(byte_llama, tmp_path / name))
        return s, _rows(tmp_path / name / "sft"), _adapter(tmp_path / name / "sft")

    s, rows, got = run("fault", fault)
    assert [r["micro_batch"] for r in rows] == micro_batches, what
    assert len(s["oom_events"]) >= 1 and all(r["samples"] == 8 for r in rows)
    _, start_rows, at_start = run("at-start", ":".join(fault.split(":")[:3]))
    assert [r["loss"] for r in rows] == [r["loss"] for r in start_rows], what
    assert all(torch.equal(got[k], at_start[k]) for k in got), what
    assert _max_diff(got, clean_sft[0]) < 1e-5, what


def test_fp16_oom_in_the_clipping_after_unscale_is_undone(byte_llama, tmp_path, monkeypatch):
    """fp16: an out-of-memory in the gradient clipping, after the loss scale's unscale_, is undone
    with the scaler's half-done step (a retry would otherwise fail with "unscale_() has already been
    called"), and the run ends bit for bit where the same out-of-memory at the step's start does."""
    prof = replace(load_profile("qlora-shared"), dtype="fp16", lora_r=8, micro_batch=4, lora_dropout=0.0)

    def run(name, spec):
        monkeypatch.setenv(FAULT_ENV, spec)
        s = run_sft(_sft(byte_llama, tmp_path / name, profile=prof, max_steps=3))
        return s, _rows(tmp_path / name / "sft"), _adapter(tmp_path / name / "sft")

    s, rows, got = run("fault", "sft:2:2:clip:cuda")
    assert [r["micro_batch"] for r in rows] == [4, 2, 2] and len(s["oom_events"]) == 1
    assert s["overflow_skips"] == 0 and all(r["loss_scale"] == 65536.0 for r in rows)
    _, start_rows, at_start = run("at-start", "sft:2:2")
    assert [r["loss"] for r in rows] == [r["loss"] for r in start_rows]
    assert all(torch.equal(got[k], at_start[k]) for k in got)


def test_ppo_oom_inside_the_optimizer_step_is_undone(byte_llama, tmp_path, monkeypatch):
    """PPO: an out-of-memory (RuntimeError form) inside the optimizer steps of iteration 2, after
    the update was applied: actor and critic end bit for bit where the same out-of-memory at the
    start of the step (nothing to undo) leaves them. (Against a run without any fault they differ
    by 2e-5: micro-batch 2 instead of 4 changes the rounding, and the later rollouts with it.)"""
    from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo

    def ppo(name, spec):
        monkeypatch.setenv(FAULT_ENV, spec)
        prof = machine_profile(replace(load_profile("qlora-shared"), lora_r=8, micro_batch=4))
        s = run_ppo(PPOConfig(model=str(byte_llama), prompts=PROMPTS, out=tmp_path / name, profile=prof,
                              reward=f"{ASSETS / 'rewards.py'}:ascii_share", iterations=3, rollout_batch=4,
                              prompt_len=32, response_len=4, ppo_epochs=2, progress=False))
        return s, _rows(tmp_path / name / "ppo"), _adapter(tmp_path / name / "ppo")

    s, rows, got = ppo("fault", "ppo:2:2:optim:cuda")
    assert [r["micro_batch"] for r in rows] == [4, 2, 2] and s["skipped_iterations"] == 0
    assert s["oom_events"][0]["error"].startswith("RuntimeError: CUDA out of memory")
    _, start_rows, at_start = ppo("at-start", "ppo:2:2")
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in start_rows]
    assert got.keys() == at_start.keys() and all(torch.equal(got[k], at_start[k]) for k in got)


def test_a_nan_gradient_skips_the_step_and_leaves_the_adapter_unchanged(byte_llama, tmp_path, monkeypatch):
    """Both steps' gradients NaN: both skipped, counted, and the adapter is its initial one (LoRA B
    starts at 0; any applied AdamW step moves it)."""
    monkeypatch.setenv(NAN_ENV, "sft:1,sft:2")
    s = run_sft(_sft(byte_llama, tmp_path, max_steps=2))
    rows = _rows(tmp_path / "sft")
    assert [r["nonfinite_skips"] for r in rows] == [1, 2] and s["nonfinite_skips"] == 2
    assert all(r["grad_norm"] != r["grad_norm"] for r in rows)  # NaN
    b = {k: v for k, v in _adapter(tmp_path / "sft").items() if "lora_B" in k}
    assert b and all(float(v.abs().max()) == 0.0 for v in b.values())
    monkeypatch.setenv(NAN_ENV, "sft:1")  # one bad step among good ones: the run goes on and trains
    s = run_sft(_sft(byte_llama, tmp_path / "one", max_steps=3))
    assert s["nonfinite_skips"] == 1 and [r["nonfinite_skips"] for r in _rows(tmp_path / "one" / "sft")] == [1, 1, 1]
    assert any(float(v.abs().max()) > 0 for k, v in _adapter(tmp_path / "one" / "sft").items() if "lora_B" in k)


def test_nan_steps_in_a_row_stop_the_stage_with_one_line_and_keep_its_checkpoint(byte_llama, tmp_path, monkeypatch):
    """The stop's advice works as given: the kept checkpoint resumes with --max-nonfinite raised
    (a knob --resume lets change), and the resumed run finishes."""
    monkeypatch.setenv(NAN_ENV, "sft:2,sft:3,sft:4")
    with pytest.raises(UserError, match=r"SFT: 3 optimizer steps in a row skipped for a NaN/inf loss or gradient "
                                        r"\(last at step 4\): start over \(--overwrite\) with a lower learning "
                                        r"rate \(--lr\).*kept for --resume, which may raise --max-nonfinite"):
        run_sft(_sft(byte_llama, tmp_path, max_steps=6, save_every=1))
    assert not (tmp_path / "sft").exists()
    assert checkpoint.step_of(checkpoint.latest(partial_dir(tmp_path, "sft"))) == 3
    monkeypatch.setenv(NAN_ENV, "sft:5")
    s = run_sft(_sft(byte_llama, tmp_path, max_steps=6, save_every=1, resume=True, max_nonfinite=5))
    assert s["nonfinite_skips"] == 3 and (tmp_path / "sft" / "summary.json").exists()


def test_ppo_counts_nan_steps_per_adapter(byte_llama, tmp_path, monkeypatch):
    """An actor whose every step is NaN stops PPO, although the critic's steps apply in between
    (one count for both would be reset by each critic step and never stop)."""
    from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo

    monkeypatch.setenv(NAN_ENV, ",".join(f"ppo:{i}:actor" for i in range(1, 5)))
    prof = machine_profile(replace(load_profile("qlora-shared"), lora_r=8, micro_batch=4))
    with pytest.raises(UserError, match=r"^PPO actor: 3 optimizer steps in a row skipped .*\(last at step 3\)"):
        run_ppo(PPOConfig(model=str(byte_llama), prompts=PROMPTS, out=tmp_path, profile=prof,
                          reward=f"{ASSETS / 'rewards.py'}:ascii_share", iterations=4, rollout_batch=4,
                          prompt_len=32, response_len=4, ppo_epochs=1, progress=False))


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_step_undo_restores_the_optimizer_state_in_place(name):
    """StepUndo puts the parameters and the optimizer state back bit for bit, writing into the
    optimizer's own state tensors (a paged optimizer's buffers stay paged: load_state_dict would
    swap them for new ones), and removes a state the undone step created."""
    from lowmem_rlhf.runtime.optim import StepUndo, make_optimizer

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = make_optimizer([w], name, lr=1e-2)
    undo = StepUndo([w], opt)

    def step():
        w.grad = torch.randn_like(w)
        undo.take()
        opt.step()

    step()  # the first step creates the state: undone, it is gone
    undo.undo()
    assert len(opt.state[w]) == 0 and w.grad is None
    step()
    undo.drop()
    before_w = w.detach().clone()
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[w].items()}
    tensors = {k: v for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}
    step()
    assert not torch.equal(w, before_w)
    undo.undo()
    assert torch.equal(w, before_w)
    for k, v in opt.state[w].items():
        assert (torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k]), k
        if isinstance(v, torch.Tensor):
            assert v is tensors[k], k  # the same tensor object, written in place


def test_the_next_stage_loads_with_no_4bit_layer_of_the_previous_one_alive(byte_llama, tmp_path, monkeypatch):
    """bitsandbytes' 4-bit layers are only freed by the cycle collector. With it off (so that it
    cannot run by chance), the finished SFT stage's Linear4bit layers are still alive after
    run_sft returns; when the RM stage loads its model, none is."""
    import bitsandbytes as bnb

    from lowmem_rlhf.stages import scaffold
    from lowmem_rlhf.stages.rm import RMConfig, run_rm

    def live() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, bnb.nn.Linear4bit))

    seen = []
    real = scaffold.load_model

    def spy(*a, **kw):
        seen.append(live())
        return real(*a, **kw)

    monkeypatch.setattr(scaffold, "load_model", spy)
    gc.collect()
    gc.disable()
    try:
        run_sft(_sft(byte_llama, tmp_path, max_steps=1))
        left = live()
        prof = machine_profile(replace(load_profile("qlora-shared"), lora_r=8, micro_batch=4))
        run_rm(RMConfig(model=str(byte_llama), data=str(bundled_path("demo-pairs.jsonl.gz")), out=tmp_path,
                        profile=prof, max_len=64, batch=4, max_steps=1, max_pairs=40, progress=False))
    finally:
        gc.enable()
    assert left > 0  # the hazard is real: the SFT model outlived its stage
    assert seen[1] == 0, seen


def test_the_cuda_allocator_grows_segments_unless_the_user_set_it(monkeypatch):
    from lowmem_rlhf.cli import main
    from lowmem_rlhf.runtime.oom import shape_allocator

    assert shape_allocator(env := {}) == "expandable_segments:True" and env == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert shape_allocator(env := {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}) == "max_split_size_mb:128"
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert shape_allocator(env := {"PYTORCH_ALLOC_CONF": "backend:native"}) == "backend:native" and len(env) == 1
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code in (0, None)
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"  # the command line sets it


@pytest.mark.parametrize("profile", ["lora-bf16-shared", "qlora-shared"])
def test_fp16_trains_with_a_loss_scale_and_fp32_adapters(byte_llama, tmp_path, profile):
    """A card without bf16 gets the profile with dtype fp16 (the planner's switch): the base
    computes in fp16, the adapter stays fp32, the loss is scaled before backward (GradScaler),
    and SFT learns with no step skipped."""
    prof = replace(load_profile(profile), dtype="fp16", lora_r=8, micro_batch=4, lora_dropout=0.0)
    s = run_sft(SFTConfig(model=str(byte_llama), data=SEED_TASKS, out=tmp_path, profile=prof, max_len=64, batch=8,
                          max_steps=8, lr=3e-3, seed=1, progress=False))
    rows = _rows(tmp_path / "sft")
    assert s["nonfinite_skips"] == 0 and s["overflow_skips"] == 0
    assert all(r["loss_scale"] == 65536.0 for r in rows)  # the scaler ran and never had to back off
    first, last = sum(r["loss"] for r in rows[:2]) / 2, sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 0.3, [r["loss"] for r in rows]
    assert all(v.dtype == torch.float32 for v in _adapter(tmp_path / "sft").values())


def test_fp16_ppo_scales_both_roles_losses_and_checkpoints_the_scales(byte_llama, tmp_path):
    from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo

    prof = replace(load_profile("qlora-shared"), dtype="fp16", lora_r=8, micro_batch=4)
    s = run_ppo(PPOConfig(model=str(byte_llama), prompts=PROMPTS, out=tmp_path, profile=prof,
                          reward=f"{ASSETS / 'rewards.py'}:ascii_share", iterations=2, rollout_batch=4,
                          prompt_len=32, response_len=4, ppo_epochs=2, progress=False, save_every=1))
    rows = _rows(tmp_path / "ppo")
    assert s["nonfinite_skips"] == 0 and s["overflow_skips"] == 0 and s["skipped_iterations"] == 0
    assert all(r["loss_scale_actor"] == r["loss_scale_critic"] == 65536.0 for r in rows)
    assert all(v.dtype == torch.float32 for v in _adapter(tmp_path / "ppo").values())


def test_a_checkpoint_without_loss_scales_resumes_with_a_fresh_scale():
    """A checkpoint written before fp16 had loss scales holds no '<role>-loss-scale': restoring it
    keeps the fresh scaler (start scale 2**16) instead of failing; any other missing entry fails."""
    state = checkpoint.capture({}, {}, {}, {}, {"step": 3})
    scaler = torch.amp.GradScaler("cpu")
    assert checkpoint.restore(state, {}, {}, {"actor-loss-scale": scaler}, {}) == {"step": 3}
    assert scaler.get_scale() == 65536.0
    with pytest.raises(KeyError):
        checkpoint.restore(state, {}, {}, {"actor": torch.optim.lr_scheduler.LambdaLR(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), lambda s: 1.0)}, {})
