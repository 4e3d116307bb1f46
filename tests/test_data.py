"""lowmem_rlhf.data on real files (the bundled ones and small files written here) and the real
SmolLM2 tokenizer, whose pad id (2, ``<|im_end|>``) equals its EOS id: pitfall 8 of the notes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from lowmem_rlhf.data import (
    BUNDLED_DIR,
    PreferencePair,
    PromptExample,
    SFTExample,
    bundled_path,
    collate_left,
    collate_right,
    last_token_index,
    load_records,
    parse_hh_transcript,
    render_prompt,
    split_train_eval,
    to_pairs,
    to_prompts,
    to_sft,
    tokenize_pair,
    tokenize_prompt,
    tokenize_sft,
)
from lowmem_rlhf.errors import UserError

HH = "hh-rlhf-harmless-base-test-600.jsonl.gz"
SEED = "self-instruct-seed-tasks.jsonl"


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def tok(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def tok_plain(smollm2):
    """The same tokenizer without a chat template (the fallback path)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(smollm2)
    t.chat_template = None
    return t


@pytest.fixture(scope="module")
def hh_rows():
    return load_records(str(bundled_path(HH)))


@pytest.fixture(scope="module")
def seed_rows():
    return load_records(str(bundled_path(SEED)))


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def user_error(fn, *args) -> str:
    with pytest.raises(UserError) as info:
        fn(*args)
    msg = str(info.value)
    assert "\n" not in msg, f"UserError must be one line: {msg!r}"
    return msg


