"""Stage 3, PPO on one shared base: actor, critic and reward are adapters (+ heads), the reference
is the base with adapters disabled (the SFT adapter is merged into that base first).

Each iteration reads top to bottom:
  generation    left-padded batched sampling with the actor adapter and the KV cache
  scoring       reward (reward adapter + head, or a program), reference log-probs (adapters off),
                old log-probs (actor) and values (critic), per-token KL penalty, GAE
  actor_update  PPO epochs: clipped policy loss, backward while the actor is active, its optimizer
  critic_update clipped value loss, backward while the critic is active, its optimizer
Peak memory of each phase is measured and logged beside the estimator's figure for that phase.
"""

from __future__ import annotations

import contextlib
import gc

import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_rlhf import checkpoint
from lowmem_rlhf import data as D
from lowmem_rlhf import ppo_math as M
from lowmem_rlhf.adapters import SharedBase
from lowmem_rlhf.config import Profile, Shape
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.estimator import estimate
from lowmem_rlhf.loading import load_model, output_layer
from lowmem_rlhf.memory import MemoryMeter
from lowmem_rlhf.oom import MicroBatch, learned_cap, maybe_inject
from lowmem_rlhf.optim import make_optimizer
from lowmem_rlhf.report import counted_components, memory_report
from lowmem_rlhf.rewards import CommandReward, FunctionReward, RewardError
from lowmem_rlhf.rm import sft_adapter_of
from lowmem_rlhf.runs import (MetricsWriter, check_resume_config, is_complete, progress_bar, stage_dir, write_json,
                              write_stage_config)
from lowmem_rlhf.stopping import StopOnSignal

PHASES = ("generation", "scoring", "actor_update", "critic_update")


@dataclass
class PPOConfig:
    model: str | None
    prompts: str  # prompt file (or hub dataset)
    out: Path
    profile: Profile
    sft: Path | None = None  # RUN/sft: merged into the base (the reference policy)
    reward_model: Path | None = None  # RUN/rm: reward adapter + head; the critic starts from it
    reward: str | None = None  # module:function
    reward_cmd: str | None = None
    reward_timeout: float = 60.0
    iterations: int = 20
    rollout_batch: int = 8
    prompt_len: int = 128
    response_len: int = 32
    ppo_epochs: int = 4
    minibatches: int = 1  # optimizer steps per epoch; each accumulates micro-batches
    lr: float | None = None  # actor; default: the profile's
    critic_lr: float | None = None
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: float | None = None  # set to use the adaptive controller
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    vf_clip: float = 0.2
    temperature: float = 1.0
    top_p: float = 1.0
    whiten_advantages: bool = True
    separate_models: bool = False  # the 4-model layout (benchmark comparison), not the design
    eval_prompts: str | None = None  # held-out prompts scored with `eval_reward` (greedy)
    eval_reward: str | None = None  # module:function; default: the training reward when programmatic
    seed: int = 0
    overwrite: bool = False
    trust_remote_code: bool = False
    progress: bool = True
    resume: bool = False  # continue from RUN/.ppo.partial's newest checkpoint
    save_every: int = 2  # iterations between checkpoints (0: only on SIGINT/SIGTERM)


