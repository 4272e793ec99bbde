"""Train/test splits over samples (standard library only: the Snakefile calls it while planning).

Validation spots, drawn inside the training samples, are in :mod:`m2ost.learn.training.validation`.

A split holds out whole samples (slides). Three schemes:

- ``leave_one_sample_out``: one split per sample, named ``loso-<sample>``. Other sections of the
  same patient stay in training, so scores are optimistic; use it only when there is one
  section per patient.
- ``leave_one_patient_out``: one split per patient, named ``lopo-<patient>``; every section of
  the patient is held out together. The scheme to report.
- ``explicit``: named splits with given train and test lists.

Samples without expression (H&E-only slides, to be predicted) never enter a split.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from m2ost.errors import InputError


@dataclass(frozen=True)
class Split:
    """One train/test partition of samples. ``name`` is stable and filesystem-safe."""

    name: str
    train: tuple[str, ...]
    test: tuple[str, ...]


def _usable(patients: Mapping[str, str | None],
            with_expression: Collection[str] | None) -> dict[str, str]:
    """Samples that have expression, mapped to their patient (the sample itself when unknown)."""
    if with_expression is not None:
        unknown = sorted(set(with_expression) - set(patients))
        if unknown:
            raise InputError(f"samples with expression but absent from the sample sheet: "
                             f"{', '.join(unknown[:5])}")
    keep = {}
    for sample, patient in patients.items():
        if with_expression is not None and sample not in with_expression:
            continue
        keep[sample] = _patient(sample, patient)
    return keep


def _patient(sample: str, patient) -> str:
    # None, "" and NaN (pandas' missing value, NaN != NaN) mean unknown: own patient
    if patient is None or patient != patient or not str(patient).strip():
        return sample
    return str(patient)


def _check_name(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"split name '{name}' is not usable as a directory name")
    return name


def leave_one_sample_out(patients: Mapping[str, str | None],
                         with_expression: Collection[str] | None = None) -> list[Split]:
    """One split per sample with expression, named ``loso-<sample>``.

    Parameters
    ----------
    patients
        sample -> patient (None or "" when unknown).
    with_expression
        The samples that have expression; None means all of them do.
    """
    usable = _usable(patients, with_expression)
    if len(usable) < 2:
        raise InputError(f"leave-one-sample-out needs at least 2 samples with expression, "
                         f"found {len(usable)}")
    samples = sorted(usable)
    return [Split(_check_name(f"loso-{s}"), tuple(x for x in samples if x != s), (s,))
            for s in samples]


def leave_one_patient_out(patients: Mapping[str, str | None],
                          with_expression: Collection[str] | None = None) -> list[Split]:
    """One split per patient, named ``lopo-<patient>``; all sections of a patient held out.

    A sample without a patient is its own patient.
    """
    usable = _usable(patients, with_expression)
    groups: dict[str, list[str]] = {}
    for sample, patient in usable.items():
        groups.setdefault(patient, []).append(sample)
    if len(groups) < 2:
        raise InputError(f"leave-one-patient-out needs at least 2 patients with expression, "
                         f"found {len(groups)}")
    splits = []
    for patient in sorted(groups):
        test = tuple(sorted(groups[patient]))
        train = tuple(sorted(s for s in usable if s not in test))
        splits.append(Split(_check_name(f"lopo-{patient}"), train, test))
    return splits


def explicit(spec: Mapping[str, Mapping[str, Iterable[str]]],
             patients: Mapping[str, str | None],
             with_expression: Collection[str] | None = None) -> list[Split]:
    """Splits given by name: ``{name: {"train": [...], "test": [...]}}``.

    Raises
    ------
    InputError
        A sample not in the sample sheet, a sample without expression, a test sample also in
        train, an empty train or test list.
    """
    usable = _usable(patients, with_expression)
    splits = []
    for name in sorted(spec):
        entry = spec[name]
        train = tuple(dict.fromkeys(entry.get("train") or ()))
        test = tuple(dict.fromkeys(entry.get("test") or ()))
        for role, members in (("train", train), ("test", test)):
            unknown = [s for s in members if s not in patients]
            if unknown:
                raise InputError(f"split '{name}': {role} samples not in the sample sheet: "
                                 f"{', '.join(unknown[:5])}")
            no_expr = [s for s in members if s not in usable]
            if no_expr:
                raise InputError(f"split '{name}': {role} samples have no expression "
                                 f"(H&E-only samples cannot be trained or scored on): "
                                 f"{', '.join(no_expr[:5])}")
        if not train:
            raise InputError(f"split '{name}': the train list is empty")
        if not test:
            raise InputError(f"split '{name}': the test list is empty")
        both = sorted(set(train) & set(test))
        if both:
            raise InputError(f"split '{name}': samples both in train and test: "
                             f"{', '.join(both[:5])}")
        shared = sorted({usable[s] for s in train} & {usable[s] for s in test})
        if shared:
            # Allowed (the user asked for it) but it leaks patient-level signal into the score.
            warnings.warn(f"split '{name}': patients with sections in both train and test: "
                          f"{', '.join(shared[:5])}; scores will be optimistic", stacklevel=2)
        splits.append(Split(_check_name(name), train, test))
    return splits


def make_splits(scheme: str, patients: Mapping[str, str | None],
                with_expression: Collection[str] | None = None,
                spec: Mapping[str, Mapping[str, Iterable[str]]] | None = None) -> list[Split]:
    """Dispatch on ``scheme``: ``"loso"``, ``"lopo"`` or ``"explicit"`` (needs ``spec``)."""
    if scheme in ("loso", "leave_one_sample_out"):
        return leave_one_sample_out(patients, with_expression)
    if scheme in ("lopo", "leave_one_patient_out"):
        return leave_one_patient_out(patients, with_expression)
    if scheme == "explicit":
        if not spec:
            raise InputError("split scheme 'explicit' needs the splits listed in the config")
        return explicit(spec, patients, with_expression)
    raise InputError(f"split scheme '{scheme}' is not one of loso, lopo, explicit")
