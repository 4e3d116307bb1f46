"""Stage 1, SFT: train the `sft` LoRA adapter on instruction data, completion-only loss.

setup (profile, model, data, adapter, optimizer; or all of it restored from the newest checkpoint
with --resume) -> loop (gradient accumulation, one backward per micro-batch, halved on
out-of-memory) -> save (adapter in PEFT layout, resolved profile, metrics, estimated-vs-measured
memory) into RUN/sft, atomically. The scaffold is `stages/scaffold.py`; the step is
`algo.supervised.completion_loss`.

The loop is ours, not trl's SFTTrainer: the trainer would wrap the model in its own PEFT adapter,
while every stage here must add named adapters (and heads) to one shared base that PPO reuses.
"""

from __future__ import annotations

import torch

from lowmem_rlhf import data as D
from lowmem_rlhf.algo.supervised import completion_loss, eval_loss
from lowmem_rlhf.config import SFTConfig, with_shape_defaults
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.measure.report import trainer_counts
from lowmem_rlhf.runtime.oom import maybe_inject
from lowmem_rlhf.stages.scaffold import Stage


def prepare_examples(cfg: SFTConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    records = D.load_records(cfg.data)
    examples = D.to_sft(records, cfg.data)
    tokenized = [t for t in (D.tokenize_sft(e, tokenizer, cfg.max_len) for e in examples) if t is not None]
    if not tokenized:
        raise UserError(f"{cfg.data}: no example has a response token left within --max-len {cfg.max_len}; raise --max-len")
    train, held = D.split_train_eval(tokenized, cfg.eval_fraction, cfg.seed)
    if not train:
        raise UserError(f"{cfg.data}: too few examples ({len(tokenized)}) to train; add data or lower --eval-fraction")
    return train, held


def run_sft(cfg: SFTConfig, console=None) -> dict:
    cfg = with_shape_defaults(cfg, "cuda" if torch.cuda.is_available() else "cpu")  # --max-len, --batch
    with Stage(cfg, "sft", "SFT", console) as st:
        # ---- setup ----------------------------------------------------------------------------
        loaded = st.load(context=(cfg.max_len, "--max-len"))
        tok = loaded.tokenizer
        train, held = prepare_examples(cfg, tok)
        engine, trainer, mb, sampler, state = st.single_adapter("sft", False, len(train),
                                                                {"losses": [], "eval_before": None})
        device = trainer.device
        if st.resumed is None and held:
            state["eval_before"] = eval_loss(engine, held, tok.pad_token_id, mb.size, device)

        # ---- loop -----------------------------------------------------------------------------
        losses, W = state["losses"], st.world
        for step in st.steps(cfg.max_steps):
            rows = [train[i] for i in W.mine(sampler.draw(cfg.batch * W.size))]  # this rank's
            # the loss is a token mean over the global batch: each rank divides by the ranks' mean count
            # (DDP averages the ranks' gradients)
            n_tokens = W.mean(sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows))

            def accumulate(size: int) -> float:
                total = 0.0
                for i in range(0, len(rows), size):
                    maybe_inject("sft", step + 1, size, "start" if i == 0 else "mid")
                    chunk = rows[i: i + size]
                    batch = D.collate_right([r["input_ids"] for r in chunk], tok.pad_token_id,
                                            [r["labels"] for r in chunk])
                    loss, _ = trainer.forward(completion_loss, engine, {k: v.to(device) for k, v in batch.items()},
                                              last=i + size >= len(rows))
                    trainer.backward(loss / max(n_tokens, 1))
                    total += float(loss.detach())
                return total

            def train_step(size: int) -> tuple[float, dict]:
                return accumulate(size), trainer.step(fault=("sft", step + 1, size))

            with st.meter.phase("train_step"):
                step_loss, stats = mb.run(step + 1, train_step, trainer.reset)
            st.skipped(stats, step + 1)
            losses.append(W.mean(step_loss) / max(n_tokens, 1))
            state["micro_batch"] = mb.size
            seq_tokens, dt = int(W.total(sum(len(r["input_ids"]) for r in rows))), st.step_seconds
            st.log(postfix={"loss": losses[-1]}, step=step + 1, loss=losses[-1], lr=stats["lr"],
                   grad_norm=stats["grad_norm"], samples=len(rows) * W.size, micro_batch=mb.size,
                   **{k: stats[k] for k in ("loss_scale",) if k in stats},
                   oom_retries=sum(1 for e in mb.events if e["step"] == step + 1), tokens=seq_tokens,
                   seconds=dt, tokens_per_s=seq_tokens / dt,
                   **{f"peak_{k}": v for k, v in st.meter.last["train_step"].items()})
        eval_after = eval_loss(engine, held, tok.pad_token_id, mb.size, device) if held else None

        # ---- save -----------------------------------------------------------------------------
        trainer.save_adapter(st.out / "adapter", extra_meta={"stage": "sft"})  # rank 0 writes
        return st.finish({
            "steps": cfg.max_steps, "global_batch": cfg.batch * W.size, "train_examples": len(train), "eval_examples": len(held),
            "loss_first": losses[0], "loss_last": losses[-1],
            "loss_first5": sum(losses[:5]) / len(losses[:5]), "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
            "eval_loss_before": state["eval_before"], "eval_loss_after": eval_after,
            "micro_batch": mb.size, "oom_events": mb.events,
        }, trainer_counts(trainer))


__all__ = ["SFTConfig", "run_sft", "completion_loss"]
