"""Sampling with one random stream per rollout row, so a rollout sampled in chunks of any size
(`--generation-batch`, or the halving after an out-of-memory) holds the very responses the whole
batch sampled at once would hold.

torch.multinomial over a (B, V) batch draws one stream for the batch: a row's sample depends on
the rows beside it. Here each row b owns a generator seeded with seeds[b] (drawn once per rollout,
before it is chunked), and a token is drawn by the Gumbel-max trick,

    token = argmax_v (z_v + g_v),   g_v = -log(-log(u_v)),   u ~ U(0, 1) from row b's stream,

where z are the logits of the sampled distribution (the model's, through transformers' own
temperature and top-p warpers, as `do_sample=True` applies them): argmax(z + g) is distributed
exactly as softmax(z). transformers' greedy search takes
the argmax, so the sampler is a logits processor ahead of greedy decoding.

With `record`, the sampler also keeps each sampled token's log-prob and the entropy at the
sampling temperature (before top-p, as the scoring forward computes them): where the model's
logits are fp32, the PPO/GRPO stages take the rollout's old log-probs from here instead of
running the actor over the rollout again (`algo.experience.logprobs_at_sampling`).
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

TINY = torch.finfo(torch.float32).tiny


def row_seeds(rows: int, generator: torch.Generator | None = None) -> list[int]:
    """One seed per rollout row, drawn from `generator` (default: torch's global one, which the
    stage seeds per iteration and checkpoints)."""
    return torch.randint(0, 2**62, (rows,), generator=generator).tolist()


class RowGumbelSampler(LogitsProcessor):
    """A logits processor for greedy `generate` that turns it into sampling at `temperature` and
    `top_p`, row b drawing from its own stream seeded with seeds[b]. Every row draws V uniforms
    per decoding step, finished or not, so a row's tokens depend on its seed and its own logits
    only."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device,
                 record: bool = False):
        self.temperature = TemperatureLogitsWarper(float(temperature))
        self.top_p = TopPLogitsWarper(float(top_p)) if top_p < 1.0 else None
        self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.record = record
        self.logprobs: list[torch.Tensor] = []  # per step (B,): log p(chosen token) at `temperature`
        self.entropy: list[torch.Tensor] = []  # per step (B,): entropy of that distribution

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.gens):
            raise ValueError(f"{scores.shape[0]} rows, {len(self.gens)} seeds")
        z = self.temperature(input_ids, scores.float())  # (B, V) fp32 logits of the distribution at `temperature`
        if self.record:  # before top-p: what the scoring forward computes (algo.ppo_math.token_logprobs)
            lse = torch.logsumexp(z, -1)
            p = (z - lse[:, None]).exp_()
            entropy = lse - (p.unsqueeze(1) @ z.unsqueeze(-1)).view(-1)
            del p
        if self.top_p is not None:
            z = self.top_p(input_ids, z)
        g = torch.empty_like(z)  # one (B, V) fp32 buffer: row b from its own stream, then -log(-log(u)) in place
        for row, gen in zip(g, self.gens):
            row.uniform_(generator=gen)
        out = z - g.clamp_(min=TINY).log_().neg_().log_()
        if self.record:  # greedy search takes out.argmax: the same token (top-p keeps it, so z there is unwarped)
            chosen = out.argmax(-1, keepdim=True)
            self.logprobs.append(z.gather(-1, chosen).squeeze(-1) - lse)
            self.entropy.append(entropy)
        return out

    def recorded(self, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, steps) log-probs and entropies of the sampled tokens, zero-padded after the last
        decoding step (rows that stopped early)."""
        lp, ent = torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)
        pad = steps - lp.shape[1]
        return torch.nn.functional.pad(lp, (0, pad)), torch.nn.functional.pad(ent, (0, pad))


__all__ = ["RowGumbelSampler", "row_seeds"]
