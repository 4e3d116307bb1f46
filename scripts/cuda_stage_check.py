"""One call on a CUDA machine: the reshaped stages (SFT -> RM -> PPO on one shared base) run on the
GPU, and each phase's measured peak is set beside the estimator's and the simulation's.

The model is a random-initialised Llama built from a config (no download), with the byte tokenizer
(vocabulary 260), so nothing leaves the machine. Profile: lora-bf16-shared (16-bit base, LoRA,
torch AdamW: no bitsandbytes needed). Rehearse it on the CPU with --tiny.

    python scripts/cuda_stage_check.py --out-json results.json [--hidden 2048 --layers 16] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lowmem_rlhf.config import PPOConfig, RMConfig, SFTConfig, Shape, load_profile  # noqa: E402
from lowmem_rlhf.data import bundled_path  # noqa: E402
from lowmem_rlhf.measure.simulate import simulate  # noqa: E402
from lowmem_rlhf.model.random_models import save_random, tiny_llama_config  # noqa: E402
from lowmem_rlhf.stages.ppo import run_ppo  # noqa: E402
from lowmem_rlhf.stages.rm import run_rm  # noqa: E402
from lowmem_rlhf.stages.sft import run_sft  # noqa: E402

GIB = 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tiny", action="store_true", help="CPU rehearsal: a 2-layer 64-wide model, 2 steps each")
    args = ap.parse_args()
    t0 = time.time()
    cfg = tiny_llama_config()
    cfg.vocab_size = 260
    if not args.tiny:
        cfg.hidden_size, cfg.num_hidden_layers = args.hidden, args.layers
        cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = args.hidden * 11 // 4, 16, 16
        cfg.max_position_embeddings = 2048
    work = Path(tempfile.mkdtemp())
    model = str(save_random(cfg, work / "model", dtype=torch.bfloat16))
    prof = replace(load_profile("lora-bf16-shared"), micro_batch=4)
    steps, seq, plen, rlen = (2, 64, 32, 8) if args.tiny else (8, 512, 128, 128)
    run = work / "run"
    common = dict(model=model, out=run, profile=prof, progress=False)
    out: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__, "model": {"hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
                                                      "vocab": cfg.vocab_size}, "profile": prof.name, "stages": {}}
    sft = run_sft(SFTConfig(data=str(bundled_path("self-instruct-seed-tasks.jsonl")), max_len=seq, batch=8,
                            max_steps=steps, **common))
    rm = run_rm(RMConfig(data=str(bundled_path("demo-pairs.jsonl.gz")), init_from=run / "sft", max_len=seq, batch=8,
                         max_steps=steps, **common))
    ppo = run_ppo(PPOConfig(prompts=str(bundled_path("demo-prompts.jsonl")), sft=run / "sft",
                            reward_model=run / "rm", iterations=steps, rollout_batch=8, prompt_len=plen,
                            response_len=rlen, ppo_epochs=2, **common))
    shapes = {"sft": Shape(seq_len=seq, batch=8), "rm": Shape(seq_len=seq, batch=8),
              "ppo": Shape(prompt_len=plen, response_len=rlen, rollout_batch=8)}
    for name, s in (("sft", sft), ("rm", rm), ("ppo", ppo)):
        sim = simulate(model, prof, name, shapes[name]) if torch.cuda.is_available() else None
        sim_peaks = {p.name: p.peak / GIB for p in sim.phases} if sim else {}
        out["stages"][name] = {"seconds": s["seconds"], "memory": s["memory"], "simulated_allocated_gib": sim_peaks}
        print(f"== {name}: {s['seconds']:.1f} s")
        for ph, figs in s["memory"]["phases"].items():
            row = ", ".join(f"{k} est {v[0] / GIB:.3f} / measured {v[1] / GIB:.3f} GiB" for k, v in figs.items())
            print(f"  {ph}: {row}" + (f"; simulated allocated {sim_peaks[ph]:.3f} GiB" if ph in sim_peaks else ""))
    out["ppo_reward_first_last"] = [ppo["reward_first5"], ppo["reward_last5"]]
    out["seconds"] = time.time() - t0
    Path(args.out_json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out_json} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