@dataclass
class Rollout:
    seqs: torch.Tensor  # (B, P + R) left-padded prompt + right-padded response
    mask: torch.Tensor  # (B, P + R) attention mask
    response: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R) float, 1 on tokens up to and including the first EOS
    prompts: list[str]
    texts: list[str]


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1.0 on tokens up to and including the first EOS of each row, 0 after it. (B, R) -> (B, R)."""
    is_eos = (response == eos_id).long()
    after_first = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_first).float()


@torch.no_grad()
def generate(engine: SharedBase, prompt_ids: list[list[int]], tok, max_new: int, temperature: float,
             top_p: float, greedy: bool = False, prompt_texts: list[str] | None = None) -> Rollout:
    """Sample responses with whatever adapter is active (or none, inside engine.reference())."""
    engine.model.eval()
    batch = D.collate_left(prompt_ids, tok.pad_token_id)
    device = engine.loaded.device
    ids, am = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    out = engine.model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max_new, use_cache=True,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs)
    response = out[:, ids.shape[1]:]
    if response.shape[1] < max_new:  # every row stopped early: pad to the planned length
        pad = torch.full((len(out), max_new - response.shape[1]), tok.pad_token_id, device=device, dtype=out.dtype)
        response = torch.cat([response, pad], 1)
    rmask = response_mask(response, tok.eos_token_id)
    seqs = torch.cat([ids, response], 1)
    mask = torch.cat([am, rmask.long()], 1)
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, rmask)]
    engine.model.train()
    return Rollout(seqs, mask, response, rmask, prompt_texts or [], texts)


def generate_in_chunks(engine: SharedBase, prompt_ids: list[list[int]], tok, max_new: int, temperature: float,
                       top_p: float, chunk: int, prompt_texts: list[str] | None = None) -> Rollout:
    """`generate` over chunks of `chunk` prompts, joined into one rollout: each chunk's left-padded
    prompts are padded further on the left to the longest prompt of all (mask 0 there, positions
    from the mask, so nothing else changes). (B, P + R) like one batched call."""
    if chunk >= len(prompt_ids):
        return generate(engine, prompt_ids, tok, max_new, temperature, top_p, prompt_texts=prompt_texts)
    parts = [generate(engine, prompt_ids[i: i + chunk], tok, max_new, temperature, top_p)
             for i in range(0, len(prompt_ids), chunk)]
    P = max(r.seqs.shape[1] - max_new for r in parts)

    def left(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (P + max_new - t.shape[1], 0), value=value)

    return Rollout(torch.cat([left(r.seqs, tok.pad_token_id) for r in parts]),
                   torch.cat([left(r.mask, 0) for r in parts]),
                   torch.cat([r.response for r in parts]), torch.cat([r.response_mask for r in parts]),
                   prompt_texts or [], [t for r in parts for t in r.texts])


def response_hidden(engine: SharedBase, seqs: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
    """Hidden states that predict each response token: positions P-1 .. P+R-2, (B, R, H)."""
    hidden = engine.hidden_states(seqs, mask)
    return hidden[:, P - 1: -1]


def logprobs_of(engine: SharedBase, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, R, H), (B, R) -> (B, R) fp32 log-probs, chunked over the vocabulary."""
    _, out = output_layer(engine.loaded.model)
    B, R, H = h.shape
    lp = M.token_logprobs(h.reshape(B * R, H), out.weight, tokens.reshape(-1), getattr(out, "bias", None))
    return lp.view(B, R)


def make_reward(cfg: PPOConfig):
    given = [x for x in (cfg.reward_model, cfg.reward, cfg.reward_cmd) if x]
    if len(given) != 1:
        raise UserError("PPO needs exactly one reward: --reward-model RUN/rm, --reward module:function "
                        f"or --reward-cmd \"...\" (got {len(given)})")
    if cfg.reward:
        return FunctionReward(cfg.reward)
    if cfg.reward_cmd:
        return CommandReward(cfg.reward_cmd, cfg.reward_timeout)
    return None  # the learned reward model


def reward_adapter_of(path: Path | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    adapter = path / "adapter" if (path / "adapter").exists() else path
    if (path / "adapter").exists() and not is_complete(path):
        raise UserError(f"--reward-model {path}: the RM stage did not finish (no summary.json); re-run it")
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"--reward-model {path}: no adapter there; pass a finished RM stage folder (RUN/rm)")
    return adapter


@torch.no_grad()
def score_policy(roles: Roles, prompts: list[D.PromptExample], fn, tok, cfg: PPOConfig,
                 use_reference: bool) -> dict:
    """Greedy answers of the actor (or the reference = SFT policy) on held-out prompts, scored by fn."""
    ids = [D.tokenize_prompt(p, tok, cfg.prompt_len) for p in prompts]
    texts = [D.render_prompt(tok, p.prompt) for p in prompts]
    scores, answers = [], []
    for i in range(0, len(ids), max(cfg.rollout_batch, 1)):
        chunk = ids[i: i + cfg.rollout_batch]
        with roles.role("reference" if use_reference else "actor") as eng:
            ro = generate(eng, chunk, tok, cfg.response_len, 1.0, 1.0, greedy=True)
        answers += ro.texts
        scores += list(fn(texts[i: i + len(chunk)], ro.texts))
    return {"score": sum(scores) / max(len(scores), 1), "n": len(scores), "examples": answers[:5]}


class Roles:
    """Where each PPO role lives. Shared (the design): one base, `use()` switches adapters and the
    reference is that base with adapters off. Separate (the 4-model layout, for comparison): a
    model per role, each with its one adapter; the reference is a bare copy of the base."""

    def __init__(self, engines: dict[str, SharedBase]):
        self.engines = engines

    @contextlib.contextmanager
    def role(self, name: str):
        eng = self.engines[name]
        if name == "reference":
            with eng.reference():
                yield eng
        else:
            eng.use(name)
            yield eng

    @property
    def shared(self) -> bool:
        return len({id(e) for e in self.engines.values()}) == 1

    def unique(self) -> list[SharedBase]:
        return list({id(e): e for e in self.engines.values()}.values())


