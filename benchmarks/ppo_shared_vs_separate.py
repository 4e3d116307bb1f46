"""Shared-base PPO vs the same PPO with four separate model copies: seconds per iteration and peak
memory, in one run.

    python benchmarks/ppo_shared_vs_separate.py [--model smollm2-135m] [--iterations 4] [--profile lora-bf16-shared]

Both variants run the real PPO stage (lowmem_rlhf/stages/ppo.py, `separate_models` switches the layout)
from the same reward model, each in its own process so each peak is its own: CPU peak RSS (VmHWM)
here, `torch.cuda.max_memory_allocated` on a GPU. Results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(args) -> None:
    from dataclasses import replace

    from lowmem_rlhf.config import load_profile
    from lowmem_rlhf.data import bundled_path
    from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo

    prof = replace(load_profile(args.profile), grad_ckpt=False, micro_batch=8)
    s = run_ppo(PPOConfig(model=args.model_path, prompts=str(bundled_path("demo-prompts.jsonl")), out=Path(args.out),
                          profile=prof, reward_model=Path(args.rm), iterations=args.iterations, rollout_batch=8,
                          prompt_len=64, response_len=16, ppo_epochs=2, separate_models=args.separate,
                          progress=False))
    peaks = {ph: v for ph, v in s["memory"]["phases"].items()}
    print("RESULT " + json.dumps({"seconds_per_iteration": s["seconds_per_iteration"], "phases": peaks,
                                  "components": s["memory"]["components"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--profile", default="lora-bf16-shared")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--separate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--rm", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from dataclasses import replace

    from lowmem_rlhf.config import load_profile
    from lowmem_rlhf.data import bundled_path
    from lowmem_rlhf.model.embedded import resolve_model_path
    from lowmem_rlhf.stages.rm import RMConfig, run_rm

    model = resolve_model_path(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    prof = replace(load_profile(args.profile), grad_ckpt=False, micro_batch=8)
    run_rm(RMConfig(model=model, data=str(bundled_path("demo-pairs.jsonl.gz")), out=tmp, profile=prof, max_len=64,
                    batch=8, max_steps=4, progress=False))
    results = {}
    for name, sep in (("shared", False), ("separate", True)):
        cmd = [sys.executable, __file__, "--child", "--out", str(tmp / name), "--rm", str(tmp / "rm"),
               "--model-path", model, "--profile", args.profile, "--iterations", str(args.iterations)]
        if sep:
            cmd.append("--separate")
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT "):])
        results[name]["wall_seconds"] = time.time() - t0
    fig = "allocated" if "allocated" in results["shared"]["phases"]["actor_update"] else "cpu_ram"
    peak = {k: max(ph[fig][1] for ph in r["phases"].values()) for k, r in results.items()}
    sec = {k: r["seconds_per_iteration"] for k, r in results.items()}
    record = {
        "what": "PPO iterations on the same model, prompts and reward model: one shared base with swapped "
                "adapters vs four separate model copies",
        "model": args.model, "profile": args.profile, "iterations": args.iterations, "rollout_batch": 8,
        "prompt_len": 64, "response_len": 16, "figure": fig, "machine": platform.processor() or platform.machine(),
        "peak_bytes": peak, "seconds_per_iteration": sec,
        "ratio_separate_over_shared": {"peak_memory": peak["separate"] / peak["shared"],
                                       "seconds_per_iteration": sec["separate"] / sec["shared"]},
        "runs": results,
    }
    out = HERE / "results" / f"ppo_shared_vs_separate-{args.model}-{fig}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"{'layout':10s} {'peak ' + fig + ' (GiB)':>20s} {'s/iteration':>12s}")
    for k in ("shared", "separate"):
        print(f"{k:10s} {peak[k] / 2**30:20.3f} {sec[k]:12.2f}")
    r = record["ratio_separate_over_shared"]
    print(f"separate / shared: memory x{r['peak_memory']:.2f}, time x{r['seconds_per_iteration']:.2f}  -> {out}")


if __name__ == "__main__":
    main()
