"""What sampling the rollout in chunks costs: PPO seconds per iteration at generation batch B (the
whole rollout at once, the plain path), B/2 and B/4, on the same prompts and seeds.

    python benchmarks/generation_batch_cost.py [--model smollm2-135m] [--iterations 3] [--rollout-batch 16]

Each variant runs the real PPO stage (lowmem_rlhf/stages/ppo.py) with the profile's
generation_batch set, one after the other in this process (nothing else should run on the
machine meanwhile). Every rollout row samples from its own random stream, so the variants sample
the same distribution; the script reports whether their rewards agree exactly (on a bf16 model
other batch shapes round the logits differently, and tokens can differ at near-ties: on SmolLM2
they did, response lengths within 3% in the first iteration). Figures: the mean over iterations after the first (warm-up) of the generation phase and
of the whole iteration. Results go to benchmarks/results/generation_batch_cost-<model>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(args, model_path: str, generation_batch: int, out: Path) -> dict:
    from lowmem_rlhf.algo import demo_task
    from lowmem_rlhf.config import load_profile
    from lowmem_rlhf.data import bundled_path
    from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo

    prof = replace(load_profile(args.profile), micro_batch=args.rollout_batch, generation_batch=generation_batch)
    t0 = time.time()
    run_ppo(PPOConfig(model=model_path, prompts=str(bundled_path("demo-prompts.jsonl")), out=out, profile=prof,
                      reward=f"{demo_task.__file__}:checker", iterations=args.iterations,
                      rollout_batch=args.rollout_batch, prompt_len=64, response_len=args.response_len,
                      ppo_epochs=1, progress=False, seed=0))
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    warm = rows[1:] or rows

    def mean(key: str) -> float:
        return sum(r[key] for r in warm) / len(warm)

    return {"generation_batch": rows[0]["generation_batch"], "wall_seconds": round(time.time() - t0, 1),
            "seconds_generation": round(mean("seconds_generation"), 2),
            "seconds_per_iteration": round(sum(mean(f"seconds_{p}") for p in
                                               ("generation", "scoring", "actor_update", "critic_update")), 2),
            "tokens_per_s_generation": round(mean("tokens_per_s_generation"), 1),
            "reward_mean": [r["reward_mean"] for r in rows], "response_length": [r["response_length"] for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="qlora-shared")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--rollout-batch", type=int, default=16)
    ap.add_argument("--response-len", type=int, default=32)
    args = ap.parse_args()
    import torch

    from lowmem_rlhf.model.embedded import resolve_model_path

    model_path = str(resolve_model_path(args.model))
    B = args.rollout_batch
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for g in (B, B // 2, B // 4):
            r = run(args, model_path, g, Path(tmp) / f"g{g}")
            print(f"generation batch {g:>3}: generation {r['seconds_generation']:.2f} s, iteration "
                  f"{r['seconds_per_iteration']:.2f} s ({r['tokens_per_s_generation']:.0f} tokens/s)", flush=True)
            results.append(r)
    same = all(r["reward_mean"] == results[0]["reward_mean"] for r in results)
    print("the same rewards at every generation batch:", same)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = HERE / "results" / f"generation_batch_cost-{args.model}-{device}.json"
    out.write_text(json.dumps({
        "what": __doc__.splitlines()[0], "command": "python benchmarks/generation_batch_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}",
        "profile": args.profile, "prompt_len": 64, "response_len": args.response_len, "rollout_batch": B,
        "same_rollouts": same, "variants": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
