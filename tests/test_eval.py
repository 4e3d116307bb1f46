"""`lowmem-rlhf eval` on a tiny finished run (SFT -> PPO of a byte-level Llama, built once for the
module): one row per prompt, a summary consistent with the rows, greedy answers that repeat, K
samples, an evaluator process, adapter folders as policies, and one-line errors for bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lowmem_rlhf.algo.rewards import load_reward_function, python_command
from lowmem_rlhf.cli import main
from lowmem_rlhf.config import load_profile
from lowmem_rlhf.data import bundled_path
from lowmem_rlhf.stages.evaluate import pass_stats, prompts_stem, wilson_interval

ASSETS = Path(__file__).parent / "assets"
REWARDS = ASSETS / "rewards.py"
ascii_share = load_reward_function(f"{REWARDS}:ascii_share")  # what --reward loads
ascii_fraction = load_reward_function(f"{REWARDS}:ascii_fraction")  # what the script's __main__ prints

N_PROMPTS = 5


def cli(*argv) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run: SFT (1 step) then PPO (1 iteration) on a byte-vocabulary Llama, fp32 LoRA."""
    from lowmem_rlhf.model.random_models import save_random, tiny_llama_config
    from lowmem_rlhf.stages.ppo import PPOConfig, run_ppo
    from lowmem_rlhf.stages.sft import SFTConfig, run_sft

    root = tmp_path_factory.mktemp("eval")
    cfg = tiny_llama_config()
    cfg.vocab_size = 260  # the byte tokenizer's: every sample decodes to text
    cfg.initializer_range = 0.2
    model = save_random(cfg, root / "model")
    prof = replace(load_profile("lora-bf16-shared"), dtype="fp32", lora_r=8, micro_batch=4, learning_rate=1e-2,
                   lora_dropout=0.0, grad_ckpt=False)
    run = root / "run"
    sft_data = root / "sft.jsonl"  # a few rows: the held-out loss SFT computes stays cheap
    sft_data.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"], "completion": json.loads(line)["answer"]})
                                + "\n" for line in bundled_path("demo-prompts.jsonl").read_text().splitlines()[:10]))
    run_sft(SFTConfig(model=str(model), data=str(sft_data), out=run,
                      profile=prof, max_len=48, batch=4, max_steps=1, progress=False))
    run_ppo(PPOConfig(model=str(model), prompts=str(bundled_path("demo-prompts.jsonl")), out=run, profile=prof,
                      sft=run / "sft", reward=f"{REWARDS}:ascii_share", iterations=1, rollout_batch=2,
                      prompt_len=40, response_len=5, ppo_epochs=1, progress=False))
    prompts = root / "five-prompts.jsonl"
    prompts.write_text("".join(bundled_path("demo-heldout.jsonl").read_text().splitlines(keepends=True)[:N_PROMPTS]))
    return run, prompts


@pytest.fixture(scope="module")
def default_eval(tiny_run):
    """`eval RUN --prompts F --reward ...` with every default: both finished policies, greedy."""
    run, prompts = tiny_run
    code, out, err = cli("eval", run, "--prompts", prompts, "--reward", f"{REWARDS}:ascii_share",
                         "--pass-threshold", "0.5")
    assert code == 0, err
    return run / "eval" / "five-prompts", out


# ---- pure helpers -------------------------------------------------------------------------------

def test_wilson_interval_against_hand_computed_values():
    # k=8, n=10, z=1.96: center (0.8 + 0.19207)/1.38415 = 0.71674, half 1.41603 * 0.16001 = 0.22658
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94331, abs=1e-4)
    lo, hi = wilson_interval(0, 5)  # never 0 +- 0: the upper bound says how little 5 trials show
    assert lo == 0.0 and hi == pytest.approx(0.43448, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.72246, abs=1e-4) and hi == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(50, 100)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(2 * 0.09617, abs=1e-4)


