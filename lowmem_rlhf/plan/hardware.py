"""What machine are we planning for: GPU detection, GPU presets and user overrides.

The memory planner needs five facts (GPU memory, CPU RAM, core count, whether the GPU does bf16,
and, when planning for the CPU, whether the CPU does bf16 at speed). They come from the machine itself (`detect_gpu`,
`detect_cpu`), from a named preset (`--gpu 3090`, so you can plan for a card you
do not have), or from explicit overrides (`--vram`, `--ram`).
`resolve_hardware` combines the three; everything here is safe to call on a
machine with no GPU and never raises except `UserError` for bad user input.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import psutil

from lowmem_rlhf.config import GIB
from lowmem_rlhf.errors import UserError

_HELP_HINT = "(see `lowmem-rlhf plan --help` for the list, or pass --vram GiB)"


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the planner sees it.

    `source` is "detected" (read from the driver), "preset" (from `GPU_PRESETS`
    via `--gpu`) or "override" (memory figures given with `--vram`).
    """

    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]
    bf16: bool
    source: str

    @property
    def total_gib(self) -> float:
        """Total memory in GiB."""
        return self.total_bytes / GIB

    @property
    def free_gib(self) -> float:
        """Free memory in GiB."""
        return self.free_bytes / GIB

    @property
    def sm(self) -> str:
        """Compute capability in nvcc's spelling, e.g. "sm_86" or "sm_120"."""
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "total_bytes": self.total_bytes,
            "free_bytes": self.free_bytes,
            "total_gib": round(self.total_gib, 2),
            "free_gib": round(self.free_gib, 2),
            "compute_capability": list(self.compute_capability),
            "bf16": self.bf16,
            "source": self.source,
        }


@dataclass(frozen=True)
class Hardware:
    """The machine a plan is made for. `gpu is None` means plan for CPU only."""

    gpu: GpuInfo | None
    cpu_ram_bytes: int
    cpu_ram_free_bytes: int
    cpu_cores: int
    # bf16 matmuls at fp32 speed or better on this CPU (oneDNN's bf16 path: AVX-512 or AMX on x86).
    # Without it, torch emulates bf16 about 25x slower than fp32 (measured: 1.0 vs 27.8 GFLOP/s on a
    # 2-core AVX2 EPYC), so CPU plans compute in fp32 (`planner.adapt_to_hardware`).
    cpu_bf16: bool = True

    @property
    def device(self) -> str:
        """Torch device type to train on: "cuda" or "cpu"."""
        return "cuda" if self.gpu is not None else "cpu"

    def describe(self) -> str:
        """One-line summary, e.g.
        "NVIDIA GeForce RTX 3090 (23.7 GiB, sm_86, bf16), 62.7 GiB RAM, 16 cores"."""
        ram = f"{self.cpu_ram_bytes / GIB:.1f} GiB RAM, {self.cpu_cores} cores"
        if self.gpu is None:
            precision = "" if self.cpu_bf16 else ", fp32: no fast bf16 on this CPU"
            return f"no GPU (planning for CPU{precision}), {ram}"
        g = self.gpu
        precision = "bf16" if g.bf16 else "no bf16"
        return f"{g.name} ({g.total_gib:.1f} GiB, {g.sm}, {precision}), {ram}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "device": self.device,
            "gpu": self.gpu.to_dict() if self.gpu is not None else None,
            "cpu_ram_bytes": self.cpu_ram_bytes,
            "cpu_ram_free_bytes": self.cpu_ram_free_bytes,
            "cpu_cores": self.cpu_cores,
            "cpu_bf16": self.cpu_bf16,
            "description": self.describe(),
        }


@dataclass(frozen=True)
class GpuPreset:
    """A known GPU model, for planning without the card present."""

    name: str
    vram_gib: float
    compute_capability: tuple[int, int]
    bf16: bool

    @property
    def total_bytes(self) -> int:
        """`vram_gib` in bytes."""
        return int(self.vram_gib * GIB)

    def to_gpu_info(self) -> GpuInfo:
        """The preset as a `GpuInfo`; all memory counts as free (nothing runs on a planned card)."""
        return GpuInfo(
            name=self.name,
            total_bytes=self.total_bytes,
            free_bytes=self.total_bytes,
            compute_capability=self.compute_capability,
            bf16=self.bf16,
            source="preset",
        )


