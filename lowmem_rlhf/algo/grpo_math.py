"""The math of critic-free RL (GRPO, RLOO): advantages from a group of responses to one prompt, and
the clipped surrogate with a k3 KL term. Pure tensor functions; shapes in the docstrings.

A rollout holds B = prompts x G responses, each prompt's G responses side by side (rows
g*G .. g*G + G - 1 are group g). The advantage of a response is a scalar broadcast over its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowmem_rlhf.algo.ppo_math import clipped_surrogate, masked_k3, masked_mean

STD_EPS = 1e-4  # added to the group std: a group whose rewards are all equal gets advantage 0, not 0/0


def _groups(scores: torch.Tensor, group: int) -> torch.Tensor:
    """(B,) -> (B / group, group); one row per prompt."""
    if group < 2 or scores.numel() % group:
        raise ValueError(f"group size {group} must be at least 2 and divide the {scores.numel()} scores")
    return scores.float().view(-1, group)


def group_advantages(scores: torch.Tensor, group: int, std_norm: bool = True, eps: float = STD_EPS) -> torch.Tensor:
    """GRPO: (r - mean of its group) / (std of its group + eps), the std unbiased (n - 1), as
    DeepSeekMath; std_norm False: r - mean (Dr. GRPO: no bias toward groups with small spread).
    (B,) -> (B,)."""
    s = _groups(scores, group)
    adv = s - s.mean(1, keepdim=True)
    if std_norm:
        adv = adv / (s.std(1, keepdim=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO: r minus the mean of the other G - 1 responses to its prompt (an unbiased baseline: it
    does not depend on the response itself). Equal to G / (G - 1) x (r - group mean). (B,) -> (B,)."""
    s = _groups(scores, group)
    others = (s.sum(1, keepdim=True) - s) / (group - 1)
    return (s - others).reshape(-1)


@dataclass
class GroupLoss:
    loss: torch.Tensor  # 0-d, with gradient
    kl: torch.Tensor  # mean k3 KL to the reference over this call's tokens (0 without a reference)
    clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    max_abs_log_ratio: torch.Tensor


def group_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                      advantages: torch.Tensor, mask: torch.Tensor, clip: float, beta: float, agg: str,
                      denom: torch.Tensor | float) -> GroupLoss:
    """Per token: PPO's clipped surrogate (`ppo_math.clipped_surrogate`) + beta x k3(logp,
    ref_logp), A the row's advantage. logp, old_logp, ref_logp, mask (B, R);
    advantages (B,), or (B, R) broadcast already. The sum, over rows and tokens, is divided by `denom`:

    * agg "token": denom = response tokens of the whole minibatch: the token mean over it;
    * agg "sequence": each row's token mean, summed, and denom = the minibatch's rows.

    Passing the minibatch's count makes micro-batch losses add up to the minibatch's loss, so the
    accumulated gradient does not depend on the micro-batch size. ref_logp None (beta 0): no KL term."""
    adv = (advantages[:, None] if advantages.dim() == 1 else advantages).to(logp.dtype)
    per_token, ratio, log_ratio, clipped = clipped_surrogate(logp, old_logp, adv, clip)
    kl = masked_k3(logp, ref_logp, mask) if ref_logp is not None else None
    if kl is not None and beta:
        per_token = per_token + beta * kl
    if agg == "token":
        loss = (per_token * mask).sum() / denom
    elif agg == "sequence":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / denom
    else:
        raise ValueError(f"loss aggregation must be token or sequence, got {agg!r}")
    with torch.no_grad():
        stats = dict(kl=masked_mean(kl, mask) if kl is not None else torch.zeros((), device=logp.device),
                     clip_frac=masked_mean(clipped.float(), mask), ratio_mean=masked_mean(ratio, mask),
                     max_abs_log_ratio=(log_ratio.abs() * mask).max())
    return GroupLoss(loss, **stats)


__all__ = ["group_advantages", "rloo_advantages", "group_policy_loss", "masked_k3", "GroupLoss", "STD_EPS"]