def test_pass_stats_counts_samples_and_pass_at_k():
    s = pass_stats([[1.0, 0.0, 0.2], [0.0, 0.5, 0.0], [1.0, 1.0, 3.0]], threshold=1.0)
    assert (s["passed"], s["total"], s["prompts"], s["samples"]) == (4, 9, 3, 3)
    assert s["mean_score"] == pytest.approx(6.7 / 9)
    assert s["pass_rate_ci95"] == list(wilson_interval(4, 9))
    assert (s["pass_at_k"]["passed"], s["pass_at_k"]["prompts"], s["pass_at_k"]["k"]) == (2, 3, 3)
    assert "pass_at_k" not in pass_stats([[1.0], [0.0]], 1.0)


def test_prompts_stem():
    assert prompts_stem(str(bundled_path("demo-prompts.jsonl"))) == "demo-prompts"
    assert prompts_stem(str(bundled_path("hh-rlhf-harmless-base-test-600.jsonl.gz"))) == "hh-rlhf-harmless-base-test-600"
    assert prompts_stem("openai/gsm8k:test") == "openai_gsm8k_test"


# ---- the command on a real run ------------------------------------------------------------------

def test_default_eval_scores_every_finished_policy(tiny_run, default_eval):
    out, stdout = default_eval
    assert sorted(p.name for p in out.iterdir()) == ["ppo.jsonl", "sft.jsonl", "summary.json"]  # no temp files
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["policies"]) == ["sft", "ppo"] and summary["greedy"] and summary["samples"] == 1
    assert summary["max_new_tokens"] == 5 and summary["prompt_len"] == 40  # the PPO stage's shapes
    for name, pol in summary["policies"].items():
        rs = rows(out / f"{name}.jsonl")
        assert len(rs) == N_PROMPTS
        assert all(len(r["responses"]) == 1 and len(r["scores"]) == 1 for r in rs)
        # the reward saw the rendered prompt and the response: scores recompute from the rows
        for r in rs:
            assert r["scores"] == ascii_share([r["prompt"]], r["responses"])
            assert r["prompt"].endswith("assistant\n") and r["meta"]["answer"]
        scores = [s for r in rs for s in r["scores"]]
        k = sum(s >= 0.5 for s in scores)
        assert (pol["passed"], pol["total"], pol["prompts"]) == (k, N_PROMPTS, N_PROMPTS)
        assert pol["mean_score"] == pytest.approx(sum(scores) / len(scores))
        assert pol["pass_rate_ci95"] == list(wilson_interval(k, N_PROMPTS))
        # the profile the stage trained with (fp32 here), not a fresh pick of the planner
        assert pol["profile"] == "lora-bf16-shared" and pol["profile_from"].endswith(f"{name}/config.json")
        assert (pol["quant"], pol["dtype"]) == ("none", "fp32")
        assert f"{k}/{N_PROMPTS}" in stdout
    assert summary["policies"]["ppo"]["adapter"].endswith("ppo/actor")
    assert summary["policies"]["ppo"]["merged"] == summary["policies"]["sft"]["merged"]
    assert "sft" in stdout and "ppo" in stdout and "rate [95% CI]" in stdout


def test_greedy_answers_repeat_in_any_policy_order(tiny_run, default_eval, tmp_path):
    """A second eval, policies the other way round (sft then runs on the base that already carries
    the actor, with adapters off), gives the same answers."""
    run, prompts = tiny_run
    code, _, err = cli("eval", run, "--prompts", prompts, "--reward", f"{REWARDS}:ascii_share",
                       "--policy", "ppo", "--policy", "sft", "--out", tmp_path / "again")
    assert code == 0, err
    first, _ = default_eval
    for name in ("sft", "ppo"):
        assert [r["responses"] for r in rows(tmp_path / "again" / f"{name}.jsonl")] == \
               [r["responses"] for r in rows(first / f"{name}.jsonl")]
    # PPO moved the policy: its answers are not the SFT policy's (2 of 5 prompts at least)
    differ = sum(a["responses"] != b["responses"] for a, b in zip(rows(first / "sft.jsonl"), rows(first / "ppo.jsonl")))
    assert differ >= 1


