"""The command line: every subcommand (named after its rule) answers --help, every option says what
it is, and ``m2ost model-info`` runs."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic import subprocess_env

from m2ost.cli import build_parser

REPO = Path(__file__).resolve().parent.parent


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)  # aliases included


SUBCOMMANDS = sorted(_subcommands())


def _rule_commands() -> set[str]:
    """The subcommands the workflow's rules run (``python -m m2ost <subcommand>``)."""
    text = "\n".join(p.read_text() for p in [REPO / "Snakefile", *sorted((REPO / "workflow/rules").glob("*.smk"))])
    return set(re.findall(r"-m m2ost ([\w-]+)", text))


def test_every_rule_runs_a_subcommand_of_its_name():
    commands = _subcommands()
    for command in _rule_commands():
        assert command in commands, f"a rule runs 'm2ost {command}', which does not exist"
    rule_text = "\n".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk"))
    rules = set(re.findall(r"^\s*rule (\w+):", rule_text, re.MULTILINE))
    for rule in rules:
        assert rule.replace("_", "-") in commands, f"rule {rule} has no subcommand {rule.replace('_', '-')}"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand(command, capsys):
    from m2ost.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    parser = _subcommands()[command]
    assert out.startswith(f"usage: {parser.prog}")  # an alias shows the main name
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"m2ost {command} {name} has no help text"
        assert name in out


def test_top_level_help_lists_every_subcommand():
    done = subprocess.run([sys.executable, "-m", "m2ost", "--help"], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in _subcommands():
        assert command in done.stdout


def test_model_info_runs():
    """``m2ost model-info`` (small views: the 224-px default takes 25 CPU-seconds for the largest variants)."""
    from m2ost.model import VARIANTS

    done = subprocess.run([sys.executable, "-m", "m2ost", "model-info", "--img-size", "64", "--genes", "10"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split()[0] for line in done.stdout.splitlines()[3:] if line.strip()}
    assert rows == set(VARIANTS)
