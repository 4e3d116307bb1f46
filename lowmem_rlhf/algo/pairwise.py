"""The reward-model step: a scalar head on the last real token, pairwise ranking loss.

    loss = -log sigmoid(r_chosen - r_rejected), summed over pairs

The score is taken at each sequence's last real token, found from the attention mask, never from
the pad id (SmolLM2's pad token is also its EOS and ends every chat turn; docs/pitfalls.md #8).
The stage (`stages/rm.py`) and the simulation (`measure/simulate.py`) both call `pair_scores` and
`pair_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem_rlhf.data import collate_right, last_token_index
from lowmem_rlhf.model.adapters import SharedBase


def last_token_scores(engine: SharedBase, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, S) token ids and attention mask -> (B,) scalar head at each row's last real token
    (mask None: unpadded rows, the last position)."""
    hidden = engine.hidden_states(ids, mask)
    last = last_token_index(mask) if mask is not None else torch.full((len(ids),), ids.shape[1] - 1, device=ids.device)
    return engine.scalar(hidden[torch.arange(len(ids), device=ids.device), last])


def pair_scores(engine: SharedBase, chosen: list[list[int]] | torch.Tensor, rejected: list[list[int]] | torch.Tensor,
                pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B,), (B,) of chosen and rejected, in one forward of the 2B sequences. Token lists
    are right-padded here; (B, S) tensors are unpadded rows (the simulation's inputs)."""
    if isinstance(chosen, torch.Tensor):
        ids, am = torch.cat([chosen, rejected]).to(device), None
    else:
        batch = collate_right(list(chosen) + list(rejected), pad_id)
        ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    scores = last_token_scores(engine, ids, am)
    return scores[: len(chosen)], scores[len(chosen):]


def pair_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(B,), (B,) -> summed -log sigmoid(chosen - rejected)."""
    return -F.logsigmoid(chosen - rejected).sum()


@torch.no_grad()
def evaluate_pairs(engine: SharedBase, pairs: list[dict], pad_id: int, micro_batch: int, device) -> dict:
    """Accuracy (chosen scored above rejected) and mean margin over held-out pairs."""
    engine.model.eval()
    correct, margins = 0, []
    for i in range(0, len(pairs), micro_batch):
        chunk = pairs[i: i + micro_batch]
        rc, rr = pair_scores(engine, [p["chosen_ids"] for p in chunk], [p["rejected_ids"] for p in chunk], pad_id,
                             device)
        correct += int((rc > rr).sum())
        margins += (rc - rr).tolist()
    engine.model.train()
    n = max(len(pairs), 1)
    return {"accuracy": correct / n, "margin": sum(margins) / n, "pairs": len(pairs)}


__all__ = ["pair_scores", "pair_loss", "evaluate_pairs", "last_token_scores"]
