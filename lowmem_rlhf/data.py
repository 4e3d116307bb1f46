"""Datasets for the three stages: load rows, convert them, tokenize, collate.

Pipeline::

    records = load_records("prefs.jsonl")           # list[dict] from a file or the hub
    pairs = to_pairs(records, "prefs.jsonl")        # -> PreferencePair (reward model)
    examples = to_sft(records, source)              # -> SFTExample (SFT)
    prompts = to_prompts(records, source)           # -> PromptExample (PPO rollouts)
    item = tokenize_sft(example, tokenizer, 512)    # {"input_ids", "labels"} or None
    batch = collate_right([...], pad_id, labels=[...])

Every problem with the user's data raises :class:`~lowmem_rlhf.errors.UserError` with one line that
names the file (and the line or row), the missing field(s) and the formats accepted.

Accepted row formats (detected per row, so a file may mix them):

* **self-instruct / prompt-completion**: ``prompt`` (text or chat messages) + ``completion``;
* **self-instruct seed tasks**: ``instruction`` + ``instances: [{"input", "output"}, ...]``;
* **alpaca**: ``instruction`` + optional ``input`` + ``output``;
* **chat**: ``messages`` (or ShareGPT ``conversations`` with ``from``/``value``);
* **Anthropic hh-rlhf**: ``chosen`` + ``rejected`` full transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``);
* **explicit preference**: ``prompt`` + ``chosen`` + ``rejected``;
* prompts only (PPO): also ``question`` or ``problem`` (e.g. GSM8K / MATH, the answer goes to ``meta``).

Tokenization contract (pitfall 8 of the project notes: SmolLM2's pad id == its EOS id):

* the prompt is rendered to text by the tokenizer's chat template (``tokenize=False``) and encoded
  with ``add_special_tokens=False``, so a BOS the template writes is not doubled; without a chat
  template a plain ``### Instruction: / ### Response:`` layout is used and the tokenizer's BOS is
  prepended only if the tokenizer itself would add one;
* the response is encoded *separately* and followed by ``eos_token_id``.  These are exactly the ids
  the policy sees at generation time (prompt ids, then the tokens it emits, then EOS), so SFT, the
  reward model and PPO all score the same token sequences.  Encoding the concatenated text instead
  can differ only if the last prompt token and the first response token would merge; with SmolLM2's
  template the prompt ends with a lone ``"\\n"`` token after ``<|im_start|>assistant`` and the
  converters strip responses, so the two agree (``tests/test_data.py`` checks this on the bundled
  data);
* labels are ``-100`` on prompt positions only; the final EOS *is* a label (so the model learns to
  stop) and padding is marked by position, never by comparing ids with ``pad_id``;
* :func:`last_token_index` uses the attention mask, never the pad id.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

from lowmem_rlhf.errors import UserError

__all__ = [
    "SFTExample",
    "PreferencePair",
    "PromptExample",
    "BUNDLED_DIR",
    "bundled_path",
    "load_records",
    "to_sft",
    "to_pairs",
    "to_prompts",
    "parse_hh_transcript",
    "render_prompt",
    "tokenize_sft",
    "tokenize_pair",
    "tokenize_prompt",
    "collate_right",
    "collate_left",
    "last_token_index",
    "split_train_eval",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Message = dict[str, str]

#: Folder of the data files shipped inside the package.
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled_data"

IGNORE_INDEX = -100
#: Recognised local file suffixes, longest first.
_SUFFIXES = (".jsonl.gz", ".json.gz", ".ndjson", ".jsonl", ".json", ".parquet")
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.\[\]%:+-]+)?$")
_LIST_KEYS = ("data", "train", "rows")
_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
          "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_HH_SPLIT = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}

_SFT_FORMATS = (
    "prompt+completion (self-instruct)",
    "instruction+instances (self-instruct seed tasks)",
    "instruction+input?+output (alpaca)",
    "messages (chat)",
    "chosen (hh-rlhf transcript)",
    "prompt+chosen",
)
_PAIR_FORMATS = (
    "chosen+rejected (hh-rlhf transcripts or message lists)",
    "prompt+chosen+rejected",
)
_PROMPT_FORMATS = (
    "prompt (text or messages)",
    "instruction+input? (alpaca)",
    "instruction+instances (self-instruct seed tasks)",
    "messages (chat)",
    "question or problem",
    "chosen (hh-rlhf transcript)",
)


# --------------------------------------------------------------------------- examples


@dataclass
class SFTExample:
    """One supervised example: chat messages ending with a user turn, and the target reply."""

    prompt: list[Message]
    response: str


@dataclass
class PreferencePair:
    """A shared prompt (chat messages ending with a user turn) and two replies, chosen preferred."""

    prompt: list[Message]
    chosen: str
    rejected: str


@dataclass
class PromptExample:
    """A PPO prompt (chat messages ending with a user turn); ``meta`` keeps the row's other fields."""

    prompt: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- files


