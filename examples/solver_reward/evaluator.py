#!/usr/bin/env python3
"""A solver-based evaluator for word problems, speaking lowmem-rlhf's `--reward-cmd` protocol.

    python examples/solver_reward/evaluator.py --key answers.jsonl < samples.jsonl > scores.txt

stdin: one JSON object per line, ``{"prompt": ..., "response": ...}``; stdout: one score per line,
in order. Standard library only.

The policy's answer is a model of the story: one linear equation in x. For each sample it
1. finds the story in the prompt (the last user turn; the prompt arrives rendered by the chat
   template, ``<|im_start|>user ... <|im_end|>`` included) and looks its answer up in the key
   (``--key``: JSON lines of ``problem`` and ``x``, written by make_data.py),
2. takes the first equation of the response: in its first clause that holds a ``=``, the
   numbers, x, operators and parentheses just left and right of it,
3. solves it exactly: both sides are parsed as linear expressions in x (numbers, + - * /,
   parentheses, ``3x``, ``2(x - 1)``) with `fractions.Fraction`, so ``x = -b/a`` is exact,
4. scores 1.0 when that solution is the key's answer, `--partial` (default 0.0) when the response
   is a solvable equation with another solution, and 0.0 otherwise.

Any equation with the right solution scores 1 (``x + 7 = 19`` and ``19 - 7 = x`` alike); the
arithmetic is the solver's. A line it cannot use (not JSON, a story not in the key, no equation,
not linear, no unique solution) scores 0.0; it never crashes and writes one line per non-blank
input line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from fractions import Fraction
from pathlib import Path

# --------------------------------------------------------------------------- the solver

_USER_TURN = re.compile(r"<\|im_start\|>\s*user\s*\n?(.*?)(?:<\|im_end\|>|$)", re.DOTALL)
_TRANSLATE = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00d7": "*", "\u00b7": "*", "\u22c5": "*",
                            "\u00f7": "/", "\u2044": "/"})


class NotLinear(ValueError):
    pass


class _Lin:
    """coef * var + const, exact."""

    __slots__ = ("coef", "const")

    def __init__(self, coef: Fraction, const: Fraction):
        self.coef, self.const = coef, const

    def __add__(self, o: "_Lin") -> "_Lin":
        return _Lin(self.coef + o.coef, self.const + o.const)

    def __neg__(self) -> "_Lin":
        return _Lin(-self.coef, -self.const)

    def __mul__(self, o: "_Lin") -> "_Lin":
        if self.coef and o.coef:
            raise NotLinear("x * x")
        return _Lin(self.coef * o.const + o.coef * self.const, self.const * o.const)

    def __truediv__(self, o: "_Lin") -> "_Lin":
        if o.coef or not o.const:
            raise NotLinear("division by x or by zero")
        return _Lin(self.coef / o.const, self.const / o.const)


_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|([A-Za-z])|(\S))")


def _tokens(text: str, var: str) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            break
        num, letter, op = m.groups()
        if num is not None:
            out.append(("num", Fraction(num)))
        elif letter is not None:
            if letter.lower() != var.lower():
                raise NotLinear(f"unknown name {letter!r}")
            out.append(("var", None))
        elif op in "+-*/()":
            out.append(("op", op))
        else:
            raise NotLinear(f"unexpected {op!r}")
        pos = m.end()
    return out


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/'|implicit) unary)* ;
    unary := ('+'|'-') unary | atom ; atom := number | var | '(' expr ')'"""

    def __init__(self, tokens):
        self.t, self.i = tokens, 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else ("end", None)

    def take(self):
        tok = self.peek()
        self.i += 1
        return tok

    def expr(self) -> _Lin:
        v = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            sign = self.take()[1]
            w = self.term()
            v = v + (w if sign == "+" else -w)
        return v

    def term(self) -> _Lin:
        v = self.unary()
        while True:
            kind, val = self.peek()
            if (kind, val) in (("op", "*"), ("op", "/")):
                self.take()
                w = self.unary()
                v = v * w if val == "*" else v / w
            elif kind in ("num", "var") or (kind, val) == ("op", "("):  # implicit: 3x, 2(x+1), x(3)
                v = v * self.unary()
            else:
                return v

    def unary(self) -> _Lin:
        kind, val = self.peek()
        if (kind, val) in (("op", "+"), ("op", "-")):
            self.take()
            v = self.unary()
            return -v if val == "-" else v
        return self.atom()

    def atom(self) -> _Lin:
        kind, val = self.take()
        if kind == "num":
            return _Lin(Fraction(0), val)
        if kind == "var":
            return _Lin(Fraction(1), Fraction(0))
        if (kind, val) == ("op", "("):
            v = self.expr()
            if self.take() != ("op", ")"):
                raise NotLinear("unbalanced parentheses")
            return v
        raise NotLinear(f"unexpected {val!r}")


