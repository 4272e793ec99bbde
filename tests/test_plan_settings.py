"""Each rule's settings come from m2ost/plan/settings.py, and a changed setting reruns exactly
the jobs that read it.

Snakemake reruns a job when its params change; every rule's params are built by one function
of m2ost.plan.settings, which declares the config keys it reads. Here every key of the config
schema is changed in turn, on a config that trains every model kind, and the jobs whose params
change must be exactly those that declare the key: a job that does not read it is not rerun.
"""

from __future__ import annotations

import copy

import pytest

from m2ost import defaults
from m2ost.plan.kinds import ALL_KINDS, KINDS
from m2ost.plan.settings import PLAN_KEYS, job_reads, job_settings, train_settings

# A key whose effect the every-kind config hides, with the config where it shows.
MASKED = {"encoder.tokens": ("m2ost_encoder is selected, which switches the token grids on whatever "
                             "encoder.tokens says", {"models": ["m2ost", "ridge"]})}


def schema_keys(schema: dict, prefix: str = ""):
    """(dotted key, its schema) of every setting, nested objects (train.augment) key by key."""
    for key, sub in schema.get("properties", {}).items():
        dotted = f"{prefix}{key}"
        if "properties" in sub:
            yield from schema_keys(sub, f"{dotted}.")
        else:
            yield dotted, sub


def full_config(**over) -> dict:
    config = {"samples": "samples.tsv", **defaults.config_defaults(), "models": list(ALL_KINDS)}
    config.update(over)
    return config


def other_value(sub: dict, value):
    """A valid value of the schema ``sub`` other than ``value``."""
    kinds = sub.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if "enum" in sub:
        return next(e for e in sub["enum"] if e != value)
    if "pattern" in sub:
        return "cpu"
    if value is None:
        return {"integer": 2, "number": 0.5}[next(k for k in kinds if k != "null")]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        top = sub.get("maximum", sub.get("exclusiveMaximum", value + 2))
        new = (value + top) / 2 if value < top else value / 2
        return round(new) if "integer" in kinds and round(new) != value else (value + 1 if "integer" in kinds else new)
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "x": 1}
    if isinstance(value, list):
        if value and isinstance(value[0], dict):  # views: a wider first view
            return [{**value[0], "fov_um": value[0]["fov_um"] * 2}] + value[1:]
        if value and isinstance(value[0], (int, float)):
            return [value[0] * 1.5] + value[1:]
        items = sub.get("items", {})
        return value[:-1] if "enum" in items else value + ["GENE1"]
    raise AssertionError(f"no other value for {value!r}")


def changed(config: dict, dotted: str, sub: dict) -> dict:
    config = copy.deepcopy(config)
    *path, last = dotted.split(".")
    node = config
    for part in path:
        node = node[part]
    node[last] = other_value(sub, node.get(last))
    return config


def readers(dotted: str) -> set[str]:
    """The jobs that declare ``dotted`` (or its section) among their reads."""
    return {job for job, reads in job_reads().items()
            if any(dotted == r or dotted.startswith(r + ".") for r in reads)}


def rerun(before: dict, after: dict) -> set[str]:
    a, b = job_settings(before), job_settings(after)
    return {job for job in a if a[job] != b[job]}


KEYS = list(schema_keys(defaults.config_schema()))


def is_plan_key(dotted: str) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in PLAN_KEYS)


@pytest.mark.parametrize("dotted,sub", [(k, s) for k, s in KEYS if not is_plan_key(k)], ids=lambda v: str(v)[:40])
def test_a_changed_key_reruns_exactly_the_jobs_that_read_it(dotted, sub):
    config = full_config()
    if dotted in MASKED:
        config = full_config(**MASKED[dotted][1])
    got, declared = rerun(config, changed(config, dotted, sub)), readers(dotted)
    assert declared, f"{dotted} is read by no job: add it to the reads of the jobs that use it, or to PLAN_KEYS"
    assert got == declared, (f"changing {dotted} changes the params of {sorted(got)}; "
                             f"the jobs that declare it: {sorted(declared)}")


def test_every_declared_read_is_a_setting_and_plan_keys_are_documented():
    keys = {k for k, _ in KEYS}
    sections = {k.split(".")[0] for k in keys} | {k.rsplit(".", 1)[0] for k in keys}
    for job, reads in job_reads().items():
        for r in reads:
            assert r in keys or r in sections, f"{job} declares {r}, which is no setting of the schema"
    for key, why in PLAN_KEYS.items():
        assert (key in keys or key in sections) and why, key
        assert not readers(key) or key == "data_root", f"{key} is both a plan key and read by {readers(key)}"


def test_m2ost_encoder_trains_on_its_own_settings_and_the_spots_draw():
    """Its train job gets the three train keys of the validation draw, not the network loop's."""
    s = train_settings("m2ost_encoder", full_config())
    assert set(s["train"]) == {"seed", "val_fraction", "drop_padded"}
    assert s["model"] == defaults.section("m2ost_encoder")
    assert set(s["encoder"]) == {"name", "weights", "input_px", "mean", "std", "kwargs", "preset", "tta", "levels",
                                 "pool", "token_levels", "token_grid"}
    # what the pooled kinds record and compare (m2ost.learn.features.encoders.FEATURE_KEYS, without the
    # token grids' keys, which read_embeddings ignores for them)
    pooled = train_settings("encoder_ridge", full_config())["encoder"]
    assert set(pooled) == set(s["encoder"]) - {"token_levels", "token_grid"}
    assert {k for k, kind in KINDS.items() if kind.train_keys is None} == {"m2ost", "m2ost_single", "m2ost_finetune"}