def bundled_path(name: str) -> Path:
    """Path of a data file shipped in ``lowmem_rlhf/bundled_data`` (UserError if there is none)."""
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
            raise UserError(f"{source} line {lineno}: expected a JSON object, got {_json_type(row)}")
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
        raise UserError(f"{source}: expected a list of objects, got {_json_type(data)}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise UserError(f"{source} row {i}: expected a JSON object, got {_json_type(row)}")
    return data


def _json_type(value: Any) -> str:
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


# --------------------------------------------------------------------------- row parsing


def parse_hh_transcript(text: str) -> list[Message] | None:
    """Split an hh-rlhf transcript ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` into chat messages.

    Contents are stripped.  Consecutive turns of the same role are merged (joined with a blank
    line): that happens when a model wrote ``"\\n\\nAssistant:"`` inside its own reply, and merging
    keeps the chosen and rejected prompts identical in those rows.  Returns None when the text has
    no ``Human:``/``Assistant:`` turns or non-blank text before the first one.
    """
    parts = _HH_SPLIT.split(text if text.startswith("\n\n") else "\n\n" + text)
    if len(parts) < 3 or parts[0].strip():
        return None
    turns: list[Message] = []
    for i in range(1, len(parts), 2):
        role, content = _HH_ROLE[parts[i]], parts[i + 1].strip()
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] = "\n\n".join(c for c in (turns[-1]["content"], content) if c)
        else:
            turns.append({"role": role, "content": content})
    return turns


def _where(source: str, index: int) -> str:
    return f"{source} row {index}"


def _messages(value: Any, source: str, index: int, field_name: str) -> list[Message]:
    """Normalise a list of chat messages ({role, content} or ShareGPT {from, value})."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{_where(source, index)}: field {field_name!r} must be a non-empty list of messages")
    out: list[Message] = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise UserError(f"{_where(source, index)}: {field_name}[{j}] is not an object with role and content")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        mapped = _ROLES.get(str(role).lower()) if isinstance(role, str) else None
        if mapped is None or not isinstance(content, str):
            raise UserError(
                f"{_where(source, index)}: {field_name}[{j}] needs 'role' (system/user/assistant) and "
                f"string 'content', got keys {sorted(msg)}"
            )
        out.append({"role": mapped, "content": content})
    return out


def _text_or_messages(value: Any, source: str, index: int, field_name: str) -> list[Message]:
    """A prompt given as plain text (one user turn) or as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value.strip()}]
    return _messages(value, source, index, field_name)


