"""Stage 2, reward model: a `reward` LoRA adapter + scalar head on the (SFT-merged) shared base.

Pairwise loss -log sigmoid(r_chosen - r_rejected); the score is the head on the hidden state of
each sequence's last real token (found from the attention mask, never from the pad id: with
SmolLM2 the pad token is also EOS and ends every chat turn). Accuracy and margin are measured on a
held-out split before and after training.

The SFT adapter is *merged* into the base before the reward adapter is added (`--init-from`):
every later role (reward, critic, actor, and the reference = adapters off) then shares one base
that already is the SFT policy, so the PPO reference is the SFT model, as PPO requires, and no
forward pays for two stacked adapters.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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
from lowmem_rlhf.runs import (MetricsWriter, check_resume_config, is_complete, progress_bar, stage_dir, write_json,
                              write_stage_config)
from lowmem_rlhf.stopping import StopOnSignal
from lowmem_rlhf.trainer import make_trainer


@dataclass
class RMConfig:
    model: str | None
    data: str
    out: Path
    profile: Profile
    init_from: Path | None = None  # a finished SFT stage folder (RUN/sft) to merge into the base
    max_len: int = 512
    batch: int = 16  # pairs per optimizer step
    max_steps: int = 50
    lr: float | None = None
    eval_fraction: float = 0.1
    max_pairs: int | None = None  # use at most this many pairs (before the split)
    seed: int = 0
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    resume: bool = False  # continue from RUN/.rm.partial's newest checkpoint
    save_every: int = 10  # optimizer steps between checkpoints (0: only on SIGINT/SIGTERM)


def sft_adapter_of(init_from: Path | None) -> list[Path]:
    """The SFT adapter folder to merge, validated; [] when there is none."""
    if init_from is None:
        return []
    init_from = Path(init_from)
    adapter = init_from / "adapter" if (init_from / "adapter").exists() else init_from
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"--init-from {init_from}: no adapter there; pass a finished SFT stage folder (RUN/sft)")
    if (init_from / "adapter").exists() and not is_complete(init_from):
        raise UserError(f"--init-from {init_from}: the SFT stage did not finish (no summary.json); re-run it")
    return [adapter]


def pair_scores(engine: SharedBase, chosen: list[list[int]], rejected: list[list[int]], pad_id: int,
                device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (B,), (B,) of chosen and rejected, in one forward of the 2B sequences."""
    batch = D.collate_right(chosen + rejected, pad_id)
    ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    hidden = engine.hidden_states(ids, am)
    last = D.last_token_index(am)
    scores = engine.scalar(hidden[torch.arange(len(ids), device=device), last])
    return scores[: len(chosen)], scores[len(chosen):]


@torch.no_grad()
def evaluate_pairs(engine: SharedBase, pairs: list[dict], pad_id: int, micro_batch: int, device) -> dict:
    engine.model.eval()
    correct, margins = 0, []
    for i in range(0, len(pairs), micro_batch):
        chunk = pairs[i: i + micro_batch]
        rc, rr = pair_scores(engine, [p["chosen_ids"] for p in chunk], [p["rejected_ids"] for p in chunk], pad_id, device)
        correct += int((rc > rr).sum())
        margins += (rc - rr).tolist()
    engine.model.train()
    n = max(len(pairs), 1)
    return {"accuracy": correct / n, "margin": sum(margins) / n, "pairs": len(pairs)}


def prepare_pairs(cfg: RMConfig, tokenizer) -> tuple[list[dict], list[dict]]:
    pairs = D.to_pairs(D.load_records(cfg.data), cfg.data)
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]
    tokenized = [t for t in (D.tokenize_pair(p, tokenizer, cfg.max_len) for p in pairs) if t is not None]
    if len(tokenized) < 2:
        raise UserError(f"{cfg.data}: {len(tokenized)} usable pair(s) within --max-len {cfg.max_len}; need at least 2")
    return D.split_train_eval(tokenized, cfg.eval_fraction, cfg.seed)


