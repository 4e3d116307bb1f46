"""The embedded demo task: answer simple questions with one word, scored on the *right* answer.

Why this task: a program checks it in microseconds and without doubt, so SFT, the reward model and
PPO can all be scored on held-out prompts; answers are a few tokens, so PPO rollouts are cheap on a
CPU; and SmolLM2-135M-Instruct often knows the answer but says it in a sentence, so there is room
to learn the format *while keeping the knowledge*. SFT trains on general instructions
(self-instruct seed tasks) and a few one-word answers, the reward model learns the checker's
preferences from pairs (right word over wrong word, right word over a sentence) and is scored,
RL (`auto`: GRPO by default, PPO with --algo ppo) optimises the checker, and the policies are
scored on held-out questions never used in training:

* strict: the response is exactly the answer (case, spaces and punctuation ignored);
* lenient: the answer appears as a word in the response (the knowledge is there).

`checker(prompts, responses)` is the reward: 1 strict; partial credit when only lenient, more for
a shorter answer (0.5 for two words, 0.3 for six: `partial`); 0 for a wrong answer however short,
so a one-word guess never beats a sentence with the right word. It is also a valid
`--reward lowmem_rlhf.algo.demo_task:checker`.
"""

from __future__ import annotations

import random
import re

SUFFIX = " Answer with one word."
HELDOUT = 96  # questions never used in training (the split is fixed: seed 0)
SFT_DEMOS = 40  # training questions answered in one word in the demo's SFT data (`sft_rows`)

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Russia": "Moscow", "Greece": "Athens", "Norway": "Oslo", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Peru": "Lima", "Kenya": "Nairobi",
    "Cuba": "Havana", "Sweden": "Stockholm", "Finland": "Helsinki", "Thailand": "Bangkok", "Canada": "Ottawa",
    "China": "Beijing", "England": "London", "Belgium": "Brussels", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Chile": "Santiago", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus",
    "Vietnam": "Hanoi", "Australia": "Canberra", "Switzerland": "Bern", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Venezuela": "Caracas", "Nigeria": "Abuja", "Morocco": "Rabat", "Ghana": "Accra",
    "Indonesia": "Jakarta", "Philippines": "Manila", "Pakistan": "Islamabad", "Afghanistan": "Kabul",
    "Scotland": "Edinburgh", "Wales": "Cardiff", "Iceland": "Reykjavik", "Croatia": "Zagreb", "Serbia": "Belgrade",
    "Lebanon": "Beirut", "Jordan": "Amman", "Qatar": "Doha", "Nepal": "Kathmandu", "Netherlands": "Amsterdam",
}
SOUNDS = {"moo": "cow", "woof": "dog", "meow": "cat", "oink": "pig", "quack": "duck", "baa": "sheep",
          "neigh": "horse", "hiss": "snake", "roar": "lion", "hoot": "owl", "buzz": "bee", "cluck": "hen",
          "ribbit": "frog", "squeak": "mouse", "howl": "wolf", "gobble": "turkey", "coo": "pigeon"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
             "light": "dark", "early": "late", "open": "closed", "wet": "dry", "old": "new", "loud": "quiet",
             "hard": "soft", "full": "empty", "rich": "poor", "true": "false", "tall": "short", "good": "bad",
             "in": "out", "left": "right", "yes": "no", "win": "lose", "thick": "thin", "clean": "dirty",
             "strong": "weak", "push": "pull", "black": "white", "love": "hate", "inside": "outside",
             "above": "below", "first": "last", "buy": "sell", "near": "far", "cheap": "expensive",
             "front": "back", "north": "south", "east": "west", "smooth": "rough", "sweet": "sour"}
COLORS = {"grass": "green", "the sky": "blue", "snow": "white", "coal": "black", "a banana": "yellow",
          "a tomato": "red", "an orange": "orange", "chocolate": "brown", "a lemon": "yellow", "milk": "white",
          "blood": "red", "a carrot": "orange", "a lime": "green", "the sun": "yellow", "a strawberry": "red",
          "an eggplant": "purple", "a flamingo": "pink", "charcoal": "black", "a polar bear": "white"}
PLURALS = {"mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
           "man": "men", "woman": "women", "person": "people", "ox": "oxen", "cat": "cats", "box": "boxes",
           "baby": "babies", "knife": "knives", "leaf": "leaves", "wolf": "wolves", "city": "cities"}
