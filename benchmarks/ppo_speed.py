"""Seconds per PPO iteration on the setting LLaMA-Factory 0.9.3's PPO was measured on (issue 17),
per phase, with the mean response length and the peak RSS (CPU, SmolLM2-135M-Instruct).

    python benchmarks/ppo_speed.py [--out runs/bench-ppo-speed] [--iterations 8] [--label after]
                                   [--ppo-args=--no-values-at-update]

The setting: the embedded SmolLM2-135M-Instruct in fp32; LoRA r 8 / alpha 16 on every linear
layer, gradient checkpointing on, plain AdamW (the profile is written to OUT/fp32-r8.yaml); 8
prompts of at most 64 templated tokens (the bundled self-instruct seed tasks, those that fit),
32 new tokens sampled at temperature 1; 1 PPO epoch of 1 minibatch; a separate critic adapter
initialised from a reward adapter trained first (8 steps on the bundled demo pairs, the same
profile). The PPO run is its own process (`lowmem-rlhf ppo`); its peak RSS is sampled from
this process every 20 ms (psutil) and also read from the kernel (os.wait4's ru_maxrss).
s/iteration: the median of iterations 2..N of the stage's own per-phase timers (metrics.jsonl),
iteration 1 holding one-off costs. Results go to benchmarks/results/ppo_speed-smollm2-135m-cpu.json
under --label (several labels: the before/after rows of the optimisations).

LLaMA-Factory 0.9.3's figure on this setting (policy and value share one LoRA, the reward LoRA
swapped in), measured by the issue's author on this machine type: 11.4 and 11.3 s/iteration,
2.97 and 2.94 GiB peak RSS. Compare ratios, not seconds: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "ppo_speed-smollm2-135m-cpu.json"
LLAMA_FACTORY = {"seconds_per_iteration": [11.4, 11.3], "peak_rss_gib": [2.97, 2.94],
                 "how": "LLaMA-Factory 0.9.3 PPO, same setting, median of iterations 2-8, two runs "
                        "(issue 17; policy and value share one LoRA, reward LoRA swapped in)"}
PROFILE = """name: fp32-r8
description: the speed benchmark's setting (fp32, LoRA r8/alpha16, checkpointing on, AdamW)
rank: 100
quant: none
double_quant: false
dtype: fp32
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_targets: all-linear
shared_base: true
grad_ckpt: true
optimizer: adamw
offload: none
attn_impl: sdpa
micro_batch: 8
generation_batch: 0
learning_rate: 1.0e-05
"""
PHASES = ("generation", "scoring", "actor_update", "critic_update")


def run(argv: list[str], log: Path) -> tuple[float, int, int]:
    """`lowmem-rlhf argv` in its own process -> (wall s, peak RSS sampled every 20 ms, ru_maxrss), bytes."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-m", "lowmem_rlhf", *argv], stdout=f, stderr=subprocess.STDOUT)
        peak, done = [0], threading.Event()

        def sample() -> None:
            proc = psutil.Process(p.pid)
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.02)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        _, status, usage = os.wait4(p.pid, 0)
        done.set()
        t.join()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"lowmem-rlhf {' '.join(argv)} failed; see {log}")
    return time.time() - t0, peak[0], usage.ru_maxrss * 1024  # Linux: KiB