def build_roles(loaded_fn, prof: Profile, rm_adapter: Path | None, separate: bool, seed: int) -> Roles:
    if not separate:
        engine = SharedBase(loaded_fn(), prof, seed=seed)
        attach_roles(engine, rm_adapter)
        return Roles({r: engine for r in ("actor", "critic", "reward", "reference")})
    engines = {}
    engines["actor"] = SharedBase(loaded_fn(), prof, seed=seed)
    engines["actor"].add_adapter("actor")
    engines["critic"] = SharedBase(loaded_fn(), prof, seed=seed)
    if rm_adapter is not None:
        engines["critic"].load_adapter("critic", rm_adapter, trainable=True, with_head=True)
        engines["reward"] = SharedBase(loaded_fn(), prof, seed=seed)
        engines["reward"].load_adapter("reward", rm_adapter, trainable=False, with_head=True)
    else:
        engines["critic"].add_adapter("critic", with_head=True)
        engines["reward"] = engines["critic"]  # unused: the reward is a program
    engines["reference"] = SharedBase(loaded_fn(), prof, seed=seed)
    return Roles(engines)


def attach_roles(engine: SharedBase, rm_adapter: Path | None) -> None:
    """reward (frozen) and critic both load the trained RM adapter + head, checked key by key; the
    critic's copy is trainable. Without a reward model the critic starts fresh. The actor starts
    as a zero LoRA on the SFT-merged base, i.e. as the SFT policy."""
    if rm_adapter is not None:
        engine.load_adapter("reward", rm_adapter, trainable=False, with_head=True)
        engine.load_adapter("critic", rm_adapter, trainable=True, with_head=True)
    else:
        engine.add_adapter("critic", with_head=True)
    engine.add_adapter("actor")


