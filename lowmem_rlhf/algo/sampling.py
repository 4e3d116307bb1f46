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
"""

from __future__ import annotations

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
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

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: torch.device):
        self.warp = LogitsProcessorList([TemperatureLogitsWarper(float(temperature))] +
                                        ([TopPLogitsWarper(float(top_p))] if top_p < 1.0 else []))
        self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.gens):
            raise ValueError(f"{scores.shape[0]} rows, {len(self.gens)} seeds")
        z = self.warp(input_ids, scores.float())
        g = torch.empty_like(z)  # one (B, V) fp32 buffer: row b from its own stream, then -log(-log(u)) in place
        for row, gen in zip(g, self.gens):
            row.uniform_(generator=gen)
        return z - g.clamp_(min=TINY).log_().neg_().log_()


__all__ = ["RowGumbelSampler", "row_seeds"]
