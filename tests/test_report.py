"""The HTML report of the fast workflow run: every page it offers shows a result.

The report is built from the run that tests/test_workflow.py shares (no second workflow run):
``snakemake --report`` takes about 10 s. The embedded data is checked as the report's own
JavaScript reads it (tests/report_checks.py); where Chromium is installed (CI installs it), the
report is also opened headless and every page visited with the console watched for errors.
"""

from __future__ import annotations

import pytest
from report_checks import (browse_every_page, chromium, console_messages, embedded, missing_results,
                           offered_combinations)
from workflow_helpers import FAST_CONFIG, REPO, local_run, snakemake
from yaml import safe_load

CONFIG = safe_load((REPO / FAST_CONFIG).read_text())


def test_the_check_finds_the_blank_page_of_split_labels():
    """Labels {model, split, figure} where each split holds its own samples' figures: the split
    becomes a toggle, and a figure of one split has no counterpart in the other (the old bug)."""
    results = {}
    for split, sample in (("s1", "P2_S1"), ("s2", "P2_S2")):
        for figure in ("maps", "genes"):
            results[f"{split}/{sample}.{figure}.png"] = {
                "mime_type": "image/png",
                "labels": {"model": "m2ost", "split": split, "figure": f"{sample}.{figure}"}}
    categories = {"Evaluation": {"m2ost": list(results)}}
    assert len(missing_results(results, categories)) == 4
    # Labelled per held-out sample instead, every combination exists.
    for path, record in results.items():
        split, name = path.split("/")
        sample, figure, _ = name.split(".")
        record["labels"] = {"held-out sample": f"{sample} ({split})", "figure": figure}
    assert missing_results(results, categories) == []
    offered = offered_combinations(list(results), results)
    assert {toggle for _, toggle, _ in offered} == {("genes",), ("maps",)}  # figure is the toggle


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = local_run(tmp_path_factory)  # the run test_workflow.py shares (cached per session)
    out = tmp_path_factory.mktemp("report") / "report.html"
    snakemake(run.workdir, "--report", str(out), "--configfile", FAST_CONFIG, timeout=600)
    return out


@pytest.mark.slow
def test_every_offered_label_combination_points_to_a_file(report):
    results, categories = embedded(report)
    assert missing_results(results, categories) == []
    models, splits = CONFIG["models"], CONFIG["splits"]["explicit"]
    assert set(categories["Evaluation"]) == set(models)
    for model in models:
        paths = categories["Evaluation"][model]
        held_out = [f"{s} ({split})" for split, spec in splits.items() for s in spec["test"]]
        labels = {(results[p]["labels"]["held-out sample"], results[p]["labels"]["figure"]) for p in paths}
        assert labels == {(h, f) for h in held_out for f in ("maps", "genes")}
        assert all(results[p]["mime_type"] == "image/png" and results[p]["data_uri"] for p in paths)
    summary = [results[p] for paths in categories["Summary"].values() for p in paths]
    assert {r["mime_type"] for r in summary} >= {"text/html", "image/png"}


@pytest.mark.slow
def test_report_opens_in_chromium_with_every_page_drawn(report, tmp_path):
    if chromium() is None:
        pytest.skip("Chromium is not installed (CI installs it: apt-get install chromium)")
    log = browse_every_page(report, tmp_path)
    messages = console_messages(log)
    assert "M2OST-DONE" in messages, f"the page script did not finish:\n{log[-3000:]}"
    errors = [m for m in messages if "Error" in m or "error" in m or "Uncaught" in m]
    assert not errors, "console errors:\n" + "\n".join(errors)
    # Each page shows a header and one row per label combination (a toggle switches within a row).
    results, categories = embedded(report)
    expected = [f"M2OST-PAGE {c} / {s} rows={len({row for row, _, _ in offered_combinations(p, results)}) + 1}"
                for c, subs in categories.items() for s, p in subs.items()]
    assert [m for m in messages if m.startswith("M2OST-PAGE")] == expected
