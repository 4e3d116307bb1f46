"""Model specs without weights: presets match published totals; configs on disk are inspected."""

from __future__ import annotations

import json

import pytest
import torch

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.plan.model_spec import load_spec, spec_from_config

# Parameter totals of the published checkpoints (sum of numel over their safetensors).
PUBLISHED = {
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096, "qwen2.5-7b": 7_615_616_512, "chatglm3-6b": 6_243_584_000,
    "gpt2": 124_439_808, "opt-1.3b": 1_315_758_080, "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name,total", PUBLISHED.items())
def test_presets_match_published_parameter_counts(name, total):
    assert load_spec(name).total_params == total


def test_gqa_and_head_dims():
    s = load_spec("llama-3-8b")
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.kv_dim) == (32, 8, 128, 1024)
    assert [lin.name for lin in s.linears] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert s.gated_mlp and s.norm == "rmsnorm" and not s.tie_embeddings


def test_chatglm_output_layer_is_not_lm_head():
    s = load_spec("chatglm3-6b")
    assert s.output_layer == "output_layer"
    assert s.linears[0].name == "query_key_value" and s.linears[0].out_features == 4096 + 2 * 2 * 128


def test_gpt2_linears_are_conv1d():
    s = load_spec("gpt2")
    assert {lin.kind for lin in s.linears} == {"conv1d"} and s.norm == "layernorm"
    assert s.tie_embeddings and s.position_embeddings == 1024


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_spec_from_folder_counts_the_real_parameters(request, fixture):
    from transformers import AutoModelForCausalLM

    folder = request.getfixturevalue(fixture)
    spec = load_spec(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert spec.total_params == real
    assert spec.num_layers == 4


def test_renamed_output_layer_found_by_inspection(tiny_llama):
    """A model whose output projection is not called lm_head: found via get_output_embeddings."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class RenamedHead(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.output_layer = self.lm_head
            del self.lm_head

        def get_output_embeddings(self):
            return self.output_layer

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=100, tie_word_embeddings=False)
    with torch.device("meta"):
        model = RenamedHead(cfg)
    from lowmem_rlhf.plan.model_spec import find_decoder_layers, inspect_layer_linears

    layers = find_decoder_layers(model)
    assert len(layers) == 2
    out = model.get_output_embeddings()
    assert next(n for n, m in model.named_modules() if m is out) == "output_layer"
    assert [lin.role for lin in inspect_layer_linears(layers[0])] == ["in", "in", "in", "out", "in", "in", "out"]
    del AutoModelForCausalLM


def test_config_json_errors(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_spec(str(tmp_path))
    bad = tmp_path / "config.json"
    bad.write_text("{ not json")
    with pytest.raises(UserError, match="malformed JSON at line 1"):
        load_spec(str(tmp_path))
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(UserError, match="no 'model_type'"):
        load_spec(str(bad))
    bad.write_text(json.dumps({"model_type": "no-such-arch", "hidden_size": 8}))
    with pytest.raises(UserError, match="not known to transformers"):
        spec_from_config(json.loads(bad.read_text()))


def test_unknown_preset_suggests_close_names():
    with pytest.raises(UserError) as e:
        load_spec("llama-2-7")
    assert "did you mean" in str(e.value) and "llama-2-7b" in str(e.value)
    assert "\n" not in str(e.value)


def test_lora_targets_validated():
    s = load_spec("llama-2-7b")
    assert len(s.resolve_targets("all-linear")) == 7
    assert [lin.name for lin in s.resolve_targets(["q_proj", "v_proj"])] == ["q_proj", "v_proj"]
    with pytest.raises(UserError, match="not in llama-2-7b"):
        s.resolve_targets(["c_attn"])
