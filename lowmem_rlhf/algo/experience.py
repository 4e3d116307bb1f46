"""PPO's experience: sample a rollout with the actor, score it with every role, shape the rewards.

    make_experience(...) -> Experience
      sample_and_score(...)   (PPO and GRPO/RLOO share it)
        generation  the actor samples B responses of R tokens (left-padded prompts, KV cache)
        scoring     rewards (reward adapter + head, programs; weighted sum), reference log-probs
                    (adapters off), old log-probs + entropy (actor), values (critic); one
                    micro-batch at a time
      then        per-token KL penalty, shaped rewards, GAE advantages and returns, whitening
    With one minibatch per epoch (`values_at_update`) the critic's values, and the GAE that needs
    them, wait for the critic's first update forward (`Experience.take_values`, `algo.ppo`).

The stage (`stages/ppo.py`) and the meta-device simulation (`measure/simulate.py`) both call it;
only the sampler differs, because `generate` decides on data (EOS, sampling) that meta tensors
do not have: the simulation passes its own prefill + decode steps.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from transformers import LogitsProcessorList

from lowmem_rlhf.algo import ppo_math as M
from lowmem_rlhf.algo.pairwise import last_token_scores
from lowmem_rlhf.algo.rewards import RewardError, RewardSet
from lowmem_rlhf.algo.roles import Roles
from lowmem_rlhf.algo.sampling import RowGumbelSampler, row_seeds
from lowmem_rlhf.config import PPOConfig
from lowmem_rlhf.data import collate_left
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import logit_transform, output_layer
from lowmem_rlhf.runtime.distributed import world
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
    logprobs: torch.Tensor | None = None  # (B, R) fp32 log-probs of the sampled tokens, kept by the sampler
    entropy: torch.Tensor | None = None  # (B, R) fp32 entropy at each step, kept with them (None: not kept)

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
    components: dict[str, torch.Tensor] | None = None  # (B,) each reward's own score (`algo.rewards.RewardSet`)
    kl_loss_coef: float = 0.0  # weight of the actor loss's k3 KL term (PPO --kl-penalty loss); 0: none
    values_pending: bool = False  # values, advantages, returns: zeros until the critic's first update forward

    def take_values(self, idx: list[int] | slice, values: torch.Tensor, gamma: float, lam: float) -> None:
        """The critic's values of the rows `idx` (b, R), from a forward at the rollout's parameters
        (its first update forward, `algo.ppo.critic_loss`): kept as the old values, with those rows'
        GAE advantages (not yet whitened) and returns. GAE runs along each row alone, so rows taken
        in any grouping give what one pass over the batch gives."""
        self.values[idx] = values.to(self.values.dtype)
        self.advantages[idx], self.returns[idx] = M.gae(self.rewards[idx], self.values[idx],
                                                        self.response_mask[idx], gamma, lam)

    def values_taken(self, whiten: bool) -> None:
        """Every row's values were taken (`take_values`): whiten the advantages over the batch (the
        global batch in a data-parallel run) where asked, as `make_experience` does otherwise."""
        if whiten:
            self.advantages = M.whiten(self.advantages, self.response_mask, reduce=global_sum())
        self.values_pending = False

    @property
    def prompt_len(self) -> int:
        return self.seqs.shape[1] - self.response.shape[1]

    @functools.cached_property
    def seq_kl(self) -> float:
        """Mean per-sequence KL to the reference (sum over tokens, mean over rows; the global batch's
        in a data-parallel run, so every rank's KL controller moves alike); read once (a host sync),
        then kept: the KL controller and the metrics row both use it."""
        m = self.response_mask
        if self.kl is None:  # no reference forward (GRPO with --beta 0): the KL was not measured
            return float("nan")
        w = world()
        if w.size == 1:
            return float(M.masked_mean(self.kl, m) * m.sum() / len(m))
        return w.total(float((self.kl * m).sum())) / (len(m) * w.size)


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


# generation-config settings whose logits processors change the distribution greedy search reads
LOGIT_PROCESSORS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                    "min_length": 0, "min_new_tokens": None, "forced_bos_token_id": None,
                    "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None}


def logprobs_at_sampling(engine: SharedBase) -> bool:
    """Whether the sampler's log-probs (`RowGumbelSampler(record=True)`) are the ones the actor's
    scoring forward would compute, so that forward can be skipped: an fp32 model without
    quantization (16-bit logits are off by up to 0.04 nats: the scoring forward takes them in
    fp32 from fp32 products), and no generation-config processor changing the logits before the
    sampler (repetition penalty and the like). The model's own logit map (softcapping, scale) is in
    the logits transformers passes to the sampler, temperature is applied there."""
    prof = engine.profile
    if prof.dtype != "fp32" or prof.quant != "none":
        return False
    _, out = output_layer(engine.loaded.model)
    if out.weight.dtype != torch.float32:
        return False
    gen = getattr(engine.loaded.model, "generation_config", None)
    return gen is None or all(getattr(gen, k, v) in (v, None) for k, v in LOGIT_PROCESSORS.items())


@torch.no_grad()
def generate(engine: SharedBase, prompt_ids: list[list[int]], tok, max_new: int, temperature: float,
             top_p: float, greedy: bool = False, prompt_texts: list[str] | None = None,
             seeds: list[int] | None = None, record: bool = False) -> Rollout:
    """Sample responses with whatever adapter is active (or none, inside engine.reference()).
    seeds: one per row (`algo.sampling`): row b samples from its own stream, so the same rows
    sampled in other chunks give the same responses (default: drawn from torch's global RNG).
    record: keep the sampled tokens' log-probs and entropies at `temperature` (Rollout.logprobs,
    .entropy; only where `logprobs_at_sampling` says they equal the scoring forward's)."""
    engine.model.eval()
    batch = collate_left(prompt_ids, tok.pad_token_id)
    device = engine.loaded.device
    ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    kwargs: dict = dict(do_sample=False, num_beams=1)  # greedy search; sampling is the row sampler's argmax
    if engine.profile.static_cache:  # preallocated for prompt + max_new (the size the estimator charges)
        kwargs["cache_implementation"] = "static"
    sampler = None
    if not greedy:
        seeds = row_seeds(len(prompt_ids)) if seeds is None else seeds
        sampler = RowGumbelSampler(seeds, temperature, top_p, device, record=record)
        kwargs["logits_processor"] = LogitsProcessorList([sampler])
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
    lp, ent = sampler.recorded(max_new) if sampler is not None and record else (None, None)
    return Rollout(seqs, mask, response, rmask, prompt_texts or [], texts, ended_rows(response, eos), lp, ent)


def generate_in_chunks(engine: SharedBase, prompt_ids: list[list[int]], tok, max_new: int, temperature: float,
                       top_p: float, chunk: int, prompt_texts: list[str] | None = None,
                       seeds: list[int] | None = None, record: bool = False) -> Rollout:
    """`generate` over chunks of `chunk` prompts, joined into one rollout: each chunk's left-padded
    prompts are padded further on the left to the longest prompt of all (mask 0 there, positions
    from the mask, so nothing else changes). (B, P + R) like one batched call; with the same
    per-row `seeds`, the same responses as one batched call (up to the float rounding of other
    batch shapes: tests/test_generation_batch.py)."""
    seeds = row_seeds(len(prompt_ids)) if seeds is None else seeds
    if chunk >= len(prompt_ids):
        return generate(engine, prompt_ids, tok, max_new, temperature, top_p, prompt_texts=prompt_texts, seeds=seeds,
                        record=record)
    parts = [generate(engine, prompt_ids[i: i + chunk], tok, max_new, temperature, top_p, seeds=seeds[i: i + chunk],
                      record=record)
             for i in range(0, len(prompt_ids), chunk)]
    P = max(r.seqs.shape[1] - max_new for r in parts)

    def left(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (P + max_new - t.shape[1], 0), value=value)

    return Rollout(torch.cat([left(r.seqs, tok.pad_token_id) for r in parts]),
                   torch.cat([left(r.mask, 0) for r in parts]),
                   torch.cat([r.response for r in parts]), torch.cat([r.response_mask for r in parts]),
                   prompt_texts or [], [t for r in parts for t in r.texts], torch.cat([r.ended for r in parts]),
                   torch.cat([r.logprobs for r in parts]) if record else None,
                   torch.cat([r.entropy for r in parts]) if record else None)


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


def stage_key(cfg) -> str:
    """The RL stage's name in the fault-injection switches (runtime/oom.py): ppo, grpo or rloo."""
    return getattr(cfg, "algo", "ppo")


def score_rollout(roles: Roles, ro: Rollout, size: int, iteration: int, learned_reward: bool,
                  temperature: float = 1.0, critic: bool = True, reference: bool = True,
                  stage: str = "ppo") -> tuple:
    """Every role's forward over the rollout, `size` rows at a time (eval mode, no grad; the RL
    stage has no dropout, so these are the forwards the update repeats with gradients).
    Log-probs and entropy are those of the distribution sampled at `temperature`.
    critic / reference False: that role's forward is not run (GRPO: no critic; --beta 0: no reference).
    A rollout whose sampler kept its log-probs (`logprobs_at_sampling`) skips the actor's forward:
    old log-probs and entropy are the sampler's.
    stage: the RL stage's name in the fault-injection switch.
    -> scores (B,) (zeros without a reward model), ref_lp, old_lp, values, entropy (B, R); ref_lp
    and values None where their role did not run."""
    B, R = ro.response.shape
    P = ro.seqs.shape[1] - R
    device = ro.seqs.device
    scores = torch.zeros(B, device=device)
    sampled = ro.logprobs is not None
    old_lp, entropy = (ro.logprobs, ro.entropy) if sampled else (torch.zeros(B, R, device=device),
                                                                  torch.zeros(B, R, device=device))
    ref_lp = torch.zeros(B, R, device=device) if reference else None
    values = torch.zeros(B, R, device=device) if critic else None
    for s in range(0, B, size):
        maybe_inject(stage, iteration, size)
        sl = slice(s, s + size)
        seqs, am = ro.rows(sl)
        if learned_reward:
            with roles.role("reward") as eng:
                scores[sl] = last_token_scores(eng, seqs, am)
        if reference:
            with roles.role("reference") as eng:
                ref_lp[sl] = logprobs_of(eng, response_hidden(eng, seqs, am, P), ro.response[sl], temperature)
        if not sampled:
            with roles.role("actor") as eng:
                h = response_hidden(eng, seqs, am, P)
                old_lp[sl] = logprobs_of(eng, h, ro.response[sl], temperature)
                entropy[sl] = entropy_of(eng, h, temperature)
        if critic:
            with roles.role("critic") as eng:
                values[sl] = eng.scalar(response_hidden(eng, seqs, am, P))
    return scores, ref_lp, old_lp, values, entropy


def adjust_scores(scores: torch.Tensor, ended: torch.Tensor | None, cfg,
                  moments: M.RunningMoments | None) -> torch.Tensor:
    """The scores RL optimises: minus cfg.missing_eos_penalty where a response was cut before
    any EOS (ended False), then normalised by the run's running moments when --reward-norm, or
    divided by their std alone when --reward-scale (over the global batch in a data-parallel run). (B,)."""
    if cfg.missing_eos_penalty and ended is not None:
        scores = scores - cfg.missing_eos_penalty * (~ended).to(scores.dtype)
    if moments is not None:
        scores = moments.normalize(scores, reduce=global_sum(), center=cfg.reward_norm)
    return scores


@dataclass
class Scored:
    """A rollout with every forward of the scoring phase: what PPO and GRPO both start from."""

    rollout: Rollout
    scores: torch.Tensor  # (B,) the weighted sum of the reward components
    components: dict[str, torch.Tensor]  # (B,) each reward as it gave its score, by its flag's name
    ref_lp: torch.Tensor | None  # (B, R); None: the reference did not run
    old_lp: torch.Tensor  # (B, R)
    values: torch.Tensor | None  # (B, R); None: no critic
    entropy: torch.Tensor  # (B, R)


def sample_and_score(roles: Roles, sample: Callable[[int], Rollout], cfg, rewards: RewardSet, gen_mb: MicroBatch,
                     mb: MicroBatch, iteration: int, phase: Phase = lambda name: contextlib.nullcontext(),
                     critic: bool = True, reference: bool = True) -> Scored:
    """generation, then scoring: sample(size) -> Rollout samples the batch `size` prompts at a time
    with the actor active; gen_mb/mb halve those sizes on out-of-memory. The programs of `rewards`
    score the texts, the reward adapter + head the tokens (when rewards.learned); the score is their
    weighted sum. A failing program raises `RewardError` (the stage skips the iteration); in a
    data-parallel run on every rank when it failed on any (they skip together)."""
    with phase("generation"), roles.role("actor"):
        ro = gen_mb.run(iteration, sample, lambda: None)
    if ro.seqs.device.type == "cuda":
        torch.cuda.empty_cache()  # the generation cache's blocks go back before scoring (no gc: nothing cycles)
    try:
        with phase("scoring"), torch.no_grad():
            roles.train(False)
            failed: RewardError | None = None
            try:
                parts = {name: torch.tensor(fn(ro.prompts, ro.texts), device=ro.seqs.device, dtype=torch.float32)
                         for name, fn in rewards.programs.items()}
            except RewardError as e:
                failed = e
            if world().any(failed is not None):
                raise failed or RewardError("the reward failed in another process of this data-parallel run")
            learned, ref_lp, old_lp, values, entropy = mb.run(
                iteration, lambda size: score_rollout(roles, ro, size, iteration, rewards.learned, cfg.temperature,
                                                      critic=critic, reference=reference,
                                                      stage=stage_key(cfg)),
                lambda: None)
    finally:
        roles.train(True)
    if rewards.learned:
        parts["reward_model"] = learned
    return Scored(ro, rewards.combine(parts), parts, ref_lp, old_lp, values, entropy)


def global_sum() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The sum over the processes of a data-parallel run, for statistics of the global batch; None
    in one process."""
    w = world()
    return w.sum if w.size > 1 else None


def values_at_update(cfg) -> bool:
    """Whether the critic's old values are taken at its first update forward rather than by a
    scoring forward: cfg.values_at_update and one minibatch per epoch, so that forward runs on
    every row at the parameters of the rollout (`algo.ppo.ppo_update` steps the critic first)."""
    return bool(getattr(cfg, "values_at_update", False)) and cfg.minibatches <= 1


def make_experience(roles: Roles, sample: Callable[[int], Rollout], cfg: PPOConfig, kl_coef: float,
                    rewards: RewardSet, gen_mb: MicroBatch, mb: MicroBatch, iteration: int,
                    phase: Phase = lambda name: contextlib.nullcontext(),
                    moments: M.RunningMoments | None = None) -> Experience:
    """One PPO rollout, sampled and scored (`sample_and_score`: generation -> scoring by the
    rewards, reference, actor and critic) -> KL, shaped rewards, GAE. kl_coef: this iteration's KL
    coefficient: on the reward's tokens, or (cfg.kl_penalty "loss") on the actor loss's k3 term.
    moments: the running score moments (--reward-norm, --reward-scale), updated here; None: raw scores.
    Where `values_at_update(cfg)`, the critic does not run here: values, advantages and returns are
    zeros, filled by the critic's first update forward (Experience.values_pending)."""
    later = values_at_update(cfg)
    sc = sample_and_score(roles, sample, cfg, rewards, gen_mb, mb, iteration, phase, critic=not later)
    ro, m = sc.rollout, sc.rollout.response_mask
    kl = M.kl_estimate(sc.old_lp, sc.ref_lp, cfg.kl_estimator) * m
    train_scores = adjust_scores(sc.scores, ro.ended, cfg, moments)
    in_loss = cfg.kl_penalty == "loss"
    shaped = M.shaped_rewards(train_scores, kl, m, 0.0 if in_loss else kl_coef)
    exp = Experience(ro.seqs, ro.mask, ro.response, m, ro.prompts, ro.texts, ro.ended, logprobs=sc.old_lp,
                     ref_logprobs=sc.ref_lp, values=torch.zeros_like(shaped) if later else sc.values,
                     entropy=sc.entropy, scores=sc.scores, train_scores=train_scores, kl=kl, rewards=shaped,
                     advantages=torch.zeros_like(shaped), returns=torch.zeros_like(shaped),
                     components=sc.components, kl_loss_coef=kl_coef if in_loss else 0.0, values_pending=True)
    if not later:
        exp.take_values(slice(None), sc.values, cfg.gamma, cfg.lam)
        exp.values_taken(cfg.whiten_advantages)  # the global batch's mean and std
    return exp


__all__ = ["Rollout", "Experience", "Scored", "stage_key", "sample_and_score", "make_experience", "score_rollout", "generate", "generate_in_chunks",
           "response_mask", "response_hidden", "logprobs_of", "entropy_of", "logit_map", "stop_ids", "ended_rows",
           "adjust_scores", "logprobs_at_sampling", "values_at_update"]
