"""Model loading per profile, for architectures found by inspection, on CPU."""

from __future__ import annotations

import pytest
import torch

from lowmem_rlhf.config import load_profile
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.loading import load_model, lora_target_names, output_layer


@pytest.mark.parametrize("profile", ["qlora-shared", "lora-bf16-shared"])
@pytest.mark.parametrize("fixture,linears,out", [
    ("tiny_llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "lm_head"),
    ("tiny_gpt2", ["c_attn", "c_proj", "c_fc"], "lm_head"),
])
def test_load_architectures(request, fixture, linears, out, profile):
    loaded = load_model(str(request.getfixturevalue(fixture)), load_profile(profile))
    m = loaded.model
    assert lora_target_names(m) == linears
    assert output_layer(m)[0] == out
    assert not any(p.requires_grad for p in m.parameters())
    if profile == "qlora-shared":
        import bitsandbytes as bnb

        q = [x for x in m.modules() if isinstance(x, bnb.nn.Linear4bit)]
        assert len(q) == 4 * len(set(linears)) + (4 if fixture == "tiny_gpt2" else 0)  # GPT-2: c_proj twice
        assert all(x.support_avx512bf16_for_cpu is False for x in q)  # pitfall 1 guard
    assert loaded.spec.extra_params == 0  # the spec accounts for every real parameter, 4-bit included


def test_output_layer_not_named_lm_head(tiny_glm):
    """ChatGLM-style: remote code, output projection `output_layer`; found by inspection."""
    with pytest.raises(UserError, match="--trust-remote-code"):
        load_model(str(tiny_glm), load_profile("qlora-shared"))
    loaded = load_model(str(tiny_glm), load_profile("qlora-shared"), trust_remote_code=True)
    name, mod = output_layer(loaded.model)
    assert name == "output_layer" and "lm_head" not in dict(loaded.model.named_modules())
    assert loaded.spec.output_layer == "output_layer"
    from lowmem_rlhf.model.adapters import SharedBase

    eng = SharedBase(loaded, load_profile("qlora-shared"))
    eng.add_adapter("sft")
    ids = torch.randint(4, 200, (2, 8))
    logits = eng.logits(eng.hidden_states(ids, torch.ones_like(ids)))
    assert logits.shape == (2, 8, 1000)


def test_bad_model_folders(tmp_path, tiny_llama):
    with pytest.raises(UserError, match="no config.json"):
        load_model(str(tmp_path), load_profile("qlora-shared"))
    from lowmem_rlhf.model.random_models import byte_tokenizer

    byte_tokenizer().save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="a tokenizer but no config.json"):
        load_model(str(tmp_path), load_profile("qlora-shared"))
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(UserError, match="no weights"):
        load_model(str(tmp_path), load_profile("qlora-shared"))
    with pytest.raises(UserError, match="no such folder"):
        load_model(str(tmp_path / "nope"), load_profile("qlora-shared"))


def test_remote_code_runs_only_with_the_flag(tiny_glm, capsys):
    """Planning a stage for a custom-code model: refused with the flag named, built with it."""
    from lowmem_rlhf.cli import main
    from lowmem_rlhf.plan.model_spec import load_spec

    with pytest.raises(UserError, match="pass --trust-remote-code to run it"):
        load_spec(str(tiny_glm))
    spec = load_spec(str(tiny_glm), trust_remote_code=True)
    real = load_model(str(tiny_glm), load_profile("lora-bf16-shared"), trust_remote_code=True)
    assert spec.output_layer == "output_layer" and spec.total_params == real.spec.total_params
    try:
        main(["plan", "--model", str(tiny_glm)])
    except SystemExit as e:
        assert e.code == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    main(["plan", "--model", str(tiny_glm), "--trust-remote-code"])
    assert "chosen:" in capsys.readouterr().out
