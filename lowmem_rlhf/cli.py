"""`lowmem-rlhf`: plan, estimate and run RLHF stages on one GPU (or the CPU).

Every command answers bad input with one line (`error: <what, where, how to fix>`) and exit code 2;
`plan`/`auto --dry-run` exit 1 when nothing fits. Human output is rich tables; `--json` is for
scripts.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lowmem_rlhf import __version__
from lowmem_rlhf.config import (
    GIB,
    RL_STAGES,
    AutoConfig,
    GRPOConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
)
from lowmem_rlhf.errors import UserError

app = typer.Typer(
    name="lowmem-rlhf",
    help="SFT, reward-model and PPO training on one consumer GPU. `plan` tells you, before a byte "
    "of weights is loaded, which memory profile makes every stage fit your card.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

GPU_HELP = ("GPU preset to plan for (e.g. 3090, 4090, 3060-12gb, t4, a100-80gb); default: the GPU "
            "detected here, or the CPU when there is none")
MODEL_HELP = ("model preset (llama-2-7b, llama-2-13b, llama-3-8b, mistral-7b, qwen2.5-7b, chatglm3-6b, "
              "gpt2, opt-1.3b, smollm2-135m), a local folder with config.json, or a hub id")


def option(cls, name: str, *aliases: str, required: bool = False, **kw):
    """The typer option of a config field: its flag, default and help as the dataclass declares
    them (`config.knob`), so each knob is declared once."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
    if f.default is True and "/" not in flag:  # a switch that is on by default needs its off form
        flag = f"{flag}/--no-{flag[2:]}"
    default = ... if required else f.default
    return typer.Option(default, flag, *aliases, help=f.metadata.get("help", ""), **kw)


def _config(cls, values: dict, profile):
    """A stage config from a command's arguments: every parameter named like one of its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names and k != "profile"}, profile=profile)


def _choice(cls, **values: str) -> None:
    """One-line errors for a value outside a Literal field's choices."""
    hints = typing.get_type_hints(cls)
    for name, v in values.items():
        allowed = typing.get_args(hints[name])
        if v not in allowed:
            raise UserError(f"--{name.replace('_', '-')} must be {' or '.join(allowed)}, got {v!r}")

def _gib(b: int) -> str:
    return f"{b / GIB:.2f}"


def _hardware(gpu, vram, ram, max_vram=None):
    from lowmem_rlhf.plan.hardware import resolve_hardware

    return resolve_hardware(gpu=gpu, vram_gib=vram, ram_gib=ram, max_vram_gib=max_vram)


def _shape(seq_len, batch, prompt_len, response_len, rollout_batch):
    from lowmem_rlhf.config import Shape

    return Shape(seq_len=seq_len, batch=batch, prompt_len=prompt_len, response_len=response_len,
                 rollout_batch=rollout_batch)


def _profiles(names: Optional[str]):
    from lowmem_rlhf.config import load_all_profiles, load_profile

    if names:
        return [load_profile(n.strip()) for n in names.split(",") if n.strip()]
    return load_all_profiles()


def _stages(text: str, algo: str = "ppo") -> tuple[str, ...]:
    """--stages, with --algo's RL stage in place of `ppo` (sft,rm,ppo --algo grpo -> sft,rm,grpo)."""
    _algo(algo)
    stages = tuple(s.strip().lower() for s in text.split(",") if s.strip())
    if not stages:
        raise UserError("--stages: give at least one of sft, rm, ppo (ppo: the RL stage --algo names)")
    return tuple(algo if s == "ppo" else s for s in stages)


def _algo(algo: str) -> str:
    if algo not in RL_STAGES:
        raise UserError(f"--algo must be {', '.join(RL_STAGES)}, got {algo!r}")
    return algo


ALGO_HELP = "RL algorithm: ppo (actor + critic), grpo or rloo (critic-free, groups of responses per prompt)"


def _rollout(rollout_batch: Optional[int], algo: str) -> int:
    """--rollout-batch's default: 8 responses for PPO, 8 prompts x 4 for GRPO/RLOO."""
    return rollout_batch if rollout_batch is not None else (8 if algo == "ppo" else 32)


def print_plan(p) -> None:
    """Candidates table, the chosen profile and its per-stage breakdown."""
    from lowmem_rlhf.plan.estimator import generation_rows
    from lowmem_rlhf.plan.model_spec import param_count_str

    budget, what = p.budget()
    s = p.shape
    console.print(f"[bold]Plan[/bold] for {p.spec.name} ({param_count_str(p.spec.total_params)} params) on "
              f"{p.hardware.describe()}")
    rl = next((st for st in p.stages if st in RL_STAGES), None)
    console.print(f"budget: {_gib(budget)} GiB of {what}; SFT/RM seq {s.seq_len}, batch {s.batch}; "
              f"{(rl or 'ppo').upper()} prompt {s.prompt_len} + response {s.response_len}, rollout batch "
              f"{s.rollout_batch}")
    n = p.processes
    console.print(f"estimates are per {'GPU' if p.target == 'cuda' else 'process'}" + (
        f": data parallel over {n} processes, each holding the whole base and its adapters (the same peak as "
        f"one card); they share this node's CPU RAM (budgeted {_gib(p.hardware.cpu_ram_free_bytes)} GiB each); "
        f"global batch {n} x {s.batch} = {n * s.batch}, global rollout {n} x {s.rollout_batch} = "
        f"{n * s.rollout_batch}" if n > 1 else
        "; under torchrun --nproc_per_node N each GPU holds the same (data parallel replicates the base), "
        "and --batch/--rollout-batch are per GPU"))
    fig = "device" if p.target == "cuda" else "cpu_ram"
    t = Table(title=f"peak {'GPU (nvidia-smi)' if p.target == 'cuda' else 'CPU RAM'} GiB per stage")
    t.add_column("profile")
    ppo = rl is not None
    t.add_column("micro x accum, ckpt" + (", gen" if ppo else ""))
    for st in p.stages:
        t.add_column(st.upper(), justify="right")
    if p.target == "cuda":  # what the stages hold in host RAM (ZeRO-3 offload puts the model there)
        t.add_column("CPU RAM", justify="right")
    t.add_column("verdict")
    for c in p.candidates:
        row = [c.profile.name, (f"{c.profile.micro_batch} x {c.grad_accum}, "
                                f"{'on' if c.profile.grad_ckpt else 'off'}"
                                + (f", {generation_rows(c.profile, s.rollout_batch)}" if ppo else ""))
               if c.estimates else "-"]
        for st in p.stages:
            e = c.estimates.get(st)
            row.append(_gib(getattr(e, fig)) if e else "-")
        if p.target == "cuda":
            row.append(_gib(max(e.cpu_ram for e in c.estimates.values())) if c.estimates else "-")
        row.append(("[green]fits[/green] " if c.fits and c.profile.is_lora else "[yellow]fits[/yellow], estimated only"
                    if c.fits else "[red]no[/red]: ") + (c.reason if not c.fits else ""))
        t.add_row(*row)
    console.print(t)
    chosen = p.chosen
    if chosen is None:
        return
    console.print(f"[bold green]chosen: {chosen.profile.name}[/bold green] ({chosen.profile.description}); "
              f"micro-batch {chosen.profile.micro_batch} x {chosen.grad_accum} accumulation"
              + (f"; {rl.upper()} samples {generation_rows(chosen.profile, s.rollout_batch)} rollout rows at a time"
                 if ppo else "") + ". "
              f"{chosen.reason}.")
    for lv in chosen.levers:
        saves = ", ".join(f"{v:.2f} GiB in {ph.replace('_', ' ')}" for ph, v in lv["saves_gib"].items())
        console.print(f"lever on: {lv['lever']} ({lv['setting']}): saves {saves}")
    rejected = [c for c in p.candidates if not c.fits]
    if rejected:
        console.print("higher-ranked profiles rejected: " + "; ".join(
            f"{c.profile.name} ({c.reason}, short {_gib(c.short_bytes)} GiB)" if c.short_bytes else
            f"{c.profile.name} ({c.reason})" for c in rejected))
    print_breakdown(chosen.estimates, p.target)


