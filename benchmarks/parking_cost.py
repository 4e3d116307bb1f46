"""What parking the idle role's optimizer state in host RAM costs: seconds to move one role's
AdamW state off the device and back, for the LoRA adapter of a model preset.

    python benchmarks/parking_cost.py [--model llama-2-7b] [--optimizer adamw] [--repeats 5]

It builds the adapter's trainable tensors (the estimator's `trainable_tensors` for the
lora-bf16-shared profile: LoRA r16 on every linear), creates the optimizer's state with one step,
and times `runtime.optim.OptimizerParking` park + unpark: the code PPO runs around each update.
On a CUDA machine the state moves device <-> pinned host memory; on a CPU-only machine the same
code copies host <-> host (a lower bound of the work: no PCIe). The estimator's figure (12 GB/s
each way) is printed beside. Results go to benchmarks/results/parking_cost-<model>-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-2-7b")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import torch

    from lowmem_rlhf.config import load_profile
    from lowmem_rlhf.plan.estimator import PCIE_BYTES_PER_S, trainable_tensors
    from lowmem_rlhf.plan.model_spec import load_spec
    from lowmem_rlhf.runtime.optim import OptimizerParking, make_optimizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes, _ = trainable_tensors(load_spec(args.model), replace(load_profile("lora-bf16-shared"), lora_r=16))
    params = [torch.nn.Parameter(torch.zeros(n, device=device)) for n in sizes]
    opt = make_optimizer(params, args.optimizer, lr=1e-4, device=device)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    parking = OptimizerParking({"actor": opt}, enabled=True)
    parking.park("actor")
    state_bytes = parking.parked_bytes("actor")
    times = []
    for _ in range(args.repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        parking.unpark("actor")
        parking.park("actor")
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times)
    est = 2 * state_bytes / PCIE_BYTES_PER_S
    print(f"{args.model} LoRA r16 {args.optimizer} state: {state_bytes / 2**20:.0f} MiB; in + out "
          f"{best * 1e3:.0f} ms measured ({device}), {est * 1e3:.0f} ms estimated at "
          f"{PCIE_BYTES_PER_S / 1e9:.0f} GB/s")
    out = HERE / "results" / f"parking_cost-{args.model}-{device}.json"
    out.write_text(json.dumps({
        "what": __doc__.splitlines()[0],
        "command": f"python benchmarks/parking_cost.py --model {args.model} --optimizer {args.optimizer} "
                   f"--repeats {args.repeats}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}",
        "state_bytes": state_bytes, "seconds_in_and_out": [round(t, 4) for t in times],
        "best_seconds": round(best, 4), "estimated_seconds": round(est, 4)}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
