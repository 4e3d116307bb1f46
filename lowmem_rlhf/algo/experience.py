"""PPO's experience: sample a rollout with the actor, score it with every role, shape the rewards.

    make_experience(...) -> Experience
      generation  the actor samples B responses of R tokens (left-padded prompts, KV cache)
      scoring     reward (reward adapter + head, or a program), reference log-probs (adapters off),
                  old log-probs + entropy (actor), values (critic); one micro-batch at a time
      then        per-token KL penalty, shaped rewards, GAE advantages and returns, whitening

The stage (`stages/ppo.py`) and the meta-device simulation (`measure/simulate.py`) both call it;
only the sampler differs, because `generate` decides on data (EOS, sampling) that meta tensors
do not have: the simulation passes its own prefill + decode steps.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from transformers import LogitsProcessorList

from lowmem_rlhf.algo import ppo_math as M
from lowmem_rlhf.algo.pairwise import last_token_scores
from lowmem_rlhf.algo.roles import Roles
from lowmem_rlhf.algo.sampling import RowGumbelSampler, row_seeds
from lowmem_rlhf.config import PPOConfig
from lowmem_rlhf.data import collate_left
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import logit_transform, output_layer
from lowmem_rlhf.runtime.oom import MicroBatch, maybe_inject

Phase = Callable[[str], ContextManager]


@dataclass
class Rollout:
    seqs: torch.Tensor  # (B, P + R) left-padded prompt + right-padded response
    mask: torch.Tensor | None  # (B, P + R) attention mask; None: unpadded rows (the simulation's)
    response: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) float, 1 on tokens up to and including the first EOS
    prompts: list[str]
    texts: list[str]
    ended: torch.Tensor | None = None  # (B,) bool: the response reached an EOS (None: all did)

    def rows(self, idx) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sequences, attention mask) of the rows `idx` (a slice or a list of indices)."""
        return self.seqs[idx], None if self.mask is None else self.mask[idx]


@dataclass
class Experience(Rollout):
    """A scored rollout: everything the PPO update reads. B rows, R response tokens."""

    logprobs: torch.Tensor | None = None  # (B, R) the actor's log-probs at sampling ("old")
    ref_logprobs: torch.Tensor | None = None  # (B, R) the reference's (adapters off)
    values: torch.Tensor | None = None  # (B, R) the critic's
    entropy: torch.Tensor | None = None  # (B, R) the actor's per-token entropy
    scores: torch.Tensor | None = None  # (B,) the reward of each response (as the reward gave it)
    train_scores: torch.Tensor | None = None  # (B,) what PPO optimised: missing-EOS penalty, normalised
    kl: torch.Tensor | None = None  # (B, R) per-token KL estimate, masked
    rewards: torch.Tensor | None = None  # (B, R) shaped: -kl_coef * kl, + score at the last token
    advantages: torch.Tensor | None = None  # (B, R) GAE (whitened if asked)
    returns: torch.Tensor | None = None  # (B, R) advantages + values

    @property
    def prompt_len(self) -> int:
        return self.seqs.shape[1] - self.response.shape[1]

    @functools.cached_property
    def seq_kl(self) -> float:
        """Mean per-sequence KL to the reference (sum over tokens, mean over rows); read once (a
        host sync), then kept: the KL controller and the metrics row both use it."""
        m = self.response_mask
        return float(M.masked_mean(self.kl, m) * m.sum() / len(m))


def stop_ids(model: torch.nn.Module, tok) -> list[int]:
    """Every id that ends a response: the generation config's EOS ids (Llama-3: <|end_of_text|> and
    <|eot_id|>) and the tokenizer's EOS, in that order, without repeats."""
    gen = getattr(model, "generation_config", None)
    ids = getattr(gen, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def response_mask(response: torch.Tensor, eos_ids: int | list[int]) -> torch.Tensor:
    """1.0 on tokens up to and including the first EOS (any of eos_ids) of each row, 0 after it.
    (B, R) -> (B, R)."""
    ids = torch.tensor([eos_ids] if isinstance(eos_ids, int) else eos_ids, device=response.device)
    is_eos = torch.isin(response, ids).long()
    after_first = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_first).float()


