"""Run folders: each stage writes into a hidden temporary folder and is renamed into place when
complete, so a killed or failed stage never leaves a folder that looks finished.

    RUN/
      plan.json              the plan (hardware, profile, estimates) the run was started with
      sft/                   adapter (PEFT layout) + profile.yaml + metrics.jsonl + summary.json
      rm/  ppo/ ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.files import fsync

SUMMARY = "summary.json"


def ensure_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot write there ({e.strerror}); choose a writable folder") from None


def is_complete(stage_dir: Path) -> bool:
    return (stage_dir / SUMMARY).exists()


def finished_adapter(path: Path | str, flag: str, what: str, example: str) -> Path:
    """The adapter folder of a finished stage (`RUN/<stage>`, or an adapter folder itself), or a
    one-line error naming `flag`: e.g. finished_adapter(p, "--init-from", "SFT", "RUN/sft")."""
    path = Path(path)
    adapter = path / "adapter" if (path / "adapter").exists() else path
    if (path / "adapter").exists() and not is_complete(path):
        raise UserError(f"{flag} {path}: the {what} stage did not finish (no summary.json); re-run it")
    if not (adapter / "adapter_config.json").exists():
        raise UserError(f"{flag} {path}: no adapter there; pass a finished {what} stage folder ({example})")
    return adapter


def partial_dir(run_dir: Path, stage: str) -> Path:
    """Where a stage in progress lives (with its checkpoints) until it completes."""
    return Path(run_dir) / f".{stage}.partial"


def has_checkpoint(run_dir: Path, stage: str) -> bool:
    from lowmem_rlhf.runtime import checkpoint

    return checkpoint.latest(partial_dir(run_dir, stage)) is not None


@contextlib.contextmanager
def stage_dir(run_dir: Path, stage: str, overwrite: bool = False, resume: bool = False) -> Iterator[Path]:
    """RUN/.stage.partial while the body runs; renamed to RUN/stage only if the body completes.

    A failed or interrupted stage keeps its partial folder when it holds a checkpoint (for
    `--resume`), and removes it otherwise. Checkpoints are dropped from the finished folder."""
    from lowmem_rlhf.runtime import checkpoint

    run_dir = Path(run_dir)
    ensure_writable(run_dir)
    final = run_dir / stage
    tmp = partial_dir(run_dir, stage)
    ckpt = checkpoint.latest(tmp)
    if final.exists() and not overwrite:
        raise UserError(f"{final} already exists (a finished stage); "
                        + ("nothing to resume; " if resume else "") + "pass --overwrite or choose another --out")
    if resume and ckpt is None:
        raise UserError(f"--resume: {tmp} holds no checkpoint of the {stage} stage; run it without --resume")
    if not resume and ckpt is not None and not overwrite:
        raise UserError(f"{tmp} holds an unfinished {stage} run (checkpoint at step {checkpoint.step_of(ckpt)}); "
                        "pass --resume to continue it or --overwrite to start over")
    if not resume:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if checkpoint.latest(tmp) is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp / checkpoint.CKPT_DIR, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(run_dir, strict=False)


# profile knobs a resumed run may change: the generation batch is re-planned from the memory free
# now, and it changes no result (each rollout row samples from its own stream; PPO restores the
# size it was running at from the checkpoint)
PROFILE_VOLATILE = ("generation_batch",)


def check_resume_config(out: Path, cfg: Any, volatile: tuple[str, ...] = ("resume", "overwrite", "progress",
                                                                           "save_every", "out", "max_nonfinite",
                                                                           "max_vram")) -> None:
    """--resume must continue the same run: every setting except `volatile` equals the saved one
    (paths compared as the files they name, so `run/sft` and `./run/sft` are the same)."""
    from dataclasses import MISSING, asdict, fields

    saved_path = Path(out) / "config.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    now = json.loads(json.dumps(asdict(cfg), default=_jsonable))

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, str) and isinstance(b, str) and a != b and Path(a).exists() and Path(b).exists():
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
    for key, value in now.items():
        if key in volatile or (key not in saved and key not in defaults):
            continue
        # a knob newer than the checkpoint: that run had its default
        was = saved[key] if key in saved else json.loads(json.dumps(defaults[key], default=_jsonable))
        if isinstance(value, dict) and isinstance(was, dict):  # the profile: only knobs this version has
            knob_defaults = {f.name: f.default for f in fields(type(cfg.profile)) if f.default is not MISSING} \
                if dataclasses.is_dataclass(getattr(cfg, "profile", None)) else {}
            # a knob newer than the run: that run had its default; PROFILE_VOLATILE may change
            was = {k: (v if k in PROFILE_VOLATILE else was.get(k, knob_defaults.get(k, v))) for k, v in value.items()}
        if not same(was, value):
            if isinstance(value, dict):  # name the field
                key, was, value = next((f"{key}.{k}", was[k], v) for k, v in value.items() if was[k] != v)
            raise UserError(f"--resume: {saved_path} was started with {key}={was!r}, now {value!r}; resume with "
                            "the same settings, or pass --overwrite to start over")


class MetricsWriter:
    """Appends one JSON object per line; flushes each line so a crash keeps what was logged.

    keep=(key, n) on resume: rows logged after the checkpoint (key > n) are dropped first, so each
    step appears once even when a killed run had logged steps it never checkpointed. path None:
    nothing is written (the ranks other than 0 of a data-parallel run)."""

    def __init__(self, path: Path | None, keep: tuple[str, int] | None = None):
        self._t0, self._f = time.time(), None
        if path is None:
            return
        self.path = Path(path)
        if keep is not None and self.path.exists():
            key, n = keep
            rows = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = []
            for line in rows:
                try:
                    if json.loads(line).get(key, 0) <= n:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    pass
            self.path.write_text("".join(x + "\n" for x in kept))
        self._f = self.path.open("a")

    def write(self, **row: Any) -> dict:
        row = {"time": round(time.time() - self._t0, 3), **row}
        if self._f is None:
            return row
        self._f.write(json.dumps(row, default=_jsonable) + "\n")
        self._f.flush()
        return row

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def write_stage_config(out: Path, stage: str, cfg: Any, profile: Any, estimate: Any, **extra: Any) -> None:
    """The resolved profile (profile.yaml) and the run config with its estimate (config.json),
    written beside the stage's outputs."""
    from dataclasses import asdict

    from lowmem_rlhf.config import profile_to_yaml

    (out / "profile.yaml").write_text(profile_to_yaml(profile, f"resolved profile of this {stage} run ({profile.name})"))
    write_json(out / "config.json", {**asdict(cfg), "profile": profile.to_dict(), "estimate": estimate.to_dict(),
                                     **extra})


