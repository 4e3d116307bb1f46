"""The planner picks the first profile in which every stage fits, or says which knob to change."""

from __future__ import annotations

from dataclasses import replace

from lowmem_rlhf.config import Shape, load_all_profiles
from lowmem_rlhf.plan.estimator import GIB, ddp_bucket_bytes
from lowmem_rlhf.plan.hardware import resolve_hardware
from lowmem_rlhf.plan.model_spec import load_spec
from lowmem_rlhf.plan.planner import SAFETY_MARGIN, advice, choose_profile, plan


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


def test_a_cpu_puts_at_most_512_tokens_in_an_sft_or_rm_forward():
    """On a CPU the SFT/RM micro-batch starts where a forward holds at most 512 tokens (an RM
    example is a pair, two sequences): at 256 tokens SFT 2, RM 1 pair; at 128, SFT 4 (the
    profile's), RM 2. The estimate is made at that micro-batch, the reason says why. A GPU keeps
    the profile's 4, and so does a plan with an RL stage (`auto`'s one profile for its stages)."""
    for seq, want in ((256, {"sft": 2, "rm": 1}), (128, {"sft": 4, "rm": 2})):
        shape = Shape(seq_len=seq, batch=8)
        for stage, mb in want.items():
            c = _plan("smollm2-135m", stages=(stage,), shape=shape, ram_gib=16).chosen
            assert c.profile.micro_batch == mb, (seq, stage, c.profile.micro_batch)
            assert c.grad_accum == 8 // mb
            assert ("512 tokens per forward" in c.reason) == (mb < 4), c.reason
    gpu = _plan("smollm2-135m", stages=("rm",), shape=Shape(seq_len=256, batch=8), gpu="3090").chosen
    assert gpu.profile.micro_batch == 4
    joint = _plan("smollm2-135m", stages=("sft", "rm", "grpo"), shape=Shape(seq_len=256, batch=8), ram_gib=16).chosen
    assert joint.profile.micro_batch == 4
    one = _plan("smollm2-135m", stages=("rm",), shape=Shape(seq_len=256, batch=8), ram_gib=16).chosen
    four = _plan("smollm2-135m", stages=("rm",), shape=Shape(seq_len=64, batch=8), ram_gib=16).chosen
    # the estimate follows: 1 pair x 256 holds the activations of 4 pairs x 64
    assert one.estimates["rm"].components["activations"] == four.estimates["rm"].components["activations"]


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


def test_plan_and_every_stage_pick_the_same_profile():
    """Issue 17: `lowmem-rlhf plan --stages S` and stage S without --profile (`cli._stage_profile`,
    i.e. `choose_profile`) name the same profile for the same machine and shape. A profile the
    stages do not run (full-bf16) may fit and is listed, never chosen: `plan --stages ppo` on a
    CPU used to name full-bf16 while `ppo` ran lora-bf16-shared."""
    import json

    from typer.testing import CliRunner

    from lowmem_rlhf.cli import _stage_profile, app

    shape = ["--seq-len", "512", "--batch", "16", "--prompt-len", "128", "--response-len", "32", "--rollout-batch", "8"]
    seen = set()
    for model, gpu in (("smollm2-135m", None), ("llama-2-7b", "3090"), ("llama-2-7b", "4060-8gb")):
        for stage in ("sft", "rm", "ppo", "grpo"):
            algo = ["--algo", stage, "--stages", "ppo"] if stage in ("ppo", "grpo") else ["--stages", stage]
            r = CliRunner().invoke(app, ["plan", "--model", model, *(["--gpu", gpu] if gpu else []), *shape, *algo,
                                         "--json"])
            assert r.exit_code == 0, r.output
            planned = json.loads(r.output)
            sh = Shape(seq_len=512, batch=16, prompt_len=128, response_len=32, rollout_batch=8)
            if model == "smollm2-135m":  # the stage's own path, model loading included
                picked = _stage_profile(None, model, stage, sh, gpu)
            else:  # a planning preset, no weights to load: what _stage_profile calls once it has the spec
                picked = choose_profile(load_spec(model), resolve_hardware(gpu=gpu), sh, load_all_profiles(),
                                        (stage,)).profile
            assert planned["chosen"]["profile"] == picked.name, (model, gpu, stage)
            assert planned["chosen"]["micro_batch"] == picked.micro_batch, (model, gpu, stage)
            seen.add(picked.name)
            if gpu is None:  # the CPU: full-bf16 fits and is ranked first, but is estimated only
                full = [c for c in planned["candidates"] if c["profile"] == "full-bf16"]
                assert full and full[0]["fits"] and "estimated only" in full[0]["reason"]
    assert len(seen) >= 2  # the machines differ enough to pick different profiles


