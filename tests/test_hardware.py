"""Tests for lowmem_rlhf.plan.hardware: presets, aliases, overrides and real detection (no mocks)."""

from __future__ import annotations

import json
import math

import psutil
import pytest
import torch

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.plan.hardware import (
    GIB,
    GPU_PRESETS,
    GpuInfo,
    Hardware,
    detect_cpu,
    detect_gpu,
    list_gpu_presets,
    lookup_gpu_preset,
    normalize_gpu_name,
    resolve_hardware,
)

REQUIRED_KEYS = [
    "3060-12gb", "3080-10gb", "3090", "3090ti", "4060ti-16gb", "4070", "4080", "4090",
    "t4", "a10g", "l4", "v100-16gb", "v100-32gb", "a100-40gb", "a100-80gb", "h100-80gb",
    "2080ti", "3060ti", "3080-12gb", "4070ti", "4060-8gb", "a6000", "l40s", "5090",
]  # fmt: skip

# Facts: (compute capability, nominal memory in GiB as sold).
KNOWN = {
    "2080ti": ((7, 5), 11), "t4": ((7, 5), 16),
    "v100-16gb": ((7, 0), 16), "v100-32gb": ((7, 0), 32),
    "3060-12gb": ((8, 6), 12), "3060ti": ((8, 6), 8), "3080-10gb": ((8, 6), 10),
    "3080-12gb": ((8, 6), 12), "3090": ((8, 6), 24), "3090ti": ((8, 6), 24),
    "a10g": ((8, 6), 24), "a6000": ((8, 6), 48),
    "a100-40gb": ((8, 0), 40), "a100-80gb": ((8, 0), 80),
    "4060-8gb": ((8, 9), 8), "4060ti-16gb": ((8, 9), 16), "4070": ((8, 9), 12),
    "4070ti": ((8, 9), 12), "4080": ((8, 9), 16), "4090": ((8, 9), 24),
    "l4": ((8, 9), 24), "l40s": ((8, 9), 48),
    "h100-80gb": ((9, 0), 80), "5090": ((12, 0), 32),
}  # fmt: skip


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_every_required_preset_resolves(key: str) -> None:
    preset = lookup_gpu_preset(key)
    assert preset is GPU_PRESETS[key]
    assert key == key.lower() and " " not in key
    cc, nominal = KNOWN[key]
    assert preset.compute_capability == cc
    # usable total is a little below the nominal size, never above it
    assert 0.85 * nominal <= preset.vram_gib <= nominal
    assert preset.name.startswith("NVIDIA")


def test_known_table_covers_all_presets() -> None:
    assert set(KNOWN) <= set(GPU_PRESETS)
    assert [k for k, _ in list_gpu_presets()] == list(GPU_PRESETS)


@pytest.mark.parametrize("key,preset", list(GPU_PRESETS.items()))
def test_bf16_matches_compute_capability(key: str, preset) -> None:
    assert preset.bf16 == (preset.compute_capability >= (8, 0)), key


def test_detected_bf16_is_native_bf16_not_emulation() -> None:
    """Detection decides bf16 from the compute capability, as the presets do: torch 2.13's
    is_bf16_supported() counts emulation, which would give a T4 or a V100 bf16 profiles."""
    from lowmem_rlhf.plan.hardware import native_bf16

    assert [native_bf16(cc) for cc in [(7, 0), (7, 5), (8, 0), (8, 6), (9, 0), (12, 0)]] == \
        [False, False, True, True, True, True]


def test_3090_has_about_24_gib() -> None:
    hw = resolve_hardware(gpu="3090")
    assert hw.gpu is not None
    assert 23.0 <= hw.gpu.total_bytes / GIB <= 24.0
    assert hw.gpu.free_bytes == hw.gpu.total_bytes  # nothing runs on a planned card
    assert hw.gpu.source == "preset"
    assert hw.gpu.compute_capability == (8, 6) and hw.gpu.bf16
    assert hw.device == "cuda"


@pytest.mark.parametrize(
    "alias,key",
    [
        ("rtx3090", "3090"),
        ("rtx-3090", "3090"),
        ("RTX 3090", "3090"),
        ("NVIDIA GeForce RTX 3090", "3090"),
        ("3090ti", "3090ti"),
        ("3090-ti", "3090ti"),
        ("RTX 3090 Ti", "3090ti"),
        ("h100", "h100-80gb"),
        ("H100", "h100-80gb"),
        ("A100 80GB", "a100-80gb"),
        ("a100-40g", "a100-40gb"),
        ("4060 Ti 16 GB", "4060ti-16gb"),
        ("Tesla T4", "t4"),
        ("T4", "t4"),
        ("RTX A6000", "a6000"),
        ("A10G", "a10g"),
        ("3060", "3060-12gb"),
        ("rtx_4090", "4090"),
    ],
)
def test_aliases(alias: str, key: str) -> None:
    assert lookup_gpu_preset(alias) is GPU_PRESETS[key]


def test_normalize_gpu_name() -> None:
    assert normalize_gpu_name("  RTX 3090 Ti ") == "3090ti"
    assert normalize_gpu_name("rtx3090") == "3090"
    assert normalize_gpu_name("A100 80GB") == "a100-80gb"


