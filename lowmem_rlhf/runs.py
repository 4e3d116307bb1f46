"""Run folders: each stage writes into a hidden temporary folder and is renamed into place when
complete, so a killed or failed stage never leaves a folder that looks finished.

    RUN/
      plan.json              the plan (hardware, profile, estimates) the run was started with
      sft/                   adapter (PEFT layout) + profile.yaml + metrics.jsonl + summary.json
      rm/  ppo/ ...
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from lowmem_rlhf.errors import UserError

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


@contextlib.contextmanager
def stage_dir(run_dir: Path, stage: str, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder for `stage` that becomes RUN/stage only if the body completes."""
    run_dir = Path(run_dir)
    ensure_writable(run_dir)
    final = run_dir / stage
    if final.exists() and not overwrite:
        raise UserError(f"{final} already exists (a finished stage); pass --overwrite or choose another --out")
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{stage}.partial-"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class MetricsWriter:
    """Appends one JSON object per line; flushes each line so a crash keeps what was logged."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = self.path.open("a")
        self._t0 = time.time()

    def write(self, **row: Any) -> dict:
        row = {"time": round(time.time() - self._t0, 3), **row}
        self._f.write(json.dumps(row, default=_jsonable) + "\n")
        self._f.flush()
        return row

    def close(self) -> None:
        self._f.close()


def write_stage_config(out: Path, stage: str, cfg: Any, profile: Any, estimate: Any, **extra: Any) -> None:
    """The resolved profile (profile.yaml) and the run config with its estimate (config.json),
    written beside the stage's outputs."""
    from dataclasses import asdict

    from lowmem_rlhf.config import profile_to_yaml

    (out / "profile.yaml").write_text(profile_to_yaml(profile, f"resolved profile of this {stage} run ({profile.name})"))
    write_json(out / "config.json", {**asdict(cfg), "profile": profile.to_dict(), "estimate": estimate.to_dict(),
                                     **extra})


def progress_bar(total: int, desc: str, enabled: bool):
    """tqdm on a terminal, silent otherwise (CI logs, pipes) or when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=None if enabled else True, dynamic_ncols=True)


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
