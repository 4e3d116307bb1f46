"""`lowmem-rlhf eval`: score a finished run's policies on a prompts file with a programmatic reward.

    policies = resolve_policies(run, ("sft", "ppo"))   # what each policy is: base, merged adapters, adapter on top
    summary = run_eval(EvalConfig(run, prompts, reward=...))   # generate, score, write RUN/eval/<prompts>/

Each policy runs as training last ran it:
- `base`: the base model, no adapters;
- `sft`: the base with RUN/sft/adapter merged in (what the RM and PPO start from, and what `export`
  writes);
- `ppo`: the base with the SFT adapters recorded in the actor's metadata merged in, and
  RUN/ppo/actor on top as an active LoRA adapter (as PPO sampled it);
- an adapter folder: the same, from its own `lowmem_rlhf_adapter.json` (an SFT adapter is merged).

Each is loaded with the profile saved in its stage's config.json, so it runs the quantization it
was trained with (the planner's pick when there is none, or when it is ZeRO-3 offload). Policies
that share a base (sft and ppo usually do) share one load: `sft` is then the base with adapters off.

Greedy answers with `samples=1`; K > 1 sampled answers per prompt otherwise. Per policy the output
folder gets `<policy>.jsonl` (one row per prompt: prompt, responses, scores), and `summary.json` is
written last: a folder without it is unfinished. Every file is written to a temporary name and
renamed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lowmem_rlhf import data as D
from lowmem_rlhf.algo.experience import generate
from lowmem_rlhf.algo.rewards import CommandReward, FunctionReward, RewardError
from lowmem_rlhf.config import (
    Profile,
    Shape,
    dataclass_from_dict,
    load_all_profiles,
    load_profile,
)
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.files import fsync
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import load_model, read_adapter_meta
from lowmem_rlhf.plan.planner import machine_profile
from lowmem_rlhf.runtime.runs import ensure_writable, partial_dir, progress_bar
from lowmem_rlhf.runtime.threads import ThreadGovernor

SUMMARY = "summary.json"
STAGES = {"sft": ("adapter", "SFT"), "ppo": ("actor", "PPO"), "grpo": ("actor", "GRPO"),
          "rloo": ("actor", "RLOO")}  # policy stage -> its adapter folder, title
Z95 = 1.959963984540054  # two-sided 95% normal quantile
LOAD_KNOBS = ("quant", "double_quant", "dtype", "kbit_fp32_upcast", "offload", "attn_impl", "lora_targets")  # what a load depends on
DATA_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".ndjson", ".json", ".parquet")


@dataclass
class EvalConfig:
    run: Path
    prompts: str
    reward: str | None = None  # module:function or file.py:function
    reward_cmd: str | None = None  # evaluator process
    reward_timeout: float = 60.0
    policies: Sequence[str] = ()  # sft, ppo, base or adapter folders; () = every finished policy
    samples: int = 1  # 1 = greedy
    temperature: float = 1.0  # for samples > 1
    max_new_tokens: int | None = None  # None: the PPO stage's response_len, else 64
    prompt_len: int | None = None  # None: the PPO stage's prompt_len, else 128
    batch: int | None = None  # answers per generate call; None: the PPO stage's rollout_batch, else 8
    pass_threshold: float = 1.0
    out: Path | None = None  # None: RUN/eval/<prompts file stem>
    seed: int = 0
    model: str | None = None  # base model override (default: recorded in the run)
    profile: str | None = None  # profile override (default: each policy's saved profile)
    trust_remote_code: bool = False
    progress: bool = True


@dataclass
class Policy:
    name: str  # label: the output file is <name>.jsonl
    spec: str  # as requested (--policy)
    source: str  # base model
    merged: tuple[Path, ...] = ()  # adapters merged into the base, in order
    adapter: Path | None = None  # applied on top, unmerged
    stage_dir: Path | None = None  # whose config.json holds the profile it was trained with


# ---- statistics -------------------------------------------------------------------------------

def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a rate of k successes in n trials (95% with the default z).

    center = (p + z²/2n) / (1 + z²/n), half-width = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²),
    with p = k/n; clipped to [0, 1]. Unlike p ± z*sqrt(p(1-p)/n) it stays informative at k = 0
    and k = n. n = 0 gives (0, 1): no evidence either way."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must be within 0..n={n}")
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def pass_stats(scores: Sequence[Sequence[float]], threshold: float) -> dict[str, Any]:
    """Per-prompt score lists -> mean score, samples passing (score >= threshold) over all samples
    with its 95% Wilson interval, and (several samples per prompt) pass@K: prompts with any pass."""
    flat = [s for row in scores for s in row]
    n, k = len(flat), sum(1 for s in flat if s >= threshold)
    lo, hi = wilson_interval(k, n)
    samples = max((len(row) for row in scores), default=0)
    out: dict[str, Any] = {"prompts": len(scores), "samples": samples, "mean_score": sum(flat) / n if n else None,
                           "passed": k, "total": n, "pass_rate": k / n if n else None, "pass_rate_ci95": [lo, hi]}
    if samples > 1:
        m = sum(1 for row in scores if any(s >= threshold for s in row))
        lo, hi = wilson_interval(m, len(scores))
        out["pass_at_k"] = {"k": samples, "passed": m, "prompts": len(scores),
                            "rate": m / len(scores) if scores else None, "ci95": [lo, hi]}
    return out


# ---- which policies -----------------------------------------------------------------------------

def check_run(run: Path) -> Path:
    run = Path(run)
    if not run.exists():
        raise UserError(f"run folder {run} not found; pass the --out folder of sft/ppo/auto (e.g. runs/demo)")
    if not run.is_dir():
        raise UserError(f"{run} is not a folder; pass a run folder (the --out of sft/ppo/auto)")
    return run


def finished(run: Path, stage: str) -> bool:
    adapter, _ = STAGES[stage]
    return (run / stage / SUMMARY).exists() and (run / stage / adapter / "adapter_config.json").exists()


def _stage_needed(run: Path, stage: str) -> UserError:
    """The one line for a requested stage that is missing or did not finish: which, and what to run."""
    adapter, title = STAGES[stage]
    cmd = (f"lowmem-rlhf sft --out {run} --data ..." if stage == "sft" else
           f"lowmem-rlhf ppo --out {run} --prompts ... --sft {run / 'sft'} --reward ...")
    if partial_dir(run, stage).exists():
        return UserError(f"--policy {stage}: the {title} stage of {run} did not finish ({partial_dir(run, stage)} "
                         f"is in progress); continue it with the same `lowmem-rlhf {stage} ...` command plus --resume "
                         f"(or `lowmem-rlhf auto --resume {run}`), then evaluate")
    if (run / stage).exists():
        what = "no summary.json" if not (run / stage / SUMMARY).exists() else f"no {adapter}/adapter_config.json"
        return UserError(f"--policy {stage}: {run / stage} is not a finished {title} stage ({what}); re-run it "
                         f"(`{cmd} --overwrite`)")
    return UserError(f"--policy {stage}: {run} has no {title} stage ({run / stage} not found); run `{cmd}` first, "
                     f"or choose another --policy")


def _merged_path(p: str, run: Path, adapter: Path) -> Path:
    """A merged SFT adapter recorded in metadata: as written (absolute, or relative to where the stage
    ran), else the same-named stage folder of this run (a run folder that was moved or copied)."""
    path = Path(p)
    for cand in (path, run / path.parent.name / path.name):
        if (cand / "adapter_config.json").exists():
            return cand.resolve()
    raise UserError(f"{adapter}: it was trained on a base merged with {path}, which is gone; restore that SFT folder")


def _source(meta: dict, model: str | None, where: Path) -> str:
    if model:
        return model
    if not meta.get("source"):
        raise UserError(f"{where}: its metadata records no base model (lowmem_rlhf_adapter.json 'source'); pass --model")
    return meta["source"]


def _adapter_policy(spec: str, run: Path, adapter: Path, model: str | None, name: str,
                    stage_dir: Path | None) -> Policy:
    meta = read_adapter_meta(adapter)
    if meta.get("head"):
        raise UserError(f"--policy {spec}: {adapter} is a reward model or critic (it has a scalar head), "
                        "not a policy; pass sft, ppo, base or a policy adapter folder")
    source = _source(meta, model, adapter)
    merged = tuple(_merged_path(p, run, adapter) for p in meta.get("merged", []))
    if meta.get("stage") == "sft" and not merged:  # an SFT adapter: merged, as `--policy sft` runs it
        return Policy(name, spec, source, (adapter.resolve(),), None, stage_dir)
    return Policy(name, spec, source, merged, adapter.resolve(), stage_dir)


def _base_policy(run: Path, model: str | None) -> Policy:
    """The base model with no adapters; its source from the run's stages (or --model)."""
    stage_dirs = [run / s for s in ("ppo", "grpo", "rloo", "sft", "rm") if (run / s / SUMMARY).exists()]
    if model:
        return Policy("base", "base", model, stage_dir=stage_dirs[0] if stage_dirs else None)
    for d in stage_dirs:
        for sub in ("actor", "adapter"):
            source = read_adapter_meta(d / sub).get("source") if (d / sub).exists() else None
            if source:
                return Policy("base", "base", source, stage_dir=d)
        source = _read_config(d).get("source")
        if source:
            return Policy("base", "base", source, stage_dir=d)
    raise UserError(f"--policy base: {run} has no finished stage that records its base model; pass --model")


