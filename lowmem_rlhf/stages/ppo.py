"""Stage 3, PPO on one shared base: actor, critic and reward are adapters (+ heads), the reference
is the base with adapters disabled (the SFT adapter is merged into that base first).

Each iteration reads as a recipe:
  exp = make_experience(...)   generation, scoring (reward, reference, actor, critic), KL, GAE
  ppo_update(...)              PPO epochs: actor then critic on each minibatch; with one minibatch
                               (--values-at-update, the default) critic first, its first forward
                               giving the values and GAE that scoring would have
  metrics_row(...)             the logged row, with each phase's measured and estimated peak
The scaffold (`stages/scaffold.py`) owns the run folder, resume, checkpoints and the summary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lowmem_rlhf import data as D
from lowmem_rlhf.algo import ppo_math as M
from lowmem_rlhf.algo.experience import Experience, generate, make_experience
from lowmem_rlhf.algo.ppo import minibatch_count, ppo_update
from lowmem_rlhf.algo.rewards import RewardError, RewardSet, make_rewards
from lowmem_rlhf.algo.roles import Roles, attach_roles, base_fingerprint, build_roles
from lowmem_rlhf.config import PPOConfig, Shape
from lowmem_rlhf.measure.report import counted_components
from lowmem_rlhf.model.loading import load_model, logit_transform
from lowmem_rlhf.plan.estimator import generation_rows
from lowmem_rlhf.runtime.oom import MicroBatch
from lowmem_rlhf.runtime.optim import (
    OptimizerParking,
    default_warmup,
    make_optimizer,
    make_scaler,
    parks,
    warmup_cosine,
)
from lowmem_rlhf.runtime.runs import finished_adapter
from lowmem_rlhf.stages.rl import (
    check_not_all_skipped,
    check_rollout,
    component_means,
    eval_function,
    loss_scales,
    mean,
    rollout_sampler,
    score_policy,
    skip_iteration,
    sync_adapters,
    timed,
)
from lowmem_rlhf.stages.scaffold import Stage

PHASES = ("generation", "scoring", "actor_update", "critic_update")


def make_optimizers(roles: Roles, cfg, device, trained: tuple[str, ...] = ("actor", "critic"),
                    epochs: int | None = None) -> tuple[dict, dict]:
    """The `trained` roles' optimizers (the profile's kind), and their LR schedules (cfg.lr_schedule)
    over cfg.iterations x epochs (default cfg.ppo_epochs) x minibatches steps."""
    prof = cfg.profile
    lrs = {"actor": cfg.lr, "critic": getattr(cfg, "critic_lr", None)}
    opts, scheds = {}, {}
    steps = cfg.iterations * (cfg.ppo_epochs if epochs is None else epochs) * minibatch_count(cfg.minibatches,
                                                                                            cfg.rollout_batch)
    for role in trained:
        with roles.role(role) as eng:
            lr = lrs[role] if lrs[role] is not None else prof.learning_rate
            opts[role] = make_optimizer(eng.parameters_of(role), prof.optimizer, lr, device=device)
            if (scaler := make_scaler(prof.dtype, device)) is not None:  # fp16: the role's loss scale
                eng.scalers[role] = scaler
        if cfg.lr_schedule == "cosine":
            scheds[role] = warmup_cosine(opts[role], steps, default_warmup(steps))
    return opts, scheds


def metrics_row(it: int, exp: Experience, stats: dict, times: dict, kl_coef: float | None, lr: float,
                mb: MicroBatch, gen_mb: MicroBatch, st: Stage, cfg, device, rewards: RewardSet, roles: Roles,
                phases: tuple[str, ...] = PHASES, epochs: int | None = None) -> dict:
    """The row logged for one iteration: reward (and each reward component), KL, losses (0-d
    tensors, read here), sizes, seconds, forwards per role, and per phase the measured peak beside
    the estimator's. PPO and GRPO/RLOO (its `phases`, and its `epochs`) both log it."""
    m, W = exp.response_mask, st.world
    B = len(exp.seqs) * W.size  # the global batch: every figure below is over it (each rank's share summed)
    update_s = sum(times.get(f"{r}_update", 0.0) for r in ("actor", "critic"))
    epochs = cfg.ppo_epochs if epochs is None else epochs
    tokens = W.total(float(m.sum()))

    def mean_of(t: torch.Tensor) -> float:  # over the global batch's rows
        return float(t.mean()) if W.size == 1 else W.total(float(t.sum())) / B

    reward_mean = mean_of(exp.scores)
    row = {
        "iteration": it + 1, "reward_mean": reward_mean,
        "reward_std": float(exp.scores.std()) if W.size == 1 else
        (W.total(float(((exp.scores.double() - reward_mean) ** 2).sum())) / max(B - 1, 1)) ** 0.5,
        **{k: (v if k.startswith("weight_") else W.mean(v)) for k, v in component_means(exp, rewards).items()},
        "kl": None if exp.kl is None else exp.seq_kl, "kl_coef": kl_coef,
        "entropy": float(M.masked_mean(exp.entropy, m)) if W.size == 1 else
        W.total(float((exp.entropy * m).sum())) / max(tokens, 1.0),
        "response_length": float(m.sum(-1).mean()) if W.size == 1 else tokens / B, "samples": B,
        "micro_batch": mb.size, "lr": lr, "train_score_mean": mean_of(exp.train_scores),
        "ended_fraction": 1.0 if exp.ended is None else mean_of(exp.ended.float()),
        "generation_batch": gen_mb.size, "oom_retries": sum(1 for e in mb.events + gen_mb.events if e["step"] == it + 1),
        **{k: (max(W.gather(float(v))) if k.startswith(("max_", "first_max_")) else W.mean(float(v)))
           for k, v in stats.items()}, **{f"seconds_{k}": v for k, v in times.items()},
        "tokens_per_s_generation": tokens / max(times["generation"], 1e-9),
        "tokens_per_s_update": W.total(int(exp.mask.sum())) * epochs / max(update_s, 1e-9),
        # this iteration's activations of each role (each runs its forwards): the stage clears them per iteration
        **{f"forwards_{r}": roles.entries.get(r, 0) for r in ("actor", "critic", "reward", "reference")
           if r in roles.engines},
    }
    est = {p.name: p for p in st.est.phases}
    for ph in phases:
        for fig, v in st.meter.peaks.get(ph, {}).items():
            row[f"peak_{ph}_{fig}"] = v
        fig = "allocated" if device.type == "cuda" else "cpu_ram"
        row[f"est_{ph}_{fig}"] = getattr(est[ph], fig)
    return row


