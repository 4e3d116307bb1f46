"""PPO on the shared base, programmatic rewards, export: real tiny models on CPU."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lowmem_rlhf.algo import ppo_math as M
from lowmem_rlhf.algo.experience import response_mask
from lowmem_rlhf.algo.rewards import python_command
from lowmem_rlhf.algo.roles import attach_roles
from lowmem_rlhf.config import load_profile
from lowmem_rlhf.data import bundled_path
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import load_model
from lowmem_rlhf.plan.planner import machine_profile
from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo
from lowmem_rlhf.stages.rm import RMConfig, run_rm

ASSETS = Path(__file__).parent / "assets"
REWARDS = ASSETS / "rewards.py"
PROMPTS = str(bundled_path("demo-prompts.jsonl"))
HH = str(bundled_path("hh-rlhf-harmless-base-test-600.jsonl.gz"))


@pytest.fixture(scope="module")
def byte_llama(tmp_path_factory):
    """Tiny Llama whose vocabulary is exactly the byte tokenizer's: every sample decodes to text.
    initializer_range 0.2: at the default 0.02 the final norm and a near-zero output layer cap the
    logits so tightly that adapters in the decoder layers can hardly move the distribution."""
    from lowmem_rlhf.model.random_models import save_random, tiny_llama_config

    cfg = tiny_llama_config()
    cfg.vocab_size = 260
    cfg.initializer_range = 0.2
    return save_random(cfg, tmp_path_factory.mktemp("byte-llama"))


def _cfg(model, out, profile="qlora-shared", as_shipped=False, **kw):
    """The shipped profile's dropout (0.05) and checkpointing, PPOConfig's KL coefficient (0.05):
    only the LoRA rank, the micro-batch and the learning rate are the test's. The profile computes
    as this machine runs it (`machine_profile`: fp32 on a CPU without fast bf16); `as_shipped`
    keeps the profile's own dtype (bf16)."""
    prof = replace(load_profile(profile), lora_r=8, micro_batch=16, learning_rate=kw.pop("lr", 1e-2))
    prof = prof if as_shipped else machine_profile(prof)
    base = dict(model=str(model), prompts=PROMPTS, out=out, profile=prof, iterations=8, rollout_batch=16,
                prompt_len=48, response_len=2, ppo_epochs=4, progress=False)
    base.update(kw)
    return PPOConfig(**base)