def ended_rows(response: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(B, R) -> (B,) bool: the row holds an EOS (it was not cut at the response length)."""
    return torch.isin(response, torch.tensor(eos_ids, device=response.device)).any(-1)


@torch.no_grad()
def generate(engine: SharedBase, prompt_ids: list[list[int]], tok, max_new: int, temperature: float,
             top_p: float, greedy: bool = False, prompt_texts: list[str] | None = None,
             seeds: list[int] | None = None) -> Rollout:
    """Sample responses with whatever adapter is active (or none, inside engine.reference()).
    seeds: one per row (`algo.sampling`): row b samples from its own stream, so the same rows
    sampled in other chunks give the same responses (default: drawn from torch's global RNG)."""
    engine.model.eval()
    batch = collate_left(prompt_ids, tok.pad_token_id)
    device = engine.loaded.device
    ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    kwargs: dict = dict(do_sample=False, num_beams=1)  # greedy search; sampling is the row sampler's argmax
    if not greedy:
        seeds = row_seeds(len(prompt_ids)) if seeds is None else seeds
        kwargs["logits_processor"] = LogitsProcessorList([RowGumbelSampler(seeds, temperature, top_p, device)])
    eos = stop_ids(engine.model, tok)
    out = engine.model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new, use_cache=True,
                                pad_token_id=tok.pad_token_id, eos_token_id=eos, **kwargs)
    response = out[:, ids.shape[1]:]
    if response.shape[1] < max_new:  # every row stopped early: pad to the planned length
        pad = torch.full((len(out), max_new - response.shape[1]), tok.pad_token_id, device=device, dtype=out.dtype)
        response = torch.cat([response, pad], 1)
    rmask = response_mask(response, eos)
    seqs = torch.cat([ids, response], 1)
    mask = torch.cat([am, rmask.long()], 1)
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, rmask)]
    engine.model.train()
    return Rollout(seqs, mask, response, rmask, prompt_texts or [], texts, ended_rows(response, eos))


def generate_in_chunks(engine: SharedBase, prompt_ids: list[list[int]], tok, max_new: int, temperature: float,
                       top_p: float, chunk: int, prompt_texts: list[str] | None = None,
                       seeds: list[int] | None = None) -> Rollout:
    """`generate` over chunks of `chunk` prompts, joined into one rollout: each chunk's left-padded
    prompts are padded further on the left to the longest prompt of all (mask 0 there, positions
    from the mask, so nothing else changes). (B, P + R) like one batched call; with the same
    per-row `seeds`, the same responses as one batched call (up to the float rounding of other
    batch shapes: tests/test_generation_batch.py)."""
    seeds = row_seeds(len(prompt_ids)) if seeds is None else seeds
    if chunk >= len(prompt_ids):
        return generate(engine, prompt_ids, tok, max_new, temperature, top_p, prompt_texts=prompt_texts, seeds=seeds)
    parts = [generate(engine, prompt_ids[i: i + chunk], tok, max_new, temperature, top_p, seeds=seeds[i: i + chunk])
             for i in range(0, len(prompt_ids), chunk)]
    P = max(r.seqs.shape[1] - max_new for r in parts)

    def left(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (P + max_new - t.shape[1], 0), value=value)

    return Rollout(torch.cat([left(r.seqs, tok.pad_token_id) for r in parts]),
                   torch.cat([left(r.mask, 0) for r in parts]),
                   torch.cat([r.response for r in parts]), torch.cat([r.response_mask for r in parts]),
                   prompt_texts or [], [t for r in parts for t in r.texts], torch.cat([r.ended for r in parts]))


def response_hidden(engine: SharedBase, seqs: torch.Tensor, mask: torch.Tensor | None, P: int) -> torch.Tensor:
    """Hidden states that predict each response token: positions P-1 .. P+R-2, (B, R, H)."""
    hidden = engine.hidden_states(seqs, mask)
    return hidden[:, P - 1: -1]


def logit_map(engine: SharedBase, temperature: float = 1.0) -> M.LogitMap:
    """The map from the output layer's logits to the sampled distribution: the model's own
    (softcapping, logit scale) then the sampling temperature."""
    scale, softcap = logit_transform(engine.loaded.model.config)
    return M.LogitMap(scale, softcap, temperature)


def logprobs_of(engine: SharedBase, h: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, R, H), (B, R) -> (B, R) fp32 log-probs of the distribution sampled at `temperature`,
    chunked over the vocabulary."""
    _, out = output_layer(engine.loaded.model)
    B, R, H = h.shape
    lp = M.token_logprobs(h.reshape(B * R, H), out.weight, tokens.reshape(-1), getattr(out, "bias", None),
                          fmap=logit_map(engine, temperature))
    return lp.view(B, R)


def entropy_of(engine: SharedBase, h: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, R, H) -> (B, R) fp32 entropy of the distribution sampled at `temperature`."""
    _, out = output_layer(engine.loaded.model)
    B, R, H = h.shape
    ent = M.token_entropy(h.reshape(B * R, H), out.weight, getattr(out, "bias", None), fmap=logit_map(engine, temperature))
    return ent.view(B, R)