def _label(path: Path) -> str:
    text = f"{path.parent.name}-{path.name}" if path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "adapter"


def resolve_policies(run: Path, requested: Sequence[str] = (), model: str | None = None) -> list[Policy]:
    """The policies to evaluate, in order: `requested` (sft, ppo, base, adapter folders), or every
    finished policy of the run (sft, then ppo). One-line errors for missing or unfinished stages."""
    run = check_run(run)
    if not requested:
        requested = [s for s in STAGES if finished(run, s)]
        if not requested:
            raise UserError(f"{run}: no finished policy to evaluate (no sft/ or ppo/ with summary.json); run "
                            f"`lowmem-rlhf sft --out {run} ...` (or `lowmem-rlhf auto`) first, or pass --policy base "
                            "or --policy ADAPTER_FOLDER")
    out: list[Policy] = []
    for spec in dict.fromkeys(requested):  # each once, in order
        key = spec.strip()
        if key in STAGES:
            if not finished(run, key):
                raise _stage_needed(run, key)
            adapter = run / key / STAGES[key][0]
            pol = _adapter_policy(key, run, adapter, model, key, run / key)
        elif key == "base":
            pol = _base_policy(run, model)
        elif key == "rm":
            raise UserError("--policy rm: the reward model scores answers, it does not write them; choose sft, ppo, "
                            "base or a policy adapter folder")
        else:
            path = Path(key)
            if not path.exists():
                raise UserError(f"--policy {key}: not sft, ppo or base, and no such adapter folder")
            adapter = next((p for p in (path, path / "actor", path / "adapter") if (p / "adapter_config.json").exists()),
                           None)
            if adapter is None:
                raise UserError(f"--policy {key}: not an adapter folder (no adapter_config.json); pass e.g. "
                                f"{run / 'ppo' / 'actor'}")
            stage_dir = adapter.parent if (adapter.parent / "config.json").exists() else None
            pol = _adapter_policy(key, run, adapter, model, _label(adapter), stage_dir)
        names = {p.name for p in out}
        base_name, i = pol.name, 2
        while pol.name in names:
            pol.name, i = f"{base_name}-{i}", i + 1
        out.append(pol)
    return out