def short_prompts(path: Path, limit: int = 64) -> int:
    """The bundled self-instruct seed tasks whose templated prompt is at most `limit` tokens -> path."""
    from transformers import AutoTokenizer

    from lowmem_rlhf import data as D
    from lowmem_rlhf.model.embedded import ensure_default_model

    tok = AutoTokenizer.from_pretrained(str(ensure_default_model(progress=False)))
    src = D.bundled_path("self-instruct-seed-tasks.jsonl")
    rows = [p.prompt for p in D.to_prompts(D.load_records(str(src)), str(src))]
    keep = [m for m in rows if len(D.tokenize_prompt(D.PromptExample(m), tok, 10**6)) <= limit]
    path.write_text("".join(json.dumps({"messages": m}) + "\n"
                            for m in keep))
    return len(keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench-ppo-speed"))
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--label", default="after", help="the row's name in the results file (before, after, ...)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the PPO process (default: adapted "
                    "to the free cores)")
    ap.add_argument("--busy", type=int, default=0, help="CPU-burning neighbour processes (busy loops) during the PPO run")
    ap.add_argument("--ppo-args", default="", help="more `lowmem-rlhf ppo` flags for this row, one string "
                    "(written --ppo-args=--no-values-at-update: the row before that change)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    prof, prompts = args.out / "fp32-r8.yaml", args.out / "prompts.jsonl"
    prof.write_text(PROFILE)
    n_prompts = short_prompts(prompts)
    common = ["--profile", str(prof), "--seed", "0", "--overwrite"]
    if not (args.out / "rm" / "summary.json").exists():
        run(["rm", "--data", str(_bundled("demo-pairs.jsonl.gz")), "--out", str(args.out), "--max-steps", "8",
             "--batch", "8", "--max-len", "64", "--max-pairs", "256", *common], args.out / "rm.log")
    env_threads = [] if args.threads is None else ["--threads", str(args.threads)]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        wall, sampled, ru = run(["ppo", "--prompts", str(prompts), "--out", str(args.out), "--reward-model",
                                 str(args.out / "rm"), "--iterations", str(args.iterations), "--rollout-batch", "8",
                                 "--prompt-len", "64", "--response-len", "32", "--ppo-epochs", "1", "--minibatches",
                                 "1", "--temperature", "1", "--save-every", "0", *env_threads, *shlex.split(args.ppo_args),
                                 *common], args.out / "ppo.log")
    finally:
        for b in busy:
            b.kill()
    rows = [json.loads(x) for x in (args.out / "ppo" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if "seconds_generation" in r][1:]  # iterations 2..N
    med = {ph: statistics.median(r[f"seconds_{ph}"] for r in rows) for ph in PHASES}
    it_s = statistics.median(sum(r[f"seconds_{ph}"] for ph in PHASES) for r in rows)
    row = {"seconds_per_iteration": it_s, "seconds_per_phase": med,
           "response_length_mean": statistics.mean(r["response_length"] for r in rows),
           "peak_rss_gib_sampled": sampled / 2**30, "peak_rss_gib_ru_maxrss": ru / 2**30,
           "wall_seconds_ppo_process": wall, "iterations": args.iterations, "prompts": n_prompts,
           "forwards_per_iteration": {k[len("forwards_"):]: rows[-1][k] for k in rows[-1] if k.startswith("forwards_")},
           "threads": args.threads or "adaptive", "busy_neighbours": args.busy, "ppo_args": args.ppo_args,
           "threads_seen": sorted({r.get("threads") for r in rows if r.get("threads")}),
           "commit": _commit(), "when": time.strftime("%Y-%m-%d %H:%M"), "load_average_1min": os.getloadavg()[0]}
    result = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    result.update({"benchmark": "ppo_speed", "model": "smollm2-135m-instruct (embedded), fp32, LoRA r8/a16, "
                   "gradient checkpointing, AdamW", "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                   "how": __doc__.split("\n\n")[1].strip(), "llama_factory_reference": LLAMA_FACTORY})
    result.setdefault("rows", {})[args.label] = row
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    lf = statistics.mean(LLAMA_FACTORY["seconds_per_iteration"])
    print(f"{args.label}: {it_s:.2f} s/iteration (median of iterations 2..{args.iterations}; "
          f"{it_s / lf:.2f}x LLaMA-Factory's {lf:.2f}), response length {row['response_length_mean']:.1f}, "
          f"peak RSS {sampled / 2**30:.2f} GiB sampled / {ru / 2**30:.2f} GiB ru_maxrss")
    print("| row | generation | scoring | actor update | critic update | s/iteration | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in result["rows"].items():
        ph = r["seconds_per_phase"]
        print(f"| {name} | " + " | ".join(f"{ph[p]:.2f}" for p in PHASES) +
              f" | {r['seconds_per_iteration']:.2f} | {r['peak_rss_gib_sampled']:.2f} |")
    print(f"wrote {RESULT}")


def _bundled(name: str) -> Path:
    from lowmem_rlhf.data import bundled_path

    return bundled_path(name)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
