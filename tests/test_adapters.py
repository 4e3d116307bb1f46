"""The shared-base engine: named adapters + heads on one frozen base, and the silent failures of
facts-and-pitfalls.md, each shown to bite when its guard is removed."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch

from lowmem_rlhf.config import load_profile
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.adapters import AdapterSwitchError, SharedBase
from lowmem_rlhf.model.loading import load_model

IDS = torch.randint(4, 250, (2, 12), generator=torch.Generator().manual_seed(1))
AM = torch.ones_like(IDS)


def engine(folder, profile="qlora-shared", **knobs):
    prof = replace(load_profile(profile), lora_r=8, **knobs)
    return SharedBase(load_model(str(folder), prof), prof)


def perturb(eng, name, seed=0):
    """Give an adapter non-zero B (fresh LoRA B is zero: the adapter starts as the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in eng.parameters_of(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def logits(eng, ids=IDS):
    return eng.logits(eng.hidden_states(ids, torch.ones_like(ids))).float()


def base_hash(eng) -> str:
    h = hashlib.sha256()
    for n, p in sorted(eng.model.named_parameters()):
        if "lora_" not in n and "score" not in n:
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("profile", ["qlora-shared", "lora-bf16-shared"])
def test_switching_changes_outputs_and_reference_is_the_bare_base(tiny_llama, profile):
    bare = load_model(str(tiny_llama), replace(load_profile(profile), lora_r=8)).model
    with torch.no_grad():
        from lowmem_rlhf.model.loading import backbone

        expected = bare.get_output_embeddings()(backbone(bare)(input_ids=IDS, attention_mask=AM).last_hidden_state).float()
    eng = engine(tiny_llama, profile)
    eng.add_adapter("actor")
    eng.add_adapter("critic", with_head=True)
    perturb(eng, "actor", 0)
    perturb(eng, "critic", 1)
    eng.model.eval()
    with torch.no_grad():
        eng.use("actor")
        a = logits(eng)
        eng.use("critic")
        c = logits(eng)
        with eng.reference():
            ref = logits(eng)
    assert not torch.equal(a, c) and not torch.equal(a, ref)
    assert torch.equal(ref, expected)  # adapters disabled == the base model, bit for bit


def test_only_the_active_adapter_trains_and_base_stays_bit_identical(tiny_llama):
    eng = engine(tiny_llama)
    eng.add_adapter("actor")
    eng.add_adapter("critic", with_head=True)
    before = base_hash(eng)
    critic_before = [p.detach().clone() for p in eng.parameters_of("critic")]
    eng.use("actor")
    eng.model.train()
    opt = torch.optim.AdamW(eng.parameters_of("actor"), lr=1e-2)
    for _ in range(3):
        eng.backward(logits(eng).logsumexp(-1).mean())
        assert all(p.grad is not None for p in eng.parameters_of("actor"))
        assert all(p.grad is None for p in eng.parameters_of("critic"))
        assert not any(p.grad is not None for n, p in eng.model.named_parameters() if "lora_" not in n and "score" not in n)
        opt.step()
        opt.zero_grad()
    assert base_hash(eng) == before
    assert all(torch.equal(a, b) for a, b in zip(critic_before, eng.parameters_of("critic")))


def _lora_grads(eng, name):
    eng.use(name)
    eng.model.train()
    eng.backward(logits(eng).logsumexp(-1).mean())
    g = [p.grad.clone() for p in eng.parameters_of(name)]
    for p in eng.parameters_of(name):
        p.grad = None
    return g


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "guard-removed"])
def test_pitfall1_bnb_cpu_repack_after_eval_forward(tmp_path_factory, guard):
    """An eval forward under no_grad must not change the LoRA gradients of the next training step.
    (Dimensions are multiples of 128: the repacked CPU kernel's block size.)"""
    from lowmem_rlhf.model.random_models import save_random, tiny_llama_config

    cfg = tiny_llama_config()
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size = 4, 2, 64, 768
    folder = save_random(cfg, tmp_path_factory.mktemp("llama128"))
    eng = engine(folder, lora_dropout=0.0)
    eng.add_adapter("actor")
    perturb(eng, "actor")
    reference = _lora_grads(eng, "actor")
    import bitsandbytes as bnb

    if not guard:
        if not _has_avx512_bf16():
            pytest.skip("the repack only happens on CPUs with avx512_bf16")
        for m in eng.model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
    eng.model.eval()
    with torch.no_grad():
        logits(eng)  # what generation / evaluation does
    after = _lora_grads(eng, "actor")
    same = all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(reference, after))
    assert same == guard


def test_pitfall2_switch_between_forward_and_backward_is_refused(tiny_llama):
    eng = engine(tiny_llama, grad_ckpt=True, lora_dropout=0.0)
    eng.add_adapter("actor")
    eng.add_adapter("critic", with_head=True)
    perturb(eng, "actor", 0)
    perturb(eng, "critic", 1)
    correct = _lora_grads(eng, "actor")
    eng.use("actor")
    loss = logits(eng).logsumexp(-1).mean()
    with pytest.raises(AdapterSwitchError):
        eng.use("critic")
    with pytest.raises(AdapterSwitchError):
        with eng.reference():
            pass
    eng.backward(loss)  # still allowed, and correct
    got = [p.grad.clone() for p in eng.parameters_of("actor")]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(correct, got))
    for p in eng.parameters_of("actor"):
        p.grad = None
    # the guard removed: switch through peft directly, as a naive loop would
    loss = logits(eng).logsumexp(-1).mean()
    eng.peft.set_adapter("critic")
    loss.backward()
    eng._pending = None
    wrong = [p.grad for p in eng.parameters_of("actor")]
    assert any(w is None or not torch.allclose(a, w, rtol=1e-2, atol=1e-5) for a, w in zip(correct, wrong))


