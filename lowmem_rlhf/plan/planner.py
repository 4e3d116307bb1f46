"""Pick the profile in which every stage fits, before any weight is loaded.

Profiles are tried in rank order (fidelity first, then speed). For each, the micro-batch is halved
from the profile's value down to 1 (gradient accumulation rises so the effective batch stays) until
every requested stage fits the budget with a safety margin; a profile with checkpointing is first
tried without it, since recomputation costs a third more compute. At each of these, PPO's
generation batch (rollout rows sampled at once, each chunk's KV cache freed before the next) is
halved first, as long as the generation phase is what does not fit. The first profile that fits is chosen;
every rejected one keeps the reason and by how much it missed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from lowmem_rlhf.config import RL_STAGES, STAGES, Profile, Shape, deepspeed_missing
from lowmem_rlhf.errors import NoFit, UserError
from lowmem_rlhf.plan.estimator import (
    GIB,
    ZERO3_PPO_REASON,
    Estimate,
    estimate,
    generation_rows,
    parks_idle_state,
)
from lowmem_rlhf.plan.hardware import Hardware, cpu_native_bf16
from lowmem_rlhf.plan.model_spec import ModelSpec

SAFETY_MARGIN = 0.05  # keep 5% of the budget free: fragmentation spikes, other processes


@dataclass
class Candidate:
    profile: Profile  # resolved: micro_batch / grad_ckpt / dtype as the planner set them
    estimates: dict[str, Estimate]
    fits: bool
    reason: str  # why it fits or does not
    short_bytes: int = 0  # how much the worst stage misses by (0 when it fits)
    grad_accum: int = 1  # micro-batches per optimizer step for the shape's effective batch (the stages derive it too)
    levers: list[dict[str, Any]] = field(default_factory=list)  # memory levers on, and what each saves (`levers`)

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "fits": self.fits,
            "reason": self.reason,
            "short_gib": self.short_bytes / GIB,
            "micro_batch": self.profile.micro_batch,
            "grad_accum": self.grad_accum,
            "levers": list(self.levers),
            "stages": {s: e.to_dict() for s, e in self.estimates.items()},
        }


@dataclass
class Plan:
    hardware: Hardware
    spec: ModelSpec
    shape: Shape
    stages: tuple[str, ...]
    candidates: list[Candidate] = field(default_factory=list)
    # data-parallel processes on this node (torchrun --nproc_per_node): every estimate is per
    # process (each holds the whole base: data parallel does not shard it), and the node's CPU RAM
    # is shared by them (`hardware` is already this process's share)
    processes: int = 1

    @property
    def chosen(self) -> Candidate | None:
        """The first (best-ranked) profile that fits and that the stages run (`runnable_profiles`):
        what every stage picks for the same machine and shape."""
        return next((c for c in self.candidates if c.fits and c.profile.is_lora), None)

    @property
    def target(self) -> str:
        return self.hardware.device

    def budget(self) -> tuple[int, str]:
        return budget_bytes(self.hardware)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        return {
            "hardware": self.hardware.to_dict(),
            "model": self.spec.name,
            "model_params": self.spec.total_params,
            "shape": self.shape.to_dict(),
            "stages": list(self.stages),
            "processes": self.processes, "estimates_are": "per process (per GPU)",
            "global_batch": self.shape.batch * self.processes,
            "global_rollout_batch": self.shape.rollout_batch * self.processes,
            "budget_gib": self.budget()[0] / GIB,
            "chosen": chosen.to_dict() if chosen else None,
            "chosen_profile": chosen.profile.to_dict() if chosen else None,
            "candidates": [c.to_dict() for c in self.candidates],
            "advice": None if chosen else advice(self),
        }


def budget_bytes(hw: Hardware) -> tuple[int, str]:
    """(bytes available to the stage, what they are) for the planning target."""
    if hw.gpu is not None:
        return hw.gpu.free_bytes, f"{hw.gpu.name} VRAM"
    return hw.cpu_ram_free_bytes, "CPU RAM"


def adapt_to_hardware(profile: Profile, hw: Hardware) -> tuple[Profile | None, str]:
    """The profile as it must run on this hardware, or None with the reason it cannot."""
    if profile.offload == "zero3" and hw.gpu is None:
        return None, "ZeRO-3 offload needs a CUDA GPU"
    if profile.offload == "zero3" and (missing := deepspeed_missing()):
        return None, missing
    if hw.gpu is not None and profile.dtype == "bf16" and not hw.gpu.bf16:
        if profile.lora_r == 0:
            return None, f"{hw.gpu.name} has no bf16 and pure fp16 full fine-tuning diverges"
        return replace(profile, dtype="fp16"), "fp16 compute (no bf16 on this GPU)"
    if hw.gpu is None:
        return cpu_compute(profile, hw.cpu_bf16)
    return profile, ""


def cpu_compute(profile: Profile, cpu_bf16: bool) -> tuple[Profile, str]:
    """(the profile as a CPU runs it, the note when it changed): a 16-bit profile computes in fp32
    on a CPU without fast bf16, where torch emulates 16-bit matmuls about 25x slower (docs/speed.md)."""
    if profile.dtype == "fp32" or cpu_bf16:
        return profile, ""
    return replace(profile, dtype="fp32"), "fp32 compute (this CPU has no fast bf16: it would run ~25x slower)"


def machine_profile(profile: Profile) -> Profile:
    """`profile` as this machine runs it (`cpu_compute` when there is no GPU), for a profile the
    planner did not pick: one named with --profile (CLI) or saved by a run on another machine
    (`eval`). A profile built in code runs as built unless its caller asks for this: the tests
    whose subject is not the dtype do; those about 16-bit behaviour pin theirs (docs/speed.md)."""
    import torch  # deferred, as in plan.hardware

    return profile if torch.cuda.is_available() else cpu_compute(profile, cpu_native_bf16())[0]


def _evaluate(spec: ModelSpec, profile: Profile, shape: Shape, hw: Hardware, stages,
              data_parallel: bool = False, reward_model: bool = False) -> Candidate:
    target = hw.device
    budget, what = budget_bytes(hw)
    usable = int(budget * (1 - SAFETY_MARGIN))
    ests = {s: estimate(spec, profile, s, shape, target=target, reward_model=reward_model,
                        data_parallel=data_parallel) for s in stages}
    worst_stage, worst_short = None, 0
    for s, e in ests.items():
        need = e.device if target == "cuda" else e.cpu_ram
        if need - usable > worst_short:
            worst_stage, worst_short = s, need - usable
    # host RAM must also hold what lives there (offloaded weights, the process)
    ram_usable = int(hw.cpu_ram_free_bytes * (1 - SAFETY_MARGIN))
    if target == "cuda":
        ram_need = max(e.cpu_ram for e in ests.values())
        if ram_need > ram_usable and ram_need - ram_usable > worst_short:
            return Candidate(profile, ests, False,
                             f"needs {ram_need / GIB:.1f} GiB of CPU RAM, {ram_usable / GIB:.1f} GiB usable",
                             ram_need - ram_usable)
    if worst_stage is not None:
        e = ests[worst_stage]
        need = e.device if target == "cuda" else e.cpu_ram
        return Candidate(profile, ests, False,
                         f"{worst_stage.upper()} needs {need / GIB:.1f} GiB in {e.peak.name} > "
                         f"{usable / GIB:.1f} GiB usable", worst_short)
    return Candidate(profile, ests, True, "fits")


def rl_stage(stages) -> str | None:
    """The RL stage among `stages` (ppo, grpo or rloo), if any."""
    return next((s for s in stages if s in RL_STAGES), None)


def _generation_bound(c: Candidate, hw: Hardware) -> bool:
    """The RL stage does not fit, and its peak is the generation phase (a smaller generation batch helps)."""
    e = c.estimates.get(rl_stage(c.estimates) or "")
    if c.fits or e is None or e.peak.name != "generation":
        return False
    need = e.device if hw.device == "cuda" else e.cpu_ram
    return need > int(budget_bytes(hw)[0] * (1 - SAFETY_MARGIN))


def _halvings(mb: int) -> list[int]:
    out = [mb]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


# On a CPU a larger micro-batch buys no throughput and costs host RAM: SmolLM2-135M, 2-core AVX-512
# VM, bf16, 2026-12-02 (docs/speed.md): SFT at 256 tokens, micro-batch 4 / 2: 6.5 / 6.3 s per step,
# peak RSS 3.95 / 2.50 GiB; RM at 256 tokens, micro-batch 4 / 2 / 1 pairs: 16.4-19.1 / 12.2-13.4 /
# 12.4 s per step, 6.1 / 3.4-3.5 / 2.3 GiB (glibc keeps more freed heap in larger forwards).
CPU_FORWARD_TOKENS = 512


def cpu_micro_batch_cap(stages: tuple[str, ...], shape: Shape) -> int:
    """The largest SFT/RM micro-batch whose forward holds at most CPU_FORWARD_TOKENS tokens at
    shape.seq_len (an RM example is a pair: two sequences); at least 1."""
    per_example = shape.seq_len * (2 if "rm" in stages else 1)
    return max(1, CPU_FORWARD_TOKENS // max(per_example, 1))


def plan(spec: ModelSpec, hw: Hardware, shape: Shape, profiles: list[Profile],
         stages: tuple[str, ...] = STAGES, processes: int = 1, data_parallel: bool | None = None,
         reward_model: bool | None = None) -> Plan:
    """Try every profile (in rank order) at decreasing micro-batch; keep every verdict. processes:
    data-parallel processes on this node, each planned as one card with its own share of the
    node's CPU RAM (shape.batch and shape.rollout_batch are per process); data_parallel (default:
    processes > 1): one process of a launched world (DDP's buckets counted), also where it is the
    node's only one. reward_model: GRPO/RLOO scores with a reward adapter + head (default: when
    "rm" is among the stages; `grpo --reward-model` plans it alone); PPO always has one."""
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise UserError(f"--stages: unknown stage(s) {', '.join(bad)}; use any of {', '.join(STAGES)}")
    if sum(s in RL_STAGES for s in stages) > 1:
        raise UserError(f"--stages: one RL stage at a time ({', '.join(s for s in stages if s in RL_STAGES)} given); "
                        "plan each with its own --algo")
    rl = rl_stage(stages)
    reward_model = "rm" in stages if reward_model is None else reward_model
    if processes > 1:  # the node's RAM holds every process's host-side share
        hw = replace(hw, cpu_ram_free_bytes=hw.cpu_ram_free_bytes // processes)
    result = Plan(hw, spec, shape, tuple(stages), processes=processes)
    for base in sorted(profiles, key=lambda p: (p.rank, p.name)):
        prof, note = adapt_to_hardware(base, hw)
        if prof is None:
            result.candidates.append(Candidate(base, {}, False, note, 0))
            continue
        if prof.offload == "zero3" and rl:
            result.candidates.append(Candidate(
                prof, {}, False, f"{ZERO3_PPO_REASON}; plan SFT/RM with --stages sft,rm", 0))
            continue
        best = None
        mb0 = max(1, min(prof.micro_batch, shape.batch))
        capped = hw.device != "cuda" and not rl and mb0 > cpu_micro_batch_cap(stages, shape)
        if capped:  # SFT/RM on a CPU: at most CPU_FORWARD_TOKENS tokens per forward (RL stages keep theirs)
            mb0 = next(m for m in _halvings(mb0) if m <= cpu_micro_batch_cap(stages, shape))
        # fastest first: no recomputation if it fits, then checkpointing at halving micro-batches
        trials = [(False, mb0)] if prof.grad_ckpt else []
        trials += [(prof.grad_ckpt, mb) for mb in _halvings(mb0)]
        # PPO's generation batch comes first at each trial: the largest that fits the generation phase
        # (it only sets the KV cache and the prefill; the training knobs do not touch that phase)
        gens = _halvings(generation_rows(prof, shape.rollout_batch)) if rl else [prof.generation_batch]
        for ckpt, mb in trials:
            for g in gens:
                cand_prof = replace(prof, micro_batch=mb, grad_ckpt=ckpt, generation_batch=g)
                cand = _evaluate(spec, cand_prof, shape, hw, stages,
                                 processes > 1 if data_parallel is None else data_parallel, reward_model)
                cand.grad_accum = math.ceil(shape.batch / mb)
                best = cand
                if cand.fits or not _generation_bound(cand, hw):
                    break
            if cand.fits:
                if not ckpt and prof.grad_ckpt:
                    cand.reason = "fits without gradient checkpointing (faster)"
                elif mb < prof.micro_batch:
                    cand.reason = f"fits at micro-batch {mb} x {cand.grad_accum} accumulation"
                if capped and mb == mb0:
                    cand.reason += (f"; micro-batch {mb}: at most {CPU_FORWARD_TOKENS} tokens per forward on a CPU "
                                    "(no slower, less host RAM)")
                if rl and g < shape.rollout_batch:
                    cand.reason += f", sampling {g} of {shape.rollout_batch} rollout rows at a time"
                if note:
                    cand.reason += f"; {note}"
                break
        if best.fits:
            best.levers = levers(spec, best, shape, hw)
        if not best.fits:
            best.reason += ", even at micro-batch 1" + (" and generation batch 1" if _generation_bound(best, hw) else "")
        if best.fits and not best.profile.is_lora:
            best.reason += "; estimated only: the stages of this version run LoRA profiles"
        result.candidates.append(best)
        if best.fits and best.profile.is_lora:
            break
    return result


def levers(spec: ModelSpec, c: Candidate, shape: Shape, hw: Hardware) -> list[dict[str, Any]]:
    """The RL stage's memory levers the candidate runs with, and what each saves in its phases (GiB):
    the generation batch (against sampling the whole rollout at once) and the idle role's
    optimizer state parked in host RAM (against every optimizer's state resident)."""
    stage = rl_stage(c.estimates)
    if stage is None:
        return []
    e = c.estimates[stage]
    out = []
    phases = {p.name: p for p in e.phases}
    B, g = shape.rollout_batch, generation_rows(c.profile, shape.rollout_batch)
    if g < B:
        full = {p.name: p for p in estimate(spec, replace(c.profile, generation_batch=0), stage, shape,
                                            target=hw.device, reward_model="rm" in c.estimates).phases}
        saved = full["generation"].device - phases["generation"].device if hw.device == "cuda" else \
            full["generation"].cpu_ram - phases["generation"].cpu_ram
        out.append({"lever": "generation batch", "setting": f"{g} of {B} rollout rows sampled at once",
                    "saves_gib": {"generation": saved / GIB}})
    if c.profile.is_lora and parks_idle_state(c.profile.optimizer, hw.device):
        gen_host, upd = phases["generation"].host, phases["actor_update"].components["optimizer"]
        saves = {"generation": gen_host / GIB, "scoring": gen_host / GIB, "actor_update": (gen_host - upd) / GIB}
        if "critic_update" in phases:
            saves["critic_update"] = upd / GIB
        out.append({"lever": "idle optimizer state in host RAM",
                    "setting": f"{c.profile.optimizer} state on the device only in its role's update",
                    "saves_gib": saves})
    return out


def runnable_profiles(profiles: list[Profile]) -> list[Profile]:
    """Profiles the training stages of this version execute: LoRA adapters, on a shared base or
    under ZeRO-3 offload (SFT and RM only; the planner refuses it for PPO). full-bf16 is
    estimated and planned, not run."""
    return [p for p in profiles if p.is_lora]


def choose_profile(spec: ModelSpec, hw: Hardware, shape: Shape, profiles: list[Profile],
                   stages: tuple[str, ...], processes: int = 1, data_parallel: bool | None = None,
                   reward_model: bool | None = None) -> Candidate:
    """The planner's pick (`Plan.chosen`, as `lowmem-rlhf plan` shows it), or a one-line NoFit
    error with advice."""
    p = plan(spec, hw, shape, runnable_profiles(profiles), stages, processes, data_parallel, reward_model)
    if p.chosen is None:
        raise no_fit(p)
    return p.chosen


def no_fit(p: Plan) -> NoFit:
    """The one-line error (exit code 1) for a plan where nothing fits, naming the knob to change."""
    budget, what = p.budget()
    return NoFit(f"no profile fits {p.spec.name} ({', '.join(p.stages)}) in {budget / GIB:.2f} GiB of {what}: "
                 f"{advice(p)}")


def advice(p: Plan) -> str:
    """What to change when nothing fits: the knob that closes the gap, with figures."""
    tried = [c for c in p.candidates if c.estimates]
    if not tried:
        return "no profile applies to this hardware"
    best = min(tried, key=lambda c: c.short_bytes)
    budget, what = p.budget()
    s = p.shape
    worst = max(best.estimates.items(), key=lambda kv: kv[1].device if p.target == "cuda" else kv[1].cpu_ram)
    stage, est = worst
    weights = est.components.get("weights", 0)
    parts = [f"closest is {best.profile.name}, {best.short_bytes / GIB:.1f} GiB short ({best.reason})"]
    if weights > budget * (1 - SAFETY_MARGIN):
        parts.append(f"its weights alone take {weights / GIB:.1f} GiB of {budget / GIB:.1f} GiB {what}: "
                     "use a smaller model or a GPU with more memory (--gpu / --vram)")
    elif stage in RL_STAGES:
        parts.append(f"lower --response-len (now {s.response_len}), --prompt-len ({s.prompt_len}) or "
                     f"--rollout-batch ({s.rollout_batch}), or use a GPU with more memory")
    else:
        parts.append(f"lower --seq-len (now {s.seq_len}) or use a GPU with more memory")
    return "; ".join(parts)


__all__ = ["Plan", "Candidate", "plan", "advice", "no_fit", "choose_profile", "runnable_profiles", "budget_bytes", "SAFETY_MARGIN"]