def base_fingerprint(engine: SharedBase) -> str:
    """sha256 over every base (non-adapter, non-head) tensor's bytes: proof the base never moves."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(engine.model.named_parameters()):
        if "lora_" in name or ".score." in name or name.endswith("score.weight"):
            continue
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_ppo(cfg: PPOConfig, console=None) -> dict:
    say = console.print if console else print
    # ---- setup --------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    prof = cfg.profile
    program_reward = make_reward(cfg)
    merged = sft_adapter_of(cfg.sft)
    rm_adapter = reward_adapter_of(cfg.reward_model)
    eval_fn = FunctionReward(cfg.eval_reward) if cfg.eval_reward else (
        program_reward if isinstance(program_reward, FunctionReward) else None)
    with stage_dir(cfg.out, "ppo", cfg.overwrite, cfg.resume) as out, StopOnSignal(say) as stop:
        if cfg.resume:
            check_resume_config(out, cfg)
        loaded = load_model(cfg.model, prof, cfg.trust_remote_code, merge_adapters=tuple(merged),
                            context=(cfg.prompt_len + cfg.response_len,
                                     f"--prompt-len + --response-len ({cfg.prompt_len} + {cfg.response_len})"))
        device, tok = loaded.device, loaded.tokenizer
        first = [loaded]

        def load_again():
            return first.pop() if first else load_model(cfg.model, prof, cfg.trust_remote_code,
                                                         merge_adapters=tuple(merged))

        prompts = D.to_prompts(D.load_records(cfg.prompts), cfg.prompts)
        prompt_ids = [D.tokenize_prompt(p, tok, cfg.prompt_len) for p in prompts]
        prompt_texts = [D.render_prompt(tok, p.prompt) for p in prompts]
        held = D.to_prompts(D.load_records(cfg.eval_prompts), cfg.eval_prompts) if cfg.eval_prompts else []
        roles = build_roles(load_again, prof, rm_adapter, cfg.separate_models, cfg.seed)
        base_before = base_fingerprint(roles.engines["actor"])
        with roles.role("actor") as eng:
            opt_actor = make_optimizer(eng.parameters_of("actor"), prof.optimizer,
                                       cfg.lr if cfg.lr is not None else prof.learning_rate, device=device)
        with roles.role("critic") as eng:
            opt_critic = make_optimizer(eng.parameters_of("critic"), prof.optimizer,
                                        cfg.critic_lr if cfg.critic_lr is not None else prof.learning_rate,
                                        device=device)
        kl_ctl = (M.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
                  else M.FixedKLController(cfg.kl_coef))
        shape = Shape(prompt_len=cfg.prompt_len, response_len=cfg.response_len, rollout_batch=cfg.rollout_batch)
        est = estimate(loaded.spec, prof, "ppo", shape, target=device.type, separate_models=cfg.separate_models)
        est_by_phase = {p.name: p for p in est.phases}
        if not cfg.resume:
            write_stage_config(out, "PPO", cfg, prof, est, merged=merged, source=loaded.source)
        meter = MemoryMeter(device.type)
        mb = MicroBatch(min(prof.micro_batch, cfg.rollout_batch,
                            learned_cap(cfg.out, "ppo", prof.name) or prof.micro_batch),
                        "ppo", cfg.out, prof.name,
                        knob=f"--response-len (now {cfg.response_len}) or --prompt-len (now {cfg.prompt_len})")
        B, R = cfg.rollout_batch, cfg.response_len
        # generation samples the whole rollout at once; on OOM (a long response's KV cache) in chunks
        gen_mb = MicroBatch(min(B, learned_cap(cfg.out, "ppo-generation", prof.name) or B), "ppo-generation",
                            cfg.out, prof.name, knob=f"--response-len (now {cfg.response_len})")
        sampler = D.EpochSampler(len(prompts), cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        parts = dict(models={r: (roles.engines[r].model, roles.engines[r].owns(r)) for r in ("actor", "critic")},
                     optimizers={"actor": opt_actor, "critic": opt_critic}, schedulers={},
                     samplers={"prompts": sampler, "minibatch_order": gen})
        state = {"iteration": 0, "rewards": [], "iter_seconds": [], "skipped": 0, "eval_before": None,
                 "micro_batch": mb.size, "seconds": 0.0, "kl_coef": kl_ctl.value}
        ckpt = checkpoint.resume(out, cfg.resume, state, parts)
        if ckpt is not None:
            mb.size, kl_ctl.value = state["micro_batch"], state["kl_coef"]
            gen_mb.size = state.get("generation_batch", gen_mb.size)
            say(f"resuming PPO from {ckpt} (iteration {state['iteration']} of {cfg.iterations})")
        elif held and eval_fn:
            state["eval_before"] = score_policy(roles, held, eval_fn, tok, cfg, use_reference=True)
        metrics = MetricsWriter(out / "metrics.jsonl", keep=("iteration", state["iteration"]) if ckpt else None)
        rewards_hist, iter_seconds = state["rewards"], state["iter_seconds"]

        def make_state() -> dict:
            state.update(micro_batch=mb.size, generation_batch=gen_mb.size, kl_coef=kl_ctl.value)
            return checkpoint.capture(loop=state, **parts)

        def end_of_iteration(it: int) -> None:
            checkpoint.at_step_end(out, it + 1, cfg.iterations, cfg.save_every, stop, make_state, "PPO")

        # ---- loop -----------------------------------------------------------------------------
        bar = progress_bar(cfg.iterations, "PPO", cfg.progress)
        bar.update(state["iteration"])
        for it in range(state["iteration"], cfg.iterations):
            t_iter = time.time()
            times: dict[str, float] = {}
            pick = sampler.draw(B)
            torch.manual_seed(cfg.seed * 100_003 + it)
            # generation
            t0 = time.time()
            with meter.phase("generation"), roles.role("actor") as eng:

                def sample(size: int, eng=eng) -> Rollout:
                    maybe_inject("ppo-generation", it + 1, size)
                    return generate_in_chunks(eng, [prompt_ids[i] for i in pick], tok, R, cfg.temperature,
                                              cfg.top_p, size, prompt_texts=[prompt_texts[i] for i in pick])

                ro = gen_mb.run(it + 1, sample, lambda: None)
            times["generation"] = time.time() - t0
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the generation cache is gone before training
            P = ro.seqs.shape[1] - R
            # scoring

            def score(size: int) -> tuple[torch.Tensor, ...]:
                scores = torch.zeros(B, device=device)
                ref_lp, old_lp, values, entropy = (torch.zeros(B, R, device=device) for _ in range(4))
                for s in range(0, B, size):
                    maybe_inject("ppo", it + 1, size)
                    sl = slice(s, s + size)
                    seqs, am = ro.seqs[sl], ro.mask[sl]
                    if program_reward is None:
                        with roles.role("reward") as eng:
                            hid = eng.hidden_states(seqs, am)
                            last = D.last_token_index(am)
                            scores[sl] = eng.scalar(hid[torch.arange(len(seqs), device=device), last])
                    with roles.role("reference") as eng:
                        ref_lp[sl] = logprobs_of(eng, response_hidden(eng, seqs, am, P), ro.response[sl])
                    with roles.role("actor") as eng:
                        h = response_hidden(eng, seqs, am, P)
                        old_lp[sl] = logprobs_of(eng, h, ro.response[sl])
                        _, outl = output_layer(eng.loaded.model)
                        entropy[sl] = M.token_entropy(h.reshape(-1, h.shape[-1]), outl.weight).view(h.shape[0], R)
                    with roles.role("critic") as eng:
                        values[sl] = eng.scalar(response_hidden(eng, seqs, am, P))
                return scores, ref_lp, old_lp, values, entropy

            t0 = time.time()
            try:
                with meter.phase("scoring"), torch.no_grad():
                    for eng in roles.unique():
                        eng.model.eval()
                    program_scores = (torch.tensor(program_reward(ro.prompts, ro.texts), device=device,
                                                   dtype=torch.float32) if program_reward is not None else None)
                    scores, ref_lp, old_lp, values, entropy = mb.run(it + 1, score, lambda: None)
                    if program_scores is not None:
                        scores = program_scores
                    for eng in roles.unique():
                        eng.model.train()
            except RewardError as e:
                for eng in roles.unique():
                    eng.model.train()
                state["skipped"] += 1
                state["iteration"], state["skip_reason"] = it + 1, str(e)
                metrics.write(iteration=it + 1, skipped=True, reason=str(e))
                say(f"PPO iteration {it + 1} skipped: {e}")
                bar.update(1)
                end_of_iteration(it)
                continue
            m = ro.response_mask
            kl = M.kl_estimate(old_lp, ref_lp, cfg.kl_estimator) * m
            rewards = M.shaped_rewards(scores, kl, m, kl_ctl.value)
            adv, returns = M.gae(rewards, values, m, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = M.whiten(adv, m)
            times["scoring"] = time.time() - t0
            # PPO epochs: actor then critic on each minibatch, one backward per adapter while active

            def actor_loss(eng: SharedBase, idx: list[int]):
                lp = logprobs_of(eng, response_hidden(eng, ro.seqs[idx], ro.mask[idx], P), ro.response[idx])
                pl = M.policy_loss(lp, old_lp[idx], adv[idx], m[idx], cfg.clip)
                return pl.loss, {"policy_loss": pl.loss.detach(), "clip_frac": pl.clip_frac, "approx_kl": pl.approx_kl}

            def critic_loss(eng: SharedBase, idx: list[int]):
                v = eng.scalar(response_hidden(eng, ro.seqs[idx], ro.mask[idx], P))
                vl, vf = M.value_loss(v, values[idx], returns[idx], m[idx], cfg.vf_clip)
                return vl, {"value_loss": vl.detach(), "vf_clip_frac": vf}

            stats = {"policy_loss": [], "clip_frac": [], "approx_kl": [], "value_loss": [], "vf_clip_frac": []}
            times["actor_update"] = times["critic_update"] = 0.0
            n_mb = max(1, min(cfg.minibatches, B))
            for _epoch in range(cfg.ppo_epochs):
                perm = torch.randperm(B, generator=gen).tolist()
                for chunk in [perm[i::n_mb] for i in range(n_mb)]:
                    for role, opt, loss_of in (("actor", opt_actor, actor_loss), ("critic", opt_critic, critic_loss)):
                        t0 = time.time()
                        with meter.phase(f"{role}_update"), roles.role(role) as eng:
                            for k, v in update_adapter(eng, role, opt, chunk, mb, it + 1, loss_of).items():
                                stats[k] += v
                        times[f"{role}_update"] += time.time() - t0
            mean_kl = float(M.masked_mean(kl, m) * m.sum() / B)  # per-sequence KL
            kl_ctl.update(mean_kl, B)
            rewards_hist.append(float(scores.mean()))
            n_tokens = int(ro.mask.sum())
            row = {
                "iteration": it + 1, "reward_mean": float(scores.mean()), "reward_std": float(scores.std()),
                "kl": mean_kl, "kl_coef": kl_ctl.value, "entropy": float(M.masked_mean(entropy, m)),
                "response_length": float(m.sum(-1).mean()), "samples": B, "micro_batch": mb.size,
                "generation_batch": gen_mb.size,
                "oom_retries": sum(1 for e in mb.events + gen_mb.events if e["step"] == it + 1),
                **{k: sum(v) / len(v) for k, v in stats.items() if v},
                **{f"seconds_{k}": v for k, v in times.items()},
                "tokens_per_s_generation": float(m.sum()) / max(times["generation"], 1e-9),
                "tokens_per_s_update": n_tokens * cfg.ppo_epochs / max(times["actor_update"] + times["critic_update"], 1e-9),
            }
            for ph in PHASES:
                for fig, v in meter.peaks.get(ph, {}).items():
                    row[f"peak_{ph}_{fig}"] = v
                e = est_by_phase[ph]
                row[f"est_{ph}_{'allocated' if device.type == 'cuda' else 'cpu_ram'}"] = (
                    e.allocated if device.type == "cuda" else e.cpu_ram)
            metrics.write(**row)
            iter_seconds.append(sum(times.values()))
            state.update(iteration=it + 1, seconds=state["seconds"] + time.time() - t_iter)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{mean_kl:.3f}")
            end_of_iteration(it)
        bar.close()
        skipped = state["skipped"]
        eval_before = state["eval_before"]
        if skipped == cfg.iterations:
            raise UserError(f"every PPO iteration was skipped because the reward failed ({cfg.iterations} of "
                            f"{cfg.iterations}; last: {state.get('skip_reason', '?')}); fix the reward and re-run")
        eval_after = score_policy(roles, held, eval_fn, tok, cfg, use_reference=False) if held and eval_fn else None

        # ---- save ------------------------------------------------------------------------------
        meta = {"stage": "ppo", "merged": [str(p) for p in merged]}
        roles.engines["actor"].save_adapter("actor", out / "actor", extra_meta=meta)
        roles.engines["critic"].save_adapter("critic", out / "critic", extra_meta=meta)
        counted = {}
        for eng in roles.unique():
            for k, v in counted_components(eng.model).items():
                counted[k] = counted.get(k, 0) + v
        report = memory_report(est, meter.peaks, counted)
        summary = {
            "stage": "ppo", "model": loaded.source, "profile": prof.name, "iterations": cfg.iterations,
            "skipped_iterations": skipped, "merged_sft": [str(p) for p in merged],
            "reward": cfg.reward or cfg.reward_cmd or str(cfg.reward_model),
            "reward_first5": _mean(rewards_hist[:5]), "reward_last5": _mean(rewards_hist[-5:]),
            "heldout_before": eval_before, "heldout_after": eval_after,
            "base_sha256_before": base_before, "base_sha256_after": base_fingerprint(roles.engines["actor"]),
            "separate_models": cfg.separate_models, "seconds_per_iteration": _mean(iter_seconds),
            "micro_batch": mb.size, "generation_batch": gen_mb.size, "oom_events": gen_mb.events + mb.events, "seconds": state["seconds"], "memory": report,
        }
        metrics.close()
        write_json(out / "summary.json", summary)
        try:
            from lowmem_rlhf.plots import plot_ppo

            plot_ppo(out / "metrics.jsonl", out / "ppo.png")
        except ImportError:
            pass
    return summary


def update_adapter(eng: SharedBase, adapter: str, opt: torch.optim.Optimizer, chunk: list[int], mb: MicroBatch,
                   iteration: int, loss_of) -> dict[str, list[float]]:
    """One optimizer step of the active adapter on the rollout rows `chunk`, accumulated over
    micro-batches (halved and retried on OOM). loss_of(eng, idx) -> (mean loss over idx, stats)."""
    def grads(size: int) -> dict[str, list[float]]:
        st: dict[str, list[float]] = {}
        for s in range(0, len(chunk), size):
            maybe_inject("ppo", iteration, size)
            idx = chunk[s: s + size]
            loss, extra = loss_of(eng, idx)
            eng.backward(loss * len(idx) / len(chunk))
            for k, v in extra.items():
                st.setdefault(k, []).append(float(v))
        return st

    def reset() -> None:  # what an OOM mid-update undoes: the partial gradients and the pending forward
        opt.zero_grad(set_to_none=True)
        eng.abandon()

    st = mb.run(iteration, grads, reset)
    torch.nn.utils.clip_grad_norm_(eng.parameters_of(adapter), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return st


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


__all__ = ["PPOConfig", "run_ppo", "generate", "response_mask", "Rollout", "attach_roles", "base_fingerprint"]

