"""The embedded demo task: scored on the right answer, held-out questions never trained on."""

from __future__ import annotations

import json

from lowmem_rlhf.algo import demo_task as T
from lowmem_rlhf.data import bundled_path, load_records


def test_reward_is_the_right_answer_with_partial_credit():
    rendered = "<|im_start|>user\nWhich animal says 'oink'? Answer with one word.<|im_end|>\n<|im_start|>assistant\n"
    assert T.checker([rendered] * 6, ["Pig.", " pig ", "A pig.", "It is a pig, of course.", "Lion", "Piglet"]) == \
        [1.0, 1.0, 0.5, T.partial(6), 0.0, 0.0]
    assert 0.2 < T.partial(50) < T.partial(6) < T.partial(2) == 0.5
    assert T.checker(["not a demo question"], ["pig"]) == [0.0]
    assert T.strict("Twelve!", "twelve") and not T.strict("twelve apples", "twelve")
    assert T.lenient("twelve apples", "twelve") and not T.lenient("twelves", "twelve")


def test_quotes_around_an_answer_are_punctuation():
    """The SFT policy often quotes the answer ("The plural of 'city' is 'cities'."): a quote is not
    part of the word (this was scored wrong, 0, for 5 of the 96 held-out answers), while a quote or
    hyphen inside a word still is."""
    assert T.lenient("The plural of 'city' is 'cities'.", "cities")
    assert T.strict("'no'", "no") and T.strict("'cities'.", "cities") and T.strict("-sell-", "sell")
    assert T.words("don't re-enter 'x'") == ["don't", "re-enter", "x"]
    assert not T.strict("dont", "don't")


def test_the_bundled_files_are_the_generated_split():
    """The shipped files are what `scripts/make_demo_data.py` writes (deterministic), the held-out
    questions (at least 64) never appear in the PPO prompts or the RM pairs."""
    for name, rows in T.rows().items():
        assert load_records(str(bundled_path(name))) == json.loads(json.dumps(rows)), name
    held = {r["prompt"] for r in load_records(str(bundled_path("demo-heldout.jsonl")))}
    train = {r["prompt"] for r in load_records(str(bundled_path("demo-prompts.jsonl")))}
    pairs = load_records(str(bundled_path("demo-pairs.jsonl.gz")))
    sft = {r["instruction"] for r in load_records(str(bundled_path("demo-sft.jsonl.gz")))}
    assert len(held) >= 64 and not held & train and not held & {p["prompt"] for p in pairs} and not held & sft
    assert len(held) + len(train) == len(T.questions())


def test_the_demo_sft_set_is_the_seed_tasks_and_one_word_answers_to_training_questions():
    """The same 175 examples as the self-instruct seed tasks, plus SFT_DEMOS training questions
    answered with the word alone (nothing else in their reply)."""
    from lowmem_rlhf.data import to_sft

    seed = to_sft(load_records(str(bundled_path("self-instruct-seed-tasks.jsonl"))), "seed")
    got = to_sft(load_records(str(bundled_path("demo-sft.jsonl.gz"))), "demo-sft")
    key = lambda e: (tuple((m["role"], m["content"]) for m in e.prompt), e.response)  # noqa: E731
    seed_keys = {key(x) for x in seed}
    demos = [e for e in got if key(e) not in seed_keys]
    assert len(got) == len(seed) + T.SFT_DEMOS and len(demos) == T.SFT_DEMOS
    answers = dict(T.split()[0])
    for e in demos:
        question = e.prompt[-1]["content"]
        assert question in answers and e.response == answers[question]


def test_pairs_teach_correctness_and_brevity():
    """For each training question: right word > wrong word, right word > a sentence carrying it,
    that sentence > a sentence with a wrong word; the checker agrees with every pair."""
    train, _ = T.split()
    pairs = T.preference_pairs(train)
    assert len(pairs) == 3 * len(train)
    for p in pairs:
        chosen, rejected = T.checker([p["prompt"]], [p["chosen"]])[0], T.checker([p["prompt"]], [p["rejected"]])[0]
        assert chosen > rejected, p
    kinds = {(T.checker([p["prompt"]], [p["chosen"]])[0], T.checker([p["prompt"]], [p["rejected"]])[0]) for p in pairs}
    # (right word, wrong word), (right word, sentence with it), (that sentence, sentence with a wrong word)
    assert {(c == 1.0, r == 0.0) for c, r in kinds} == {(True, True), (True, False), (False, True)}
