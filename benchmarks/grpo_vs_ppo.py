"""GRPO against PPO on the embedded demo at the same wall-clock budget: held-out correct answers,
peak RSS and seconds per iteration (CPU, SmolLM2-135M-Instruct).

    python benchmarks/grpo_vs_ppo.py [--out runs/bench-grpo-vs-ppo] [--seed 0]

1. PPO's path is `lowmem-rlhf auto --algo ppo` (the demo's default RL became GRPO on 2026-12-01):
   SFT, the reward model (30 steps), then PPO (since
   2026-12-01: on the checker alone, 1 question x 8 answers, 40 iterations, the KL in the actor's
   loss; the committed result was measured before, with 20 iterations, reward = RM + 2 x checker,
   2 questions x 4 answers per rollout).
2. A 2-iteration GRPO probe from that run's SFT adapter measures GRPO's seconds per iteration.
3. GRPO's path is `lowmem-rlhf auto --algo grpo --no-train-rm` (SFT, then GRPO on the checker alone, 1 question
   x 8 answers per rollout, lr 5e-4), with as many iterations as fit in the seconds PPO's path
   spent after SFT (its RM + PPO stages).

Each path is its own process: its peak RSS is that process's (os.wait4), SFT included (the same
SFT in both). Held-out: the bundled 96 questions, greedy, scored by the demo's checker. Results go
to benchmarks/results/grpo_vs_ppo-smollm2-135m-cpu.json and print as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO_GRPO = ["--prompt-len", "64", "--response-len", "16", "--rollout-batch", "8", "--group-size", "8",
             "--lr", "5e-4", "--temperature", "0.7", "--missing-eos-penalty", "1"]  # auto's demo GRPO settings


def run(argv: list[str], log: Path) -> tuple[float, int]:
    """Run `lowmem-rlhf argv` in its own process -> (wall seconds, peak RSS bytes)."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "lowmem_rlhf", *argv], stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"lowmem-rlhf {' '.join(argv)} failed; see {log}")
    return time.time() - t0, usage.ru_maxrss * 1024  # Linux: KiB


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-grpo-vs-ppo"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ppo_run, probe_run, grpo_run = args.out / "ppo", args.out / "probe", args.out / "grpo"
    seed = ["--seed", str(args.seed)]

    ppo_wall, ppo_rss = run(["auto", "--algo", "ppo", "--out", str(ppo_run), *seed], args.out / "ppo.log")
    rm_s, ppo_s = load(ppo_run / "rm" / "summary.json")["seconds"], load(ppo_run / "ppo" / "summary.json")["seconds"]
    budget = rm_s + ppo_s
    profile = load(ppo_run / "auto.json")["profile"]["name"]

    run(["grpo", "--prompts", str(_bundled("demo-prompts.jsonl")), "--out", str(probe_run), "--sft",
         str(ppo_run / "sft"), "--reward", "lowmem_rlhf.algo.demo_task:checker", "--iterations", "2",
         "--profile", profile, "--overwrite", *DEMO_GRPO, *seed], args.out / "probe.log")
    per_iter = load(probe_run / "grpo" / "summary.json")["seconds"] / 2
    iterations = max(1, int(budget / per_iter))

    grpo_wall, grpo_rss = run(["auto", "--algo", "grpo", "--no-train-rm", "--out", str(grpo_run), "--ppo-iterations",
                               str(iterations), *seed], args.out / "grpo.log")
    rows = {}
    for name, folder, wall, rss, stage in (("ppo", ppo_run, ppo_wall, ppo_rss, "ppo"),
                                           ("grpo", grpo_run, grpo_wall, grpo_rss, "grpo")):
        auto, st = load(folder / "summary.json"), load(folder / stage / "summary.json")
        rl_seconds = st["seconds"] + (rm_s if name == "ppo" else 0.0)
        rows[name] = {
            "iterations": st["iterations"], "seconds_after_sft": rl_seconds,
            "seconds_per_iteration": st["seconds_per_iteration"], "wall_seconds": wall, "peak_rss_gib": rss / 2**30,
            "heldout_n": auto["heldout_n"], "heldout_correct_sft": auto["heldout_correct_sft"],
            "heldout_correct": auto["heldout_correct_ppo"], "heldout_lenient_sft": auto["heldout_lenient_sft"],
            "heldout_lenient": auto["heldout_lenient_ppo"], "reward_first5": st["reward_first5"],
            "reward_last5": st["reward_last5"], "kl_last5": st.get("kl_last5"),
            "stages": "SFT, RM, PPO" if name == "ppo" else "SFT, GRPO",
        }
    result = {"benchmark": "grpo_vs_ppo", "model": "smollm2-135m-instruct (embedded)", "profile": profile,
              "seed": args.seed, "budget_seconds": budget, "grpo_probe_seconds_per_iteration": per_iter,
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch_threads": _threads(),
              "how": __doc__.split("\n\n")[1].strip(), "results": rows}
    out = HERE / "results" / "grpo_vs_ppo-smollm2-135m-cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"budget after SFT: {budget:.0f} s (PPO's RM + PPO); GRPO probe {per_iter:.1f} s/iteration -> {iterations}")
    print("| algorithm | stages | iterations | s after SFT | s/iteration | peak RSS GiB | held-out exact (SFT -> RL) "
          "| held-out contains (SFT -> RL) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        n = r["heldout_n"]
        print(f"| {name.upper()} | {r['stages']} | {r['iterations']} | {r['seconds_after_sft']:.0f} | "
              f"{r['seconds_per_iteration']:.1f} | {r['peak_rss_gib']:.2f} | {r['heldout_correct_sft']}/{n} -> "
              f"{r['heldout_correct']}/{n} | {r['heldout_lenient_sft']}/{n} -> {r['heldout_lenient']}/{n} |")
    print(f"wrote {out}")


def _bundled(name: str) -> Path:
    from lowmem_rlhf.data import bundled_path

    return bundled_path(name)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
