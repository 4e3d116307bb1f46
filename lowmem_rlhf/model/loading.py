"""Load a causal LM and its tokenizer the way a profile says, ready to carry LoRA adapters.

Sources: a local folder (config.json + weights), a hub id (users with internet), or the embedded
default `smollm2-135m`. The profile sets the dtype, bitsandbytes 4-/8-bit quantization, the fp32
upcast of k-bit preparation, gradient checkpointing and the attention implementation.

Nothing here knows model families: the output projection is `get_output_embeddings()`, the decoder
stack is the largest ModuleList of identical blocks, and LoRA targets are the linear-like modules
(nn.Linear and its bitsandbytes subclasses, GPT-2's Conv1D) found inside one decoder layer.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_rlhf.config import Profile
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.embedded import DEFAULT_MODEL, resolve_model_path
from lowmem_rlhf.plan.model_spec import (
    ModelSpec,
    find_decoder_layers,
    inspect_layer_linears,
    spec_from_model,
)

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers causal LM, frozen
    tokenizer: object
    spec: ModelSpec
    source: str  # folder or hub id it came from
    fingerprint: dict  # what an adapter must match to be loaded onto this base

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_source(model: str | None) -> str:
    """A loadable folder or hub id; one-line errors for folders that are not models."""
    source = resolve_model_path(model)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {source}: not a folder; point it at a model folder with config.json and weights")
        if not (path / "config.json").exists():
            has_tok = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
            what = "a tokenizer but no config.json" if has_tok else "no config.json"
            raise UserError(f"--model {source}: folder has {what}; it needs config.json and the model weights "
                            "(e.g. save_pretrained output)")
        if not any((path / f).exists() for f in WEIGHT_FILES) and not list(path.glob("*.safetensors")):
            raise UserError(f"--model {source}: no weights (model.safetensors / pytorch_model.bin) next to config.json")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise UserError(f"--model {source}: no such folder, and not a hub id (org/name) or the preset {DEFAULT_MODEL}")
    return source


def fingerprint_of(spec: ModelSpec) -> dict:
    """Shapes an adapter depends on: an adapter from another base fails this check, loudly."""
    return {"model_type": spec.model_type, "hidden_size": spec.hidden_size, "num_layers": spec.num_layers,
            "vocab_size": spec.vocab_size, "total_params": spec.total_params}


def load_tokenizer(source: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, padding_side="right")
    except (OSError, ValueError) as e:
        raise UserError(f"--model {source}: cannot load its tokenizer ({str(e).splitlines()[0][:160]})"
                        + ("" if trust_remote_code else "; if it needs custom code, pass --trust-remote-code")) from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"--model {source}: tokenizer has neither a pad nor an EOS token; add one to tokenizer_config.json")
        tok.pad_token = tok.eos_token  # padding is masked by position, never by id (docs/pitfalls.md #8)
    return tok


def attention_implementation(requested: str) -> str:
    """sdpa by default; flash-attention-2 only when installed and the GPU supports it (sm80+)."""
    if requested != "flash_attention_2":
        return requested
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        return "sdpa"
    return "flash_attention_2" if torch.cuda.get_device_capability()[0] >= 8 else "sdpa"


def guard_bnb_cpu_repack(model: torch.nn.Module) -> int:
    """docs/pitfalls.md #1: on CPUs with avx512_bf16, an eval forward under no_grad rewrites
    4-bit weights into an inference-only layout whose kernel has no backward; LoRA gradients are
    then silently wrong. Turning the repack off on every Linear4bit keeps one trainable layout."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def output_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(qualified name, module) of the output projection, whatever the family calls it."""
    out = model.get_output_embeddings()
    if out is None:
        raise UserError(f"{type(model).__name__} has no output projection (get_output_embeddings() is None)")
    name = next(n for n, m in model.named_modules() if m is out)
    return name, out


