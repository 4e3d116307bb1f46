"""Shared fixtures: tiny random models built from configs and saved once per test session.

No mocks: every fixture is a real transformers model folder that the real loading code reads.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from lowmem_rlhf.random_models import save_random, tiny_gpt2_config, tiny_llama_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_random(tiny_llama_config(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return save_random(tiny_gpt2_config(), tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (real weights), converted once per machine into the cache."""
    from lowmem_rlhf.embedded import ensure_default_model

    return ensure_default_model(progress=False)
