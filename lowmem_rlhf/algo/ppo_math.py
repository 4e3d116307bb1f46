"""PPO math, pure tensor functions (no models, no I/O). Shapes: B rollouts, T response tokens,
N flattened positions, H hidden size, V vocabulary. `mask` is 1.0 on real response tokens.

References: Schulman et al. 2017 (clipped surrogate), Schulman et al. 2016 (GAE), Ziegler et al.
2019 (KL penalty with an adaptive coefficient), Schulman 2020 "Approximating KL divergence" (k1/k3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

# ---- log-probs without materialising full-vocabulary logits ---------------------------------------
VOCAB_CHUNK = 4096  # vocabulary columns per block (the estimator's LOGPROB_VOCAB_CHUNK)


@dataclass(frozen=True)
class LogitMap:
    """The model's own path from output-layer logits z to the distribution that is sampled:
    softcap(z * scale) / temperature, softcap(x) = cap * tanh(x / cap) (Gemma-2's final-logit
    softcapping; scale: Cohere's logit_scale, 1 / Granite's logits_scaling; temperature: sampling's)."""

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits


IDENTITY = LogitMap()


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  fmap: LogitMap) -> torch.Tensor:
    """fp32 logits of one vocabulary block: the product itself is taken in fp32 (16-bit logits are
    rounded by up to ~0.06 nats at |z| ~ 20), then the model's logit map. (N, H) x (C, H) -> (N, C)."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return fmap(logits)


def _chunk_lse(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fmap: LogitMap) -> torch.Tensor:
    return torch.logsumexp(_chunk_logits(hidden, weight, bias, fmap), dim=-1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   bias: torch.Tensor | None = None, vocab_chunk: int = VOCAB_CHUNK,
                   fmap: LogitMap = IDENTITY) -> torch.Tensor:
    """log p(target) for hidden (N, H), output weight (V, H), targets (N,) -> (N,) fp32, p being
    softmax(fmap(hidden @ weight.T + bias)) computed in fp32.

    The log-sum-exp runs over vocabulary chunks of `vocab_chunk` columns; under autograd each chunk
    is checkpointed, so at most one (N, vocab_chunk) fp32 block (and the chunk's fp32 weight) is
    alive, forward or backward."""
    lse = None
    for s in range(0, weight.shape[0], vocab_chunk):
        w = weight[s: s + vocab_chunk]
        b = bias[s: s + vocab_chunk] if bias is not None else None
        if torch.is_grad_enabled() and hidden.requires_grad:
            part = checkpoint(_chunk_lse, hidden, w, b, fmap, use_reentrant=False)
        else:
            part = _chunk_lse(hidden, w, b, fmap)
        lse = part if lse is None else torch.logaddexp(lse, part)
    target_logit = (hidden.float() * weight[targets].float()).sum(-1)
    if bias is not None:
        target_logit = target_logit + bias[targets].float()
    return fmap(target_logit) - lse


@torch.no_grad()
def token_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  vocab_chunk: int = VOCAB_CHUNK, fmap: LogitMap = IDENTITY) -> torch.Tensor:
    """Entropy of the sampled next-token distribution, hidden (N, H) -> (N,) fp32 (two chunked passes)."""
    lse = None
    for s in range(0, weight.shape[0], vocab_chunk):
        part = _chunk_lse(hidden, weight[s: s + vocab_chunk], None if bias is None else bias[s: s + vocab_chunk], fmap)
        lse = part if lse is None else torch.logaddexp(lse, part)
    expected = torch.zeros_like(lse)
    for s in range(0, weight.shape[0], vocab_chunk):
        logits = _chunk_logits(hidden, weight[s: s + vocab_chunk], None if bias is None else bias[s: s + vocab_chunk], fmap)
        expected += (torch.exp(logits - lse[:, None]) * logits).sum(-1)
    return lse - expected


# ---- masked statistics ------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:  # Bessel's correction where there are 2+ entries (no host sync: meta tensors have no data)
        n = mask.sum()
        var = torch.where(n > 1, var * n / (n - 1), var)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over masked entries (std unbiased); with shift_mean=False the mean is kept.
    reduce: a sum over the processes of a data-parallel run (`runtime.distributed.World.sum`), so
    mean and std are the whole global batch's; None: this (B, T) batch's alone."""
    if reduce is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:  # the same two passes, each sum taken over every process
        s = reduce(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]))
        n = s[1].clamp(min=1)
        mean = s[0] / n
        var = reduce(((x - mean) ** 2 * mask).sum()) / n
        var = torch.where(n > 1, var * n / (n - 1), var)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---- KL penalty -------------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate on sampled tokens, (B, T) -> (B, T).

    k1 = logp - ref (unbiased, can be negative); k3 = (r - 1) - log r with r = p_ref / p
    (unbiased, always >= 0, lower variance)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl estimator must be k1 or k3, got {kind!r}")


