"""Reading data files: local .json/.jsonl(.gz)/.parquet, a hub dataset, or a file bundled in the
package. Every problem is a one-line UserError naming the file and the line or row."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from lowmem_rlhf.errors import UserError

#: Folder of the data files shipped inside the package.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"

#: Recognised local file suffixes, longest first.
_SUFFIXES = (".jsonl.gz", ".json.gz", ".ndjson", ".jsonl", ".json", ".parquet")
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.\[\]%:+-]+)?$")
_LIST_KEYS = ("data", "train", "rows")


def bundled_path(name: str) -> Path:
    """Path of a data file shipped in ``lowmem_rlhf/data/bundled`` (UserError if there is none)."""
    path = BUNDLED_DIR / name
    if not path.is_file() or path.parent != BUNDLED_DIR:
        shipped = sorted(p.name for p in BUNDLED_DIR.glob("*") if p.is_file() and not p.name.startswith("."))
        raise UserError(f"no bundled data file {name!r}; shipped: {', '.join(shipped) or 'none'}")
    return path


def load_records(source: str) -> list[dict]:
    """Read rows (dicts) from a local file or, failing that, a Hugging Face hub dataset.

    Local files: ``.json`` (a list of objects, or an object holding that list under ``data``,
    ``train`` or ``rows``), ``.jsonl``/``.ndjson`` (one object per line, blank lines ignored),
    ``.jsonl.gz``, ``.json.gz`` and ``.parquet`` (read with pyarrow, which ``datasets`` depends on).
    A path that does not exist and looks like ``org/name`` or ``org/name:split`` is loaded with
    ``datasets.load_dataset(name, split=split)`` (split ``train`` by default).
    """
    source = str(source)
    path = Path(source).expanduser()
    if not path.exists():
        if _HUB_RE.match(source) and not source.lower().endswith(_SUFFIXES):
            return _load_hub(source)
        raise UserError(f"data file not found: {source}")
    if path.is_dir():
        raise UserError(f"{source} is a directory; give a data file ({', '.join(_SUFFIXES)})")
    name = path.name.lower()
    suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise UserError(f"{source}: unknown data file type; use one of {', '.join(_SUFFIXES)}")
    try:
        if suffix == ".parquet":
            rows = _read_parquet(path, source)
        else:
            opener = gzip.open if suffix.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as fh:
                text = fh.read()
            if suffix in (".jsonl", ".jsonl.gz", ".ndjson"):
                rows = _parse_jsonl(text, source)
            else:
                rows = _parse_json(text, source)
    except UserError:
        raise
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: unreadable, not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{source}: unreadable ({_one_line(exc)})") from None
    if not rows:
        raise UserError(f"{source}: no rows")
    return rows


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def _parse_jsonl(text: str, source: str) -> list[dict]:
    rows: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source} line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise UserError(f"{source} line {lineno}: expected a JSON object, got {json_type(row)}")
        rows.append(row)
    return rows


def _parse_json(text: str, source: str) -> list[dict]:
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{source} line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if isinstance(data, dict):
        key = next((k for k in _LIST_KEYS if isinstance(data.get(k), list)), None)
        if key is None:
            raise UserError(
                f"{source}: expected a list of objects, or an object with that list under "
                f"{'/'.join(_LIST_KEYS)}; found an object with keys {sorted(data)[:8]}"
            )
        data = data[key]
    if not isinstance(data, list):
        raise UserError(f"{source}: expected a list of objects, got {json_type(data)}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{source} row {i}: expected a JSON object, got {json_type(row)}")
    return data


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _read_parquet(path: Path, source: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{source}: unreadable parquet ({_one_line(exc)})") from None
    return table.to_pylist()


def _load_hub(source: str) -> list[dict]:
    name, _, split = source.partition(":")
    split = split or "train"
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise UserError(f"{source}: loading hub datasets needs the `datasets` package") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # the hub raises many types: network, auth, missing split, bad config
        raise UserError(
            f"data file not found and could not load hub dataset {name!r} (split {split!r}): {_one_line(exc)}"
        ) from None
    rows = ds.to_list()
    if not rows:
        raise UserError(f"{source}: no rows")
    return rows


