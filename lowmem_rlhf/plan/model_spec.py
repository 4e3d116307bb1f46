"""Model specs without weights: the shapes the memory estimator needs.

A `ModelSpec` is built from a `config.json` (a local folder or file, a hub id on machines with
internet, or a built-in preset). For architectures transformers knows, the model is instantiated on
the **meta** device (no memory, ~1 s for a 7B) and its layers are *inspected*: every linear-like
module (``nn.Linear``, GPT-2's ``Conv1D``, anything with a 2-D weight and in/out features) of one
decoder layer is listed with its shape, and the output projection is found with
``get_output_embeddings()``, whatever it is called. Architectures that need remote code (ChatGLM)
get their spec from the config keys directly.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from lowmem_rlhf.errors import UserError


@dataclass(frozen=True)
class LinearSpec:
    """One linear layer inside a decoder layer (repeated `num_layers` times)."""

    name: str  # attribute name, e.g. "q_proj", "c_attn", "query_key_value"
    in_features: int
    out_features: int
    bias: bool
    kind: str  # "linear" | "conv1d"
    block: str  # "attn" | "mlp"
    role: str  # "in" (reads the block input) | "out" (the block's output projection)

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the estimator needs about a causal LM, and nothing that costs memory."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    max_positions: int
    norm: str  # "rmsnorm" | "layernorm"
    activation: str  # e.g. "silu", "gelu_new", "relu"
    gated_mlp: bool
    linears: tuple[LinearSpec, ...]  # one decoder layer's linears, in forward order
    output_layer: str  # name of the output projection module ("lm_head", "output_layer", ...)
    output_bias: bool = False
    norms_per_layer: int = 2
    final_norm: bool = True
    position_embeddings: int = 0  # rows of a learned position table (GPT-2, OPT), 0 for RoPE
    attn_dropout: float = 0.0
    hidden_dropout: float = 0.0
    source: str = ""
    extra_params: int = 0  # parameters not covered by the fields above (counted, never trained)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:
        return sum(lin.params for lin in self.linears)

    @property
    def norm_params_per_norm(self) -> int:
        return self.hidden_size * (2 if self.norm == "layernorm" else 1)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size + self.position_embeddings * self.hidden_size

    @property
    def output_params(self) -> int:
        """Output projection parameters not shared with the input embedding."""
        if self.tie_embeddings:
            return 0
        return self.vocab_size * self.hidden_size + (self.vocab_size if self.output_bias else 0)

    @property
    def norm_params(self) -> int:
        per = self.norm_params_per_norm
        return self.num_layers * self.norms_per_layer * per + (per if self.final_norm else 0)

    @property
    def total_params(self) -> int:
        return (
            self.embedding_params
            + self.num_layers * self.layer_linear_params
            + self.output_params
            + self.norm_params
            + self.extra_params
        )

    def linear_names(self) -> list[str]:
        return [lin.name for lin in self.linears]

    def resolve_targets(self, targets: str | list[str] | tuple[str, ...]) -> list[LinearSpec]:
        """The decoder-layer linears a LoRA target list selects ("all-linear" = every one)."""
        if targets == "all-linear" or targets == ["all-linear"]:
            return list(self.linears)
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        names = self.linear_names()
        unknown = [t for t in targets if t not in names]
        if unknown:
            raise UserError(
                f"LoRA target(s) {', '.join(unknown)} not in {self.name}; its linear layers are: "
                f"{', '.join(names)} (or use all-linear)"
            )
        return [lin for lin in self.linears if lin.name in targets]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_params"] = self.total_params
        return d


# ---- presets: numbers are those of each model's published config.json -------------------------
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
    ),
    "llama-2-13b": dict(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
        max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
    ),
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu",
        tie_word_embeddings=False,
    ),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
        max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096, hidden_act="silu",
        tie_word_embeddings=False,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
        tie_word_embeddings=False,
    ),
    "chatglm3-6b": dict(
        model_type="chatglm", hidden_size=4096, ffn_hidden_size=13696, num_layers=28,
        num_attention_heads=32, multi_query_attention=True, multi_query_group_num=2, kv_channels=128,
        padded_vocab_size=65024, seq_length=8192, add_qkv_bias=True, add_bias_linear=False,
        rmsnorm=True, post_layer_norm=True, tie_word_embeddings=False,
    ),
    "gpt2": dict(
        model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
        activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        tie_word_embeddings=True,
    ),
    "opt-1.3b": dict(
        model_type="opt", hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
        num_attention_heads=32, vocab_size=50272, max_position_embeddings=2048,
        word_embed_proj_dim=2048, do_layer_norm_before=True, activation_function="relu",
        dropout=0.1, attention_dropout=0.0, enable_bias=True, tie_word_embeddings=True,
    ),
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, hidden_act="silu",
        tie_word_embeddings=True,
    ),
}
PRESET_ALIASES = {
    "llama2-7b": "llama-2-7b", "llama-7b": "llama-2-7b", "7b": "llama-2-7b",
    "llama2-13b": "llama-2-13b", "13b": "llama-2-13b", "llama3-8b": "llama-3-8b",
    "mistral": "mistral-7b", "qwen2.5": "qwen2.5-7b", "qwen2.5-7b-instruct": "qwen2.5-7b",
    "chatglm3": "chatglm3-6b", "chatglm": "chatglm3-6b", "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
}


def preset_names() -> list[str]:
    return list(PRESET_CONFIGS)


def _linear_features(module) -> tuple[int, int, bool, str] | None:
    """(in, out, bias, kind) for any linear-like module, None otherwise."""
    w = getattr(module, "weight", None)
    if w is None or getattr(w, "dim", lambda: 0)() != 2 or list(module.children()):
        return None
    bias = getattr(module, "bias", None) is not None
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features), bias, "linear"
    if hasattr(module, "nf") and hasattr(module, "nx"):  # transformers' Conv1D: weight (in, out)
        return int(module.nx), int(module.nf), bias, "conv1d"
    return None


def find_decoder_layers(model):
    """The largest ModuleList of identical blocks: the decoder layers, whatever they're called."""
    import torch.nn as nn

    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if len({type(m) for m in mod}) == 1 and (best is None or len(mod) > len(best)):
                best = mod
    if best is None:
        raise UserError(f"{type(model).__name__}: no stack of decoder layers found")
    return best