BABIES = {"cat": "kitten", "dog": "puppy", "cow": "calf", "sheep": "lamb", "horse": "foal", "duck": "duckling",
          "frog": "tadpole", "bear": "cub", "kangaroo": "joey", "goose": "gosling", "swan": "cygnet", "pig": "piglet"}
COUNTS = {"days are in a week": 7, "months are in a year": 12, "hours are in a day": 24,
          "minutes are in an hour": 60, "seconds are in a minute": 60, "legs does a spider have": 8,
          "legs does a dog have": 4, "legs does a bird have": 2, "legs does an insect have": 6,
          "sides does a triangle have": 3, "sides does a square have": 4, "sides does a pentagon have": 5,
          "sides does a hexagon have": 6, "sides does an octagon have": 8, "wheels does a bicycle have": 2,
          "days are in a leap year": 366, "players are on a soccer team": 11, "continents are there": 7}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def questions() -> list[tuple[str, str]]:
    """(question, one-word answer) pairs, deterministic order, the suffix appended."""
    qa = []
    qa += [(f"What is the capital of {c}?", a) for c, a in CAPITALS.items()]
    qa += [(f"Which animal says '{s}'?", a) for s, a in SOUNDS.items()]
    qa += [(f"What is the opposite of '{w}'?", a) for w, a in OPPOSITES.items()]
    qa += [(f"What color is {t}?", a) for t, a in COLORS.items()]
    qa += [(f"What is the plural of '{w}'?", a) for w, a in PLURALS.items()]
    qa += [(f"What is a baby {w} called?", a) for w, a in BABIES.items()]
    qa += [(f"How many {w}? Use digits.", str(n)) for w, n in COUNTS.items()]
    qa += [(f"What day comes after {d}?", DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)]
    qa += [(f"What day comes before {d}?", DAYS[(i - 1) % 7]) for i, d in enumerate(DAYS)]
    qa += [(f"What month comes after {m}?", MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]
    qa += [(f"What month comes before {m}?", MONTHS[(i - 1) % 12]) for i, m in enumerate(MONTHS)]
    qa += [(f"What letter comes after '{LETTERS[i]}' in the alphabet?", LETTERS[i + 1]) for i in range(0, 25, 2)]
    qa += [(f"What is {a} plus {b}? Use digits.", str(a + b)) for a in range(1, 6) for b in range(1, 5)]
    qa += [(f"What is {a} times {b}? Use digits.", str(a * b)) for a in range(2, 6) for b in range(2, 5)]
    qa += [(f"What is {a} minus {b}? Use digits.", str(a - b)) for a in range(6, 10) for b in range(1, 4)]
    qa += [(f"How do you write the number {n} in words?", NUMBERS[n]) for n in range(len(NUMBERS))]
    return [(q + SUFFIX, a) for q, a in qa]


def split(seed: int = 0, heldout: int = HELDOUT) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training questions, held-out questions): a fixed shuffle, the first `heldout` held out."""
    qa = questions()
    random.Random(seed).shuffle(qa)
    return qa[heldout:], qa[:heldout]


_WORD = re.compile(r"[a-z0-9][a-z0-9'\-]*")


def words(text: str) -> list[str]:
    """Lower-case words of `text`; punctuation, quotes and spaces dropped (an apostrophe or hyphen
    stays inside a word, as in "don't", and goes at its ends, as in "'cities'")."""
    return [w for w in (m.rstrip("'-") for m in _WORD.findall(text.lower())) if w]


def strict(response: str, answer: str) -> bool:
    """The response is exactly the answer (case, spaces and punctuation ignored)."""
    return words(response) == words(answer)


def lenient(response: str, answer: str) -> bool:
    """The answer appears as a word (or word sequence) in the response."""
    got, want = words(response), words(answer)
    return bool(want) and any(got[i: i + len(want)] == want for i in range(len(got) - len(want) + 1))


def partial(n_words: int) -> float:
    """Credit of an n-word answer (n >= 2) that contains the right one: 0.2 + 0.6 / n, so 0.5 for
    two words, 0.3 for six, above 0.2 always: shorter is better, but only when it is right."""
    return 0.2 + 0.6 / max(n_words, 2)


def score(response: str, answer: str) -> float:
    """1 for exactly the answer, `partial` for a longer response containing it, 0 otherwise."""
    if strict(response, answer):
        return 1.0
    return partial(len(words(response))) if lenient(response, answer) else 0.0


_ANSWERS: dict[str, str] = {}


def answer_of(prompt: str) -> str | None:
    """The expected answer of a demo question found in `prompt` (raw or chat-rendered), else None."""
    if not _ANSWERS:
        _ANSWERS.update(questions())
    for q in sorted((q for q in _ANSWERS if q in prompt), key=len, reverse=True)[:1]:
        return _ANSWERS[q]
    return None


def checker(prompts: list[str], responses: list[str]) -> list[float]:
    """The programmatic reward: `score` of each response against its question's answer; a prompt
    that is not a demo question scores 0."""
    out = []
    for p, r in zip(prompts, responses):
        a = answer_of(p)
        out.append(0.0 if a is None else score(r, a))
    return out


VERBOSE = [
    "The answer is {a}.",
    "I think the answer would be {a}, but let me explain why.",
    "{a}. This is a common question, and the answer is {a}.",
    "Sure! The answer to your question is {a}.",
    "Well, it is {a}, as most people know.",
    "That would be {a}, of course.",
]


def wrong_answer(q: str, a: str, qa: list[tuple[str, str]], rng: random.Random) -> str:
    """A plausible wrong answer: another answer of the same question family when there is one."""
    family = q.split(" ")[:3]
    same = [x for p, x in qa if p.split(" ")[:3] == family and words(x) != words(a)]
    pool = same or [x for _, x in qa if words(x) != words(a)]
    return rng.choice(pool)


def pair_replies(q: str, a: str, qa: list[tuple[str, str]], rng: random.Random) -> tuple[str, str, str]:
    """The replies a question's pairs are made of: a wrong word of its family (`wrong_answer`), a
    sentence carrying the right word, and a sentence carrying the wrong one (2 of the 6 templates)."""
    wrong = wrong_answer(q, a, qa, rng)
    return wrong, rng.choice(VERBOSE).format(a=a), rng.choice(VERBOSE[:2]).format(a=wrong)


def preference_pairs(qa: list[tuple[str, str]], seed: int = 0) -> list[dict]:
    """Pairs that teach the checker's order, three per question: the right word beats a wrong
    word (correctness), beats a sentence carrying it (brevity), and that sentence beats the same
    kind of sentence with a wrong word (correctness again). (Measured: with "that sentence beats a
    wrong word" instead, the 30-step RM learned neither order well, held-out accuracy 0.47 -> 0.60,
    and PPO on it did not learn.)"""
    rng = random.Random(seed)
    pairs = []
    for q, a in qa:
        wrong, sentence, wrong_sentence = pair_replies(q, a, qa, rng)
        pairs += [{"prompt": q, "chosen": a, "rejected": wrong},
                  {"prompt": q, "chosen": a, "rejected": sentence},
                  {"prompt": q, "chosen": sentence, "rejected": wrong_sentence}]
    rng.shuffle(pairs)
    return pairs


def sft_rows(seed: int = 0, demos: int = SFT_DEMOS) -> list[dict]:
    """The demo's SFT data: the 175 self-instruct seed tasks (alpaca fields, the same examples) and
    `demos` training questions answered with the word alone, shuffled. Without the demonstrations
    the SFT policy never samples a right one-word answer (0 of 384 held-out samples at temperature
    0.7), so RL has no such answer to reinforce; with 40 of them, 16 SFT steps leave its greedy
    answers as they were (0/96 exactly right, 39/96 containing the answer) and 48 of 384 samples
    are one word. The held-out questions are never among them."""
    # deferred: the checker (a --reward) imports this module, and this alone reads files
    from lowmem_rlhf.data import bundled_path, load_records

    out = [{"instruction": r["instruction"], "input": i["input"], "output": i["output"]}
           for r in load_records(str(bundled_path("self-instruct-seed-tasks.jsonl"))) for i in r["instances"]]
    train, _ = split(seed)
    rng = random.Random(seed)
    out += [{"instruction": q, "input": "", "output": a} for q, a in rng.sample(train, demos)]
    rng.shuffle(out)
    return out


def rows(seed: int = 0) -> dict[str, list[dict]]:
    """The bundled files' rows: SFT data, PPO prompts, held-out prompts (with answers), preference pairs."""
    train, held = split(seed)
    return {
        "demo-sft.jsonl.gz": sft_rows(seed),
        "demo-prompts.jsonl": [{"prompt": q, "answer": a} for q, a in train],
        "demo-heldout.jsonl": [{"prompt": q, "answer": a} for q, a in held],
        "demo-pairs.jsonl.gz": preference_pairs(train, seed),
    }


__all__ = ["checker", "score", "strict", "lenient", "words", "answer_of", "questions", "split",
           "preference_pairs", "pair_replies", "sft_rows", "rows", "partial", "HELDOUT", "SFT_DEMOS"]
