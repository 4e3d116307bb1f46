"""The PPO update: epochs over one `Experience`, the actor's clipped policy loss and the critic's
clipped value loss, each backward while its own adapter is active (docs/pitfalls.md #2), each
adapter stepped by `runtime.optim.optimizer_step`.

The stage (`stages/ppo.py`) and the simulation (`measure/simulate.py`) both call `ppo_update`.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from lowmem_rlhf.algo import ppo_math as M
from lowmem_rlhf.algo.experience import Experience, Phase, logprobs_of, response_hidden
from lowmem_rlhf.algo.roles import Roles
from lowmem_rlhf.config import PPOConfig
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.runtime.oom import MicroBatch, maybe_inject
from lowmem_rlhf.runtime.optim import optimizer_step

LossFn = Callable[[SharedBase, Experience, list[int], PPOConfig], tuple[torch.Tensor, dict]]


def actor_loss(eng: SharedBase, exp: Experience, idx: list[int], cfg: PPOConfig) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate over the rows `idx`, with the actor active -> (loss, stats)."""
    seqs, am = exp.rows(idx)
    lp = logprobs_of(eng, response_hidden(eng, seqs, am, exp.prompt_len), exp.response[idx])
    pl = M.policy_loss(lp, exp.logprobs[idx], exp.advantages[idx], exp.response_mask[idx], cfg.clip)
    return pl.loss, {"policy_loss": pl.loss.detach(), "clip_frac": pl.clip_frac, "approx_kl": pl.approx_kl,
                     "ratio_mean": pl.ratio_mean}


def critic_loss(eng: SharedBase, exp: Experience, idx: list[int], cfg: PPOConfig) -> tuple[torch.Tensor, dict]:
    """Clipped value loss over the rows `idx`, with the critic active -> (loss, stats)."""
    seqs, am = exp.rows(idx)
    v = eng.scalar(response_hidden(eng, seqs, am, exp.prompt_len))
    vl, vf = M.value_loss(v, exp.values[idx], exp.returns[idx], exp.response_mask[idx], cfg.vf_clip)
    return vl, {"value_loss": vl.detach(), "vf_clip_frac": vf}


def update_adapter(eng: SharedBase, adapter: str, opt: torch.optim.Optimizer, scheduler, exp: Experience,
                   chunk: list[int], mb: MicroBatch, iteration: int, loss_of: LossFn,
                   cfg: PPOConfig) -> dict[str, list[torch.Tensor]]:
    """One optimizer step of the active adapter on the rollout rows `chunk`, accumulated over
    micro-batches (halved and retried on OOM)."""
    def grads(size: int) -> dict[str, list[torch.Tensor]]:
        st: dict[str, list[torch.Tensor]] = {}
        for s in range(0, len(chunk), size):
            maybe_inject("ppo", iteration, size)
            idx = chunk[s: s + size]
            loss, extra = loss_of(eng, exp, idx, cfg)
            eng.backward(loss * len(idx) / len(chunk))
            for k, v in extra.items():  # kept as tensors: no host sync per micro-batch
                st.setdefault(k, []).append(v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
        return st

    def reset() -> None:  # what an OOM mid-update undoes: the partial gradients and the pending forward
        opt.zero_grad(set_to_none=True)
        eng.abandon()

    st = mb.run(iteration, grads, reset)
    optimizer_step(opt, eng.parameters_of(adapter), scheduler)
    return st


def minibatch_count(minibatches: int, rows: int) -> int:
    """Optimizer steps per PPO epoch: --minibatches, at most one per rollout row."""
    return max(1, min(minibatches, rows))


def ppo_update(roles: Roles, exp: Experience, cfg: PPOConfig, optimizers: dict, schedulers: dict,
               mb: MicroBatch, iteration: int, order: torch.Generator,
               phase: Phase = lambda name: contextlib.nullcontext()) -> dict[str, torch.Tensor]:
    """cfg.ppo_epochs passes over the experience, cfg.minibatches optimizer steps each; on each
    minibatch the actor, then the critic, inside phase("actor_update") / phase("critic_update").
    order: the generator that shuffles the rows. -> the mean of each loss statistic (0-d tensors)."""
    B = len(exp.seqs)
    stats: dict[str, list[torch.Tensor]] = {}
    n_mb = minibatch_count(cfg.minibatches, B)
    for _epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(B, generator=order).tolist()
        for chunk in [perm[i::n_mb] for i in range(n_mb)]:
            for role, loss_of in (("actor", actor_loss), ("critic", critic_loss)):
                with phase(f"{role}_update"), roles.role(role) as eng:
                    st = update_adapter(eng, role, optimizers[role], schedulers.get(role), exp, chunk, mb,
                                        iteration, loss_of, cfg)
                for k, v in st.items():
                    stats.setdefault(k, []).extend(v)
    return {k: torch.stack(v).mean() for k, v in stats.items() if v}


__all__ = ["ppo_update", "minibatch_count", "update_adapter", "actor_loss", "critic_loss"]
