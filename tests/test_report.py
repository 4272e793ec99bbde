"""The HTML report of the fast workflow run: every page it offers shows a result, and it is a
report one can send: small (maps as JPEG), a home page that says what was run, figures and
captions that name model, training split and held-out sample, captions true to the data, and
labelled tables that fit the report's frame.

The report is built from the run that tests/test_workflow.py shares (no second workflow run):
``snakemake --report`` takes about 10 s. The embedded data is checked as the report's own
JavaScript reads it (tests/report_checks.py); where Chromium is installed (CI installs it), the
report is also opened headless and every page visited with the console watched for errors, and
the tables are measured as drawn.
"""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
from report_checks import (REPORT_WINDOW, browse_every_page, chromium, console_messages, decoded, embedded,
                           image_title, missing_results, offered_combinations, plain_text, table_layout,
                           workflow_description)
from workflow_helpers import FAST_CONFIG, REPO, local_run, snakemake
from yaml import safe_load

from m2ost import defaults

CONFIG = safe_load((REPO / FAST_CONFIG).read_text())
# The fast config's report (14 maps, 14 gene figures, one prediction map, 3.1 MB of Snakemake's
# own page): 34.9 MB with PNG maps (1.5 MB each), 8.5 MB with JPEG maps (0.10-0.21 MB each).
REPORT_LIMIT_BYTES = 12_000_000


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
        for p in paths:  # maps over the H&E are JPEG, line plots PNG
            kind = "image/jpeg" if results[p]["labels"]["figure"] == "maps" else "image/png"
            assert results[p]["mime_type"] == kind and results[p]["data_uri"], p
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


@pytest.mark.slow
def test_report_is_small_enough_to_send(report):
    """Maps are JPEG of a bounded size: the report stays small enough for an email."""
    size = report.stat().st_size
    results, _ = embedded(report)
    maps = [r for r in results.values() if r["mime_type"] == "image/jpeg"]
    assert maps and all(len(decoded(r)) < 600_000 for r in maps)
    assert not [r for r in results.values() if r["mime_type"] == "image/png" and len(decoded(r)) > 300_000]
    assert size < REPORT_LIMIT_BYTES, f"report is {size / 1e6:.1f} MB"


@pytest.mark.slow
def test_home_page_says_what_was_run_and_where_to_look(report):
    text = workflow_description(report)
    assert "What was run" in text and "Where to look first" in text
    assert CONFIG["samples"] in text and "demo cohort" in text
    for model in CONFIG["models"]:
        assert model in text
    for split, spec in CONFIG["splits"]["explicit"].items():
        for sample in spec["test"]:
            assert f"{sample} (split {split})" in text
    assert "H&E-only slides predicted: P3_HE" in text and "split all" in text
    for category in ("Summary", "Evaluation", "Prediction", "Data quality"):
        assert category in text


@pytest.mark.slow
def test_figures_and_captions_name_model_split_and_sample(report):
    results, categories = embedded(report)
    for model, paths in categories["Evaluation"].items():
        for p in paths:
            r = results[p]
            sample, split = r["labels"]["held-out sample"].removesuffix(")").split(" (")
            assert image_title(decoded(r)) == f"model {model} trained on split {split} · held-out sample {sample}"
            caption = plain_text(r["caption"])
            assert f"Model {model}, trained on the training samples of split {split}" in caption
            assert f"on held-out sample {sample}" in caption
    (prediction,) = [results[p] for paths in categories["Prediction"].values() for p in paths]
    model = CONFIG.get("predict", {}).get("model") or defaults.section("predict")["model"]
    assert prediction["labels"] == {"slide": "P3_HE", "model": f"{model} (split all)"}
    assert f"model {model} trained on split all" in image_title(decoded(prediction))
    assert f"model {model} trained on every slide with expression (split all" in plain_text(prediction["caption"])


@pytest.mark.slow
def test_summary_caption_agrees_with_the_data(report):
    """The constant mean predictor's r is undefined: NaN in the table, not 0, and the captions say so."""
    results, categories = embedded(report)
    summary = {results[p]["labels"]["content"]: results[p] for paths in categories["Summary"].values() for p in paths}
    table = pd.read_csv(io.BytesIO(decoded(summary["table (TSV, for a spreadsheet)"])), sep="\t")
    mean = table[table["model"] == "mean"]
    assert len(mean) and mean["gene_pcc_mean"].isna().all() and (mean["n_genes_defined"] == 0).all()
    learned = table[table["model"] != "mean"]
    assert learned["gene_pcc_mean"].map(math.isfinite).all() and (learned["n_genes_defined"] > 0).all()
    caption = plain_text(summary["per-gene PCC of every model"]["caption"])
    assert "undefined" in caption and "not drawn at 0" in caption
    assert "undefined" in plain_text(summary["table"]["caption"])
    assert "<i>undefined</i>" in decoded(summary["table"]).decode()


@pytest.mark.slow
def test_tables_are_labelled_and_fit_the_report_frame(report, tmp_path):
    if chromium() is None:
        pytest.skip("Chromium is not installed (CI installs it: apt-get install chromium)")
    results, categories = embedded(report)
    messages = console_messages(browse_every_page(report, tmp_path))
    frames = {m.split(" ", 2)[2]: int(m.split(" ", 2)[1]) for m in messages if m.startswith("M2OST-FRAME ")}
    tables = {c: [p for p in paths if results[p]["mime_type"] == "text/html"]
              for c in ("Summary", "Data quality") for paths in categories[c].values()}
    assert all(tables.values()), tables
    for category, paths in tables.items():
        for p in paths:
            width = frames[p]
            assert 0 < width < REPORT_WINDOW[0]
            page = decoded(results[p]).decode()
            layout = table_layout(page, tmp_path, width)
            assert layout["overflow"] <= 0 and layout["clipped"] == [], (category, width, layout)
            assert layout["headers"] and set(layout["notes"]) == set(layout["headers"]), (category, layout)
            assert plain_text(results[p]["caption"])