@pytest.mark.parametrize("name,options", [("a100", ["a100-40gb", "a100-80gb"]), ("V100", ["v100-16gb", "v100-32gb"])])
def test_ambiguous_family_asks_for_size(name: str, options: list[str]) -> None:
    with pytest.raises(UserError) as exc:
        lookup_gpu_preset(name)
    msg = str(exc.value)
    assert "\n" not in msg
    for opt in options:
        assert opt in msg


def test_typo_suggests_close_match_on_one_line() -> None:
    with pytest.raises(UserError) as exc:
        lookup_gpu_preset("rtx 3099")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "'rtx 3099'" in msg
    assert "did you mean" in msg and "3090" in msg
    assert "--vram" in msg


def test_unknown_with_no_close_match_still_one_line() -> None:
    with pytest.raises(UserError) as exc:
        resolve_hardware(gpu="voodoo\nbanshee")
    msg = str(exc.value)
    assert "\n" not in msg and "unknown GPU" in msg


def test_vram_override_on_preset() -> None:
    hw = resolve_hardware(gpu="3090", vram_gib=20)
    assert hw.gpu is not None
    assert hw.gpu.total_bytes == hw.gpu.free_bytes == 20 * GIB
    assert hw.gpu.name == GPU_PRESETS["3090"].name
    assert hw.gpu.compute_capability == (8, 6)
    assert hw.gpu.source == "override"


def test_vram_without_gpu_makes_custom_gpu_or_overrides_detected() -> None:
    hw = resolve_hardware(vram_gib=12.5)
    assert hw.gpu is not None
    assert hw.gpu.total_bytes == hw.gpu.free_bytes == int(12.5 * GIB)
    assert hw.gpu.source == "override"
    assert hw.device == "cuda"
    if not torch.cuda.is_available() and detect_gpu() is None:
        assert hw.gpu.name == "custom GPU"
        assert hw.gpu.compute_capability == (8, 0) and hw.gpu.bf16


def test_ram_override() -> None:
    hw = resolve_hardware(gpu="t4", ram_gib=32)
    assert hw.cpu_ram_bytes == hw.cpu_ram_free_bytes == 32 * GIB
    assert hw.cpu_cores >= 1
    assert "32.0 GiB RAM" in hw.describe()


@pytest.mark.parametrize("flag,kwargs", [("--vram", "vram_gib"), ("--ram", "ram_gib")])
@pytest.mark.parametrize("bad", [-4, 0, 0.0, math.nan, math.inf, -math.inf])
def test_invalid_amounts_raise_naming_the_flag(flag: str, kwargs: str, bad: float) -> None:
    with pytest.raises(UserError) as exc:
        resolve_hardware(**{kwargs: bad})
    msg = str(exc.value)
    assert msg.startswith(f"{flag} must be a positive number of GiB")
    assert "\n" not in msg


def test_negative_vram_message_exact() -> None:
    with pytest.raises(UserError, match=r"^--vram must be a positive number of GiB, got -4$"):
        resolve_hardware(vram_gib=-4)


def test_detect_cpu_matches_psutil() -> None:
    total, available, cores = detect_cpu()
    assert total == psutil.virtual_memory().total
    assert 0 < available <= total
    assert cores == (psutil.cpu_count(logical=True) or cores)
    assert cores >= 1


def test_detect_gpu_on_this_machine() -> None:
    info = detect_gpu()  # must never raise
    if torch.cuda.is_available():
        assert info is not None and info.source == "detected"
        assert 0 < info.free_bytes <= info.total_bytes
    else:
        assert info is None or info.source == "detected"  # pynvml could still see a card
        if info is None:
            hw = resolve_hardware()
            assert hw.gpu is None and hw.device == "cpu"
            assert hw.describe().startswith("no GPU")


def test_describe_and_to_dict() -> None:
    hw = resolve_hardware(gpu="3090", ram_gib=64)
    text = hw.describe()
    assert text.startswith("NVIDIA GeForce RTX 3090 (23.7 GiB, sm_86, bf16), 64.0 GiB RAM, ")
    assert text.endswith(" cores") and "\n" not in text
    assert "sm_75, no bf16" in resolve_hardware(gpu="t4").describe()
    assert "sm_120" in resolve_hardware(gpu="5090").describe()
    data = json.loads(json.dumps(hw.to_dict()))
    assert data["device"] == "cuda"
    assert data["gpu"]["compute_capability"] == [8, 6]
    assert data["gpu"]["source"] == "preset"
    assert data["cpu_ram_bytes"] == 64 * GIB


def test_dataclasses_are_frozen() -> None:
    info = GpuInfo("x", GIB, GIB, (8, 0), True, "override")
    hw = Hardware(gpu=None, cpu_ram_bytes=GIB, cpu_ram_free_bytes=GIB, cpu_cores=1)
    with pytest.raises(AttributeError):
        info.total_bytes = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        hw.cpu_cores = 2  # type: ignore[misc]
    assert hw.device == "cpu" and hw.to_dict()["gpu"] is None
