"""Print the estimator against counted bytes on real models (CPU), as a markdown table.

    python scripts/estimator_vs_counted.py [--seq-len 64] [--micro-batch 2]

Models: a tiny random Llama (GQA), a tiny random GPT-2 (Conv1D) and the embedded SmolLM2-135M
(real weights). Each row runs one real SFT step (LoRA) and counts the actual tensors: see
lowmem_rlhf/measure/validation.py. The tests (tests/test_estimator_counted.py) assert the same figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=2)
    args = ap.parse_args()
    from lowmem_rlhf.config import Profile, Shape
    from lowmem_rlhf.measure.validation import compare
    from lowmem_rlhf.model.embedded import ensure_default_model
    from lowmem_rlhf.model.random_models import (
        save_random,
        tiny_gpt2_config,
        tiny_llama_config,
    )

    tmp = tempfile.mkdtemp()
    models = {
        "tiny-llama (GQA)": save_random(tiny_llama_config(), f"{tmp}/llama"),
        "tiny-gpt2 (Conv1D)": save_random(tiny_gpt2_config(), f"{tmp}/gpt2"),
        "SmolLM2-135M": ensure_default_model(progress=False),
    }
    settings = [
        ("bf16, LoRA r16, no ckpt", dict(quant="none")),
        ("bf16, LoRA r16, ckpt", dict(quant="none", grad_ckpt=True)),
        ("NF4, LoRA r16, no ckpt", dict(quant="nf4", double_quant=False)),
        ("NF4+DQ, LoRA r16, ckpt", dict(quant="nf4", double_quant=True, grad_ckpt=True)),
        ("NF4+DQ, 8-bit AdamW", dict(quant="nf4", double_quant=True, optimizer="adamw_8bit")),
    ]
    comps = ["weights", "adapters", "gradients", "optimizer", "activations", "kv_cache"]
    print(f"seq_len {args.seq_len}, micro-batch {args.micro_batch}, LoRA dropout 0.05, bf16 compute; "
          "cells: estimated / counted bytes (error)\n")
    print("| model | setting | " + " | ".join(comps) + " |")
    print("|---|---|" + "---|" * len(comps))
    for mname, folder in models.items():
        for sname, knobs in settings:
            knobs = {"lora_r": 16, "lora_dropout": 0.05, "grad_ckpt": False, "optimizer": "adamw",
                     "micro_batch": args.micro_batch, **knobs}
            t = time.time()
            res = compare(folder, Profile(**knobs), Shape(seq_len=args.seq_len))
            cells = []
            for c in comps:
                e, n = res[c]
                cells.append(f"{e:,} / {n:,} ({(e - n) / n:+.1%})")
            print(f"| {mname} | {sname} | " + " | ".join(cells) + f" |  <!-- {time.time() - t:.1f}s -->")


if __name__ == "__main__":
    main()
