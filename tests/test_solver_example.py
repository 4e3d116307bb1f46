"""examples/solver_reward: the solver evaluator scores through the real `--reward-cmd` path (a process,
via CommandReward), never crashes on garbage, and make_data is deterministic with a held-out set
disjoint from training. Fast: no model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_rlhf.algo.rewards import CommandReward, python_command

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "solver_reward"
EVALUATOR = EXAMPLE / "evaluator.py"
MAKE_DATA = EXAMPLE / "make_data.py"

# what the policy sees, and the evaluator receives: SmolLM2's chat template around the user turn
CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


def chat(text: str) -> str:
    return CHAT.format(text)


STORY = ("Ann had some marbles. Ann gave 7 marbles to a friend and now has 12. How many marbles did Ann have "
         "at first? Write an equation in x.")
SHARE = ("Ben shared some coins equally among 4 friends, and each friend got 6. How many coins did Ben share? "
         "Write an equation in x.")
KEY_ROWS = [{"problem": STORY, "x": 19}, {"problem": SHARE, "x": 24}]

CASES = [  # (prompt, response, score with --partial 0.1)
    (chat(STORY), "x - 7 = 12", 1.0),  # the trained form, right
    (chat(STORY), "x - 7 = 12.\nSo Ann had 19 marbles.", 1.0),
    (chat(STORY), "12 + 7 = x", 1.0),  # any equation with the right solution: the solver does the sums
    (chat(STORY), "x + 7 = 12", 0.1),  # solvable, wrong relation
    (chat(STORY), "x + 7 = 12, or rather x - 7 = 12", 0.1),  # the first equation decides
    (chat(STORY), "19", 0.0),  # a number is not a model of the story
    (chat(STORY), "Let x be the marbles. x - 7 = 12", 1.0),  # words before the equation
    (chat(STORY), "1. x - 7 = 12", 1.0),
    (chat(STORY), "x - 7 = 12 (x = 19)", 1.0),  # a bracket opened in the words after it
    (chat(STORY), "x - 7 = 12. 12 + 7 = 19", 1.0),  # the next sentence is not part of it
    (chat(STORY), "x = 12 + 7 = 19", 1.0),  # a chain: its first link
    (chat(SHARE), "x / 4 = 6", 1.0),
    (chat(SHARE), "4x = 6", 0.1),  # x = 3/2: exact fractions
    (chat(SHARE), "2(x - 12) / 4 = 6", 1.0),  # parentheses, implicit products
    (chat(SHARE), "x * x = 576", 0.0),  # not linear
    (chat(SHARE), "x = x", 0.0),  # no unique solution
    (chat(SHARE), "", 0.0),
    (chat(SHARE), "\x00\ufffd}{ ==== x = = ", 0.0),  # garbage
    (chat("A story the key does not hold."), "x = 5", 0.0),
    (SHARE, "x / 4 = 6", 1.0),  # a plain (not chat-rendered) prompt
    (chat(SHARE), "(" * 3000 + "x" + ")" * 3000 + " = 24", 0.0),  # too deep: 0, no crash
]


def _key(tmp_path) -> Path:
    key = tmp_path / "answers.jsonl"
    key.write_text("".join(json.dumps(r) + "\n" for r in KEY_ROWS))
    return key


def test_evaluator_through_command_reward(tmp_path):
    reward = CommandReward(f"{python_command(EVALUATOR)} --key {_key(tmp_path)} --partial 0.1", timeout=30)
    prompts, responses, expected = zip(*CASES)
    assert reward(list(prompts), list(responses)) == list(expected)


def test_evaluator_default_is_strict(tmp_path):
    reward = CommandReward(f"{python_command(EVALUATOR)} --key {_key(tmp_path)}", timeout=30)
    assert reward([chat(STORY)] * 2, ["x - 7 = 12", "x + 7 = 12"]) == [1.0, 0.0]


def test_evaluator_survives_lines_that_are_not_samples(tmp_path):
    lines = ["not json", "[1, 2]", json.dumps({"prompt": 3, "response": None}), json.dumps({"response": "x = 5"}),
             json.dumps({"prompt": chat(STORY), "response": "x - 7 = 12"}), "{\"prompt\": \"\\ud800\"}"]
    payload = ("\n".join(lines) + "\n").encode() + b"\xff\xfe broken utf-8\n"
    proc = subprocess.run([sys.executable, str(EVALUATOR), "--key", str(_key(tmp_path))], input=payload,
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().split() == ["0", "0", "0", "0", "1", "0", "0"]


def test_evaluator_without_a_readable_key_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(EVALUATOR), "--key", str(tmp_path / "missing.jsonl")], input=b"",
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1 and "cannot read the answer key" in proc.stderr.decode()


FILES = ("sft.jsonl", "prompts.jsonl", "heldout.jsonl", "answers.jsonl")


def _make(tmp: Path, *extra: str) -> dict[str, list[dict]]:
    subprocess.run([sys.executable, str(MAKE_DATA), "--out", str(tmp), *extra], check=True, capture_output=True)
    return {name: [json.loads(line) for line in (tmp / name).read_text().splitlines()] for name in FILES}


def test_make_data_deterministic_heldout_disjoint_and_sft_sees_one_phrasing(tmp_path):
    a = _make(tmp_path / "a")
    _make(tmp_path / "b")
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    held = {r["prompt"] for r in a["heldout.jsonl"]}
    sft = {r["prompt"] for r in a["sft.jsonl"]}
    ppo = {r["prompt"] for r in a["prompts.jsonl"]}
    assert len(held) == len(a["heldout.jsonl"]) >= 64
    assert not held & sft and not held & ppo and not sft & ppo
    # SFT shows the first phrasing of each relation only; PPO and the held-out set have all four
    phrasing = {p["problem"]: (p["kind"], p["phrasing"]) for p in _make_data().family(0)}
    assert {phrasing[p][1] for p in sft} == {0} and len({phrasing[p][0] for p in sft}) == 4
    assert {(r["kind"], r["phrasing"]) for r in a["heldout.jsonl"]} == {(k, i) for k in "add sub mul div".split()
                                                                        for i in range(4)}
    assert {r["phrasing"] for r in a["prompts.jsonl"]} == {0, 1, 2, 3}
    # the held-out set does not depend on how much training data is asked for
    c = _make(tmp_path / "c", "--sft", "20", "--prompts", "20")
    assert [r["prompt"] for r in c["heldout.jsonl"]] == [r["prompt"] for r in a["heldout.jsonl"]]


def _make_data():
    import importlib.util

    spec = importlib.util.spec_from_file_location("solver_make_data", MAKE_DATA)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["sft.jsonl", "prompts.jsonl", "heldout.jsonl"])
def test_make_data_rows_are_read_by_the_project_and_solved_by_the_evaluator(tmp_path, name):
    from lowmem_rlhf import data as D

    made = _make(tmp_path)
    rows, path = made[name], tmp_path / name
    if name == "sft.jsonl":
        examples = D.to_sft(D.load_records(str(path)), str(path))
        answers = [e.response for e in examples]  # the SFT target equations
    else:
        examples = D.to_prompts(D.load_records(str(path)), str(path))
        answers = [f"x = {r['answer']}" for r in rows]
    assert len(examples) == len(rows)
    prompts = [chat(e.prompt[-1]["content"]) for e in examples]
    reward = CommandReward(f"{python_command(EVALUATOR)} --key {tmp_path / 'answers.jsonl'}", timeout=60)
    assert reward(prompts, answers) == [1.0] * len(rows)
    assert reward(prompts, [a.replace("=", "+ 1 =", 1) for a in answers]) == [0.0] * len(rows)
