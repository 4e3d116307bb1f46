"""Batches and splits: right/left padding with attention masks, last-token positions from the mask,
an epoch sampler that checkpoints, a seeded train/held-out split."""

from __future__ import annotations

import random
from typing import Any, Sequence, TypeVar

from lowmem_rlhf.data.tokenize import IGNORE_INDEX
from lowmem_rlhf.errors import UserError

T = TypeVar("T")


# --------------------------------------------------------------------------- collation


def _as_lists(seqs: Sequence[Sequence[int]], what: str) -> list[list[int]]:
    if len(seqs) == 0:
        raise ValueError(f"{what}: empty batch")
    return [[int(t) for t in s] for s in seqs]


def collate_right(seqs: Sequence[Sequence[int]], pad_id: int,
                  labels: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Right-pad a batch for training: ``input_ids``, ``attention_mask`` and ``labels`` (long tensors).

    Padding positions get ``pad_id`` in ``input_ids``, 0 in the mask and -100 in ``labels``,
    decided by position (a real EOS equal to ``pad_id`` stays a label).  Without ``labels`` the
    labels are the input ids with -100 on padding.
    """
    import torch

    rows = _as_lists(seqs, "collate_right")
    lab_rows = rows if labels is None else _as_lists(labels, "collate_right labels")
    if len(lab_rows) != len(rows) or any(len(a) != len(b) for a, b in zip(rows, lab_rows)):
        raise ValueError("collate_right: labels must match the sequences in number and length")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    out_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, (row, lab) in enumerate(zip(rows, lab_rows)):
        n = len(row)
        if n:
            input_ids[b, :n] = torch.tensor(row, dtype=torch.long)
            attention[b, :n] = 1
            out_labels[b, :n] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": out_labels}


def collate_left(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, Any]:
    """Left-pad a batch of prompts for ``generate``: ``input_ids`` and ``attention_mask``."""
    import torch

    rows = _as_lists(seqs, "collate_left")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        if n:
            input_ids[b, width - n:] = torch.tensor(row, dtype=torch.long)
            attention[b, width - n:] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


def last_token_index(attention_mask: Any) -> Any:
    """Index of the last real token of each row (LongTensor ``[batch]``), from the mask alone.

    Works for right padding (and left padding, and masks with holes); never looks at token ids,
    so it is right when the pad id equals EOS (SmolLM2).  Raises ValueError for a row without
    any real token.
    """
    import torch

    mask = torch.as_tensor(attention_mask)
    if mask.dim() != 2:
        raise ValueError(f"last_token_index: expected a [batch, seq] mask, got shape {tuple(mask.shape)}")
    real = mask != 0
    if not bool(real.any(dim=1).all()):
        raise ValueError("last_token_index: a row has no real token (attention mask all zero)")
    width = mask.shape[1]
    return (width - 1 - real.flip(dims=[1]).long().argmax(dim=1)).long()


# --------------------------------------------------------------------------- splitting


class EpochSampler:
    """Draws rows without replacement, reshuffling (seeded) when an epoch runs out."""

    def __init__(self, n: int, seed: int = 0):
        import torch

        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def draw(self, k: int) -> list[int]:
        import torch

        out = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self.order.pop())
        return out

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order = list(state["order"])


def split_train_eval(items: Sequence[T], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministic split: the same items, fraction and seed always give the same two lists.

    ``round(len * eval_fraction)`` items go to eval (at least 1 when the fraction is > 0 and there
    are >= 2 items; train always keeps at least 1).  Both lists keep the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(items)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, max(0, n - 1))
    chosen = set(random.Random(seed).sample(range(n), n_eval)) if n_eval else set()
    train = [x for i, x in enumerate(items) if i not in chosen]
    evals = [x for i, x in enumerate(items) if i in chosen]
    return train, evals