def hh(*turns: str) -> str:
    """An hh-rlhf transcript from alternating Human/Assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# --------------------------------------------------------------------------- loading


def test_bundled_files_load_and_stay_small(hh_rows, seed_rows):
    assert len(hh_rows) == 600 and set(hh_rows[0]) == {"chosen", "rejected"}
    assert len(seed_rows) == 175 and {"instruction", "instances"} <= set(seed_rows[0])
    for name in ("README.md", "LICENSE.hh-rlhf", "LICENSE.self-instruct"):
        assert bundled_path(name).is_file()
    total = sum(p.stat().st_size for p in BUNDLED_DIR.iterdir() if p.is_file())
    assert total < 400_000
    assert "no bundled data file" in user_error(bundled_path, "nope.jsonl")


def test_json_layouts(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "data.json").write_text(json.dumps({"data": rows, "version": 1}))
    (tmp_path / "rows.json").write_text(json.dumps({"rows": rows}))
    with gzip.open(tmp_path / "z.json.gz", "wt", encoding="utf-8") as fh:
        json.dump({"train": rows}, fh)
    with gzip.open(tmp_path / "z.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    for name in ("list.json", "data.json", "rows.json", "z.json.gz", "z.jsonl.gz"):
        assert load_records(str(tmp_path / name)) == rows, name


def test_parquet_round_trip(tmp_path):
    import datasets

    rows = [{"instruction": "Add.", "input": "2 + 2", "output": "4"},
            {"instruction": "Greet.", "input": "", "output": "Hello!"}]
    path = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    assert load_records(str(path)) == rows
    examples = to_sft(load_records(str(path)), str(path))
    assert [e.response for e in examples] == ["4", "Hello!"]


def test_load_errors(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    msg = user_error(load_records, missing)
    assert missing in msg and "not found" in msg
    # looks like org/name but ends like a file: a missing file, not a hub dataset
    assert "data file not found: data/train.jsonl" in user_error(load_records, "data/train.jsonl")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n{"prompt": "c"}\n')
    msg = user_error(load_records, str(bad))
    assert str(bad) in msg and "line 2" in msg and "malformed JSON" in msg

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n {"a": 1},\n {"a": }\n]')
    msg = user_error(load_records, str(bad_json))
    assert str(bad_json) in msg and "line 3" in msg

    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")):
        p = tmp_path / name
        p.write_text(text)
        msg = user_error(load_records, str(p))
        assert str(p) in msg and "no rows" in msg

    not_objects = tmp_path / "ints.jsonl"
    not_objects.write_text("1\n2\n")
    assert "line 1: expected a JSON object" in user_error(load_records, str(not_objects))
    scalar = tmp_path / "scalar.json"
    scalar.write_text('"hello"')
    assert "expected a list of objects" in user_error(load_records, str(scalar))
    keyed = tmp_path / "keyed.json"
    keyed.write_text('{"items": []}')
    assert "data/train/rows" in user_error(load_records, str(keyed))

    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00garbage")
    assert "unreadable" in user_error(load_records, str(corrupt))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9"}\n')
    assert "not UTF-8" in user_error(load_records, str(latin))
    odd = tmp_path / "rows.csv"
    odd.write_text("a,b\n")
    assert "unknown data file type" in user_error(load_records, str(odd))


def test_hub_name_goes_to_datasets_and_fails_cleanly():
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        pytest.skip("hub not in offline mode: the test must not reach the network")
    msg = user_error(load_records, "no-such-org-xyz/no-such-dataset:test")
    assert "hub dataset 'no-such-org-xyz/no-such-dataset'" in msg and "split 'test'" in msg


# --------------------------------------------------------------------------- formats


def test_sft_self_instruct_prompt_completion():
    rows = [{"prompt": "Name a color.\n\nOutput:", "completion": " Blue.<|endoftext|>"},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
             "completion": "Hello."}]
    a, b = to_sft(rows, "f.jsonl")
    assert a == SFTExample([{"role": "user", "content": "Name a color.\n\nOutput:"}], "Blue.")
    assert b.prompt[0] == {"role": "system", "content": "Be brief."} and b.response == "Hello."


def test_sft_seed_tasks_one_example_per_instance(seed_rows):
    examples = to_sft(seed_rows, SEED)
    assert len(examples) == sum(len(r["instances"]) for r in seed_rows)
    first = seed_rows[0]  # empty input: the instruction alone
    assert examples[0].prompt == [{"role": "user", "content": first["instruction"].strip()}]
    assert examples[0].response == first["instances"][0]["output"].strip()
    second = seed_rows[1]  # non-empty input: appended after a blank line
    assert examples[1].prompt[0]["content"] == f"{second['instruction']}\n\n{second['instances'][0]['input']}"
    rows = [{"instruction": "Translate.", "instances": [{"input": "uno", "output": "one"},
                                                        {"input": "dos", "output": "two"}]}]
    assert [e.response for e in to_sft(rows, "t.jsonl")] == ["one", "two"]


def test_sft_alpaca_and_messages():
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}]},
        {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Hello"}]},
    ]
    alp, plain, chat, share = to_sft(rows, "mix.jsonl")
    assert alp.prompt == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}] and alp.response == "5"
    assert plain.prompt == [{"role": "user", "content": "Say hi."}]
    assert chat.response == "12" and chat.prompt[0]["role"] == "system" and len(chat.prompt) == 4
    assert chat.prompt[-1] == {"role": "user", "content": "times 3?"}
    assert share == SFTExample([{"role": "user", "content": "Hey"}], "Hello")


def test_sft_from_hh_uses_chosen(hh_rows):
    examples = to_sft(hh_rows, HH)
    assert len(examples) == 598  # rows 86 and 516 have an empty final chosen turn
    assert examples[0].response.startswith("No, sorry!")
    assert all(e.prompt[-1]["role"] == "user" for e in examples)


def test_sft_row_without_known_fields():
    msg = user_error(to_sft, [{"instruction": "x"}], "rows.jsonl")
    assert "rows.jsonl row 0" in msg and "output" in msg and "instances" in msg
    assert "alpaca" in msg and "messages (chat)" in msg and "prompt+completion" in msg
    msg = user_error(to_sft, [{"prompt": "x", "completion": "y"}, {"text": "z"}], "rows.jsonl")
    assert "row 1" in msg and "none of the known fields" in msg and "text" in msg
    msg = user_error(to_sft, [{"instruction": "x", "output": " "}], "e.jsonl")
    assert "no usable SFT examples in e.jsonl" in msg and "empty response" in msg


def test_parse_hh_transcript_merges_inline_turns():
    turns = parse_hh_transcript("\n\nHuman: hi\n\nAssistant: a\n\nAssistant: b")
    assert turns == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\n\nb"}]
    assert parse_hh_transcript("no markers here") is None
    assert parse_hh_transcript("preamble\n\nHuman: hi") is None


def test_pairs_from_hh(hh_rows):
    pairs = to_pairs(hh_rows, HH)
    assert len(pairs) == 598
    for p in pairs:
        assert p.prompt[-1]["role"] == "user" and p.prompt[-1]["content"]
        assert p.chosen and p.rejected and p.chosen.strip() != p.rejected.strip()
        assert all(m["role"] in ("user", "assistant") for m in p.prompt)
    first = pairs[0]
    assert first.prompt[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert first.prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert first.chosen.startswith("No, sorry!") and first.rejected.startswith("There are lots of funny things")
    # the chosen/rejected transcripts are exactly prompt + final turn
    assert parse_hh_transcript(hh_rows[0]["chosen"]) == first.prompt + [{"role": "assistant", "content": first.chosen}]


def test_pairs_with_differing_prefixes():
    # a reply that wrote "Human: ... Assistant:" itself: merged, the prompts then agree
    inline = {"chosen": hh("q1", "a1", "q2", "good") + "\n\nAssistant: more",
              "rejected": hh("q1", "a1", "q2", "bad")}
    # transcripts that differ at an earlier assistant turn: longest common prefix ending with a user turn
    early = {"chosen": hh("q1", "x1", "q2", "x2"), "rejected": hh("q1", "y1", "q2", "y2")}
    p_inline, p_early = to_pairs([inline, early], "d.jsonl")
    assert p_inline.prompt[-1]["content"] == "q2" and len(p_inline.prompt) == 3
    assert (p_inline.chosen, p_inline.rejected) == ("good\n\nmore", "bad")
    assert p_early.prompt == [{"role": "user", "content": "q1"}] and (p_early.chosen, p_early.rejected) == ("x1", "y1")


def test_pairs_explicit_layout():
    rows = [{"prompt": "Capital of France?", "chosen": " Paris.", "rejected": "Lyon."},
            {"prompt": [{"role": "user", "content": "2+2?"}],
             "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}]
    a, b = to_pairs(rows, "p.json")
    assert a == PreferencePair([{"role": "user", "content": "Capital of France?"}], "Paris.", "Lyon.")
    assert (b.chosen, b.rejected) == ("4", "5")


def test_pairs_errors():
    same = [{"chosen": hh("q", "same answer"), "rejected": hh("q", "same answer ")},
            {"prompt": "q", "chosen": "x", "rejected": " x"}]
    msg = user_error(to_pairs, same, "same.jsonl")
    assert msg.startswith("no usable pairs in same.jsonl") and "2 had identical chosen and rejected" in msg
    empty = [{"chosen": hh("q", ""), "rejected": hh("q", "a")}, {"chosen": hh("q", "a"), "rejected": hh("q", "a")}]
    msg = user_error(to_pairs, empty, "e.jsonl")
    assert "1 had an empty final turn" in msg and "1 had identical chosen and rejected" in msg
    msg = user_error(to_pairs, [{"prompt": "q", "chosen": "a"}], "m.jsonl")
    assert "m.jsonl row 0" in msg and "rejected" in msg and "prompt+chosen+rejected" in msg
    msg = user_error(to_pairs, [{"chosen": "plain text", "rejected": "other text"}], "n.jsonl")
    assert "not hh-rlhf transcripts" in msg
    # one good row is enough: the bad ones are skipped
    ok = to_pairs(same + [{"prompt": "q", "chosen": "a", "rejected": "b"}], "mixed.jsonl")
    assert len(ok) == 1


def test_prompts(hh_rows, seed_rows):
    prompts = to_prompts(hh_rows, HH)
    assert len(prompts) == 600
    assert all(p.prompt[-1]["role"] == "user" for p in prompts)
    assert prompts[0].prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert "rejected" in prompts[0].meta and "chosen" not in prompts[0].meta

    seed = to_prompts(seed_rows, SEED)
    assert len(seed) == sum(len(r["instances"]) for r in seed_rows)
    assert seed[0].meta["output"] == seed_rows[0]["instances"][0]["output"] and seed[0].meta["id"] == "seed_task_0"

    rows = [
        {"prompt": "Solve 2+2", "answer": "4"},
        {"instruction": "Add.", "input": "1 1", "output": "2"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "id": 7},
        {"question": "What is 3*3?", "answer": "#### 9"},
    ]
    p, alp, msgs, q = to_prompts(rows, "p.jsonl")
    assert p == PromptExample([{"role": "user", "content": "Solve 2+2"}], {"answer": "4"})
    assert alp.prompt[0]["content"] == "Add.\n\n1 1" and alp.meta == {"output": "2"}
    assert msgs.prompt == [{"role": "user", "content": "Hi"}] and msgs.meta == {"id": 7}
    assert q.meta == {"answer": "#### 9"}
    msg = user_error(to_prompts, [{"answer": "4"}], "p.jsonl")
    assert "p.jsonl row 0" in msg and "question or problem" in msg


# --------------------------------------------------------------------------- tokenization


def test_chat_template_vs_fallback(tok, tok_plain):
    msgs = [{"role": "user", "content": "Hi there"}]
    chat = render_prompt(tok, msgs)
    assert chat.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert chat.startswith("<|im_start|>system\n")  # SmolLM2's template adds a default system turn
    plain = render_prompt(tok_plain, msgs)
    assert plain == "### Instruction:\nHi there\n\n### Response:\n"
    multi = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"},
             {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_prompt(tok_plain, multi) == (
        "Be kind.\n\n### Instruction:\nUser: a\n\nAssistant: b\n\nUser: c\n\n### Response:\n")
    # the fallback adds no BOS: SmolLM2's tokenizer does not add one itself
    ids = tokenize_prompt(PromptExample(msgs), tok_plain, 512)
    assert ids == tok_plain.encode(plain, add_special_tokens=False)
    item = tokenize_sft(SFTExample(msgs, "Hello!"), tok_plain, 512)
    assert item["input_ids"][-1] == tok_plain.eos_token_id and item["labels"][-1] == tok_plain.eos_token_id


def test_template_bos_is_not_doubled(smollm2):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(smollm2)
    t.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant: {% endif %}")
    ids = tokenize_prompt(PromptExample([{"role": "user", "content": "hi"}]), t, 512)
    assert ids[0] == t.bos_token_id and ids[1] != t.bos_token_id and ids.count(t.bos_token_id) == 1


def test_completion_only_labels_keep_eos_equal_to_pad(tok):
    assert tok.pad_token_id == tok.eos_token_id == 2  # the pitfall this guards against
    ex = SFTExample([{"role": "user", "content": "Name a fruit."}], "An apple.")
    item = tokenize_sft(ex, tok, 512)
    prompt_ids = tok.encode(render_prompt(tok, ex.prompt), add_special_tokens=False)
    response_ids = tok.encode("An apple.", add_special_tokens=False)
    n = len(prompt_ids)
    assert item["input_ids"] == prompt_ids + response_ids + [2]
    assert item["labels"][:n] == [-100] * n
    assert item["labels"][n:] == response_ids + [2]
    assert 2 in prompt_ids  # the prompt's own <|im_end|> tokens are not labels
    # collated, padded with pad id 2: the real EOS stays a label, only padding is -100
    short = tokenize_sft(SFTExample([{"role": "user", "content": "Hi"}], "Yo"), tok, 512)
    batch = collate_right([item["input_ids"], short["input_ids"]], tok.pad_token_id,
                          labels=[item["labels"], short["labels"]])
    length = len(short["input_ids"])
    assert batch["labels"][1, length - 1].item() == 2 and batch["input_ids"][1, length - 1].item() == 2
    assert (batch["labels"][1, length:] == -100).all() and (batch["input_ids"][1, length:] == 2).all()
    assert batch["labels"][0, -1].item() == 2


def test_separate_tokenization_matches_joined_text(tok, hh_rows, seed_rows):
    examples = to_sft(seed_rows, SEED)[:60] + to_sft(hh_rows, HH)[:60]
    for ex in examples:
        text = render_prompt(tok, ex.prompt)
        item = tokenize_sft(ex, tok, 100_000)
        assert item["input_ids"][:-1] == tok.encode(text + ex.response, add_special_tokens=False)
        assert tok.decode([t for t in item["labels"] if t != -100][:-1]) == ex.response


@pytest.mark.parametrize("max_len", [2, 9, 32, 64, 200])
def test_truncation_bounds(tok, hh_rows, max_len):
    examples = to_sft(hh_rows, HH)[:40] + [SFTExample([{"role": "user", "content": "long " * 300}], "ok " * 300)]
    for ex in examples:
        full_prompt = tok.encode(render_prompt(tok, ex.prompt), add_special_tokens=False)
        full_resp = tok.encode(ex.response, add_special_tokens=False) + [tok.eos_token_id]
        item = tokenize_sft(ex, tok, max_len)
        assert item is not None
        ids, labels = item["input_ids"], item["labels"]
        assert len(ids) == len(labels) <= max_len
        n_prompt = labels.index(next(t for t in labels if t != -100))
        assert all(t == -100 for t in labels[:n_prompt]) and all(t != -100 for t in labels[n_prompt:])
        assert len(labels) - n_prompt >= 1
        prompt, resp = ids[:n_prompt], ids[n_prompt:]
        assert prompt == full_prompt[len(full_prompt) - n_prompt:]  # cut from the left
        assert resp == full_resp[: len(resp)]  # cut at the end
        if len(full_prompt) + len(full_resp) <= max_len:
            assert ids == full_prompt + full_resp
        elif max_len >= 2 and len(full_prompt) > n_prompt:
            assert n_prompt >= min(len(full_prompt), max(8, max_len // 4), max_len - 1)
    assert tokenize_sft(SFTExample([{"role": "user", "content": "q"}], "   "), tok, 64) is None
    with pytest.raises(UserError):
        tokenize_sft(examples[0], tok, 1)


def test_tokenize_pair(tok, hh_rows):
    pairs = to_pairs(hh_rows[:30], HH)
    for max_len in (24, 96, 4096):
        for pair in pairs:
            item = tokenize_pair(pair, tok, max_len)
            if item is None:
                continue
            c, r, n = item["chosen_ids"], item["rejected_ids"], item["prompt_len"]
            assert len(c) <= max_len and len(r) <= max_len and 0 < n < min(len(c), len(r))
            assert c[:n] == r[:n] and c != r
    item = tokenize_pair(pairs[0], tok, 4096)
    prompt_ids = tok.encode(render_prompt(tok, pairs[0].prompt), add_special_tokens=False)
    assert item["prompt_len"] == len(prompt_ids) and item["chosen_ids"][:len(prompt_ids)] == prompt_ids
    assert item["chosen_ids"][-1] == item["rejected_ids"][-1] == tok.eos_token_id
    # identical after truncation: no preference signal left
    same_start = PreferencePair([{"role": "user", "content": "q"}], "same words " * 50 + "A", "same words " * 50 + "B")
    assert tokenize_pair(same_start, tok, 40) is None
    assert tokenize_pair(same_start, tok, 4096) is not None


def test_tokenize_prompt_cuts_from_left(tok):
    ex = PromptExample([{"role": "user", "content": "word " * 200}])
    full = tokenize_prompt(ex, tok, 100_000)
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert full[-len(header):] == header
    assert tokenize_prompt(ex, tok, 16) == full[-16:]


# --------------------------------------------------------------------------- collation


def test_last_token_index_with_pad_equal_to_eos(tok):
    seqs = [tokenize_sft(SFTExample([{"role": "user", "content": q}], a), tok, 512)["input_ids"]
            for q, a in (("Hi", "Hello there, friend."), ("What is two plus two?", "4"), ("Ok", "Sure"))]
    batch = collate_right(seqs, tok.pad_token_id)
    idx = last_token_index(batch["attention_mask"])
    assert idx.dtype == torch.long and idx.tolist() == [len(s) - 1 for s in seqs]
    assert (batch["input_ids"][torch.arange(3), idx] == tok.eos_token_id).all()
    # the pitfall: searching for the pad id finds the end of the system turn instead
    naive = [(row == tok.pad_token_id).nonzero()[0].item() - 1 for row in batch["input_ids"]]
    assert naive != idx.tolist()
    left = collate_left(seqs, tok.pad_token_id)
    assert (last_token_index(left["attention_mask"]) == left["input_ids"].shape[1] - 1).all()
    with pytest.raises(ValueError):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_collate_shapes():
    seqs = [[5, 6, 7], [8], [9, 10]]
    right = collate_right(seqs, pad_id=0, labels=[[-100, 6, 7], [8], [-100, 10]])
    assert {k: tuple(v.shape) for k, v in right.items()} == {k: (3, 3) for k in ("input_ids", "attention_mask", "labels")}
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 10, -100]]
    assert collate_right(seqs, pad_id=8)["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [9, 10, -100]]
    left = collate_left(seqs, pad_id=0)
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert all(t.dtype == torch.long for t in (*right.values(), *left.values()))
    with pytest.raises(ValueError):
        collate_right(seqs, 0, labels=[[1], [2], [3]])


def test_split_is_deterministic():
    items = list(range(100))
    train, evals = split_train_eval(items, 0.1, seed=0)
    assert (train, evals) == split_train_eval(items, 0.1, seed=0)
    assert len(evals) == 10 and sorted(train + evals) == items and not set(train) & set(evals)
    assert train == sorted(train) and evals == sorted(evals)
    assert split_train_eval(items, 0.1, seed=1)[1] != evals
    assert split_train_eval(items, 0.0) == (items, [])
    assert [len(x) for x in split_train_eval([1, 2], 0.01)] == [1, 1]
    assert split_train_eval([1], 0.5) == ([1], [])
    with pytest.raises(UserError):
        split_train_eval(items, 1.0)
