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

from lowmem_rlhf import counting
from lowmem_rlhf.config import Profile, Shape
from lowmem_rlhf.estimator import estimate, kv_cache_bytes
from lowmem_rlhf.model_spec import ModelSpec, find_decoder_layers, spec_from_config

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_for_profile(folder: str | Path, profile: Profile):
    """Load a causal LM folder with the profile's dtype/quantization, LoRA and checkpointing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = TORCH_DTYPES[profile.dtype]
    kwargs: dict = {"dtype": dtype, "attn_implementation": profile.attn_impl}
    if profile.quant in ("nf4", "fp4"):
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=profile.quant,
            bnb_4bit_use_double_quant=profile.double_quant, bnb_4bit_compute_dtype=dtype)
    elif profile.quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if profile.quant != "none" and profile.kbit_fp32_upcast:
        for p in model.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.to(torch.float32)
    import bitsandbytes as bnb

    for m in model.modules():  # facts-and-pitfalls #1: no inference-only CPU repack
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    spec = spec_from_config(model.config.to_dict(), name=Path(folder).name)
    if profile.is_lora:
        targets = [lin.name for lin in spec.resolve_targets(profile.lora_targets)]
        model = get_peft_model(model, LoraConfig(
            r=profile.lora_r, lora_alpha=profile.lora_alpha, lora_dropout=profile.lora_dropout,
            target_modules=sorted(set(targets)), task_type="CAUSAL_LM"))
    if profile.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model, spec


def make_optimizer(params, name: str, lr: float = 1e-4) -> torch.optim.Optimizer:
    if name in ("adamw",):
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr)


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
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], profile.optimizer)
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
