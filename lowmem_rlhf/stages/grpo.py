"""Stage 3, critic-free: GRPO or RLOO on one shared base. The actor is an adapter; the reference is
the base with adapters off (the SFT adapter merged into it first); a reward model, when one of the
rewards, is the reward adapter + head on the same base. No critic, no value head.

Each iteration reads as a recipe:
  exp = make_group_experience(...)  generation of prompts x G, scoring (rewards, reference if beta > 0,
                                    actor), group advantages
  group_update(...)                 the actor's clipped surrogate + beta x k3 KL
  metrics_row(...)                  the logged row, each phase's measured and estimated peak
The scaffold (`stages/scaffold.py`) owns the run folder, resume, checkpoints and the summary.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from lowmem_rlhf import data as D
from lowmem_rlhf.algo.grpo import group_update, make_group_experience
from lowmem_rlhf.algo.rewards import RewardError, make_rewards
from lowmem_rlhf.algo.roles import base_fingerprint, build_roles
from lowmem_rlhf.config import GRPOConfig, Shape
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.measure.report import counted_components
from lowmem_rlhf.model.loading import logit_transform
from lowmem_rlhf.plan.estimator import generation_rows
from lowmem_rlhf.runtime.optim import OptimizerParking, parks
from lowmem_rlhf.runtime.runs import finished_adapter
from lowmem_rlhf.stages.ppo import make_optimizers, metrics_row
from lowmem_rlhf.stages.rl import (
    check_not_all_skipped,
    check_rollout,
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

PHASES = ("generation", "scoring", "actor_update")


def check_grpo(cfg: GRPOConfig, group_flag: str = "--group-size") -> None:
    """One line per bad setting, before anything loads (group_flag: the group size's name where the
    user sets it: `auto` calls it --samples-per-prompt)."""
    check_rollout(cfg.rollout_batch, cfg.group_size, group_flag, minimum=2,
                  why=" (the advantage compares each response with the other responses to its prompt: "
                      "a group of 1 has nothing to compare with and learns nothing)")
    if not math.isfinite(cfg.beta) or cfg.beta < 0:
        raise UserError(f"--beta must be 0 or more (the weight of the KL to the reference; 0 skips the reference), "
                        f"got {cfg.beta}")
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be a positive integer, got {cfg.epochs}")
    if not 0 < cfg.clip < 1:
        raise UserError(f"--clip must be between 0 and 1, got {cfg.clip}")
    if cfg.algo == "rloo" and not cfg.std_norm:
        raise UserError("--no-std-norm is GRPO's (Dr. GRPO); RLOO never divides by the std: drop it")


def run_grpo(cfg: GRPOConfig, console=None) -> dict:
    check_grpo(cfg)
    cfg = dataclasses.replace(cfg, profile=cfg.profile.for_rl())  # no dropout in RL: saved as run
    prof = cfg.profile
    title = cfg.algo.upper()
    rewards = make_rewards(cfg, title)
    merged = [finished_adapter(cfg.sft, "--sft", "SFT", "RUN/sft")] if cfg.sft is not None else []
    rm_adapter = (finished_adapter(cfg.reward_model, "--reward-model", "RM", "RUN/rm")
                  if cfg.reward_model is not None else None)
    eval_fn = eval_function(cfg.eval_reward, rewards)
    with Stage(cfg, cfg.algo, title, console, step_key="iteration") as st:
        # ---- setup ----------------------------------------------------------------------------
        loaded = st.load(context=(cfg.prompt_len + cfg.response_len,
                                  f"--prompt-len + --response-len ({cfg.prompt_len} + {cfg.response_len})"),
                         merged=merged)
        device, tok = loaded.device, loaded.tokenizer
        logit_transform(loaded.model.config)  # refuses, before any work, a logit map we do not apply
        prompts = D.to_prompts(D.load_records(cfg.prompts), cfg.prompts)
        prompt_ids = [D.tokenize_prompt(p, tok, cfg.prompt_len) for p in prompts]
        prompt_texts = [D.render_prompt(tok, p.prompt) for p in prompts]
        held = D.to_prompts(D.load_records(cfg.eval_prompts), cfg.eval_prompts) if cfg.eval_prompts else []
        # one shared base: build_roles loads nothing more (PPO's 4-model layout is PPO's only)
        roles = build_roles(lambda: loaded, prof, rm_adapter, False, cfg.seed, critic=False)
        base_before = base_fingerprint(roles.engines["actor"])
        optimizers, schedulers = make_optimizers(roles, cfg, device, trained=("actor",), epochs=cfg.epochs)
        sync_adapters(roles, ("actor",), device)  # data parallel: DDP over the actor's adapter
        parking = OptimizerParking(optimizers, parks(prof.optimizer, device))  # the actor's state off the device
        st.plan(Shape(prompt_len=cfg.prompt_len, response_len=cfg.response_len, rollout_batch=cfg.rollout_batch),
                device, reward_model=rm_adapter is not None, beta=cfg.beta)
        B, R = cfg.rollout_batch, cfg.response_len
        mb = st.micro_batch(B, knob=f"--response-len (now {R}) or --prompt-len (now {cfg.prompt_len})")
        gen_mb = st.micro_batch(B, knob=f"--response-len (now {R})", key=f"{cfg.algo}-generation",
                                start=generation_rows(prof, B))
        sampler, order = D.EpochSampler(len(prompts), cfg.seed), torch.Generator().manual_seed(cfg.seed)
        eng = roles.engines["actor"]
        parts = dict(models={"actor": (eng.model, eng.owns("actor"))}, optimizers=optimizers,
                     samplers={"prompts": sampler, "minibatch_order": order},
                     schedulers={**schedulers, **({"actor-loss-scale": eng.scalers["actor"]}  # fp16 only
                                                  if "actor" in eng.scalers else {})})
        state = st.resume({"rewards": [], "iter_seconds": [], "skipped": 0, "eval_before": None,
                           "micro_batch": mb.size, "generation_batch": gen_mb.size}, parts, cfg.iterations)
        mb.size, gen_mb.size = state["micro_batch"], state["generation_batch"]
        parking.park_all()  # a restored optimizer state is loaded onto the device
        if st.resumed is None and held and eval_fn:
            state["eval_before"] = score_policy(roles, held, eval_fn, tok, cfg, use_reference=True)

        # ---- loop -----------------------------------------------------------------------------
        def sync() -> None:  # what the checkpoint after each iteration (skipped or not) must hold
            state.update(micro_batch=mb.size, generation_batch=gen_mb.size)

        G = cfg.group_size
        for it in st.steps(cfg.iterations, sync):
            # each prompt G times, side by side; the global rollout (a data-parallel rank samples its share)
            pick = [i for i in sampler.draw(B * st.world.size // G) for _ in range(G)]
            sample = rollout_sampler(roles, prompt_ids, prompt_texts, pick, tok, cfg, cfg.algo, it)
            times: dict[str, float] = {}
            roles.entries.clear()  # forwards per role, counted for this iteration's row

            def phase(name: str):
                return timed(st.meter.phase(name), times, name)

            try:
                exp = make_group_experience(roles, sample, cfg, rewards, gen_mb, mb, it + 1, phase)
            except RewardError as e:
                skip_iteration(st, state, it, title, e)
                continue
            stats = group_update(roles, exp, cfg, optimizers["actor"], schedulers.get("actor"), mb, it + 1, order,
                                 phase, on_step=lambda step_stats: st.skipped(step_stats, it + 1), parking=parking)
            row = metrics_row(it, exp, stats, times, None, optimizers["actor"].param_groups[0]["lr"], mb, gen_mb,
                              st, cfg, device, rewards, roles, phases=PHASES, epochs=cfg.epochs)
            groups = exp.train_scores.view(-1, G)
            row["groups_without_signal"] = int(st.world.total(int((groups.max(1).values == groups.min(1).values).sum())))
            row.update(loss_scales(roles, ("actor",)))
            st.log(postfix={"reward": row["reward_mean"]}, **row)
            state["rewards"].append(row["reward_mean"])
            if row["kl"] is not None:
                state.setdefault("kls", []).append(row["kl"])
            state["iter_seconds"].append(sum(times.values()))
        check_not_all_skipped(state, cfg.iterations, title)
        eval_after = score_policy(roles, held, eval_fn, tok, cfg, use_reference=False) if held and eval_fn else None

        # ---- save -----------------------------------------------------------------------------
        meta = {"stage": cfg.algo, "merged": [str(Path(p).resolve()) for p in merged]}
        if st.world.main:
            eng.save_adapter("actor", st.out / "actor", extra_meta=meta)
        seen = state["rewards"]
        summary = st.finish({
            "algo": cfg.algo, "iterations": cfg.iterations, "global_rollout_batch": B * st.world.size, "skipped_iterations": state["skipped"],
            "group_size": G, "beta": cfg.beta, "merged_sft": [str(p) for p in merged],
            "reward": " + ".join(str(x) for x in (cfg.reward_model, cfg.reward, cfg.reward_cmd) if x),
            "reward_weights": rewards.weights,
            "reward_first5": mean(seen[:5]), "reward_last5": mean(seen[-5:]),
            "kl_last5": mean(state.get("kls", [])[-5:]),
            "heldout_before": state["eval_before"], "heldout_after": eval_after,
            "base_sha256_before": base_before, "base_sha256_after": base_fingerprint(eng),
            "seconds_per_iteration": mean(state["iter_seconds"]),
            "micro_batch": mb.size, "generation_batch": gen_mb.size, "oom_events": gen_mb.events + mb.events,
        }, counted_components(eng.model))
        try:
            from lowmem_rlhf.measure.plots import plot_ppo

            if st.world.main:
                plot_ppo(st.out / "metrics.jsonl", st.out / f"{cfg.algo}.png")
        except ImportError:
            pass
    return summary


__all__ = ["GRPOConfig", "run_grpo", "check_grpo", "PHASES"]
