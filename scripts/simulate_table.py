"""Simulated (meta-device rehearsal) vs analytic peaks: 7B and 13B, bf16 and NF4, checkpointing on
and off, for SFT, RM and each PPO phase. Prints a markdown table, writes
benchmarks/results/simulate_vs_analytic.json.

Shapes: the estimator's `Shape` defaults (SFT/RM seq 512; PPO prompt 256 + response 256, rollout
batch 8), micro-batch 1. Profiles: lora-bf16-shared (bf16) and qlora-shared (NF4 + double quant,
paged 8-bit AdamW). Usage: .venv/bin/python scripts/simulate_table.py [--models llama-2-7b,...]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataclasses import replace  # noqa: E402

from lowmem_rlhf.config import Shape, load_profile  # noqa: E402
from lowmem_rlhf.measure.simulate import NOT_MODELLED, simulate  # noqa: E402

MIB = 1024**2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-2-7b,llama-2-13b")
    ap.add_argument("--profiles", default="lora-bf16-shared,qlora-shared")
    ap.add_argument("--stages", default="sft,rm,ppo")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/simulate_vs_analytic.json"))
    args = ap.parse_args()
    shape = Shape()
    rows, runs = [], []
    for model in args.models.split(","):
        for pname in args.profiles.split(","):
            for ckpt in (False, True):
                prof = replace(load_profile(pname), micro_batch=1, grad_ckpt=ckpt)
                for stage in args.stages.split(","):
                    t0 = time.time()
                    sim = simulate(model, prof, stage, shape)
                    runs.append(sim.to_dict())
                    for ph in sim.phases:
                        rows.append((model, "bf16" if prof.quant == "none" else "nf4", "on" if ckpt else "off",
                                     stage, ph.name, ph.peak / MIB, ph.analytic / MIB, ph.drift, ph.paged / MIB))
                    print(f"# {model} {pname} ckpt={ckpt} {stage}: {time.time() - t0:.1f} s", file=sys.stderr)
                    del sim
                    gc.collect()
    lines = ["| model | weights | ckpt | stage | phase | simulated MiB | analytic MiB | analytic vs sim | paged MiB |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for m, q, c, st, ph, s, a, d, pg in rows:
        lines.append(f"| {m} | {q} | {c} | {st} | {ph} | {s:.0f} | {a:.0f} | {d:+.1%} | {pg:.0f} |")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": shape.to_dict(), "micro_batch": 1, "not_modelled": NOT_MODELLED,
                               "rows": [dict(zip(("model", "weights", "ckpt", "stage", "phase", "simulated_mib",
                                                  "analytic_mib", "drift", "paged_mib"), r)) for r in rows],
                               "runs": runs}, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
