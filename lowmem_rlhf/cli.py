"""`lowmem-rlhf`: plan, estimate and run RLHF stages on one GPU (or the CPU).

Every command answers bad input with one line (`error: <what, where, how to fix>`) and exit code 2;
`plan`/`auto --dry-run` exit 1 when nothing fits. Human output is rich tables; `--json` is for
scripts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from lowmem_rlhf import __version__
from lowmem_rlhf.errors import UserError

app = typer.Typer(
    name="lowmem-rlhf",
    help="SFT, reward-model and PPO training on one consumer GPU. `plan` tells you, before a byte "
    "of weights is loaded, which memory profile makes every stage fit your card.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

GPU_HELP = ("GPU preset to plan for (e.g. 3090, 4090, 3060-12gb, t4, a100-80gb); default: the GPU "
            "detected here, or the CPU when there is none")
OUT_HELP = "run folder; the stage writes RUN/<stage>/ only when it completes"
PROFILE_HELP = "profile name or YAML path (default: the planner's pick for this machine)"
MODEL_HELP = ("model preset (llama-2-7b, llama-2-13b, llama-3-8b, mistral-7b, qwen2.5-7b, chatglm3-6b, "
              "gpt2, opt-1.3b, smollm2-135m), a local folder with config.json, or a hub id")


def _gib(b: int) -> str:
    return f"{b / 1024**3:.2f}"


def _hardware(gpu, vram, ram):
    from lowmem_rlhf.hardware import resolve_hardware

    return resolve_hardware(gpu=gpu, vram_gib=vram, ram_gib=ram)


def _shape(seq_len, batch, prompt_len, response_len, rollout_batch):
    from lowmem_rlhf.config import Shape

    return Shape(seq_len=seq_len, batch=batch, prompt_len=prompt_len, response_len=response_len,
                 rollout_batch=rollout_batch)


def _profiles(names: Optional[str]):
    from lowmem_rlhf.config import load_all_profiles, load_profile

    if names:
        return [load_profile(n.strip()) for n in names.split(",") if n.strip()]
    return load_all_profiles()


def _stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip().lower() for s in text.split(",") if s.strip())
    if not stages:
        raise UserError("--stages: give at least one of sft, rm, ppo")
    return stages


def print_plan(p) -> None:
    """Candidates table, the chosen profile and its per-stage breakdown."""
    from lowmem_rlhf.model_spec import param_count_str

    budget, what = p.budget()
    s = p.shape
    out.print(f"[bold]Plan[/bold] for {p.spec.name} ({param_count_str(p.spec.total_params)} params) on "
              f"{p.hardware.describe()}")
    out.print(f"budget: {_gib(budget)} GiB of {what}; SFT/RM seq {s.seq_len}, batch {s.batch}; "
              f"PPO prompt {s.prompt_len} + response {s.response_len}, rollout batch {s.rollout_batch}")
    fig = "device" if p.target == "cuda" else "cpu_ram"
    t = Table(title=f"peak {'GPU (nvidia-smi)' if p.target == 'cuda' else 'CPU RAM'} GiB per stage")
    t.add_column("profile")
    t.add_column("micro x accum, ckpt")
    for st in p.stages:
        t.add_column(st.upper(), justify="right")
    if p.target == "cuda":  # what the stages hold in host RAM (ZeRO-3 offload puts the model there)
        t.add_column("CPU RAM", justify="right")
    t.add_column("verdict")
    for c in p.candidates:
        row = [c.profile.name, (f"{c.profile.micro_batch} x {c.profile.grad_accum}, "
                                f"{'on' if c.profile.grad_ckpt else 'off'}") if c.estimates else "-"]
        for st in p.stages:
            e = c.estimates.get(st)
            row.append(_gib(getattr(e, fig)) if e else "-")
        if p.target == "cuda":
            row.append(_gib(max(e.cpu_ram for e in c.estimates.values())) if c.estimates else "-")
        row.append(("[green]fits[/green] " if c.fits else "[red]no[/red]: ") + (c.reason if not c.fits else ""))
        t.add_row(*row)
    out.print(t)
    chosen = p.chosen
    if chosen is None:
        return
    out.print(f"[bold green]chosen: {chosen.profile.name}[/bold green] ({chosen.profile.description}); "
              f"micro-batch {chosen.profile.micro_batch} x {chosen.profile.grad_accum} accumulation. "
              f"{chosen.reason}.")
    rejected = [c for c in p.candidates if not c.fits]
    if rejected:
        out.print("higher-ranked profiles rejected: " + "; ".join(
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
    out.print(t)
    for st, e in estimates.items():
        for note in e.notes:
            out.print(f"note ({st}): {note}")


def _run_plan(gpu, vram, ram, model, seq_len, batch, prompt_len, response_len, rollout_batch,
              stages, profiles, as_json, trust_remote_code: bool = False):
    from lowmem_rlhf.model_spec import load_spec
    from lowmem_rlhf.planner import advice, plan

    shape = _shape(seq_len, batch, prompt_len, response_len, rollout_batch)
    hw = _hardware(gpu, vram, ram)
    spec = load_spec(model, trust_remote_code)
    p = plan(spec, hw, shape, _profiles(profiles), _stages(stages))
    if as_json:
        print(json.dumps(p.to_dict(), indent=2))
    else:
        print_plan(p)
    if p.chosen is None:
        budget, what = p.budget()
        raise NoFit(f"no profile fits {spec.name} ({', '.join(p.stages)}) in {_gib(budget)} GiB of {what}: {advice(p)}")
    return p


class NoFit(UserError):
    """Nothing fits: exit 1 (the input was valid, the hardware is too small)."""

    exit_code = 1


@app.command()
def plan(
    gpu: Optional[str] = typer.Option(None, "--gpu", help=GPU_HELP),
    vram: Optional[float] = typer.Option(None, "--vram", help="GPU memory in GiB (overrides --gpu's)"),
    ram: Optional[float] = typer.Option(None, "--ram", help="CPU RAM in GiB (default: this machine's available RAM)"),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    seq_len: int = typer.Option(512, "--seq-len", help="SFT/RM sequence length in tokens"),
    batch: int = typer.Option(16, "--batch", help="effective batch (sequences per optimizer step)"),
    prompt_len: int = typer.Option(256, "--prompt-len", help="PPO prompt length in tokens"),
    response_len: int = typer.Option(256, "--response-len", help="PPO generated tokens per prompt"),
    rollout_batch: int = typer.Option(8, "--rollout-batch", help="PPO prompts per rollout"),
    stages: str = typer.Option("sft,rm,ppo", "--stages", help="stages that must fit, comma-separated"),
    profiles: Optional[str] = typer.Option(None, "--profiles", help="only these profiles (names or YAML paths, comma-separated)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    simulate: bool = typer.Option(False, "--simulate", help="also rehearse one step of each stage of the chosen profile on meta tensors and print simulated vs analytic peaks"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow a local model folder's own Python code (to read its shapes on the meta device)"),
):
    """Which profile makes SFT, RM and PPO fit this card, and each stage's estimated peak."""
    if simulate and as_json:  # one JSON document: the plan's own print is replaced by the combined one
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            p = _run_plan(gpu, vram, ram, model, seq_len, batch, prompt_len, response_len, rollout_batch,
                          stages, profiles, True, trust_remote_code)
    else:
        p = _run_plan(gpu, vram, ram, model, seq_len, batch, prompt_len, response_len, rollout_batch,
                      stages, profiles, as_json, trust_remote_code)
    if simulate:
        from lowmem_rlhf.simulate import simulate as run_simulation

        sims = [run_simulation(model, p.chosen.profile, st, p.shape) for st in p.stages]
        if as_json:
            d = p.to_dict()
            d["simulation"] = {s.stage: s.to_dict() for s in sims}
            print(json.dumps(d, indent=2))
        else:
            print_simulation(sims)


