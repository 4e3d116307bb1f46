"""`lowmem-rlhf doctor` checks, run for real on this machine (no mocks of torch or bitsandbytes)."""

from __future__ import annotations

import importlib.metadata
import io
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from rich.console import Console

from lowmem_rlhf.doctor import (
    STACK,
    TESTED_RANGES,
    Check,
    _fourbit_matmul_ok,
    _fourbit_probe,
    check_versions,
    render,
    run_checks,
)

PACKAGES = ["python", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "deepspeed", "flash-attn"]
UNTESTED = {"python", "flash-attn"}  # no upper bound: python is open-ended, flash-attn is GPU-only and not in CI


def _declared() -> dict[str, SpecifierSet]:
    """pyproject.toml's ranges: every direct dependency, the zero3 and flash extras, and python."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = [Requirement(r) for r in project["dependencies"] + extras["zero3"] + extras["flash"]]
    declared = {canonicalize_name(r.name): r.specifier for r in reqs}
    declared["python"] = SpecifierSet(project["requires-python"])
    return declared


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, color_system=None), buf


@pytest.fixture(scope="module")
def checks() -> list[Check]:
    return run_checks()


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_tested_ranges_come_from_pyproject():
    """The installed metadata and the literal fallback both say what pyproject.toml says, for every
    direct dependency (a stale install fails here: reinstall with `pip install -e .`)."""
    from lowmem_rlhf.doctor import _FALLBACK_RANGES

    declared = _declared()
    assert set(PACKAGES) <= set(declared) and tuple(PACKAGES) == STACK
    assert set(TESTED_RANGES) == set(declared) == set(_FALLBACK_RANGES)
    assert list(TESTED_RANGES)[: len(STACK)] == list(STACK)  # the training stack is shown first
    for pkg, spec in declared.items():
        assert SpecifierSet(TESTED_RANGES[pkg]) == spec, pkg
        assert SpecifierSet(_FALLBACK_RANGES[pkg]) == spec, pkg


def test_every_dependency_has_the_tested_upper_bound():
    """Each range stops at the next minor above the version this suite runs with: nothing untested is
    accepted, and the installed stack is inside every range."""
    for pkg, spec in _declared().items():
        if pkg in UNTESTED:
            continue
        uppers = [Version(s.version) for s in spec if s.operator == "<"]
        assert len(uppers) == 1, f"{pkg}{spec}: needs one '<' upper bound"
        try:
            have = Version(importlib.metadata.version(pkg))
        except importlib.metadata.PackageNotFoundError:
            assert pkg == "deepspeed", f"{pkg} is a required dependency and is not installed"
            continue
        assert spec.contains(have, prereleases=True), f"installed {pkg} {have} is outside {spec}"
        next_minor = Version(f"{have.major}.{have.minor + 1}")
        assert uppers[0] <= next_minor, f"{pkg}{spec} accepts versions newer than the tested {have}"


def test_a_version_outside_its_range_is_reported_for_any_dependency():
    """Not only the training stack: typer (whose 0.29 vendored click) is checked the same way."""
    have = importlib.metadata.version("typer")
    (line,) = check_versions({"typer": f"<{have}"})
    assert line.status == "WARN" and f"{have}, outside the tested range <{have}" in line.detail
    assert '"typer<' in line.fix and "pip install torch==" in line.fix


def test_deepspeed_is_optional(monkeypatch):
    """Without deepspeed (the zero3 extra) the doctor says OK and how to add it, never FAIL."""
    import lowmem_rlhf.doctor as doctor
    from lowmem_rlhf.config import ZERO3_INSTALL

    real = doctor._installed
    monkeypatch.setattr(doctor, "_installed", lambda dist: None if dist == "deepspeed" else real(dist))
    (line,) = check_versions({"deepspeed": TESTED_RANGES["deepspeed"]})
    assert line.status == "OK" and "not installed" in line.detail and ZERO3_INSTALL in line.detail
    (line,) = check_versions({"deepspeed": "<0.1"})
    assert line.status == "OK"  # the range does not matter when it is absent


def test_this_machine_is_ready(checks):
    by = _by_name(checks)
    assert [c for c in checks if c.status == "FAIL"] == []
    assert all(c.status in ("OK", "WARN", "FAIL") for c in checks)
    for pkg in TESTED_RANGES:
        assert pkg in by, pkg
    for pkg in TESTED_RANGES:  # every direct dependency is installed inside its tested range
        assert by[pkg].status == "OK", by[pkg]
    assert by["flash-attn"].status == "OK"  # installed in range, or "optional, GPU-only"
    assert by["4-bit (bitsandbytes)"].status == "OK", by["4-bit (bitsandbytes)"]
    assert {"cuda", "ram", "disk"} <= set(by)
    import torch

    if not torch.cuda.is_available():
        assert by["cuda"].status == "WARN" and "CPU only" in by["cuda"].detail and by["cuda"].fix
        assert "cpu bf16" in by
    assert all(c.fix for c in checks if c.status != "OK")  # every WARN/FAIL says how to fix it
    console, buf = _console()
    assert render(checks, console) == 0
    text = buf.getvalue()
    for pkg in PACKAGES:
        assert pkg in text


def test_unsupported_range_warns_with_the_range():
    by = _by_name(run_checks(ranges={"torch": "<1.0", "peft": ">=99"}))
    torch_line = by["torch"]
    assert torch_line.status == "WARN"
    assert "<1.0" in torch_line.detail and "pip install" in torch_line.fix
    peft_line = by["peft"]
    assert peft_line.status == "WARN" and ">=99" in peft_line.detail
    assert 'pip install torch==' in peft_line.fix and '"peft>=99"' in peft_line.fix  # torch stays pinned
    assert by["transformers"].status == "OK"  # the other tested ranges still apply
    console, _ = _console()
    assert render(list(by.values()), console) == 0  # WARN alone does not fail


def test_missing_required_package_fails_with_pip_fix():
    checks = run_checks(ranges={"definitely-not-installed-pkg": ">=1.0"})
    line = _by_name(checks)["definitely-not-installed-pkg"]
    assert line.status == "FAIL" and "not installed" in line.detail
    assert "pip install" in line.fix and '"definitely-not-installed-pkg>=1.0"' in line.fix
    console, buf = _console()
    assert render(checks, console) == 1
    assert "FAIL" in buf.getvalue()


def test_disk_thresholds(tmp_path):
    by = _by_name(run_checks(disk_path=tmp_path / "not" / "made" / "yet"))
    assert by["disk"].status in ("OK", "WARN", "FAIL") and str(tmp_path) in by["disk"].detail


def test_fourbit_comparison_catches_a_corrupted_weight():
    assert _fourbit_matmul_ok() is True
    assert _fourbit_matmul_ok(corrupt=True) is False


def _has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
def test_fourbit_check_catches_pitfall1_without_the_guard(monkeypatch):
    """With the repack guard off, the eval forward inside the probe switches the layer to the
    inference-only kernel, and the probe must say so."""
    import torch

    if torch.cuda.is_available() or not _has_avx512_bf16():
        pytest.skip("the repack only happens on CPUs with avx512_bf16")
    import lowmem_rlhf.model.loading

    monkeypatch.setattr(lowmem_rlhf.model.loading, "guard_bnb_cpu_repack", lambda model: 0)
    ok, detail = _fourbit_probe()
    assert not ok and "pitfall #1" in detail


def test_doctor_command_reports_and_warns_on_an_unsupported_range(capsys):
    from lowmem_rlhf.cli import main

    def run(argv):
        try:
            main(argv)
        except SystemExit as e:
            return e.code or 0, *capsys.readouterr()
        return 0, *capsys.readouterr()

    code, out, _ = run(["doctor"])
    assert code == 0 and "4-bit" in out and "torch" in out
    code, out, _ = run(["doctor", "--ranges", "torch=<1.0"])
    torch_line = next(ln for ln in out.splitlines() if ln.startswith("│ torch "))
    assert code == 0 and "WARN" in torch_line and "<1.0" in out
    code, _, err = run(["doctor", "--ranges", "torch"])
    assert code == 2 and err.startswith("error: --ranges 'torch': expected package=specifier")