def run_rm(cfg: RMConfig, console=None) -> dict:
    say = console.print if console else print
    # ---- setup --------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    prof = cfg.profile
    lr = cfg.lr if cfg.lr is not None else prof.learning_rate
    merged = sft_adapter_of(cfg.init_from)
    with stage_dir(cfg.out, "rm", cfg.overwrite, cfg.resume) as out, StopOnSignal(say) as stop:
        if cfg.resume:
            check_resume_config(out, cfg)
        loaded = load_model(cfg.model, prof, cfg.trust_remote_code, merge_adapters=tuple(merged),
                            context=(cfg.max_len, "--max-len"))
        tok = loaded.tokenizer
        train, held = prepare_pairs(cfg, tok)
        engine = SharedBase(loaded, prof, seed=cfg.seed)
        engine.add_adapter("reward", with_head=True)
        engine.model.train()
        size = min(prof.micro_batch, cfg.batch, learned_cap(cfg.out, "rm", prof.name) or prof.micro_batch)
        trainer = make_trainer(engine, "reward", prof, lr, cfg.max_steps, size, math.ceil(cfg.batch / size))
        device = trainer.device
        est = estimate(loaded.spec, prof, "rm", Shape(seq_len=cfg.max_len, batch=cfg.batch), target=device.type)
        if not cfg.resume:
            write_stage_config(out, "RM", cfg, prof, est, merged=merged, source=loaded.source)
        meter = MemoryMeter(device.type)
        mb = MicroBatch(size, "rm", cfg.out, prof.name, knob=f"--max-len (now {cfg.max_len})",
                        elastic=trainer.elastic)
        sampler = D.EpochSampler(len(train), cfg.seed)
        parts = {**trainer.checkpoint_parts(), "samplers": {"train": sampler}} if trainer.resumable else None
        state = {"step": 0, "losses": [], "accs": [], "eval_before": None, "micro_batch": mb.size, "seconds": 0.0}
        ckpt = checkpoint.resume(out, cfg.resume, state, parts)
        if ckpt is not None:
            mb.size = state["micro_batch"]
            say(f"resuming RM from {ckpt} (step {state['step']} of {cfg.max_steps})")
        elif held:
            state["eval_before"] = evaluate_pairs(engine, held, tok.pad_token_id, mb.size, device)
        metrics = MetricsWriter(out / "metrics.jsonl", keep=("step", state["step"]) if ckpt else None)

        # ---- loop -----------------------------------------------------------------------------
        bar = progress_bar(cfg.max_steps, "RM", cfg.progress)
        bar.update(state["step"])
        losses, accs = state["losses"], state["accs"]
        for step in range(state["step"], cfg.max_steps):
            t0 = time.time()
            rows = [train[i] for i in sampler.draw(cfg.batch)]

            def accumulate(size: int) -> tuple[float, int]:
                total, correct = 0.0, 0
                for i in range(0, len(rows), size):
                    maybe_inject("rm", step + 1, size)
                    chunk = rows[i: i + size]
                    rc, rr = trainer.forward(pair_scores, engine, [r["chosen_ids"] for r in chunk],
                                             [r["rejected_ids"] for r in chunk], tok.pad_token_id, device)
                    loss = -F.logsigmoid(rc - rr).sum()
                    trainer.backward(loss / len(rows))
                    total += float(loss.detach())
                    correct += int((rc > rr).sum())
                return total, correct

            with meter.phase("train_step"):
                step_loss, correct = mb.run(step + 1, accumulate, trainer.reset)
                stats = trainer.step()
            losses.append(step_loss / len(rows))
            accs.append(correct / len(rows))
            dt = time.time() - t0
            state.update(step=step + 1, micro_batch=mb.size, seconds=state["seconds"] + dt)
            metrics.write(step=step + 1, loss=losses[-1], accuracy=accs[-1], lr=stats["lr"],
                          grad_norm=stats["grad_norm"], samples=len(rows), micro_batch=mb.size,
                          oom_retries=sum(1 for e in mb.events if e["step"] == step + 1), seconds=dt,
                          **{f"peak_{k}": v for k, v in meter.read().items()})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.2f}")
            checkpoint.at_step_end(out, step + 1, cfg.max_steps, cfg.save_every, stop,
                                   parts and (lambda: checkpoint.capture(loop=state, **parts)), "RM")
        bar.close()
        after = evaluate_pairs(engine, held, tok.pad_token_id, mb.size, device) if held else None

        # ---- save ------------------------------------------------------------------------------
        trainer.save_adapter(out / "adapter", extra_meta={"stage": "rm", "merged": [str(p.resolve()) for p in merged]})
        report = memory_report(est, meter.peaks, trainer.counted())
        summary = {
            "stage": "rm", "model": loaded.source, "profile": prof.name, "steps": cfg.max_steps,
            "merged_sft": [str(p) for p in merged], "train_pairs": len(train), "eval_pairs": len(held),
            "loss_first": losses[0], "loss_last": losses[-1],
            "loss_first5": sum(losses[:5]) / len(losses[:5]), "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
            "train_accuracy_last5": sum(accs[-5:]) / len(accs[-5:]),
            "eval_before": state["eval_before"], "eval_after": after, "micro_batch": mb.size,
            "oom_events": mb.events, "seconds": state["seconds"], "memory": report,
        }
        metrics.close()
        write_json(out / "summary.json", summary)
    return summary


__all__ = ["RMConfig", "run_rm", "pair_scores", "evaluate_pairs", "sft_adapter_of"]