def inspect_layer_linears(layer) -> tuple[LinearSpec, ...]:
    """Linear-like modules of one decoder layer, tagged attn/mlp and in/out by inspection.

    The attention block is the child module whose class name contains "Attention" (or "attn");
    every other linear belongs to the MLP. In each block the *last* registered linear is the
    output projection; the others read the block's input.
    """
    found: list[tuple[str, str, tuple[int, int, bool, str]]] = []
    for qual, mod in layer.named_modules():
        feats = _linear_features(mod)
        if feats is None:
            continue
        parts = qual.split(".")
        in_attn = any(
            "attention" in type(m).__name__.lower() or "attn" in p.lower()
            for p, m in _ancestors(layer, parts)
        )
        found.append((parts[-1], "attn" if in_attn else "mlp", feats))
    specs = []
    for block in ("attn", "mlp"):
        members = [f for f in found if f[1] == block]
        for i, (name, blk, (fin, fout, bias, kind)) in enumerate(members):
            role = "out" if i == len(members) - 1 and len(members) > 1 else "in"
            specs.append(LinearSpec(name, fin, fout, bias, kind, blk, role))
    return tuple(specs)


def _ancestors(root, parts):
    mod = root
    out = []
    for p in parts[:-1]:
        mod = getattr(mod, p)
        out.append((p, mod))
    return out


