"""Typed configs. A profile YAML in `profiles/` is a serialized `Profile`; nothing else holds knobs.

`Profile` says *how* a stage runs (quantization, adapters, checkpointing, optimizer, offload,
micro-batch); `Shape` says *what* it runs on (sequence lengths, batch sizes). The planner changes
only profile fields (micro-batch and gradient accumulation included) and saves the resolved profile
beside every output.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from lowmem_rlhf.errors import UserError

Quant = Literal["none", "nf4", "fp4", "int8"]
DType = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"]
Offload = Literal["none", "zero3"]
Stage = Literal["sft", "rm", "ppo"]
STAGES: tuple[str, ...] = ("sft", "rm", "ppo")

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass
class Profile:
    """How every stage runs. Each field is a knob; the YAML profile files set them."""

    name: str = "custom"
    description: str = ""
    rank: int = 100  # planner order: lower = preferred (higher fidelity / speed)
    # weights
    quant: Quant = "nf4"
    double_quant: bool = True
    dtype: DType = "bf16"  # 16-bit weights and compute dtype
    kbit_fp32_upcast: bool = False  # peft prepare_model_for_kbit_training's fp32 cast of non-quantized params
    # adapters (lora_r = 0 means full fine-tuning)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] | str = "all-linear"
    shared_base: bool = True  # PPO: one frozen base + actor/critic/reward adapters; ref = adapters off
    # memory knobs
    grad_ckpt: bool = True
    optimizer: Optimizer = "paged_adamw_8bit"
    offload: Offload = "none"
    offload_pin_memory: bool = True
    attn_impl: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    micro_batch: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-4

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "profile") -> None:
        if self.quant != "none" and self.lora_r == 0:
            raise UserError(
                f"{source}: quant={self.quant} with lora_r=0 (full fine-tune) is impossible: quantized "
                "weights cannot be trained; set lora_r > 0 (e.g. --lora-r 16) or --quant none"
            )
        if self.lora_r < 0:
            raise UserError(f"{source}: lora_r must be >= 0 (0 = full fine-tune), got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"{source}: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.micro_batch < 1 or self.grad_accum < 1:
            raise UserError(f"{source}: micro_batch and grad_accum must be >= 1")
        if self.offload == "zero3" and self.quant != "none":
            raise UserError(
                f"{source}: offload=zero3 needs a 16-bit base (quant: none); ZeRO-3 partitions "
                "16-bit parameters, bitsandbytes 4/8-bit weights cannot be offloaded by it"
            )
        if self.dtype == "fp16" and self.quant == "none" and self.lora_r == 0:
            raise UserError(f"{source}: pure fp16 full fine-tuning diverges without fp32 master weights; use dtype bf16 or LoRA")

    @property
    def is_lora(self) -> bool:
        return self.lora_r > 0

    @property
    def paged(self) -> bool:
        return self.optimizer.startswith("paged_")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Shape:
    """What a run trains on: lengths in tokens, batch sizes in sequences."""

    seq_len: int = 512  # SFT / RM sequence length (prompt + answer)
    batch: int = 16  # effective batch per optimizer step (micro_batch x grad_accum)
    prompt_len: int = 256  # PPO prompt length
    response_len: int = 256  # PPO generated tokens
    rollout_batch: int = 8  # PPO prompts per rollout

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                flag = "--" + f.name.replace("_", "-")
                raise UserError(f"{flag} must be a positive integer, got {v!r}")

    @property
    def ppo_len(self) -> int:
        return self.prompt_len + self.response_len

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- YAML <-> dataclass, with one-line errors --------------------------------------------------
def _type_ok(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_describe_type(a) for a in get_args(tp))
    if origin is list:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def dataclass_from_dict(cls, data: dict[str, Any], source: str):
    """Build `cls` from a mapping; unknown keys and wrong types are one-line UserErrors."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{source}: unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}")
        if not _type_ok(value, hints[key]):
            raise UserError(f"{source}: field {key!r} must be {_describe_type(hints[key])}, got {value!r}")
    try:
        obj = cls(**data)
    except UserError as e:
        raise UserError(str(e).replace("profile:", f"{source}:", 1)) from None
    if hasattr(obj, "validate"):
        obj.validate(source)
    return obj


def list_profiles(directory: Path = PROFILES_DIR) -> list[Path]:
    return sorted(directory.glob("*.yaml"))


def load_profile(name_or_path: str | Path, directory: Path = PROFILES_DIR) -> Profile:
    """A profile by name (a file in profiles/) or by path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = directory / f"{name_or_path}.yaml"
    if not path.exists():
        names = ", ".join(p.stem for p in list_profiles(directory))
        raise UserError(f"profile {str(name_or_path)!r} not found; available: {names}, or a path to a .yaml file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}:{where} malformed YAML ({problem}); fix the file's syntax") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    data = {} if data is None else data
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return dataclass_from_dict(Profile, data, str(path))


def load_all_profiles(directory: Path = PROFILES_DIR) -> list[Profile]:
    profiles = [load_profile(p) for p in list_profiles(directory)]
    return sorted(profiles, key=lambda p: (p.rank, p.name))


def profile_to_yaml(profile: Profile, header: str = "") -> str:
    body = yaml.safe_dump(profile.to_dict(), sort_keys=False)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    return ("\n".join(lines) + "\n" if lines else "") + body


def replace(obj, **changes):
    """dataclasses.replace that re-runs validation."""
    return dataclasses.replace(obj, **changes)


__all__ = [
    "Profile", "Shape", "STAGES", "load_profile", "load_all_profiles", "list_profiles",
    "dataclass_from_dict", "profile_to_yaml", "PROFILES_DIR", "replace",
]
