"""Programmatic rewards: a Python callable or an external evaluator process.

`--reward module:function` (or `path/to/file.py:function`): `function(prompts: list[str],
responses: list[str]) -> list[float]`. `--reward-cmd "..."`: a process that reads one JSON object
per line on stdin (`{"prompt": ..., "response": ...}`) and writes one score per line on stdout,
within `timeout` seconds. A reward that raises, times out, returns the wrong count or a non-finite
number raises `RewardError` naming the offending sample; the PPO step is then skipped, never
trained on.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from lowmem_rlhf.errors import UserError

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class RewardError(RuntimeError):
    """The reward failed for this batch; the message names the sample."""


def load_reward_function(spec: str) -> RewardFn:
    """'module:function' or 'file.py:function' -> the callable (one-line UserError otherwise)."""
    if ":" not in spec:
        raise UserError(f"--reward {spec!r}: expected module:function or path/to/file.py:function")
    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py") or Path(target).exists():
            path = Path(target)
            if not path.exists():
                raise UserError(f"--reward {spec}: file {target} not found")
            mod_spec = importlib.util.spec_from_file_location(f"lowmem_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as e:  # the user's module failed to import: say where
        raise UserError(f"--reward {spec}: importing {target} failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--reward {spec}: {target} has no callable {name!r}")
    return fn


def _sample(prompts: list[str], responses: list[str], i: int) -> str:
    p = prompts[i].replace("\n", " ")[-80:]
    r = responses[i].replace("\n", " ")[:80]
    return f"sample {i} (prompt ...{p!r}, response {r!r}...)"


def check_scores(scores, prompts: list[str], responses: list[str], origin: str) -> list[float]:
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise RewardError(f"{origin} returned non-numbers ({e})") from None
    if len(values) != len(responses):
        raise RewardError(f"{origin} returned {len(values)} scores for {len(responses)} responses")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise RewardError(f"{origin} returned {v} for {_sample(prompts, responses, i)}")
    return values


class FunctionReward:
    def __init__(self, spec: str):
        self.spec = spec
        self.fn = load_reward_function(spec)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        try:
            scores = self.fn(list(prompts), list(responses))
        except Exception as e:  # user code: report, never crash the run
            culprit = _find_culprit(self.fn, prompts, responses)
            raise RewardError(f"--reward {self.spec} raised {type(e).__name__}: {e}{culprit}") from None
        return check_scores(scores, prompts, responses, f"--reward {self.spec}")


def _find_culprit(fn, prompts, responses) -> str:
    """Re-run one sample at a time to name the one that fails (cheap for a checker)."""
    for i in range(len(responses)):
        try:
            fn([prompts[i]], [responses[i]])
        except Exception:
            return f" on {_sample(prompts, responses, i)}"
    return ""


class CommandReward:
    def __init__(self, cmd: str, timeout: float = 60.0):
        self.cmd, self.timeout = cmd, timeout
        self.argv = shlex.split(cmd)
        if not self.argv:
            raise UserError("--reward-cmd is empty")

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        payload = "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in zip(prompts, responses))
        try:
            proc = subprocess.run(self.argv, input=payload, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise RewardError(f"--reward-cmd {self.cmd!r} timed out after {self.timeout:g} s on a batch of "
                              f"{len(responses)} ({_sample(prompts, responses, 0)} first)") from None
        except OSError as e:
            raise UserError(f"--reward-cmd {self.cmd!r}: cannot start it ({e.strerror})") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [""])[-1][:160]
            raise RewardError(f"--reward-cmd {self.cmd!r} exited {proc.returncode}: {last}")
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        return check_scores(lines, prompts, responses, f"--reward-cmd {self.cmd!r}")


def python_command(script: str | Path) -> str:
    """A --reward-cmd running `script` with this interpreter (for tests and the demo)."""
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}"


COMPONENTS = ("reward_model", "reward", "reward_cmd")  # the order of --reward-weights: the flags' names


@dataclass
class RewardSet:
    """The rewards a run adds up, by the flag that named each: "reward_model" (the reward adapter +
    head scores the rollout inside the scoring phase), "reward" (a function) and "reward_cmd" (an
    evaluator process). score = sum of weight x component; each component is kept apart for the log."""

    programs: dict[str, RewardFn] = field(default_factory=dict)  # "reward" / "reward_cmd" -> callable
    learned: bool = False  # the reward model is one of the components
    weights: dict[str, float] = field(default_factory=dict)  # component -> weight (every component named)

    @property
    def names(self) -> list[str]:
        return [c for c in COMPONENTS if c in self.weights]

    def combine(self, parts: dict[str, Any]) -> Any:
        """sum of weight x part over the components (tensors of one shape, or floats)."""
        total = None
        for name in self.names:
            term = self.weights[name] * parts[name]
            total = term if total is None else total + term
        return total


def make_rewards(cfg: Any, stage: str = "PPO") -> RewardSet:
    """The RewardSet of an RL config (its reward_model, reward, reward_cmd, reward_weights, reward_timeout),
    or a one-line UserError: no reward at all, or a weight count that is not one per reward."""
    given = [c for c in COMPONENTS if getattr(cfg, c, None)]
    if not given:
        raise UserError(f"{stage} needs a reward: --reward-model RUN/rm, --reward module:function or --reward-cmd "
                        "\"...\" (several are added, weighted by --reward-weights)")
    weights = cfg.reward_weights
    if weights is None:
        weights = [1.0] * len(given)
    if len(weights) != len(given):
        flags = ", ".join("--" + c.replace("_", "-") for c in given)
        raise UserError(f"--reward-weights gives {len(weights)} weight(s) for {len(given)} reward(s) ({flags}): give "
                        f"one per reward, in that order, e.g. --reward-weights {','.join(['1'] * len(given))}")
    bad = [w for w in weights if not math.isfinite(float(w))]
    if bad:
        raise UserError(f"--reward-weights must be finite numbers, got {bad[0]}")
    programs: dict[str, RewardFn] = {}
    if cfg.reward:
        programs["reward"] = FunctionReward(cfg.reward)
    if cfg.reward_cmd:
        programs["reward_cmd"] = CommandReward(cfg.reward_cmd, cfg.reward_timeout)
    return RewardSet(programs, "reward_model" in given, {c: float(w) for c, w in zip(given, weights)})


def parse_weights(text: str | None) -> list[float] | None:
    """--reward-weights "1,0.5" -> [1.0, 0.5] (one-line UserError for anything else)."""
    if text is None:
        return None
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--reward-weights {text!r}: expected comma-separated numbers, e.g. 1,0.5") from None
    if not out:
        raise UserError(f"--reward-weights {text!r}: expected comma-separated numbers, e.g. 1,0.5")
    return out  # finite or not: make_rewards checks the values (for every caller, not only the CLI)


__all__ = ["RewardError", "FunctionReward", "CommandReward", "load_reward_function", "check_scores",
           "python_command", "RewardSet", "make_rewards", "parse_weights", "COMPONENTS"]