def progress_bar(total: int, desc: str, enabled: bool, every: float = 30.0):
    """tqdm on a terminal; elsewhere (CI logs, pipes) a plain line every `every` seconds and at the
    end, so long work is never silent; nothing when disabled."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():  # tqdm would draw on stderr
        return PlainProgress(total, desc, every)
    return tqdm(total=total, desc=desc, disable=None if enabled else True, dynamic_ncols=True)


class PlainProgress:
    """The progress bar's interface (update, set_postfix, close) as plain lines on stdout, beside
    the stage's other output (stderr stays for errors): `SFT: 12/50 steps (24%), 41 s, loss=1.234`,
    at least every `every` seconds, also in the middle of a long step (a daemon thread watches
    the clock), and, for work that took that long, once at the end."""

    def __init__(self, total: int, desc: str, every: float = 30.0, stream=None):
        self.total, self.desc, self.every, self.n = total, desc, every, 0
        self.stream = stream or sys.stdout
        self.postfix: dict[str, Any] = {}
        self.t0 = self.last = time.time()
        self.shown = 0  # the step count of the last line printed
        self.lock = threading.Lock()
        self.closed = threading.Event()
        if every > 0:
            threading.Thread(target=self._watch, name="lowmem-progress", daemon=True).start()

    def _watch(self) -> None:
        while not self.closed.wait(min(max(self.every / 4, 0.01), 5.0)):
            if time.time() - self.last >= self.every:
                self._line(running=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if n and time.time() - self.last >= self.every:
            self._line()

    def set_postfix(self, values: dict[str, Any] | None = None, **kw: Any) -> None:
        self.postfix = {**(values or {}), **kw}

    def close(self) -> None:
        self.closed.set()
        if time.time() - self.t0 >= self.every and self.shown != self.n:
            self._line()

    def _line(self, running: bool = False) -> None:
        with self.lock:
            self.last, self.shown = time.time(), self.n
            extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
            if running and self.n < self.total:
                extra += f", step {self.n + 1} running"
            pct = 100 * self.n // max(self.total, 1)
            print(f"{self.desc}: {self.n}/{self.total} steps ({pct}%), {self.last - self.t0:.0f} s{extra}",
                  file=self.stream, flush=True)


def write_json(path: Path, data: Any) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(o: Any):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)
