"""Estimated vs measured memory of a finished stage, under the estimator's component names."""

from __future__ import annotations

from typing import Any

from lowmem_rlhf.measure import counting
from lowmem_rlhf.plan.estimator import GIB, Estimate


def counted_components(model, optimizer=None) -> dict[str, int]:
    """Bytes of the real tensors: base weights, every adapter + head (active or not, trainable or
    frozen: peft freezes inactive adapters, so requires_grad does not tell them apart), optimizer."""
    w = counting.weight_storage_bytes(model, is_adapter=lambda name: "lora_" in name or "score" in name)
    out = {"weights": w["weights"], "adapters": w["trainable"]}
    if optimizer is not None:
        out["optimizer"] = counting.optimizer_state_bytes(optimizer)
    return out


def trainer_counts(trainer) -> dict[str, int]:
    """What a stage's trainer holds, counted: its model's tensors and optimizer state, or under
    ZeRO-3 the host bytes DeepSpeed holds (`cpu_offload`)."""
    offloaded = getattr(trainer, "offloaded_bytes", None)
    if offloaded is not None:
        return {"cpu_offload": offloaded()}
    return counted_components(trainer.shared.model, trainer.optimizer)


def memory_report(est: Estimate, peaks: dict[str, dict[str, int]], counted: dict[str, int]) -> dict[str, Any]:
    """{phase: {figure: [estimated, measured]}}, plus components [estimated, counted]."""
    phases = {}
    for ph in est.phases:
        m = peaks.get(ph.name) or peaks.get("train_step") or {}
        figs = {}
        for fig in ("allocated", "reserved", "device", "cpu_ram"):
            if fig in m:
                figs[fig] = [getattr(ph, fig), m[fig]]
        phases[ph.name] = figs
    comps = {}
    for name, value in counted.items():
        if name == "adapters":
            # the estimator books heads separately; trainable params hold both
            e = est.peak.components.get("adapters", 0) + est.peak.components.get("heads", 0)
        elif name == "cpu_offload":  # host RAM DeepSpeed holds under ZeRO-3
            e = est.peak.cpu_offload
        else:
            e = est.peak.components.get(name, 0)
        comps[name] = [e, value]
    return {"target": est.target, "phases": phases, "components": comps,
            "note": "estimate is for the planned maximum lengths; measured batches are padded to their longest row"}


def print_memory_report(report: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"memory: estimated vs measured ({report['target']}, GiB)")
    t.add_column("phase / component")
    t.add_column("figure")
    t.add_column("estimated", justify="right")
    t.add_column("measured", justify="right")
    for phase, figs in report["phases"].items():
        for fig, (e, m) in figs.items():
            t.add_row(phase, fig, f"{e / GIB:.3f}", f"{m / GIB:.3f}")
    t.add_section()
    for name, (e, c) in report["components"].items():
        t.add_row(name, "counted", f"{e / GIB:.3f}", f"{c / GIB:.3f}")
    console.print(t)