def _p(name: str, vram_gib: float, cc: tuple[int, int]) -> GpuPreset:
    # bf16 tensor-core support starts with Ampere (compute capability 8.0).
    return GpuPreset(name=name, vram_gib=vram_gib, compute_capability=cc, bf16=cc >= (8, 0))


# vram_gib is the *usable total* that `torch.cuda.get_device_properties(0).total_memory`
# reports on Linux (what `detect_gpu` would see on the real card), not the box label.
# It is below the nominal size because the driver and ECC keep some memory back: an RTX
# 3090 sold as "24 GB" (24 GiB of GDDR6X) reports ~23.69 GiB, an A100 80GB ~79.15 GiB, a
# T4 "16 GB" ~14.56-14.75 GiB. Figures vary by ~0.2 GiB with driver version; where we had
# no reported figure we took the nominal size (NVIDIA's "GB" on these cards means GiB)
# minus the same ~2% overhead seen on sibling cards. Plans therefore stay on the safe side.
GPU_PRESETS: dict[str, GpuPreset] = {
    # Turing (7.5)
    "2080ti": _p("NVIDIA GeForce RTX 2080 Ti", 10.75, (7, 5)),
    "t4": _p("NVIDIA Tesla T4", 14.56, (7, 5)),
    # Volta (7.0)
    "v100-16gb": _p("NVIDIA Tesla V100 16GB", 15.77, (7, 0)),
    "v100-32gb": _p("NVIDIA Tesla V100 32GB", 31.74, (7, 0)),
    # Ampere consumer / workstation / A10G (8.6)
    "3060-12gb": _p("NVIDIA GeForce RTX 3060 12GB", 11.76, (8, 6)),
    "3060ti": _p("NVIDIA GeForce RTX 3060 Ti", 7.79, (8, 6)),
    "3070": _p("NVIDIA GeForce RTX 3070", 7.79, (8, 6)),
    "3080-10gb": _p("NVIDIA GeForce RTX 3080 10GB", 9.78, (8, 6)),
    "3080-12gb": _p("NVIDIA GeForce RTX 3080 12GB", 11.76, (8, 6)),
    "3090": _p("NVIDIA GeForce RTX 3090", 23.69, (8, 6)),
    "3090ti": _p("NVIDIA GeForce RTX 3090 Ti", 23.69, (8, 6)),
    "a10g": _p("NVIDIA A10G", 22.0, (8, 6)),
    "a6000": _p("NVIDIA RTX A6000", 47.5, (8, 6)),
    # Ampere datacenter (8.0)
    "a100-40gb": _p("NVIDIA A100 40GB", 39.39, (8, 0)),
    "a100-80gb": _p("NVIDIA A100 80GB", 79.15, (8, 0)),
    # Ada Lovelace (8.9)
    "4060-8gb": _p("NVIDIA GeForce RTX 4060 8GB", 7.6, (8, 9)),
    "4060ti-8gb": _p("NVIDIA GeForce RTX 4060 Ti 8GB", 7.6, (8, 9)),
    "4060ti-16gb": _p("NVIDIA GeForce RTX 4060 Ti 16GB", 15.7, (8, 9)),
    "4070": _p("NVIDIA GeForce RTX 4070", 11.7, (8, 9)),
    "4070ti": _p("NVIDIA GeForce RTX 4070 Ti", 11.7, (8, 9)),
    "4080": _p("NVIDIA GeForce RTX 4080", 15.7, (8, 9)),
    "4090": _p("NVIDIA GeForce RTX 4090", 23.65, (8, 9)),
    "l4": _p("NVIDIA L4", 22.0, (8, 9)),
    "l40s": _p("NVIDIA L40S", 44.4, (8, 9)),
    # Hopper (9.0)
    "h100-80gb": _p("NVIDIA H100 80GB", 79.1, (9, 0)),
    # Blackwell consumer (12.0)
    "5090": _p("NVIDIA GeForce RTX 5090", 31.35, (12, 0)),
}

# Normalized spellings that mean exactly one preset.
_ALIASES: dict[str, str] = {
    "3060": "3060-12gb",
    "3060-12": "3060-12gb",
    "3080-10": "3080-10gb",
    "3080-12": "3080-12gb",
    "4060": "4060-8gb",
    "4060ti-16": "4060ti-16gb",
    "4060ti-8": "4060ti-8gb",
    "h100": "h100-80gb",
    "h100-80": "h100-80gb",
    "a100-40": "a100-40gb",
    "a100-80": "a100-80gb",
    "v100-16": "v100-16gb",
    "v100-32": "v100-32gb",
    "a6000-48gb": "a6000",
}

