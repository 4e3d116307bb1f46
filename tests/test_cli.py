"""The command line: real invocations, one-line errors, JSON for scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lowmem_rlhf.cli import main


def run(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code or 0
    o, e = capsys.readouterr()
    return code, o, e


def test_plan_3090_7b(capsys):
    code, out, _ = run(["plan", "--gpu", "3090", "--model", "llama-2-7b"], capsys)
    assert code == 0
    assert "chosen:" in out and "PPO" in out and "device (nvidia-smi)" in out


def test_plan_json(capsys):
    code, out, _ = run(["plan", "--gpu", "3090", "--model", "llama-2-7b", "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["chosen"]["fits"]
    assert set(d["chosen"]["stages"]) == {"sft", "rm", "ppo"}
    ppo = d["chosen"]["stages"]["ppo"]
    assert ppo["device_gib"] <= 23.7 and set(ppo["phases"]) >= {"generation", "actor_update"}


def test_plan_max_vram_plans_for_the_cap(capsys):
    """--max-vram 10 on a 3090: the budget is 10 GiB and every stage of the pick fits in it; a cap
    above the card's memory changes nothing."""
    def plan(*extra):
        code, out, _ = run(["plan", "--gpu", "3090", "--model", "llama-2-7b", "--json", *extra], capsys)
        assert code == 0
        return json.loads(out)

    full, capped, above = plan(), plan("--max-vram", "10"), plan("--max-vram", "80")
    assert capped["hardware"]["gpu"]["total_gib"] == 10.0 and "capped at 10 GiB" in capped["hardware"]["gpu"]["name"]
    assert capped["budget_gib"] <= 10 < full["budget_gib"]
    assert all(st["device_gib"] <= capped["budget_gib"] for st in capped["chosen"]["stages"].values())
    # uncapped, the 16-bit base fits (about 17-18 GiB a stage); within 10 GiB only the 4-bit one does
    assert full["chosen_profile"]["name"] == "lora-bf16-shared" and capped["chosen_profile"]["name"] == "qlora-shared"
    assert above["hardware"]["gpu"] == full["hardware"]["gpu"] and above["chosen_profile"] == full["chosen_profile"]


@pytest.mark.parametrize("gpu,model", [("3060-12gb", "llama-2-7b"), ("4090", "llama-2-13b")])
def test_plan_other_cards(capsys, gpu, model):
    code, out, err = run(["plan", "--gpu", gpu, "--model", model], capsys)
    assert (code == 0 and "chosen:" in out) or (code == 1 and "lower" in err)


def test_estimate_json_has_the_figures(capsys):
    code, out, _ = run(["estimate", "--model", "llama-2-7b", "--stage", "ppo", "--quant", "nf4",
                        "--lora-r", "16", "--json"], capsys)
    d = json.loads(out)
    assert code == 0
    for k in ("allocated_gib", "reserved_gib", "device_gib", "cpu_ram_gib", "components"):
        assert k in d
    assert d["allocated_gib"] < d["reserved_gib"] < d["device_gib"]
    assert d["components"]["weights"] > 3 * 1024**3


def test_estimate_separate_models_costs_more(capsys):
    _, a, _ = run(["estimate", "-m", "llama-2-7b", "--stage", "ppo", "--json"], capsys)
    _, b, _ = run(["estimate", "-m", "llama-2-7b", "--stage", "ppo", "--separate-models", "--json"], capsys)
    assert json.loads(b)["device_gib"] > json.loads(a)["device_gib"] + 7


def test_estimate_table(capsys):
    code, out, _ = run(["estimate", "-m", "llama-2-7b", "--stage", "ppo"], capsys)
    assert code == 0 and "generation" in out and "critic_update" in out


def test_auto_dry_run(capsys):
    code, out, _ = run(["auto", "--gpu", "3090", "--model", "llama-2-7b", "--dry-run"], capsys)
    assert code == 0 and "dry run" in out and "nothing was loaded" in out


BAD = [
    (["plan", "--gpu", "rtx3099"], "unknown GPU 'rtx3099'; did you mean"),
    (["plan", "--model", "llama-9b"], "unknown model 'llama-9b'"),
    (["plan", "--seq-len", "0"], "--seq-len must be a positive integer"),
    (["plan", "--response-len", "-5"], "--response-len must be a positive integer"),
    (["plan", "--vram", "-4"], "--vram must be a positive number"),
    (["plan", "--stages", "sft,dpo"], "unknown stage(s) dpo"),
    (["estimate", "--quant", "nf4", "--lora-r", "0"], "quantized weights cannot be trained"),
    (["estimate", "--lora-r", "0"], "add --quant none"),
    (["estimate", "--quant", "nf5"], "--quant must be one of"),
    (["estimate", "--stage", "dpo"], "--stage must be one of sft, rm, ppo, grpo, rloo, got 'dpo'"),
    (["estimate", "-m", "llama-2-7b", "--lora-targets", "c_attn"], "LoRA target(s) c_attn not in llama-2-7b"),
    (["estimate", "--profile", "nope"], "profile 'nope' not found"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_one_line(capsys, argv, message):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1, err


def test_config_json_errors(capsys, tmp_path):
    code, _, err = run(["plan", "--model", str(tmp_path)], capsys)
    assert code == 2 and "no config.json" in err
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    code, _, err = run(["plan", "--model", str(tmp_path)], capsys)
    assert code == 2 and "malformed JSON" in err and str(tmp_path) in err
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()  # exists but cannot be read as a file, even by root
    code, _, err = run(["plan", "--model", str(tmp_path)], capsys)
    assert code == 2 and "cannot read" in err and "config.json" in err


def test_nothing_fits_exit_1_one_line_no_traceback():
    """Through the installed console script, as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "lowmem-rlhf")
    r = subprocess.run([exe, "plan", "--vram", "4", "--model", "llama-2-13b"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "kernels" not in ln and "accelerator" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: no profile fits llama-2-13b")
    assert "Traceback" not in r.stderr and "GiB short" in lines[0]


def test_help_on_every_command(capsys):
    for cmd in ("plan", "estimate", "auto"):
        code, out, _ = run([cmd, "--help"], capsys)
        assert code == 0 and "--json" in out
