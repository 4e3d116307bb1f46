"""Each run knob is declared once, in its config dataclass (`config.knob`): the CLI's defaults and
help texts for sft, rm, ppo and auto are the dataclass's."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from lowmem_rlhf.cli import app
from lowmem_rlhf.config import AutoConfig, PPOConfig, RMConfig, SFTConfig

CASES = {"sft": SFTConfig, "rm": RMConfig, "ppo": PPOConfig, "auto": AutoConfig}


def _params(command: str):
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


@pytest.mark.parametrize("command", sorted(CASES))
def test_every_cli_default_is_the_dataclass_default(command):
    cls = CASES[command]
    params = _params(command)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    shared = [n for n in params if n in fields]
    # every knob of the config that a user can set is on the command line
    assert len(shared) >= 10, shared
    for name in shared:
        f, p = fields[name], params[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if p.required:
            continue  # --data / --prompts / --out: the command requires them
        value = p.default
        if isinstance(default, dataclasses.Field) or default is None:
            assert value is None, (command, name, value)
        else:
            assert type(value)(default) == value, (command, name, value, default)
        assert p.help == f.metadata["help"], (command, name)


def test_a_changed_dataclass_default_reaches_the_cli(monkeypatch):
    """The CLI reads the field when the option is built: not a copy typed in twice."""
    from lowmem_rlhf import cli

    field = next(f for f in dataclasses.fields(PPOConfig) if f.name == "kl_coef")
    monkeypatch.setattr(field, "default", 0.123)
    assert cli.option(PPOConfig, "kl_coef").default == 0.123
