"""`lowmem-rlhf doctor`: is this machine ready to train? One line per check, OK / WARN / FAIL.

Checks: the versions of python and of every direct dependency (the zero3 and flash extras included)
against the ranges this release was tested with, read from the installed package's own metadata
(pyproject.toml is the one place they are declared), CUDA and the GPU (or the CPU's
bf16 support), RAM and disk, and a real 4-bit matmul with a backward through bitsandbytes, the
part that breaks first on a new machine. WARN and FAIL lines carry a fix. Exit code 1 only for FAIL.

Nothing here imports deepspeed, transformers or flash-attn: versions come from package metadata.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from lowmem_rlhf.config import GIB, ZERO3_INSTALL

DIST_NAME = "lowmem-rlhf"
TORCH_PIN = "2.13.0"  # the torch this release was tested with; install it first, then the rest
# Shown first, in this order; the other direct dependencies follow in pyproject order.
STACK = ("python", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "deepspeed", "flash-attn")
EXTRAS = ("zero3", "flash")  # optional extras whose packages are checked when installed (`test` is not)
OPTIONAL = {"deepspeed": f"optional: only the zero3-offload profile needs it; {ZERO3_INSTALL}",
            "flash-attn": "optional, GPU-only"}
DISK_WARN_GIB = 20.0
DISK_FAIL_GIB = 2.0
RAM_WARN_GIB = 4.0

# pyproject.toml's ranges, used only when the installed package's metadata cannot be read (a source
# tree on PYTHONPATH); tests/test_doctor.py checks that this table equals pyproject.toml.
_FALLBACK_RANGES = {
    "python": ">=3.10",
    "torch": ">=2.4,<2.14",
    "transformers": ">=5.0,<5.24",
    "peft": ">=0.17,<0.22",
    "trl": ">=1.0,<1.17",
    "bitsandbytes": ">=0.48,<0.51",
    "accelerate": ">=1.5,<1.16",
    "deepspeed": ">=0.17,<0.20",
    "flash-attn": ">=2.6",
    "datasets": ">=3.0,<5.3",
    "psutil": ">=5.9,<7.3",
    "pyyaml": ">=6.0,<6.1",
    "rich": ">=13.0,<15.1",
    "typer": ">=0.12,<0.30",
    "gguf": ">=0.10,<0.20",
    "matplotlib": ">=3.8,<3.12",
    "tqdm": ">=4.66,<4.71",
    "safetensors": ">=0.4,<0.9",
    "packaging": ">=23.0,<26.5",
}


@dataclass
class Check:
    name: str
    status: str  # "OK" | "WARN" | "FAIL"
    detail: str
    fix: str = ""


def _spec_str(spec: SpecifierSet) -> str:
    """Lower bounds first: ">=2.4,<2.14" rather than packaging's "<2.14,>=2.4"."""
    return ",".join(sorted((str(s) for s in spec), key=lambda s: (not s.startswith(">"), s)))


def _runtime_requirement(req: Requirement) -> bool:
    """A direct dependency, or one of EXTRAS' (not the `test` extra's)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in ("", *EXTRAS))


def _in_display_order(ranges: dict[str, str]) -> dict[str, str]:
    first = {name: ranges[name] for name in STACK if name in ranges}
    return {**first, **{k: v for k, v in ranges.items() if k not in first}}


def _ranges_from_metadata() -> dict[str, str]:
    """package -> specifier from the installed lowmem-rlhf's Requires-Dist (+ Requires-Python);
    {} when the package's metadata cannot be found."""
    found: dict[str, str] = {}
    try:
        requires = importlib.metadata.requires(DIST_NAME) or []
        python = importlib.metadata.metadata(DIST_NAME).get("Requires-Python")
    except importlib.metadata.PackageNotFoundError:
        return {}
    if python:
        found["python"] = _spec_str(SpecifierSet(python))
    for line in requires:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        name = canonicalize_name(req.name)
        if name not in found and _runtime_requirement(req):
            found[name] = _spec_str(req.specifier)
    return _in_display_order(found)


def _tested_ranges() -> dict[str, str]:
    try:
        meta = _ranges_from_metadata()
    except Exception:  # broken metadata must not break the doctor
        meta = {}
    return meta or _in_display_order(dict(_FALLBACK_RANGES))


TESTED_RANGES: dict[str, str] = _tested_ranges()


