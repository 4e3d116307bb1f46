"""Stage 3, PPO on one shared base: actor, critic and reward are adapters (+ heads), the reference
is the base with adapters disabled (the SFT adapter is merged into that base first).

Each iteration reads as a recipe:
  exp = make_experience(...)   generation, scoring (reward, reference, actor, critic), KL, GAE
  ppo_update(...)              PPO epochs: actor then critic on each minibatch
  metrics_row(...)             the logged row, with each phase's measured and estimated peak
The scaffold (`stages/scaffold.py`) owns the run folder, resume, checkpoints and the summary.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from lowmem_rlhf import data as D
from lowmem_rlhf.algo import ppo_math as M
from lowmem_rlhf.algo.demo_task import lenient, strict
from lowmem_rlhf.algo.experience import (
    Experience,
    Rollout,
    generate,
    generate_in_chunks,
    make_experience,
)
from lowmem_rlhf.algo.ppo import minibatch_count, ppo_update
from lowmem_rlhf.algo.rewards import CommandReward, FunctionReward, RewardError
from lowmem_rlhf.algo.roles import Roles, attach_roles, base_fingerprint, build_roles
from lowmem_rlhf.algo.sampling import row_seeds
from lowmem_rlhf.config import PPOConfig, Shape
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.measure.report import counted_components
from lowmem_rlhf.model.loading import load_model, logit_transform
from lowmem_rlhf.plan.estimator import generation_rows
from lowmem_rlhf.runtime.oom import MicroBatch, maybe_inject
from lowmem_rlhf.runtime.optim import (
    OptimizerParking,
    default_warmup,
    make_optimizer,
    make_scaler,
    parks,
    warmup_cosine,
)
from lowmem_rlhf.runtime.runs import finished_adapter
from lowmem_rlhf.stages.scaffold import Stage

PHASES = ("generation", "scoring", "actor_update", "critic_update")


def make_reward(cfg: PPOConfig):
    """The programmatic reward (a function or an evaluator command), or None when the reward is the
    learned RM alone. With --reward-model too, the RM's score and the program's are added."""
    if cfg.reward and cfg.reward_cmd:
        raise UserError("--reward and --reward-cmd are both given; pass one program (a --reward-model may join it)")
    if not (cfg.reward_model or cfg.reward or cfg.reward_cmd):
        raise UserError("PPO needs a reward: --reward-model RUN/rm, --reward module:function or --reward-cmd \"...\" "
                        "(a reward model and one program are added)")
    if cfg.reward:
        return FunctionReward(cfg.reward)
    if cfg.reward_cmd:
        return CommandReward(cfg.reward_cmd, cfg.reward_timeout)
    return None


@torch.no_grad()
def score_policy(roles: Roles, prompts: list[D.PromptExample], fn, tok, cfg: PPOConfig, use_reference: bool) -> dict:
    """Greedy answers of the actor (or the reference = SFT policy) on held-out prompts, scored by
    fn. Where the rows carry an `answer`, also how many responses are exactly it (`correct`,
    case and punctuation ignored) and how many contain it (`lenient`), of `n`."""
    ids = [D.tokenize_prompt(p, tok, cfg.prompt_len) for p in prompts]
    texts = [D.render_prompt(tok, p.prompt) for p in prompts]
    scores, answers = [], []
    for i in range(0, len(ids), max(cfg.rollout_batch, 1)):
        chunk = ids[i: i + cfg.rollout_batch]
        with roles.role("reference" if use_reference else "actor") as eng:
            ro = generate(eng, chunk, tok, cfg.response_len, 1.0, 1.0, greedy=True)
        answers += ro.texts
        scores += list(fn(texts[i: i + len(chunk)], ro.texts))
    out = {"score": sum(scores) / max(len(scores), 1), "n": len(scores), "examples": answers[:5], "answers": answers}
    expected = [p.meta.get("answer") for p in prompts]
    if all(isinstance(a, (str, int, float)) for a in expected):
        out["correct"] = sum(strict(r, str(a)) for r, a in zip(answers, expected))
        out["lenient"] = sum(lenient(r, str(a)) for r, a in zip(answers, expected))
    return out


def make_optimizers(roles: Roles, cfg: PPOConfig, device) -> tuple[dict, dict]:
    """Actor and critic optimizers (the profile's kind), and their LR schedules (cfg.lr_schedule)."""
    prof = cfg.profile
    lrs = {"actor": cfg.lr, "critic": cfg.critic_lr}
    opts, scheds = {}, {}
    steps = cfg.iterations * cfg.ppo_epochs * minibatch_count(cfg.minibatches, cfg.rollout_batch)
    for role in ("actor", "critic"):
        with roles.role(role) as eng:
            lr = lrs[role] if lrs[role] is not None else prof.learning_rate
            opts[role] = make_optimizer(eng.parameters_of(role), prof.optimizer, lr, device=device)
            if (scaler := make_scaler(prof.dtype, device)) is not None:  # fp16: the role's loss scale
                eng.scalers[role] = scaler
        if cfg.lr_schedule == "cosine":
            scheds[role] = warmup_cosine(opts[role], steps, default_warmup(steps))
    return opts, scheds


def metrics_row(it: int, exp: Experience, stats: dict, times: dict, kl_coef: float, lr: float, mb: MicroBatch,
                gen_mb: MicroBatch, st: Stage, cfg: PPOConfig, device) -> dict:
    """The row logged for one iteration: reward, KL, losses (0-d tensors, read here), sizes,
    seconds, and per phase the measured peak beside the estimator's."""
    m, B = exp.response_mask, len(exp.seqs)
    update_s = times["actor_update"] + times["critic_update"]
    row = {
        "iteration": it + 1, "reward_mean": float(exp.scores.mean()), "reward_std": float(exp.scores.std()),
        "kl": exp.seq_kl, "kl_coef": kl_coef, "entropy": float(M.masked_mean(exp.entropy, m)),
        "response_length": float(m.sum(-1).mean()), "samples": B, "micro_batch": mb.size, "lr": lr,
        "train_score_mean": float(exp.train_scores.mean()),
        "ended_fraction": 1.0 if exp.ended is None else float(exp.ended.float().mean()),
        "generation_batch": gen_mb.size, "oom_retries": sum(1 for e in mb.events + gen_mb.events if e["step"] == it + 1),
        **{k: float(v) for k, v in stats.items()}, **{f"seconds_{k}": v for k, v in times.items()},
        "tokens_per_s_generation": float(m.sum()) / max(times["generation"], 1e-9),
        "tokens_per_s_update": int(exp.mask.sum()) * cfg.ppo_epochs / max(update_s, 1e-9),
    }
    est = {p.name: p for p in st.est.phases}
    for ph in PHASES:
        for fig, v in st.meter.peaks.get(ph, {}).items():
            row[f"peak_{ph}_{fig}"] = v
        fig = "allocated" if device.type == "cuda" else "cpu_ram"
        row[f"est_{ph}_{fig}"] = getattr(est[ph], fig)
    return row


def check_rollout(rollout_batch: int, samples_per_prompt: int) -> None:
    """One line, before anything loads, unless the rollout splits into whole prompts."""
    B, k = rollout_batch, samples_per_prompt
    if k < 1:
        raise UserError(f"--samples-per-prompt must be at least 1, got {k}")
    if B % k:
        raise UserError(f"--samples-per-prompt {k} must divide --rollout-batch {B}: "
                        f"use --rollout-batch {max(B - B % k, k)}")


def run_ppo(cfg: PPOConfig, console=None) -> dict:
    check_rollout(cfg.rollout_batch, cfg.samples_per_prompt)
    cfg = dataclasses.replace(cfg, profile=cfg.profile.for_rl())  # no dropout in RL: saved as run
    prof = cfg.profile
    reward_fn = make_reward(cfg)
    merged = [finished_adapter(cfg.sft, "--sft", "SFT", "RUN/sft")] if cfg.sft is not None else []
    rm_adapter = (finished_adapter(cfg.reward_model, "--reward-model", "RM", "RUN/rm")
                  if cfg.reward_model is not None else None)
    eval_fn = FunctionReward(cfg.eval_reward) if cfg.eval_reward else (
        reward_fn if isinstance(reward_fn, FunctionReward) else None)
    with Stage(cfg, "ppo", "PPO", console, step_key="iteration") as st:
        # ---- setup ----------------------------------------------------------------------------
        loaded = st.load(context=(cfg.prompt_len + cfg.response_len,
                                  f"--prompt-len + --response-len ({cfg.prompt_len} + {cfg.response_len})"),
                         merged=merged)
        device, tok, first = loaded.device, loaded.tokenizer, [loaded]
        logit_transform(loaded.model.config)  # refuses, before any work, a logit map we do not apply
        prompts = D.to_prompts(D.load_records(cfg.prompts), cfg.prompts)
        prompt_ids = [D.tokenize_prompt(p, tok, cfg.prompt_len) for p in prompts]
        prompt_texts = [D.render_prompt(tok, p.prompt) for p in prompts]
        held = D.to_prompts(D.load_records(cfg.eval_prompts), cfg.eval_prompts) if cfg.eval_prompts else []
        roles = build_roles(lambda: first.pop() if first else load_model(
            cfg.model, prof, cfg.trust_remote_code, merge_adapters=tuple(merged)), prof, rm_adapter,
            cfg.separate_models, cfg.seed)
        base_before = base_fingerprint(roles.engines["actor"])
        optimizers, schedulers = make_optimizers(roles, cfg, device)
        parking = OptimizerParking(optimizers, parks(prof.optimizer, device))  # idle roles' state in host RAM
        kl_ctl = (M.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                  else M.FixedKLController(cfg.kl_coef))
        st.plan(Shape(prompt_len=cfg.prompt_len, response_len=cfg.response_len, rollout_batch=cfg.rollout_batch),
                device, separate_models=cfg.separate_models)
        B, R = cfg.rollout_batch, cfg.response_len
        mb = st.micro_batch(B, knob=f"--response-len (now {R}) or --prompt-len (now {cfg.prompt_len})")
        # generation samples the profile's generation_batch rows at a time (the planner's; 0: all at
        # once), halved on OOM (a long response's KV cache); the rollout is the same at any size
        gen_mb = st.micro_batch(B, knob=f"--response-len (now {R})", key="ppo-generation",
                                start=generation_rows(prof, B))
        sampler, order = D.EpochSampler(len(prompts), cfg.seed), torch.Generator().manual_seed(cfg.seed)
        parts = dict(models={r: (roles.engines[r].model, roles.engines[r].owns(r)) for r in ("actor", "critic")},
                     optimizers=optimizers, samplers={"prompts": sampler, "minibatch_order": order},
                     schedulers={**schedulers, **{f"{r}-loss-scale": roles.engines[r].scalers[r]  # fp16 only
                                                  for r in ("actor", "critic") if r in roles.engines[r].scalers}})
        moments = M.RunningMoments() if cfg.reward_norm else None
        state = st.resume({"rewards": [], "iter_seconds": [], "skipped": 0, "eval_before": None,
                           "micro_batch": mb.size, "generation_batch": gen_mb.size, "kl_coef": kl_ctl.value,
                           "reward_moments": None if moments is None else moments.state_dict()}, parts,
                          cfg.iterations)
        mb.size, gen_mb.size, kl_ctl.value = state["micro_batch"], state["generation_batch"], state["kl_coef"]
        parking.park_all()  # a restored optimizer state is loaded onto the device
        if moments is not None and state.get("reward_moments"):
            moments = M.RunningMoments(**state["reward_moments"])
        if st.resumed is None and held and eval_fn:
            state["eval_before"] = score_policy(roles, held, eval_fn, tok, cfg, use_reference=True)

        # ---- loop -----------------------------------------------------------------------------
        def sync() -> None:  # what the checkpoint after each iteration (skipped or not) must hold
            state.update(micro_batch=mb.size, generation_batch=gen_mb.size, kl_coef=kl_ctl.value,
                         reward_moments=None if moments is None else moments.state_dict())

        for it in st.steps(cfg.iterations, sync):
            k = cfg.samples_per_prompt
            pick = [i for i in sampler.draw(B // k) for _ in range(k)]  # each prompt k times, side by side
            torch.manual_seed(cfg.seed * 100_003 + it)
            seeds = row_seeds(B)  # one stream per row: the rollout is the same in chunks of any size
            times: dict[str, float] = {}

            def phase(name: str):
                return _timed(st.meter.phase(name), times, name)

            def sample(size: int) -> Rollout:
                maybe_inject("ppo-generation", it + 1, size)
                return generate_in_chunks(roles.engines["actor"], [prompt_ids[i] for i in pick], tok, R,
                                          cfg.temperature, cfg.top_p, size, prompt_texts=[prompt_texts[i] for i in pick],
                                          seeds=seeds)

            try:
                exp = make_experience(roles, sample, cfg, kl_ctl.value, reward_fn, gen_mb, mb, it + 1, phase, moments,
                                      learned_reward=rm_adapter is not None)
            except RewardError as e:
                state["skipped"] += 1
                state["skip_reason"] = str(e)
                st.log(iteration=it + 1, skipped=True, reason=str(e))
                st.say(f"PPO iteration {it + 1} skipped: {e}")
                continue
            stats = ppo_update(roles, exp, cfg, optimizers, schedulers, mb, it + 1, order, phase,
                               on_step=lambda step_stats: st.skipped(step_stats, it + 1), parking=parking)
            kl_ctl.update(exp.seq_kl, B)
            row = metrics_row(it, exp, stats, times, kl_ctl.value, optimizers["actor"].param_groups[0]["lr"], mb, gen_mb,
                              st, cfg, device)
            row.update({f"loss_scale_{r}": roles.engines[r].scalers[r].get_scale()  # fp16 only
                        for r in ("actor", "critic") if r in roles.engines[r].scalers})
            st.log(postfix={"reward": row["reward_mean"], "kl": row["kl"]}, **row)
            state["rewards"].append(row["reward_mean"])
            state.setdefault("kls", []).append(row["kl"])
            state["iter_seconds"].append(sum(times.values()))
        if state["skipped"] == cfg.iterations:
            raise UserError(f"every PPO iteration was skipped because the reward failed ({cfg.iterations} of "
                            f"{cfg.iterations}; last: {state.get('skip_reason', '?')}); fix the reward and re-run")
        eval_after = score_policy(roles, held, eval_fn, tok, cfg, use_reference=False) if held and eval_fn else None

        # ---- save -----------------------------------------------------------------------------
        meta = {"stage": "ppo", "merged": [str(Path(p).resolve()) for p in merged]}
        roles.engines["actor"].save_adapter("actor", st.out / "actor", extra_meta=meta)
        roles.engines["critic"].save_adapter("critic", st.out / "critic", extra_meta=meta)
        counted: dict[str, int] = {}
        for eng in roles.unique():
            for k, v in counted_components(eng.model).items():
                counted[k] = counted.get(k, 0) + v
        rewards = state["rewards"]
        summary = st.finish({
            "iterations": cfg.iterations, "skipped_iterations": state["skipped"], "merged_sft": [str(p) for p in merged],
            "reward": " + ".join(str(x) for x in (cfg.reward_model, cfg.reward, cfg.reward_cmd) if x),
            "reward_first5": _mean(rewards[:5]), "reward_last5": _mean(rewards[-5:]),
            "kl_last5": _mean(state.get("kls", [])[-5:]), "kl_coef_final": kl_ctl.value,
            "heldout_before": state["eval_before"], "heldout_after": eval_after,
            "base_sha256_before": base_before, "base_sha256_after": base_fingerprint(roles.engines["actor"]),
            "separate_models": cfg.separate_models, "seconds_per_iteration": _mean(state["iter_seconds"]),
            "micro_batch": mb.size, "generation_batch": gen_mb.size, "oom_events": gen_mb.events + mb.events,
        }, counted)
        try:
            from lowmem_rlhf.measure.plots import plot_ppo

            plot_ppo(st.out / "metrics.jsonl", st.out / "ppo.png")
        except ImportError:
            pass
    return summary


class _timed:
    """A context manager around `inner` that adds its wall seconds to times[name]."""

    def __init__(self, inner, times: dict[str, float], name: str):
        self.inner, self.times, self.name = inner, times, name

    def __enter__(self):
        self.t0 = time.time()
        return self.inner.__enter__()

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)  # the meter synchronises CUDA first: its kernels are counted
        finally:
            self.times[self.name] = self.times.get(self.name, 0.0) + time.time() - self.t0


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


__all__ = ["PPOConfig", "run_ppo", "generate", "attach_roles", "base_fingerprint"]