# ---- how to load them ---------------------------------------------------------------------------

def _read_config(stage_dir: Path | None) -> dict:
    path = None if stage_dir is None else Path(stage_dir) / "config.json"
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg}); the run folder is damaged") from None
    return data if isinstance(data, dict) else {}


def saved_profile(stage_dir: Path | None) -> Profile | None:
    """The profile a stage ran with (its config.json), or None."""
    saved = _read_config(stage_dir).get("profile")
    if not isinstance(saved, dict):
        return None
    return dataclass_from_dict(Profile, saved, str(Path(stage_dir) / "config.json"))


def policy_profile(pol: Policy, override: str | None, shape: Shape, trust_remote_code: bool) -> tuple[Profile, str]:
    """(profile, where it came from): --profile; else the policy's stage's saved profile (same
    quantization as training); else, or for ZeRO-3 offload (a training layout), the planner's pick."""
    if override:
        return machine_profile(load_profile(override)), "--profile"
    prof = saved_profile(pol.stage_dir)
    if prof is not None and prof.offload != "zero3":
        return machine_profile(prof), str(pol.stage_dir / "config.json")
    from lowmem_rlhf.model.loading import resolve_source
    from lowmem_rlhf.plan.hardware import resolve_hardware
    from lowmem_rlhf.plan.model_spec import load_spec
    from lowmem_rlhf.plan.planner import choose_profile

    spec = load_spec(resolve_source(pol.source), trust_remote_code)
    chosen = choose_profile(spec, resolve_hardware(), shape, load_all_profiles(), ("ppo",)).profile
    return chosen, "planner" + (f" ({pol.stage_dir.name} trained with ZeRO-3 offload)" if prof is not None else "")


# ---- output -------------------------------------------------------------------------------------

