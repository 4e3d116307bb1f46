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

Tokenization contract (docs/pitfalls.md #8: SmolLM2's pad id == its EOS id):

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

from lowmem_rlhf.data.collate import (
                                      EpochSampler,
                                      collate_left,
                                      collate_right,
                                      last_token_index,
                                      split_train_eval,
)
from lowmem_rlhf.data.formats import (
                                      Message,
                                      PreferencePair,
                                      PromptExample,
                                      SFTExample,
                                      parse_hh_transcript,
                                      to_pairs,
                                      to_prompts,
                                      to_sft,
)
from lowmem_rlhf.data.io import BUNDLED_DIR, bundled_path, load_records
from lowmem_rlhf.data.tokenize import (
                                      IGNORE_INDEX,
                                      render_prompt,
                                      tokenize_pair,
                                      tokenize_prompt,
                                      tokenize_sft,
)

__all__ = [
    "SFTExample", "PreferencePair", "PromptExample", "Message", "BUNDLED_DIR", "IGNORE_INDEX", "bundled_path",
    "load_records", "to_sft", "to_pairs", "to_prompts", "parse_hh_transcript", "render_prompt", "tokenize_sft",
    "tokenize_pair", "tokenize_prompt", "collate_right", "collate_left", "last_token_index", "EpochSampler",
    "split_train_eval",
]
