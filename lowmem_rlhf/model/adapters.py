"""One frozen base carrying named LoRA adapters and their scalar heads.

Roles: `sft`/`actor` (policy adapters), `reward` and `critic` (adapter + scalar head). The PPO
reference policy is the base with adapters disabled. `SharedBase.use()` is the only place in the
code that switches adapters.

Heads are a `score` Linear(hidden, 1) attached to the base and listed in the adapter's
`modules_to_save`, so each adapter owns its copy and saves it *inside* its standard PEFT files
(`base_model.model.score.weight`): `PeftModel.from_pretrained(AutoModelForSequenceClassification
(base, num_labels=1), folder)` restores adapter and head together, exactly as trl's RewardTrainer
output would.

Guards for the silent failures in docs/pitfalls.md:
* #2 checkpointing + adapter switch: backward recomputes with the adapter active *at backward
  time*, and `set_adapter` freezes the inactive adapter. `use()` refuses to switch while a training
  forward awaits its backward; call `backward(loss)` per adapter while it is active.
* #3 heads: explicit LoRA target lists (never "all-linear", which wraps the head), the head in
  `modules_to_save` (trainable, saved), and loading fails on any unexpected or missing key.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from lowmem_rlhf.config import Profile
from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.loading import (
    LoadedModel,
    backbone,
    guard_bnb_cpu_repack,
    lora_target_names,
    output_layer,
)
from lowmem_rlhf.model.loading import read_adapter_meta as read_meta

HEAD = "score"  # same attribute name as transformers' *ForSequenceClassification heads
META_FILE = "lowmem_rlhf_adapter.json"


def lora_config(profile: Profile, targets, with_head: bool = False):
    """The peft LoraConfig of a profile's adapters on the explicit `targets` (never "all-linear",
    which would wrap the scalar head too: docs/pitfalls.md #3); with_head: the head is saved with it."""
    from peft import LoraConfig

    return LoraConfig(r=profile.lora_r, lora_alpha=profile.lora_alpha, lora_dropout=profile.lora_dropout,
                      target_modules=list(targets), modules_to_save=[HEAD] if with_head else None, bias="none")


class AdapterSwitchError(RuntimeError):
    """Switching adapters between a checkpointed forward and its backward (pitfall #2 in docs/pitfalls.md)."""


