"""Argument helpers shared by the subcommands (argparse and the standard library only)."""

from __future__ import annotations

import argparse
import json

from m2ost.errors import InputError


def parse_settings(text: str | None) -> dict:
    """The ``--settings`` JSON object (nested config sections), {} when absent."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"--settings is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise InputError("--settings must be a JSON object")
    return value


def parse_pairs(values: list[str] | None, what: str) -> dict[str, str]:
    """``SAMPLE=PATH`` arguments as a dict, in the order given."""
    out = {}
    for item in values or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise InputError(f"{what} must be given as SAMPLE=PATH, got {item!r}")
        out[name] = path
    return out


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default, unless there is none (None: the workflow's, said in the help)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_command(sub, name: str, handler: str, help: str, aliases: tuple[str, ...] = ()):
    """A subcommand run by ``handler`` ("module:function"); options show their defaults."""
    p = sub.add_parser(name, help=help, description=help, aliases=list(aliases), formatter_class=_ShowDefaults)
    p.set_defaults(handler=handler)
    return p