def _reply_text(value: Any, source: str, index: int, field_name: str) -> str:
    """A reply given as text or as messages (the last assistant message, or all of them joined)."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, source, index, field_name)
    assistant = [m["content"] for m in msgs if m["role"] == "assistant"]
    if not assistant:
        raise UserError(f"{_where(source, index)}: field {field_name!r} has no assistant message")
    return assistant[-1]


def _str_field(row: dict, key: str, source: str, index: int) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{_where(source, index)}: field {key!r} must be a string, got {_json_type(value)}")
    return value


def _instruction_text(instruction: str, extra: str) -> str:
    instruction, extra = instruction.strip(), extra.strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def _ends_with_user(messages: list[Message]) -> bool:
    return bool(messages) and messages[-1]["role"] == "user" and bool(messages[-1]["content"].strip())


def _split_last_assistant(messages: list[Message]) -> tuple[list[Message], str] | None:
    """(everything before the last assistant message, its text); None without one."""
    for k in range(len(messages) - 1, -1, -1):
        if messages[k]["role"] == "assistant":
            return messages[:k], messages[k]["content"]
    return None


def _no_format(row: dict, source: str, index: int, formats: Iterable[tuple[str, tuple[str, ...]]],
               accepted: Sequence[str]) -> UserError:
    """The UserError for a row that fits no format: names the missing fields of the closest one."""
    keys = set(row)
    scored = [(sum(1 for f in req if f in keys), name, [f for f in req if f not in keys]) for name, req in formats]
    best_hits = max((s[0] for s in scored), default=0)
    closest = [(name, missing) for hits, name, missing in scored if hits == best_hits and hits > 0]
    found = ", ".join(sorted(map(str, keys))[:10]) or "none"
    if closest:
        options = " or ".join(f"{', '.join(missing)} ({name})" for name, missing in closest)
        what = f"missing field(s) {options} (fields: {found})"
    else:
        what = f"none of the known fields (fields: {found})"
    return UserError(f"{_where(source, index)}: {what}; accepted formats: {'; '.join(accepted)}")


def _skip_summary(counts: Counter) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def _finish(items: list[T], counts: Counter, source: str, total: int, kind: str) -> list[T]:
    if not items:
        detail = _skip_summary(counts) or "no rows"
        raise UserError(f"no usable {kind} in {source}: of {total} rows, {detail}")
    if counts:
        log.warning("%s: skipped %d of %d rows (%s)", source, sum(counts.values()), total, _skip_summary(counts))
    return items


# --------------------------------------------------------------------------- converters


def to_sft(records: Sequence[dict], source: str) -> list[SFTExample]:
    """Convert rows to :class:`SFTExample` (formats in the module docstring).

    * ``prompt`` + ``completion``: completion stripped, a trailing ``<|endoftext|>`` (the
      self-instruct GPT-3 fine-tuning files) removed;
    * ``instruction`` + ``instances``: one example per instance, a non-empty ``input`` appended
      to the instruction after a blank line;
    * ``instruction`` + ``input`` + ``output`` (alpaca): same layout;
    * ``messages``: the last assistant message is the response, everything before it (a system
      message included) the prompt;
    * ``chosen`` (hh-rlhf transcript, or with ``prompt``): the chosen conversation.

    Rows with an empty response or a prompt that does not end with a user turn are skipped (and
    logged); a row that fits no format raises UserError, as does a file with no usable example.
    """
    formats = (
        ("prompt+completion", ("prompt", "completion")),
        ("instruction+instances", ("instruction", "instances")),
        ("alpaca", ("instruction", "output")),
        ("messages", ("messages",)),
        ("hh-rlhf", ("chosen",)),
    )
    out: list[SFTExample] = []
    skipped: Counter = Counter()

    def add(prompt: list[Message], response: str) -> None:
        response = response.strip()
        if not response:
            skipped["had an empty response"] += 1
        elif not _ends_with_user(prompt):
            skipped["had a prompt not ending with a user turn"] += 1
        else:
            out.append(SFTExample(prompt=prompt, response=response))

    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise UserError(f"{_where(source, i)}: expected an object, got {_json_type(row)}")
        if "messages" in row or "conversations" in row:
            key = "messages" if "messages" in row else "conversations"
            split = _split_last_assistant(_messages(row[key], source, i, key))
            if split is None:
                skipped["had no assistant message"] += 1
            else:
                add(*split)
        elif "prompt" in row and "completion" in row:
            completion = _reply_text(row["completion"], source, i, "completion").strip()
            completion = completion.removesuffix("<|endoftext|>")
            add(_text_or_messages(row["prompt"], source, i, "prompt"), completion)
        elif "instruction" in row and "instances" in row:
            instruction = _str_field(row, "instruction", source, i)
            instances = row["instances"]
            if not isinstance(instances, list):
                raise UserError(f"{_where(source, i)}: field 'instances' must be a list of {{input, output}}")
            for j, inst in enumerate(instances):
                if not isinstance(inst, dict) or "output" not in inst:
                    raise UserError(f"{_where(source, i)}: instances[{j}] is missing field 'output'")
                text = _instruction_text(instruction, _str_field(inst, "input", source, i))
                add([{"role": "user", "content": text}], _str_field(inst, "output", source, i))
        elif "instruction" in row and "output" in row:
            text = _instruction_text(_str_field(row, "instruction", source, i), _str_field(row, "input", source, i))
            add([{"role": "user", "content": text}], _str_field(row, "output", source, i))
        elif "prompt" in row and "chosen" in row:
            add(_text_or_messages(row["prompt"], source, i, "prompt"), _reply_text(row["chosen"], source, i, "chosen"))
        elif "chosen" in row:
            turns = _conversation(row["chosen"], source, i, "chosen")
            split = _split_last_assistant(turns) if turns else None
            if split is None:
                skipped["had no hh-rlhf Human/Assistant turns in 'chosen'"] += 1
            else:
                add(*split)
        else:
            raise _no_format(row, source, i, formats, _SFT_FORMATS)
    return _finish(out, skipped, source, len(records), "SFT examples")


def _conversation(value: Any, source: str, index: int, field_name: str) -> list[Message] | None:
    """A whole conversation: an hh-rlhf transcript string or a list of messages."""
    if isinstance(value, str):
        return parse_hh_transcript(value)
    return _messages(value, source, index, field_name)


def to_pairs(records: Sequence[dict], source: str) -> list[PreferencePair]:
    """Convert rows to :class:`PreferencePair`.

    * Anthropic hh-rlhf (``chosen`` and ``rejected`` full transcripts, or full message lists,
      and no ``prompt``): both are parsed into turns (:func:`parse_hh_transcript`).  When both
      share every turn but the final assistant one, that shared part is the prompt and the two
      final assistant turns are chosen/rejected.  When the transcripts differ earlier, the prompt
      is their longest common prefix of turns, shortened to end with a user turn, and chosen /
      rejected are the assistant turns right after it (the first point where the two replies
      differ; later turns are dropped, since they answer different contexts).
    * explicit: ``prompt`` (text or messages) + ``chosen`` + ``rejected`` (text, or messages of
      which the last assistant one is used).

    Skipped and counted (logged): pairs whose chosen == rejected after stripping, rows whose final
    turn is empty, transcripts without a user turn followed by an assistant turn.  If no pair is
    left, UserError ``no usable pairs in FILE: ...`` gives the counts.  A row with neither layout
    raises UserError naming the missing field(s).
    """
    formats = (("hh-rlhf", ("chosen", "rejected")), ("explicit", ("prompt", "chosen", "rejected")))
    out: list[PreferencePair] = []
    skipped: Counter = Counter()
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise UserError(f"{_where(source, i)}: expected an object, got {_json_type(row)}")
        if "chosen" not in row or "rejected" not in row:
            raise _no_format(row, source, i, formats, _PAIR_FORMATS)
        if "prompt" in row and row["prompt"] is not None:
            prompt = _text_or_messages(row["prompt"], source, i, "prompt")
            chosen = _reply_text(row["chosen"], source, i, "chosen").strip()
            rejected = _reply_text(row["rejected"], source, i, "rejected").strip()
        else:
            parsed = _split_pair(row, source, i)
            if isinstance(parsed, str):
                skipped[parsed] += 1
                continue
            prompt, chosen, rejected = parsed
        if not _ends_with_user(prompt):
            skipped["had a prompt not ending with a user turn"] += 1
        elif not chosen or not rejected:
            skipped["had an empty final turn"] += 1
        elif chosen == rejected:
            skipped["had identical chosen and rejected"] += 1
        else:
            out.append(PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected))
    return _finish(out, skipped, source, len(records), "pairs")


def _split_pair(row: dict, source: str, index: int) -> tuple[list[Message], str, str] | str:
    """(prompt, chosen, rejected) from two full conversations, or the reason the row is skipped."""
    conv_c = _conversation(row["chosen"], source, index, "chosen")
    conv_r = _conversation(row["rejected"], source, index, "rejected")
    if conv_c is None or conv_r is None:
        return "had chosen/rejected that are not hh-rlhf transcripts ('\\n\\nHuman:' turns) and no 'prompt'"
    if not conv_c or not conv_r or conv_c[-1]["role"] != "assistant" or conv_r[-1]["role"] != "assistant":
        return "had a transcript not ending with an assistant turn"
    if conv_c[:-1] == conv_r[:-1]:
        return conv_c[:-1], conv_c[-1]["content"].strip(), conv_r[-1]["content"].strip()
    k = 0
    while k < min(len(conv_c), len(conv_r)) and conv_c[k] == conv_r[k]:
        k += 1
    while k > 0 and conv_c[k - 1]["role"] != "user":
        k -= 1
    if k == 0 or k >= len(conv_c) or k >= len(conv_r):
        return "had transcripts with no shared prompt"
    if conv_c[k]["role"] != "assistant" or conv_r[k]["role"] != "assistant":
        return "had transcripts with no shared prompt"
    return conv_c[:k], conv_c[k]["content"].strip(), conv_r[k]["content"].strip()


def to_prompts(records: Sequence[dict], source: str) -> list[PromptExample]:
    """Convert rows to :class:`PromptExample` for PPO rollouts.

    Prompt from ``prompt`` (text or messages), ``messages`` (a final assistant turn dropped),
    ``instruction`` (+ ``input``), ``instruction`` + ``instances`` (one prompt per instance, its
    ``output`` in meta), ``question``/``problem``, or an hh-rlhf ``chosen`` transcript (the turns
    before its final assistant turn).  Every other field of the row goes into ``meta`` unchanged
    (e.g. ``answer`` for a checker).  Rows whose prompt does not end with a non-empty user turn
    are skipped (logged).
    """
    formats = (
        ("prompt", ("prompt",)),
        ("alpaca", ("instruction",)),
        ("messages", ("messages",)),
        ("question", ("question",)),
        ("hh-rlhf", ("chosen",)),
    )
    out: list[PromptExample] = []
    skipped: Counter = Counter()

    def add(prompt: list[Message] | None, meta: dict[str, Any]) -> None:
        if prompt is None or not _ends_with_user(prompt):
            skipped["had no prompt ending with a user turn"] += 1
        else:
            out.append(PromptExample(prompt=prompt, meta=meta))

    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise UserError(f"{_where(source, i)}: expected an object, got {_json_type(row)}")
        if "prompt" in row and row["prompt"] is not None:
            add(_text_or_messages(row["prompt"], source, i, "prompt"), _without(row, "prompt"))
        elif "messages" in row or "conversations" in row:
            key = "messages" if "messages" in row else "conversations"
            msgs = _messages(row[key], source, i, key)
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            add(msgs, _without(row, key))
        elif "instruction" in row and isinstance(row.get("instances"), list):
            instruction = _str_field(row, "instruction", source, i)
            base = _without(row, "instruction", "instances")
            for j, inst in enumerate(row["instances"]):
                if not isinstance(inst, dict):
                    raise UserError(f"{_where(source, i)}: instances[{j}] is not an object with input/output")
                text = _instruction_text(instruction, _str_field(inst, "input", source, i))
                meta = {**base, **{k: v for k, v in inst.items() if k != "input"}}
                add([{"role": "user", "content": text}], meta)
        elif "instruction" in row:
            text = _instruction_text(_str_field(row, "instruction", source, i), _str_field(row, "input", source, i))
            add([{"role": "user", "content": text}], _without(row, "instruction", "input"))
        elif "question" in row or "problem" in row:
            key = "question" if "question" in row else "problem"
            add([{"role": "user", "content": _str_field(row, key, source, i).strip()}], _without(row, key))
        elif "chosen" in row:
            turns = _conversation(row["chosen"], source, i, "chosen")
            if turns and turns[-1]["role"] == "assistant":
                turns = turns[:-1]
            add(turns, _without(row, "chosen"))
        else:
            raise _no_format(row, source, i, formats, _PROMPT_FORMATS)
    return _finish(out, skipped, source, len(records), "prompts")


def _without(row: dict, *keys: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in keys}


# --------------------------------------------------------------------------- tokenization


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: list[Message]) -> str:
    """The prompt text the model continues from.

    With a chat template: ``apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)``.  Without one, a plain layout::

        {system text}

        ### Instruction:
        {user text}            (several turns: "User: ...\\n\\nAssistant: ...\\n\\nUser: ...")

        ### Response:
    """
    if _has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):  # some versions return a list for batched input
            text = text[0]
        return text
    system = "\n\n".join(m["content"].strip() for m in messages if m["role"] == "system" and m["content"].strip())
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        body = turns[0]["content"].strip()
    else:
        body = "\n\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content'].strip()}" for m in turns)
    head = f"{system}\n\n" if system else ""
    return f"{head}### Instruction:\n{body}\n\n### Response:\n"


def _adds_bos(tokenizer: Any) -> bool:
    """True if the tokenizer itself puts its BOS in front of encoded text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer.encode("a", add_special_tokens=True)
    return bool(with_special) and with_special[0] == bos and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos]


