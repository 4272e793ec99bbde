"""Default settings, read from the workflow's config schema: the one place they are written.

``m2ost/schemas/config.schema.yaml`` (package data, installed with the package) documents every
key of the workflow's configuration and gives its default; the Snakefile validates against that
same file and Snakemake fills a config from it (``validate(..., set_default=True)``), and the
package's own fallbacks (a library call or a subcommand without settings) come from here, so both
always agree. ``$M2OST_CONFIG_SCHEMA`` points elsewhere (tests of a broken schema).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import yaml

from m2ost.errors import InputError

SCHEMA_ENV = "M2OST_CONFIG_SCHEMA"
PACKAGE_SCHEMA = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


def schema_path() -> Path:
    """The config schema: ``$M2OST_CONFIG_SCHEMA`` if set, else the one installed with the package."""
    return Path(os.environ.get(SCHEMA_ENV) or PACKAGE_SCHEMA)


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> dict:
    if not path.is_file():
        raise InputError("config schema not found: m2ost reads its default settings from "
                         f"m2ost/schemas/config.schema.yaml; reinstall the package or point {SCHEMA_ENV} "
                         "at the schema", file=path)
    try:
        schema = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"config schema is not valid YAML ({err})", file=path) from None
    return _fill(schema, {})


def _fill(schema: dict, value):
    """Set the defaults of absent keys, recursively into objects (as Snakemake's
    ``validate(config, schema, set_default=True)`` does)."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _fill(sub, value[key])
    return value


def config_defaults() -> dict:
    """The whole default configuration (a fresh copy)."""
    return copy.deepcopy(_load(schema_path()))


def section(name: str):
    """The defaults of one top-level config key (``train``, ``expression``, ``views``, ...), a fresh copy."""
    config = _load(schema_path())
    if name not in config:
        raise KeyError(f"the config schema has no default for {name!r}")
    return copy.deepcopy(config[name])


def merged(name: str, given: dict | None) -> dict:
    """``given`` over the defaults of section ``name`` (one level deep; nested objects are replaced)."""
    return {**section(name), **(given or {})}
