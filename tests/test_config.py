"""Profiles are typed configs: every YAML in lowmem_rlhf/profiles/ loads; bad YAML gives one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowmem_rlhf.config import (
    AutoConfig,
    Profile,
    Shape,
    list_profiles,
    load_all_profiles,
    load_profile,
    profile_to_yaml,
)
from lowmem_rlhf.errors import UserError


def test_every_shipped_profile_loads_and_has_a_header():
    names = {p.name for p in load_all_profiles()}
    assert {"qlora-shared", "lora-bf16-shared", "zero3-offload", "full-bf16"} <= names
    for path in list_profiles():
        assert path.read_text().startswith("# "), f"{path} lacks the header comment saying what it trades"


def test_profiles_ship_inside_the_package():
    """PROFILES_DIR is package data (lowmem_rlhf/profiles/), found the same way from a checkout, an
    editable install or a wheel: no path above the package."""
    from importlib.resources import files

    import lowmem_rlhf
    from lowmem_rlhf.config import PROFILES_DIR

    assert PROFILES_DIR == Path(lowmem_rlhf.__file__).resolve().parent / "profiles"
    shipped = {p.name for p in files("lowmem_rlhf").joinpath("profiles").iterdir() if p.name.endswith(".yaml")}
    assert shipped == {p.name for p in list_profiles()} and "qlora-shared.yaml" in shipped
    assert not (Path(lowmem_rlhf.__file__).resolve().parents[1] / "profiles").exists()  # moved, not copied


def test_profile_round_trips_through_yaml(tmp_path):
    p = load_profile("qlora-shared")
    f = tmp_path / "x.yaml"
    f.write_text(profile_to_yaml(p, "header"))
    assert load_profile(str(f)) == p


@pytest.mark.parametrize("text,match", [
    ("quant: nf4\nlora_r: 0\n", "quantized weights cannot be trained"),
    ("quant: nf5\n", "field 'quant' must be one of"),
    ("lora_rr: 8\n", "unknown key 'lora_rr' \\(did you mean 'lora_r'\\?\\)"),
    ("micro_batch: two\n", "field 'micro_batch' must be int"),
    ("grad_ckpt: 1\n", "field 'grad_ckpt' must be bool"),
    ("quant: none\noffload: zero3\nlora_r: 8\nquant: nf4\n", "offload=zero3 needs a 16-bit base"),
    ("quant: [nf4\n", "malformed YAML"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_bad_profile_yaml(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=match) as e:
        load_profile(str(f))
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_missing_profile_lists_available():
    with pytest.raises(UserError, match="available: .*qlora-shared"):
        load_profile("nope")


@pytest.mark.parametrize("field", ["seq_len", "batch", "prompt_len", "response_len", "rollout_batch"])
@pytest.mark.parametrize("value", [0, -3])
def test_shape_rejects_non_positive(field, value):
    with pytest.raises(UserError, match=f"--{field.replace('_', '-')} must be a positive integer"):
        Shape(**{field: value})


def test_profile_validation_in_code():
    with pytest.raises(UserError):
        Profile(quant="int8", lora_r=0)
    assert Profile(quant="none", lora_r=0).is_lora is False


def test_auto_runs_the_reward_model_stage_without_a_program_reward_or_when_asked():
    """One rule for `auto`'s plan (cli) and its run (stages.auto): the RM stage runs unless a
    program reward replaces it, and then only under --train-rm."""
    assert AutoConfig().resolve().trains_rm()  # the demo: the checker, and the RM trained beside it
    assert AutoConfig(model="m").resolve().trains_rm()  # a named model: its RM is the reward
    assert not AutoConfig(model="m", reward="pkg.mod:fn").resolve().trains_rm()
    assert not AutoConfig(model="m", reward_cmd="./solver").resolve().trains_rm()
    assert AutoConfig(model="m", reward_cmd="./solver", train_rm=True).resolve().trains_rm()
    assert not AutoConfig(train_rm=False).resolve().trains_rm()  # the demo with --no-train-rm