def print_breakdown(estimates: dict, target: str) -> None:
    """Component x stage table (GiB at each stage's peak phase)."""
    t = Table(title="estimate by component at each stage's peak phase (GiB)")
    t.add_column("component")
    for st, e in estimates.items():
        t.add_column(f"{st.upper()} ({e.peak.name})", justify="right")
    names: list[str] = []
    for e in estimates.values():
        names += [k for k in e.components if k not in names]
    for n in names:
        t.add_row(n, *[_gib(e.components.get(n, 0)) for e in estimates.values()])
    t.add_section()
    rows = [("allocated", "allocated"), ("reserved", "reserved")]
    if target == "cuda":
        rows.append(("device (nvidia-smi)", "device"))
    rows.append(("CPU RAM", "cpu_ram"))
    for label, attr in rows:
        t.add_row(label, *[_gib(getattr(e, attr)) for e in estimates.values()])
    console.print(t)
    for st, e in estimates.items():
        for note in e.notes:
            console.print(f"note ({st}): {note}")


def _run_plan(gpu, vram, ram, model, seq_len, batch, prompt_len, response_len, rollout_batch,
              stages, profiles, as_json, trust_remote_code: bool = False, max_vram=None, algo: str = "ppo",
              nproc: int = 1):
    from lowmem_rlhf.plan.model_spec import load_spec
    from lowmem_rlhf.plan.planner import no_fit, plan

    stages = _stages(stages, algo)
    shape = _shape(seq_len, batch, prompt_len, response_len, rollout_batch)
    hw = _hardware(gpu, vram, ram, max_vram)
    spec = load_spec(model, trust_remote_code)
    _positive(nproc=nproc)
    p = plan(spec, hw, shape, _profiles(profiles), stages, processes=nproc)
    if as_json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        print_plan(p)
    if p.chosen is None:
        raise no_fit(p)
    return p


