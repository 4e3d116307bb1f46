"""The SFT step: completion-only next-token loss on the shared base's active adapter.

The stage (`stages/sft.py`) and the meta-device simulation (`measure/simulate.py`) both call
`completion_loss`; nothing else computes it.
"""

from __future__ import annotations

import torch

from lowmem_rlhf.data import collate_right
from lowmem_rlhf.model.adapters import SharedBase


def label_positions(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x[mask]: (B, S, ...) with a (B, S) bool mask -> (N, ...); mask None (every position):
    x.flatten(0, 1)."""
    return x.flatten(0, 1) if mask is None else x[mask]


def completion_loss(engine: SharedBase, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over response tokens (labels != -100), and their count.

    batch: input_ids, attention_mask, labels, each (B, S). attention_mask None means unpadded rows
    with every position labelled (the simulation's inputs). Logits are computed only at positions
    that predict a label: (N, V) in fp32, never (B, S, V)."""
    hidden = engine.hidden_states(batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    mask = None if batch["attention_mask"] is None else labels != -100
    logits = engine.logits(label_positions(hidden[:, :-1], mask)).float()
    loss = torch.nn.functional.cross_entropy(logits, label_positions(labels, mask), reduction="sum")
    return loss, (labels.numel() if mask is None else int(mask.sum()))


@torch.no_grad()
def eval_loss(engine: SharedBase, examples: list[dict], pad_id: int, micro_batch: int, device) -> float:
    """Mean completion loss per response token over `examples` ({"input_ids", "labels"} lists)."""
    engine.model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), micro_batch):
        chunk = examples[i: i + micro_batch]
        batch = collate_right([e["input_ids"] for e in chunk], pad_id, [e["labels"] for e in chunk])
        loss, n = completion_loss(engine, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss), count + n
    engine.model.train()
    return total / max(count, 1)


__all__ = ["completion_loss", "eval_loss", "label_positions"]