def _prompt_ids(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Prompt token ids, with exactly one BOS where the model expects one."""
    ids = list(tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False))
    if not _has_chat_template(tokenizer) and _adds_bos(tokenizer) and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def _response_ids(tokenizer: Any, response: str) -> list[int]:
    """Response ids followed by EOS (the model must learn to stop)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token so the model can learn to stop")
    return list(tokenizer.encode(response, add_special_tokens=False)) + [int(eos)]


def _min_prompt_tokens(max_len: int) -> int:
    """Prompt tokens kept at least when truncating: max(8, max_len // 4), leaving >= 1 response token."""
    return min(max(8, max_len // 4), max_len - 1)


def _check_max_len(max_len: int) -> None:
    if max_len < 2:
        raise UserError(f"max_len must be at least 2 tokens, got {max_len}")


def _fit(prompt: list[int], longest_response: int, max_len: int) -> list[int]:
    """The prompt's kept tail: cut from the left only as far as the longest response needs,
    and never below ``_min_prompt_tokens(max_len)`` (or the whole prompt if it is shorter)."""
    keep = max(max_len - longest_response, min(len(prompt), _min_prompt_tokens(max_len)))
    keep = min(keep, len(prompt), max_len - 1)
    return prompt[len(prompt) - keep:] if keep > 0 else []


def tokenize_sft(ex: SFTExample, tokenizer: Any, max_len: int) -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` for completion-only SFT, or None if nothing is left to learn.

    ``input_ids`` = prompt ids + response ids + EOS; ``labels`` = -100 on every prompt position,
    the ids themselves on the response and the EOS.  Truncation, when the total exceeds
    ``max_len``: first the prompt is cut from the left, but keeps at least
    ``max(8, max_len // 4)`` tokens (the last ~5 tokens of a chat prompt are template, so a
    shorter prompt would leave the reply without its question); then the response is cut at its
    end (the EOS is then gone: the example teaches continuing, not stopping).  Returns None when
    the response is empty (no response token would be learnt).
    """
    _check_max_len(max_len)
    if not ex.response.strip():
        return None
    prompt = _prompt_ids(tokenizer, ex.prompt)
    response = _response_ids(tokenizer, ex.response)
    prompt = _fit(prompt, len(response), max_len)
    response = response[: max_len - len(prompt)]
    if not response:
        return None
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def tokenize_pair(pair: PreferencePair, tokenizer: Any, max_len: int) -> dict[str, Any] | None:
    """``{"chosen_ids", "rejected_ids", "prompt_len"}`` for the reward model, or None.

    Both sequences are the same prompt ids followed by their response ids + EOS, truncated with
    :func:`tokenize_sft`'s rule, the prompt cut once for the longer response.  None when a
    response is empty or the two truncated sequences are identical (no preference signal left).
    """
    _check_max_len(max_len)
    if not pair.chosen.strip() or not pair.rejected.strip():
        return None
    prompt = _prompt_ids(tokenizer, pair.prompt)
    chosen = _response_ids(tokenizer, pair.chosen)
    rejected = _response_ids(tokenizer, pair.rejected)
    prompt = _fit(prompt, max(len(chosen), len(rejected)), max_len)
    room = max_len - len(prompt)
    chosen, rejected = chosen[:room], rejected[:room]
    if not chosen or not rejected or chosen == rejected:
        return None
    return {"chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected, "prompt_len": len(prompt)}


def tokenize_prompt(ex: PromptExample, tokenizer: Any, max_len: int) -> list[int]:
    """Prompt ids for generation (ends with the assistant header), cut from the left to ``max_len``."""
    if max_len < 1:
        raise UserError(f"max prompt length must be at least 1 token, got {max_len}")
    ids = _prompt_ids(tokenizer, ex.prompt)
    return ids[-max_len:]


# --------------------------------------------------------------------------- collation


def _as_lists(seqs: Sequence[Sequence[int]], what: str) -> list[list[int]]:
    if len(seqs) == 0:
        raise ValueError(f"{what}: empty batch")
    return [[int(t) for t in s] for s in seqs]


def collate_right(seqs: Sequence[Sequence[int]], pad_id: int,
                  labels: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Right-pad a batch for training: ``input_ids``, ``attention_mask`` and ``labels`` (long tensors).

    Padding positions get ``pad_id`` in ``input_ids``, 0 in the mask and -100 in ``labels``,
    decided by position (a real EOS equal to ``pad_id`` stays a label).  Without ``labels`` the
    labels are the input ids with -100 on padding.
    """
    import torch

    rows = _as_lists(seqs, "collate_right")
    lab_rows = rows if labels is None else _as_lists(labels, "collate_right labels")
    if len(lab_rows) != len(rows) or any(len(a) != len(b) for a, b in zip(rows, lab_rows)):
        raise ValueError("collate_right: labels must match the sequences in number and length")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    out_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, (row, lab) in enumerate(zip(rows, lab_rows)):
        n = len(row)
        if n:
            input_ids[b, :n] = torch.tensor(row, dtype=torch.long)
            attention[b, :n] = 1
            out_labels[b, :n] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": out_labels}


def collate_left(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, Any]:
    """Left-pad a batch of prompts for ``generate``: ``input_ids`` and ``attention_mask``."""
    import torch

    rows = _as_lists(seqs, "collate_left")
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        if n:
            input_ids[b, width - n:] = torch.tensor(row, dtype=torch.long)
            attention[b, width - n:] = 1
    return {"input_ids": input_ids, "attention_mask": attention}


def last_token_index(attention_mask: Any) -> Any:
    """Index of the last real token of each row (LongTensor ``[batch]``), from the mask alone.

    Works for right padding (and left padding, and masks with holes); never looks at token ids,
    so it is right when the pad id equals EOS (SmolLM2).  Raises ValueError for a row without
    any real token.
    """
    import torch

    mask = torch.as_tensor(attention_mask)
    if mask.dim() != 2:
        raise ValueError(f"last_token_index: expected a [batch, seq] mask, got shape {tuple(mask.shape)}")
    real = mask != 0
    if not bool(real.any(dim=1).all()):
        raise ValueError("last_token_index: a row has no real token (attention mask all zero)")
    width = mask.shape[1]
    return (width - 1 - real.flip(dims=[1]).long().argmax(dim=1)).long()


# --------------------------------------------------------------------------- splitting


class EpochSampler:
    """Draws rows without replacement, reshuffling (seeded) when an epoch runs out."""

    def __init__(self, n: int, seed: int = 0):
        import torch

        self.n = n
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def draw(self, k: int) -> list[int]:
        import torch

        out = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self.order.pop())
        return out

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.order = list(state["order"])


def split_train_eval(items: Sequence[T], eval_fraction: float = 0.1, seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministic split: the same items, fraction and seed always give the same two lists.

    ``round(len * eval_fraction)`` items go to eval (at least 1 when the fraction is > 0 and there
    are >= 2 items; train always keeps at least 1).  Both lists keep the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(items)
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, max(0, n - 1))
    chosen = set(random.Random(seed).sample(range(n), n_eval)) if n_eval else set()
    train = [x for i, x in enumerate(items) if i not in chosen]
    evals = [x for i, x in enumerate(items) if i in chosen]
    return train, evals