def prompts_stem(prompts: str) -> str:
    """`data/demo-prompts.jsonl` -> `demo-prompts`; a hub name `org/set:split` -> `org_set_split`."""
    path = Path(prompts)
    if path.exists():
        name = path.name
        suffix = next((s for s in DATA_SUFFIXES if name.lower().endswith(s)), "")
        name = name[: len(name) - len(suffix)] if suffix else path.stem
    else:
        name = prompts
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "prompts"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, flush it to disk, rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync(path.parent, strict=False)


# ---- the run -----------------------------------------------------------------------------------

@dataclass
class _Loaded:
    key: tuple
    engine: SharedBase
    ids: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def make_reward(cfg: EvalConfig):
    given = [x for x in (cfg.reward, cfg.reward_cmd) if x]
    if len(given) != 1:
        raise UserError("eval needs exactly one reward: --reward module:function (or path/to/file.py:function) or "
                        f"--reward-cmd \"...\" (got {'both' if given else 'neither'})")
    return FunctionReward(cfg.reward) if cfg.reward else CommandReward(cfg.reward_cmd, cfg.reward_timeout)


def _positive(**values: int | None) -> None:
    for name, v in values.items():
        if v is not None and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")


def answer(engine: SharedBase, pol: Policy, ids: list[list[int]], texts: list[str], tok, reward, cfg: EvalConfig,
           max_new: int, batch: int, bar) -> tuple[list[list[str]], list[list[float]]]:
    """K answers per prompt (greedy when K = 1), `batch` at a time, each batch scored by `reward`.
    -> responses and scores per prompt."""
    K = cfg.samples
    flat = [i for i in range(len(ids)) for _ in range(K)]
    responses: list[list[str]] = [[] for _ in ids]
    scores: list[list[float]] = [[] for _ in ids]
    torch.manual_seed(cfg.seed)  # every policy draws from the same stream
    threads = ThreadGovernor()  # torch threads = the free cores: generation collapses on a shared CPU otherwise
    for s in range(0, len(flat), batch):
        threads.update()
        idx = flat[s: s + batch]
        ptexts = [texts[i] for i in idx]
        try:
            with torch.no_grad():
                ro = generate(engine, [ids[i] for i in idx], tok, max_new, cfg.temperature, 1.0, greedy=K == 1,
                              prompt_texts=ptexts)
        except torch.OutOfMemoryError:
            raise UserError(f"--policy {pol.spec}: out of memory generating {len(idx)} answers of {max_new} tokens; "
                            f"lower --batch (now {batch}) or --max-new-tokens (now {max_new})") from None
        try:
            got = reward(ptexts, ro.texts)
        except RewardError as e:
            first, last = idx[0] + 1, idx[-1] + 1
            where = f"prompt {first}" if first == last else f"prompts {first}-{last}"

            def name(m: re.Match) -> str:  # the reward numbers samples within this batch: say which prompt
                i = int(m[1])
                if i >= len(idx):
                    return m[0]
                return f"sample {i} of the batch (prompt {idx[i] + 1}" + (f", answer {(s + i) % K + 1}" if K > 1 else "") + "; "

            raise UserError(f"--policy {pol.spec}, {where} of {cfg.prompts}: "
                            + re.sub(r"\bsample (\d+) \(", name, str(e))) from None
        for i, text, score in zip(idx, ro.texts, got):
            responses[i].append(text)
            scores[i].append(score)
        bar.update(len(idx))
    return responses, scores


