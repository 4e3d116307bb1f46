"""The shared pieces the reshaped code rests on: one optimizer step for every stage, the stages'
own step functions inside the simulation, plain progress lines off a terminal, one exit code when
nothing fits, and ZeRO-3 only where deepspeed is installed."""

from __future__ import annotations

import io
import sys
import time

import pytest
import torch

from lowmem_rlhf.config import Profile, Shape, load_all_profiles, load_profile
from lowmem_rlhf.errors import NoFit, UserError
from lowmem_rlhf.plan.hardware import resolve_hardware
from lowmem_rlhf.plan.model_spec import load_spec
from lowmem_rlhf.plan.planner import choose_profile, plan
from lowmem_rlhf.runtime.optim import optimizer_step, warmup_cosine
from lowmem_rlhf.runtime.runs import PlainProgress


def test_optimizer_step_clips_steps_schedules_and_zeroes():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=0)
    w.grad = torch.full((4,), 3.0)  # norm 6 -> clipped to 1: each entry 0.5
    norm = optimizer_step(opt, [w], sched, max_norm=1.0)
    assert float(norm) == pytest.approx(6.0)
    assert torch.allclose(w.detach(), torch.full((4,), 0.5))
    assert w.grad is None
    assert sched.get_last_lr()[0] < 1.0  # the schedule advanced with the step


def test_simulation_runs_the_stages_own_step_functions(tiny_llama, monkeypatch):
    """Each rehearsed stage calls the functions the stage calls (no copies in simulate.py)."""
    from lowmem_rlhf.algo import experience, grpo, pairwise, ppo, supervised
    from lowmem_rlhf.measure.simulate import build_meta_model, rehearse
    from lowmem_rlhf.runtime import optim

    calls: list[str] = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*a, **k):
            calls.append(name)
            return real(*a, **k)

        monkeypatch.setattr(module, name, wrapper)

    for module, name in [(supervised, "completion_loss"), (pairwise, "pair_scores"), (pairwise, "pair_loss"),
                         (experience, "make_experience"), (ppo, "ppo_update"), (optim, "optimizer_step"),
                         (grpo, "make_group_experience"), (grpo, "group_update")]:
        spy(module, name)
    monkeypatch.setattr(ppo, "optimizer_step", optim.optimizer_step)  # ppo imported the name itself
    prof = Profile(quant="none", dtype="bf16", lora_r=8, grad_ckpt=False, optimizer="adamw", micro_batch=2)
    small = Shape(seq_len=32, prompt_len=16, response_len=4, rollout_batch=2)
    for stage, expected in [("sft", {"completion_loss", "optimizer_step"}),
                            ("rm", {"pair_scores", "pair_loss", "optimizer_step"}),
                            ("ppo", {"make_experience", "ppo_update", "optimizer_step"}),
                            ("grpo", {"make_group_experience", "group_update", "optimizer_step"})]:
        calls.clear()
        phases, _, _ = rehearse(build_meta_model(str(tiny_llama), prof), prof, stage, small, attention_op="cpu")
        assert expected <= set(calls), (stage, calls)
        assert all(ph.peak > 0 for ph in phases.values())


def test_plain_progress_lines_when_output_is_not_a_terminal():
    out = io.StringIO()
    bar = PlainProgress(total=4, desc="SFT", every=0.0, stream=out)
    bar.update(1)
    bar.set_postfix({"loss": "1.500"})
    bar.update(1)
    bar.close()  # the count was just shown: no repeated line
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("SFT: 1/4 steps (25%)")
    assert lines[1].startswith("SFT: 2/4 steps (50%)") and lines[1].endswith("loss=1.500")
    assert len(lines) == 2
    out = io.StringIO()
    bar = PlainProgress(total=4, desc="RM", every=0.05, stream=out)
    bar.update(3)  # sooner than `every`: quiet
    assert out.getvalue() == ""
    time.sleep(0.06)
    bar.close()  # long enough to report, and 3/4 was never shown
    assert out.getvalue().startswith("RM: 3/4 steps (75%)")
    out = io.StringIO()
    PlainProgress(total=4, desc="PPO", every=30.0, stream=out).close()  # short work: no line at all
    assert out.getvalue() == ""


