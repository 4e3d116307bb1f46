"""Where each PPO role lives. Shared (the design): one frozen base whose `use()` switches the
actor/critic/reward adapters, and the reference is that base with adapters off. Separate (the
4-model layout, kept for the benchmark's comparison): a model per role, each with one adapter; the
reference is a bare copy of the base."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from lowmem_rlhf.config import Profile
from lowmem_rlhf.model.adapters import SharedBase, disable_dropout


class Roles:
    def __init__(self, engines: dict[str, SharedBase]):
        self.engines = engines
        self.entries: dict[str, int] = {}  # times each role was made active (forwards run as it): counted, logged

    @contextlib.contextmanager
    def role(self, name: str):
        eng = self.engines[name]
        self.entries[name] = self.entries.get(name, 0) + 1
        if name == "reference":
            with eng.reference():
                yield eng
        else:
            eng.use(name)
            yield eng

    def unique(self) -> list[SharedBase]:
        return list({id(e): e for e in self.engines.values()}.values())

    def train(self, mode: bool = True) -> None:
        for eng in self.unique():
            eng.model.train(mode)


def build_roles(loaded_fn, prof: Profile, rm_adapter: Path | None, separate: bool, seed: int,
                critic: bool = True) -> Roles:
    """loaded_fn() -> a freshly loaded base (called once when shared, once per role when separate).
    Every dropout is off (Profile.for_rl): scoring and the update run the same forward.
    critic False (GRPO/RLOO): the shared base carries the actor, and the reward adapter when there
    is a reward model; no critic adapter, no value head."""
    if not critic:
        if separate:
            raise ValueError("critic-free RL runs on one shared base")
        engine = SharedBase(loaded_fn(), prof.for_rl(), seed=seed)
        if rm_adapter is not None:
            engine.load_adapter("reward", rm_adapter, trainable=False, with_head=True)
        engine.add_adapter("actor")
        disable_dropout(engine.model)
        return Roles({r: engine for r in ("actor", "reward", "reference")})
    roles = _build_roles(loaded_fn, prof.for_rl(), rm_adapter, separate, seed)
    for eng in roles.unique():
        disable_dropout(eng.model)
    return roles


def _build_roles(loaded_fn, prof: Profile, rm_adapter: Path | None, separate: bool, seed: int) -> Roles:
    if not separate:
        engine = SharedBase(loaded_fn(), prof, seed=seed)
        attach_roles(engine, rm_adapter)
        return Roles({r: engine for r in ("actor", "critic", "reward", "reference")})
    engines = {}
    engines["actor"] = SharedBase(loaded_fn(), prof, seed=seed)
    engines["actor"].add_adapter("actor")
    engines["critic"] = SharedBase(loaded_fn(), prof, seed=seed)
    if rm_adapter is not None:
        engines["critic"].load_adapter("critic", rm_adapter, trainable=True, with_head=True)
        engines["reward"] = SharedBase(loaded_fn(), prof, seed=seed)
        engines["reward"].load_adapter("reward", rm_adapter, trainable=False, with_head=True)
    else:
        engines["critic"].add_adapter("critic", with_head=True, zero_head=True)
        engines["reward"] = engines["critic"]  # unused: the reward is a program
    engines["reference"] = SharedBase(loaded_fn(), prof, seed=seed)
    return Roles(engines)


def attach_roles(engine: SharedBase, rm_adapter: Path | None) -> None:
    """reward (frozen) and critic both load the trained RM adapter + head, checked key by key; the
    critic's copy is trainable. Without a reward model the critic starts fresh, its head at 0 (values
    0 until trained: no random baseline in the first advantages). The actor starts
    as a zero LoRA on the SFT-merged base, i.e. as the SFT policy."""
    if rm_adapter is not None:
        engine.load_adapter("reward", rm_adapter, trainable=False, with_head=True)
        engine.load_adapter("critic", rm_adapter, trainable=True, with_head=True)
    else:
        engine.add_adapter("critic", with_head=True, zero_head=True)
    engine.add_adapter("actor")


def base_fingerprint(engine: SharedBase) -> str:
    """sha256 over every base (non-adapter, non-head) tensor's bytes: proof the base never moves."""
    h = hashlib.sha256()
    for name, p in sorted(engine.model.named_parameters()):
        if "lora_" in name or ".score." in name or name.endswith("score.weight"):
            continue
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["Roles", "build_roles", "attach_roles", "base_fingerprint"]
