"""The bad-input table: every case runs the real command and must give exactly one `error:` line that
names the file/field and the fix, exit non-zero, print no traceback, and leave nothing that looks
like a finished output (no RUN/<stage>/, no hidden partial folder without a checkpoint).

The README's "When something is wrong" section summarizes this table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_rlhf.algo.rewards import python_command
from lowmem_rlhf.cli import main
from lowmem_rlhf.config import PROFILES_DIR
from lowmem_rlhf.data import bundled_path

SEED_TASKS = str(bundled_path("self-instruct-seed-tasks.jsonl"))
HH = str(bundled_path("hh-rlhf-harmless-base-test-600.jsonl.gz"))
PROMPTS = str(bundled_path("demo-prompts.jsonl"))
REWARDS = Path(__file__).parent / "assets" / "rewards.py"
PROFILES = PROFILES_DIR  # the shipped profiles, inside the package


def cli(argv) -> tuple[int, str, str]:
    import io
    from contextlib import redirect_stderr, redirect_stdout

    o, e = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stdout(o), redirect_stderr(e):
        try:
            main([str(a) for a in argv])
        except SystemExit as ex:
            code = ex.code or 0
    return code, o.getvalue(), e.getvalue()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, tiny_llama, tiny_gpt2, tiny_glm):
    root = tmp_path_factory.mktemp("bad")
    d = root / "data"
    d.mkdir()
    (d / "empty.jsonl").write_text("")
    (d / "nofields.jsonl").write_text('{"question_text": "hi", "reply": "x"}\n')
    (d / "broken.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    (d / "same.jsonl").write_text('{"prompt": "a", "chosen": "same", "rejected": "same"}\n' * 3)
    p = root / "profiles"
    p.mkdir()
    base = (PROFILES / "qlora-shared.yaml").read_text()
    (p / "malformed.yaml").write_text(base + "lora_targets: [q_proj,\n")
    (p / "unknown.yaml").write_text(base + "lora_rank: 8\n")
    (p / "wrongtype.yaml").write_text(base.replace("lora_r: 16", "lora_r: sixteen"))
    m = root / "models"
    (m / "tokenizer-only").mkdir(parents=True)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, m / "tokenizer-only" / f.name)
    shutil.copytree(tiny_llama, m / "no-weights")
    for f in (m / "no-weights").glob("*.safetensors"):
        f.unlink()
    shutil.copytree(tiny_llama, m / "no-pad")
    tc = json.loads((m / "no-pad" / "tokenizer_config.json").read_text())
    tc.update(pad_token=None, eos_token=None)
    (m / "no-pad" / "tokenizer_config.json").write_text(json.dumps(tc))
    runs = root / "runs"
    code, _, err = cli(["sft", "--model", tiny_gpt2, "--data", SEED_TASKS, "--out", runs / "gpt2", "--profile",
                        "qlora-shared", "--max-steps", 1, "--max-len", 32, "--batch", 2])
    assert code == 0, err
    code, _, err = cli(["sft", "--model", tiny_llama, "--data", SEED_TASKS, "--out", runs / "done", "--profile",
                        "qlora-shared", "--max-steps", 1, "--max-len", 32, "--batch", 2])
    assert code == 0, err
    shutil.copytree(runs / "done" / "sft", runs / "unfinished" / "sft")
    (runs / "unfinished" / "sft" / "summary.json").unlink()
    (root / "a-file").write_text("not a folder")
    return {"root": root, "data": d, "profiles": p, "models": m, "runs": runs, "llama": tiny_llama,
            "glm": tiny_glm, "rewards": REWARDS, "hang": python_command(REWARDS) + " hang"}


SFT = ["sft", "--model", "{llama}", "--data", SEED_TASKS, "--profile", "qlora-shared", "--max-steps", "2",
       "--max-len", "48", "--batch", "2"]
RM = ["rm", "--model", "{llama}", "--data", HH, "--profile", "qlora-shared", "--max-steps", "2", "--max-len", "48",
      "--batch", "2", "--max-pairs", "20"]
PPO = ["ppo", "--model", "{llama}", "--prompts", PROMPTS, "--profile", "qlora-shared", "--iterations", "2",
       "--rollout-batch", "2", "--prompt-len", "32", "--response-len", "2", "--ppo-epochs", "1"]
GRPO = ["grpo", "--model", "{llama}", "--prompts", PROMPTS, "--profile", "qlora-shared", "--iterations", "2",
        "--rollout-batch", "4", "--group-size", "2", "--prompt-len", "32", "--response-len", "2",
        "--reward", "{rewards}:ascii_share"]


def _with(cmd: list[str], **changes: str) -> list[str]:
    """cmd with option values replaced (or appended): _with(SFT, data="x") sets --data x."""
    cmd = list(cmd)
    for k, v in changes.items():
        flag = "--" + k.replace("_", "-")
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = v
        else:
            cmd += [flag] + ([v] if v != "" else [])
    return cmd


# id: (argv, stage whose outputs must not exist, words the one error line must contain)
TABLE = {
    # CLI flags
    "flag-zero-steps": (_with(SFT, max_steps="0"), "sft", ["--max-steps must be a positive integer"]),
    "flag-negative-save-every": (_with(SFT, save_every="-1"), "sft", ["--save-every must be 0 or more"]),
    "flag-zero-max-nonfinite": (_with(SFT, max_nonfinite="0"), "sft", ["--max-nonfinite must be a positive integer"]),
    "flag-zero-max-vram": (_with(SFT, max_vram="0"), "sft", ["--max-vram must be a positive number of GiB, got 0"]),
    "flag-kl-estimator": (_with(PPO, reward="{rewards}:ascii_share", kl_estimator="k9"), "ppo",
                          ["--kl-estimator must be k1 or k3"]),
    "flag-kl-penalty": (_with(PPO, reward="{rewards}:ascii_share", kl_penalty="both"), "ppo",
                        ["--kl-penalty must be reward or loss, got 'both'"]),
    "flag-reward-weights-count": (_with(PPO, reward="{rewards}:ascii_share", reward_cmd="{hang}",
                                        reward_weights="1,2,3"), "ppo",
                                  ["--reward-weights gives 3 weight(s) for 2 reward(s) (--reward, --reward-cmd)",
                                   "--reward-weights 1,1"]),
    "flag-reward-weights-text": (_with(GRPO, reward_weights="1,x"), "grpo", ["--reward-weights '1,x'",
                                                                            "comma-separated numbers"]),
    "flag-group-size-one": (_with(GRPO, group_size="1"), "grpo",
                            ["--group-size must be at least 2, got 1", "a group of 1 has nothing to compare"]),
    "flag-group-size-divides": (_with(GRPO, group_size="3"), "grpo",
                                ["--group-size 3 must divide --rollout-batch 4", "use --rollout-batch 3"]),
    "flag-negative-beta": (_with(GRPO, beta="-0.1"), "grpo", ["--beta must be 0 or more", "got -0.1"]),
    "flag-algo": (_with(GRPO, algo="ppo"), "grpo", ["--algo must be grpo or rloo, got 'ppo'"]),
    "flag-auto-algo": (["auto", "--algo", "dpo", "--out", "{root}/auto-dpo"], None,
                       ["--algo must be ppo, grpo, rloo, got 'dpo'"]),
    "flag-samples-per-prompt": (_with(PPO, reward="{rewards}:ascii_share", samples_per_prompt="3"), "ppo",
                                ["--samples-per-prompt 3 must divide --rollout-batch 2", "use --rollout-batch 3"]),
    # the demo's 8 answers per prompt do not split a rollout of 6: said before SFT runs, not after RM
    "flag-auto-samples-per-prompt": (["auto", "--out", "{root}/auto-run", "--rollout-batch", "6"], None,
                                     ["--samples-per-prompt 8 must divide --rollout-batch 6: use --rollout-batch 8"]),
    # profile YAML
    "profile-malformed-yaml": (_with(SFT, profile="{profiles}/malformed.yaml"), "sft",
                               ["malformed.yaml", "malformed YAML"]),
    "profile-unknown-key": (_with(SFT, profile="{profiles}/unknown.yaml"), "sft",
                            ["unknown.yaml", "unknown key 'lora_rank'", "did you mean 'lora_r'"]),
    "profile-wrong-type": (_with(SFT, profile="{profiles}/wrongtype.yaml"), "sft",
                           ["wrongtype.yaml", "field 'lora_r' must be int"]),
    "profile-not-found": (_with(SFT, profile="qlora-sharde"), "sft", ["profile 'qlora-sharde' not found", "available"]),
    # dataset files
    "data-missing-file": (_with(SFT, data="{data}/missing.jsonl"), "sft", ["missing.jsonl"]),
    "data-no-rows": (_with(SFT, data="{data}/empty.jsonl"), "sft", ["empty.jsonl", "no rows"]),
    "data-missing-fields": (_with(SFT, data="{data}/nofields.jsonl"), "sft", ["nofields.jsonl", "instruction"]),
    "data-broken-json-line": (_with(SFT, data="{data}/broken.jsonl"), "sft", ["broken.jsonl", "line 2"]),
    "pairs-identical": (_with(RM, data="{data}/same.jsonl"), "rm", ["same.jsonl", "identical"]),
    "sft-longer-than-context": (_with(SFT, max_len="4096"), "sft", ["--max-len asks for 4096", "context of 512",
                                                                    "lower --max-len"]),
    "ppo-longer-than-context": (_with(PPO, reward="{rewards}:ascii_share", prompt_len="500", response_len="100"),
                                "ppo", ["500 + 100", "context of 512", "lower --prompt-len"]),
    # model folders
    "model-tokenizer-only": (_with(SFT, model="{models}/tokenizer-only"), "sft",
                             ["tokenizer-only", "a tokenizer but no config.json"]),
    "model-no-weights": (_with(SFT, model="{models}/no-weights"), "sft", ["no-weights", "no weights"]),
    "model-no-pad-no-eos": (_with(SFT, model="{models}/no-pad"), "sft",
                            ["no-pad", "neither a pad nor an EOS", "tokenizer_config.json"]),
    "model-needs-remote-code": (_with(SFT, model="{glm}"), "sft", ["--trust-remote-code"]),
    "model-not-a-folder": (_with(SFT, model="{root}/a-file"), "sft", ["a-file", "not a folder"]),
    # run folders
    "run-from-another-base": (_with(RM, init_from="{runs}/gpt2/sft"), "rm", ["gpt2", "another model"]),
    "run-stage-unfinished": (_with(RM, init_from="{runs}/unfinished/sft"), "rm",
                             ["unfinished/sft", "did not finish", "re-run it"]),
    "run-reward-model-is-not-one": (_with(PPO, reward_model="{data}"), "ppo", ["no adapter there", "RUN/rm"]),
    "run-stage-exists": (_with(SFT, out="{runs}/done"), None, ["done/sft already exists", "--overwrite"]),
    "run-resume-nothing": (_with(SFT, resume=""), "sft", ["--resume", "no checkpoint", "without --resume"]),
    "run-auto-resume-foreign": (["auto", "--resume", "{data}"], None, ["no auto.json", "lowmem-rlhf auto"]),
    "out-not-writable": (_with(SFT, out="{root}/a-file/run"), None, ["a-file/run", "cannot write there"]),
    # reward functions
    "reward-raises": (_with(PPO, reward="{rewards}:raises"), "ppo",
                      ["every PPO iteration was skipped", "raised ValueError: checker crashed on sample"]),
    "reward-nan": (_with(PPO, reward="{rewards}:nan"), "ppo", ["skipped", "returned nan for sample 0"]),
    "reward-wrong-count": (_with(PPO, reward="{rewards}:wrong_count"), "ppo", ["returned 1 scores for 2 responses"]),
    "reward-no-such-function": (_with(PPO, reward="{rewards}:nope"), "ppo", ["rewards.py", "no callable 'nope'"]),
    "reward-cmd-hangs": (_with(PPO, reward_cmd="{hang}", reward_timeout="1"), "ppo", ["timed out after 1 s"]),
}


@pytest.mark.parametrize("case", list(TABLE))
def test_bad_input(ctx, tmp_path, case):
    argv, stage, needles = TABLE[case]
    run = tmp_path / "run"
    argv = [a.format(**ctx) for a in argv]
    if "--out" not in argv and argv[0] != "auto":
        argv += ["--out", str(run)]
    code, out, err = cli(argv)
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2, (code, out[-1500:], err[-1500:])
    assert len(errors) == 1 and err.strip() == errors[0], err
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle.format(**ctx) in errors[0], (needle, errors[0])
    if stage:
        assert not (run / stage).exists() and not list(run.glob(f".{stage}.partial*")), list(run.iterdir())


def test_the_table_is_large_and_covers_every_kind_of_input():
    assert len(TABLE) >= 20
    kinds = {k.split("-")[0] for k in TABLE}
    assert {"flag", "profile", "data", "model", "run", "reward", "out"} <= kinds


def _tmpfs_or_rlimit() -> list[str]:
    """A command prefix that gives the child a full disk at RUN: a 256 KiB tmpfs mounted over it in a
    private mount namespace when the kernel allows (root or user namespaces), else a file-size limit."""
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True) if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        return ["tmpfs"]
    return ["rlimit"]


def test_disk_full_is_one_line_and_leaves_nothing_finished(tmp_path, tiny_llama):
    run = tmp_path / "run"
    run.mkdir()
    args = [sys.executable, "-m", "lowmem_rlhf", *[a.format(llama=tiny_llama) for a in SFT], "--out", str(run),
            "--save-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    how = _tmpfs_or_rlimit()[0]
    if how == "tmpfs":
        # list RUN from inside the namespace after the command: the tmpfs vanishes with it
        script = (f"mount -t tmpfs -o size=256k tmpfs {run} || exit 99; " + " ".join(f"'{a}'" for a in args)
                  + f"; rc=$?; echo LISTING; ls -A {run}; exit $rc")
        r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                           timeout=300)
        left = r.stdout.split("LISTING", 1)[1].split()
        assert "sft" not in left, left
    else:
        import resource
        import signal

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

        r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, preexec_fn=limit)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2, (how, r.stdout[-1500:], r.stderr[-3000:])
    assert len(errors) == 1 and "free disk space" in errors[0] and "Traceback" not in r.stderr, (how, r.stderr[-3000:])
    assert not (run / "sft").exists()


# Usage errors come from typer/click, not from our code: typer >= 0.2x raises its vendored click's
# exceptions (typer._click), which a plain `except click.ClickException` does not catch. Run the real
# console script so the entry point itself is what is tested.
USAGE_ERRORS = {
    "unknown-flag": (["sft", "--max-stepz", "2"], "sft", ["No such option: --max-stepz", "--max-steps"]),
    "missing-value": (["sft", "--max-steps"], "sft", ["--max-steps", "requires an argument"]),
    "wrong-type": (["sft", "--max-steps", "abc"], "sft", ["Invalid value for '--max-steps'", "integer"]),
    "missing-value-plan": (["plan", "--gpu"], "plan", ["--gpu", "requires an argument"]),
    "unknown-command": (["sfft"], "", ["No such command 'sfft'", "'sft'"]),
}


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("lowmem-rlhf")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lowmem_rlhf"]


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_is_one_line_with_the_usage(case, tmp_path):
    argv, command, needles = USAGE_ERRORS[case]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    r = subprocess.run(_console_script() + argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith(f"Usage: lowmem-rlhf {command}".rstrip()), r.stderr
    assert lines[-1] == errors[0] and len(lines) <= 3, r.stderr  # usage, help hint, the error line
    assert not list(tmp_path.iterdir())  # nothing written


def test_usage_error_in_process_too():
    """`cli.main([...])` (what tests and `python -m lowmem_rlhf` call) handles them the same way."""
    code, out, err = cli(["sft", "--max-stepz", "2"])
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 2 and "Traceback" not in out + err
    assert len(errors) == 1 and "--max-stepz" in errors[0], err