# Model-specific maps from the output layer's logits to the distribution the model samples from,
# read from its config. Supported: multiplied (Cohere's logit_scale, output_multiplier), divided
# (Granite's logits_scaling), then softcapped (Gemma-2/3's final_logit_softcapping). A config with a
# logit map we do not apply is refused: its log-probs would belong to another distribution.
LOGIT_MULTIPLIERS = ("logit_scale", "output_multiplier")
LOGIT_DIVISORS = ("logits_scaling",)
UNSUPPORTED_LOGIT_MAPS = ("lm_head_multiplier", "mup_output_alpha", "logits_soft_cap")


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) of the model's own logits: softcap(z * scale). One-line UserError for a
    config whose logit map is not applied here."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in UNSUPPORTED_LOGIT_MAPS:
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            raise UserError(f"{type(cfg).__name__}: its logits go through {key}={getattr(cfg, key)}, which "
                            "lowmem-rlhf does not apply to PPO's log-probs yet; use another model")
    scale = 1.0
    for key in LOGIT_MULTIPLIERS:
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            scale *= float(v)
    for key in LOGIT_DIVISORS:
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v:
            scale /= float(v)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the output layer (returns last hidden states)."""
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    if inner is None or inner is model:
        raise UserError(f"{type(model).__name__}: cannot find its backbone (base_model_prefix={prefix!r})")
    return inner


def lora_target_names(model: torch.nn.Module, targets: str | list[str] = "all-linear") -> list[str]:
    """Names of the decoder-layer linears LoRA wraps, found by inspection.

    Always an explicit list: "all-linear" in peft also wraps a scalar head (pitfall #3 in docs/pitfalls.md)."""
    names = []
    for lin in inspect_layer_linears(find_decoder_layers(model)[0]):
        if lin.name not in names:
            names.append(lin.name)
    if targets == "all-linear" or targets == ["all-linear"]:
        return names
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise UserError(f"lora_targets {unknown} not in this model; its decoder linears are {names}")
    return list(targets)


def _quant_config(profile: Profile):
    from transformers import BitsAndBytesConfig

    dtype = TORCH_DTYPES[profile.dtype]
    if profile.quant in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=profile.quant,
                                  bnb_4bit_use_double_quant=profile.double_quant, bnb_4bit_compute_dtype=dtype)
    if profile.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_context(config, source: str, tokens: int, flag: str) -> None:
    """Sequences longer than the model's positions are a one-line error before any weight loads."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions", "seq_length")
                  if isinstance(getattr(text, k, None), int)), None)
    if limit is not None and tokens > limit:
        raise UserError(f"{flag} asks for {tokens} tokens but {source} has a context of {limit} "
                        f"(max_position_embeddings in its config.json); lower {flag.split(' ')[0]}")


def load_model(model: str | None, profile: Profile, trust_remote_code: bool = False,
               merge_adapters: tuple[str | Path, ...] = (), training: bool = True,
               context: tuple[int, str] | None = None) -> LoadedModel:
    """Load base + tokenizer per profile; optionally merge finished adapters (e.g. SFT) into it.
    context=(tokens, flag): refuse, before loading weights, sequences longer than the model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = resolve_source(model)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)  # fails early, with the flag hint
    except ValueError as e:
        msg = str(e).splitlines()[0][:200]
        hint = "" if trust_remote_code else "; if the model needs custom code, pass --trust-remote-code"
        raise UserError(f"--model {source}: transformers cannot read its config ({msg}){hint}") from None
    except OSError as e:
        raise UserError(f"--model {source}: {str(e).splitlines()[0][:200]}") from None
    if context is not None:
        check_context(config, source, *context)
    tokenizer = load_tokenizer(source, trust_remote_code)
    # ZeRO-3 offload: the base stays in CPU RAM (it may not fit the GPU); DeepSpeed partitions it
    on_gpu = torch.cuda.is_available() and profile.offload != "zero3"
    device_map = {"": torch.cuda.current_device()} if on_gpu else None
    kwargs = dict(dtype=TORCH_DTYPES[profile.dtype], attn_implementation=attention_implementation(profile.attn_impl),
                  trust_remote_code=trust_remote_code)
    qc = _quant_config(profile)
    if qc is not None:
        kwargs["quantization_config"] = qc
    if device_map is not None:
        kwargs["device_map"] = device_map
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            lm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"--model {source}: cannot load the weights ({str(e).splitlines()[0][:200]})") from None
    guard_bnb_cpu_repack(lm)
    spec = spec_from_model(lm, name=Path(source).name or source, source=source)
    fingerprint = fingerprint_of(spec)
    for path in merge_adapters:
        saved = read_adapter_meta(path).get("base")
        if saved and saved != fingerprint:
            diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
            raise UserError(f"{path}: adapter does not fit this base: it was trained on another model "
                            f"(saved vs --model: {diff})")
        lm = merge_adapter(lm, path)
    prepare_base(lm, profile, training)
    return LoadedModel(lm, tokenizer, spec, source, fingerprint)


def prepare_base(lm: torch.nn.Module, profile: Profile, training: bool = True) -> None:
    """What every loaded base goes through (real weights or the meta rehearsal in simulate.py):
    frozen, k-bit fp32 upcast of non-quantized params when the profile asks, checkpointing."""
    for p in lm.parameters():
        p.requires_grad_(False)
    if profile.quant != "none" and profile.kbit_fp32_upcast:
        for p in lm.parameters():
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.to(torch.float32)
    if training and profile.grad_ckpt:
        enable_checkpointing(lm)
    lm.config.use_cache = False


def enable_checkpointing(lm: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer; inputs require grad so a
    frozen embedding still lets gradients reach the first layer's adapters."""
    enable = getattr(lm, "activation_checkpointing_enable", None)  # transformers >= 5.2
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.enable_input_require_grads()


def merge_adapter(lm: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Merge a finished LoRA adapter (e.g. the SFT policy) into the base weights.

    For a 4-bit base peft dequantizes each layer, adds B@A*scale and quantizes again (one rounding),
    so every role of a later stage sees the same merged base."""
    from peft import PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").exists():
        raise UserError(f"{path}: not an adapter folder (no adapter_config.json); pass the stage output folder")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(lm, str(path))
    except (RuntimeError, ValueError, KeyError) as e:  # shape mismatch, no matching modules
        raise UserError(f"{path}: adapter does not fit this base model ({str(e).splitlines()[0][:160]}...); "
                        "use the base model it was trained on") from None
    merged = peft_model.merge_and_unload()
    guard_bnb_cpu_repack(merged)
    return merged


def read_adapter_meta(path: str | Path) -> dict:
    """The adapter's lowmem_rlhf_adapter.json ({} for adapters saved by other tools)."""
    meta = Path(path) / "lowmem_rlhf_adapter.json"
    if not meta.exists():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta}: malformed JSON ({e.msg}); the run folder is damaged, re-run the stage") from None


__all__ = ["LoadedModel", "load_model", "load_tokenizer", "resolve_source", "output_layer", "backbone",
           "lora_target_names", "logit_transform", "guard_bnb_cpu_repack", "merge_adapter", "attention_implementation",
           "fingerprint_of", "read_adapter_meta", "enable_checkpointing", "prepare_base", "TORCH_DTYPES"]