def run_eval(cfg: EvalConfig, console=None) -> dict[str, Any]:
    """Evaluate each policy; write <policy>.jsonl per policy and summary.json (last). -> the summary."""
    say = console.print if console else print
    run = check_run(cfg.run)
    _positive(samples=cfg.samples, max_new_tokens=cfg.max_new_tokens, prompt_len=cfg.prompt_len, batch=cfg.batch)
    if cfg.samples > 1 and not cfg.temperature > 0:
        raise UserError(f"--temperature must be above 0 to sample --samples {cfg.samples} answers, got {cfg.temperature}")
    if not math.isfinite(cfg.pass_threshold):
        raise UserError(f"--pass-threshold must be a finite number, got {cfg.pass_threshold}")
    reward = make_reward(cfg)
    policies = resolve_policies(run, cfg.policies, cfg.model)
    rl = [run / s for s in ("ppo", "grpo", "rloo") if (run / s / SUMMARY).exists()]  # the newest RL stage's shape
    rl_dir = max(rl, key=lambda d: (d / SUMMARY).stat().st_mtime, default=None)
    ppo_cfg = _read_config(rl_dir) if rl_dir is not None else {}
    max_new = cfg.max_new_tokens or ppo_cfg.get("response_len") or 64
    prompt_len = cfg.prompt_len or ppo_cfg.get("prompt_len") or 128
    batch = cfg.batch or ppo_cfg.get("rollout_batch") or 8
    prompts = D.to_prompts(D.load_records(cfg.prompts), cfg.prompts)
    out = Path(cfg.out) if cfg.out is not None else run / "eval" / prompts_stem(cfg.prompts)
    ensure_writable(out)
    shape = Shape(prompt_len=prompt_len, response_len=max_new, rollout_batch=batch)
    greedy = cfg.samples == 1
    say(f"eval of {run}: {len(prompts)} prompts from {cfg.prompts}, "
        + ("greedy" if greedy else f"{cfg.samples} samples each at temperature {cfg.temperature:g}")
        + f", up to {max_new} new tokens, policies {', '.join(p.name for p in policies)} -> {out}")

    summary: dict[str, Any] = {
        "run": str(run), "prompts_file": str(cfg.prompts), "reward": cfg.reward or cfg.reward_cmd,
        "samples": cfg.samples, "greedy": greedy, "temperature": None if greedy else cfg.temperature,
        "max_new_tokens": max_new, "prompt_len": prompt_len, "batch": batch, "pass_threshold": cfg.pass_threshold,
        "seed": cfg.seed, "policies": {},
    }
    current: _Loaded | None = None
    engine = loaded = ctx = None
    for pol in policies:
        t0 = time.time()
        prof, prof_from = policy_profile(pol, cfg.profile, shape, cfg.trust_remote_code)
        key = (pol.source, json.dumps({k: v for k, v in prof.to_dict().items() if k in LOAD_KNOBS}, sort_keys=True),
               tuple(str(p) for p in pol.merged))
        if current is None or current.key != key:
            current = engine = loaded = ctx = None  # the previous model goes before the next one loads
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            loaded = load_model(pol.source, prof, cfg.trust_remote_code, merge_adapters=pol.merged, training=False,
                                context=(prompt_len + max_new, f"--prompt-len + --max-new-tokens ({prompt_len} + {max_new})"))
            tok = loaded.tokenizer
            current = _Loaded(key, SharedBase(loaded, prof, cfg.seed),
                              [D.tokenize_prompt(p, tok, prompt_len) for p in prompts],
                              [D.render_prompt(tok, p.prompt) for p in prompts])
        engine, tok = current.engine, current.engine.loaded.tokenizer
        if pol.adapter is not None:
            if pol.name not in engine.heads:
                engine.load_adapter(pol.name, pol.adapter, trainable=False)
            engine.use(pol.name)
            ctx = contextlib.nullcontext()
        else:
            ctx = engine.reference()  # the (merged) base with every adapter off
        say(f"{pol.name}: base {pol.source}" + "".join(f" + {p} (merged)" for p in pol.merged)
            + (f" + {pol.adapter}" if pol.adapter else "") + f", profile {prof.name} (quant {prof.quant}, {prof.dtype}; from {prof_from})")
        bar = progress_bar(len(prompts) * cfg.samples, f"eval {pol.name}", cfg.progress)
        try:
            with ctx:
                responses, scores = answer(engine, pol, current.ids, current.texts, tok, reward, cfg, max_new, batch, bar)
        finally:
            bar.close()
        rows = []
        for i, p in enumerate(prompts):
            row = {"index": i, "prompt": current.texts[i], "messages": p.prompt, "responses": responses[i],
                   "scores": scores[i]}
            if p.meta:
                row["meta"] = p.meta
            rows.append(row)
        (out / SUMMARY).unlink(missing_ok=True)  # an earlier eval's summary must not vouch for new files
        atomic_write(out / f"{pol.name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        summary["policies"][pol.name] = {
            "file": f"{pol.name}.jsonl", "policy": pol.spec, "source": pol.source,
            "merged": [str(p) for p in pol.merged], "adapter": str(pol.adapter) if pol.adapter else None,
            "profile": prof.name, "quant": prof.quant, "dtype": prof.dtype, "profile_from": prof_from,
            **pass_stats(scores, cfg.pass_threshold), "seconds": round(time.time() - t0, 2),
        }
    atomic_write(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    summary["out"] = str(out)
    return summary


__all__ = ["EvalConfig", "Policy", "run_eval", "resolve_policies", "wilson_interval", "pass_stats",
           "prompts_stem", "saved_profile", "policy_profile"]
