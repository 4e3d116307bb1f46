"""What the embedded demo's reward model ranks, by kind of pair, on the demo's questions.

    python benchmarks/demo_rm_probe.py RUN [--max-len 128]

RUN is a finished `lowmem-rlhf auto` run (or any folder with RUN/sft and RUN/rm trained on the
demo pairs). For 96 training questions and the 96 held-out ones, four kinds of pair are built
with the demo's own helpers (`algo.demo_task`) and scored by the RM through `evaluate_pairs`, the
function the RM stage reports with:

* right word vs a wrong word of the same family (correctness of a one-word answer);
* right word vs a sentence carrying it (brevity);
* that sentence vs the same kind of sentence with the wrong word (correctness in a sentence);
* that sentence vs the wrong word (correctness against brevity: what PPO trades).

It prints accuracy (chosen scored above rejected) and mean margin per kind. The policy's base is
the SFT-merged model in the profile the run saved, as this machine runs it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from lowmem_rlhf import data as D
from lowmem_rlhf.algo import demo_task as T
from lowmem_rlhf.algo.pairwise import evaluate_pairs
from lowmem_rlhf.config import Profile, dataclass_from_dict
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import load_model
from lowmem_rlhf.plan.planner import machine_profile

KINDS = ("right word > wrong word", "right word > sentence", "sentence > wrong sentence", "sentence > wrong word")


def pairs_by_kind(qa: list[tuple[str, str]], seed: int = 1) -> dict[str, list[dict]]:
    rng, every = random.Random(seed), T.questions()
    out = {k: [] for k in KINDS}
    for q, a in qa:
        wrong, sentence, wrong_sentence = T.pair_replies(q, a, every, rng)  # as the RM's pairs are made
        for kind, (c, r) in zip(KINDS, ((a, wrong), (a, sentence), (sentence, wrong_sentence), (sentence, wrong))):
            out[kind].append({"prompt": q, "chosen": c, "rejected": r})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args()
    saved = json.loads((args.run / "rm" / "config.json").read_text())["profile"]
    prof = machine_profile(dataclass_from_dict(Profile, saved, str(args.run / "rm" / "config.json")))
    loaded = load_model(None, prof, merge_adapters=(args.run / "sft" / "adapter",), training=False)
    engine = SharedBase(loaded, prof)
    engine.load_adapter("reward", args.run / "rm" / "adapter")
    engine.model.eval()
    tok = loaded.tokenizer
    train, held = T.split(0)
    print(f"{'questions':9s} {'pair':28s} accuracy  margin")
    for name, qa in (("training", train[:96]), ("held-out", held)):
        for kind, pairs in pairs_by_kind(qa).items():
            toks = [t for t in (D.tokenize_pair(p, tok, args.max_len) for p in D.to_pairs(pairs, kind)) if t]
            with torch.no_grad():
                r = evaluate_pairs(engine, toks, tok.pad_token_id, 16, loaded.device)
            print(f"{name:9s} {kind:28s} {r['accuracy']:8.3f} {r['margin']:+7.2f}", flush=True)


if __name__ == "__main__":
    main()