class SharedBase:
    """A frozen base + named adapters (+ heads). Forward helpers return logits or scalar values."""

    def __init__(self, loaded: LoadedModel, profile: Profile, seed: int = 0):
        self.loaded = loaded
        self.profile = profile
        self.seed = seed
        self.targets = lora_target_names(loaded.model, profile.lora_targets)
        self.peft = None  # the PeftModel once the first adapter exists
        self.heads: dict[str, bool] = {}  # adapter -> has a scalar head
        self.active: str | None = None
        self._pending: str | None = None  # adapter whose training forward awaits backward
        self.scalers: dict[str, torch.amp.GradScaler] = {}  # adapter -> fp16 loss scale (runtime.optim.make_scaler)
        self._layers: tuple[list, list] | None = None  # (peft's auxiliary wrappers, its tuner layers), found once
        # adapter -> the data-parallel wrapper its training forwards run through (runtime.distributed.
        # AdapterSync: DDP over that adapter's parameters); empty in a world of one process
        self.grad_sync: dict[str, Any] = {}

    # ---- adapters ------------------------------------------------------------------------------
    def _ensure_head(self) -> None:
        """Attach the scalar head (frozen original; each adapter with a head gets its own copy) the
        first time an adapter needs one, so policy-only runs carry no head at all."""
        lm = self.loaded.model
        if hasattr(lm, HEAD):
            return
        hidden = lm.config.get_text_config().hidden_size
        gen = torch.Generator().manual_seed(self.seed)
        head = torch.nn.Linear(hidden, 1, bias=False, dtype=torch.float32)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, hidden, generator=gen) / hidden**0.5)
        head.requires_grad_(False)
        setattr(lm, HEAD, head.to(self.loaded.device))

    @property
    def model(self) -> torch.nn.Module:
        return self.peft if self.peft is not None else self.loaded.model

    def _lora_config(self, with_head: bool):
        return lora_config(self.profile, self.targets, with_head)

    def add_adapter(self, name: str, with_head: bool = False, zero_head: bool = False) -> None:
        """A fresh adapter (LoRA B = 0: starts as the base); with a trainable head copy if asked.

        zero_head: the copy starts at 0, so the scalar is 0 for every input until trained. A fresh
        PPO critic uses it: a random head gives values of order 1, noise of the size of a 0/1
        reward in the first GAE advantages (measured on the solver example: first-iteration value
        loss 1.23 with the random head, 0.09 with the zero one)."""
        from peft import get_peft_model

        if name in self.heads:
            raise ValueError(f"adapter {name!r} exists")
        if with_head:
            self._ensure_head()
        cfg = self._lora_config(with_head)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.peft is None:
                self.peft = get_peft_model(self.loaded.model, cfg, adapter_name=name)
            else:
                self.peft.add_adapter(name, cfg)
        self.heads[name] = with_head
        if with_head and zero_head:
            with torch.no_grad():
                getattr(self.loaded.model, HEAD).modules_to_save[name].weight.zero_()
        guard_bnb_cpu_repack(self.model)
        self._layers = None  # new adapter modules: find the layers again
        self.use(name)

    def load_adapter(self, name: str, path: str | Path, trainable: bool = True, with_head: bool | None = None) -> None:
        """Load a saved adapter (and its head) under `name`; any missing/unexpected key is an error."""
        from peft import PeftModel

        path = Path(path)
        if not (path / "adapter_config.json").exists():
            raise UserError(f"{path}: not an adapter folder (no adapter_config.json)")
        meta = read_meta(path)
        self.check_compatible(path, meta)
        has_head = bool(meta.get("head", False)) if with_head is None else with_head
        if has_head and not meta.get("head", False):
            raise UserError(f"{path}: adapter has no scalar head; a critic/reward needs one (train it with `lowmem-rlhf rm`)")
        if has_head:
            self._ensure_head()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.loaded.model, str(path), adapter_name=name,
                                                          is_trainable=trainable)
                else:
                    self.peft.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
            except (RuntimeError, ValueError, KeyError) as e:  # shape mismatch, no matching modules
                raise UserError(f"{path}: adapter does not fit this base ({str(e).splitlines()[0][:160]}...); "
                                "it was trained on a different model") from None
        self.heads[name] = has_head
        self._check_loaded(name, path)
        guard_bnb_cpu_repack(self.model)
        self._layers = None  # new adapter modules: find the layers again
        self.use(name)

    def _check_loaded(self, name: str, path: Path) -> None:
        """Both directions, bit for bit: every tensor in the file is in adapter `name`, and every
        parameter of adapter `name` came from the file (nothing left at its random init)."""
        from safetensors.torch import load_file

        saved = load_file(str(path / "adapter_model.safetensors"))
        mine = {n: p for n, p in self.model.named_parameters() if _belongs(n, name)}
        by_key = {_file_key(n, name): p for n, p in mine.items()}
        unexpected = [k for k in saved if k not in by_key]
        missing = [k for k in by_key if k not in saved]
        if unexpected:
            raise UserError(f"{path}: {len(unexpected)} unexpected key(s) not loaded into adapter {name!r}, "
                            f"e.g. {unexpected[0]}; the adapter does not match this base")
        if missing:
            raise UserError(f"{path}: {len(missing)} key(s) of adapter {name!r} missing from the file, e.g. "
                            f"{missing[0]} (a head left random?); re-save the adapter")
        for k, v in saved.items():
            if not torch.equal(by_key[k].detach().cpu().to(v.dtype), v):
                raise UserError(f"{path}: tensor {k} did not load bit-identically")

    def check_compatible(self, path: Path, meta: dict) -> None:
        base = meta.get("base")
        if base and base != self.loaded.fingerprint:
            diff = {k: (base.get(k), v) for k, v in self.loaded.fingerprint.items() if base.get(k) != v}
            raise UserError(f"{path}: adapter was trained on another base model (saved vs this: {diff}); "
                            f"use --model {meta.get('source', 'the original base')}")

    def use(self, name: str) -> None:
        """Activate one adapter (and its head copy); only it is trainable. The one switch."""
        if self._pending is not None and self._pending != name:
            raise AdapterSwitchError(
                f"switching to adapter {name!r} while {self._pending!r} awaits backward: with gradient "
                "checkpointing the backward would recompute with the wrong adapter; call backward() first")
        if name not in self.heads:
            raise KeyError(f"no adapter {name!r}; have {list(self.heads)}")
        if name == self.active:
            return
        aux, layers = self.adapter_layers()
        for m in aux:  # the heads' copies (peft.utils.other._set_adapter, without its walk over every module)
            m.set_adapter(name if name in m._adapters else [], inference_mode=False)
        for m in layers:  # each LoRA layer (peft.tuners.tuners_utils.set_adapter, same)
            m.set_adapter(name, inference_mode=False)
        self.peft.active_adapter = name  # what PeftModel.set_adapter records
        self.peft.base_model.active_adapter = name
        self.active = name

    def adapter_layers(self) -> tuple[list, list]:
        """peft's auxiliary wrappers (the heads' `modules_to_save`) and its tuner (LoRA) layers, found
        by one walk over the model after each added adapter: a switch then touches only them
        (peft's own `set_adapter` and `disable_adapter` walk all modules each time: 13 and 55 ms on
        SmolLM2-135M, per switch)."""
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            mods = list(self.peft.modules())
            self._layers = ([m for m in mods if isinstance(m, AuxiliaryTrainingWrapper)],
                            [m for m in mods if isinstance(m, BaseTunerLayer)])
        return self._layers

    @contextlib.contextmanager
    def reference(self):
        """The bare base (all adapters off): the PPO reference policy."""
        if self._pending is not None:
            raise AdapterSwitchError(f"adapter {self._pending!r} awaits backward; call backward() first")
        if self.peft is None:
            yield
            return
        aux, layers = self.adapter_layers()
        for m in (*layers, *aux):  # what peft's disable_adapter() does, without walking every module
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in (*layers, *aux):
                m.enable_adapters(True)

    def train_forward(self, fn: Callable, *args: Any, last: bool = True) -> Any:
        """fn(*args): a training forward of the active adapter (its loss), through that adapter's
        data-parallel wrapper when there is one. last: the step's last micro-batch, whose backward
        averages the gradients across processes (the earlier ones accumulate locally)."""
        sync = self.grad_sync.get(self.active)
        return fn(*args) if sync is None else sync(fn, *args, last=last)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward while the adapter that produced `loss` is still active; under fp16 the loss
        is multiplied by that adapter's loss scale first (`scalers`)."""
        scaler = self.scalers.get(self.active)
        (loss if scaler is None else scaler.scale(loss)).backward()
        self._pending = None

    def abandon(self) -> None:
        """Forget a training forward whose backward will never run (a step that ran out of memory)."""
        self._pending = None

    def owns(self, name: str | None = None):
        """owns(param_name) -> True for parameters of adapter `name` (LoRA A/B and its head copy)."""
        name = name or self.active
        return lambda param_name: _belongs(param_name, name)

    def parameters_of(self, name: str | None = None) -> list[torch.nn.Parameter]:
        """Parameters owned by adapter `name` (LoRA A/B and its head copy)."""
        name = name or self.active
        return [p for n, p in self.model.named_parameters() if _belongs(n, name)]

    # ---- forward helpers ----------------------------------------------------------------------
    def _mark(self) -> None:
        if torch.is_grad_enabled() and self.model.training and self.profile.grad_ckpt and self.active:
            self._pending = self.active

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Last hidden states (B, S, H) of the backbone with whatever adapter is active.

        Positions come from the attention mask, as `generate` computes them, so left-padded rollouts
        see the same positions in scoring and training as they did when sampled."""
        self._mark()
        if attention_mask is None:
            # unpadded rows (the simulation's, on meta tensors): default positions 0..S-1 and no mask,
            # so transformers runs causal SDPA, as CUDA does (its mask checks would read data)
            out = backbone(self.loaded.model)(input_ids=input_ids, use_cache=False)
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            out = backbone(self.loaded.model)(input_ids=input_ids, attention_mask=attention_mask,
                                              position_ids=position_ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Output-layer logits for hidden states (..., H) -> (..., V), in the output layer's dtype."""
        _, out = output_layer(self.loaded.model)
        return out(hidden.to(out.weight.dtype) if out.weight.dtype.is_floating_point else hidden)

    def scalar(self, hidden: torch.Tensor) -> torch.Tensor:
        """The active adapter's head on hidden states (..., H) -> (...,) in fp32."""
        head = getattr(self.loaded.model, HEAD)
        return head(hidden.float()).squeeze(-1)

    # ---- saving --------------------------------------------------------------------------------
    def save_adapter(self, name: str, out_dir: str | Path, extra_meta: dict | None = None) -> Path:
        """Write adapter `name` (+ head) in the standard PEFT layout, plus our metadata file."""
        out_dir = Path(out_dir)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
        try:
            self.peft.save_pretrained(str(tmp), selected_adapters=[name])
            src = tmp / name if (tmp / name / "adapter_config.json").exists() else tmp
            meta = {"adapter": name, "head": self.heads[name], "base": self.loaded.fingerprint,
                    "source": self.loaded.source, "targets": self.targets, **(extra_meta or {})}
            (src / META_FILE).write_text(json.dumps(meta, indent=2))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            src.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out_dir


def disable_dropout(model: torch.nn.Module) -> int:
    """Every dropout of the model off, for the RL stages: nn.Dropout modules (LoRA's included, also
    those of adapters loaded with their own dropout) get p = 0 (torch then returns the input
    itself: no mask, no copy), attention-probability dropout rates 0. -> how many were on."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            n += 1
        for attr in ("attention_dropout", "dropout_p"):
            if isinstance(getattr(module, attr, None), float) and getattr(module, attr) > 0:
                setattr(module, attr, 0.0)
                n += 1
    return n


def _belongs(param_name: str, adapter: str) -> bool:
    return (f".lora_A.{adapter}." in param_name or f".lora_B.{adapter}." in param_name
            or f"{HEAD}.modules_to_save.{adapter}." in param_name)


def _file_key(param_name: str, adapter: str) -> str:
    """The key peft writes for a parameter of `adapter` (adapter name dropped, head unwrapped)."""
    return (param_name.replace(f".{adapter}.", ".", 1)
            .replace(f"{HEAD}.modules_to_save.", f"{HEAD}.", 1))


__all__ = ["SharedBase", "AdapterSwitchError", "disable_dropout", "read_meta", "HEAD", "META_FILE"]
