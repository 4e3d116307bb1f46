"""Estimator vs counted bytes on a real model, on CPU.

`measure_sft_step` loads a real model folder with a profile's weight settings (16-bit or
bitsandbytes 4-bit / 8-bit), attaches LoRA, runs one SFT training step and counts weights, adapter,
gradient, optimizer-state and saved-activation bytes, then a short `generate` for the KV cache.
`compare` puts those next to the estimator's figures for the same settings. Used by
tests/test_estimator_counted.py and scripts/estimator_vs_counted.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_rlhf.config import Profile, Shape
from lowmem_rlhf.measure import counting
from lowmem_rlhf.model.adapters import lora_config
from lowmem_rlhf.model.loading import load_model, lora_target_names
from lowmem_rlhf.plan.estimator import estimate, kv_cache_bytes
from lowmem_rlhf.plan.model_spec import ModelSpec, find_decoder_layers
from lowmem_rlhf.runtime import optim


def load_for_profile(folder: str | Path, profile: Profile):
    """The project's own loading path, plus LoRA wrapped the plain-peft way (transformers' forward
    with labels, whose full-vocabulary logits the estimator models)."""
    from peft import get_peft_model

    loaded = load_model(str(folder), profile)
    model = loaded.model
    if profile.is_lora:
        targets = lora_target_names(model, profile.lora_targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lora_config(profile, targets))
    model.train()
    return model, loaded.spec


@dataclass
class Counted:
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    kv_cache: int
    kv_tokens: int


def measure_sft_step(folder: str | Path, profile: Profile, shape: Shape, gen_tokens: int = 4,
                     seed: int = 0) -> tuple[Counted, ModelSpec]:
    torch.manual_seed(seed)
    model, spec = load_for_profile(folder, profile)
    w = counting.weight_storage_bytes(model)
    layers = list(find_decoder_layers(model))
    ids = torch.randint(0, spec.vocab_size, (profile.micro_batch, shape.seq_len))
    with counting.SavedTensorCounter(model, layers) as counter:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = counting.grad_bytes(model)
    opt = optim.make_optimizer(model.parameters(), profile.optimizer, lr=1e-4, device="cpu")
    opt.step()
    opt_bytes = counting.optimizer_state_bytes(opt)
    del out
    # KV cache of a short generation (eval mode, no grad)
    model.eval()
    prompt = ids[:, : min(8, shape.seq_len)]
    with torch.no_grad():
        gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=gen_tokens, min_new_tokens=gen_tokens, do_sample=False,
                             return_dict_in_generate=True, use_cache=True, pad_token_id=0)
    kv = counting.cache_bytes(gen.past_key_values)
    kv_tokens = gen.sequences.shape[1] - 1  # the last sampled token is never fed back
    return Counted(w["weights"], w["trainable"], grads, opt_bytes, counter.bytes, kv, kv_tokens), spec


def compare(folder: str | Path, profile: Profile, shape: Shape) -> dict[str, tuple[int, int]]:
    """{component: (estimated, counted)} for one SFT step of `folder` under `profile`."""
    counted, spec = measure_sft_step(folder, profile, shape)
    est = estimate(spec, profile, "sft", shape, target="cpu").phases[0].components
    return {
        "weights": (est["weights"], counted.weights),
        "adapters": (est.get("adapters", 0), counted.adapters),
        "gradients": (est["gradients"], counted.gradients),
        "optimizer": (est["optimizer"], counted.optimizer),
        "activations": (est["activations"], counted.activations),
        "kv_cache": (kv_cache_bytes(spec, profile, profile.micro_batch, counted.kv_tokens), counted.kv_cache),
    }