def test_plain_progress_speaks_during_a_long_step():
    """A step longer than `every` still prints a line every `every` seconds (issue 17: an SFT step
    on a CPU took minutes and nothing showed in a log)."""
    out = io.StringIO()
    bar = PlainProgress(total=3, desc="SFT", every=0.2, stream=out)
    bar.update(1)  # sooner than `every`: quiet
    time.sleep(0.7)  # the second step runs long
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and lines[0].startswith("SFT: 1/3 steps (33%)"), lines
    assert all(x.endswith("step 2 running") for x in lines), lines


def test_nothing_fits_is_exit_code_1_from_the_planner_and_the_stages():
    spec, hw = load_spec("llama-2-13b"), resolve_hardware(vram_gib=4)
    with pytest.raises(NoFit) as e:
        choose_profile(spec, hw, Shape(), load_all_profiles(), ("sft",))
    assert e.value.exit_code == 1 and "no profile fits" in str(e.value)


def test_without_deepspeed_zero3_is_not_planned_and_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # find_spec then reports it missing
    p = plan(load_spec("llama-2-13b"), resolve_hardware(vram_gib=6, ram_gib=64), Shape(),
             load_all_profiles(), ("sft", "rm"))
    z3 = next(c for c in p.candidates if c.profile.name == "zero3-offload")
    assert not z3.fits and "lowmem-rlhf[zero3]" in z3.reason
    from lowmem_rlhf.cli import _stage_profile

    with pytest.raises(UserError, match=r"zero3-offload: ZeRO-3 offload needs deepspeed.*lowmem-rlhf\[zero3\]"):
        _stage_profile("zero3-offload", None, "sft", Shape(), None)
    assert load_profile("zero3-offload").offload == "zero3"  # estimating still works without it


def test_run_folders_of_the_previous_version_still_resume(tmp_path):
    """config.json / auto.json written before Profile.grad_accum and auto's sft_len/rm_len were
    dropped: --resume reads them (and still refuses a real change of settings)."""
    import json
    from dataclasses import asdict

    from lowmem_rlhf.config import SFTConfig
    from lowmem_rlhf.runtime.runs import check_resume_config
    from lowmem_rlhf.stages.auto import load_auto_config

    cfg = SFTConfig(data="x", out=tmp_path, profile=load_profile("qlora-shared"))
    saved = json.loads(json.dumps(asdict(cfg), default=str))
    saved["profile"]["grad_accum"] = 4
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resume_config(tmp_path, cfg)
    saved["profile"]["lora_r"] = 8
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="profile.lora_r=8, now 16"):
        check_resume_config(tmp_path, cfg)
    old_auto = {"model": None, "out": str(tmp_path), "profile": {**saved["profile"], "lora_r": 16},
                "sft_len": 96, "rm_len": 96, "sft_steps": 3}
    (tmp_path / "auto.json").write_text(json.dumps(old_auto))
    a = load_auto_config(tmp_path)
    assert a.seq_len == 96 and a.sft_steps == 3 and a.profile.lora_r == 16
    # knobs newer than the file: what that run did (1 answer per prompt, 2 epochs, KL 0.05 in the
    # reward, whitened, the RM a reward)
    assert (a.samples_per_prompt, a.ppo_epochs, a.kl_coef, a.kl_penalty, a.whiten, a.rm_reward) == \
        (1, 2, 0.05, "reward", True, True)


def test_resume_of_a_run_older_than_a_knob_compares_with_its_default(tmp_path):
    """A PPO config.json written before --samples-per-prompt existed: that run drew 1 answer per
    prompt, so resuming with the default continues it, and resuming with 4 is refused."""
    import json
    from dataclasses import asdict, replace

    from lowmem_rlhf.config import PPOConfig
    from lowmem_rlhf.runtime.runs import check_resume_config

    cfg = PPOConfig(prompts="x", out=tmp_path, profile=load_profile("qlora-shared"))
    saved = json.loads(json.dumps(asdict(cfg), default=str))
    del saved["samples_per_prompt"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_resume_config(tmp_path, cfg)
    with pytest.raises(UserError, match="samples_per_prompt=1, now 4"):
        check_resume_config(tmp_path, replace(cfg, samples_per_prompt=4))
