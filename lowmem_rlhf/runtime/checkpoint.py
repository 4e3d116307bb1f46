"""Checkpoints of a stage in progress: everything a run needs to continue bit-identically.

    RUN/.sft.partial/                 the stage being written (hidden: it does not look finished)
      checkpoints/step-000012/        the newest complete checkpoint
        state.pt                      trainable adapter/head tensors, optimizer and scheduler states,
                                      RNG states (torch, python, CUDA), sampler positions, loop state
        COMPLETE                      written last: a folder without it is ignored

A checkpoint is written into `.step-N.tmp/`, fsynced, then renamed to `step-N/`; only then is the
previous one deleted, so a kill at any instant leaves at least one complete checkpoint (or none,
before the first). Adapters are tiny next to the base, so a checkpoint is megabytes, not gigabytes.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lowmem_rlhf.files import fsync

CKPT_DIR = "checkpoints"
STATE = "state.pt"
COMPLETE = "COMPLETE"
_STEP = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def adapter_tensors(model: torch.nn.Module, owns) -> dict[str, torch.Tensor]:
    """{parameter name: CPU copy} of every parameter for which owns(name) is true."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if owns(n)}


def load_adapter_tensors(model: torch.nn.Module, saved: dict[str, torch.Tensor], owns) -> None:
    """Copy saved tensors back, bit for bit; the names must match exactly in both directions."""
    mine = {n: p for n, p in model.named_parameters() if owns(n)}
    if set(mine) != set(saved):
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        raise RuntimeError(f"checkpoint does not match the model's adapters (missing {missing[:2]}, "
                           f"unexpected {extra[:2]})")
    with torch.no_grad():
        for n, p in mine.items():
            p.copy_(saved[n].to(p.device, p.dtype))


def capture(models: dict[str, tuple[torch.nn.Module, Any]], optimizers: dict, schedulers: dict,
            samplers: dict, loop: dict) -> dict[str, Any]:
    """The whole resumable state. models: {role: (module, owns(param_name) -> bool)}; samplers:
    objects with state_dict() (EpochSampler) or torch.Generators; loop: plain Python values."""
    return {
        "adapters": {k: adapter_tensors(m, owns) for k, (m, owns) in models.items()},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "samplers": {k: s.get_state() if isinstance(s, torch.Generator) else s.state_dict() for k, s in samplers.items()},
        "rng": rng_state(),
        "loop": loop,
    }


def restore(state: dict[str, Any], models: dict, optimizers: dict, schedulers: dict, samplers: dict,
            rank: int = 0) -> dict:
    """Put everything `capture` saved back in place; returns the loop state. A data-parallel run's
    checkpoint holds each rank's random state ("rng_ranks"): `rank` takes its own."""
    for k, (m, owns) in models.items():
        load_adapter_tensors(m, state["adapters"][k], owns)
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        if k.endswith("-loss-scale") and k not in state["schedulers"]:
            continue  # a checkpoint older than fp16's loss scales: the scaler starts afresh
        s.load_state_dict(state["schedulers"][k])
    for k, s in samplers.items():
        s.set_state(state["samplers"][k]) if isinstance(s, torch.Generator) else s.load_state_dict(state["samplers"][k])
    set_rng_state(state["rng_ranks"][rank] if "rng_ranks" in state else state["rng"])
    return dict(state["loop"])


def resume(stage_dir: Path, enabled: bool, state: dict, parts: dict, rank: int = 0) -> Path | None:
    """With --resume: restore the newest checkpoint into `parts` (see `restore`) and the loop
    `state`; returns that checkpoint, or None for a fresh start."""
    ckpt = latest(stage_dir) if enabled else None
    if ckpt is not None:
        state.update(restore(load(ckpt), **parts, rank=rank))
    return ckpt


def at_step_end(stage_dir: Path, step: int, total: int, save_every: int, stop, make_state, what: str,
                write: bool = True, saved=lambda: None) -> None:
    """Called after each completed step: a periodic checkpoint every `save_every` steps, and on a
    pending SIGINT/SIGTERM a checkpoint followed by `Interrupted`. write False: make_state() runs
    (a data-parallel run gathers every rank's part of it) but another process writes it. saved():
    on a stop, called by every process once the checkpoint is written, before any raises (a
    barrier: a launcher kills the rest once one process exits)."""
    from lowmem_rlhf.runtime.stopping import Interrupted

    periodic = save_every > 0 and step % save_every == 0 and step < total
    if not (periodic or stop.requested):
        return
    if make_state is None:  # a trainer whose state is not checkpointed (ZeRO-3)
        if stop.requested:
            raise Interrupted(f"{what} stopped by {stop.name} after step {step} of {total}; this profile keeps "
                              "no checkpoint yet (ZeRO-3 offload), so the stage starts over when run again")
        return
    state = make_state()
    if not write:
        if stop.requested:
            saved()
            raise Interrupted(f"{what} stopped by {stop.name} after step {step} of {total} (rank 0 saved the checkpoint)")
        return
    path = save(stage_dir, step, state)
    if stop.requested:
        saved()
        raise Interrupted(f"{what} stopped by {stop.name} after step {step} of {total}; checkpoint saved in "
                          f"{path}; run the same command with --resume to continue")


def save(stage_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` as checkpoint `step` atomically; delete older checkpoints afterwards."""
    root = Path(stage_dir) / CKPT_DIR
    root.mkdir(exist_ok=True)
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            torch.save(state, tmp / STATE)
        except RuntimeError as e:  # torch's zip writer reports a full disk as a RuntimeError
            free = shutil.disk_usage(root).free
            if free < 64 * 1024**2:
                raise OSError(errno.ENOSPC, f"No space left on device ({free // 1024} KiB free)",
                              str(tmp / STATE)) from e
            raise
        fsync(tmp / STATE)
        (tmp / COMPLETE).write_text(f"{step}\n")
        fsync(tmp / COMPLETE)
        final = root / f"step-{step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in root.iterdir():  # older checkpoints and leftovers of killed writes
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint of a stage folder, or None."""
    root = Path(stage_dir) / CKPT_DIR
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))
            and (p / COMPLETE).exists() and (p / STATE).exists()]
    return max(done)[1] if done else None


def load(path: Path) -> dict[str, Any]:
    # our own file (RNG states are Python objects): not a weights-only payload
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=False)


def step_of(path: Path) -> int:
    return int(_STEP.match(Path(path).name).group(1))


__all__ = ["capture", "restore", "resume", "at_step_end", "save", "latest", "load", "step_of", "rng_state", "set_rng_state", "adapter_tensors",
           "load_adapter_tensors", "CKPT_DIR"]