def run_ppo(cfg: PPOConfig, console=None) -> dict:
    check_rollout(cfg.rollout_batch, cfg.samples_per_prompt)
    cfg = dataclasses.replace(cfg, profile=cfg.profile.for_rl())  # no dropout in RL: saved as run
    prof = cfg.profile
    rewards = make_rewards(cfg)
    merged = [finished_adapter(cfg.sft, "--sft", "SFT", "RUN/sft")] if cfg.sft is not None else []
    rm_adapter = (finished_adapter(cfg.reward_model, "--reward-model", "RM", "RUN/rm")
                  if cfg.reward_model is not None else None)
    eval_fn = eval_function(cfg.eval_reward, rewards)
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
        sync_adapters(roles, ("actor", "critic"), device)  # data parallel: DDP per trained adapter
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
        moments = M.RunningMoments() if cfg.reward_norm or cfg.reward_scale else None
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
            # each prompt k times, side by side; the global rollout (a data-parallel rank samples its share)
            pick = [i for i in sampler.draw(B * st.world.size // k) for _ in range(k)]
            sample = rollout_sampler(roles, prompt_ids, prompt_texts, pick, tok, cfg, "ppo", it)
            times: dict[str, float] = {}
            roles.entries.clear()  # forwards per role, counted for this iteration's row

            def phase(name: str):
                return timed(st.meter.phase(name), times, name)

            try:
                exp = make_experience(roles, sample, cfg, kl_ctl.value, rewards, gen_mb, mb, it + 1, phase, moments)
            except RewardError as e:
                skip_iteration(st, state, it, "PPO", e)
                continue
            stats = ppo_update(roles, exp, cfg, optimizers, schedulers, mb, it + 1, order, phase,
                               on_step=lambda step_stats: st.skipped(step_stats, it + 1), parking=parking)
            kl_ctl.update(exp.seq_kl, B * st.world.size)
            row = metrics_row(it, exp, stats, times, kl_ctl.value, optimizers["actor"].param_groups[0]["lr"], mb, gen_mb,
                              st, cfg, device, rewards, roles)
            row.update(loss_scales(roles, ("actor", "critic")))
            st.log(postfix={"reward": row["reward_mean"], "kl": row["kl"]}, **row)
            state["rewards"].append(row["reward_mean"])
            state.setdefault("kls", []).append(row["kl"])
            state["iter_seconds"].append(sum(times.values()))
        check_not_all_skipped(state, cfg.iterations, "PPO")
        eval_after = score_policy(roles, held, eval_fn, tok, cfg, use_reference=False) if held and eval_fn else None

        # ---- save -----------------------------------------------------------------------------
        meta = {"stage": "ppo", "merged": [str(Path(p).resolve()) for p in merged]}
        if st.world.main:
            roles.engines["actor"].save_adapter("actor", st.out / "actor", extra_meta=meta)
            roles.engines["critic"].save_adapter("critic", st.out / "critic", extra_meta=meta)
        counted: dict[str, int] = {}
        for eng in roles.unique():
            for k, v in counted_components(eng.model).items():
                counted[k] = counted.get(k, 0) + v
        rewards_seen = state["rewards"]
        summary = st.finish({
            "iterations": cfg.iterations, "global_rollout_batch": B * st.world.size, "skipped_iterations": state["skipped"], "merged_sft": [str(p) for p in merged],
            "reward": " + ".join(str(x) for x in (cfg.reward_model, cfg.reward, cfg.reward_cmd) if x),
            "reward_weights": rewards.weights,
            "reward_first5": mean(rewards_seen[:5]), "reward_last5": mean(rewards_seen[-5:]),
            "kl_last5": mean(state.get("kls", [])[-5:]), "kl_coef_final": kl_ctl.value,
            "heldout_before": state["eval_before"], "heldout_after": eval_after,
            "base_sha256_before": base_before, "base_sha256_after": base_fingerprint(roles.engines["actor"]),
            "separate_models": cfg.separate_models, "seconds_per_iteration": mean(state["iter_seconds"]),
            "micro_batch": mb.size, "generation_batch": gen_mb.size, "oom_events": gen_mb.events + mb.events,
        }, counted)
        try:
            from lowmem_rlhf.measure.plots import plot_ppo

            if st.world.main:
                plot_ppo(st.out / "metrics.jsonl", st.out / "ppo.png")
        except ImportError:
            pass
    return summary


__all__ = ["PPOConfig", "run_ppo", "generate", "attach_roles", "base_fingerprint", "check_rollout", "score_policy",
           "metrics_row", "make_optimizers"]