def test_data_parallel_plans_per_gpu_with_the_node_ram_shared():
    """--nproc N: each GPU's estimate is one card's (data parallel replicates the base), while the
    node's CPU RAM is split N ways: on a 24 GiB CPU node one process of llama-2-7b runs
    lora-bf16-shared (16.5 GiB), two processes get 12 GiB each and fall back to the 4-bit base."""
    one = plan(load_spec("llama-2-7b"), resolve_hardware(gpu="3090", ram_gib=64), Shape(), load_all_profiles(),
               ("sft", "rm", "ppo"))
    two = plan(load_spec("llama-2-7b"), resolve_hardware(gpu="3090", ram_gib=64), Shape(), load_all_profiles(),
               ("sft", "rm", "ppo"), processes=2)
    assert two.chosen.profile.name == one.chosen.profile.name
    for s, e in two.chosen.estimates.items():  # one card's peak, plus DDP's gradient buckets
        bucket = ddp_bucket_bytes(two.spec, two.chosen.profile, s)
        assert bucket > 0
        assert e.allocated == one.chosen.estimates[s].allocated + bucket
    assert two.hardware.cpu_ram_free_bytes == one.hardware.cpu_ram_free_bytes // 2
    d = two.to_dict()
    assert d["processes"] == 2 and d["global_batch"] == 2 * Shape().batch
    node = replace(resolve_hardware(ram_gib=24), cpu_bf16=True)  # a CPU with bf16 (an fp32 7B base needs 25 GiB)
    cpu = [plan(load_spec("llama-2-7b"), node, Shape(), load_all_profiles(), ("sft",),
                processes=n).chosen for n in (1, 2)]
    assert cpu[0].estimates["sft"].cpu_ram > 12 * GIB
    assert cpu[1].profile.name != cpu[0].profile.name and cpu[1].estimates["sft"].cpu_ram <= 12 * GIB


def test_a_cpu_without_fast_bf16_computes_in_fp32_counted_at_4_bytes():
    """Without oneDNN's bf16 path torch emulates bf16 on a CPU about 25x slower than fp32 (measured:
    SmolLM2 SFT at 84 s/step in bf16, 5.3 s/step in fp32; docs/speed.md): a CPU plan computes in
    fp32 there, and counts its 16-bit base's weights at 4 bytes each."""
    spec, hw = load_spec("smollm2-135m"), resolve_hardware(ram_gib=16)
    fast = plan(spec, replace(hw, cpu_bf16=True), Shape(), load_all_profiles(), ("sft",)).chosen
    slow = plan(spec, replace(hw, cpu_bf16=False), Shape(), load_all_profiles(), ("sft",)).chosen
    assert fast.profile.name == slow.profile.name and fast.profile.quant == "none"
    assert fast.profile.dtype == "bf16" and "bf16" not in fast.reason
    assert slow.profile.dtype == "fp32" and "no fast bf16" in slow.reason
    assert slow.estimates["sft"].components["weights"] == 2 * fast.estimates["sft"].components["weights"]
    assert "fp32: no fast bf16" in replace(hw, cpu_bf16=False).describe()
    assert resolve_hardware(gpu="3090").cpu_bf16  # a GPU plan never asks the CPU


def test_a_named_bf16_profile_runs_in_fp32_on_a_cpu_without_fast_bf16(capsys):
    """`--profile lora-bf16-shared` on a CPU without fast bf16: the stage computes in fp32 and the
    CLI says so; on a CPU with it (or a GPU), the profile is kept as named."""
    import torch

    from lowmem_rlhf.cli import _stage_profile
    from lowmem_rlhf.plan.hardware import cpu_native_bf16

    prof = _stage_profile("lora-bf16-shared", None, "sft", Shape(), None)
    emulated = not torch.cuda.is_available() and not cpu_native_bf16()
    assert prof.name == "lora-bf16-shared" and prof.dtype == ("fp32" if emulated else "bf16")
    assert ("the stage computes in fp32" in capsys.readouterr().out) == emulated


def test_grpo_with_a_reward_model_is_planned_with_its_adapter_and_head():
    """`grpo --reward-model` plans the stage alone: the RM's adapter and head are in its estimate
    (exactly the stage's own `estimate(..., reward_model=True)`), and a plan without one has the
    actor's adapter only, as GRPO on a program reward runs."""
    from lowmem_rlhf.plan.estimator import estimate

    spec, hw = load_spec("llama-2-7b"), resolve_hardware(gpu="3090")
    shape = Shape(prompt_len=256, response_len=256, rollout_batch=8)
    alone = choose_profile(spec, hw, shape, load_all_profiles(), ("grpo",))
    scored = choose_profile(spec, hw, shape, load_all_profiles(), ("grpo",), reward_model=True)
    a, s = alone.estimates["grpo"], scored.estimates["grpo"]
    assert s.components["adapters"] == 2 * a.components["adapters"] > 0
    assert s.components["heads"] > a.components["heads"] == 0
    assert s.device > a.device
    same = estimate(spec, scored.profile, "grpo", shape, target="cuda", reward_model=True)
    assert same.device == s.device and same.components == s.components


def test_the_grpo_cli_plans_with_its_reward_model(smollm2):
    """Through the CLI's own path (`_stage_profile`, as `lowmem-rlhf grpo --reward-model` calls it):
    on a card cap between the two plans' needs, the pick is the one that counts the RM."""
    from lowmem_rlhf.cli import _stage_profile

    spec, shape = load_spec(str(smollm2)), Shape(prompt_len=256, response_len=256, rollout_batch=8)

    def pick(cap, rm):
        chosen = plan(spec, resolve_hardware(gpu="3090", max_vram_gib=cap), shape, load_all_profiles(), ("grpo",),
                      reward_model=rm).chosen
        return chosen and chosen.profile

    caps = [round(0.30 + 0.01 * i, 2) for i in range(300)]
    cap = next(c for c in caps if None is not pick(c, True) != pick(c, False))  # the RM changes the pick here
    got = _stage_profile(None, str(smollm2), "grpo", shape, "3090", max_vram=cap, reward_model=True)
    assert got == pick(cap, True) != pick(cap, False)