def test_pitfall3_head_saved_with_adapter_and_reloaded_trainable(tiny_llama, tmp_path):
    eng = engine(tiny_llama)
    eng.add_adapter("reward", with_head=True)
    perturb(eng, "reward", 3)
    eng.save_adapter("reward", tmp_path / "reward")
    eng.model.eval()
    with torch.no_grad():
        want = eng.scalar(eng.hidden_states(IDS, AM)[:, -1])
    fresh = engine(tiny_llama)  # a different random head init: a head left random would show
    fresh.load_adapter("critic", tmp_path / "reward")
    fresh.model.eval()
    with torch.no_grad():
        got = fresh.scalar(fresh.hidden_states(IDS, AM)[:, -1])
    assert torch.equal(want, got)
    assert all(p.requires_grad for p in fresh.parameters_of("critic"))
    head = [n for n, p in fresh.model.named_parameters() if "score.modules_to_save.critic" in n]
    assert head, "the critic has its own trainable head copy"


def test_head_in_standard_peft_layout(tiny_llama, tmp_path):
    """plain peft on a sequence-classification model reads adapter + head: same scores."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    eng = engine(tiny_llama, "lora-bf16-shared", dtype="fp32")
    eng.add_adapter("reward", with_head=True)
    perturb(eng, "reward", 4)
    eng.save_adapter("reward", tmp_path / "reward")
    eng.model.eval()
    with torch.no_grad():
        want = eng.scalar(eng.hidden_states(IDS, AM)[:, -1])
    seq = AutoModelForSequenceClassification.from_pretrained(str(tiny_llama), num_labels=1, dtype=torch.float32)
    seq.config.pad_token_id = 0
    plain = PeftModel.from_pretrained(seq, str(tmp_path / "reward")).eval()
    with torch.no_grad():
        got = plain(input_ids=IDS, attention_mask=AM).logits.squeeze(-1)
    assert torch.allclose(want, got, rtol=1e-4, atol=1e-5)


def test_loading_fails_loudly(tiny_llama, tiny_gpt2, tmp_path):
    eng = engine(tiny_llama)
    eng.add_adapter("sft")
    eng.save_adapter("sft", tmp_path / "sft")
    # a policy adapter has no head: refusing it as a critic beats a random head
    with pytest.raises(UserError, match="no scalar head"):
        engine(tiny_llama).load_adapter("critic", tmp_path / "sft", with_head=True)
    # an adapter from another base model
    other = engine(tiny_gpt2)
    other.add_adapter("sft")
    other.save_adapter("sft", tmp_path / "gpt2-sft")
    with pytest.raises(UserError, match="another base model|does not fit|unexpected"):
        engine(tiny_llama).load_adapter("sft", tmp_path / "gpt2-sft")
    # a file missing a tensor
    from safetensors.torch import load_file, save_file

    f = tmp_path / "sft" / "adapter_model.safetensors"
    sd = load_file(str(f))
    sd.pop(next(iter(sd)))
    save_file(sd, str(f))
    with pytest.raises(UserError, match="missing from the file"):
        engine(tiny_llama).load_adapter("sft", tmp_path / "sft")


def test_fast_switch_leaves_the_state_peft_would(tiny_llama):
    """Issue 17: `use()` and `reference()` touch only the adapter layers found once, not every
    module. After each switch the outputs, the heads' values, every parameter's requires_grad and
    peft's active adapter are what peft's own set_adapter / disable_adapter leave."""
    eng = engine(tiny_llama, "lora-bf16-shared", dtype="fp32", lora_dropout=0.0)
    eng.add_adapter("critic", with_head=True)
    eng.add_adapter("reward", with_head=True)
    eng.add_adapter("actor")
    for i, name in enumerate(("critic", "reward", "actor")):
        perturb(eng, name, seed=i)

    def state():
        h = eng.hidden_states(IDS, AM)
        return (h, eng.scalar(h) if eng.heads.get(eng.active) else None,
                {n: p.requires_grad for n, p in eng.model.named_parameters()}, eng.peft.active_adapter)

    with torch.no_grad():
        for name in ("critic", "actor", "reward", "critic", "actor"):
            eng.use(name)
            ours = state()
            eng.peft.set_adapter(name)  # peft's own switch, walking every module
            theirs = state()
            assert torch.equal(ours[0], theirs[0]) and ours[2] == theirs[2] and ours[3] == theirs[3] == name
            assert (ours[1] is None) == (theirs[1] is None) and (ours[1] is None or torch.equal(ours[1], theirs[1]))
        before = state()
        with eng.reference():
            ref = eng.hidden_states(IDS, AM)
        with eng.peft.disable_adapter():
            assert torch.equal(ref, eng.hidden_states(IDS, AM))
        after = state()
        assert not torch.equal(ref, before[0])  # the reference really is the bare base
        assert torch.equal(after[0], before[0]) and after[2] == before[2] and after[3] == before[3]