def _linear(text: str, var: str) -> _Lin:
    p = _Parser(_tokens(text, var))
    v = p.expr()
    if p.peek()[0] != "end":
        raise NotLinear("trailing text")
    return v


def solve_equation(equation: str, var: str = "x") -> Fraction:
    """The unique solution of a linear equation 'lhs = rhs' in `var` (NotLinear otherwise)."""
    equation = equation.translate(_TRANSLATE).strip().rstrip(".?!").strip()
    if equation.count("=") != 1:
        raise NotLinear("not one '='")
    lhs, rhs = equation.split("=")
    d = _linear(lhs, var) + -_linear(rhs, var)
    if d.coef == 0:
        raise NotLinear("no unique solution")
    return -d.const / d.coef



# --------------------------------------------------------------------------- scoring


def user_text(prompt: str) -> str:
    """The last user turn of a chat-rendered prompt (the prompt itself when it is plain text)."""
    turns = _USER_TURN.findall(prompt)
    return (turns[-1] if turns else prompt).strip()


_PIECES = re.compile(r"\n|[,;:?!]|\.(?!\d)")  # sentence and clause breaks (a decimal point is not one)
_MATH_TAIL = re.compile(r"[0-9.xX()+\-*/ \t]*$")
_MATH_HEAD = re.compile(r"[0-9.xX()+\-*/ \t]*")


def _unmatched_cut(text: str, opening: str, closing: str) -> str:
    """`text` up to its first bracket that is never closed (read in the direction of the pair)."""
    depth, cut = [], len(text)
    for i, ch in enumerate(text):
        if ch == opening:
            depth.append(i)
        elif ch == closing:
            if not depth:
                return text[:i]
            depth.pop()
    return text[:depth[0]] if depth else text[:cut]


def first_equation(response: str) -> str | None:
    """The response's first equation: in its first clause holding a '=', the math just left and
    right of the first '=' ('Let x be the marbles. x - 7 = 12 (x = 19)' -> 'x - 7 = 12'); a
    bracket opened or closed outside that stretch belongs to the words around it."""
    for piece in _PIECES.split(response.translate(_TRANSLATE)):
        if "=" not in piece:
            continue
        left, right = piece.split("=", 1)
        lhs = _unmatched_cut(_MATH_TAIL.search(left).group(0)[::-1], ")", "(")[::-1].strip()
        rhs = _unmatched_cut(_MATH_HEAD.match(right).group(0), "(", ")").strip()
        return f"{lhs} = {rhs}" if lhs and rhs else None
    return None


def response_solution(response: str) -> Fraction | None:
    """The solution of the response's first equation in x, or None: no equation, not linear, no
    unique solution. The first equation decides: no hunting for a later one that happens to be right."""
    equation = first_equation(response)
    if equation is None:
        return None
    try:
        return solve_equation(equation, "x")
    except (NotLinear, ZeroDivisionError, ValueError, RecursionError):
        return None


def read_key(path: str | Path) -> dict[str, Fraction]:
    """problem text -> answer, from JSON lines with ``problem`` and ``x``."""
    key = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                key[row["problem"].strip()] = Fraction(str(row["x"]))
    return key


def score_one(key: dict[str, Fraction], prompt, response, partial: float = 0.0) -> float:
    """1.0 right, `partial` for a solvable equation with another solution, 0.0 otherwise; never raises."""
    try:
        if not isinstance(prompt, str) or not isinstance(response, str):
            return 0.0
        answer = key.get(user_text(prompt))
        if answer is None:
            return 0.0
        solution = response_solution(response)
        if solution is None:
            return 0.0
        return 1.0 if solution == answer else partial
    except Exception:  # noqa: BLE001 - garbage in, 0 out
        return 0.0


# --------------------------------------------------------------------------- the process


def _score_line(key: dict[str, Fraction], line: str, partial: float) -> float:
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return 0.0
    if not isinstance(row, dict):
        return 0.0
    return score_one(key, row.get("prompt"), row.get("response"), partial)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Score word-problem equations with a solver: JSON lines in, one "
                                             "score per line out.")
    ap.add_argument("--key", required=True, help="answer key: JSON lines with 'problem' and 'x' (make_data.py)")
    ap.add_argument("--partial", type=float, default=0.0,
                    help="score of a solvable equation whose solution is wrong [default: 0.0]")
    args = ap.parse_args(argv)
    try:
        key = read_key(args.key)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"evaluator: cannot read the answer key {args.key}: {e}", file=sys.stderr)
        return 2
    out = sys.stdout
    for raw in sys.stdin.buffer:
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            value = _score_line(key, line, args.partial)
        except Exception:  # noqa: BLE001 - belt and braces: one line per sample, always
            value = 0.0
        out.write(f"{value:g}\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
