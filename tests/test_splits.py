"""Splits hold out whole samples (or patients); validation never touches a held-out sample."""

from __future__ import annotations

import numpy as np
import pytest

from m2ost.errors import InputError
from m2ost.learn.training.validation import validation_spots
from m2ost.plan.splits import explicit, leave_one_patient_out, leave_one_sample_out, make_splits

PATIENTS = {"A": "P1", "B": "P1", "C": "P2", "D": "P3", "E": "P2"}
WITH_EXPRESSION = {"A", "B", "C", "D"}  # E is H&E-only


def test_loso_names_and_members():
    splits = leave_one_sample_out(PATIENTS, WITH_EXPRESSION)
    assert [s.name for s in splits] == ["loso-A", "loso-B", "loso-C", "loso-D"]
    for s in splits:
        assert len(s.test) == 1 and s.test[0] not in s.train
        assert set(s.train) | set(s.test) == WITH_EXPRESSION


def test_lopo_groups_the_sections_of_a_patient():
    splits = {s.name: s for s in leave_one_patient_out(PATIENTS, WITH_EXPRESSION)}
    assert sorted(splits) == ["lopo-P1", "lopo-P2", "lopo-P3"]
    assert splits["lopo-P1"].test == ("A", "B") and splits["lopo-P1"].train == ("C", "D")
    assert splits["lopo-P2"].test == ("C",)
    for s in splits.values():
        test_patients = {PATIENTS[x] for x in s.test}
        assert not test_patients & {PATIENTS[x] for x in s.train}


def test_he_only_samples_never_enter_splits():
    for s in make_splits("loso", PATIENTS, WITH_EXPRESSION) + \
            make_splits("lopo", PATIENTS, WITH_EXPRESSION):
        assert "E" not in s.train and "E" not in s.test


def test_missing_patient_is_its_own_patient():
    splits = leave_one_patient_out({"A": "P1", "B": None, "C": ""})
    assert [s.name for s in splits] == ["lopo-B", "lopo-C", "lopo-P1"]


def test_lopo_needs_two_patients():
    with pytest.raises(InputError, match="at least 2 patients"):
        leave_one_patient_out({"A": "P1", "B": "P1"})


def test_explicit_split_and_its_errors():
    (s,) = explicit({"fold1": {"train": ["A", "B"], "test": ["D"]}}, PATIENTS, WITH_EXPRESSION)
    assert s.name == "fold1" and s.train == ("A", "B") and s.test == ("D",)
    bad = [
        ({"f": {"train": ["A", "Z"], "test": ["D"]}}, "not in the sample sheet: Z"),
        ({"f": {"train": ["A", "D"], "test": ["D"]}}, "both in train and test: D"),
        ({"f": {"train": [], "test": ["D"]}}, "train list is empty"),
        ({"f": {"train": ["A"], "test": []}}, "test list is empty"),
        ({"f": {"train": ["A"], "test": ["E"]}}, "no expression"),
    ]
    for spec, message in bad:
        with pytest.raises(InputError, match=message):
            explicit(spec, PATIENTS, WITH_EXPRESSION)
    with pytest.warns(UserWarning, match="patients with sections in both"):
        explicit({"f": {"train": ["A"], "test": ["B"]}}, PATIENTS, WITH_EXPRESSION)


def test_unknown_scheme():
    with pytest.raises(InputError, match="not one of"):
        make_splits("random", PATIENTS)


def test_validation_spots_are_seeded_disjoint_and_per_sample():
    a = validation_spots({"A": 100, "B": 10, "C": 1}, 0.2, seed=3)
    b = validation_spots({"B": 10, "A": 100}, 0.2, seed=3)  # other samples do not matter
    for s in ("A", "B"):
        tr, va = a[s]
        assert np.array_equal(va, b[s][1]) and np.array_equal(tr, b[s][0])
        assert not set(tr) & set(va) and len(tr) + len(va) == {"A": 100, "B": 10}[s]
    assert len(a["A"][1]) == 20 and len(a["B"][1]) == 2
    assert len(a["C"][1]) == 0  # a single spot stays in training
    c = validation_spots({"A": 100}, 0.2, seed=4)
    assert not np.array_equal(c["A"][1], a["A"][1])
    with pytest.raises(InputError, match="val_fraction"):
        validation_spots({"A": 10}, 1.0, seed=0)


def test_no_held_out_spot_in_training_or_validation(study):
    """For every LOPO split of the synthetic study, train + validation spots come only from
    the training samples, and every training spot is used exactly once."""
    from synthetic import tiny_train_cfg

    from m2ost.learn.training.identity import train_settings
    from m2ost.learn.training.validation import training_data

    patients = {"A": "P1", "B": "P1", "C": "P2"}
    cfg = train_settings(tiny_train_cfg(val_fraction=0.25))
    for split in leave_one_patient_out(patients):
        train_ds, val_ds = training_data(study["bundles"], study["expressions"],
                                         study["genes"], split.train, None, cfg)
        seen = set()
        for ds in (train_ds, val_ds):
            names, ids, _ = ds.spots()
            assert set(names) <= set(split.train)
            assert not set(names) & set(split.test)
            keys = set(zip(names, ids))
            assert not keys & seen
            seen |= keys
        assert len(val_ds) > 0
        assert len(seen) == 20 * len(split.train)
