"""What DeepSpeed ZeRO-3 offload really holds in CPU RAM vs what `estimator.estimate` says.

Runs the single-process ZeRO-3 (param + optimizer offload) SFT step on a model (default: the
embedded SmolLM2-135M in the zero3-offload profile's dtype, bf16) and prints:
  * measured: DeepSpeed's CPU buffers by kind (`Zero3Trainer.cpu_buffers()`: parameter partitions,
    fp32 master, fp32 gradient partition, Adam moments, other optimizer buffers, pinned bytes),
    and the process RSS: after loading, after deepspeed.initialize, peak (VmHWM) over the steps;
  * estimated: the `cpu_offload` bytes and components of `estimate(spec, profile, "sft", shape)`
    for target "cuda" (host RAM a GPU user needs) and target "cpu" (this machine);
  * the per-component difference.
Usage: .venv/bin/python scripts/zero3_cpu_vs_estimate.py [--model PATH] [--dtype bf16] [--seq 128]
       [--micro-batch 2] [--steps 2] [--pin]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zero3_common import build, sft_micro, sft_rows, zero3_profile  # noqa: E402

from lowmem_rlhf.config import Shape  # noqa: E402
from lowmem_rlhf.plan.estimator import estimate, lora_tensors  # noqa: E402

MIB = 1024**2


def status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def mib(x: float) -> str:
    return f"{x / MIB:9.1f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--pin", action="store_true", help="pin_memory (CUDA only)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    from lowmem_rlhf.runtime.zero3 import Zero3Trainer, device_type

    prof = zero3_profile(args.dtype, micro_batch=args.micro_batch, offload_pin_memory=args.pin)
    import deepspeed  # noqa: F401  (import cost outside the deltas)

    rss0, anon0 = status("VmRSS"), status("RssAnon")
    shared = build(args.model, prof, "sft", with_head=False)
    rss_loaded, anon_loaded = status("VmRSS"), status("RssAnon")
    spec = shared.loaded.spec
    n_lora = sum(p.numel() for p in shared.parameters_of("sft"))
    n_base = sum(p.numel() for n, p in shared.model.named_parameters() if not p.requires_grad)
    tok = shared.loaded.tokenizer
    rows = [r for r in sft_rows(tok, n=4 * args.micro_batch, max_len=args.seq)]
    trainer = Zero3Trainer(shared, "sft", lr=1e-4, total_steps=args.steps, micro_batch=args.micro_batch,
                           grad_accum=1, pin_memory=args.pin)
    rss_init, anon_init = status("VmRSS"), status("RssAnon")
    t0 = time.time()
    for s in range(args.steps):
        chunk = rows[(s * args.micro_batch) % len(rows):][: args.micro_batch]
        loss, n = trainer.forward(lambda *a: sft_micro(*a), shared, chunk, tok.pad_token_id)
        trainer.backward(loss / max(n, 1))
        trainer.step()
    dt = time.time() - t0
    hwm, anon_end, file_end = status("VmHWM"), status("RssAnon"), status("RssFile")
    bufs = trainer.cpu_buffers()
    lora_part = n_lora * 4  # the adapter's own (fp32) partition inside param_partitions
    measured = {
        "base weights (param partitions)": bufs["param_partitions"] - lora_part,
        "adapter params (partition)": lora_part,
        "fp32 master": bufs["fp32_master"],
        "fp32 grads": bufs["fp32_grads"],
        "adam moments": bufs["optimizer_states"],
        "grad partitions (param dtype)": bufs["grad_partitions"],
        "other optimizer buffers": bufs["other_optimizer_buffers"],
        "pinned staging": bufs["pinned"],
    }
    measured_total = sum(v for k, v in measured.items() if k != "pinned staging")
    shape = Shape(seq_len=args.seq, batch=args.micro_batch)
    est_cuda = estimate(spec, prof, "sft", shape, target="cuda")
    est_cpu = estimate(spec, prof, "sft", shape, target="cpu")
    ph = est_cuda.peak
    lora_est = sum(lora_tensors(spec, prof))

    print(f"model {spec.name}: {n_base / 1e6:.1f}M frozen params ({args.dtype}), LoRA r={prof.lora_r} "
          f"{n_lora / 1e6:.3f}M params (estimator counts {lora_est / 1e6:.3f}M); seq {args.seq} x mb "
          f"{args.micro_batch}; device {device_type()}; pin_memory {args.pin}; {args.steps} steps in {dt:.1f} s")
    print("\nMeasured DeepSpeed CPU buffers (MiB):")
    for k, v in measured.items():
        print(f"  {k:<34}{mib(v)}")
    print(f"  {'total held by DeepSpeed':<34}{mib(measured_total)}")
    print("\nProcess RSS (MiB):")
    print(f"  {'load base + adapter':<34}{mib(rss_loaded - rss0)}   (anonymous {mib(anon_loaded - anon0)})")
    print(f"  {'deepspeed.initialize':<34}{mib(rss_init - rss_loaded)}   (anonymous {mib(anon_init - anon_loaded)})")
    print(f"  {'after the steps: anon / file-backed':<34}{mib(anon_end)} / {mib(file_end)}")
    print(f"  {'peak (VmHWM) - RSS before load':<34}{mib(hwm - rss0)}")
    print(f"  {'peak (VmHWM) absolute':<34}{mib(hwm)}")
    print("\nEstimator, target cuda (host RAM a GPU user needs):")
    print(f"  {'cpu_offload':<34}{mib(ph.cpu_offload)}")
    print(f"  {'cpu_ram (+1 GiB process)':<34}{mib(ph.cpu_ram)}")
    print("  GPU components (MiB): " + ", ".join(f"{k} {v / MIB:.1f}" for k, v in ph.components.items()))
    print("Estimator, target cpu (this machine):")
    print(f"  {'cpu_offload':<34}{mib(est_cpu.peak.cpu_offload)}")
    print(f"  {'cpu_ram':<34}{mib(est_cpu.cpu_ram)}")
    wb = {"bf16": 2, "fp32": 4}[args.dtype]
    est_weights = spec.total_params * wb
    pinned = ph.cpu_offload - 2 * est_weights - 24 * lora_est  # 0 unless pin_memory
    print("\nPer component, host RAM (MiB)            measured   estimator(cuda)  diff")
    rows_cmp = [
        ("base weights (partitions)", measured["base weights (param partitions)"], est_weights),
        ("adapter: 24 B per trained parameter", measured_total - measured["base weights (param partitions)"],
         24 * lora_est),
        ("pinned staging", measured["pinned staging"], pinned),
        ("total held by DeepSpeed", measured_total, ph.cpu_offload - est_weights),
        ("the base as loaded (not given back)", rss_loaded - rss0, est_weights),
        ("peak process RSS (VmHWM)", hwm, ph.cpu_ram),
    ]
    for name, m, e in rows_cmp:
        print(f"  {name:<38}{mib(m)}  {mib(e)}  {mib(m - e)}")


if __name__ == "__main__":
    main()
