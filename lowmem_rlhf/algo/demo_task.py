"""The embedded demo task: answer simple questions with one word, checked by a program.

Why this task: a program checks it in microseconds and without doubt, so SFT, the reward model and
PPO can all be scored on held-out prompts; answers are a few tokens, so PPO rollouts are cheap on a
CPU; and SmolLM2-135M-Instruct answers in sentences by default (about 1 in 8 sampled answers is one
word), so there is room to learn. SFT trains on general instructions (self-instruct seed tasks),
the reward model learns the checker's preference from pairs derived from the checker, and PPO
optimises that reward.

`checker(prompts, responses)` is also a valid `--reward lowmem_rlhf.algo.demo_task:checker`.
"""

from __future__ import annotations

import random
import re

SUFFIX = " Answer with one word."

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Russia": "Moscow", "Greece": "Athens", "Norway": "Oslo", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Peru": "Lima", "Kenya": "Nairobi",
    "Cuba": "Havana", "Sweden": "Stockholm", "Finland": "Helsinki", "Thailand": "Bangkok", "Canada": "Ottawa",
}
SOUNDS = {"moo": "cow", "woof": "dog", "meow": "cat", "oink": "pig", "quack": "duck", "baa": "sheep",
          "neigh": "horse", "hiss": "snake", "roar": "lion", "hoot": "owl", "buzz": "bee", "cluck": "hen"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
             "light": "dark", "early": "late", "open": "closed", "wet": "dry", "old": "new", "loud": "quiet",
             "hard": "soft", "full": "empty", "rich": "poor", "true": "false"}
COLORS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
          "a tomato": "red", "an orange": "orange", "chocolate": "brown", "a lemon": "yellow", "milk": "white",
          "blood": "red", "a carrot": "orange"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def questions() -> list[tuple[str, str]]:
    """(question, one-word answer) pairs, deterministic order."""
    qa = []
    qa += [(f"What is the capital of {c}?", a) for c, a in CAPITALS.items()]
    qa += [(f"Which animal says '{s}'?", a) for s, a in SOUNDS.items()]
    qa += [(f"What is the opposite of '{w}'?", a) for w, a in OPPOSITES.items()]
    qa += [(f"What color is {t}?", a) for t, a in COLORS.items()]
    qa += [(f"What day comes after {d}?", DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    qa += [(f"What month comes after {m}?", MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]
    qa += [(f"What is {a} plus {b}? Use digits.", str(a + b)) for a in range(1, 5) for b in range(1, 4)]
    qa += [(f"How do you write the number {n} in words?", NUMBERS[n]) for n in range(11)]
    return [(q + SUFFIX, a) for q, a in qa]


def split(seed: int = 0, heldout: int = 32) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    qa = questions()
    random.Random(seed).shuffle(qa)
    return qa[heldout:], qa[:heldout]


_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*")


def one_word_score(response: str) -> float:
    """1.0 for exactly one word (trailing punctuation allowed), 1/n for n words, 0 for none."""
    words = _WORD.findall(response.strip())
    if not words:
        return 0.0
    return 1.0 / len(words)


def checker(prompts: list[str], responses: list[str]) -> list[float]:
    """The programmatic reward: one-word score of each response."""
    return [one_word_score(r) for r in responses]


VERBOSE = [
    "The answer is {a}.",
    "I think the answer would be {a}, but let me explain why.",
    "{a}. This is a common question, and the answer is {a}.",
    "Sure! The answer to your question is {a}.",
    "Well, it is {a}, as most people know.",
    "That would be {a}, of course.",
]


def preference_pairs(qa: list[tuple[str, str]], seed: int = 0) -> list[dict]:
    """Pairs derived from the checker: the one-word answer beats a sentence with the same answer."""
    rng = random.Random(seed)
    return [{"prompt": q, "chosen": a, "rejected": rng.choice(VERBOSE).format(a=a)} for q, a in qa]


def rows(seed: int = 0) -> dict[str, list[dict]]:
    """The bundled files' rows: PPO prompts, held-out prompts (with answers), preference pairs."""
    train, held = split(seed)
    return {
        "demo-prompts.jsonl": [{"prompt": q, "answer": a} for q, a in train],
        "demo-heldout.jsonl": [{"prompt": q, "answer": a} for q, a in held],
        "demo-pairs.jsonl": preference_pairs(train, seed),
    }


__all__ = ["checker", "one_word_score", "questions", "split", "preference_pairs", "rows"]
