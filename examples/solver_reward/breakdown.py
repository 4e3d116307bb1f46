"""Held-out accuracy per relation and per phrasing (seen by SFT or not), from `lowmem-rlhf eval`'s files.

    python examples/solver_reward/breakdown.py RUN/eval/heldout

reads every ``<policy>.jsonl`` there (one row per held-out story, with its ``kind`` and
``phrasing`` in ``meta``, the greedy answer and its score) and prints k/n per policy for: all
stories, the phrasing SFT saw, the three it never saw, and each relation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def tally(path: Path) -> dict[str, tuple[int, int]]:
    """group -> (passed, total) for one policy's eval file."""
    out: dict[str, list[int]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        meta, passed = row.get("meta") or {}, int(max(row["scores"]) >= 1.0)
        groups = ["all", "seen phrasing" if meta.get("phrasing") == 0 else "unseen phrasings"]
        groups.append(f"{meta.get('kind', '?')}")
        for g in groups:
            k, n = out.setdefault(g, [0, 0])
            out[g] = [k + passed, n + 1]
    return {g: (k, n) for g, (k, n) in out.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="the eval output folder (RUN/eval/heldout)")
    args = ap.parse_args(argv)
    files = sorted(args.folder.glob("*.jsonl"), key=lambda p: (p.stem != "sft", p.stem))
    if not files:
        raise SystemExit(f"{args.folder}: no <policy>.jsonl files; run `lowmem-rlhf eval` first")
    tallies = {p.stem: tally(p) for p in files}
    groups = ["all", "seen phrasing", "unseen phrasings", "add", "sub", "mul", "div"]
    print("| stories | " + " | ".join(tallies) + " |")
    print("|---|" + "---|" * len(tallies))
    for g in groups:
        cells = [f"{t[g][0]}/{t[g][1]} ({100 * t[g][0] / t[g][1]:.0f}%)" if g in t else "-" for t in tallies.values()]
        print(f"| {g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
