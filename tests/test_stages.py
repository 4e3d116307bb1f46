"""SFT and reward-model stages on real models (CPU): loss falls, outputs reload bit-identically,
bad input is one line with no finished-looking output left behind."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from lowmem_rlhf.cli import main
from lowmem_rlhf.config import load_profile
from lowmem_rlhf.data import bundled_path
from lowmem_rlhf.model.adapters import SharedBase
from lowmem_rlhf.model.loading import load_model
from lowmem_rlhf.plan.planner import machine_profile
from lowmem_rlhf.stages.rm import RMConfig, run_rm
from lowmem_rlhf.stages.sft import SFTConfig, run_sft

SEED_TASKS = str(bundled_path("self-instruct-seed-tasks.jsonl"))
HH = str(bundled_path("hh-rlhf-harmless-base-test-600.jsonl.gz"))


def cli(argv, capsys):
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code or 0
    return (code, *capsys.readouterr())


def _prof(name, **kw):
    """The shipped profile at rank 8, as this machine runs it: in fp32 on a CPU without fast bf16
    (`machine_profile`, what a named --profile gets there), where bf16 is emulated ~25x slower."""
    return machine_profile(replace(load_profile(name), lora_r=8, micro_batch=4, **kw))


@pytest.mark.parametrize("profile", ["qlora-shared", "lora-bf16-shared"])
def test_sft_then_rm_on_tiny_llama(tiny_llama, tmp_path, profile):
    prof = _prof(profile, learning_rate=1e-2)
    s = run_sft(SFTConfig(model=str(tiny_llama), data=SEED_TASKS, out=tmp_path, profile=prof, max_len=96,
                          batch=8, max_steps=12, progress=False))
    # a random frozen output layer caps what LoRA can learn; the fall is still ~15% within 12 steps
    assert s["loss_last5"] < 0.9 * s["loss_first"]
    assert s["eval_loss_after"] < s["eval_loss_before"] - 0.5
    sft_dir = tmp_path / "sft"
    assert {"adapter", "profile.yaml", "metrics.jsonl", "summary.json", "config.json"} <= {p.name for p in sft_dir.iterdir()}
    assert len((sft_dir / "metrics.jsonl").read_text().splitlines()) == 12
    mem = s["memory"]
    assert mem["components"]["adapters"][0] == mem["components"]["adapters"][1]  # estimated == counted
    assert mem["phases"]["train_step"]["cpu_ram"][1] > 0

    r = run_rm(RMConfig(model=str(tiny_llama), data=HH, out=tmp_path, profile=prof, init_from=sft_dir,
                        max_len=96, batch=8, max_steps=6, max_pairs=80, progress=False))
    assert r["eval_after"]["pairs"] == 8  # 6 steps on hh-rlhf: learning is asserted on lamp pairs below
    meta = json.loads((tmp_path / "rm" / "adapter" / "lowmem_rlhf_adapter.json").read_text())
    assert meta["head"] is True and meta["merged"] == [str((sft_dir / "adapter").resolve())]


def _lamp_pairs(path, n=240, seed=0):
    """Pairs an untrained reward head cannot rank: the right reply ('yes'/'no') depends on one word
    of the prompt, each reply is the chosen one in half of the pairs, and every prompt names its own
    room, so the held-out prompts were never trained on. A head that reads only the reply is at 50%."""
    rng = random.Random(seed)
    rows = []
    for i, room in enumerate(rng.sample(range(100, 1000), n)):
        on = i % 2 == 0
        rows.append({"prompt": f"In room {room} the lamp is {'on' if on else 'off'}. Is the lamp on?",
                     "chosen": "yes" if on else "no", "rejected": "no" if on else "yes"})
    rng.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_reward_model_learns_pairs_an_untrained_head_ranks_at_chance(tiny_llama, tmp_path):
    """The shipped LoRA profile (its dropout kept), rank 8: held-out accuracy from ~0.5 to >= 0.9.
    Measured at lr 3e-3, 60 steps: seed 0 0.517 -> 1.000 (margin 0.002 -> 20.0 in fp32, 24.9 in
    bf16); fp32 seeds 1-3 and another pair draw all reach 1.000. At lr 1e-2 the run is chaotic:
    grad-norm spikes of 100-400 and, in fp32 at rank 16, a collapse to a constant score (loss ln 2)."""
    prof = replace(_prof("lora-bf16-shared"), micro_batch=8)
    r = run_rm(RMConfig(model=str(tiny_llama), data=_lamp_pairs(tmp_path / "lamps.jsonl"), out=tmp_path,
                        profile=prof, max_len=64, batch=8, max_steps=60, lr=3e-3, eval_fraction=0.25,
                        save_every=0, progress=False))
    before, after = r["eval_before"], r["eval_after"]
    assert before["pairs"] == after["pairs"] == 60
    assert 0.4 <= before["accuracy"] <= 0.6, before  # the premise: an untrained head is at chance here
    assert after["accuracy"] >= 0.9 and after["accuracy"] >= before["accuracy"] + 0.35, (before, after)
    assert after["margin"] > 1.0 > abs(before["margin"])


def test_sft_adapter_reloads_bit_identical_and_with_plain_peft(tiny_llama, tmp_path):
    prof = _prof("lora-bf16-shared", dtype="fp32", learning_rate=3e-3)
    run_sft(SFTConfig(model=str(tiny_llama), data=SEED_TASKS, out=tmp_path, profile=prof, max_len=64, batch=4,
                      max_steps=3, progress=False))
    ids = torch.randint(4, 250, (2, 10))
    am = torch.ones_like(ids)
    a = SharedBase(load_model(str(tiny_llama), prof, training=False), prof)
    a.load_adapter("sft", tmp_path / "sft" / "adapter")
    b = SharedBase(load_model(str(tiny_llama), prof, training=False), prof, seed=7)
    b.load_adapter("sft", tmp_path / "sft" / "adapter")
    a.model.eval(), b.model.eval()
    with torch.no_grad():
        la = a.logits(a.hidden_states(ids, am))
        lb = b.logits(b.hidden_states(ids, am))
        with a.reference():
            base = a.logits(a.hidden_states(ids, am))
    assert (la - lb).abs().max().item() == 0.0
    assert not torch.equal(la, base)  # the adapter learned something
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
                                      str(tmp_path / "sft" / "adapter")).eval()
    with torch.no_grad():
        lp = plain(input_ids=ids, attention_mask=am).logits
    assert torch.allclose(la, lp, atol=1e-5)


def test_rm_reward_reloads_with_identical_scores(tiny_llama, tmp_path):
    prof = _prof("qlora-shared", learning_rate=3e-3)
    run_rm(RMConfig(model=str(tiny_llama), data=HH, out=tmp_path, profile=prof, max_len=64, batch=4,
                    max_steps=3, max_pairs=40, progress=False))
    ids = torch.randint(4, 250, (3, 10))
    am = torch.ones_like(ids)
    scores = []
    for seed in (0, 9):
        e = SharedBase(load_model(str(tiny_llama), prof, training=False), prof, seed=seed)
        e.load_adapter("reward", tmp_path / "rm" / "adapter")
        e.model.eval()
        with torch.no_grad():
            scores.append(e.scalar(e.hidden_states(ids, am)[:, -1]))
    assert torch.equal(scores[0], scores[1])


@pytest.mark.slow
def test_smollm2_sft_and_rm_through_the_cli(tmp_path, capsys, smollm2):
    code, out, err = cli(["sft", "--data", SEED_TASKS, "--out", tmp_path, "--profile", "lora-bf16-shared",
                          "--max-steps", 24, "--max-len", 128, "--batch", 4, "--lr", 5e-4], capsys)
    assert code == 0, err
    s = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert s["loss_last5"] < s["loss_first5"] and s["eval_loss_after"] < s["eval_loss_before"]
    assert "SFT summary" in out and "estimated vs measured" in out
    # the SFT adapter reloads into a fresh base bit-identically, and plain peft reads it
    prof = load_profile("lora-bf16-shared")
    ids = torch.randint(100, 40000, (2, 12))
    am = torch.ones_like(ids)
    logits = []
    for seed in (0, 1):
        e = SharedBase(load_model(None, prof, training=False), prof, seed=seed)
        e.load_adapter("sft", tmp_path / "sft" / "adapter")
        e.model.eval()
        with torch.no_grad():
            logits.append(e.logits(e.hidden_states(ids, am)).float())
    assert (logits[0] - logits[1]).abs().max().item() == 0.0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.bfloat16),
                                      str(tmp_path / "sft" / "adapter")).eval()
    with torch.no_grad():
        lp = plain(input_ids=ids, attention_mask=am).logits.float()
    assert (lp - logits[0]).abs().max().item() < 0.25  # bf16 vs bf16 along a different op order

    code, out, err = cli(["rm", "--data", HH, "--out", tmp_path, "--init-from", tmp_path / "sft", "--profile",
                          "qlora-shared", "--max-steps", 4, "--max-len", 128, "--batch", 4, "--max-pairs", 60], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert r["eval_after"]["pairs"] == 6
    # the reward adapter + head reload (on the SFT-merged 4-bit base) with identical scores
    q = load_profile("qlora-shared")
    scores = []
    for seed in (0, 1):
        e = SharedBase(load_model(None, q, merge_adapters=(tmp_path / "sft" / "adapter",), training=False), q, seed=seed)
        e.load_adapter("reward", tmp_path / "rm" / "adapter")
        e.model.eval()
        with torch.no_grad():
            scores.append(e.scalar(e.hidden_states(ids, am)[:, -1]))
    assert torch.equal(scores[0], scores[1])
