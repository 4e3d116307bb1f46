"""Rows to examples: the accepted formats (self-instruct, alpaca, chat messages, hh-rlhf, explicit
preference pairs, prompts) detected per row, converted to SFTExample / PreferencePair /
PromptExample. Unusable rows are skipped and counted; a file with none is a one-line UserError."""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence, TypeVar

from lowmem_rlhf.data.io import json_type
from lowmem_rlhf.errors import UserError

log = logging.getLogger(__name__)

T = TypeVar("T")
Message = dict[str, str]

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
        raise UserError(f"{_where(source, index)}: field {key!r} must be a string, got {json_type(value)}")
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
            raise UserError(f"{_where(source, i)}: expected an object, got {json_type(row)}")
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
            raise UserError(f"{_where(source, i)}: expected an object, got {json_type(row)}")
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
            raise UserError(f"{_where(source, i)}: expected an object, got {json_type(row)}")
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