def test_samples_with_an_evaluator_command(tiny_run, tmp_path):
    """--samples 3: three sampled answers per prompt, scored by an evaluator process (JSON lines in,
    one score per line out); pass@3 counts prompts with any passing sample."""
    run, prompts = tiny_run
    code, stdout, err = cli("eval", run, "--prompts", prompts, "--reward-cmd", python_command(REWARDS),
                            "--policy", "ppo", "--samples", "3", "--temperature", "1.5", "--pass-threshold", "0.2",
                            "--batch", "15", "--out", tmp_path / "k3")
    assert code == 0, err
    rs = rows(tmp_path / "k3" / "ppo.jsonl")
    assert len(rs) == N_PROMPTS and all(len(r["responses"]) == 3 and len(r["scores"]) == 3 for r in rs)
    assert any(len(set(r["responses"])) > 1 for r in rs)  # sampled, not greedy
    for r in rs:  # the script scores ASCII characters / 16
        assert r["scores"] == pytest.approx(ascii_fraction([r["prompt"]] * 3, r["responses"]))
    pol = json.loads((tmp_path / "k3" / "summary.json").read_text())["policies"]["ppo"]
    k = sum(s >= 0.2 for r in rs for s in r["scores"])
    m = sum(any(s >= 0.2 for s in r["scores"]) for r in rs)
    assert (pol["passed"], pol["total"], pol["samples"]) == (k, 3 * N_PROMPTS, 3)
    assert (pol["pass_at_k"]["passed"], pol["pass_at_k"]["prompts"]) == (m, N_PROMPTS)
    assert f"{m}/{N_PROMPTS}" in stdout and "pass@3" in stdout
    # the same seed draws the same samples
    code, _, err = cli("eval", run, "--prompts", prompts, "--reward-cmd", python_command(REWARDS), "--policy", "ppo",
                       "--samples", "3", "--temperature", "1.5", "--batch", "15", "--out", tmp_path / "k3b")
    assert code == 0, err
    assert [r["responses"] for r in rows(tmp_path / "k3b" / "ppo.jsonl")] == [r["responses"] for r in rs]


def test_adapter_folder_and_base_policies(tiny_run, default_eval, tmp_path):
    """--policy PATH loads the adapter with the SFT adapters its metadata records as merged: the PPO
    actor folder answers exactly as --policy ppo; base has no adapters at all."""
    run, prompts = tiny_run
    code, _, err = cli("eval", run, "--prompts", prompts, "--reward", f"{REWARDS}:ascii_share",
                       "--policy", run / "ppo" / "actor", "--policy", "base", "--out", tmp_path / "p")
    assert code == 0, err
    first, _ = default_eval
    assert [r["responses"] for r in rows(tmp_path / "p" / "ppo-actor.jsonl")] == \
           [r["responses"] for r in rows(first / "ppo.jsonl")]
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())["policies"]
    assert summary["base"]["merged"] == [] and summary["base"]["adapter"] is None
    assert len(rows(tmp_path / "p" / "base.jsonl")) == N_PROMPTS


def test_moved_run_finds_its_merged_sft_adapter(tiny_run, tmp_path):
    """The actor's metadata names the SFT adapter as the PPO stage saw it (a path relative to where
    it ran, or a run folder since moved): the run's own sft/adapter stands in; gone is one line."""
    from lowmem_rlhf.errors import UserError
    from lowmem_rlhf.stages.evaluate import resolve_policies

    run, _ = tiny_run
    moved = tmp_path / "moved"
    shutil.copytree(run / "sft", moved / "sft")
    shutil.copytree(run / "ppo", moved / "ppo")
    meta_path = moved / "ppo" / "actor" / "lowmem_rlhf_adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["merged"] = ["runs/somewhere-else/sft/adapter"]
    meta_path.write_text(json.dumps(meta))
    sft, ppo = resolve_policies(moved)
    assert [p.name for p in (sft, ppo)] == ["sft", "ppo"]
    assert ppo.merged == sft.merged == ((moved / "sft" / "adapter").resolve(),)
    assert ppo.adapter == (moved / "ppo" / "actor").resolve() and sft.adapter is None
    shutil.rmtree(moved / "sft")
    with pytest.raises(UserError, match="which is gone; restore that SFT folder"):
        resolve_policies(moved, ["ppo"])