def _rewards(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return [r["reward_mean"] for r in rows if not r.get("skipped")]


def test_lr_schedule_runs_through_the_optimizer_step(byte_llama, tmp_path):
    """--lr-schedule cosine: the actor's learning rate warms up then decays over the run's optimizer
    steps (iterations x epochs); the default keeps it constant."""
    def lrs(out, **kw):  # 4 rows: the schedule counts optimizer steps, not rows
        run_ppo(_cfg(byte_llama, out, reward=f"{REWARDS}:ascii_share", iterations=3, ppo_epochs=2, rollout_batch=4,
                     **kw))
        return [json.loads(x)["lr"] for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]

    constant = lrs(tmp_path / "constant")
    assert constant == [1e-2] * 3
    cosine = lrs(tmp_path / "cosine", lr_schedule="cosine")
    assert cosine[0] < 1e-2 and cosine[-1] < cosine[0], cosine  # 6 steps: no warmup, cosine decay


def test_response_mask_stops_after_first_eos():
    resp = torch.tensor([[5, 6, 2, 2, 2], [5, 5, 5, 5, 5], [2, 7, 2, 8, 9]])
    assert response_mask(resp, 2).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("profile,lr,kl", [("qlora-shared", 3e-3, {}),
                                           ("qlora-shared", 6e-3, {"kl_penalty": "loss", "whiten_advantages": False})],
                         ids=["qlora-shared", "qlora-shared-kl-in-loss-not-whitened"])
def test_programmatic_reward_rises_and_base_is_untouched(byte_llama, tmp_path, profile, lr, kl):
    """(The 4-bit profile only since issue 16: the lora-bf16-shared case, 80-120 s, went to keep the
    suite under 25 minutes when GRPO's learning test came; lora-bf16-shared PPO still trains in
    tests/test_ppo_exact.py and the SmolLM2 demo runs with it.) The trained policy's reward over the last 3 of 8 iterations beats, by 0.2, that of a control
    run at learning rate 0 with the same prompts and the same per-row random streams (common
    random numbers: the difference is the learning, not the draws). Measured (4-bit, seeds 0-2):
    trained 0.94, 0.77, 0.94; control 0.49, 0.56, 0.51. (The test compared the first 3 iterations
    with the last 3 before; iterations 2-3 already learn, and a faster start at seed 0 with the
    per-row sampler left 0.80 -> 0.82: a window, not a regression; the old sampler gave +0.25 to
    +0.27 there.) The second case is the demo's PPO (`auto`): the KL as a k3 term of the actor's
    loss, advantages not whitened, so its steps are the reward's size, not unit-sized, and it runs
    at lr 6e-3. Measured (last 3, trained vs control): bf16 0.80 vs 0.49, fp32 0.94 vs 0.53; at lr
    3e-3 bf16 0.72 vs 0.49 (a margin of 0.23: too near the bound); at 1e-2 bf16 fell to 0.17."""
    s = run_ppo(_cfg(byte_llama, tmp_path, profile, reward=f"{REWARDS}:ascii_share", iterations=8, lr=lr, **kl))
    r = _rewards(tmp_path)
    run_ppo(_cfg(byte_llama, tmp_path / "control", profile, reward=f"{REWARDS}:ascii_share", iterations=8, lr=0.0,
                 **kl))
    control = _rewards(tmp_path / "control")
    assert len(r) == len(control) == 8 and r[0] == control[0]  # the same first rollout: the same draws
    assert sum(r[-3:]) / 3 > sum(control[-3:]) / 3 + 0.2, (r, control)
    assert s["base_sha256_before"] == s["base_sha256_after"]
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    for key in ("kl", "policy_loss", "value_loss", "clip_frac", "approx_kl", "response_length",
                "seconds_generation", "tokens_per_s_generation", "peak_actor_update_cpu_ram",
                "est_generation_cpu_ram"):
        assert key in rows[-1], key
    assert (tmp_path / "ppo" / "ppo.png").stat().st_size > 10_000
    assert {"actor", "critic", "summary.json", "metrics.jsonl"} <= {p.name for p in (tmp_path / "ppo").iterdir()}


def _kls(run: Path) -> list[float]:
    return [json.loads(x)["kl"] for x in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_large_kl_coefficient_holds_the_policy_near_the_reference(byte_llama, tmp_path):
    """Same reward, seed and steps: without the penalty the policy ends (mean of the last 3
    iterations) more than BOUND nats per response from the reference; with --kl-coef 1 it ends
    below, and over the whole run it drifts at most 0.7x as far (sum of the per-iteration KLs).
    Measured (2 cores), per iteration: free 0, 1.92, 2.57, 8.71, 6.64, 10.79, 9.68, 8.14;
    held 0, 1.92, 1.51, 3.24, 3.26, 3.70, 6.41, 4.95 (ratio of sums 0.51; the CI machine's earlier
    run: last 3 at 7.9 and 4.9). The penalty acts through the rollout's KL, which is 0 until the
    policy has moved, so iteration 2 is the same in both; --kl-coef 3 and 10 gave sums of 25.1 and
    22.9: with whitened advantages a larger coefficient reorders the samples but does not make
    the step larger, and at this learning rate each update adds about 1-2 nats of its own.
    The profile keeps its bf16 compute on every CPU: in fp32 (an AVX-512 CPU, 2026-12-01) the
    same run gave free 0, 2.51, 3.19, 4.25, 4.71, 5.41, 5.39, 6.46 (last 3: 5.75) and held 0, 2.51,
    4.17, 3.84, 3.01, 3.21, 2.97, 3.86 (3.35; ratio of sums 0.74), and at lr 5e-3 the held run
    drifted further than the free one (last 3: 9.32 vs 8.66). The penalty's effect at this size
    is a few nats in a noisy run, and the bound above is bf16's."""
    bound = 6.5

    def end_kl(name, kl_coef):
        run_ppo(_cfg(byte_llama, tmp_path / name, reward=f"{REWARDS}:ascii_share", kl_coef=kl_coef, lr=3e-3,
                     as_shipped=True))
        kls = _kls(tmp_path / name)
        return sum(kls[-3:]) / 3, kls

    free, free_all = end_kl("free", 0.0)
    held, held_all = end_kl("held", 1.0)
    assert free > bound, free_all
    assert held < bound, held_all
    assert sum(held_all) < 0.7 * sum(free_all), (held_all, free_all)


def test_reward_command(byte_llama, tmp_path):
    """PPO with an evaluator process as its only reward (4 rows, 1 epoch: the reward path, not learning)."""
    s = run_ppo(_cfg(byte_llama, tmp_path, reward_cmd=python_command(REWARDS), iterations=2, rollout_batch=4,
                     ppo_epochs=1))
    assert s["skipped_iterations"] == 0 and len(_rewards(tmp_path)) == 2


def test_samples_per_prompt_puts_each_prompt_k_times_in_a_rollout(byte_llama, tmp_path, monkeypatch):
    """--samples-per-prompt 4 with --rollout-batch 16: the reward sees 4 prompts, each 4 times in a
    row, and the next rollout draws 4 new ones (epoch order, no repeats within the 8 prompts)."""
    record = tmp_path / "prompts.jsonl"
    monkeypatch.setenv("RECORD_PROMPTS", str(record))
    run_ppo(_cfg(byte_llama, tmp_path / "run", reward=f"{REWARDS}:record_prompts", iterations=2, ppo_epochs=1,
                 samples_per_prompt=4))
    calls = [json.loads(x) for x in record.read_text().splitlines()]
    assert [len(c) for c in calls] == [16, 16]
    groups = [c[i: i + 4] for c in calls for i in range(0, 16, 4)]
    assert all(len(set(g)) == 1 for g in groups), groups
    assert len({g[0] for g in groups}) == 8  # 8 distinct prompts over the two rollouts
    with pytest.raises(UserError, match="--samples-per-prompt 3 must divide --rollout-batch 16: use --rollout-batch 15"):
        run_ppo(_cfg(byte_llama, tmp_path / "bad", reward=f"{REWARDS}:ascii_share", samples_per_prompt=3))
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kw,needle", [
    (dict(reward=f"{REWARDS}:raises"), "raised ValueError: checker crashed on sample"),
    (dict(reward=f"{REWARDS}:nan"), "returned nan for sample 0"),
    (dict(reward=f"{REWARDS}:wrong_count"), "returned 1 scores for 16 responses"),
    (dict(reward_cmd=python_command(REWARDS) + " hang", reward_timeout=2), "timed out after 2 s"),
])
def test_failing_reward_skips_the_step_and_never_trains(byte_llama, tmp_path, kw, needle):
    with pytest.raises(UserError, match="every PPO iteration was skipped"):
        run_ppo(_cfg(byte_llama, tmp_path, iterations=2, **kw))
    assert not (tmp_path / "ppo").exists() and not list(tmp_path.glob(".ppo.partial*"))


