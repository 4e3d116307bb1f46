"""The measured 7B run, in one call: SFT -> RM -> PPO of a Llama-2-7B-shaped model under a 24 GiB
cap, each phase's measured peak beside the estimator's and the simulation's.

    python scripts/gpu_proof.py                   # on a CUDA GPU: writes benchmarks/results/gpu_proof-<gpu>.json (+ .md)
    python scripts/gpu_proof.py --cpu-rehearsal   # the same code path on a tiny model on the CPU (< 2 min)
    python scripts/gpu_proof.py --out "$OUT/gpu_proof-h200.json"   # on a lent device machine: files under $OUT come back

What it does, in order (progress and times are printed as it goes):
1. The simulations (one step of each stage on meta tensors, `measure.simulate`) start in worker
   processes, so they run on the CPU while the GPU trains.
2. A model is built from the llama-2-7b preset config (vocabulary 32000) with random weights, on
   the GPU, and saved as a bf16 folder with the byte tokenizer (ids < 260 decode, the rest are
   skipped): nothing is downloaded. The stages load it through the normal path, so the 4-bit
   profile is bitsandbytes' real NF4.
3. For each profile: the planner's pick for `--gpu 3090` capped at `--max-vram` (24 GiB), then
   qlora-shared. Each runs 2 SFT steps, 2 RM steps and 2 PPO iterations at prompt 256 + response
   256, rollout 8, with `max_vram` set, so the stages cap this process at 24 GiB
   (`torch.cuda.set_per_process_memory_fraction`) as a 24 GiB card would. The data are synthetic
   rows long enough to fill every sequence (seq 512; prompts of 256), so measured and planned
   shapes agree.
4. The JSON holds, per profile, stage and phase: max_memory_allocated, max_memory_reserved, the
   device's used memory, host RAM, each with the estimate and the simulated allocated peak; s/step
   and tokens/s. A Markdown table for the README is written beside it.

Budget: at most 8 minutes on an H100/H200-class GPU, model build included.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 1024**3
T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f} s] {msg}", flush=True)


def shapes(rehearsal: bool):
    """(steps, seq_len, batch, prompt_len, response_len, rollout_batch)."""
    return (2, 64, 8, 32, 16, 8) if rehearsal else (2, 512, 16, 256, 256, 8)


def model_config(rehearsal: bool):
    from transformers import LlamaConfig

    from lowmem_rlhf.model.random_models import tiny_llama_config
    from lowmem_rlhf.plan.model_spec import PRESET_CONFIGS

    if rehearsal:
        cfg = tiny_llama_config()
        cfg.vocab_size = 1000
        return cfg, "tiny-llama"
    fields = {k: v for k, v in PRESET_CONFIGS["llama-2-7b"].items() if k != "model_type"}
    return LlamaConfig(**fields, pad_token_id=0, bos_token_id=1, eos_token_id=2), "llama-2-7b"


def build_model(folder: Path, rehearsal: bool) -> Path:
    """Random weights from the config, initialised on the GPU when there is one, saved in bf16."""
    import torch

    from lowmem_rlhf.model.random_models import save_random

    cfg, _ = model_config(rehearsal)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return save_random(cfg, folder, dtype=torch.bfloat16, device=device)


def write_data(folder: Path, seq: int, prompt_len: int) -> dict[str, str]:
    """Rows long enough to fill `seq` byte tokens (SFT, RM) and `prompt_len` (PPO prompts)."""
    words = "the quick brown fox jumps over the lazy dog while a model learns to plan its memory".split()

    def text(i: int, n: int) -> str:
        out, k = [], i
        while sum(len(w) + 1 for w in out) < n:
            out.append(words[k % len(words)])
            k = k * 7 + 3
        return " ".join(out)

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"sft": folder / "sft.jsonl", "pairs": folder / "pairs.jsonl", "prompts": folder / "prompts.jsonl"}
    rows = {
        "sft": [{"instruction": text(i, seq // 2), "output": text(i + 1, seq)} for i in range(64)],
        "pairs": [{"prompt": text(i, seq // 2), "chosen": text(i + 2, seq), "rejected": text(i + 3, seq)}
                  for i in range(64)],
        "prompts": [{"prompt": text(i, 2 * prompt_len)} for i in range(64)],
    }
    for k, p in paths.items():
        p.write_text("".join(json.dumps(r) + "\n" for r in rows[k]))
    return {k: str(p) for k, p in paths.items()}


def profiles(model: str, shape, max_vram: float, rehearsal: bool):
    """The planner's pick for a 3090 capped at max_vram among the profiles the stages run (as
    `auto` picks), then qlora-shared (micro-batch as the planner sets it for that card)."""
    from lowmem_rlhf.config import load_all_profiles, load_profile
    from lowmem_rlhf.plan.hardware import resolve_hardware
    from lowmem_rlhf.plan.model_spec import load_spec
    from lowmem_rlhf.plan.planner import plan, runnable_profiles

    spec = load_spec(model)
    hw = resolve_hardware(gpu="3090", max_vram_gib=max_vram)
    p = plan(spec, hw, shape, runnable_profiles(load_all_profiles()), ("sft", "rm", "ppo"))
    picks = []
    if p.chosen is not None:
        picks.append(p.chosen.profile)
    if not any(x.name == "qlora-shared" for x in picks):  # planned on its own: the planner's micro-batch for it
        q = plan(spec, hw, shape, [load_profile("qlora-shared")], ("sft", "rm", "ppo"))
        picks.append(q.chosen.profile if q.chosen is not None else load_profile("qlora-shared"))
    if rehearsal:  # the tiny model: small LoRA, the same code
        picks = [replace(x, lora_r=8) for x in picks]
    return picks


def _cpu_only_worker() -> None:
    """Simulation workers see no GPU: importing bitsandbytes would otherwise open a CUDA context in
    each, and the measured device figure (the card's used memory) would include them."""
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def simulate_one(model: str, profile_dict: dict, stage: str, shape_dict: dict) -> dict:
    """A worker: `measure.simulate` of one stage (meta tensors, CPU). -> {phase: allocated GiB}."""
    from lowmem_rlhf.config import Profile, Shape, dataclass_from_dict
    from lowmem_rlhf.measure.simulate import simulate

    t0 = time.time()
    sim = simulate(model, dataclass_from_dict(Profile, profile_dict, "gpu_proof"), stage, Shape(**shape_dict))
    return {"phases": {p.name: p.peak / GIB for p in sim.phases}, "seconds": time.time() - t0}


def stage_rows(run: Path, stage: str) -> list[dict]:
    return [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]


def figures(summary: dict, rows: list[dict]) -> dict:
    """Per phase [estimated, measured] bytes, and speed from the metrics."""
    out = {"phases": summary["memory"]["phases"], "seconds": summary["seconds"]}
    steps = [r for r in rows if not r.get("skipped")]
    out["seconds_per_step"] = sum(r.get("seconds", 0) or sum(v for k, v in r.items() if k.startswith("seconds_"))
                                  for r in steps) / max(1, len(steps))
    for key in ("tokens_per_s", "tokens_per_s_generation", "tokens_per_s_update"):
        vals = [r[key] for r in steps if key in r]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def run_profile(prof, model: str, data: dict, shape, steps: int, max_vram: float, out: Path) -> dict:
    from lowmem_rlhf.config import PPOConfig, RMConfig, SFTConfig
    from lowmem_rlhf.stages.ppo import run_ppo
    from lowmem_rlhf.stages.rm import run_rm
    from lowmem_rlhf.stages.sft import run_sft

    common = dict(model=model, out=out, profile=prof, progress=False, max_vram=max_vram, save_every=0)
    res = {}
    t = time.time()
    s = run_sft(SFTConfig(data=data["sft"], max_len=shape.seq_len, batch=shape.batch, max_steps=steps,
                          eval_fraction=0.05, **common))
    res["sft"] = figures(s, stage_rows(out, "sft"))
    say(f"  {prof.name}: SFT {steps} steps in {time.time() - t:.1f} s (load included)")
    t = time.time()
    s = run_rm(RMConfig(data=data["pairs"], init_from=out / "sft", max_len=shape.seq_len, batch=shape.batch,
                        max_steps=steps, eval_fraction=0.05, **common))
    res["rm"] = figures(s, stage_rows(out, "rm"))
    say(f"  {prof.name}: RM {steps} steps in {time.time() - t:.1f} s")
    t = time.time()
    s = run_ppo(PPOConfig(prompts=data["prompts"], sft=out / "sft", reward_model=out / "rm", iterations=steps,
                          rollout_batch=shape.rollout_batch, prompt_len=shape.prompt_len,
                          response_len=shape.response_len, ppo_epochs=1, **common))
    res["ppo"] = figures(s, stage_rows(out, "ppo"))
    say(f"  {prof.name}: PPO {steps} iterations in {time.time() - t:.1f} s")
    return res


def table(result: dict) -> str:
    """The README table: per profile, stage and phase, estimated / simulated / measured GiB."""
    lines = [f"Measured on {result['device']}, capped at {result['max_vram_gib']:g} GiB "
             f"({result['model']}, random weights; torch {result['torch']}; {result['seconds']:.0f} s in all).",
             "",
             "| profile | stage | phase | estimated alloc. | simulated alloc. | measured alloc. | measured reserved "
             "| estimated device | measured device | estimated host | measured host | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, stages in result["profiles"].items():
        for stage, f in stages.items():
            sims = result["simulated"].get(name, {}).get(stage, {}).get("phases", {})
            for ph, figs in f["phases"].items():
                def g(key, i):
                    return f"{figs[key][i] / GIB:.2f}" if key in figs else "-"
                sim = f"{sims[ph]:.2f}" if ph in sims else "-"
                lines.append(f"| {name} | {stage} | {ph} | {g('allocated', 0)} | {sim} | {g('allocated', 1)} | "
                             f"{g('reserved', 1)} | {g('device', 0)} | {g('device', 1)} | {g('cpu_ram', 0)} | "
                             f"{g('cpu_ram', 1)} | {f['seconds_per_step']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-rehearsal", action="store_true", help="the same code path on a tiny model on the CPU")
    ap.add_argument("--max-vram", type=float, default=24.0, help="GiB this process may allocate on the GPU")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default: benchmarks/results/gpu_proof-<gpu>.json; a temporary folder "
                         "with --cpu-rehearsal)")
    ap.add_argument("--no-simulate", action="store_true", help="skip the simulations")
    args = ap.parse_args()
    rehearsal = args.cpu_rehearsal

    from lowmem_rlhf.runtime.oom import shape_allocator

    shape_allocator()  # before CUDA starts
    import torch

    from lowmem_rlhf.config import Shape

    if not rehearsal and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; run with --cpu-rehearsal to check the code path on the CPU")
    steps, seq, batch, plen, rlen, rollout = shapes(rehearsal)
    shape = Shape(seq_len=seq, batch=batch, prompt_len=plen, response_len=rlen, rollout_batch=rollout)
    work = Path(tempfile.mkdtemp(prefix="gpu-proof-"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    _, model_name = model_config(rehearsal)
    say(f"gpu proof: {model_name} on {device}, cap {args.max_vram:g} GiB, work folder {work}")

    say("building the model (random weights)")
    model = str(build_model(work / "model", rehearsal))
    say(f"model saved: {model}")
    picks = profiles(model, shape, args.max_vram, rehearsal)
    say("profiles: " + ", ".join(f"{p.name} (micro-batch {p.micro_batch})" for p in picks))

    sims: dict = {}
    pool = None
    if not args.no_simulate:  # spawned workers: the parent's CUDA state is not forked into them
        pool = cf.ProcessPoolExecutor(max_workers=min(6, len(picks) * 3), initializer=_cpu_only_worker,
                                      mp_context=multiprocessing.get_context("spawn"))
        sd = {"seq_len": seq, "batch": batch, "prompt_len": plen, "response_len": rlen, "rollout_batch": rollout}
        for p in picks:
            for st in ("sft", "rm", "ppo"):
                sims[(p.name, st)] = pool.submit(simulate_one, model, p.to_dict(), st, sd)
        say(f"{len(sims)} simulations started in worker processes")

    data = write_data(work / "data", seq, plen)
    result = {"device": device, "torch": torch.__version__, "model": model_name, "max_vram_gib": args.max_vram,
              "shape": {"seq_len": seq, "batch": batch, "prompt_len": plen, "response_len": rlen,
                        "rollout_batch": rollout, "steps": steps},
              "profiles": {}, "simulated": {}}
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    out = args.out or ((work / f"gpu_proof-{slug}.json") if rehearsal
                       else ROOT / "benchmarks" / "results" / f"gpu_proof-{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    for p in picks:
        say(f"profile {p.name}")
        try:
            result["profiles"][p.name] = run_profile(p, model, data, shape, steps, args.max_vram,
                                                     work / f"run-{p.name}")
        except Exception as e:  # the other profile's figures are kept; the failure is in the JSON
            result.setdefault("failed", {})[p.name] = f"{type(e).__name__}: {e}"
            say(f"  {p.name} FAILED: {type(e).__name__}: {e}")
        out.write_text(json.dumps({**result, "seconds": time.time() - T0}, indent=2))  # kept if killed later
    for (name, st), fut in sims.items():
        try:
            result["simulated"].setdefault(name, {})[st] = fut.result(timeout=600)
        except Exception as e:  # a failed simulation is reported, the measurements are kept
            result["simulated"].setdefault(name, {})[st] = {"error": f"{type(e).__name__}: {e}"}
    if pool is not None:
        pool.shutdown()
    result["seconds"] = time.time() - T0
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(table(result))
    print(table(result))
    say(f"wrote {out} and {out.with_suffix('.md').name}")
    if result.get("failed"):
        sys.exit(f"error: profile(s) failed: {result['failed']}")


if __name__ == "__main__":
    main()
