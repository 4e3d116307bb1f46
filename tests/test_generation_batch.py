"""PPO's generation batch (issue 15): the rollout sampled in chunks of any size holds the responses
the whole batch sampled at once holds (one random stream per row), the sampler draws from the
distribution PPO's log-probs describe, and the planner and the estimator size the chunks."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowmem_rlhf import data as D
from lowmem_rlhf.algo.experience import generate, generate_in_chunks
from lowmem_rlhf.algo.sampling import RowGumbelSampler, row_seeds
from lowmem_rlhf.config import Shape, load_all_profiles, load_profile
from lowmem_rlhf.data import bundled_path
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import load_model
from lowmem_rlhf.plan.estimator import estimate, generation_rows
from lowmem_rlhf.plan.hardware import resolve_hardware
from lowmem_rlhf.plan.model_spec import load_spec
from lowmem_rlhf.plan.planner import choose_profile, machine_profile, runnable_profiles

ASSETS = Path(__file__).parent / "assets"
PROMPTS = str(bundled_path("demo-prompts.jsonl"))


def test_chunked_generation_equals_one_batch_with_the_same_seeds(byte_llama):
    """The shipped 4-bit profile, 8 prompts of different lengths: sampled 8, 3 and 1 at a time
    with the same row seeds, the responses are the same tokens; other seeds give others."""
    prof = load_profile("qlora-shared").for_rl()
    loaded = load_model(str(byte_llama), prof, training=False)
    eng, tok = SharedBase(loaded, prof), loaded.tokenizer
    prompts = D.to_prompts(D.load_records(PROMPTS), PROMPTS)[:8]
    ids = [D.tokenize_prompt(p, tok, 200) for p in prompts]
    assert len({len(i) for i in ids}) > 1  # left padding differs between the chunks
    seeds = row_seeds(8, torch.Generator().manual_seed(0))
    whole = generate_in_chunks(eng, ids, tok, 12, 1.0, 1.0, 8, seeds=seeds)
    for chunk in (3, 1):
        part = generate_in_chunks(eng, ids, tok, 12, 1.0, 1.0, chunk, seeds=seeds)
        assert torch.equal(part.response, whole.response), chunk
        assert part.texts == whole.texts and torch.equal(part.response_mask, whole.response_mask)
    other = generate_in_chunks(eng, ids, tok, 12, 1.0, 1.0, 8, seeds=row_seeds(8, torch.Generator().manual_seed(1)))
    assert not torch.equal(other.response, whole.response)
    again = generate(eng, ids[2:3], tok, 12, 1.0, 1.0, seeds=seeds[2:3])  # one row alone: its own tokens
    assert torch.equal(again.response[0], whole.response[2])


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_the_row_sampler_draws_the_distribution_it_is_given(temperature, top_p):
    """20000 rows, each its own stream, over 6 tokens: the frequencies match softmax(z / T) (top-p:
    renormalised over the nucleus, the rest never drawn) within 4 standard errors."""
    z = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    sampler = RowGumbelSampler(row_seeds(n, torch.Generator().manual_seed(3)), temperature, top_p, torch.device("cpu"))
    picks = sampler(torch.zeros(n, 1, dtype=torch.long), z.expand(n, -1)).argmax(-1)
    p = torch.softmax(z[0] / temperature, -1)
    if top_p < 1.0:
        order = p.argsort(descending=True)
        keep = (p[order].cumsum(0) - p[order]) < top_p
        nucleus = torch.zeros_like(p, dtype=torch.bool)
        nucleus[order[keep]] = True
        p = torch.where(nucleus, p, torch.zeros_like(p))
        p = p / p.sum()
        assert not nucleus.all()
    freq = torch.bincount(picks, minlength=6).double() / n
    se = (p * (1 - p) / n).sqrt().double()
    assert ((freq - p.double()).abs() <= 4 * se + 1e-12).all(), (freq, p)


def test_ppo_with_a_generation_batch_samples_the_same_rollouts(byte_llama, tmp_path):
    """The stage at generation batch 2 (4 chunks of a rollout of 8) and at 0 (the whole rollout):
    every iteration's rewards are the same, so the rollouts were."""
    import json

    from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo

    def ppo(name, g):
        prof = machine_profile(replace(load_profile("qlora-shared"), lora_r=8, micro_batch=4, generation_batch=g))
        s = run_ppo(PPOConfig(model=str(byte_llama), prompts=PROMPTS, out=tmp_path / name, profile=prof,
                              reward=f"{ASSETS / 'rewards.py'}:ascii_share", iterations=2, rollout_batch=8,
                              prompt_len=32, response_len=6, ppo_epochs=1, progress=False))
        rows = [json.loads(x) for x in (tmp_path / name / "ppo" / "metrics.jsonl").read_text().splitlines()]
        return s, rows

    s2, chunked = ppo("chunked", 2)
    s0, whole = ppo("whole", 0)
    assert [r["generation_batch"] for r in chunked] == [2, 2] and [r["generation_batch"] for r in whole] == [8, 8]
    assert [r["reward_mean"] for r in chunked] == [r["reward_mean"] for r in whole]
    assert [r["response_length"] for r in chunked] == [r["response_length"] for r in whole]
    from safetensors.torch import (
        load_file,  # the same rollouts train the same adapters, bit for bit
    )

    for role in ("actor", "critic"):
        a, b = (load_file(str(tmp_path / n / "ppo" / role / "adapter_model.safetensors")) for n in ("chunked", "whole"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), role


def test_the_estimator_charges_one_chunk_of_kv_cache():
    spec = load_spec("llama-2-7b")
    shape = Shape(prompt_len=256, response_len=256, rollout_batch=8)
    prof = load_profile("qlora-shared")
    gen = {g: next(p for p in estimate(spec, replace(prof, generation_batch=g), "ppo", shape).phases
                   if p.name == "generation").components for g in (0, 8, 4, 1)}
    assert gen[0] == gen[8]
    kv8 = 2 * 32 * 4096 * 512 * 8 * 2  # K and V, 32 layers, 4096 wide, 512 tokens, 8 rows, bf16
    assert gen[8]["kv_cache"] == kv8 and gen[4]["kv_cache"] == kv8 // 2 and gen[1]["kv_cache"] == kv8 // 8
    assert generation_rows(replace(prof, generation_batch=16), 8) == 8


PLANS = [  # (gpu, model, the generation batch the planner picks): the goals
    ("4060-8gb", "llama-2-7b", 4),
    ("3060-12gb", "llama-2-13b", 4),
    ("3090", "llama-2-13b", 8),
]


@pytest.mark.parametrize("gpu,model,gen", PLANS, ids=[f"{g}-{m}" for g, m, _ in PLANS])
def test_four_role_ppo_fits_the_small_cards(gpu, model, gen):
    """Default PPO shape (prompt 256 + response 256, rollout 8), all four roles: before the
    generation batch, the first two were refused (generation 7.8 GiB > 7.2 usable; 12.9 > 11.2)."""
    hw = resolve_hardware(gpu=gpu, ram_gib=32)
    shape = Shape(prompt_len=256, response_len=256, rollout_batch=8)
    c = choose_profile(load_spec(model), hw, shape, runnable_profiles(load_all_profiles()), ("ppo",))
    assert c.profile.name == "qlora-shared" and c.profile.shared_base
    assert generation_rows(c.profile, 8) == gen
    e = c.estimates["ppo"]
    assert e.device <= hw.gpu.free_bytes * 0.95
    full = estimate(load_spec(model), replace(c.profile, generation_batch=0), "ppo", shape)
    assert (full.device > hw.gpu.free_bytes * 0.95) == (gen < 8)  # the generation batch is what made it fit


@pytest.mark.slow
def test_the_simulation_of_the_8gb_plan_agrees_with_the_estimate():
    """The 4060-8gb 7B plan (micro-batch 2, generation batch 4) rehearsed on meta tensors through
    the stage's own make_experience and ppo_update: every phase within 10% of the analytic figure
    (measured: +3.9% generation, +3.6% scoring, -0.4% actor, -0.4% critic), and the rehearsal's
    KV cache is one chunk's (4 of 8 rows)."""
    from lowmem_rlhf.measure.simulate import simulate
    from lowmem_rlhf.plan.estimator import kv_cache_bytes

    prof = replace(load_profile("qlora-shared"), micro_batch=2, generation_batch=4)
    shape = Shape(prompt_len=256, response_len=256, rollout_batch=8)
    sim = simulate("llama-2-7b", prof, "ppo", shape)
    assert [p.name for p in sim.phases] == ["generation", "scoring", "actor_update", "critic_update"]
    for ph in sim.phases:
        assert abs(ph.drift) <= 0.10, (ph.name, ph.drift)
    kv4 = kv_cache_bytes(load_spec("llama-2-7b"), prof.for_rl(), 4, 512)
    assert sim.kv_cache == pytest.approx(kv4, rel=0.05)


def test_static_kv_cache_samples_the_same_rollout(byte_llama):
    """Issue 17: the profile knob static_cache (transformers' preallocated KV cache, the path
    torch.compile needs on a GPU) samples the very tokens of the dynamic cache, with the same
    kept log-probs (fp32, the same seeds, chunked or not)."""
    from dataclasses import replace

    from lowmem_rlhf.algo.experience import generate_in_chunks
    from lowmem_rlhf.config import load_profile
    from lowmem_rlhf.model.adapters import SharedBase
    from lowmem_rlhf.model.loading import load_model

    out = {}
    for static in (False, True):
        prof = replace(load_profile("lora-bf16-shared"), dtype="fp32", lora_r=8, lora_dropout=0.0, static_cache=static)
        eng = SharedBase(load_model(str(byte_llama), prof), prof)
        eng.add_adapter("actor")
        prompts = [list(range(3, 3 + n)) for n in (4, 9, 6)]
        out[static] = generate_in_chunks(eng, prompts, eng.loaded.tokenizer, 10, 1.0, 1.0, 2, seeds=[5, 6, 7],
                                         record=True)
    assert torch.equal(out[True].seqs, out[False].seqs) and torch.equal(out[True].mask, out[False].mask)
    assert out[True].response_mask.sum() > 10
    assert (out[True].logprobs - out[False].logprobs).abs().max() < 1e-5