# ---- bad input: one line, exit code 2 -------------------------------------------------------------

def _stage_only(tmp_path: Path, run: Path) -> Path:
    """A run folder with a finished SFT stage only."""
    r = tmp_path / "sft-only"
    shutil.copytree(run / "sft", r / "sft")
    return r


BAD = {
    "missing run": (lambda t, run: t / "nope", [], "run folder"),
    "neither reward": (lambda t, run: run, ["--no-reward"], "exactly one reward"),
    "both rewards": (lambda t, run: run, ["--reward-cmd", "python x.py"], "exactly one reward"),
    "no such reward function": (lambda t, run: run, ["--reward-fn", "nope"], "has no callable 'nope'"),
    "ppo stage missing": (_stage_only, ["--policy", "ppo"], "has no PPO stage"),
    "ppo stage unfinished": (lambda t, run: (_stage_only(t, run) / ".ppo.partial").mkdir() or t / "sft-only",
                             ["--policy", "ppo"], "did not finish"),
    "ppo without summary": (lambda t, run: shutil.copytree(run / "ppo", t / "r" / "ppo",
                                                           ignore=shutil.ignore_patterns("summary.json")) and t / "r",
                            ["--policy", "ppo"], "not a finished PPO stage (no summary.json)"),
    "nothing finished": (lambda t, run: (t / "empty").mkdir() or t / "empty", [], "no finished policy"),
    "reward model as policy": (lambda t, run: run, ["--policy", "rm"], "--policy rm"),
    "not an adapter folder": (lambda t, run: run, ["--policy", "somewhere"], "no such adapter folder"),
    "no prompts in file": (lambda t, run: run, ["--prompts-text", '{"prompt": [{"role": "assistant", "content": "hi"}]}\n'],
                           "no usable prompts"),
    "empty prompts file": (lambda t, run: run, ["--prompts-text", "\n"], "no rows"),
    "zero samples": (lambda t, run: run, ["--samples", "0"], "--samples must be a positive integer"),
    "reward raises": (lambda t, run: run, ["--reward-fn", "raises", "--policy", "sft"],
                      "raised ValueError: checker crashed on sample"),
    "evaluator fails": (lambda t, run: run, ["--reward-cmd-only", "-c 'import sys; sys.exit(3)'", "--policy", "sft"],
                        "exited 3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(tiny_run, tmp_path, case):
    run, prompts = tiny_run
    make_run, extra, needle = BAD[case]
    reward = ["--reward", f"{REWARDS}:ascii_share"]
    args: list = []
    it = iter(extra)
    for a in it:  # test-only pseudo flags that build the real ones
        if a == "--no-reward":
            reward = []
        elif a == "--reward-fn":
            reward = ["--reward", f"{REWARDS}:{next(it)}"]
        elif a == "--reward-cmd-only":
            reward = ["--reward-cmd", f"{shlex.quote(sys.executable)} {next(it)}"]
        elif a == "--prompts-text":
            prompts = tmp_path / "bad-prompts.jsonl"
            prompts.write_text(next(it))
        else:
            args.append(a)
    out = tmp_path / "out"
    code, _, err = cli("eval", make_run(tmp_path, run), "--prompts", prompts, *reward, *args, "--out", out)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert needle in lines[0], lines[0]
    assert not (out / "summary.json").exists()  # nothing that looks finished


def test_a_failed_eval_keeps_the_previous_results(tiny_run, tmp_path):
    """The reward fails on the first policy: the earlier eval in that folder stays whole."""
    run, prompts = tiny_run
    out = tmp_path / "out"
    assert cli("eval", run, "--prompts", prompts, "--reward", f"{REWARDS}:ascii_share", "--policy", "sft",
               "--batch", "5", "--out", out)[0] == 0
    before = {p.name: p.read_text() for p in out.iterdir()}
    code, _, err = cli("eval", run, "--prompts", prompts, "--reward", f"{REWARDS}:nan", "--policy", "sft", "--batch", "5",
                       "--out", out)
    assert code == 2 and "returned nan for sample 0 of the batch (prompt 1; " in err
    assert {p.name: p.read_text() for p in out.iterdir()} == before
