"""Shared fixtures: tiny random models built from configs and saved once per test session.

No mocks: every fixture is a real transformers model folder that the real loading code reads.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from lowmem_rlhf.model.random_models import (
    save_random,
    tiny_gpt2_config,
    tiny_llama_config,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_random(tiny_llama_config(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def byte_llama(tmp_path_factory):
    """The tiny Llama with the byte tokenizer's vocabulary (260): every sampled id decodes to text.
    test_ppo, test_ppo_exact and test_resume override it with larger initial weights."""
    cfg = tiny_llama_config()
    cfg.vocab_size = 260
    return save_random(cfg, tmp_path_factory.mktemp("byte-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return save_random(tiny_gpt2_config(), tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (real weights), converted once per machine into the cache."""
    from lowmem_rlhf.model.embedded import ensure_default_model

    return ensure_default_model(progress=False)


@pytest.fixture(scope="session")
def tiny_glm(tmp_path_factory):
    """Remote-code model (needs --trust-remote-code) whose output projection is `output_layer`."""
    import importlib.util
    import json
    import shutil
    from pathlib import Path

    src = Path(__file__).parent / "assets" / "tinyglm" / "modeling_tinyglm.py"
    spec = importlib.util.spec_from_file_location("modeling_tinyglm", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = tiny_llama_config().to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        base.pop(k, None)
    cfg = mod.TinyGLMConfig(**base)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-glm")
    mod.TinyGLMForCausalLM(cfg).save_pretrained(str(folder))
    from lowmem_rlhf.model.random_models import byte_tokenizer

    byte_tokenizer().save_pretrained(str(folder))
    shutil.copy(src, folder / src.name)
    conf = json.loads((folder / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "modeling_tinyglm.TinyGLMConfig",
                        "AutoModelForCausalLM": "modeling_tinyglm.TinyGLMForCausalLM"}
    conf["architectures"] = ["TinyGLMForCausalLM"]
    (folder / "config.json").write_text(json.dumps(conf))
    return folder