def masked_k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 KL(policy || reference) per token, (B, R) -> (B, R), 0 where mask is 0: the log-ratio is
    zeroed there before the exponential, so a padded position's extreme log-prob (below -88) cannot
    overflow to inf and turn the masked sum into NaN (inf x 0)."""
    log_r = torch.where(mask > 0, ref_logp - logp, torch.zeros_like(logp))
    return torch.expm1(log_r) - log_r


class FixedKLController:
    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}


class AdaptiveKLController:
    """Ziegler et al.: nudge the coefficient so the observed KL tracks `target`."""

    def __init__(self, init: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}


class RunningMoments:
    """Running mean and standard deviation of the scores over the run (Chan et al.'s parallel
    update), for --reward-norm: scores (B,) -> (scores - mean) / std with the moments updated by
    this batch first. Kept in the checkpoint (state_dict), so a resumed run normalises the same."""

    def __init__(self, mean: float = 0.0, var: float = 1.0, count: float = 0.0):
        self.mean, self.var, self.count = mean, var, count

    def normalize(self, scores: torch.Tensor, eps: float = 1e-8,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, center: bool = True) -> torch.Tensor:
        """reduce: a sum over the processes of a data-parallel run: the moments take the global
        batch (every process updates them alike); None: this batch alone. center False: scores /
        std, the mean kept (--reward-scale)."""
        x = scores.detach().double()
        if reduce is None:
            n, m, v = float(len(x)), float(x.mean()), float(x.var(unbiased=False)) if len(x) > 1 else 0.0
        else:  # the global batch's count, mean and (biased) variance, two passes
            nsum = reduce(torch.stack([x.new_tensor(float(len(x))), x.sum()]))
            n, m = float(nsum[0]), float(nsum[1] / nsum[0])
            v = float(reduce(((x - m) ** 2).sum())) / n if n > 1 else 0.0
        total = self.count + n
        delta = m - self.mean
        var = (self.var * self.count + v * n + delta**2 * self.count * n / total) / total
        self.mean, self.var, self.count = self.mean + delta * n / total, var, total
        std = max(self.var, 0.0) ** 0.5
        shifted = scores - self.mean if center else scores
        return shifted / (std + eps) if std > 0 else shifted

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards (B, T): -kl_coef * kl on every token, plus the score (B,) on the last
    response token of each row (found from the mask, never from token ids)."""
    rewards = -kl_coef * kl * mask
    last = (mask.cumsum(-1) * mask).argmax(-1)  # index of the last 1 in each row
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


# ---- advantages -------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T); returns (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t; A_t = delta_t + gamma * lam * A_{t+1}; the value past
    the last real token is 0 (the episode ends there)."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        last = last * m
        adv[:, t] = last
        next_value = values[:, t] * m
    returns = adv + values
    return adv * mask, returns * mask


# ---- losses -----------------------------------------------------------------------------------
@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    max_abs_log_ratio: torch.Tensor


def token_mean(x: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """sum(x * mask) / tokens; tokens defaults to mask.sum(). Passing the whole minibatch's token
    count makes the loss a token-level mean over the minibatch however it is split into
    micro-batches: the micro-batches' losses then add up to it, and so do their gradients."""
    if tokens is None:
        return masked_mean(x, mask)
    return (x * mask).sum() / tokens


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, shared by PPO and GRPO/RLOO: max(-A r, -A clip(r, 1-eps,
    1+eps)), r = exp(logp - old_logp). logp, old_logp (B, T); advantages (B, T) or broadcastable.
    -> (per-token loss, r, log r, clipped), all (B, T); `clipped` marks the tokens whose gradient
    the clip removed: r > 1 + eps with A > 0, or r < 1 - eps with A < 0."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    per_token = torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip, 1 + clip))
    clipped = (ratio > 1 + clip) & (advantages > 0) | (ratio < 1 - clip) & (advantages < 0)
    return per_token, ratio, log_ratio, clipped


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, tokens: torch.Tensor | float | None = None,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> PolicyLoss:
    """Clipped surrogate (`clipped_surrogate`), token mean (see token_mean); (B, T) inputs. With
    ref_logp and kl_coef > 0 (--kl-penalty loss), each token adds kl_coef x k3(policy || reference),
    whose gradient pulls every token toward the reference. The statistics are means over this
    call's tokens."""
    per_token, ratio, log_ratio, clipped = clipped_surrogate(logp, old_logp, advantages, clip)
    if ref_logp is not None and kl_coef:
        per_token = per_token + kl_coef * masked_k3(logp, ref_logp, mask)
    loss = token_mean(per_token, mask, tokens)
    with torch.no_grad():
        clip_frac = masked_mean(clipped.float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)  # k3 of new vs old
        ratio_mean = masked_mean(ratio, mask)
        max_abs_log_ratio = (log_ratio.abs() * mask).max()
    return PolicyLoss(loss, clip_frac, approx_kl, ratio_mean, max_abs_log_ratio)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2, tokens: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * token_mean(max((v - R)^2, (v_clip - R)^2)); -> (loss, clip fraction)."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(l1, l2), mask, tokens)
    with torch.no_grad():
        frac = masked_mean((l2 > l1).float(), mask)
    return loss, frac


__all__ = ["LogitMap", "IDENTITY", "VOCAB_CHUNK", "token_logprobs", "token_entropy", "masked_mean", "masked_var", "whiten", "kl_estimate", "masked_k3",
           "FixedKLController", "AdaptiveKLController", "shaped_rewards", "gae", "clipped_surrogate", "policy_loss",
           "value_loss", "PolicyLoss", "token_mean", "RunningMoments"]