def test_failing_reward_is_reported_with_the_sample(byte_llama, tmp_path, capsys):
    """One bad batch among good ones: that iteration is skipped and logged, the rest trains."""
    flaky = tmp_path / "flaky.py"
    flaky.write_text("calls = [0]\n"
                     "def f(prompts, responses):\n"
                     "    calls[0] += 1\n"
                     "    if calls[0] == 2:\n"
                     "        return [float('inf')] * len(responses)\n"
                     "    return [0.5] * len(responses)\n")
    s = run_ppo(_cfg(byte_llama, tmp_path / "run", reward=f"{flaky}:f", iterations=3))
    assert s["skipped_iterations"] == 1
    rows = [json.loads(x) for x in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["skipped"] and "returned inf for sample 0" in rows[1]["reason"]
    assert "iteration 2 skipped" in capsys.readouterr().out


def test_critic_starts_as_the_trained_reward_model(tiny_llama, tmp_path):
    prof = machine_profile(replace(load_profile("qlora-shared"), lora_r=8, micro_batch=4, learning_rate=1e-2))
    run_rm(RMConfig(model=str(tiny_llama), data=HH, out=tmp_path, profile=prof, max_len=48, batch=4,
                    max_steps=2, max_pairs=20, progress=False))
    eng = SharedBase(load_model(str(tiny_llama), prof), prof, seed=123)
    attach_roles(eng, tmp_path / "rm" / "adapter")
    head = {n.split("modules_to_save.")[1].split(".")[0]: p for n, p in eng.model.named_parameters()
            if "score.modules_to_save" in n}
    assert torch.equal(head["critic"], head["reward"])  # value head = trained reward head
    eng.use("critic")  # peft freezes inactive adapters; the active critic trains, head included
    assert head["critic"].requires_grad and all(p.requires_grad for p in eng.parameters_of("critic"))
    ids = torch.randint(4, 250, (2, 9))
    am = torch.ones_like(ids)
    eng.model.eval()
    with torch.no_grad():
        eng.use("reward")
        r = eng.scalar(eng.hidden_states(ids, am)[:, -1])
        eng.use("critic")
        v = eng.scalar(eng.hidden_states(ids, am)[:, -1])
    assert torch.equal(r, v)

    # without a reward model the critic is fresh: its head starts at 0 (values 0, no random baseline)
    fresh = SharedBase(load_model(str(tiny_llama), prof), prof, seed=123)
    attach_roles(fresh, None)
    fresh.use("critic")
    assert not fresh.model.base_model.model.score.modules_to_save["critic"].weight.any()
    assert fresh.model.base_model.model.score.original_module.weight.abs().sum() > 0  # the RM stage's init

    # reward model + program: PPO's score is the weighted sum (--reward-weights 1,2), each part kept
    from lowmem_rlhf.algo.experience import Rollout, make_experience
    from lowmem_rlhf.algo.pairwise import last_token_scores
    from lowmem_rlhf.algo.rewards import RewardSet
    from lowmem_rlhf.algo.roles import Roles
    from lowmem_rlhf.runtime.oom import MicroBatch

    disable = lambda n: MicroBatch(n, "ppo", tmp_path, prof.name, knob="", elastic=False)  # noqa: E731
    ro = Rollout(ids, am, ids[:, 5:], torch.ones(2, 4), ["p", "q"], ["a", "b"], torch.tensor([True, True]))
    roles = Roles({r: eng for r in ("actor", "critic", "reward", "reference")})
    rewards = RewardSet({"reward": lambda p, t: [0.25, 1.0]}, True, {"reward_model": 1.0, "reward": 2.0})
    exp = make_experience(roles, lambda size: ro, PPOConfig(), 0.0, rewards, disable(2), disable(2), 1)
    eng.model.eval()
    with torch.no_grad():
        eng.use("reward")
        rm = last_token_scores(eng, ids, am)
    assert torch.allclose(exp.scores, rm + 2.0 * torch.tensor([0.25, 1.0]), atol=1e-5)
    assert torch.equal(exp.components["reward"], torch.tensor([0.25, 1.0]))
    assert torch.allclose(exp.components["reward_model"], rm, atol=1e-5)


def test_actor_step_moves_only_the_actor_and_critic_step_only_the_critic(tiny_llama):
    prof = replace(load_profile("qlora-shared"), lora_r=8, grad_ckpt=True)
    eng = SharedBase(load_model(str(tiny_llama), prof), prof)
    attach_roles(eng, None)
    snap = lambda name: [p.detach().clone() for p in eng.parameters_of(name)]  # noqa: E731
    ids = torch.randint(4, 250, (2, 12))
    am = torch.ones_like(ids)
    opt_a = torch.optim.AdamW(eng.parameters_of("actor"), lr=1e-2)
    eng.use("critic")
    opt_c = torch.optim.AdamW(eng.parameters_of("critic"), lr=1e-2)
    a0, c0 = snap("actor"), snap("critic")
    eng.use("actor")
    h = eng.hidden_states(ids, am)[:, 5:-1]
    lp = M.token_logprobs(h.reshape(-1, h.shape[-1]), eng.loaded.model.get_output_embeddings().weight,
                          ids[:, 6:].reshape(-1)).view(2, -1)
    eng.backward(M.policy_loss(lp, lp.detach() - 0.1, torch.ones_like(lp), torch.ones_like(lp)).loss)
    opt_a.step()
    a1, c1 = snap("actor"), snap("critic")
    assert any(not torch.equal(x, y) for x, y in zip(a0, a1)) and all(torch.equal(x, y) for x, y in zip(c0, c1))
    eng.use("critic")
    v = eng.scalar(eng.hidden_states(ids, am))
    eng.backward(M.value_loss(v, v.detach(), v.detach() + 1, torch.ones_like(v))[0])
    opt_c.step()
    a2, c2 = snap("actor"), snap("critic")
    assert all(torch.equal(x, y) for x, y in zip(a1, a2)) and any(not torch.equal(x, y) for x, y in zip(c1, c2))


def test_export_reloads_in_plain_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowmem_rlhf.cli import main
    from lowmem_rlhf.stages.sft import SFTConfig, run_sft

    prof = replace(load_profile("lora-bf16-shared"), dtype="fp32", lora_r=8, micro_batch=4, learning_rate=1e-2)
    run_sft(SFTConfig(model=str(tiny_llama), data=str(bundled_path("self-instruct-seed-tasks.jsonl")), out=tmp_path,
                      profile=prof, max_len=48, batch=4, max_steps=2, progress=False))
    run_ppo(PPOConfig(
        model=str(tiny_llama), prompts=PROMPTS, out=tmp_path, profile=prof, sft=tmp_path / "sft",
        reward=f"{REWARDS}:ascii_fraction", iterations=1, rollout_batch=4, prompt_len=32, response_len=8,
        ppo_epochs=1, progress=False))
    main(["export", str(tmp_path), "--out", str(tmp_path / "export"), "--dtype", "fp32"])  # returns on success
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    eng = SharedBase(load_model(str(tiny_llama), prof, merge_adapters=(tmp_path / "sft" / "adapter",),
                                training=False), prof)
    eng.load_adapter("actor", tmp_path / "ppo" / "actor")
    eng.model.eval()
    ids = torch.randint(4, 250, (2, 10))
    with torch.no_grad():
        want = eng.logits(eng.hidden_states(ids, torch.ones_like(ids)))
        got = exported(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-4), (want - got).abs().max()
    with torch.no_grad():
        with eng.reference():
            ref = eng.logits(eng.hidden_states(ids, torch.ones_like(ids)))
    assert not torch.allclose(ref, got, atol=1e-6)  # the actor's update is in the export


@pytest.mark.slow
def test_auto_runs_the_embedded_default_end_to_end(tmp_path, capsys, smollm2):
    """The README's main command, with fewer steps: SFT -> RM -> GRPO into one run folder, the RM
    trained and scored beside the checker, not a reward."""
    from lowmem_rlhf.cli import main

    run = tmp_path / "run"
    main(["auto", "--out", str(run), "--sft-steps", "2", "--rm-steps", "2", "--ppo-iterations", "2"])
    out = capsys.readouterr().out
    s = json.loads((run / "summary.json").read_text())
    for stage in ("sft", "rm", "grpo"):
        assert (run / stage / "summary.json").exists()
    assert s["algo"] == "grpo" and not (run / "ppo").exists()
    assert s["heldout_n"] == 96  # every bundled held-out question, none used in training
    for policy in ("sft", "ppo"):
        assert 0 <= s[f"heldout_correct_{policy}"] <= s[f"heldout_lenient_{policy}"] <= 96
    rl = json.loads((run / "grpo" / "summary.json").read_text())
    answers = rl["heldout_after"]["answers"]
    from lowmem_rlhf.algo.demo_task import strict
    from lowmem_rlhf.data import load_records

    held = load_records(str(bundled_path("demo-heldout.jsonl")))
    assert sum(strict(r, h["answer"]) for r, h in zip(answers, held)) == s["heldout_correct_ppo"]
    assert s["rm"]["heldout_accuracy"] is not None and s["ppo_kl_last5"] is not None
    assert (run / "grpo" / "grpo.png").exists() and (run / "plan.json").exists()
    assert "held-out exactly the answer (SFT -> GRPO)" in out and "wall time" in out
    rl_cfg = json.loads((run / "grpo" / "config.json").read_text())
    assert (rl_cfg["group_size"], rl_cfg["rollout_batch"]) == (8, 8)  # the demo's 1 question x 8
    # the checker alone is the reward; the RM is trained and scored beside it
    assert rl_cfg["reward_model"] is None and rl_cfg["reward"] == "lowmem_rlhf.algo.demo_task:checker"
    assert "not a reward" in out


def test_auto_runs_grpo_on_the_demo_and_ppo_on_a_named_model():
    """What `auto` resolves when no flag says: the demo's RL is GRPO (the RM trained, not a
    reward); `--algo ppo` on the demo gets the demo's PPO settings; a named model gets PPO with its
    reward model as the reward."""
    from lowmem_rlhf.config import DEMO_CHECKER, AutoConfig

    demo = AutoConfig().resolve()
    assert (demo.algo, demo.samples_per_prompt, demo.rollout_batch, demo.ppo_iterations) == ("grpo", 8, 8, 40)
    assert demo.reward == DEMO_CHECKER and demo.train_rm and not demo.rm_reward
    ppo = AutoConfig(algo="ppo").resolve()
    assert (ppo.kl_penalty, ppo.whiten, ppo.ppo_epochs, ppo.samples_per_prompt, ppo.kl_coef) == ("loss", False, 1, 8, 0.04)
    assert ppo.reward == DEMO_CHECKER and ppo.train_rm and not ppo.rm_reward
    named = AutoConfig(model="llama-2-7b").resolve()
    assert (named.algo, named.kl_penalty, named.whiten, named.rm_reward, named.reward) == ("ppo", "reward", True, True, None)


def test_auto_with_a_programmatic_reward_skips_the_reward_model(tiny_llama, tmp_path, capsys):
    from lowmem_rlhf.cli import main

    run = tmp_path / "run"
    main(["auto", "--model", str(tiny_llama), "--out", str(run), "--reward", "lowmem_rlhf.algo.demo_task:checker",
          "--seq-len", "64", "--prompt-len", "48", "--response-len", "4", "--sft-steps", "2",
          "--ppo-iterations", "2", "--kl-penalty", "loss", "--no-whiten"])
    out = capsys.readouterr().out
    s = json.loads((run / "summary.json").read_text())
    ppo_cfg = json.loads((run / "ppo" / "config.json").read_text())
    assert (ppo_cfg["kl_penalty"], ppo_cfg["whiten_advantages"]) == ("loss", False)  # auto's flags reach PPO
    assert s["rm"] is None and not (run / "rm").exists()
    assert (run / "sft" / "summary.json").exists() and (run / "ppo" / "summary.json").exists()
    assert "reward model skipped" in out and s["heldout_checker_ppo"] is not None
    assert "held-out exactly the answer (SFT -> PPO)" in out and (run / "ppo" / "ppo.png").exists()
    assert s["heldout_correct_ppo"] is not None and s["heldout_n"] == 96


@pytest.mark.parametrize("flag,rewards", [([], True), (["--no-rm-reward"], False)], ids=["rm-reward", "no-rm-reward"])
def test_auto_trains_the_reward_model_beside_a_program_and_adds_it_unless_told_not_to(tiny_llama, tmp_path, capsys,
                                                                                      flag, rewards):
    """--train-rm with a program reward: the RM stage runs and is scored; for a named model PPO adds
    its score to the program's (weights 1, 1), and with --no-rm-reward (the demo's default) PPO
    optimises the program alone, its critic starting fresh."""
    from lowmem_rlhf.cli import main

    run = tmp_path / "run"
    main(["auto", "--model", str(tiny_llama), "--out", str(run), "--reward", "lowmem_rlhf.algo.demo_task:checker",
          "--train-rm", *flag, "--seq-len", "64", "--prompt-len", "48", "--response-len", "4", "--sft-steps", "2",
          "--rm-steps", "2", "--ppo-iterations", "1"])
    s = json.loads((run / "summary.json").read_text())
    assert s["rm"]["heldout_accuracy"] is not None
    ppo_cfg = json.loads((run / "ppo" / "config.json").read_text())
    assert (ppo_cfg["reward_model"] is not None) == rewards
    assert ppo_cfg["reward_weights"] == ([1.0, 1.0] if rewards else None)
    assert ("not a reward" in capsys.readouterr().out) != rewards
