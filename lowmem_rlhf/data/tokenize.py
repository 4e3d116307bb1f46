"""Tokenization: prompts through the chat template, responses encoded separately and followed by
EOS; labels -100 on prompt positions only (see the package docstring for the contract)."""

from __future__ import annotations

from typing import Any

from lowmem_rlhf.data.formats import Message, PreferencePair, PromptExample, SFTExample
from lowmem_rlhf.errors import UserError

IGNORE_INDEX = -100


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


