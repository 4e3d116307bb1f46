"""The one scaffold every training stage runs in: setup -> loop -> save.

    with Stage(cfg, "sft", "SFT", console) as st:      # seed, RUN/.sft.partial, Ctrl-C/SIGTERM, --resume check
        loaded = st.load(context=(cfg.max_len, "--max-len"))
        ... the stage's own setup: data, adapters, optimizer ...
        st.plan(shape, device)                         # estimate, config.json + profile.yaml, memory meter
        mb = st.micro_batch(cfg.batch, knob="--max-len")   # halved on OOM, capped by what RUN/oom.jsonl learned
        state = st.resume({...}, parts, cfg.max_steps) # restored from the newest checkpoint with --resume
        for step in st.steps(cfg.max_steps):           # progress, checkpoints, stop at a step boundary
            ... one step ...; st.log(...)
        return st.finish({...}, counted)               # summary.json with estimated vs measured memory

A stage is this scaffold plus its step functions (`algo/`). The folder is renamed to RUN/<stage>
only when `finish` has run and the block exits cleanly.

Under a launcher (`torchrun --nproc_per_node N`, `runtime/distributed.py`) every rank runs the
same stage on its share of the batch; rank 0 alone prints, writes the run folder (config.json,
metrics, checkpoints, summary.json, adapters) and renames it; the others read it (--resume). A
stop signal seen by any rank stops all of them at the same step boundary.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lowmem_rlhf.config import Shape, StageConfig
from lowmem_rlhf.data import EpochSampler
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.measure.memory import MemoryMeter
from lowmem_rlhf.measure.report import memory_report
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import LoadedModel, load_model
from lowmem_rlhf.plan.estimator import Estimate, estimate
from lowmem_rlhf.runtime import checkpoint
from lowmem_rlhf.runtime.distributed import world
from lowmem_rlhf.runtime.oom import MicroBatch, cap_vram, free_memory, learned_cap
from lowmem_rlhf.runtime.optim import NonFiniteGuard
from lowmem_rlhf.runtime.runs import (
    MetricsWriter,
    check_resume_config,
    partial_dir,
    progress_bar,
    stage_dir,
    write_json,
    write_stage_config,
)
from lowmem_rlhf.runtime.stopping import StopOnSignal
from lowmem_rlhf.runtime.threads import ThreadGovernor
from lowmem_rlhf.runtime.trainer import make_trainer


class Stage:
    """Owns the chain every stage shares: stage_dir -> StopOnSignal -> resume check -> load ->
    estimate -> config -> MemoryMeter -> MicroBatch -> checkpoint resume -> MetricsWriter ->
    progress and checkpoints per step -> summary."""

    def __init__(self, cfg: StageConfig, name: str, title: str, console=None, step_key: str = "step"):
        self.cfg, self.name, self.title, self.key = cfg, name, title, step_key
        self.profile = cfg.profile
        self.world = world()  # one process, or this rank of a data-parallel run
        self.say = (console.print if console else print) if self.world.main else (lambda *a, **k: None)
        self.merged: list[Path] = []
        self.parts: dict | None = None
        self.state: dict[str, Any] = {}
        self.resumed: Path | None = None
        self.nonfinite: dict[str, NonFiniteGuard] = {}  # one per trained adapter (PPO: actor, critic)

    # ---- setup --------------------------------------------------------------------------------
    def __enter__(self) -> "Stage":
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        self.threads = ThreadGovernor(getattr(self.cfg, "threads", 0))  # torch threads = the free cores
        if self.cfg.max_vram is not None and cap_vram(self.cfg.max_vram) is None:
            self.say(f"note: --max-vram {self.cfg.max_vram:g} caps a CUDA GPU's memory; none is here, nothing capped")
        with contextlib.ExitStack() as stack:  # unwound here if the resume check fails
            if self.world.main:  # the others read what rank 0 made ready (a failure there stops them all)
                self.out = stack.enter_context(stage_dir(self.cfg.out, self.name, self.cfg.overwrite, self.cfg.resume))
            self.world.barrier()
            if not self.world.main:
                self.out = partial_dir(self.cfg.out, self.name)
            self.stop = stack.enter_context(StopOnSignal(self.say))
            if self.cfg.resume:
                check_resume_config(self.out, self.cfg)
                check_resume_world(self.out, self.world.size)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def load(self, context: tuple[int, str] | None = None, merged: list[Path] = ()) -> LoadedModel:
        """The base model for this stage's profile, with the `merged` adapters merged in. What an
        earlier stage in this process left is freed first: bitsandbytes' layers are only freed by
        the cycle collector, so without it `auto` would hold two models at once."""
        free_memory()
        self.merged = list(merged)
        self.loaded = load_model(self.cfg.model, self.profile, self.cfg.trust_remote_code,
                                 merge_adapters=tuple(self.merged), context=context)
        return self.loaded

    def plan(self, shape: Shape, device: torch.device, **kw: Any) -> Estimate:
        """The estimate for this run's shape, written with the resolved config; starts the meter."""
        self.est = estimate(self.loaded.spec, self.profile, self.name, shape, target=device.type,
                            data_parallel=self.world.size > 1, **kw)
        if not self.cfg.resume and self.world.main:
            write_stage_config(self.out, self.title, self.cfg, self.profile, self.est, merged=self.merged,
                               source=self.loaded.source, world_size=self.world.size)
        self.meter = MemoryMeter(device.type)
        if self.world.size > 1:
            rows = shape.batch if self.name in ("sft", "rm") else shape.rollout_batch
            self.say(f"data parallel: {self.world.size} processes ({self.world.backend}); the estimate is per process "
                     f"(each holds the whole base and its adapters); global batch {self.world.size} x {rows} = "
                     f"{self.world.size * rows}")
        return self.est

    def single_adapter(self, adapter: str, with_head: bool, rows: int, state: dict[str, Any]):
        """The setup SFT and RM share, after `load`: the adapter (+ head) on a shared base, its
        trainer (plain torch or ZeRO-3) for cfg.batch/max_steps/lr, the micro-batch, the estimate for
        cfg.max_len, a seeded sampler over `rows` training rows, and the loop `state` (restored on
        --resume). -> (engine, trainer, micro-batch, sampler, state)."""
        cfg, prof = self.cfg, self.profile
        engine = SharedBase(self.loaded, prof, seed=cfg.seed)
        engine.add_adapter(adapter, with_head=with_head)
        engine.model.train()
        mb = self.micro_batch(cfg.batch, knob=f"--max-len (now {cfg.max_len})")
        trainer = make_trainer(engine, adapter, prof, cfg.lr if cfg.lr is not None else prof.learning_rate,
                               cfg.max_steps, mb.size, math.ceil(cfg.batch / mb.size))
        mb.elastic = mb.elastic and trainer.elastic
        if self.world.rank > 0:  # after DDP's broadcast: each rank's own dropout masks (kept per rank in checkpoints)
            torch.manual_seed(cfg.seed + 7919 * self.world.rank)
        self.plan(Shape(seq_len=cfg.max_len, batch=cfg.batch), trainer.device)
        sampler = EpochSampler(rows, cfg.seed)
        parts = {**trainer.checkpoint_parts(), "samplers": {"train": sampler}} if trainer.resumable else None
        state = self.resume({**state, "micro_batch": mb.size}, parts, cfg.max_steps)
        mb.size = state["micro_batch"]
        return engine, trainer, mb, sampler, state

    def micro_batch(self, want: int, knob: str, key: str | None = None, start: int | None = None) -> MicroBatch:
        """The micro-batch to start from: `start` (default: the profile's), at most `want`, at most
        what an earlier out-of-memory in this run folder fell back to. key: its name in RUN/oom.jsonl."""
        key, start = key or self.name, start or self.profile.micro_batch
        size = min(start, want, learned_cap(self.cfg.out, key, self.profile.name) or start)
        # ranks step together: one cannot halve its training micro-batch alone after an out-of-memory
        # (generation has no collectives and samples the same rollout at any size: it may)
        fixed = self.world.size > 1 and "generation" not in key
        return MicroBatch(size, key, self.cfg.out, self.profile.name, knob=knob, elastic=not fixed,
                          fixed=f"a data-parallel run ({self.world.size} processes)" if fixed else "")

    def resume(self, state: dict[str, Any], parts: dict | None, total: int) -> dict[str, Any]:
        """The loop state, restored with `parts` (adapters, optimizers, samplers) from the newest
        checkpoint when --resume; parts None: this trainer keeps no checkpoint (ZeRO-3)."""
        self.state, self.parts = {self.key: 0, "seconds": 0.0, **state}, parts
        self.resumed = checkpoint.resume(self.out, self.cfg.resume, self.state, parts, rank=self.world.rank)
        if self.resumed is not None:
            self.say(f"resuming {self.title} from {self.resumed} ({self.key} {self.state[self.key]} of {total})")
        keep = (self.key, self.state[self.key]) if self.resumed else None
        self.metrics = MetricsWriter(self.out / "metrics.jsonl" if self.world.main else None, keep=keep)
        return self.state

    # ---- loop ---------------------------------------------------------------------------------
    def steps(self, total: int, sync: Callable[[], None] = lambda: None) -> Iterator[int]:
        """Steps from where the run stands to `total`. After each (also one the body skipped with
        `continue`): sync() brings the loop state up to date, then the step count and seconds, the
        progress bar, a checkpoint every cfg.save_every, a stop on a signal."""
        self.bar = progress_bar(total, self.title, self.cfg.progress and self.world.main)
        self.bar.update(self.state[self.key])
        make_state = self.parts and self._make_state
        stop = _WorldStop(self.stop, self.world)
        first, self._eta_said = self.state[self.key], False
        for step in range(first, total):
            self.threads.update()
            self._t0 = time.time()
            yield step
            sync()
            self.state[self.key] = step + 1
            self.state["seconds"] += self.step_seconds
            self.bar.update(1)
            self._eta(step + 1 - first, total - step - 1)
            stop.poll()
            checkpoint.at_step_end(self.out, step + 1, total, self.cfg.save_every, stop, make_state, self.title,
                                   write=self.world.main, saved=self.world.barrier)
        self.bar.close()

    def _make_state(self) -> dict[str, Any] | None:
        """What a checkpoint holds; in a data-parallel run every rank's random state too (gathered:
        every rank calls this at the same step), and only rank 0 captures the rest (None elsewhere)."""
        ranks = self.world.gather(checkpoint.rng_state()) if self.world.size > 1 else None
        if not self.world.main:
            return None
        return {**checkpoint.capture(loop=self.state, **self.parts), **({"rng_ranks": ranks} if ranks else {})}

    def _eta(self, done: int, left: int) -> None:
        """Once, after the first steps: seconds per step and the time left (the first step holds
        one-off costs, so the second step's time, unless the first alone took 30 s or more)."""
        if left <= 0 or self._eta_said or (done == 1 and self.step_seconds < 30):
            return
        self._eta_said = True
        per = self.step_seconds
        threads = "" if torch.cuda.is_available() else f" ({torch.get_num_threads()} CPU threads)"
        self.say(f"{self.title}: {per:.1f} s per {self.key}, about {_duration(per * left)} for the {left} left{threads}")

    @property
    def step_seconds(self) -> float:
        """Seconds since the current step began."""
        return time.time() - self._t0

    def skipped(self, stats: dict[str, Any], step: int) -> bool:
        """Counts an optimizer step skipped for a NaN/inf loss or gradient (stats["skipped"]), and
        stops the stage at cfg.max_nonfinite in a row of one adapter (stats["role"]: PPO's actor and
        critic are counted apart, so an actor that is NaN at every step stops the stage even while
        the critic's steps apply) (`NonFiniteGuard`). An fp16 overflow that
        the loss scale corrects by halving (stats["overflow"]) is counted apart and never stops
        the stage. -> whether the step was skipped."""
        if stats.get("overflow"):
            self.state["overflow_skips"] = self.state.get("overflow_skips", 0) + 1
            return True
        role = stats.get("role", "")
        guard = self.nonfinite.setdefault(role, NonFiniteGuard(f"{self.title} {role}".strip(), self.cfg.max_nonfinite,
                                                                "--critic-lr" if role == "critic" else "--lr"))
        skipped = guard.record(bool(stats.get("skipped")), step)
        self.state["nonfinite_skips"] = self.state.get("nonfinite_skips", 0) + skipped
        return skipped

    def log(self, postfix: dict[str, float] | None = None, **row: Any) -> None:
        """One metrics.jsonl row (with the run's count of non-finite skips so far); `postfix` also
        goes on the progress bar."""
        self.metrics.write(**row, threads=torch.get_num_threads(), nonfinite_skips=self.state.get("nonfinite_skips", 0),
                           overflow_skips=self.state.get("overflow_skips", 0))
        if postfix:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in postfix.items()})

    # ---- save ---------------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any], counted: dict[str, int]) -> dict[str, Any]:
        """summary.json: what the stage reports, its wall seconds and estimated vs measured memory."""
        out = {"stage": self.name, "model": self.loaded.source, "profile": self.profile.name,
               "world_size": self.world.size, **summary,
               "nonfinite_skips": self.state.get("nonfinite_skips", 0),
               "overflow_skips": self.state.get("overflow_skips", 0),
               "seconds": self.state["seconds"], "memory": memory_report(self.est, self.meter.peaks, counted)}
        self.metrics.close()
        if self.world.main:
            write_json(self.out / "summary.json", out)
        return out


class _WorldStop:
    """StopOnSignal's view for `checkpoint.at_step_end`, agreed across ranks: poll() once per step
    end makes `requested` true on every rank when a signal reached any of them, so all stop (and
    take their part in the checkpoint) at the same step."""

    def __init__(self, local: StopOnSignal, w):
        self.local, self.world, self.requested = local, w, False

    def poll(self) -> None:
        self.requested = self.world.any(self.local.requested)

    @property
    def name(self) -> str:
        return self.local.name or "a signal to another process"


def check_resume_world(out: Path, size: int) -> None:
    """--resume in a world of the size that wrote the checkpoint (the batch split and each rank's
    random state depend on it), else one line."""
    import json

    path = Path(out) / "config.json"
    if not path.exists():
        return
    was = json.loads(path.read_text()).get("world_size", 1)
    if was != size:
        launch = "without a launcher" if was == 1 else f"under torchrun --nproc_per_node {was}"
        raise UserError(f"--resume: {out} was run by {was} process(es), this is {size}; resume it {launch}, or "
                        "start over with --overwrite")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


__all__ = ["Stage"]