def _first(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _spec_from_meta(name: str, cfg: dict[str, Any], source: str) -> ModelSpec:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = cfg.get("model_type")
    try:
        config = AutoConfig.for_model(**cfg)
    except (ValueError, KeyError) as e:
        if "auto_map" in cfg:
            raise UserError(f"{source}: model_type {model_type!r} is the model's own Python code (auto_map); "
                            "pass --trust-remote-code to run it, only for a model you trust") from None
        raise UserError(
            f"{source}: model_type {model_type!r} is not known to transformers "
            f"{transformers.__version__}; upgrade transformers or pass --trust-remote-code "
            f"with a local model folder ({e})"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{source}: transformers cannot build a causal LM from it: {e}") from None
    return spec_from_model(model, name, source, cfg)


def spec_from_model(model, name: str, source: str, cfg: dict[str, Any] | None = None) -> ModelSpec:
    """Inspect an instantiated causal LM (meta or real): layers, linears, output layer, norms."""
    import torch

    config = model.config
    cfg = cfg if cfg is not None else config.to_dict()
    layers = find_decoder_layers(model)
    layer = layers[0]
    linears = inspect_layer_linears(layer)
    out_mod = model.get_output_embeddings()
    out_name = next((n for n, m in model.named_modules() if m is out_mod), "lm_head").split(".")[-1]
    in_emb = model.get_input_embeddings()
    tied = out_mod is not None and out_mod.weight is in_emb.weight
    norm_mods = [m for m in layer.modules() if "norm" in type(m).__name__.lower()]
    norm_kind = "rmsnorm" if any("rms" in type(m).__name__.lower() for m in norm_mods) else "layernorm"
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(_first(cfg, "num_key_value_heads", default=heads))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    mlp_in = [lin for lin in linears if lin.block == "mlp" and lin.role == "in"]
    inter = max((lin.out_features for lin in mlp_in), default=4 * hidden)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # tied weights once; bitsandbytes 4-bit stores 2 weights per byte
        if id(p) not in seen:
            seen.add(id(p))
            total += _logical_numel(p)
    pos_rows = 0
    for m in model.modules():
        if m is not in_emb and isinstance(m, torch.nn.Embedding) and m.weight.shape[1] == hidden:
            pos_rows += int(m.weight.shape[0])  # learned position table (GPT-2 wpe, OPT embed_positions)
    spec = ModelSpec(
        name=name,
        model_type=str(cfg.get("model_type", getattr(config, "model_type", "custom"))),
        hidden_size=hidden,
        num_layers=len(layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(inter),
        vocab_size=int(in_emb.weight.shape[0]),
        tie_embeddings=bool(tied),
        max_positions=int(_first(cfg, "max_position_embeddings", "n_positions", default=2048)),
        norm=norm_kind,
        activation=str(_first(cfg, "hidden_act", "activation_function", default="silu")),
        gated_mlp=len(mlp_in) >= 2,
        linears=linears,
        output_layer=out_name,
        output_bias=getattr(out_mod, "bias", None) is not None,
        norms_per_layer=len(norm_mods),
        final_norm=True,
        position_embeddings=pos_rows,
        attn_dropout=float(_first(cfg, "attention_dropout", "attn_pdrop", default=0.0)),
        hidden_dropout=float(_first(cfg, "resid_pdrop", "dropout", "hidden_dropout", default=0.0)),
        source=source,
    )
    return replace(spec, extra_params=total - spec.total_params)


def _logical_numel(p) -> int:
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        n = 1
        for d in qs.shape:
            n *= int(d)
        return n
    return p.numel()


def _spec_chatglm(name: str, cfg: dict[str, Any], source: str) -> ModelSpec:
    """ChatGLM2/3 (remote code, not in transformers): shapes from its config keys."""
    h = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("kv_channels") or h // heads)
    kv_heads = int(cfg.get("multi_query_group_num", heads)) if cfg.get("multi_query_attention") else heads
    ffn = int(cfg["ffn_hidden_size"])
    qkv_bias = bool(cfg.get("add_qkv_bias", True))
    lin_bias = bool(cfg.get("add_bias_linear", False))
    linears = (
        LinearSpec("query_key_value", h, heads * head_dim + 2 * kv_heads * head_dim, qkv_bias, "linear", "attn", "in"),
        LinearSpec("dense", heads * head_dim, h, lin_bias, "linear", "attn", "out"),
        LinearSpec("dense_h_to_4h", h, 2 * ffn, lin_bias, "linear", "mlp", "in"),
        LinearSpec("dense_4h_to_h", ffn, h, lin_bias, "linear", "mlp", "out"),
    )
    return ModelSpec(
        name=name, model_type="chatglm", hidden_size=h, num_layers=int(cfg["num_layers"]),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=ffn,
        vocab_size=int(cfg.get("padded_vocab_size") or cfg["vocab_size"]),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_positions=int(cfg.get("seq_length", 8192)),
        norm="rmsnorm" if cfg.get("rmsnorm", True) else "layernorm", activation="swiglu",
        gated_mlp=True, linears=linears, output_layer="output_layer", norms_per_layer=2,
        final_norm=bool(cfg.get("post_layer_norm", True)), source=source,
    )


def spec_from_config(cfg: dict[str, Any], name: str = "custom", source: str = "config") -> ModelSpec:
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise UserError(f"{source}: not a model config (no 'model_type' field); point --model at a model folder")
    if cfg["model_type"] == "chatglm":
        try:
            return _spec_chatglm(name, cfg, source)
        except KeyError as e:
            raise UserError(f"{source}: ChatGLM config lacks field {e}") from None
    # drop keys that only describe weights on disk / remote code; they don't change shapes
    clean = {k: v for k, v in cfg.items() if k not in ("auto_map", "quantization_config", "torch_dtype", "dtype")}
    try:
        return _spec_from_meta(name, clean, source)
    except UserError as e:
        if "auto_map" in cfg and "is not known to transformers" in str(e):
            raise UserError(f"{source}: model_type {cfg.get('model_type')!r} is the model's own Python code "
                            "(auto_map); pass --trust-remote-code to run it, only for a model you trust") from None
        raise


def read_config_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); fix or re-download the file") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object with model fields, got {type(cfg).__name__}")
    return cfg


@lru_cache(maxsize=32)
def _spec_remote_code(path: Path) -> ModelSpec:
    """A model with its own Python code (auto_map), built on the meta device: only with
    --trust-remote-code, which the caller checked."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=True)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    except Exception as e:  # the model's own code failed: say where, in one line
        raise UserError(f"{path}: its custom model code failed to build ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return spec_from_model(model, path.name, str(path / "config.json"))


def load_spec(model: str, trust_remote_code: bool = False) -> ModelSpec:
    """A spec from a preset name, a local folder / config.json, or a hub id (config only).
    A folder whose config names custom code (auto_map) runs that code only with trust_remote_code."""
    key = model.strip().lower()
    key = PRESET_ALIASES.get(key, key)
    if key in PRESET_CONFIGS:
        return spec_from_config(dict(PRESET_CONFIGS[key]), name=key, source=f"preset {key}")
    path = Path(model).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise UserError(f"{path}: no config.json in this folder; point --model at a Hugging Face model folder (config.json + weights)")
        cfg = read_config_json(cfg_path)
        if trust_remote_code and "auto_map" in cfg and cfg.get("model_type") != "chatglm":
            return _spec_remote_code(path)
        return spec_from_config(cfg, name=path.name, source=str(cfg_path))
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise UserError(f"{path}: file not found")
        return spec_from_config(read_config_json(path), name=path.stem, source=str(path))
    if "/" in model and not model.startswith((".", "/", "~")):
        return spec_from_config(_hub_config(model), name=model, source=f"hub {model}")
    import difflib

    close = difflib.get_close_matches(key, list(PRESET_CONFIGS) + list(PRESET_ALIASES), n=3, cutoff=0.5)
    hint = f"did you mean: {', '.join(close)}? " if close else ""
    raise UserError(
        f"unknown model {model!r}: not a preset, a folder with config.json, or a hub id (org/name); "
        f"{hint}presets: {', '.join(PRESET_CONFIGS)}"
    )


def _hub_config(repo_id: str) -> dict[str, Any]:
    """Download (and cache) only config.json of a hub model."""
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(repo_id, "config.json")
    except Exception as e:  # network errors come in many types; the message is what matters
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"hub model {repo_id!r}: cannot fetch config.json ({first[:160]}); "
            "check the name and your connection, or pass a local folder / preset"
        ) from None
    return read_config_json(Path(local))


def param_count_str(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K"


__all__ = [
    "LinearSpec", "ModelSpec", "PRESET_CONFIGS", "load_spec", "spec_from_config", "spec_from_model", "preset_names",
    "find_decoder_layers", "inspect_layer_linears", "param_count_str", "read_config_json",
]
