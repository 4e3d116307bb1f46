"""Programmatic rewards used by the tests (loaded with --reward tests/assets/rewards.py:NAME)."""

import math
import sys


def ascii_fraction(prompts, responses):
    """Share of ASCII characters among 16 generated tokens: ~0.5 for a random byte-level model."""
    return [sum(1 for c in r if ord(c) < 128) / 16 for r in responses]


def ascii_share(prompts, responses):
    """Share of ASCII characters in each response (0 for an empty one)."""
    return [sum(1 for c in r if ord(c) < 128) / len(r) if r else 0.0 for r in responses]


def raises(prompts, responses):
    """Fails on every sample (not only on non-empty responses: a tiny random model's rollout may
    decode to empty texts only)."""
    raise ValueError("checker crashed")


def nan(prompts, responses):
    return [math.nan] + [0.0] * (len(responses) - 1)


def record_prompts(prompts, responses):
    """ascii_share, and each call's prompts appended as one JSON line to $RECORD_PROMPTS."""
    import json
    import os

    with open(os.environ["RECORD_PROMPTS"], "a", encoding="utf-8") as f:
        f.write(json.dumps(list(prompts)) + "\n")
    return ascii_share(prompts, responses)


def wrong_count(prompts, responses):
    return [1.0]


if __name__ == "__main__":  # the --reward-cmd protocol: JSON lines in, one score per line out
    import json
    import time

    if len(sys.argv) > 1 and sys.argv[1] == "hang":
        time.sleep(600)
    for line in sys.stdin:
        row = json.loads(line)
        if len(sys.argv) > 1 and sys.argv[1] == "inverse":  # 1 - ascii_share: a second, opposed reward
            print(1 - ascii_share([row["prompt"]], [row["response"]])[0])
        else:
            print(sum(1 for c in row["response"] if ord(c) < 128) / 16)
