"""PNG plots of a run's metrics (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path


def plot_ppo(metrics_file: Path, out_png: Path) -> Path:
    """Reward, KL and the two losses per PPO iteration, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r.get("skipped")]
    it = [r["iteration"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("reward_mean", "reward (mean over rollouts)"), ("kl", "KL(actor || reference) per sequence"),
              ("policy_loss", "policy loss"), ("value_loss", "value loss")]
    for ax, (key, title) in zip(axes.flat, panels):
        ax.plot(it, [r.get(key, float("nan")) for r in rows], marker=".")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