@app.command()
def plan(
    gpu: Optional[str] = typer.Option(None, "--gpu", help=GPU_HELP),
    vram: Optional[float] = typer.Option(None, "--vram", help="GPU memory in GiB (overrides --gpu's)"),
    max_vram: Optional[float] = typer.Option(None, "--max-vram", help="plan for at most this many GiB of the card "
                                             "(the budget a run with --max-vram caps itself at)"),
    ram: Optional[float] = typer.Option(None, "--ram", help="CPU RAM in GiB (default: this machine's available RAM)"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    seq_len: int = typer.Option(512, "--seq-len", help="SFT/RM sequence length in tokens"),
    batch: int = typer.Option(16, "--batch", help="effective batch (sequences per optimizer step)"),
    prompt_len: int = typer.Option(256, "--prompt-len", help="PPO prompt length in tokens"),
    response_len: int = typer.Option(256, "--response-len", help="PPO generated tokens per prompt"),
    rollout_batch: Optional[int] = typer.Option(None, "--rollout-batch", help="RL responses per rollout (prompts x "
                                                "responses per prompt; default: 8 for PPO, 8 x 4 = 32 for GRPO/RLOO)"),
    algo: str = typer.Option("ppo", "--algo", help=ALGO_HELP),
    stages: str = typer.Option("sft,rm,ppo", "--stages", help="stages that must fit, comma-separated (ppo stands "
                               "for the RL stage --algo names)"),
    profiles: Optional[str] = typer.Option(None, "--profiles", help="only these profiles (names or YAML paths, comma-separated)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    simulate: bool = typer.Option(False, "--simulate", help="also rehearse one step of each stage of the chosen profile on meta tensors and print simulated vs analytic peaks"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow a local model folder's own Python code (to read its shapes on the meta device)"),
    nproc: int = typer.Option(1, "--nproc", help="data-parallel processes on this node (torchrun --nproc_per_node): "
                              "estimates stay per GPU, since each process holds the whole base; they share the "
                              "node's CPU RAM; --batch and --rollout-batch are per process (global = N x)"),
):
    """Which profile makes SFT, RM and the RL stage (PPO, or GRPO/RLOO with --algo) fit this card,
    and each stage's estimated peak (per GPU: see --nproc for data-parallel runs)."""
    rollout_batch = _rollout(rollout_batch, _algo(algo))
    if simulate and as_json:  # one JSON document: the plan's own print is replaced by the combined one
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            p = _run_plan(gpu, vram, ram, model, seq_len, batch, prompt_len, response_len, rollout_batch,
                          stages, profiles, True, trust_remote_code, max_vram, algo, nproc)
    else:
        p = _run_plan(gpu, vram, ram, model, seq_len, batch, prompt_len, response_len, rollout_batch,
                      stages, profiles, as_json, trust_remote_code, max_vram, algo, nproc)
    if simulate:
        from lowmem_rlhf.measure.simulate import simulate as run_simulation

        sims = [run_simulation(model, p.chosen.profile, st, p.shape, reward_model="rm" in p.stages,
                               data_parallel=nproc > 1) for st in p.stages]
        if as_json:
            d = p.to_dict()
            d["simulation"] = {s.stage: s.to_dict() for s in sims}
            print(json.dumps(d, indent=2))
        else:
            print_simulation(sims)


def print_simulation(sims: list) -> None:
    """Simulated (meta-device rehearsal) vs analytic allocated peak per phase, tags at the peak."""
    from lowmem_rlhf.measure.simulate import NOT_MODELLED

    for sim in sims:
        t = Table(title=f"{sim.stage.upper()} {sim.model} ({sim.profile.name}, quant={sim.profile.quant}, "
                        f"ckpt={'on' if sim.profile.grad_ckpt else 'off'}, micro-batch {sim.profile.micro_batch}): "
                        f"simulated vs analytic, GiB ({sim.seconds:.1f} s)")
        t.add_column("phase")
        t.add_column("simulated allocated", justify="right")
        t.add_column("analytic allocated", justify="right")
        t.add_column("analytic vs sim", justify="right")
        t.add_column("sim device (+reserve, context, paged)", justify="right")
        t.add_column("simulated by component at the peak")
        t.add_column("analytic components")
        for ph in sim.phases:
            t.add_row(ph.name, _gib(ph.peak), _gib(ph.analytic), f"{ph.drift:+.1%}", _gib(ph.device),
                      ", ".join(f"{k} {_gib(v)}" for k, v in ph.by_tag.items() if v >= 2**20),
                      ", ".join(f"{k} {_gib(v)}" for k, v in ph.analytic_components.items() if v >= 2**20))
        console.print(t)
        if sim.kv_cache:
            console.print(f"simulated KV cache at full length: {_gib(sim.kv_cache)} GiB")
        for note in sim.notes:
            console.print(f"note: {note}")
    console.print("not modelled by the simulation (the device column adds the estimator's figures): "
              + "; ".join(f"{k}: {v}" for k, v in NOT_MODELLED.items()))


@app.command()
def estimate(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    stage: str = typer.Option("sft", "--stage", help="sft, rm, ppo, grpo or rloo"),
    profile: str = typer.Option("qlora-shared", "--profile", help="profile whose knobs the flags below override"),
    quant: Optional[str] = typer.Option(None, "--quant", help="none, nf4, fp4 or int8"),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help="NF4/FP4 double quantization"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (weights and compute)"),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank; 0 = full fine-tune"),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="comma-separated linear names, or all-linear"),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="LoRA dropout (its masks cost memory)"),
    seq_len: int = typer.Option(512, "--seq-len", help="SFT/RM sequence length in tokens"),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch", help="micro-batch: sequences per forward (the effective batch does not change a step's peak)"),
    grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing"),
    generation_batch: Optional[int] = typer.Option(None, "--generation-batch", help="PPO: rollout rows sampled at once (0: the whole rollout; each chunk's KV cache is freed before the next)"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw, adamw_8bit, paged_adamw_32bit, paged_adamw_8bit"),
    offload: Optional[str] = typer.Option(None, "--offload", help="none or zero3 (DeepSpeed param+optimizer offload)"),
    kbit_upcast: Optional[bool] = typer.Option(None, "--kbit-upcast/--no-kbit-upcast", help="peft k-bit prep's fp32 cast of non-quantized params"),
    prompt_len: int = typer.Option(256, "--prompt-len", help="PPO prompt length"),
    response_len: int = typer.Option(256, "--response-len", help="PPO generated tokens"),
    rollout_batch: Optional[int] = typer.Option(None, "--rollout-batch", help="RL responses per rollout (prompts x "
                                                "responses per prompt; default: 8 for PPO, 8 x 4 = 32 for GRPO/RLOO)"),
    separate_models: bool = typer.Option(False, "--separate-models", help="PPO with four model copies instead of one shared base"),
    beta: Optional[float] = typer.Option(None, "--beta", help="GRPO/RLOO: KL weight; 0 runs no reference forward "
                                         "(default: grpo's --beta)"),
    reward_model: bool = typer.Option(True, "--rm/--no-rm", help="GRPO/RLOO: a reward model's adapter + head scores "
                                      "the rollout (--no-rm: programs only)"),
    kl_penalty: str = typer.Option("reward", "--kl-penalty", help="PPO: the KL in the reward or in the actor's loss "
                                   "(the same estimate; --simulate rehearses the one given)"),
    target: str = typer.Option("cuda", "--target", help="cuda (GPU figures) or cpu (host RAM)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (allocated_gib, reserved_gib, device_gib, cpu_ram_gib, components, phases)"),
    simulate: bool = typer.Option(False, "--simulate", help="rehearse one real step on meta tensors (no weights allocated) and print simulated vs analytic per phase"),
):
    """Peak memory of one stage for explicit knobs, by component and phase."""
    from lowmem_rlhf.config import Profile, dataclass_from_dict, load_profile
    from lowmem_rlhf.plan.estimator import estimate as run_estimate
    from lowmem_rlhf.plan.estimator import generation_rows
    from lowmem_rlhf.plan.model_spec import load_spec

    if target not in ("cuda", "cpu"):
        raise UserError(f"--target must be cuda or cpu, got {target!r}")
    rollout_batch = _rollout(rollout_batch, "grpo" if stage in ("grpo", "rloo") else "ppo")
    base = load_profile(profile).to_dict()
    overrides = {"quant": quant, "double_quant": double_quant, "dtype": dtype, "lora_r": lora_r,
                 "lora_dropout": lora_dropout, "micro_batch": micro_batch, "grad_ckpt": grad_ckpt,
                 "generation_batch": generation_batch, "optimizer": optimizer, "offload": offload, "kbit_fp32_upcast": kbit_upcast}
    if lora_targets is not None:
        overrides["lora_targets"] = "all-linear" if lora_targets == "all-linear" else [t.strip() for t in lora_targets.split(",") if t.strip()]
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("lora_r") == 0 and "quant" not in given and base["quant"] != "none":
        raise UserError(f"--lora-r 0 (full fine-tune) with profile {profile}'s quant={base['quant']}: "
                        "quantized weights cannot be trained; add --quant none")
    base.update(given)
    flags = {"quant": "--quant", "dtype": "--dtype", "optimizer": "--optimizer", "offload": "--offload"}
    try:
        prof: Profile = dataclass_from_dict(Profile, base, "flags")
    except UserError as e:
        msg = str(e)
        for field, flag in flags.items():
            msg = msg.replace(f"field {field!r}", flag)
        raise UserError(msg.replace("flags: ", "", 1)) from None
    shape = _shape(seq_len, 16, prompt_len, response_len, rollout_batch)
    spec = load_spec(model)
    if beta is not None and beta < 0:
        raise UserError(f"--beta must be 0 or more, got {beta}")
    _choice(kl_penalty=kl_penalty, cls=PPOConfig)
    est = run_estimate(spec, prof, stage, shape, target=target, separate_models=separate_models,
                       reward_model=reward_model, beta=beta)
    if simulate:
        from lowmem_rlhf.measure.simulate import simulate as run_simulation

        if target != "cuda" or separate_models:
            raise UserError("--simulate rehearses the CUDA layout of one shared base; drop --target cpu / --separate-models")
        sim = run_simulation(model, prof, stage, shape, reward_model=reward_model, beta=beta, kl_penalty=kl_penalty)
        if as_json:
            d = sim.to_dict()
            d["profile_settings"] = prof.to_dict()
            print(json.dumps(d, indent=2))
        else:
            print_simulation([sim])
        return
    if as_json:
        d = est.to_dict()
        d["profile_settings"] = prof.to_dict()
        print(json.dumps(d, indent=2))
        return
    console.print(f"[bold]{stage.upper()}[/bold] {spec.name}: quant={prof.quant}"
              f"{'+dq' if prof.double_quant and prof.quant in ('nf4', 'fp4') else ''} dtype={prof.dtype} "
              f"lora_r={prof.lora_r} ckpt={prof.grad_ckpt} optimizer={prof.optimizer} offload={prof.offload} "
              f"micro-batch={prof.micro_batch}"
              + (f" generation-batch={generation_rows(prof, rollout_batch)}" if stage in RL_STAGES else ""))
    t = Table(title=f"{stage.upper()} by phase (GiB)")
    t.add_column("component")
    for ph in est.phases:
        t.add_column(ph.name, justify="right")
    names: list[str] = []
    for ph in est.phases:
        names += [k for k in ph.components if k not in names]
    for n in names:
        t.add_row(n, *[_gib(ph.components.get(n, 0)) for ph in est.phases])
    t.add_section()
    for label, attr in (("allocated", "allocated"), ("reserved", "reserved"), ("device (nvidia-smi)", "device"), ("CPU RAM", "cpu_ram")):
        if attr == "device" and target != "cuda":
            continue
        t.add_row(label, *[_gib(getattr(ph, attr)) for ph in est.phases])
    console.print(t)
    console.print(f"peak: {est.peak.name}: allocated {_gib(est.allocated)} GiB, reserved {_gib(est.reserved)} GiB"
              + (f", device {_gib(est.device)} GiB" if target == "cuda" else "")
              + f", CPU RAM {_gib(est.cpu_ram)} GiB")
    for note in est.notes:
        console.print(f"note: {note}")


@app.command()
def auto(
    gpu: Optional[str] = typer.Option(None, "--gpu", help=GPU_HELP),
    vram: Optional[float] = typer.Option(None, "--vram", help="GPU memory in GiB"),
    ram: Optional[float] = typer.Option(None, "--ram", help="CPU RAM in GiB"),
    model: Optional[str] = option(AutoConfig, "model", "-m"),
    out: Optional[Path] = option(AutoConfig, "out", "-o"),
    reward: Optional[str] = option(AutoConfig, "reward"),
    reward_cmd: Optional[str] = option(AutoConfig, "reward_cmd"),
    sft_data: Optional[str] = option(AutoConfig, "sft_data"),
    pairs: str = option(AutoConfig, "pairs"),
    prompts: str = option(AutoConfig, "prompts"),
    seq_len: Optional[int] = option(AutoConfig, "seq_len"),
    sft_batch: int = option(AutoConfig, "sft_batch"),
    rm_batch: int = option(AutoConfig, "rm_batch"),
    prompt_len: Optional[int] = option(AutoConfig, "prompt_len"),
    response_len: Optional[int] = option(AutoConfig, "response_len"),
    rollout_batch: int = option(AutoConfig, "rollout_batch"),
    samples_per_prompt: Optional[int] = option(AutoConfig, "samples_per_prompt"),
    sft_steps: int = option(AutoConfig, "sft_steps"),
    rm_steps: int = option(AutoConfig, "rm_steps"),
    algo: Optional[str] = option(AutoConfig, "algo"),
    ppo_iterations: Optional[int] = option(AutoConfig, "ppo_iterations"),
    ppo_epochs: Optional[int] = option(AutoConfig, "ppo_epochs"),
    ppo_lr: Optional[float] = option(AutoConfig, "ppo_lr"),
    beta: Optional[float] = option(AutoConfig, "beta"),
    kl_coef: Optional[float] = option(AutoConfig, "kl_coef"),
    kl_penalty: Optional[str] = option(AutoConfig, "kl_penalty"),
    whiten: Optional[bool] = option(AutoConfig, "whiten"),
    kl_target: Optional[float] = option(AutoConfig, "kl_target"),
    kl_horizon: Optional[int] = option(AutoConfig, "kl_horizon"),
    reward_weight: Optional[float] = option(AutoConfig, "reward_weight"),
    temperature: float = option(AutoConfig, "temperature"),
    missing_eos_penalty: Optional[float] = option(AutoConfig, "missing_eos_penalty"),
    train_rm: Optional[bool] = option(AutoConfig, "train_rm"),
    rm_reward: Optional[bool] = option(AutoConfig, "rm_reward"),
    seed: int = option(AutoConfig, "seed"),
    max_vram: Optional[float] = option(AutoConfig, "max_vram"),
    dry_run: bool = typer.Option(False, "--dry-run", help="plan only: print what would run, load nothing"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    trust_remote_code: bool = option(AutoConfig, "trust_remote_code"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the auto run in this folder with its saved settings: finished stages are kept, the stage in progress continues from its newest checkpoint"),
):
    """Detect (or take) the hardware, plan for the shapes it will run, and run SFT -> RM -> RL with
    the chosen profile. RL is GRPO on the embedded demo (its checker scores groups of answers to
    each question; the RM is trained and scored beside it) and PPO on a named model (the RM is its
    reward); --algo ppo|grpo|rloo picks one. With a program reward the RM runs only with --train-rm."""
    import time as _time

    from lowmem_rlhf.config import load_all_profiles
    from lowmem_rlhf.plan.planner import runnable_profiles
    from lowmem_rlhf.stages.auto import load_auto_config, run_auto

    if resume is not None:
        cfg = load_auto_config(resume)
        cfg.out = resume
        console.print(f"resuming {resume} with its saved settings (profile {cfg.profile.name})")
        _print_auto_summary(run_auto(cfg, None, console, resume=True), resume)
        return
    if ppo_iterations is not None:
        _positive(ppo_iterations=ppo_iterations)
    if ppo_epochs is not None:
        _positive(ppo_epochs=ppo_epochs)
    if kl_penalty is not None:
        _choice(kl_penalty=kl_penalty, cls=PPOConfig)
    _positive(sft_steps=sft_steps, rm_steps=rm_steps, sft_batch=sft_batch, rm_batch=rm_batch)
    if algo is not None:
        _algo(algo)
    cfg = _config(AutoConfig, locals(), None).resolve()
    s = cfg.shape()
    profiles = ",".join(p.name for p in runnable_profiles(load_all_profiles()))  # what auto can run
    stages = "sft,rm,ppo" if cfg.trains_rm() else "sft,ppo"
    p = _run_plan(gpu, vram, ram, model or "smollm2-135m", s.seq_len, s.batch, s.prompt_len, s.response_len,
                  s.rollout_batch, stages, profiles, as_json, trust_remote_code, max_vram, cfg.algo)
    if dry_run:
        if not as_json:
            console.print(f"dry run: would run {' -> '.join(st.upper() for st in p.stages)} of {p.spec.name} with "
                          f"profile {p.chosen.profile.name}; nothing was loaded.")
        return
    if gpu and p.hardware.gpu is not None and p.hardware.gpu.source != "detected":
        import torch

        if not torch.cuda.is_available():
            console.print(f"note: planned for {p.hardware.gpu.name}, but no GPU is here; running on the CPU")
    cfg.profile = p.chosen.profile
    cfg.out = cfg.out or Path("runs") / _time.strftime("auto-%Y%m%d-%H%M%S")
    _print_auto_summary(run_auto(cfg, p.to_dict(), console), cfg.out)


def _print_auto_summary(summary: dict, run: Path) -> None:
    t = Table(title=f"auto: {run}")
    t.add_column("result")
    t.add_column("value", justify="right")
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    t.add_row("SFT held-out loss (before -> after)", f"{fmt(summary['sft']['eval_loss_before'])} -> {fmt(summary['sft']['eval_loss_after'])}")
    if summary["rm"]:
        t.add_row("RM held-out accuracy (before -> after)", f"{fmt(summary['rm']['heldout_accuracy_before'])} -> {fmt(summary['rm']['heldout_accuracy'])}")
    n = summary.get("heldout_n")
    rl = summary.get("algo", "ppo").upper()
    for key, what in (("correct", "exactly the answer"), ("lenient", "the answer anywhere")):
        if summary.get(f"heldout_{key}_sft") is not None:
            t.add_row(f"held-out {what} (SFT -> {rl})",
                      f"{summary[f'heldout_{key}_sft']}/{n} -> {summary[f'heldout_{key}_ppo']}/{n}")
    t.add_row(f"held-out checker score (SFT -> {rl} policy)",
              f"{fmt(summary['heldout_checker_sft'])} -> {fmt(summary['heldout_checker_ppo'])}")
    t.add_row(f"{rl} reward (first 5 -> last 5 iterations)", f"{fmt(summary['ppo_reward_first5'])} -> {fmt(summary['ppo_reward_last5'])}")
    t.add_row(f"{rl} KL to the reference, nats per response (last 5)", fmt(summary.get("ppo_kl_last5")))
    if summary.get("seconds_rl") is not None:
        t.add_row(f"{rl} stage time", f"{summary['seconds_rl'] / 60:.1f} min")
    t.add_row("wall time", f"{summary['wall_seconds'] / 60:.1f} min")
    console.print(t)
    if summary.get("plot"):
        console.print(f"plot: {summary['plot']}")  # below the table: a long path would squeeze its labels


@app.command()
def ppo(
    prompts: str = option(PPOConfig, "prompts", "-p", required=True),
    out: Path = option(PPOConfig, "out", "-o", required=True),
    model: Optional[str] = option(PPOConfig, "model", "-m"),
    sft: Optional[Path] = option(PPOConfig, "sft"),
    reward_model: Optional[Path] = option(PPOConfig, "reward_model"),
    reward: Optional[str] = option(PPOConfig, "reward"),
    reward_cmd: Optional[str] = option(PPOConfig, "reward_cmd"),
    reward_weights: Optional[str] = option(PPOConfig, "reward_weights"),
    reward_timeout: float = option(PPOConfig, "reward_timeout"),
    profile: Optional[str] = option(PPOConfig, "profile"),
    iterations: int = option(PPOConfig, "iterations"),
    rollout_batch: int = option(PPOConfig, "rollout_batch"),
    samples_per_prompt: int = option(PPOConfig, "samples_per_prompt"),
    prompt_len: int = option(PPOConfig, "prompt_len"),
    response_len: int = option(PPOConfig, "response_len"),
    ppo_epochs: int = option(PPOConfig, "ppo_epochs"),
    minibatches: int = option(PPOConfig, "minibatches"),
    lr: Optional[float] = option(PPOConfig, "lr"),
    critic_lr: Optional[float] = option(PPOConfig, "critic_lr"),
    lr_schedule: str = option(PPOConfig, "lr_schedule"),
    kl_coef: float = option(PPOConfig, "kl_coef"),
    kl_estimator: str = option(PPOConfig, "kl_estimator"),
    kl_penalty: str = option(PPOConfig, "kl_penalty"),
    kl_target: Optional[float] = option(PPOConfig, "kl_target"),
    kl_horizon: int = option(PPOConfig, "kl_horizon"),
    temperature: float = option(PPOConfig, "temperature"),
    top_p: float = option(PPOConfig, "top_p"),
    sampler_logprobs: bool = option(PPOConfig, "sampler_logprobs"),
    missing_eos_penalty: Optional[float] = option(PPOConfig, "missing_eos_penalty"),
    reward_norm: bool = option(PPOConfig, "reward_norm"),
    reward_scale: bool = option(PPOConfig, "reward_scale"),
    whiten_advantages: bool = option(PPOConfig, "whiten_advantages"),
    values_at_update: bool = option(PPOConfig, "values_at_update"),
    eval_prompts: Optional[str] = option(PPOConfig, "eval_prompts"),
    eval_reward: Optional[str] = option(PPOConfig, "eval_reward"),
    seed: int = option(PPOConfig, "seed"),
    overwrite: bool = option(PPOConfig, "overwrite"),
    resume: bool = option(PPOConfig, "resume"),
    save_every: int = option(PPOConfig, "save_every"),
    max_nonfinite: int = option(PPOConfig, "max_nonfinite"),
    threads: int = option(PPOConfig, "threads"),
    max_vram: Optional[float] = option(PPOConfig, "max_vram"),
    generation_batch: Optional[int] = typer.Option(None, "--generation-batch", help="rollout rows sampled at once "
                                                   "(default: the planner's, or the profile's; 0: the whole rollout)"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="plan for this GPU preset instead of the detected one"),
    trust_remote_code: bool = option(PPOConfig, "trust_remote_code"),
):
    """PPO on one shared base: actor/critic/reward adapters, reference = adapters off."""
    from lowmem_rlhf.plan.estimator import generation_rows
    from lowmem_rlhf.stages.ppo import run_ppo

    _positive(iterations=iterations, rollout_batch=rollout_batch, prompt_len=prompt_len,
              response_len=response_len, ppo_epochs=ppo_epochs, minibatches=minibatches,
              samples_per_prompt=samples_per_prompt)
    _not_negative(save_every=save_every, threads=threads)
    _positive(max_nonfinite=max_nonfinite)
    _choice(kl_estimator=kl_estimator, kl_penalty=kl_penalty, lr_schedule=lr_schedule, cls=PPOConfig)
    from lowmem_rlhf.algo.rewards import parse_weights

    weights = parse_weights(reward_weights)
    prof = _stage_profile(profile, model, "ppo", _shape(512, 16, prompt_len, response_len, rollout_batch), gpu, trust_remote_code, max_vram)
    if generation_batch is not None:
        _not_negative(generation_batch=generation_batch)
        prof = dataclasses.replace(prof, generation_batch=generation_batch)
    console.print(f"PPO with profile {prof.name} (micro-batch {prof.micro_batch}, generation batch "
                  f"{generation_rows(prof, rollout_batch)}) -> {out}/ppo")
    _print_summary(run_ppo(_config(PPOConfig, {**locals(), "reward_weights": weights}, prof), console=console),
                   "PPO summary")


@app.command()
def grpo(
    prompts: str = option(GRPOConfig, "prompts", "-p", required=True),
    out: Path = option(GRPOConfig, "out", "-o", required=True),
    algo: str = option(GRPOConfig, "algo"),
    model: Optional[str] = option(GRPOConfig, "model", "-m"),
    sft: Optional[Path] = option(GRPOConfig, "sft"),
    reward_model: Optional[Path] = option(GRPOConfig, "reward_model"),
    reward: Optional[str] = option(GRPOConfig, "reward"),
    reward_cmd: Optional[str] = option(GRPOConfig, "reward_cmd"),
    reward_weights: Optional[str] = option(GRPOConfig, "reward_weights"),
    reward_timeout: float = option(GRPOConfig, "reward_timeout"),
    profile: Optional[str] = option(GRPOConfig, "profile"),
    iterations: int = option(GRPOConfig, "iterations"),
    rollout_batch: int = option(GRPOConfig, "rollout_batch"),
    group_size: int = option(GRPOConfig, "group_size"),
    std_norm: bool = option(GRPOConfig, "std_norm"),
    beta: float = option(GRPOConfig, "beta"),
    loss_agg: str = option(GRPOConfig, "loss_agg"),
    prompt_len: int = option(GRPOConfig, "prompt_len"),
    response_len: int = option(GRPOConfig, "response_len"),
    epochs: int = option(GRPOConfig, "epochs"),
    minibatches: int = option(GRPOConfig, "minibatches"),
    lr: Optional[float] = option(GRPOConfig, "lr"),
    lr_schedule: str = option(GRPOConfig, "lr_schedule"),
    clip: float = option(GRPOConfig, "clip"),
    temperature: float = option(GRPOConfig, "temperature"),
    top_p: float = option(GRPOConfig, "top_p"),
    sampler_logprobs: bool = option(GRPOConfig, "sampler_logprobs"),
    missing_eos_penalty: Optional[float] = option(GRPOConfig, "missing_eos_penalty"),
    eval_prompts: Optional[str] = option(GRPOConfig, "eval_prompts"),
    eval_reward: Optional[str] = option(GRPOConfig, "eval_reward"),
    seed: int = option(GRPOConfig, "seed"),
    overwrite: bool = option(GRPOConfig, "overwrite"),
    resume: bool = option(GRPOConfig, "resume"),
    save_every: int = option(GRPOConfig, "save_every"),
    max_nonfinite: int = option(GRPOConfig, "max_nonfinite"),
    threads: int = option(GRPOConfig, "threads"),
    max_vram: Optional[float] = option(GRPOConfig, "max_vram"),
    generation_batch: Optional[int] = typer.Option(None, "--generation-batch", help="rollout rows sampled at once "
                                                   "(default: the planner's, or the profile's; 0: the whole rollout)"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="plan for this GPU preset instead of the detected one"),
    trust_remote_code: bool = option(GRPOConfig, "trust_remote_code"),
):
    """GRPO or RLOO (--algo rloo) on one shared base: the actor adapter learns from groups of
    responses to each prompt; no critic; the reference is the base with adapters off (skipped with --beta 0)."""
    from lowmem_rlhf.algo.rewards import parse_weights
    from lowmem_rlhf.plan.estimator import generation_rows
    from lowmem_rlhf.stages.grpo import check_grpo, run_grpo

    _positive(iterations=iterations, rollout_batch=rollout_batch, prompt_len=prompt_len,
              response_len=response_len, epochs=epochs, minibatches=minibatches)
    _not_negative(save_every=save_every, threads=threads)
    _positive(max_nonfinite=max_nonfinite)
    _choice(algo=algo, loss_agg=loss_agg, lr_schedule=lr_schedule, cls=GRPOConfig)
    weights = parse_weights(reward_weights)
    cfg = _config(GRPOConfig, {**locals(), "reward_weights": weights}, None)
    check_grpo(cfg)  # group size, beta: before the planner or a model is read
    prof = _stage_profile(profile, model, algo, _shape(512, 16, prompt_len, response_len, rollout_batch), gpu,
                          trust_remote_code, max_vram, reward_model=reward_model is not None)
    if generation_batch is not None:
        _not_negative(generation_batch=generation_batch)
        prof = dataclasses.replace(prof, generation_batch=generation_batch)
    console.print(f"{algo.upper()} with profile {prof.name} (micro-batch {prof.micro_batch}, generation batch "
                  f"{generation_rows(prof, rollout_batch)}, {rollout_batch // group_size} prompts x {group_size}) "
                  f"-> {out}/{algo}")
    _print_summary(run_grpo(dataclasses.replace(cfg, profile=prof), console=console), f"{algo.upper()} summary")


@app.command()
def export(
    run: Path = typer.Argument(..., help="run folder (uses RUN/ppo/actor, else RUN/sft/adapter)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="folder for the standalone model"),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (default: the one recorded in the run)"),
):
    """Write a standalone model: 16-bit base with the SFT and PPO adapters merged in."""
    from lowmem_rlhf.model.export import export_run

    if dtype not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}")
    path = export_run(run, out_dir, dtype, model)
    console.print(f"exported {run} -> {path} (load it with transformers.AutoModelForCausalLM.from_pretrained)")




@app.command(name="eval")
def eval_run(
    run: Path = typer.Argument(..., help="run folder (the --out of sft/ppo/auto)"),
    prompts: str = typer.Option(..., "--prompts", "-p", help="prompts file (.jsonl/.json/.parquet, any prompt format "
                                "PPO reads: prompt, instruction, messages, question) or a hub dataset"),
    reward: Optional[str] = typer.Option(None, "--reward", help="scoring function: module:function or "
                                         "path/to/file.py:function, called as f(prompts, responses) -> list of floats"),
    reward_cmd: Optional[str] = typer.Option(None, "--reward-cmd", help="evaluator process instead: reads JSON lines "
                                             "{\"prompt\", \"response\"} on stdin, writes one score per line"),
    reward_timeout: float = typer.Option(60.0, "--reward-timeout", help="seconds --reward-cmd may take per batch"),
    policy: Optional[list[str]] = typer.Option(None, "--policy", metavar="POLICY", help="sft (base + SFT adapter merged), ppo (+ the "
                                               "PPO actor), base (no adapters) or an adapter folder; repeat for "
                                               "several; default: every finished policy in RUN (sft, then ppo)"),
    samples: int = typer.Option(1, "--samples", "-k", help="answers per prompt: 1 = greedy; K > 1 = K sampled "
                                "answers at --temperature, and pass@K is reported"),
    temperature: float = typer.Option(1.0, "--temperature", help="sampling temperature when --samples > 1"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="tokens generated per answer "
                                                 "(default: the run's PPO --response-len, else 64)"),
    prompt_len: Optional[int] = typer.Option(None, "--prompt-len", help="prompt tokens kept, cut from the left "
                                             "(default: the run's PPO --prompt-len, else 128)"),
    batch: Optional[int] = typer.Option(None, "--batch", help="answers generated at once (default: the run's PPO "
                                        "--rollout-batch, else 8); lower it on out-of-memory"),
    pass_threshold: float = typer.Option(1.0, "--pass-threshold", help="a sample passes when its score is >= this"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: RUN/eval/<prompts file "
                                       "name>): <policy>.jsonl per policy and summary.json, written last"),
    seed: int = typer.Option(0, "--seed", help="sampling seed (each policy starts from it)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (default: the one recorded in the run)"),
    profile: Optional[str] = typer.Option(None, "--profile", help="load every policy with this profile (default: the "
                                          "profile its stage trained with, so eval runs the same quantization)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the base model folder's own Python code"),
):
    """Score a finished run's policies on a prompts file with a programmatic reward: mean score,
    samples passing --pass-threshold with a 95% Wilson interval, and pass@K with --samples K."""
    from lowmem_rlhf.stages.evaluate import EvalConfig, run_eval

    summary = run_eval(EvalConfig(
        run=run, prompts=prompts, reward=reward, reward_cmd=reward_cmd, reward_timeout=reward_timeout,
        policies=tuple(policy or ()), samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
        prompt_len=prompt_len, batch=batch, pass_threshold=pass_threshold, out=out, seed=seed, model=model,
        profile=profile, trust_remote_code=trust_remote_code), console=console)
    _print_eval_summary(summary)


def _print_eval_summary(summary: dict) -> None:
    K = summary["samples"]
    how = "greedy" if summary["greedy"] else f"{K} samples per prompt, temperature {summary['temperature']:g}"
    t = Table(title=f"eval ({how}; pass: score >= {summary['pass_threshold']:g})")
    t.add_column("policy", no_wrap=True)
    t.add_column("prompts", justify="right")
    t.add_column("mean score", justify="right")
    t.add_column("pass k/n", justify="right")
    t.add_column("rate [95% CI]", justify="right", no_wrap=True)
    if K > 1:
        t.add_column(f"pass@{K} k/n", justify="right", no_wrap=True)
    for name, p in summary["policies"].items():
        lo, hi = p["pass_rate_ci95"]
        row = [name, str(p["prompts"]), f"{p['mean_score']:.4f}", f"{p['passed']}/{p['total']}",
               f"{p['pass_rate']:.1%} [{lo:.1%}, {hi:.1%}]"]
        if K > 1:
            pk = p["pass_at_k"]
            row.append(f"{pk['passed']}/{pk['prompts']} ({pk['rate']:.0%})")
        t.add_row(*row)
    console.print(t)
    console.print(f"wrote {summary['out']}/summary.json and " + ", ".join(p["file"] for p in summary["policies"].values()))


def _shape_defaults(max_len: Optional[int], batch: Optional[int], gpu: Optional[str],
                    max_vram: Optional[float]) -> tuple[int, int]:
    """--max-len and --batch, where not given, for the device the planner targets (`config.shape_defaults`)."""
    from lowmem_rlhf.config import shape_defaults

    d = shape_defaults(_hardware(gpu, None, None, max_vram).device, max_len=max_len, batch=batch)
    return d["max_len"], d["batch"]


def _stage_profile(profile: Optional[str], model: Optional[str], stage: str, shape, gpu: Optional[str],
                   trust_remote_code: bool = False, max_vram: Optional[float] = None,
                   reward_model: Optional[bool] = None):
    """The profile a training stage runs with: the named one, or the planner's pick for `shape` on
    this machine (or on --gpu); reward_model: GRPO/RLOO with --reward-model (its adapter + head)."""
    from lowmem_rlhf.config import deepspeed_missing, load_all_profiles, load_profile
    from lowmem_rlhf.model.embedded import resolve_model_path
    from lowmem_rlhf.model.loading import resolve_source
    from lowmem_rlhf.plan.hardware import gib_to_bytes
    from lowmem_rlhf.plan.model_spec import load_spec
    from lowmem_rlhf.plan.planner import choose_profile

    if max_vram is not None:  # also with --profile, where no planning would check it
        gib_to_bytes("--max-vram", max_vram)
    if profile:
        prof = load_profile(profile)
        if not prof.is_lora:
            raise UserError(f"profile {prof.name}: this version trains LoRA adapters on a shared base; "
                            "use qlora-shared, lora-bf16-shared or zero3-offload")
        from lowmem_rlhf.plan.estimator import ZERO3_PPO_REASON

        if prof.offload == "zero3" and stage in RL_STAGES:
            raise UserError(f"profile {prof.name}: {ZERO3_PPO_REASON}; use qlora-shared for {stage.upper()}")
        if prof.offload == "zero3" and (missing := deepspeed_missing()):
            raise UserError(f"profile {prof.name}: {missing}")
        from lowmem_rlhf.plan.planner import machine_profile

        if (ran := machine_profile(prof)) != prof:
            console.print(f"note: profile {prof.name} computes in {prof.dtype}, which this CPU emulates (~25x slower); "
                          "the stage computes in fp32")
        prof = ran
        return prof
    source = resolve_source(resolve_model_path(model))
    spec = load_spec(source, trust_remote_code)
    from lowmem_rlhf.runtime.distributed import launched, local_processes, world

    prof = choose_profile(spec, _hardware(gpu, None, None, max_vram), shape, load_all_profiles(), (stage,),
                          processes=local_processes(), data_parallel=launched() > 1, reward_model=reward_model).profile
    # each rank reads its own card's free memory: rank 0's pick is every rank's (DDP needs one model)
    return world().gather(prof)[0] if launched() > 1 else prof


def _print_summary(summary: dict, title: str) -> None:
    from lowmem_rlhf.measure.report import print_memory_report

    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in summary.items():
        if k == "memory" or isinstance(v, (list, dict)) and k not in ("eval_before", "eval_after"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b:.3f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.4f}"
        t.add_row(k, str(v))
    console.print(t)
    print_memory_report(summary["memory"], console)




@app.command()
def sft(
    data: str = option(SFTConfig, "data", "-d", required=True),
    out: Path = option(SFTConfig, "out", "-o", required=True),
    model: Optional[str] = option(SFTConfig, "model", "-m"),
    profile: Optional[str] = option(SFTConfig, "profile"),
    max_steps: int = option(SFTConfig, "max_steps"),
    max_len: Optional[int] = option(SFTConfig, "max_len"),
    batch: Optional[int] = option(SFTConfig, "batch"),
    lr: Optional[float] = option(SFTConfig, "lr"),
    eval_fraction: float = option(SFTConfig, "eval_fraction"),
    seed: int = option(SFTConfig, "seed"),
    overwrite: bool = option(SFTConfig, "overwrite"),
    resume: bool = option(SFTConfig, "resume"),
    save_every: int = option(SFTConfig, "save_every"),
    max_nonfinite: int = option(SFTConfig, "max_nonfinite"),
    threads: int = option(SFTConfig, "threads"),
    max_vram: Optional[float] = option(SFTConfig, "max_vram"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="plan for this GPU preset instead of the detected one"),
    trust_remote_code: bool = option(SFTConfig, "trust_remote_code"),
):
    """Supervised fine-tuning: train the `sft` LoRA adapter (completion-only loss)."""
    from lowmem_rlhf.stages.sft import run_sft

    max_len, batch = _shape_defaults(max_len, batch, gpu, max_vram)
    _positive(max_steps=max_steps, max_len=max_len, batch=batch)
    _not_negative(save_every=save_every, threads=threads)
    _positive(max_nonfinite=max_nonfinite)
    prof = _stage_profile(profile, model, "sft", _shape(max_len, batch, 256, 256, 8), gpu, trust_remote_code, max_vram)
    console.print(f"SFT with profile {prof.name} (micro-batch {prof.micro_batch}) -> {out}/sft")
    _print_summary(run_sft(_config(SFTConfig, locals(), prof), console=console), "SFT summary")


@app.command()
def rm(
    data: str = option(RMConfig, "data", "-d", required=True),
    out: Path = option(RMConfig, "out", "-o", required=True),
    model: Optional[str] = option(RMConfig, "model", "-m"),
    init_from: Optional[Path] = option(RMConfig, "init_from"),
    profile: Optional[str] = option(RMConfig, "profile"),
    max_steps: int = option(RMConfig, "max_steps"),
    max_len: Optional[int] = option(RMConfig, "max_len"),
    batch: Optional[int] = option(RMConfig, "batch"),
    max_pairs: Optional[int] = option(RMConfig, "max_pairs"),
    lr: Optional[float] = option(RMConfig, "lr"),
    eval_fraction: float = option(RMConfig, "eval_fraction"),
    seed: int = option(RMConfig, "seed"),
    overwrite: bool = option(RMConfig, "overwrite"),
    resume: bool = option(RMConfig, "resume"),
    save_every: int = option(RMConfig, "save_every"),
    max_nonfinite: int = option(RMConfig, "max_nonfinite"),
    threads: int = option(RMConfig, "threads"),
    max_vram: Optional[float] = option(RMConfig, "max_vram"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="plan for this GPU preset instead of the detected one"),
    trust_remote_code: bool = option(RMConfig, "trust_remote_code"),
):
    """Reward model: train a `reward` LoRA adapter + scalar head with the pairwise ranking loss."""
    from lowmem_rlhf.stages.rm import run_rm

    max_len, batch = _shape_defaults(max_len, batch, gpu, max_vram)
    _positive(max_steps=max_steps, max_len=max_len, batch=batch)
    _not_negative(save_every=save_every, threads=threads)
    _positive(max_nonfinite=max_nonfinite)
    prof = _stage_profile(profile, model, "rm", _shape(max_len, batch, 256, 256, 8), gpu, trust_remote_code, max_vram)
    console.print(f"RM with profile {prof.name} (micro-batch {prof.micro_batch}) -> {out}/rm")
    _print_summary(run_rm(_config(RMConfig, locals(), prof), console=console), "RM summary")


def _not_negative(**values: int) -> None:
    for name, v in values.items():
        if v < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {v}")


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")



@app.command()
def doctor(
    out_dir: Path = typer.Option(Path("."), "--out", "-o", help="folder whose disk space to check (where runs go)"),
    ranges: Optional[str] = typer.Option(None, "--ranges", help="override tested version ranges, e.g. 'torch=<2.5,peft=>=0.20'"),
):
    """Check this machine: library versions against the tested ranges, CUDA/GPU/bf16, free VRAM,
    RAM, disk, and whether 4-bit NF4 really works here (a tiny quantized matmul with gradients)."""
    from lowmem_rlhf.doctor import render, run_checks

    override = {}
    for item in filter(None, (ranges or "").split(",")):
        name, sep, spec = item.partition("=")
        if not sep or not name.strip() or not spec.strip():
            raise UserError(f"--ranges {item!r}: expected package=specifier, e.g. torch=<2.14")
        override[name.strip()] = spec.strip()
    raise typer.Exit(render(run_checks(override or None, disk_path=out_dir), console))


@app.command()
def version():
    """Print the lowmem-rlhf version."""
    print(__version__)


def _quiet_libraries() -> None:
    """Our progress bars and tables are the output; the libraries' loading bars and notices are not."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("deepspeed").setLevel(logging.ERROR)
    # optional CPU kernel package; its absence only costs speed, not correctness
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


DATA_PARALLEL = ("sft", "rm", "ppo", "grpo")


def _data_parallel(argv: list[str]) -> str:
    """Under a launcher (WORLD_SIZE > 1): only the training stages run, each rank joins the process
    group, and the ranks other than 0 print nothing to stdout and no warnings (their errors still
    reach stderr, prefixed "rank N: "). -> that prefix ("" for rank 0 and one process)."""
    from lowmem_rlhf.runtime.distributed import launched, world

    if launched() <= 1:
        return ""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in DATA_PARALLEL and not any(a in ("--help", "-h") for a in argv):
        raise UserError(f"`{command}` runs in one process; under torchrun/accelerate launch run one of "
                        f"{', '.join(DATA_PARALLEL)} (each rank trains on its share of the batch)")
    w = world()
    if w.main:
        return ""
    import os
    import warnings

    sys.stdout = open(os.devnull, "w")  # rank 0 prints the run; the console writes to sys.stdout
    warnings.simplefilter("ignore")  # rank 0 shows the libraries' warnings once
    return f"rank {w.rank}: "


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: one-line errors, never a traceback for bad input."""
    import errno

    from lowmem_rlhf.runtime.oom import shape_allocator
    from lowmem_rlhf.runtime.stopping import Interrupted

    shape_allocator()  # before anything initialises CUDA
    _quiet_libraries()
    rank = ""
    try:
        rank = _data_parallel(sys.argv[1:] if argv is None else argv)
        app(args=argv, prog_name="lowmem-rlhf", standalone_mode=False)
        from lowmem_rlhf.runtime.distributed import shutdown

        shutdown()  # launched: the ranks leave the process group together, not at interpreter teardown
    except UserError as e:
        err.print(f"{rank}error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    except Interrupted as e:
        err.print(f"{rank}stopped: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("aborted: the newest complete checkpoint (if any) is kept; continue with --resume", markup=False)
        sys.exit(130)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            err.print(f"error: {e.strerror} while writing {e.filename or 'the run folder'}: free disk space or "
                      "choose another --out; the newest complete checkpoint (if any) is kept for --resume",
                      markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
        raise
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted", markup=False)
        sys.exit(130)
    except Exception as e:
        # Usage errors (unknown flag or command, missing value, wrong type). typer >= 0.2x vendors
        # click as `typer._click`: its ClickException derives from typer.TyperException, not from the
        # `click` package's, which older typer raises. Both print the usage and ONE `error:` line.
        usage_errors: list[type] = [typer.TyperException] if isinstance(getattr(typer, "TyperException", None), type) else []
        try:
            import click

            usage_errors.append(click.ClickException)
        except ImportError:
            pass
        if not isinstance(e, tuple(usage_errors)):
            raise
        code = getattr(e, "exit_code", 2)
        code = code if isinstance(code, int) else 2
        if type(e).__name__ == "NoArgsIsHelpError":  # a bare command: typer's rich help printed itself
            text = e.format_message()
            if text.strip():  # plain click returns the help as text instead
                print(text)
            sys.exit(code)
        ctx = getattr(e, "ctx", None)
        if ctx is None:  # vendored click raises "requires an argument" without its context: take the
            tb = e.__traceback__  # innermost one the parser ran with
            while tb is not None:
                found = tb.tb_frame.f_locals.get("ctx")
                if hasattr(found, "get_usage") and hasattr(found, "command_path"):
                    ctx = found
                tb = tb.tb_next
        if ctx is not None:
            try:
                err.print(ctx.get_usage().strip(), markup=False, highlight=False, soft_wrap=True)
                if ctx.command.get_help_option(ctx) is not None:
                    err.print(f"Try '{ctx.command_path} {ctx.help_option_names[0]}' for help.", markup=False,
                              highlight=False, soft_wrap=True)
            except Exception:  # the usage is a courtesy; the error line is the point
                pass
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        err.print("error: " + " ".join(str(message).split()), markup=False, highlight=False, soft_wrap=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
