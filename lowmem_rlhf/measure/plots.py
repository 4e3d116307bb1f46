"""PNG plots of a run's metrics (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_ppo(metrics_file: Path, out_png: Path) -> Path:
    """Reward, KL, the policy loss and the value loss (PPO) or the entropy (GRPO/RLOO, no critic)
    per iteration, one panel each; a KL that was not measured (--beta 0) is left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r.get("skipped")]
    it = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("reward_mean", "reward (mean over rollouts)"), ("kl", "KL(actor || reference) per sequence"),
              ("policy_loss", "policy loss"),
              ("value_loss", "value loss") if any("value_loss" in r for r in rows) else ("entropy", "entropy")]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(it, [float("nan") if r.get(key) is None else r[key] for r in rows], marker=".")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