# ---------------------------------------------------------------- versions

def _installed(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _in_range(version: str, spec: SpecifierSet) -> bool:
    try:
        return spec.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def _torch_pin(ranges: dict[str, str]) -> str:
    """`torch==X` to keep in every pip command, so pip never swaps the torch build: the installed
    torch when it is in range, else the tested pin."""
    spec = SpecifierSet(ranges.get("torch", _FALLBACK_RANGES["torch"]))
    have = _installed("torch")
    if have and _in_range(have, spec):
        return f"torch=={Version(have).public}"
    return f"torch=={TORCH_PIN}"


def _pip_fix(name: str, spec: str, ranges: dict[str, str]) -> str:
    if name == "torch":
        want = f"torch=={TORCH_PIN}" if _in_range(TORCH_PIN, SpecifierSet(spec)) else f'"torch{spec}"'
        return (f"pip install {want} first (a CUDA build on GPU machines, see pytorch.org), "
                "then the other packages; keep torch pinned in every later pip command")
    try:
        pin = _torch_pin(ranges)
    except InvalidSpecifier:
        pin = f"torch=={TORCH_PIN}"
    build = "--no-build-isolation " if name == "deepspeed" else ""  # a source build against this torch
    return f'pip install {build}{pin} "{name}{spec}"  (torch pinned so pip leaves it alone)'


def _version_check(name: str, spec_text: str, ranges: dict[str, str]) -> Check:
    try:
        spec = SpecifierSet(spec_text)
    except InvalidSpecifier:
        return Check(name, "WARN", f"cannot check: {spec_text!r} is not a PEP 440 range",
                     "pass a range like '>=1.0,<2.0'")
    shown = _spec_str(spec) or "any"
    if name == "python":
        have = platform.python_version()
        if _in_range(have, spec):
            return Check(name, "OK", f"{have} (tested {shown})")
        return Check(name, "WARN", f"{have}, outside the tested range {shown}",
                     f"use a Python {shown} virtual environment")
    have = _installed(name)
    if have is None:
        if name in OPTIONAL:
            return Check(name, "OK", f"not installed ({OPTIONAL[name]})")
        return Check(name, "FAIL", f"not installed (needs {shown})", _pip_fix(name, shown if spec else "", ranges))
    if _in_range(have, spec):
        return Check(name, "OK", f"{have} (tested {shown})")
    return Check(name, "WARN", f"{have}, outside the tested range {shown}", _pip_fix(name, shown, ranges))


def check_versions(ranges: dict[str, str]) -> list[Check]:
    return [_version_check(name, spec, ranges) for name, spec in ranges.items()]


# ---------------------------------------------------------------- CUDA / CPU

def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def check_compute() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        build = (f"torch {torch.__version__} is a CPU build" if torch.version.cuda is None
                 else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
        checks = [Check("cuda", "WARN", f"CPU only: training runs on CPU, slow; plan with --gpu to size a card ({build})",
                        f"on a GPU machine install a CUDA build of torch=={TORCH_PIN} (pytorch.org); "
                        "`lowmem-rlhf plan --gpu 4090` sizes a card you do not have")]
        flags = _cpu_flags()
        if flags is None:
            detail = f"{platform.machine()}: bf16 support unknown (no /proc/cpuinfo); fp32 compute is the safe choice"
        elif "avx512_bf16" in flags or "amx_bf16" in flags:
            have = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags)
            detail = f"{have}: native bf16 on this CPU (4-bit repack guard applies, pitfall #1 in docs/pitfalls.md)"
        else:
            detail = "no avx512_bf16: bf16 is emulated on this CPU, fp32 compute may be faster"
        checks.append(Check("cpu bf16", "OK", detail))
        return checks

    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    checks = [Check("cuda", "OK", f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible")]
    checks.append(Check("gpu", "OK", f"{props.name}, sm_{props.major}{props.minor}"))
    from lowmem_rlhf.plan.hardware import native_bf16

    if native_bf16((props.major, props.minor)):
        checks.append(Check("gpu bf16", "OK", "supported"))
    else:
        checks.append(Check("gpu bf16", "WARN", f"{props.name} has no bf16",
                            "LoRA/QLoRA profiles run with fp16 compute (the planner switches); "
                            "full fine-tuning needs a bf16 card (sm_80+)"))
    free, total = torch.cuda.mem_get_info(index)
    detail = f"{free / GIB:.1f} GiB free of {total / GIB:.1f} GiB"
    if free < 0.5 * total:
        checks.append(Check("vram", "WARN", detail + f" ({(total - free) / GIB:.1f} GiB held by other processes)",
                            "close other GPU programs (see nvidia-smi), or plan with --vram FREE_GIB"))
    else:
        checks.append(Check("vram", "OK", detail))
    return checks


# ---------------------------------------------------------------- RAM / disk

def check_ram() -> Check:
    import psutil

    mem = psutil.virtual_memory()
    detail = f"{mem.available / GIB:.1f} GiB available of {mem.total / GIB:.1f} GiB"
    if mem.available < RAM_WARN_GIB * GIB:
        return Check("ram", "WARN", detail, "close other programs, or plan with --ram AVAILABLE_GIB")
    return Check("ram", "OK", detail)


def check_disk(path: str | Path) -> Check:
    p = Path(path).expanduser().resolve()
    while not p.exists() and p != p.parent:  # a run folder not made yet: its nearest existing parent
        p = p.parent
    usage = shutil.disk_usage(p)
    free = usage.free / GIB
    detail = f"{free:.1f} GiB free at {p}"
    fix = "free space or point --out / HF_HOME at a bigger disk (a 7B base is ~15 GiB in 16-bit)"
    if free < DISK_FAIL_GIB:
        return Check("disk", "FAIL", detail + f" (under {DISK_FAIL_GIB:g} GiB)", fix)
    if free < DISK_WARN_GIB:
        return Check("disk", "WARN", detail + f" (under {DISK_WARN_GIB:g} GiB)", fix)
    return Check("disk", "OK", detail)


# ---------------------------------------------------------------- 4-bit

def _import_bnb():
    # bitsandbytes logs a warning at import on avx512_bf16 CPUs when the optional `kernels`
    # package is absent; it is noise for a health check.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    return bnb


def _fourbit_probe(corrupt: bool = False, device: str | None = None) -> tuple[bool, str]:
    """Quantize a real 128x128 nf4 `Linear4bit`, run an eval forward under no_grad (what generation
    does: on avx512_bf16 CPUs it would repack the weights, pitfall #1 in docs/pitfalls.md), then a training forward and
    backward through a trainable LoRA-like input projection, and compare output and gradient to an
    fp32 reference that uses the dequantized weight. `corrupt=True` flips bits of the packed weight
    after the reference is taken, so a correct comparison must then say no."""
    import torch

    bnb = _import_bnb()
    from bitsandbytes.functional import dequantize_4bit

    from lowmem_rlhf.model.loading import guard_bnb_cpu_repack

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    n, r, batch = 128, 8, 4
    weight = torch.randn(n, n, generator=gen) * 0.05
    lin = bnb.nn.Linear4bit(n, n, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="cpu")
    lin.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    lin = lin.to(device)  # quantizes
    if not getattr(lin.weight, "bnb_quantized", False) or lin.weight.quant_state is None:
        return False, f"moving Linear4bit to {device} did not quantize it"
    guard_bnb_cpu_repack(lin)
    deq = dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    if corrupt:
        lin.weight.data ^= 0x37  # a different 4-bit code in both nibbles of every byte

    x = torch.randn(batch, n, generator=gen).to(device)
    a_init = (torch.randn(n, r, generator=gen) * 0.1).to(device)
    b_init = (torch.randn(r, n, generator=gen) * 0.1).to(device)
    upstream = torch.randn(batch, n, generator=gen).to(device)

    lin.eval()
    with torch.no_grad():
        lin(x)  # the eval forward that would repack without the guard
    lin.train()

    def step(layer):
        a = a_init.clone().requires_grad_(True)
        b = b_init.clone().requires_grad_(True)
        h = x + (x @ a) @ b  # the trainable (LoRA-like) input: its gradient flows through the 4-bit weight
        y = layer(h)
        (y * upstream).sum().backward()
        return y.detach(), a.grad, b.grad

    y, ga, gb = step(lin)
    y_ref, ga_ref, gb_ref = step(lambda h: h @ deq.t())
    if ga is None or gb is None:
        return False, (f"nf4 {n}x{n} Linear4bit on {device}: backward gave no gradient through the 4-bit weight "
                       "(an inference-only kernel, pitfall #1 in docs/pitfalls.md)")

    def close(got, ref):
        tol = 1e-3 * float(ref.abs().max()) + 1e-6
        return float((got - ref).abs().max()), bool(torch.allclose(got, ref, rtol=1e-3, atol=tol))

    d_out, ok_out = close(y, y_ref)
    d_ga, ok_ga = close(ga, ga_ref)
    d_gb, ok_gb = close(gb, gb_ref)
    what = f"nf4 {n}x{n} Linear4bit on {device}"
    if not ok_out:
        return False, f"{what}: forward differs from the dequantized fp32 matmul (max diff {d_out:.3g})"
    if not (ok_ga and ok_gb):
        return False, (f"{what}: forward matches but the gradients differ from fp32 "
                       f"(max diff {max(d_ga, d_gb):.3g}; a kernel without backward, pitfall #1 in docs/pitfalls.md?)")
    return True, f"{what}: forward and LoRA gradients match the dequantized fp32 reference"


def _fourbit_matmul_ok(corrupt: bool = False, device: str | None = None) -> bool:
    """True when 4-bit output and gradients match the fp32 reference (see `_fourbit_probe`)."""
    return _fourbit_probe(corrupt=corrupt, device=device)[0]


def check_fourbit() -> Check:
    name = "4-bit (bitsandbytes)"
    t0 = time.perf_counter()
    try:
        ok, detail = _fourbit_probe()
    except ImportError as e:
        return Check(name, "FAIL", f"cannot import bitsandbytes ({e})",
                     f'pip install {_torch_pin(TESTED_RANGES)} "bitsandbytes{TESTED_RANGES["bitsandbytes"]}"')
    except Exception as e:
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        return Check(name, "FAIL", f"{type(e).__name__}: {msg}",
                     "4-bit profiles (qlora-*) will not run here; reinstall bitsandbytes in the tested range "
                     "or use a 16-bit profile (lora-bf16-shared)")
    detail += f" ({time.perf_counter() - t0:.1f} s)"
    if ok:
        return Check(name, "OK", detail)
    return Check(name, "FAIL", detail, "4-bit training is wrong here: use a 16-bit profile (lora-bf16-shared) "
                 f'and reinstall bitsandbytes{TESTED_RANGES["bitsandbytes"]}')


# ---------------------------------------------------------------- entry points

def _guarded(name: str, fn, *args) -> list[Check]:
    """Run one check; an unexpected error becomes a FAIL line, never a traceback."""
    try:
        got = fn(*args)
    except Exception as e:
        return [Check(name, "FAIL", f"check crashed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                      "report this with the output of `lowmem-rlhf doctor`")]
    return got if isinstance(got, list) else [got]


def run_checks(ranges: dict[str, str] | None = None, disk_path: str | Path = ".") -> list[Check]:
    """Every check, in display order. `ranges` overrides or extends TESTED_RANGES per package
    (a package not in TESTED_RANGES is checked as required)."""
    effective = dict(TESTED_RANGES)
    if ranges:
        effective.update({(k if k == "python" else canonicalize_name(k)): v for k, v in ranges.items()})
    checks = _guarded("versions", check_versions, effective)
    checks += _guarded("cuda", check_compute)
    checks += _guarded("ram", check_ram)
    checks += _guarded("disk", check_disk, disk_path)
    checks += _guarded("4-bit (bitsandbytes)", check_fourbit)
    return checks


_STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}


def render(checks: list[Check], console) -> int:
    """Print the checks as a rich table; 0 when nothing FAILed (WARN allowed), else 1."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="lowmem-rlhf doctor", title_justify="left")
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("detail")
    table.add_column("fix")
    for c in checks:
        style = _STYLE.get(c.status, "")
        table.add_row(escape(c.name), f"[{style}]{c.status}[/{style}]" if style else escape(c.status),
                      escape(c.detail), escape(c.fix))
    console.print(table)
    n_fail = sum(c.status == "FAIL" for c in checks)
    n_warn = sum(c.status == "WARN" for c in checks)
    if n_fail:
        console.print(f"[bold red]{n_fail} FAIL[/bold red], {n_warn} WARN: fix the FAIL lines before training")
        return 1
    console.print(f"[green]ready[/green]{f' ({n_warn} WARN)' if n_warn else ''}")
    return 0


__all__ = ["Check", "TESTED_RANGES", "run_checks", "render"]