# Normalized spellings that name a family with several memory sizes: the user must pick.
_AMBIGUOUS: dict[str, tuple[str, ...]] = {
    "a100": ("a100-40gb", "a100-80gb"),
    "v100": ("v100-16gb", "v100-32gb"),
    "3080": ("3080-10gb", "3080-12gb"),
    "4060ti": ("4060ti-8gb", "4060ti-16gb"),
}

_VENDOR_WORDS = ("nvidia", "geforce", "tesla", "quadro", "rtx", "gtx")


def normalize_gpu_name(s: str) -> str:
    """Canonical spelling of a GPU name: lower case, vendor words dropped, hyphen-separated.

    "RTX 3090" -> "3090", "rtx-3090-ti" -> "3090ti", "A100 80GB" -> "a100-80gb",
    "NVIDIA GeForce RTX 4060 Ti 16 GB" -> "4060ti-16gb".
    """
    text = s.strip().lower()
    # "rtx3090" / "gtx1080": split a vendor prefix glued to the model number.
    text = re.sub(r"\b(rtx|gtx)(?=\d)", r"\1 ", text)
    tokens = [t for t in re.split(r"[\s_\-/]+", text) if t]
    tokens = [t for t in tokens if t not in _VENDOR_WORDS]
    merged: list[str] = []
    for tok in tokens:
        # "3090 ti" -> "3090ti", "4070 super" -> "4070super", "16 gb" -> "16gb"
        if merged and tok in ("ti", "super"):
            merged[-1] += tok
        elif merged and tok in ("gb", "g") and merged[-1].isdigit():
            merged[-1] += "gb"
        else:
            merged.append(re.sub(r"^(\d+)g$", r"\1gb", tok))
    return "-".join(merged)


def list_gpu_presets() -> list[tuple[str, GpuPreset]]:
    """All presets as (key, preset), in a stable order grouped by architecture."""
    return list(GPU_PRESETS.items())


def _unknown_gpu_message(name: str, normalized: str) -> str:
    shown = " ".join(name.split())  # keep the message on one line
    candidates = list(GPU_PRESETS) + list(_ALIASES)
    suggestions: list[str] = []
    for match in difflib.get_close_matches(normalized, candidates, n=6, cutoff=0.6):
        key = _ALIASES.get(match, match)
        if key not in suggestions:
            suggestions.append(key)
    if suggestions:
        return f"unknown GPU '{shown}'; did you mean: {', '.join(suggestions[:3])}? {_HELP_HINT}"
    return f"unknown GPU '{shown}' {_HELP_HINT}"


def lookup_gpu_preset(name: str) -> GpuPreset:
    """The preset for a user-supplied GPU name (any spelling `normalize_gpu_name` accepts).

    Raises `UserError` for unknown names (with close suggestions) and for ambiguous
    family names such as "a100" (which size?).
    """
    normalized = normalize_gpu_name(name)
    key = _ALIASES.get(normalized, normalized)
    if key in GPU_PRESETS:
        return GPU_PRESETS[key]
    if key in _AMBIGUOUS:
        shown = " ".join(name.split())
        options = " or ".join(_AMBIGUOUS[key])
        raise UserError(f"GPU '{shown}' comes in several sizes; pass --gpu {options} (or pass --vram GiB)")
    raise UserError(_unknown_gpu_message(name, normalized))


def native_bf16(compute_capability: tuple[int, int]) -> bool:
    """bf16 in hardware: compute capability 8.0 (Ampere) or newer. Not
    `torch.cuda.is_bf16_supported()`, which in torch 2.13 also counts emulation, so a T4 (7.5) or a
    V100 (7.0) would be "detected" as bf16 and never get the fp16 profiles."""
    return tuple(compute_capability) >= (8, 0)


def _detect_gpu_torch() -> GpuInfo | None:
    import torch  # deferred: importing torch is slow and not needed for presets

    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return GpuInfo(
        name=props.name,
        total_bytes=int(total),
        free_bytes=int(free),
        compute_capability=(int(props.major), int(props.minor)),
        bf16=native_bf16((props.major, props.minor)),
        source="detected",
    )


