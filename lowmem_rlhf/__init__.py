"""lowmem-rlhf: the whole RLHF pipeline (SFT, reward model, PPO) on one consumer GPU."""

__version__ = "0.1.0"
