"""Packaging: what pyproject.toml declares and what a wheel ships.

deepspeed is the optional extra `zero3`; without it `config.deepspeed_missing()` gives the one-line
reason and install command the planner and `--profile zero3-offload` show. The profiles and the
bundled data ship inside the package, every subpackage is found, and scripts/setup.sh still installs
deepspeed (in the extra's range) for the test venv. `.ci/run` runs the built wheel itself.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import lowmem_rlhf.config as config

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "lowmem_rlhf"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---------------------------------------------------------------- deepspeed is optional

def test_deepspeed_present_means_nothing_missing():
    """Real lookup: in the test venv deepspeed is installed (scripts/setup.sh), so no reason."""
    present = importlib.util.find_spec("deepspeed") is not None
    assert (config.deepspeed_missing() is None) == present


@pytest.mark.parametrize("how", ["import-blocked", "no-spec"])
def test_deepspeed_missing_is_one_line_with_the_install_command(monkeypatch, how):
    if how == "import-blocked":  # what Python sees when the package is absent: `import deepspeed` fails
        monkeypatch.setitem(sys.modules, "deepspeed", None)
    else:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, **k: None if name == "deepspeed" else real(name, *a, **k))
    reason = config.deepspeed_missing()
    assert reason is not None and "\n" not in reason
    assert "deepspeed" in reason and "not installed" in reason
    assert "pip install --no-build-isolation 'lowmem-rlhf[zero3]'" in reason
    assert config.ZERO3_INSTALL in reason


def test_deepspeed_is_an_extra_not_a_dependency():
    project = _pyproject()["project"]
    required = {Requirement(r).name for r in project["dependencies"]}
    assert "deepspeed" not in required
    (zero3,) = [Requirement(r) for r in project["optional-dependencies"]["zero3"]]
    assert zero3.name == "deepspeed" and str(zero3.specifier) and any(s.operator == "<" for s in zero3.specifier)
    assert "[zero3]" in config.ZERO3_INSTALL  # the install command names the extra that exists


def test_setup_installs_deepspeed_in_the_extras_range_before_the_package():
    """The test venv keeps deepspeed: setup.sh builds it against the pinned torch (no build isolation),
    in the zero3 extra's range, then installs the package with its test extra."""
    project = _pyproject()["project"]
    (zero3,) = [Requirement(r) for r in project["optional-dependencies"]["zero3"]]
    lines = [ln.strip() for ln in (ROOT / "scripts" / "setup.sh").read_text().splitlines()]
    ds = [ln for ln in lines if ln.startswith("pip install") and "deepspeed" in ln]
    assert len(ds) == 1 and "--no-build-isolation" in ds[0], ds
    (spec,) = re.findall(r'"(deepspeed[^"]*)"', ds[0])
    assert Requirement(spec).specifier == zero3.specifier, (spec, str(zero3))
    editable = lines.index('pip install -e ".[test]"')
    assert lines.index(ds[0]) < editable


# ---------------------------------------------------------------- what the wheel ships

def test_package_data_globs_match_the_shipped_files():
    data = _pyproject()["tool"]["setuptools"]["package-data"]["lowmem_rlhf"]
    assert "profiles/*.yaml" in data and "data/bundled/*" in data
    assert sorted(PACKAGE.glob("profiles/*.yaml")) == config.list_profiles() != []
    assert [p for p in PACKAGE.glob("data/bundled/*") if p.is_file()]
    assert not (ROOT / "profiles").exists() and not (PACKAGE / "bundled_data").exists()  # the old places


def test_every_subpackage_is_a_package():
    """`packages.find include = ["lowmem_rlhf*"]` finds only folders with an __init__.py."""
    assert _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"] == ["lowmem_rlhf*"]
    for folder in PACKAGE.rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").exists(), f"{folder.relative_to(ROOT)} has modules but no __init__.py"


def _tree_copy(dst: Path) -> None:
    """What a clone holds (tracked + untracked-not-ignored files), without build/ or *.egg-info."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def test_the_wheel_ships_every_subpackage_profile_and_data_file(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a clone holds")
    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    src = tmp_path / "src"
    _tree_copy(src)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = (tmp_path / "dist").glob("lowmem_rlhf-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    package = src / "lowmem_rlhf"
    for f in package.rglob("*"):
        rel = f.relative_to(src).as_posix()
        if f.is_file() and "__pycache__" not in rel and (f.suffix == ".py" or f.parent.name in ("profiles", "bundled")):
            assert rel in names, f"{rel} is not in the wheel"
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "profiles/"))]
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [ln.split(":", 1)[1].strip() for ln in zipfile.ZipFile(whl).read(meta).decode().splitlines()
                if ln.startswith("Requires-Dist:")]
    (ds,) = [Requirement(r) for r in requires if Requirement(r).name == "deepspeed"]
    assert ds.marker is not None and ds.marker.evaluate({"extra": "zero3"}) and not ds.marker.evaluate({"extra": ""})
