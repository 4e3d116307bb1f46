"""Counted bytes of real tensors, under the estimator's component names.

What the estimator predicts, this module measures on a loaded model: weight storage (including
bitsandbytes quantization constants), adapter/head parameters, gradients, optimizer state, the
tensors autograd saves for backward (each storage once, parameters excluded) and the KV cache that
`generate` builds. Used by the estimator's validation tests and by the stages' memory reports.
"""

from __future__ import annotations

from typing import Iterator

import torch


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr())


def tensor_storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def quant_state_tensors(qs) -> Iterator[torch.Tensor]:
    """Tensors inside a bitsandbytes QuantState (absmax, code, nested state, offset)."""
    if qs is None:
        return
    for name in ("absmax", "code", "offset"):
        t = getattr(qs, name, None)
        if isinstance(t, torch.Tensor):
            yield t
    nested = getattr(qs, "state2", None)
    if nested is not None:
        yield from quant_state_tensors(nested)


def weight_storage_bytes(model: torch.nn.Module, is_adapter=None) -> dict[str, int]:
    """Bytes of every parameter storage, split into base weights and trainable/adapter ones.

    Returns {"weights": base params + quantization constants, "trainable": params with
    requires_grad, or those `is_adapter(name)` selects when given}. Shared (tied) storages count
    once. Buffers (rotary tables) are excluded: they are tiny and not weights.
    """
    seen: set[tuple[str, int]] = set()
    out = {"weights": 0, "trainable": 0}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = _storage_key(p)
        if key in seen:
            continue
        seen.add(key)
        adapter = is_adapter(name) if is_adapter is not None else p.requires_grad
        part = "trainable" if adapter else "weights"
        out[part] += tensor_storage_bytes(p)
        for t in quant_state_tensors(getattr(p, "quant_state", None)):
            k = _storage_key(t)
            if k not in seen:
                seen.add(k)
                out["weights"] += tensor_storage_bytes(t)
        scb = getattr(p, "SCB", None)  # bitsandbytes int8 row scales
        if isinstance(scb, torch.Tensor) and _storage_key(scb) not in seen:
            seen.add(_storage_key(scb))
            out["weights"] += tensor_storage_bytes(scb)
    return out


def grad_bytes(model: torch.nn.Module) -> int:
    return sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state, each storage once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                k = _storage_key(v)
                if k not in seen:
                    seen.add(k)
                    total += tensor_storage_bytes(v)
    return total


class SavedTensorCounter:
    """Counts the bytes autograd keeps for backward during a forward pass.

    Inside the context, every tensor saved for backward is recorded once per storage; parameters
    (and their quantization state) are excluded, since they are weights, not activations. Under
    non-reentrant gradient checkpointing the layers save nothing through these hooks; what is kept
    instead is each checkpointed layer's input, which the counter records through a forward
    pre-hook on the decoder layers (`layers`).
    """

    def __init__(self, model: torch.nn.Module, layers: list[torch.nn.Module] | None = None):
        self.model = model
        self.layers = layers or []
        self.storages: dict[tuple[str, int], int] = {}
        self._exclude = {_storage_key(p) for p in model.parameters()}
        self._handles = []
        self._hooks = None

    def _record(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = _storage_key(t)
        if key not in self._exclude and key not in self.storages:
            self.storages[key] = tensor_storage_bytes(t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._record(t)
        return t

    def _layer_pre_hook(self, module, args, kwargs):
        if torch.is_grad_enabled() and getattr(module, "gradient_checkpointing", False) and module.training:
            hs = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hs, torch.Tensor):
                self._record(hs)

    def __enter__(self) -> "SavedTensorCounter":
        for layer in self.layers:
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre_hook, with_kwargs=True))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def cache_bytes(past_key_values) -> int:
    """Bytes of the key/value tensors in a transformers cache (DynamicCache or legacy tuples)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def visit(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            k = _storage_key(obj)
            if k not in seen:
                seen.add(k)
                total += tensor_storage_bytes(obj)
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o)

    layers = getattr(past_key_values, "layers", None)
    if layers is not None:  # transformers >= 4.56 Cache: .layers[i].keys / .values
        for layer in layers:
            visit([getattr(layer, "keys", None), getattr(layer, "values", None)])
    else:
        visit(past_key_values)
    return total


__all__ = ["weight_storage_bytes", "grad_bytes", "optimizer_state_bytes", "SavedTensorCounter",
           "cache_bytes", "tensor_storage_bytes"]
