"""Shared by tests/test_zero3.py and the zero3_* scripts: the same SFT / RM steps run in plain torch
(the stage loops' arithmetic: AdamW, warmup_cosine, clip 1.0) and under `Zero3Trainer`.

Data: the bundled self-instruct seed tasks (SFT) and demo preference pairs (RM), tokenized with the
model's own tokenizer, drawn by `EpochSampler` exactly as the stage loops draw them.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from lowmem_rlhf import data as D
from lowmem_rlhf.algo.pairwise import pair_scores
from lowmem_rlhf.algo.supervised import completion_loss
from lowmem_rlhf.config import load_profile
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import load_model
from lowmem_rlhf.runtime.optim import make_optimizer, warmup_cosine


def zero3_profile(dtype: str = "fp32", **changes):
    """The zero3-offload profile, fp32 by default (equivalence tests want exact-ish arithmetic)."""
    return replace(load_profile("zero3-offload"), dtype=dtype, **changes)


def sft_rows(tok, n: int = 24, max_len: int = 96) -> list[dict]:
    records = D.load_records(str(D.bundled_path("self-instruct-seed-tasks.jsonl")))
    ex = D.to_sft(records[: 4 * n], "self-instruct")
    rows = [t for t in (D.tokenize_sft(e, tok, max_len) for e in ex) if t is not None]
    return rows[:n]


def rm_rows(tok, n: int = 24, max_len: int = 64) -> list[dict]:
    records = D.load_records(str(D.bundled_path("demo-pairs.jsonl.gz")))
    pairs = D.to_pairs(records, "demo-pairs")
    rows = [t for t in (D.tokenize_pair(p, tok, max_len) for p in pairs) if t is not None]
    return rows[:n]


def build(model: str, profile, adapter: str, with_head: bool, seed: int = 0) -> SharedBase:
    torch.manual_seed(seed)
    random.seed(seed)
    loaded = load_model(model, profile)
    shared = SharedBase(loaded, profile, seed=seed)
    shared.add_adapter(adapter, with_head=with_head)
    shared.model.train()
    return shared


def sft_micro(shared, rows, pad_id, fwd=None):
    batch = D.collate_right([r["input_ids"] for r in rows], pad_id, [r["labels"] for r in rows])
    batch = {k: v.to(shared.loaded.device) for k, v in batch.items()}
    return (fwd or (lambda fn, *a: fn(*a)))(completion_loss, shared, batch)


def n_label_tokens(rows) -> int:
    return sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)


def run(kind: str, stage: str, model: str, profile, steps: int, micro_batch: int, accum: int,
        lr: float = 1e-3, seed: int = 0, rows: list[dict] | None = None, trainer_kwargs: dict | None = None,
        max_len: int | None = None) -> dict:
    """Train `steps` optimizer steps of the sft or rm adapter, kind "torch" or "zero3".

    Returns per-step losses, grad norms, lrs, the final adapter state dict, seconds and the trainer
    (zero3) for memory inspection."""
    from lowmem_rlhf.runtime.zero3 import Zero3Trainer

    adapter, head = ("sft", False) if stage == "sft" else ("reward", True)
    shared = build(model, profile, adapter, head, seed)
    tok = shared.loaded.tokenizer
    if rows is None:
        kw = {"max_len": max_len} if max_len else {}
        rows = sft_rows(tok, **kw) if stage == "sft" else rm_rows(tok, **kw)
    warm = min(10, steps // 10) if steps >= 10 else 1
    trainer = opt = sched = None
    state0 = {n: p.detach().clone() for n, p in shared.model.named_parameters() if p.requires_grad}
    t_init = time.time()
    if kind == "zero3":
        trainer = Zero3Trainer(shared, adapter, lr=lr, total_steps=steps, warmup_steps=warm,
                               micro_batch=micro_batch, grad_accum=accum, **(trainer_kwargs or {}))
        fwd = trainer.forward
    else:
        opt = make_optimizer(shared.parameters_of(adapter), "adamw", lr)
        sched = warmup_cosine(opt, steps, warmup_steps=warm)
        fwd = None
    init_seconds = time.time() - t_init
    torch.manual_seed(seed + 1)  # dropout masks: same RNG stream in both loops from here on
    sampler = D.EpochSampler(len(rows), seed)
    losses, norms, lrs = [], [], []
    t0 = time.time()
    for _ in range(steps):
        batch_rows = [rows[i] for i in sampler.draw(micro_batch * accum)]
        n_tok = n_label_tokens(batch_rows) if stage == "sft" else len(batch_rows)
        total = 0.0
        for i in range(accum):
            chunk = batch_rows[i * micro_batch: (i + 1) * micro_batch]
            if stage == "sft":
                loss, _ = sft_micro(shared, chunk, tok.pad_token_id, fwd)
            else:
                args = (shared, [r["chosen_ids"] for r in chunk], [r["rejected_ids"] for r in chunk],
                        tok.pad_token_id, shared.loaded.device)
                rc, rr = fwd(pair_scores, *args) if fwd else pair_scores(*args)
                loss = -F.logsigmoid(rc - rr).sum()
            if trainer is not None:
                trainer.backward(loss / max(n_tok, 1))
            else:
                shared.backward(loss / max(n_tok, 1))
            total += float(loss.detach())
        if trainer is not None:
            st = trainer.step()
            norms.append(st["grad_norm"])
            lrs.append(st["lr"])
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(shared.parameters_of(adapter), 1.0)))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            lrs.append(sched.get_last_lr()[0])
        losses.append(total / max(n_tok, 1))
    seconds = time.time() - t0
    if trainer is not None:
        state = trainer.trainable_state_dict()
    else:
        state = {n: p.detach().clone() for n, p in shared.model.named_parameters() if p.requires_grad}
    return {"losses": losses, "grad_norms": norms, "lrs": lrs, "state": state, "state0": state0,
            "seconds": seconds, "init_seconds": init_seconds,
            "trainer": trainer, "shared": shared}


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def update_mismatch(ref: dict, other: dict, init: dict) -> float:
    """||(other - init) - (ref - init)|| / ||ref - init|| over all adapter tensors: how far the
    updates differ, relative to the update itself (0 = identical training)."""
    num = sum(float((other[k].float() - ref[k].float()).pow(2).sum()) for k in ref)
    den = sum(float((ref[k].float() - init[k].float()).pow(2).sum()) for k in ref)
    return (num / den) ** 0.5 if den > 0 else float("inf")


def max_update(ref: dict, init: dict) -> float:
    return max_abs_diff(ref, init)
