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
from lowmem_rlhf.algo.experience import (
    Experience,
    Phase,
    logprobs_of,
    response_hidden,
    stage_key,
)
from lowmem_rlhf.algo.roles import Roles
from lowmem_rlhf.config import PPOConfig
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.runtime.distributed import world
from lowmem_rlhf.runtime.oom import MicroBatch, maybe_inject
from lowmem_rlhf.runtime.optim import (
    OptimizerParking,
    StepUndo,
    finite,
    optimizer_step,
    overflow_is_expected,
)

LossFn = Callable[[SharedBase, Experience, list[int], PPOConfig, torch.Tensor], tuple[torch.Tensor, dict]]


def actor_loss(eng: SharedBase, exp: Experience, idx: list[int], cfg: PPOConfig,
               tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate over the rows `idx`, with the actor active (plus the k3 KL term where
    exp.kl_loss_coef > 0): the sum of their token losses divided by `tokens`, the minibatch's
    response tokens -> (loss, stats)."""
    seqs, am = exp.rows(idx)
    lp = logprobs_of(eng, response_hidden(eng, seqs, am, exp.prompt_len), exp.response[idx], cfg.temperature)
    ref = exp.ref_logprobs[idx] if exp.kl_loss_coef else None
    pl = M.policy_loss(lp, exp.logprobs[idx], exp.advantages[idx], exp.response_mask[idx], cfg.clip, tokens,
                       ref, exp.kl_loss_coef)
    return pl.loss, {"policy_loss": pl.loss.detach(), "clip_frac": pl.clip_frac, "approx_kl": pl.approx_kl,
                     "ratio_mean": pl.ratio_mean, "max_abs_log_ratio": pl.max_abs_log_ratio}


def critic_loss(eng: SharedBase, exp: Experience, idx: list[int], cfg: PPOConfig,
                tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Clipped value loss over the rows `idx`, with the critic active, divided by `tokens` as
    actor_loss -> (loss, stats). Where the experience's values are pending (`values_at_update`),
    this forward, the critic's first at the rollout's parameters, gives them (and the rows' GAE):
    the loss is then the plain squared error, nothing clipped."""
    seqs, am = exp.rows(idx)
    v = eng.scalar(response_hidden(eng, seqs, am, exp.prompt_len))
    if exp.values_pending:
        exp.take_values(idx, v.detach(), cfg.gamma, cfg.lam)
    vl, vf = M.value_loss(v, exp.values[idx], exp.returns[idx], exp.response_mask[idx], cfg.vf_clip, tokens)
    return vl, {"value_loss": vl.detach(), "vf_clip_frac": vf}


def loss_denominator(exp: Experience, chunk: list[int], cfg) -> torch.Tensor:
    """What each micro-batch's loss sum is divided by: the chunk's response tokens (a token mean),
    or its rows where the loss is a per-response mean (GRPO's --loss-agg sequence). In a
    data-parallel run the count is the global minibatch's over the world size:
    DDP's average of the ranks' gradients is then the global minibatch's mean."""
    if getattr(cfg, "loss_agg", "token") == "sequence":
        count = torch.tensor(float(len(chunk)), device=exp.response_mask.device)
    else:
        count = exp.response_mask[chunk].sum()
    w = world()
    return count.clamp(min=1) if w.size == 1 else w.sum(count.float()).clamp(min=1) / w.size


def accumulate(eng: SharedBase, exp: Experience, chunk: list[int], size: int, iteration: int, loss_of: LossFn,
               cfg: PPOConfig) -> dict[str, list[torch.Tensor]]:
    """Backward of `loss_of` over the rollout rows `chunk`, `size` rows at a time, gradients
    accumulated in the active adapter. Each micro-batch's loss is its token sum over the chunk's
    token count, so the gradient is the token mean over the chunk whatever `size` is (and the
    micro-batches' loss values add up to the chunk's). -> per-micro-batch statistics (tensors)."""
    tokens = loss_denominator(exp, chunk, cfg)
    st: dict[str, list[torch.Tensor]] = {}
    for s in range(0, len(chunk), size):
        maybe_inject(stage_key(cfg), iteration, size, "start" if s == 0 else "mid")
        idx = chunk[s: s + size]
        loss, extra = eng.train_forward(loss_of, eng, exp, idx, cfg, tokens, last=s + size >= len(chunk))
        eng.backward(loss)
        for k, v in extra.items():  # kept as tensors: no host sync per micro-batch
            st.setdefault(k, []).append(v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
    return st


def update_adapter(eng: SharedBase, adapter: str, opt: torch.optim.Optimizer, scheduler, exp: Experience,
                   chunk: list[int], mb: MicroBatch, iteration: int, loss_of: LossFn,
                   cfg: PPOConfig) -> tuple[dict[str, list[torch.Tensor]], dict[str, bool]]:
    """One optimizer step of the active adapter on the rollout rows `chunk`, accumulated over
    micro-batches; an out-of-memory anywhere in it (a micro-batch, the clipping, the optimizer step)
    is undone and the step retried at half the micro-batch. -> (per-micro-batch statistics,
    {"skipped": the step was skipped for a NaN/inf loss or gradient, "overflow": that was an fp16
    overflow its loss scale corrects, "role": adapter})."""
    scaler = eng.scalers.get(adapter)
    undo = StepUndo(eng.parameters_of(adapter), opt, scaler)

    def reset() -> None:  # what an OOM mid-step undoes: partial gradients, the pending forward, a partial update
        opt.zero_grad(set_to_none=True)
        eng.abandon()
        undo.undo()

    def step(size: int):
        st = accumulate(eng, exp, chunk, size, iteration, loss_of, cfg)
        return st, optimizer_step(opt, eng.parameters_of(adapter), scheduler, undo=undo,
                                  fault=(stage_key(cfg), iteration, size, adapter), scaler=scaler)

    st, norm = mb.run(iteration, step, reset)
    st[f"grad_norm_{adapter}"] = [norm.detach().float()]  # before clipping; the ranks' average in data parallel
    skipped = not finite(norm)
    return st, {"skipped": skipped, "overflow": skipped and overflow_is_expected(scaler), "role": adapter}


def minibatch_count(minibatches: int, rows: int) -> int:
    """Optimizer steps per PPO epoch: --minibatches, at most one per rollout row."""
    return max(1, min(minibatches, rows))


PPO_LOSSES: tuple[tuple[str, LossFn], ...] = (("actor", actor_loss), ("critic", critic_loss))


def ppo_update(roles: Roles, exp: Experience, cfg: PPOConfig, optimizers: dict, schedulers: dict,
               mb: MicroBatch, iteration: int, order: torch.Generator,
               phase: Phase = lambda name: contextlib.nullcontext(),
               on_step: Callable[[dict], None] = lambda step_stats: None,
               parking: OptimizerParking | None = None,
               losses: tuple[tuple[str, LossFn], ...] = PPO_LOSSES, epochs: int | None = None) -> dict[str, torch.Tensor]:
    """`epochs` (default cfg.ppo_epochs) passes over the experience, cfg.minibatches optimizer steps
    each; on each minibatch every (role, loss) of `losses` in turn, inside phase("<role>_update"):
    PPO's actor then critic (critic first where values are pending, below); GRPO/RLOO pass the
    actor and its group loss alone (`algo.grpo`).
    order: the generator that shuffles the rows. -> each loss statistic (0-d tensors): the mean
    over micro-batches (losses: summed per minibatch, then averaged), max_abs_log_ratio's max, and
    first_* for the first minibatch of the first epoch, taken before any step: its ratio is 1
    exactly when the update repeats the rollout's forward (no dropout, same temperature).
    on_step({"skipped", "overflow", "role"}) after each optimizer step: the stage counts skipped steps.
    parking: only the updating role's optimizer state on the device (`OptimizerParking`).
    An experience whose critic values are pending (`algo.experience.values_at_update`: one
    minibatch) steps the critic first: its first forward takes the values, and the advantages the
    actor's step reads, at the rollout's parameters (the roles' steps are independent otherwise)."""
    B = len(exp.seqs)
    stats: dict[str, list[torch.Tensor]] = {}
    n_mb = minibatch_count(cfg.minibatches, B)
    if exp.values_pending:
        if n_mb != 1 or "critic" not in dict(losses):
            raise ValueError(f"critic values pending with {n_mb} minibatches and losses {[r for r, _ in losses]}: "
                             "they are taken by the critic's step over the whole rollout")
        losses = tuple(sorted(losses, key=lambda rl: rl[0] != "critic"))
    first: dict[str, torch.Tensor] = {}
    for epoch in range(cfg.ppo_epochs if epochs is None else epochs):
        perm = torch.randperm(B, generator=order).tolist()
        for j, chunk in enumerate([perm[i::n_mb] for i in range(n_mb)]):
            for role, loss_of in losses:
                with phase(f"{role}_update"), roles.role(role) as eng, \
                        (parking.active(role) if parking else contextlib.nullcontext()):
                    st, step_stats = update_adapter(eng, role, optimizers[role], schedulers.get(role), exp, chunk,
                                                 mb, iteration, loss_of, cfg)
                if exp.values_pending and role == "critic":
                    exp.values_taken(cfg.whiten_advantages)
                on_step(step_stats)
                for k in ("policy_loss", "value_loss"):  # micro-batch parts of one minibatch's loss
                    if k in st:
                        st[k] = [torch.stack(st[k]).sum()]
                if epoch == 0 and j == 0:
                    for k in ("max_abs_log_ratio", "clip_frac", "vf_clip_frac"):
                        if k in st:
                            first[f"first_{k}"] = torch.stack(st[k]).max()
                for k, v in st.items():
                    stats.setdefault(k, []).extend(v)
    out = {k: (torch.stack(v).max() if k.startswith("max_") else torch.stack(v).mean()) for k, v in stats.items() if v}
    return {**out, **first}


__all__ = ["ppo_update", "PPO_LOSSES", "loss_denominator", "minibatch_count", "update_adapter", "accumulate", "actor_loss", "critic_loss"]
