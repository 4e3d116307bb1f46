"""What the RL stages (PPO, GRPO/RLOO) share around their loops: checks before loading, the held-out
scoring of a policy, the per-phase timer, the rollout sampler and the logged reward components."""

from __future__ import annotations

import time
from typing import Callable

import torch

from lowmem_rlhf import data as D
from lowmem_rlhf.algo.demo_task import lenient, strict
from lowmem_rlhf.algo.experience import (
    Experience,
    Rollout,
    generate,
    generate_in_chunks,
    logprobs_at_sampling,
)
from lowmem_rlhf.algo.rewards import FunctionReward, RewardSet
from lowmem_rlhf.algo.roles import Roles
from lowmem_rlhf.algo.sampling import row_seeds
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.runtime.distributed import AdapterSync, world
from lowmem_rlhf.runtime.oom import maybe_inject


def check_rollout(rollout_batch: int, per_prompt: int, flag: str = "--samples-per-prompt", minimum: int = 1,
                  why: str = "") -> None:
    """One line, before anything loads, unless the rollout splits into whole prompts of `per_prompt`
    responses each (at least `minimum`; `why` says what a smaller one would break)."""
    B, k = rollout_batch, per_prompt
    if k < minimum:
        raise UserError(f"{flag} must be at least {minimum}, got {k}{why}")
    if B % k:
        raise UserError(f"{flag} {k} must divide --rollout-batch {B}: use --rollout-batch {max(B - B % k, k)}")


def skip_iteration(st, state: dict, iteration: int, title: str, error: Exception) -> None:
    """A reward that failed (`RewardError`): the iteration is logged as skipped, never trained on,
    and counted; `check_not_all_skipped` refuses a run where every iteration was."""
    state["skipped"] += 1
    state["skip_reason"] = str(error)
    st.log(iteration=iteration + 1, skipped=True, reason=str(error))
    st.say(f"{title} iteration {iteration + 1} skipped: {error}")


def check_not_all_skipped(state: dict, iterations: int, title: str) -> None:
    """One line (and no finished stage) when the reward failed on every iteration."""
    if state["skipped"] == iterations:
        raise UserError(f"every {title} iteration was skipped because the reward failed ({iterations} of "
                        f"{iterations}; last: {state.get('skip_reason', '?')}); fix the reward and re-run")


def loss_scales(roles: Roles, trained: tuple[str, ...]) -> dict[str, float]:
    """fp16 only: each trained adapter's current loss scale, for the metrics row."""
    return {f"loss_scale_{r}": roles.engines[r].scalers[r].get_scale() for r in trained
            if r in roles.engines[r].scalers}


def eval_function(eval_reward: str | None, rewards: RewardSet):
    """The held-out scorer: --eval-reward, else the training reward when it is a function."""
    if eval_reward:
        return FunctionReward(eval_reward)
    return rewards.programs.get("reward")


@torch.no_grad()
def score_policy(roles: Roles, prompts: list[D.PromptExample], fn, tok, cfg, use_reference: bool) -> dict:
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


def rollout_sampler(roles: Roles, prompt_ids: list[list[int]], prompt_texts: list[str], pick: list[int], tok, cfg,
                    stage: str, iteration: int) -> Callable[[int], Rollout]:
    """sample(size): the rows `pick` (prompt indices, each prompt's responses side by side) sampled
    by the actor `size` rows at a time, one random stream per row (`algo.sampling`): the rollout is
    the same at any generation batch. Seeds are drawn here, once per iteration. In a data-parallel
    run `pick` is the global rollout and each rank samples its contiguous share of it (whole
    prompts' groups when the share is a multiple of the group size), each row with the seed one
    process would give it: N ranks sample the rollout one process with N x the batch samples."""
    torch.manual_seed(cfg.seed * 100_003 + iteration)
    seeds = row_seeds(len(pick))
    w = world()  # a data-parallel rank samples its rows of the global rollout, with their seeds
    pick, seeds = w.mine(pick), w.mine(seeds)
    record = cfg.sampler_logprobs and logprobs_at_sampling(roles.engines["actor"])  # fp32: old log-probs kept

    def sample(size: int) -> Rollout:
        maybe_inject(f"{stage}-generation", iteration + 1, size)
        return generate_in_chunks(roles.engines["actor"], [prompt_ids[i] for i in pick], tok, cfg.response_len,
                                  cfg.temperature, cfg.top_p, size, prompt_texts=[prompt_texts[i] for i in pick],
                                  seeds=seeds, record=record)

    return sample


def sync_adapters(roles: Roles, trained: tuple[str, ...], device: torch.device) -> None:
    """In a data-parallel run: each trained role's gradients averaged across the ranks by DDP over
    that adapter's parameters (`runtime.distributed.AdapterSync`, built while the role is active;
    rank 0's values broadcast to all). Nothing in one process."""
    if world().size == 1:
        return
    for role in trained:
        with roles.role(role) as eng:
            eng.grad_sync[role] = AdapterSync(eng.parameters_of(role), device)


def component_means(exp: Experience, rewards: RewardSet) -> dict[str, float]:
    """Each reward's mean score this iteration ("score_<flag name>") and its weight: the weighted
    means add up to reward_mean."""
    out: dict[str, float] = {}
    for name in rewards.names:
        out[f"score_{name}"] = float(exp.components[name].mean())
        out[f"weight_{name}"] = rewards.weights[name]
    return out


class timed:
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


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


__all__ = ["check_rollout", "skip_iteration", "check_not_all_skipped", "loss_scales", "eval_function", "score_policy", "rollout_sampler", "sync_adapters", "component_means", "timed", "mean"]