def print_simulation(sims: list) -> None:
    """Simulated (meta-device rehearsal) vs analytic allocated peak per phase, tags at the peak."""
    from lowmem_rlhf.simulate import NOT_MODELLED

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
        out.print(t)
        if sim.kv_cache:
            out.print(f"simulated KV cache at full length: {_gib(sim.kv_cache)} GiB")
        for note in sim.notes:
            out.print(f"note: {note}")
    out.print("not modelled by the simulation (the device column adds the estimator's figures): "
              + "; ".join(f"{k}: {v}" for k, v in NOT_MODELLED.items()))


@app.command()
def estimate(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    stage: str = typer.Option("sft", "--stage", help="sft, rm or ppo"),
    profile: str = typer.Option("qlora-shared", "--profile", help="profile whose knobs the flags below override"),
    quant: Optional[str] = typer.Option(None, "--quant", help="none, nf4, fp4 or int8"),
    double_quant: Optional[bool] = typer.Option(None, "--double-quant/--no-double-quant", help="NF4/FP4 double quantization"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 (weights and compute)"),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank; 0 = full fine-tune"),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets", help="comma-separated linear names, or all-linear"),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="LoRA dropout (its masks cost memory)"),
    seq_len: int = typer.Option(512, "--seq-len", help="SFT/RM sequence length in tokens"),
    batch: Optional[int] = typer.Option(None, "--batch", help="micro-batch (sequences per forward)"),
    grad_ckpt: Optional[bool] = typer.Option(None, "--grad-ckpt/--no-grad-ckpt", help="gradient checkpointing"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw, adamw_8bit, paged_adamw_32bit, paged_adamw_8bit"),
    offload: Optional[str] = typer.Option(None, "--offload", help="none or zero3 (DeepSpeed param+optimizer offload)"),
    kbit_upcast: Optional[bool] = typer.Option(None, "--kbit-upcast/--no-kbit-upcast", help="peft k-bit prep's fp32 cast of non-quantized params"),
    prompt_len: int = typer.Option(256, "--prompt-len", help="PPO prompt length"),
    response_len: int = typer.Option(256, "--response-len", help="PPO generated tokens"),
    rollout_batch: int = typer.Option(8, "--rollout-batch", help="PPO prompts per rollout"),
    separate_models: bool = typer.Option(False, "--separate-models", help="PPO with four model copies instead of one shared base"),
    target: str = typer.Option("cuda", "--target", help="cuda (GPU figures) or cpu (host RAM)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (allocated_gib, reserved_gib, device_gib, cpu_ram_gib, components, phases)"),
    simulate: bool = typer.Option(False, "--simulate", help="rehearse one real step on meta tensors (no weights allocated) and print simulated vs analytic per phase"),
):
    """Peak memory of one stage for explicit knobs, by component and phase."""
    from lowmem_rlhf.config import Profile, dataclass_from_dict, load_profile
    from lowmem_rlhf.estimator import estimate as run_estimate
    from lowmem_rlhf.model_spec import load_spec

    if target not in ("cuda", "cpu"):
        raise UserError(f"--target must be cuda or cpu, got {target!r}")
    base = load_profile(profile).to_dict()
    overrides = {"quant": quant, "double_quant": double_quant, "dtype": dtype, "lora_r": lora_r,
                 "lora_dropout": lora_dropout, "micro_batch": batch, "grad_ckpt": grad_ckpt,
                 "optimizer": optimizer, "offload": offload, "kbit_fp32_upcast": kbit_upcast}
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
    est = run_estimate(spec, prof, stage, shape, target=target, separate_models=separate_models)
    if simulate:
        from lowmem_rlhf.simulate import simulate as run_simulation

        if target != "cuda" or separate_models:
            raise UserError("--simulate rehearses the CUDA layout of one shared base; drop --target cpu / --separate-models")
        sim = run_simulation(model, prof, stage, shape)
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
    out.print(f"[bold]{stage.upper()}[/bold] {spec.name}: quant={prof.quant}"
              f"{'+dq' if prof.double_quant and prof.quant in ('nf4', 'fp4') else ''} dtype={prof.dtype} "
              f"lora_r={prof.lora_r} ckpt={prof.grad_ckpt} optimizer={prof.optimizer} offload={prof.offload} "
              f"micro-batch={prof.micro_batch}")
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
    out.print(t)
    out.print(f"peak: {est.peak.name}: allocated {_gib(est.allocated)} GiB, reserved {_gib(est.reserved)} GiB"
              + (f", device {_gib(est.device)} GiB" if target == "cuda" else "")
              + f", CPU RAM {_gib(est.cpu_ram)} GiB")
    for note in est.notes:
        out.print(f"note: {note}")


@app.command()
def auto(
    gpu: Optional[str] = typer.Option(None, "--gpu", help=GPU_HELP),
    vram: Optional[float] = typer.Option(None, "--vram", help="GPU memory in GiB"),
    ram: Optional[float] = typer.Option(None, "--ram", help="CPU RAM in GiB"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP + " (default: the embedded SmolLM2-135M-Instruct)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="run folder (default: runs/auto-<time>)"),
    reward: Optional[str] = typer.Option(None, "--reward", help="programmatic reward module:function (skips the RM stage)"),
    reward_cmd: Optional[str] = typer.Option(None, "--reward-cmd", help="external evaluator command (JSON lines in, one score per line out; skips RM)"),
    data: Optional[str] = typer.Option(None, "--data", help="SFT data (default: bundled self-instruct seed tasks)"),
    pairs: Optional[str] = typer.Option(None, "--pairs", help="preference pairs for the RM (default: bundled demo pairs)"),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="PPO prompts (default: bundled demo prompts)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="SFT/RM sequence length (default: 512 for planning a named model, 128 for the demo)"),
    batch: int = typer.Option(16, "--batch", help="effective batch used for planning"),
    prompt_len: Optional[int] = typer.Option(None, "--prompt-len", help="PPO prompt length (default 256 planning / 64 demo)"),
    response_len: Optional[int] = typer.Option(None, "--response-len", help="PPO generated tokens (default 256 planning / 16 demo)"),
    rollout_batch: int = typer.Option(8, "--rollout-batch", help="PPO prompts per rollout"),
    sft_steps: int = typer.Option(16, "--sft-steps", help="SFT optimizer steps"),
    rm_steps: int = typer.Option(30, "--rm-steps", help="RM optimizer steps"),
    ppo_iterations: int = typer.Option(20, "--ppo-iterations", help="PPO iterations"),
    ppo_lr: Optional[float] = typer.Option(None, "--ppo-lr", help="PPO actor learning rate (default: 2e-4 for the demo, else the profile's)"),
    seed: int = typer.Option(0, "--seed"),
    dry_run: bool = typer.Option(False, "--dry-run", help="plan only: print what would run, load nothing"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the model's own Python code"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue the auto run in this folder with its saved settings: finished stages are kept, the stage in progress continues from its newest checkpoint"),
):
    """Detect (or take) the hardware, plan, and run SFT -> RM -> PPO with the chosen profile."""
    import time as _time

    from lowmem_rlhf.auto import AutoConfig, load_auto_config, run_auto
    from lowmem_rlhf.config import load_all_profiles
    from lowmem_rlhf.planner import runnable_profiles

    if resume is not None:
        cfg = load_auto_config(resume)
        cfg.out = resume
        out.print(f"resuming {resume} with its saved settings (profile {cfg.profile.name})")
        _print_auto_summary(run_auto(cfg, None, out, resume=True), resume)
        return
    demo = model is None
    seq = seq_len or (128 if demo else 512)
    plen = prompt_len or (64 if demo else 256)
    rlen = response_len or (16 if demo else 256)
    plan_model = model or "smollm2-135m"
    profiles = ",".join(p.name for p in runnable_profiles(load_all_profiles()))  # what auto can run
    p = _run_plan(gpu, vram, ram, plan_model, seq, batch, plen, rlen, rollout_batch, "sft,rm,ppo", profiles, as_json,
                  trust_remote_code)
    if dry_run:
        if not as_json:
            out.print(f"dry run: would run SFT -> RM -> PPO of {p.spec.name} with profile "
                      f"{p.chosen.profile.name}; nothing was loaded.")
        return
    if gpu and p.hardware.gpu is not None and p.hardware.gpu.source != "detected":
        import torch

        if not torch.cuda.is_available():
            out.print(f"note: planned for {p.hardware.gpu.name}, but no GPU is here; running on the CPU")
    run = out_dir or Path("runs") / _time.strftime("auto-%Y%m%d-%H%M%S")
    cfg = AutoConfig(model=model, out=run, profile=p.chosen.profile, reward=reward, reward_cmd=reward_cmd,
                     sft_steps=sft_steps, sft_len=seq, rm_steps=rm_steps, rm_len=min(seq, 128 if demo else seq),
                     ppo_iterations=ppo_iterations, ppo_lr=ppo_lr if ppo_lr is not None else (2e-4 if demo else None),
                     prompt_len=plen, response_len=rlen, rollout_batch=rollout_batch,
                     seed=seed, trust_remote_code=trust_remote_code)
    if data:
        cfg.sft_data = data
    if pairs:
        cfg.pairs = pairs
    if prompts:
        cfg.prompts = prompts
    _print_auto_summary(run_auto(cfg, p.to_dict(), out), run)


def _print_auto_summary(summary: dict, run: Path) -> None:
    t = Table(title=f"auto: {run}")
    t.add_column("result")
    t.add_column("value", justify="right")
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    t.add_row("SFT held-out loss (before -> after)", f"{fmt(summary['sft']['eval_loss_before'])} -> {fmt(summary['sft']['eval_loss_after'])}")
    if summary["rm"]:
        t.add_row("RM held-out accuracy (before -> after)", f"{fmt(summary['rm']['heldout_accuracy_before'])} -> {fmt(summary['rm']['heldout_accuracy'])}")
    t.add_row("held-out checker score, SFT policy", fmt(summary["heldout_checker_sft"]))
    t.add_row("held-out checker score, PPO policy", fmt(summary["heldout_checker_ppo"]))
    t.add_row("PPO reward (first 5 -> last 5 iterations)", f"{fmt(summary['ppo_reward_first5'])} -> {fmt(summary['ppo_reward_last5'])}")
    t.add_row("plot", summary["plot"])
    t.add_row("wall time", f"{summary['wall_seconds'] / 60:.1f} min")
    out.print(t)


@app.command()
def ppo(
    prompts: str = typer.Option(..., "--prompts", "-p", help="prompts file: prompt / instruction / messages / hh-rlhf rows"),
    out_dir: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (the one SFT/RM used)"),
    sft: Optional[Path] = typer.Option(None, "--sft", help="finished SFT stage (RUN/sft): merged into the base = the reference"),
    reward_model: Optional[Path] = typer.Option(None, "--reward-model", help="finished RM stage (RUN/rm): reward, and the critic's start"),
    reward: Optional[str] = typer.Option(None, "--reward", help="programmatic reward: module:function or file.py:function"),
    reward_cmd: Optional[str] = typer.Option(None, "--reward-cmd", help="evaluator command: JSON lines in, one score per line out"),
    reward_timeout: float = typer.Option(60.0, "--reward-timeout", help="seconds the evaluator command may take per batch"),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP),
    iterations: int = typer.Option(20, "--iterations", help="PPO iterations (rollout + update)"),
    rollout_batch: int = typer.Option(8, "--rollout-batch", help="prompts per rollout"),
    prompt_len: int = typer.Option(128, "--prompt-len", help="prompt tokens (cut from the left)"),
    response_len: int = typer.Option(32, "--response-len", help="generated tokens"),
    ppo_epochs: int = typer.Option(4, "--ppo-epochs", help="passes over each rollout"),
    lr: Optional[float] = typer.Option(None, "--lr", help="actor learning rate (default: the profile's)"),
    critic_lr: Optional[float] = typer.Option(None, "--critic-lr", help="critic learning rate"),
    kl_coef: float = typer.Option(0.05, "--kl-coef", help="KL penalty coefficient (initial, if adaptive)"),
    kl_estimator: str = typer.Option("k1", "--kl-estimator", help="k1 or k3"),
    kl_target: Optional[float] = typer.Option(None, "--kl-target", help="adaptive KL: target per-sequence KL"),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    eval_prompts: Optional[str] = typer.Option(None, "--eval-prompts", help="held-out prompts scored before/after (greedy)"),
    eval_reward: Optional[str] = typer.Option(None, "--eval-reward", help="module:function scoring the held-out answers"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing RUN/ppo"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in RUN/.ppo.partial (same settings)"),
    save_every: int = typer.Option(2, "--save-every", help="iterations between checkpoints (0: only when stopped by Ctrl-C/SIGTERM)"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="plan for this GPU preset instead of the detected one"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the model's own Python code"),
):
    """PPO on one shared base: actor/critic/reward adapters, reference = adapters off."""
    from lowmem_rlhf.ppo import PPOConfig, run_ppo

    _positive(iterations=iterations, rollout_batch=rollout_batch, prompt_len=prompt_len,
              response_len=response_len, ppo_epochs=ppo_epochs)
    _not_negative(save_every=save_every)
    if kl_estimator not in ("k1", "k3"):
        raise UserError(f"--kl-estimator must be k1 or k3, got {kl_estimator!r}")
    prof = _stage_profile(profile, model, "ppo", _shape(512, 16, prompt_len, response_len, rollout_batch), gpu, trust_remote_code)
    out.print(f"PPO with profile {prof.name} (micro-batch {prof.micro_batch}) -> {out_dir}/ppo")
    summary = run_ppo(PPOConfig(model=model, prompts=prompts, out=out_dir, profile=prof, sft=sft,
                                reward_model=reward_model, reward=reward, reward_cmd=reward_cmd,
                                reward_timeout=reward_timeout, iterations=iterations, rollout_batch=rollout_batch,
                                prompt_len=prompt_len, response_len=response_len, ppo_epochs=ppo_epochs, lr=lr,
                                critic_lr=critic_lr, kl_coef=kl_coef, kl_estimator=kl_estimator, kl_target=kl_target,
                                temperature=temperature, top_p=top_p, eval_prompts=eval_prompts,
                                eval_reward=eval_reward, seed=seed, overwrite=overwrite,
                                trust_remote_code=trust_remote_code, resume=resume, save_every=save_every),
                     console=out)
    _print_summary(summary, "PPO summary")


@app.command()
def export(
    run: Path = typer.Argument(..., help="run folder (uses RUN/ppo/actor, else RUN/sft/adapter)"),
    out_dir: Path = typer.Option(..., "--out", "-o", help="folder for the standalone model"),
    dtype: str = typer.Option("bf16", "--dtype", help="bf16, fp16 or fp32"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (default: the one recorded in the run)"),
):
    """Write a standalone model: 16-bit base with the SFT and PPO adapters merged in."""
    from lowmem_rlhf.export import export_run

    if dtype not in ("bf16", "fp16", "fp32"):
        raise UserError(f"--dtype must be bf16, fp16 or fp32, got {dtype!r}")
    path = export_run(run, out_dir, dtype, model)
    out.print(f"exported {run} -> {path} (load it with transformers.AutoModelForCausalLM.from_pretrained)")


ZERO3_PPO_REASON = ("PPO does not run under ZeRO-3: with actor and critic adapters on one DeepSpeed engine the "
                    "critic never moved and the actor took twice torch's update (scripts/zero3_ppo_equivalence.py)")


def _stage_profile(profile: Optional[str], model: Optional[str], stage: str, shape, gpu: Optional[str],
                   trust_remote_code: bool = False):
    """The profile a training stage runs with: the named one, or the planner's pick for `shape` on
    this machine (or on --gpu)."""
    from lowmem_rlhf.config import load_all_profiles, load_profile
    from lowmem_rlhf.embedded import resolve_model_path
    from lowmem_rlhf.loading import resolve_source
    from lowmem_rlhf.model_spec import load_spec
    from lowmem_rlhf.planner import choose_profile

    if profile:
        prof = load_profile(profile)
        if not prof.is_lora:
            raise UserError(f"profile {prof.name}: this version trains LoRA adapters on a shared base; "
                            "use qlora-shared, lora-bf16-shared or zero3-offload")
        if prof.offload == "zero3" and stage == "ppo":
            raise UserError(f"profile {prof.name}: {ZERO3_PPO_REASON}; use qlora-shared for PPO")
        return prof
    source = resolve_source(resolve_model_path(model))
    spec = load_spec(source, trust_remote_code)
    return choose_profile(spec, _hardware(gpu, None, None), shape, load_all_profiles(), (stage,)).profile


def _print_summary(summary: dict, title: str) -> None:
    from lowmem_rlhf.report import print_memory_report

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
    out.print(t)
    print_memory_report(summary["memory"], out)




@app.command()
def sft(
    data: str = typer.Option(..., "--data", "-d", help="instruction data: .json/.jsonl(.gz)/.parquet (self_instruct, alpaca, messages, hh-rlhf) or a hub dataset"),
    out_dir: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="model folder or hub id (default: embedded SmolLM2-135M-Instruct)"),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP),
    max_steps: int = typer.Option(50, "--max-steps", help="optimizer steps"),
    max_len: int = typer.Option(512, "--max-len", help="tokens per example (prompt cut from the left first)"),
    batch: int = typer.Option(16, "--batch", help="effective batch (examples per optimizer step)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default: the profile's)"),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="held-out share of the data"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing RUN/sft"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in RUN/.sft.partial (same settings)"),
    save_every: int = typer.Option(10, "--save-every", help="optimizer steps between checkpoints (0: only when stopped by Ctrl-C/SIGTERM)"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="plan for this GPU preset instead of the detected one"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the model's own Python code (off by default)"),
):
    """Supervised fine-tuning: train the `sft` LoRA adapter (completion-only loss)."""
    from lowmem_rlhf.sft import SFTConfig, run_sft

    _positive(max_steps=max_steps, max_len=max_len, batch=batch)
    _not_negative(save_every=save_every)
    prof = _stage_profile(profile, model, "sft", _shape(max_len, batch, 256, 256, 8), gpu, trust_remote_code)
    out.print(f"SFT with profile {prof.name} (micro-batch {prof.micro_batch}) -> {out_dir}/sft")
    summary = run_sft(SFTConfig(model=model, data=data, out=out_dir, profile=prof, max_len=max_len, batch=batch,
                                max_steps=max_steps, lr=lr, eval_fraction=eval_fraction, seed=seed,
                                overwrite=overwrite, trust_remote_code=trust_remote_code, resume=resume,
                                save_every=save_every), console=out)
    _print_summary(summary, "SFT summary")


@app.command()
def rm(
    data: str = typer.Option(..., "--data", "-d", help="preference pairs: hh-rlhf chosen/rejected transcripts, or prompt/chosen/rejected"),
    out_dir: Path = typer.Option(..., "--out", "-o", help=OUT_HELP),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="base model (the same one SFT used)"),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="finished SFT stage (RUN/sft): merged into the base first"),
    profile: Optional[str] = typer.Option(None, "--profile", help=PROFILE_HELP),
    max_steps: int = typer.Option(50, "--max-steps", help="optimizer steps"),
    max_len: int = typer.Option(512, "--max-len", help="tokens per sequence"),
    batch: int = typer.Option(16, "--batch", help="pairs per optimizer step"),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="use at most this many pairs"),
    lr: Optional[float] = typer.Option(None, "--lr", help="learning rate (default: the profile's)"),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="held-out share for accuracy"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing RUN/rm"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest checkpoint in RUN/.rm.partial (same settings)"),
    save_every: int = typer.Option(10, "--save-every", help="optimizer steps between checkpoints (0: only when stopped by Ctrl-C/SIGTERM)"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="plan for this GPU preset instead of the detected one"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the model's own Python code"),
):
    """Reward model: train a `reward` LoRA adapter + scalar head with the pairwise ranking loss."""
    from lowmem_rlhf.rm import RMConfig, run_rm

    _positive(max_steps=max_steps, max_len=max_len, batch=batch)
    _not_negative(save_every=save_every)
    prof = _stage_profile(profile, model, "rm", _shape(max_len, batch, 256, 256, 8), gpu, trust_remote_code)
    out.print(f"RM with profile {prof.name} (micro-batch {prof.micro_batch}) -> {out_dir}/rm")
    summary = run_rm(RMConfig(model=model, data=data, out=out_dir, profile=prof, init_from=init_from,
                              max_len=max_len, batch=batch, max_steps=max_steps, lr=lr, max_pairs=max_pairs,
                              eval_fraction=eval_fraction, seed=seed, overwrite=overwrite,
                              trust_remote_code=trust_remote_code, resume=resume, save_every=save_every),
                     console=out)
    _print_summary(summary, "RM summary")


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
    raise typer.Exit(render(run_checks(override or None, disk_path=out_dir), out))


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


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: one-line errors, never a traceback for bad input."""
    import errno

    from lowmem_rlhf.stopping import Interrupted

    _quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        err.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    except Interrupted as e:
        err.print(f"stopped: {e}", markup=False, highlight=False, soft_wrap=True)
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
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
