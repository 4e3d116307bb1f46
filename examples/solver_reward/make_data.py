"""Word problems that the model turns into an equation and a solver checks: the data.

    python examples/solver_reward/make_data.py --out runs/solver/data

The policy's job is *modelling*, as in a math-modelling model scored by a solver: it reads a short
story and writes one linear equation in x ("x - 5 = 9"); the evaluator (`evaluator.py`) solves
that equation exactly and scores 1 when its solution is the story's answer. The arithmetic is the
solver's, so what the policy must get right is the relation: which operation the story means.

Four relations, each told in several phrasings:

    add  x + a = c   "... Then Ann found 7 more marbles and now has 19."
    sub  x - a = c   "... Then Ann lost 7 marbles and now has 12."
    mul  a*x = c     "Ann filled some bags with 4 marbles in each bag: 28 marbles in all."
    div  x / a = c   "Ann shared some marbles equally among 4 friends, and each friend got 6."

SFT sees only the first phrasing of each relation (`SEEN`); the PPO prompts and the held-out
problems use every phrasing, so what PPO can teach is the relation behind the phrasings SFT never
showed (for example that "gave 7 marbles to a friend" means minus). No story (its exact text) is
in two files. Files, the same bytes for the same arguments:

* ``sft.jsonl``      prompt/completion rows of seen phrasings: the story -> "x + 7 = 19"
* ``prompts.jsonl``  PPO prompts (``prompt``, ``answer``, ``kind``, ``phrasing``), every phrasing
* ``heldout.jsonl``  problems never trained on, the same fields, every phrasing
* ``answers.jsonl``  the answer key the evaluator reads: ``problem`` (the story) and ``x``
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ("Ann", "Ben", "Cara", "Dev", "Ella", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kai", "Lena")
ITEMS = ("marbles", "apples", "stickers", "coins", "books", "cards", "shells", "pencils")
QUESTION = {"add": "How many {it} did {n} have at first?", "sub": "How many {it} did {n} have at first?",
            "mul": "How many {g} did {n} fill?", "div": "How many {it} did {n} share?"}
GROUPS = ("bags", "boxes", "jars")
# relation -> phrasings; index 0 is the one SFT sees
STORIES = {
    "add": ("{n} had some {it}. Then {n} found {a} more {it} and now has {c}.",
            "{n} had some {it}. A friend gave {n} {a} {it}, and now {n} has {c}.",
            "{n} had some {it}. After winning {a} {it} in a game, {n} has {c}.",
            "{n} had some {it} and bought {a} more. Now {n} has {c} {it}."),
    "sub": ("{n} had some {it}. Then {n} lost {a} {it} and now has {c}.",
            "{n} had some {it}. {n} gave {a} {it} to a friend and now has {c}.",
            "{n} had some {it}. After selling {a} {it}, {n} has {c} left.",
            "{n} had some {it} and ate {a} of them. Now {n} has {c} {it}."),
    "mul": ("{n} filled some {g} with {a} {it} in each: {c} {it} in all.",
            "Each of {n}'s {g} holds {a} {it}, and together they hold {c} {it}.",
            "{n} packed {c} {it} into some {g}, {a} {it} per {g1}.",
            "{n} has some {g} of {it}. There are {a} {it} in every {g1} and {c} {it} altogether."),
    "div": ("{n} shared some {it} equally among {a} friends, and each friend got {c}.",
            "{n} split some {it} into {a} equal groups of {c}.",
            "{n} gave out some {it}: {a} children got {c} {it} each, and none were left.",
            "{n} cut a pile of {it} into {a} equal piles with {c} {it} in each."),
}
SEEN = 0  # the phrasing SFT is shown


def equation(kind: str, a: int, c: int) -> str:
    return {"add": f"x + {a} = {c}", "sub": f"x - {a} = {c}", "mul": f"{a}x = {c}", "div": f"x / {a} = {c}"}[kind]


def family(seed: int) -> list[dict]:
    """Every problem: story (with its question), kind, phrasing index, equation and answer."""
    rng = random.Random(seed)
    out, seen = [], set()
    for kind, phrasings in STORIES.items():
        for p, story in enumerate(phrasings):
            for _ in range(60):
                n, it, g = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(GROUPS)
                if kind in ("add", "sub"):
                    x, a = rng.randint(3, 30), rng.randint(2, 20)
                    if kind == "sub":
                        x = x + a  # x - a = c > 0
                    c = x + a if kind == "add" else x - a
                else:
                    a, q = rng.randint(2, 9), rng.randint(2, 12)
                    x, c = (q, a * q) if kind == "mul" else (a * q, q)
                text = (story.format(n=n, it=it, a=a, c=c, g=g, g1=g[:-2] if g == "boxes" else g[:-1])
                        + " " + QUESTION[kind].format(n=n, it=it, g=g) + " Write an equation in x.")
                if text in seen:
                    continue
                seen.add(text)
                out.append({"problem": text, "kind": kind, "phrasing": p, "equation": equation(kind, a, c), "x": x})
    return out


def split(seed: int, heldout: int, sft: int, prompts: int) -> tuple[list, list, list]:
    """(held-out, SFT, PPO) problems: per (kind, phrasing) the first `heldout` are held out; of the
    rest, seen phrasings go to SFT (at most `sft` each), the others to PPO (at most `prompts`
    each); PPO also gets `prompts // 4` seen-phrasing problems per kind that SFT did not use."""
    items = family(seed)
    random.Random(seed + 1).shuffle(items)
    groups: dict[tuple[str, int], list] = {}
    for it in items:
        groups.setdefault((it["kind"], it["phrasing"]), []).append(it)
    held, train, ppo = [], [], []
    for (kind, p), probs in groups.items():
        held += probs[:heldout]
        rest = probs[heldout:]
        if p == SEEN:
            train += rest[:sft]
            ppo += rest[sft: sft + prompts // 4]
        else:
            ppo += rest[:prompts]
    rng = random.Random(seed + 2)
    rng.shuffle(train)
    rng.shuffle(ppo)
    return held, train, ppo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the four files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=10, help="held-out problems per relation and phrasing (16 pairs)")
    ap.add_argument("--sft", type=int, default=40, help="SFT examples per relation (seen phrasing only)")
    ap.add_argument("--prompts", type=int, default=40, help="PPO prompts per relation and unseen phrasing")
    args = ap.parse_args(argv)

    held, train, ppo = split(args.seed, args.heldout, args.sft, args.prompts)

    def row(it: dict) -> dict:
        return {"prompt": it["problem"], "answer": str(it["x"]), "kind": it["kind"], "phrasing": it["phrasing"]}

    files = {
        "sft.jsonl": [{"prompt": it["problem"], "completion": it["equation"]} for it in train],
        "prompts.jsonl": [row(it) for it in ppo],
        "heldout.jsonl": [row(it) for it in held],
        "answers.jsonl": [{"problem": it["problem"], "x": it["x"]} for it in held + train + ppo],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        with open(args.out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"{args.out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
