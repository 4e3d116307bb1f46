"""GRPO and RLOO on the shared base: no critic, no value head. One iteration:

    make_group_experience(...) -> Experience
      sample_and_score(...)   generation of B = prompts x G responses (generation batch), scoring:
                              rewards, the reference only when beta > 0, the actor's old log-probs
      then                    group advantages (GRPO) or leave-one-out (RLOO), broadcast over tokens
    group_update(...)         the actor's clipped surrogate + beta x k3 KL (`algo.grpo_math`)

The stage (`stages/grpo.py`) and the simulation (`measure/simulate.py`) both call these. The update
is `algo.ppo.ppo_update` with the actor alone: the same micro-batching, out-of-memory undo, NaN
guard and optimizer parking as PPO's actor.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from lowmem_rlhf.algo import grpo_math as G
from lowmem_rlhf.algo.experience import (
    Experience,
    Phase,
    Rollout,
    adjust_scores,
    logprobs_of,
    response_hidden,
    sample_and_score,
)
from lowmem_rlhf.algo.ppo import ppo_update
from lowmem_rlhf.algo.rewards import RewardSet
from lowmem_rlhf.algo.roles import Roles
from lowmem_rlhf.config import GRPOConfig
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.runtime.oom import MicroBatch
from lowmem_rlhf.runtime.optim import OptimizerParking


def advantages(scores: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """(B,) scores -> (B,) advantages by cfg.algo (grpo: cfg.std_norm; rloo) over groups of cfg.group_size."""
    if cfg.algo == "rloo":
        return G.rloo_advantages(scores, cfg.group_size)
    return G.group_advantages(scores, cfg.group_size, cfg.std_norm)


def make_group_experience(roles: Roles, sample: Callable[[int], Rollout], cfg: GRPOConfig, rewards: RewardSet,
                          gen_mb: MicroBatch, mb: MicroBatch, iteration: int,
                          phase: Phase = lambda name: contextlib.nullcontext()) -> Experience:
    """One rollout (each prompt's cfg.group_size responses side by side), sampled and scored, with
    its group advantages. The reference runs only when cfg.beta > 0 (its log-probs feed the KL
    term); the critic never. Experience.advantages is (B, R): each row's advantage on its tokens;
    kl (B, R) the k3 estimate, None without a reference."""
    sc = sample_and_score(roles, sample, cfg, rewards, gen_mb, mb, iteration, phase, critic=False,
                          reference=cfg.beta > 0)
    ro, m = sc.rollout, sc.rollout.response_mask
    train_scores = adjust_scores(sc.scores, ro.ended, cfg, None)
    adv = advantages(train_scores, cfg)[:, None] * m
    kl = G.masked_k3(sc.old_lp, sc.ref_lp, m) if sc.ref_lp is not None else None
    return Experience(ro.seqs, ro.mask, ro.response, m, ro.prompts, ro.texts, ro.ended, logprobs=sc.old_lp,
                      ref_logprobs=sc.ref_lp, entropy=sc.entropy, scores=sc.scores, train_scores=train_scores,
                      kl=kl, advantages=adv, components=sc.components)


def group_loss(eng: SharedBase, exp: Experience, idx: list[int], cfg: GRPOConfig,
               denom: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The group policy loss over the rows `idx`, with the actor active, divided by `denom` (the
    minibatch's tokens or rows, `algo.ppo.loss_denominator`) -> (loss, stats)."""
    seqs, am = exp.rows(idx)
    lp = logprobs_of(eng, response_hidden(eng, seqs, am, exp.prompt_len), exp.response[idx], cfg.temperature)
    ref = None if exp.ref_logprobs is None else exp.ref_logprobs[idx]
    gl = G.group_policy_loss(lp, exp.logprobs[idx], ref, exp.advantages[idx], exp.response_mask[idx],
                             cfg.clip, cfg.beta, cfg.loss_agg, denom)
    stats = {"policy_loss": gl.loss.detach(), "clip_frac": gl.clip_frac, "ratio_mean": gl.ratio_mean,
             "max_abs_log_ratio": gl.max_abs_log_ratio}
    if ref is not None:  # --beta 0: the reference never ran, its KL is not known
        stats["kl_to_reference"] = gl.kl
    return gl.loss, stats


def group_update(roles: Roles, exp: Experience, cfg: GRPOConfig, optimizer: torch.optim.Optimizer, scheduler,
                 mb: MicroBatch, iteration: int, order: torch.Generator,
                 phase: Phase = lambda name: contextlib.nullcontext(),
                 on_step: Callable[[dict], None] = lambda step_stats: None,
                 parking: OptimizerParking | None = None) -> dict[str, torch.Tensor]:
    """cfg.epochs passes, cfg.minibatches actor steps each, inside phase("actor_update"): PPO's
    update loop with the actor and `group_loss` alone. -> the loss statistics (0-d tensors)."""
    return ppo_update(roles, exp, cfg, {"actor": optimizer}, {"actor": scheduler} if scheduler else {}, mb,
                      iteration, order, phase, on_step, parking, losses=(("actor", group_loss),), epochs=cfg.epochs)


__all__ = ["advantages", "make_group_experience", "group_loss", "group_update"]
