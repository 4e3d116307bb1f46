"""Stage 1, SFT: train the `sft` LoRA adapter on instruction data, completion-only loss.

Reads top to bottom: setup (profile, model, data, adapter, optimizer; or all of it restored from
the newest checkpoint with --resume) -> loop (gradient accumulation, one backward per micro-batch,
halved on out-of-memory; a checkpoint every `save_every` steps and on SIGINT/SIGTERM) -> save (adapter in PEFT layout, resolved profile,
metrics, estimated-vs-measured memory) into RUN/sft, atomically.

The loop is ours, not trl's SFTTrainer: the trainer would wrap the model in its own PEFT adapter,
while every stage here must add named adapters (and heads) to one shared base that PPO reuses.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_rlhf import checkpoint
from lowmem_rlhf import data as D
from lowmem_rlhf.adapters import SharedBase
from lowmem_rlhf.config import Profile, Shape
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.estimator import estimate
from lowmem_rlhf.loading import load_model
from lowmem_rlhf.memory import MemoryMeter
from lowmem_rlhf.oom import MicroBatch, learned_cap, maybe_inject
from lowmem_rlhf.report import memory_report
from lowmem_rlhf.runs import (MetricsWriter, check_resume_config, progress_bar, stage_dir, write_json,
                              write_stage_config)
from lowmem_rlhf.stopping import StopOnSignal
from lowmem_rlhf.trainer import make_trainer


@dataclass
class SFTConfig:
    model: str | None  # folder, hub id, or None for the embedded default
    data: str
    out: Path
    profile: Profile
    max_len: int = 512
    batch: int = 16  # effective batch (sequences per optimizer step)
    max_steps: int = 50
    lr: float | None = None  # default: the profile's
    eval_fraction: float = 0.1
    seed: int = 0
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    resume: bool = False  # continue from RUN/.sft.partial's newest checkpoint
    save_every: int = 10  # optimizer steps between checkpoints (0: only on SIGINT/SIGTERM)


def completion_loss(engine: SharedBase, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over response tokens (labels != -100), and their count.

    Logits are computed only at positions that predict a label: (N, V), never (B, S, V)."""
    hidden = engine.hidden_states(batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    logits = engine.logits(hidden[:, :-1][mask]).float()
    loss = torch.nn.functional.cross_entropy(logits, labels[mask], reduction="sum")
    return loss, int(mask.sum())


@torch.no_grad()
def eval_loss(engine: SharedBase, examples: list[dict], pad_id: int, micro_batch: int, device) -> float:
    engine.model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), micro_batch):
        chunk = examples[i: i + micro_batch]
        batch = D.collate_right([e["input_ids"] for e in chunk], pad_id, [e["labels"] for e in chunk])
        loss, n = completion_loss(engine, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss), count + n
    engine.model.train()
    return total / max(count, 1)


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
    say = console.print if console else print
    # ---- setup --------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    prof = cfg.profile
    lr = cfg.lr if cfg.lr is not None else prof.learning_rate
    with stage_dir(cfg.out, "sft", cfg.overwrite, cfg.resume) as out, StopOnSignal(say) as stop:
        if cfg.resume:
            check_resume_config(out, cfg)
        loaded = load_model(cfg.model, prof, cfg.trust_remote_code, context=(cfg.max_len, "--max-len"))
        tok = loaded.tokenizer
        train, held = prepare_examples(cfg, tok)
        engine = SharedBase(loaded, prof, seed=cfg.seed)
        engine.add_adapter("sft")
        engine.model.train()
        size = min(prof.micro_batch, cfg.batch, learned_cap(cfg.out, "sft", prof.name) or prof.micro_batch)
        trainer = make_trainer(engine, "sft", prof, lr, cfg.max_steps, size, math.ceil(cfg.batch / size))
        device = trainer.device
        shape = Shape(seq_len=cfg.max_len, batch=cfg.batch)
        est = estimate(loaded.spec, prof, "sft", shape, target=device.type)
        if not cfg.resume:
            write_stage_config(out, "SFT", cfg, prof, est, source=loaded.source)
        meter = MemoryMeter(device.type)
        mb = MicroBatch(size, "sft", cfg.out, prof.name, knob=f"--max-len (now {cfg.max_len})",
                        elastic=trainer.elastic)
        sampler = D.EpochSampler(len(train), cfg.seed)
        parts = {**trainer.checkpoint_parts(), "samplers": {"train": sampler}} if trainer.resumable else None
        state = {"step": 0, "losses": [], "eval_before": None, "micro_batch": mb.size, "seconds": 0.0}
        ckpt = checkpoint.resume(out, cfg.resume, state, parts)
        if ckpt is not None:
            mb.size = state["micro_batch"]
            say(f"resuming SFT from {ckpt} (step {state['step']} of {cfg.max_steps})")
        elif held:
            state["eval_before"] = eval_loss(engine, held, tok.pad_token_id, mb.size, device)
        metrics = MetricsWriter(out / "metrics.jsonl", keep=("step", state["step"]) if ckpt else None)

        # ---- loop -----------------------------------------------------------------------------
        bar = progress_bar(cfg.max_steps, "SFT", cfg.progress)
        bar.update(state["step"])
        losses = state["losses"]
        for step in range(state["step"], cfg.max_steps):
            t0 = time.time()
            rows = [train[i] for i in sampler.draw(cfg.batch)]
            n_tokens = sum(sum(1 for x in r["labels"][1:] if x != -100) for r in rows)

            def accumulate(size: int) -> float:
                total = 0.0
                for i in range(0, len(rows), size):
                    maybe_inject("sft", step + 1, size)
                    chunk = rows[i: i + size]
                    batch = D.collate_right([r["input_ids"] for r in chunk], tok.pad_token_id,
                                            [r["labels"] for r in chunk])
                    loss, _ = trainer.forward(completion_loss, engine, {k: v.to(device) for k, v in batch.items()})
                    trainer.backward(loss / max(n_tokens, 1))
                    total += float(loss.detach())
                return total

            with meter.phase("train_step"):
                step_loss = mb.run(step + 1, accumulate, trainer.reset)
                stats = trainer.step()
            losses.append(step_loss / max(n_tokens, 1))
            dt = time.time() - t0
            state.update(step=step + 1, micro_batch=mb.size, seconds=state["seconds"] + dt)
            seq_tokens = sum(len(r["input_ids"]) for r in rows)
            metrics.write(step=step + 1, loss=losses[-1], lr=stats["lr"], grad_norm=stats["grad_norm"],
                          samples=len(rows), micro_batch=mb.size,
                          oom_retries=sum(1 for e in mb.events if e["step"] == step + 1),
                          tokens=seq_tokens, seconds=dt, tokens_per_s=seq_tokens / dt,
                          **{f"peak_{k}": v for k, v in meter.read().items()})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            checkpoint.at_step_end(out, step + 1, cfg.max_steps, cfg.save_every, stop,
                                   parts and (lambda: checkpoint.capture(loop=state, **parts)), "SFT")
        bar.close()
        eval_after = eval_loss(engine, held, tok.pad_token_id, mb.size, device) if held else None

        # ---- save ------------------------------------------------------------------------------
        trainer.save_adapter(out / "adapter", extra_meta={"stage": "sft"})
        report = memory_report(est, meter.peaks, trainer.counted())
        summary = {
            "stage": "sft", "model": loaded.source, "profile": prof.name, "steps": cfg.max_steps,
            "train_examples": len(train), "eval_examples": len(held),
            "loss_first": losses[0], "loss_last": losses[-1],
            "loss_first5": sum(losses[:5]) / len(losses[:5]), "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
            "eval_loss_before": state["eval_before"], "eval_loss_after": eval_after,
            "micro_batch": mb.size, "oom_events": mb.events, "seconds": state["seconds"], "memory": report,
        }
        metrics.close()
        write_json(out / "summary.json", summary)
    return summary


__all__ = ["SFTConfig", "run_sft", "completion_loss"]
