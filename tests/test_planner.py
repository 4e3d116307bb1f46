"""The planner picks the first profile in which every stage fits, or says which knob to change."""

from __future__ import annotations

from lowmem_rlhf.config import Shape, load_all_profiles
from lowmem_rlhf.plan.estimator import GIB
from lowmem_rlhf.plan.hardware import resolve_hardware
from lowmem_rlhf.plan.model_spec import load_spec
from lowmem_rlhf.plan.planner import SAFETY_MARGIN, advice, plan


def _plan(model, stages=("sft", "rm", "ppo"), shape=None, **hw):
    return plan(load_spec(model), resolve_hardware(**hw), shape or Shape(), load_all_profiles(), stages)


def test_7b_on_3090_fits_every_stage_with_ppo_on_a_shared_base():
    p = _plan("llama-2-7b", gpu="3090")
    c = p.chosen
    assert c is not None and set(c.estimates) == {"sft", "rm", "ppo"}
    budget = p.hardware.gpu.total_bytes * (1 - SAFETY_MARGIN)
    assert all(e.device <= budget for e in c.estimates.values())
    assert c.profile.shared_base and c.profile.lora_r > 0
    ppo_weights = c.estimates["ppo"].phases[0].components["weights"]
    assert ppo_weights == c.estimates["sft"].components["weights"]  # one base, not four
    assert p.candidates[0].profile.name == "full-bf16" and not p.candidates[0].fits


def test_7b_on_3060_needs_4bit():
    c = _plan("llama-2-7b", gpu="3060-12gb").chosen
    assert c is not None and c.profile.quant == "nf4"


def test_13b_on_4090():
    p = _plan("llama-2-13b", gpu="4090")
    assert p.chosen is not None and p.chosen.profile.name == "qlora-shared"


def test_too_little_memory_names_the_knob():
    p = _plan("llama-2-13b", vram_gib=4)
    assert p.chosen is None
    msg = advice(p)
    assert "qlora-shared" in msg and "GiB short" in msg and ("--gpu" in msg or "--response-len" in msg)


def test_micro_batch_is_lowered_before_giving_up():
    # a budget between the micro-batch-1 and micro-batch-4 needs of qlora-shared PPO
    spec, shape = load_spec("llama-2-7b"), Shape(rollout_batch=8, seq_len=2048, batch=16)
    wide = _plan("llama-2-7b", shape=shape, vram_gib=9, stages=("sft",))
    c = wide.chosen
    assert c is not None and c.profile.micro_batch < 4 and c.grad_accum * c.profile.micro_batch >= 16
    del spec


def test_no_bf16_gpu_gets_fp16():
    c = _plan("llama-2-7b", gpu="t4").chosen
    assert c is not None and c.profile.dtype == "fp16" and "fp16" in c.reason


def test_cpu_planning_uses_ram():
    p = _plan("smollm2-135m", ram_gib=16)
    assert p.target == "cpu" and p.chosen is not None
    assert all(e.target == "cpu" for e in p.chosen.estimates.values())
    assert any("ZeRO-3" in c.reason for c in p.candidates) or p.chosen.profile.rank < 40


def test_zero3_only_where_it_is_the_best_fit():
    # 13B SFT+RM on a 6 GiB card: 4-bit does not fit, 16-bit weights streamed from 64 GiB RAM do
    p = _plan("llama-2-13b", stages=("sft", "rm"), vram_gib=6, ram_gib=64)
    assert p.chosen is not None and p.chosen.profile.name == "zero3-offload"
    assert p.chosen.estimates["sft"].cpu_ram > 24 * GIB
    # the same with little RAM: refused, naming the RAM needed
    p = _plan("llama-2-13b", stages=("sft", "rm"), vram_gib=6, ram_gib=16)
    z = next(c for c in p.candidates if c.profile.name == "zero3-offload")
    assert not z.fits and "CPU RAM" in z.reason
    # and never for PPO
    p = _plan("llama-2-13b", vram_gib=6, ram_gib=64)
    z = next(c for c in p.candidates if c.profile.name == "zero3-offload")
    assert not z.fits and "PPO" in z.reason
