"""Stage 2, reward model: a `reward` LoRA adapter + scalar head on the (SFT-merged) shared base.

Pairwise loss -log sigmoid(r_chosen - r_rejected) (`algo.pairwise`); accuracy and margin are
measured on a held-out split before and after training. The scaffold is `stages/scaffold.py`.

The SFT adapter is *merged* into the base before the reward adapter is added (`--init-from`):
every later role (reward, critic, actor, and the reference = adapters off) then shares one base
that already is the SFT policy, so the PPO reference is the SFT model, as PPO requires, and no
forward pays for two stacked adapters.
"""

from __future__ import annotations

import torch

from lowmem_rlhf import data as D
from lowmem_rlhf.algo.pairwise import evaluate_pairs, pair_loss, pair_scores
from lowmem_rlhf.config import RMConfig, with_shape_defaults
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.measure.report import trainer_counts
from lowmem_rlhf.runtime.oom import maybe_inject
from lowmem_rlhf.runtime.runs import finished_adapter
from lowmem_rlhf.stages.scaffold import Stage


def sft_adapter_of(init_from) -> list:
    """The SFT adapter folder to merge, validated; [] when there is none."""
    return [finished_adapter(init_from, "--init-from", "SFT", "RUN/sft")] if init_from is not None else []


def prepare_pairs(cfg: RMConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    pairs = D.to_pairs(D.load_records(cfg.data), cfg.data)
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]
    tokenized = [t for t in (D.tokenize_pair(p, tokenizer, cfg.max_len) for p in pairs) if t is not None]
    if len(tokenized) < 2:
        raise UserError(f"{cfg.data}: {len(tokenized)} usable pair(s) within --max-len {cfg.max_len}; need at least 2")
    return D.split_train_eval(tokenized, cfg.eval_fraction, cfg.seed)


def run_rm(cfg: RMConfig, console=None) -> dict:
    cfg = with_shape_defaults(cfg, "cuda" if torch.cuda.is_available() else "cpu")  # --max-len, --batch
    merged = sft_adapter_of(cfg.init_from)
    with Stage(cfg, "rm", "RM", console) as st:
        # ---- setup ----------------------------------------------------------------------------
        loaded = st.load(context=(cfg.max_len, "--max-len"), merged=merged)
        tok = loaded.tokenizer
        train, held = prepare_pairs(cfg, tok)
        engine, trainer, mb, sampler, state = st.single_adapter("reward", True, len(train),
                                                                {"losses": [], "accs": [], "eval_before": None})
        device = trainer.device
        if st.resumed is None and held:
            state["eval_before"] = evaluate_pairs(engine, held, tok.pad_token_id, mb.size, device)

        # ---- loop -----------------------------------------------------------------------------
        losses, accs, W = state["losses"], state["accs"], st.world
        for step in st.steps(cfg.max_steps):
            rows = [train[i] for i in W.mine(sampler.draw(cfg.batch * W.size))]  # this rank's

            def accumulate(size: int) -> tuple[float, int]:
                total, correct = 0.0, 0
                for i in range(0, len(rows), size):
                    maybe_inject("rm", step + 1, size, "start" if i == 0 else "mid")
                    chunk = rows[i: i + size]
                    rc, rr = trainer.forward(pair_scores, engine, [r["chosen_ids"] for r in chunk],
                                             [r["rejected_ids"] for r in chunk], tok.pad_token_id, device,
                                             last=i + size >= len(rows))
                    loss = pair_loss(rc, rr)
                    trainer.backward(loss / len(rows))
                    total += float(loss.detach())
                    correct += int((rc > rr).sum())
                return total, correct

            def train_step(size: int) -> tuple[tuple[float, int], dict]:
                return accumulate(size), trainer.step(fault=("rm", step + 1, size))

            with st.meter.phase("train_step"):
                (step_loss, correct), stats = mb.run(step + 1, train_step, trainer.reset)
            st.skipped(stats, step + 1)
            losses.append(W.mean(step_loss) / len(rows))  # every rank has len(rows): the global mean
            accs.append(W.mean(correct) / len(rows))
            state["micro_batch"] = mb.size
            st.log(postfix={"loss": losses[-1], "acc": accs[-1]}, step=step + 1, loss=losses[-1], accuracy=accs[-1],
                   lr=stats["lr"], grad_norm=stats["grad_norm"], samples=len(rows) * W.size, micro_batch=mb.size,
                   **{k: stats[k] for k in ("loss_scale",) if k in stats},
                   oom_retries=sum(1 for e in mb.events if e["step"] == step + 1), seconds=st.step_seconds,
                   **{f"peak_{k}": v for k, v in st.meter.last["train_step"].items()})
        after = evaluate_pairs(engine, held, tok.pad_token_id, mb.size, device) if held else None

        # ---- save -----------------------------------------------------------------------------
        trainer.save_adapter(st.out / "adapter",  # rank 0 writes
                             extra_meta={"stage": "rm", "merged": [str(p.resolve()) for p in merged]})
        return st.finish({
            "steps": cfg.max_steps, "global_batch": cfg.batch * W.size, "merged_sft": [str(p) for p in merged], "train_pairs": len(train),
            "eval_pairs": len(held), "loss_first": losses[0], "loss_last": losses[-1],
            "loss_first5": sum(losses[:5]) / len(losses[:5]), "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
            "train_accuracy_last5": sum(accs[-5:]) / len(accs[-5:]),
            "eval_before": state["eval_before"], "eval_after": after, "micro_batch": mb.size, "oom_events": mb.events,
        }, trainer_counts(trainer))


__all__ = ["RMConfig", "run_rm", "pair_scores", "evaluate_pairs", "sft_adapter_of"]