def _detect_gpu_nvml() -> GpuInfo | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    pynvml.nvmlInit()
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            return None
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        if isinstance(name, bytes):
            name = name.decode()
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return GpuInfo(
            name=str(name),
            total_bytes=int(mem.total),
            free_bytes=int(mem.free),
            compute_capability=(int(major), int(minor)),
            bf16=native_bf16((int(major), int(minor))),
            source="detected",
        )
    finally:
        pynvml.nvmlShutdown()


def detect_gpu() -> GpuInfo | None:
    """The first visible CUDA GPU, or None. Never raises.

    Uses torch.cuda when it can see a GPU; otherwise pynvml if it is installed
    (e.g. a CPU-only torch on a GPU machine); otherwise None.
    """
    for probe in (_detect_gpu_torch, _detect_gpu_nvml):
        try:
            info = probe()
        except Exception:  # broken driver, CUDA init failure, ...: treat as no GPU
            info = None
        if info is not None:
            return info
    return None


def detect_cpu() -> tuple[int, int, int]:
    """(total RAM bytes, available RAM bytes, logical cores) of this machine."""
    mem = psutil.virtual_memory()
    cores = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return int(mem.total), int(mem.available), int(cores)


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 at speed: torch's oneDNN bf16 path is there (AVX-512 or AMX
    on x86, the BF16 extension on Arm). False where torch cannot tell (no oneDNN build)."""
    import torch  # deferred, as in _detect_gpu_torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def gib_to_bytes(flag: str, value: float) -> int:
    """Validate a user-given GiB amount and convert it to bytes."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if numeric and math.isfinite(value) and value > 0 and int(value * GIB) > 0:
        return int(value * GIB)
    shown = f"{value:g}" if numeric else repr(value)
    raise UserError(f"{flag} must be a positive number of GiB, got {shown}")


def resolve_hardware(
    gpu: str | None = None,
    vram_gib: float | None = None,
    ram_gib: float | None = None,
    max_vram_gib: float | None = None,
) -> Hardware:
    """The hardware to plan for, from detection plus the `--gpu`, `--vram`, `--ram` flags.

    - `gpu`: plan for this preset card instead of the local one (all its memory free,
      source "preset").
    - `vram_gib`: total and free GPU memory to assume. Applied to the preset, else to
      the detected GPU, else to a generic "custom GPU" (sm_80, bf16); source "override".
    - `ram_gib`: total and free CPU RAM to assume.
    - `max_vram_gib`: at most this much GPU memory (total and free), the budget `--max-vram` also
      caps the run at (`runtime.oom.cap_vram`); nothing to cap when there is no GPU.
    - none of them and no GPU detected: `gpu` is None, i.e. plan for CPU.

    Raises `UserError` for an unknown GPU name or a non-positive / non-finite amount.
    """
    vram_bytes = gib_to_bytes("--vram", vram_gib) if vram_gib is not None else None
    ram_bytes = gib_to_bytes("--ram", ram_gib) if ram_gib is not None else None

    gpu_info: GpuInfo | None
    if gpu is not None:
        gpu_info = lookup_gpu_preset(gpu).to_gpu_info()
    else:
        gpu_info = detect_gpu()

    if vram_bytes is not None:
        if gpu_info is None:
            gpu_info = GpuInfo(
                name="custom GPU",
                total_bytes=vram_bytes,
                free_bytes=vram_bytes,
                compute_capability=(8, 0),
                bf16=True,
                source="override",
            )
        else:
            gpu_info = GpuInfo(
                name=gpu_info.name,
                total_bytes=vram_bytes,
                free_bytes=vram_bytes,
                compute_capability=gpu_info.compute_capability,
                bf16=gpu_info.bf16,
                source="override",
            )

    if max_vram_gib is not None:
        cap = gib_to_bytes("--max-vram", max_vram_gib)
        if gpu_info is not None and cap < gpu_info.total_bytes:
            gpu_info = dataclasses.replace(gpu_info, name=f"{gpu_info.name} (capped at {max_vram_gib:g} GiB)",
                                           total_bytes=cap, free_bytes=min(cap, gpu_info.free_bytes))

    ram_total, ram_free, cores = detect_cpu()
    if ram_bytes is not None:
        ram_total = ram_free = ram_bytes

    # the CPU's bf16 matters only when the CPU computes (no GPU planned); torch is imported only then
    cpu_bf16 = True if gpu_info is not None else cpu_native_bf16()
    return Hardware(gpu=gpu_info, cpu_ram_bytes=ram_total, cpu_ram_free_bytes=ram_free, cpu_cores=cores,
                    cpu_bf16=cpu_bf16)