def score_rollout(roles: Roles, ro: Rollout, size: int, iteration: int, learned_reward: bool,
                  temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Every role's forward over the rollout, `size` rows at a time (eval mode, no grad; the RL
    stage has no dropout, so these are the forwards the update repeats with gradients).
    Log-probs and entropy are those of the distribution sampled at `temperature`.
    -> scores (B,) (zeros when the reward is a program), ref_lp, old_lp, values, entropy (B, R)."""
    B, R = ro.response.shape
    P = ro.seqs.shape[1] - R
    device = ro.seqs.device
    scores = torch.zeros(B, device=device)
    ref_lp, old_lp, values, entropy = (torch.zeros(B, R, device=device) for _ in range(4))
    for s in range(0, B, size):
        maybe_inject("ppo", iteration, size)
        sl = slice(s, s + size)
        seqs, am = ro.rows(sl)
        if learned_reward:
            with roles.role("reward") as eng:
                scores[sl] = last_token_scores(eng, seqs, am)
        with roles.role("reference") as eng:
            ref_lp[sl] = logprobs_of(eng, response_hidden(eng, seqs, am, P), ro.response[sl], temperature)
        with roles.role("actor") as eng:
            h = response_hidden(eng, seqs, am, P)
            old_lp[sl] = logprobs_of(eng, h, ro.response[sl], temperature)
            entropy[sl] = entropy_of(eng, h, temperature)
        with roles.role("critic") as eng:
            values[sl] = eng.scalar(response_hidden(eng, seqs, am, P))
    return scores, ref_lp, old_lp, values, entropy


def adjust_scores(scores: torch.Tensor, ended: torch.Tensor | None, cfg: PPOConfig,
                  moments: M.RunningMoments | None) -> torch.Tensor:
    """The scores PPO optimises: minus cfg.missing_eos_penalty where a response was cut before
    any EOS (ended False), then normalised by the run's running moments when --reward-norm. (B,)."""
    if cfg.missing_eos_penalty and ended is not None:
        scores = scores - cfg.missing_eos_penalty * (~ended).to(scores.dtype)
    if moments is not None:
        scores = moments.normalize(scores)
    return scores


def make_experience(roles: Roles, sample: Callable[[int], Rollout], cfg: PPOConfig, kl_coef: float,
                    reward_fn: Callable[[list[str], list[str]], list[float]] | None, gen_mb: MicroBatch,
                    mb: MicroBatch, iteration: int, phase: Phase = lambda name: contextlib.nullcontext(),
                    moments: M.RunningMoments | None = None, learned_reward: bool | None = None) -> Experience:
    """One rollout, sampled and scored: generation -> scoring -> KL, shaped rewards, GAE.

    sample(size) -> Rollout samples the batch `size` prompts at a time, with the actor active;
    gen_mb/mb halve those sizes on out-of-memory. reward_fn(prompts, texts) scores the texts (a
    program) or None; learned_reward: the reward adapter + head scores too (default: when there is
    no program); with both, score = RM + cfg.reward_weight * program. kl_coef: this iteration's
    KL coefficient.
    moments: the running score moments (--reward-norm), updated here; None: raw scores.
    A failing reward_fn raises `RewardError` (the stage skips the iteration)."""
    learned = reward_fn is None if learned_reward is None else learned_reward
    with phase("generation"), roles.role("actor"):
        ro = gen_mb.run(iteration, sample, lambda: None)
    gc.collect()
    if ro.seqs.device.type == "cuda":
        torch.cuda.empty_cache()  # the generation cache is gone before scoring
    try:
        with phase("scoring"), torch.no_grad():
            roles.train(False)
            program = (torch.tensor(reward_fn(ro.prompts, ro.texts), device=ro.seqs.device, dtype=torch.float32)
                       if reward_fn is not None else None)
            scores, ref_lp, old_lp, values, entropy = mb.run(
                iteration, lambda size: score_rollout(roles, ro, size, iteration, learned, cfg.temperature),
                lambda: None)
    finally:
        roles.train(True)
    if program is not None:
        scores = scores + cfg.reward_weight * program if learned else program
    m = ro.response_mask
    kl = M.kl_estimate(old_lp, ref_lp, cfg.kl_estimator) * m
    train_scores = adjust_scores(scores, ro.ended, cfg, moments)
    rewards = M.shaped_rewards(train_scores, kl, m, kl_coef)
    adv, returns = M.gae(rewards, values, m, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        adv = M.whiten(adv, m)
    return Experience(ro.seqs, ro.mask, ro.response, m, ro.prompts, ro.texts, ro.ended, logprobs=old_lp,
                      ref_logprobs=ref_lp, values=values, entropy=entropy, scores=scores, train_scores=train_scores,
                      kl=kl, rewards=rewards, advantages=adv, returns=returns)


__all__ = ["Rollout", "Experience", "make_experience", "score_rollout", "generate", "generate_in_chunks",
           "response_mask", "response_hidden", "logprobs_of", "entropy_of", "logit_map", "stop_ids", "ended_rows",
           "adjust_scores"]
