"""The whole workflow: outputs, precise reruns, reproducibility and provenance.

One run of the fast config (tests/data/fast_config.yaml: 4 Visium-style demo slides of 2
patients, one H&E-only slide, explicit splits s1 and s2) in a copy of the repository, with
PYTHONPATH unset, is shared by every test here (once per session, 5-10 min on 2 cores). The
planning tests only dry-run it (`snakemake -n`), on copies where they change files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from importlib import metadata

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from workflow_helpers import (FAST_CONFIG, REPO, copy_workdir, dry_run, find_provenance, job,
                              job_stats, local_run, parse_dry_run, second_run, snakemake,
                              workflow_env, write_config)

pytestmark = pytest.mark.slow

CONFIG = yaml.safe_load((REPO / FAST_CONFIG).read_text())
MODELS = CONFIG["models"]
NEURAL = [m for m in MODELS if m in ("m2ost", "m2ost_single", "m2ost_finetune")]
FEATURE = [m for m in MODELS if m.startswith("encoder_")]
FINETUNED = [m for m in MODELS if m == "m2ost_finetune"]  # builds the encoder itself
MEMBERS = CONFIG["ensemble"]["members"]  # the ensemble refits when one of them does
ENCODER = "tf_efficientnet_lite0"  # encoder.name default (schema)
SPLITS = sorted(CONFIG["splits"]["explicit"])  # s1, s2
# feature models train on the training samples' embeddings and are scored from the test samples'
SPLIT_SAMPLES = sorted({s for split in CONFIG["splits"]["explicit"].values() for side in ("train", "test")
                        for s in split[side]})
ST = ["P1_S1", "P1_S2", "P2_S1", "P2_S2"]
HE = ["P3_HE"]
PREDICT_MODEL = "m2ost"  # predict.model default (schema)
# Rules that write a benchmark file (heavy ones).
BENCHMARKED = ("demo_cohort", "tile", "expression", "train", "evaluate", "predict")


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory):
    return local_run(tmp_path_factory)


def model_jobs(models, splits, predict=True):
    """Training and evaluation of ``models`` on ``splits``, then the summary (and prediction)."""
    jobs = {job(rule, model=m, split=s) for rule in ("train", "evaluate") for m in models for s in splits}
    jobs |= {job("summary"), job("all")}
    if predict:
        jobs |= {job("train", model=PREDICT_MODEL, split="all")}
        jobs |= {job("predict", sample=s) for s in HE}
    return jobs


def with_ensemble(models):
    """``models`` and the ensemble, when one of its members is among them."""
    return list(models) + (["ensemble"] if "ensemble" in MODELS and set(models) & set(MEMBERS) else [])


def embed_jobs(samples):
    """Embeddings of ``samples`` (the samples of the splits), when a feature model runs."""
    return {job("embed", encoder=ENCODER, sample=s) for s in samples} if FEATURE else set()


def fmt(jobs) -> str:
    return "\n".join(f"  {rule} {dict(wc)}" for rule, wc in sorted(jobs))


def assert_plan(planned, expected):
    missing, extra = expected - planned, planned - expected
    assert not missing and not extra, f"planned jobs differ:\nmissing:\n{fmt(missing)}\nunexpected:\n{fmt(extra)}"


# --------------------------------------------------------------------------- the run


def test_package_is_not_installed_so_rules_rely_on_shell_prefix(tmp_path):
    """The rules import m2ost through shell.prefix's PYTHONPATH alone (as under --use-conda)."""
    assert "PYTHONPATH" not in workflow_env()
    proc = subprocess.run([sys.executable, "-c", "import m2ost; print(m2ost.__file__)"], cwd=tmp_path,
                          env=workflow_env(), capture_output=True, text=True)
    if proc.returncode == 0:
        pytest.skip(f"m2ost is installed in this environment ({proc.stdout.strip()}), so the workflow run "
                    "does not prove that shell.prefix alone puts it on the path")
    assert "No module named 'm2ost'" in proc.stderr


def test_run_completes_with_every_output(fast_run):
    wd = fast_run.workdir
    stats = job_stats(fast_run.output)
    # One job per slide, sample, split and model, as the config implies.
    assert stats["tile"] == len(ST) + len(HE)
    assert stats["expression"] == len(ST)
    assert stats["panel"] == len(SPLITS) + 1
    assert stats["train"] == len(MODELS) * len(SPLITS) + 1
    assert stats["evaluate"] == len(MODELS) * len(SPLITS)
    assert stats["embed"] == len(SPLIT_SAMPLES)  # the samples of the splits only (no H&E-only slide)
    assert "steps (100%) done" in fast_run.output

    import h5py

    for sample in ST + HE:
        with h5py.File(wd / f"results/bundles/{sample}.h5", "r") as f:
            n = int(f.attrs["n_spots"])
            assert n > 0 and int(f.attrs["n_views"]) == len(CONFIG["views"])
            assert list(f.attrs["fov_um"]) == [v["fov_um"] for v in CONFIG["views"]]
            for i, view in enumerate(CONFIG["views"]):
                ds = f[f"view_{i}"]
                assert ds.shape == (n, view["size_px"], view["size_px"], 3) and ds.dtype == np.uint8

    import anndata

    for sample in ST:
        adata = anndata.read_h5ad(wd / f"results/expression/{sample}.h5ad")
        assert adata.n_obs > 0 and adata.n_vars > 0
        assert np.isfinite(np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X)).all()

    table = pd.read_csv(wd / "results/metrics/summary.tsv", sep="\t")
    rows = set(zip(table["model"], table["split"]))
    assert rows == {(m, s) for m in MODELS for s in SPLITS + ["mean"]}
    assert len(table) == len(rows)
    # Every model has a score but the constant mean predictor, whose Pearson r is undefined.
    learned = table["model"] != "mean"
    assert table.loc[learned, "gene_pcc_mean"].map(math.isfinite).all()
    assert table.loc[~learned, "gene_pcc_mean"].isna().all() and (table.loc[~learned, "n_genes_defined"] == 0).all()

    genes = (wd / "results/genes/all.txt").read_text().split()
    pred = anndata.read_h5ad(wd / "results/predictions/P3_HE.h5ad")
    assert pred.n_obs > 0 and list(pred.var_names) == genes
    assert np.isfinite(np.asarray(pred.X)).all()
    assert (wd / "results/predictions/P3_HE.jpg").stat().st_size > 0


def test_every_rule_writes_logs_and_heavy_rules_benchmarks(fast_run):
    wd = fast_run.workdir
    stats = {rule: n for rule, n in job_stats(fast_run.output).items() if rule not in ("all", "total")}
    assert len(stats) >= 10, stats
    for rule, n in stats.items():
        logs = sorted((wd / "logs" / rule).rglob("*.log"))
        assert len(logs) == n, f"rule {rule}: {n} jobs but logs {[str(p.relative_to(wd)) for p in logs]}"
    for rule in BENCHMARKED:
        folder = wd / "benchmarks/results" / rule
        files = sorted(folder.rglob("*.tsv")) if folder.is_dir() else [folder.with_suffix(".tsv")]
        assert len(files) == stats[rule], f"rule {rule}: {stats[rule]} jobs but benchmarks {files}"
        for path in files:
            bench = pd.read_csv(path, sep="\t")
            assert len(bench) == 1 and bench["s"].iloc[0] >= 0


def test_outputs_record_their_provenance(fast_run):
    import anndata
    import h5py
    import torch

    import m2ost

    wd = fast_run.workdir
    assert len(fast_run.commit) == 40

    def check(prov, where, packages=("numpy",)):
        assert prov is not None, f"{where}: no provenance"
        assert prov["git_commit"] == fast_run.commit, where
        versions = prov["versions"]
        assert versions["m2ost"] == m2ost.__version__, where
        assert versions["python"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}."), where
        for name in packages:
            assert versions[name] == metadata.version(name), (where, name)
        assert "settings" in prov, where
        return prov

    for sample in ST + HE:
        with h5py.File(wd / f"results/bundles/{sample}.h5", "r") as f:
            prov = check(find_provenance(f.attrs["provenance"]), f"bundle {sample}", ("numpy", "h5py"))
        assert prov["settings"]["views"] == CONFIG["views"]
    for sample in ST:
        adata = anndata.read_h5ad(wd / f"results/expression/{sample}.h5ad")
        prov = check(find_provenance(adata.uns["m2ost"]), f"expression {sample}", ("numpy", "scanpy"))
        assert prov["settings"]["min_counts"] == CONFIG["expression"]["min_counts"]
    for m in MODELS:
        for s in SPLITS:
            summary = json.loads((wd / f"results/metrics/{m}/{s}/summary.json").read_text())
            check(find_provenance(summary), f"summary.json {m}/{s}", ("torch",))
            pred = anndata.read_h5ad(wd / f"results/metrics/{m}/{s}/predictions.h5ad")
            check(find_provenance(pred.uns["m2ost"]), f"predictions {m}/{s}")
            payload = torch.load(wd / f"results/models/{m}/{s}/model.pt", map_location="cpu", weights_only=False)
            check(find_provenance(payload), f"model {m}/{s}", ("torch",))
    pred = anndata.read_h5ad(wd / "results/predictions/P3_HE.h5ad")
    check(find_provenance(pred.uns["m2ost"]), "predictions P3_HE", ("torch",))


def test_outputs_open_in_scanpy_squidpy_and_qupath(fast_run):
    """Every kind of h5ad draws over the tissue in sc.pl.spatial with no extra argument; the
    evaluation and prediction GeoJSON fit the slide; the figures exist; each training printed
    its epoch lines where the user sees them (Snakemake's own output, not only the log)."""
    import anndata
    import openslide
    from viewer_checks import check_draws_over_tissue, check_qupath_geojson

    wd = fast_run.workdir
    assert "val gene PCC" in fast_run.output and "[train m2ost " in fast_run.output
    assert "val gene PCC" in (wd / "logs/train/m2ost/s1.log").read_text()  # and in the log

    def slide_size(sample):
        info = json.loads((wd / f"results/slides/{sample}.json").read_text())
        with openslide.OpenSlide(str(wd / info["slide"])) as slide:
            return slide.dimensions

    for sample in ST:
        adata = anndata.read_h5ad(wd / f"results/expression/{sample}.h5ad")
        assert "log1p" in adata.uns and adata.uns["m2ost"]["unit"] == "log1p CP10k"
        check_draws_over_tissue(adata, sample, slide_size(sample))
    for split in SPLITS:
        folder = wd / f"results/metrics/m2ost/{split}"
        adata = anndata.read_h5ad(folder / "predictions.h5ad")
        (sample,) = CONFIG["splits"]["explicit"][split]["test"]
        assert isinstance(adata.uns["m2ost"], dict) and "val_pcc" in adata.var and "unit" in adata.var
        check_draws_over_tissue(adata, sample, slide_size(sample))
        diameter = adata.uns["spatial"][sample]["scalefactors"]["spot_diameter_fullres"]
        collection = check_qupath_geojson(folder / "qupath" / f"{sample}.geojson", adata, *slide_size(sample),
                                          diameter)
        assert f"measured: {adata.var_names[0]}" in collection["features"][0]["properties"]["measurements"]
        for name in (f"{sample}.maps.jpg", f"{sample}.genes.png"):
            assert (folder / "figures" / name).stat().st_size > 10_000
    for sample in HE:
        adata = anndata.read_h5ad(wd / f"results/predictions/{sample}.h5ad")
        assert isinstance(adata.uns["m2ost"], dict) and np.isfinite(adata.var["val_pcc"]).any()
        check_draws_over_tissue(adata, sample, slide_size(sample))
        check_qupath_geojson(wd / f"results/predictions/{sample}.geojson", adata, *slide_size(sample),
                             adata.uns["spatial"][sample]["scalefactors"]["spot_diameter_fullres"])
    assert (wd / "results/metrics/per_gene_pcc.png").stat().st_size > 10_000
    assert "<table" in (wd / "results/metrics/summary.html").read_text()


# --------------------------------------------------------------------------- precise reruns


def test_dry_run_parser():
    text = """Job stats:
job      count
-----  -------
train        2
all          1
total        3

[Mon Jan  1 00:00:00 2026]
rule train:
    input: a, b
    output: results/models/m2ost/s1/model.pt
    jobid: 3
    reason: Params have changed since last execution
    wildcards: model=m2ost, split=s1
    resources: tmpdir=/tmp, mem_mb=8000

[Mon Jan  1 00:00:00 2026]
localrule train:
    output: results/models/mean/s2/model.pt
    wildcards: split=s2, model=mean
    threads: 2

rule all:
    input: x
    jobid: 0
Job stats:
"""
    assert parse_dry_run(text) == {job("train", model="m2ost", split="s1"), job("train", model="mean", split="s2"),
                                   job("all")}
    assert parse_dry_run("Building DAG of jobs...\nNothing to be done (all requested files are present).") == set()
    with pytest.raises(AssertionError, match="parsed 3 job blocks"):
        parse_dry_run(text.replace("total        3", "total        4"))


def test_unchanged_workflow_plans_nothing(fast_run):
    assert dry_run(fast_run.workdir) == set()


def test_touched_input_with_same_content_plans_nothing(fast_run):
    """Snakemake compares the checksum of small inputs: a new mtime alone reruns nothing."""
    counts = fast_run.workdir / "resources/demo/P1_S1/outs/filtered_feature_bc_matrix.h5"
    before = counts.stat()
    try:
        os.utime(counts)
        counts.write_bytes(counts.read_bytes())
        assert counts.stat().st_mtime_ns > before.st_mtime_ns
        assert dry_run(fast_run.workdir) == set()
    finally:
        os.utime(counts, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_changed_counts_rerun_that_sample_and_its_dependents_only(fast_run, tmp_path):
    import h5py

    wd = copy_workdir(fast_run.workdir, tmp_path / "run")
    with h5py.File(wd / "resources/demo/P1_S1/outs/filtered_feature_bc_matrix.h5", "r+") as f:
        data = f["matrix/data"]
        data[0] = data[0] + 1  # one more read of one gene in one spot
    planned = dry_run(wd)
    # P1_S1 trains s1 and the prediction split 'all'; it is in no split's test set.
    expected = {job("expression", sample="P1_S1"), job("panel", split="s1"), job("panel", split="all"),
                job("data_summary")}
    expected |= model_jobs(MODELS, ["s1"])
    assert_plan(planned, expected)
    assert not {rule for rule, _ in planned} & {"tile", "spots", "prepare_slide", "demo_cohort"}


def test_changed_visium_scalefactors_rerun_that_sample_from_its_spot_table(fast_run, tmp_path):
    """The spot diameter comes from scalefactors_json.json, an input of the spots rule."""
    wd = copy_workdir(fast_run.workdir, tmp_path / "run")
    path = wd / "resources/demo/P1_S1/outs/spatial/scalefactors_json.json"
    factors = json.loads(path.read_text())
    factors["spot_diameter_fullres"] *= 1.1
    path.write_text(json.dumps(factors))
    planned = dry_run(wd)
    assert job("spots", sample="P1_S1") in planned
    touched = {dict(wc).get("sample") for rule, wc in planned
               if rule in ("spots", "prepare_slide", "tile", "expression")}
    assert touched <= {"P1_S1"}, touched
    assert job("train", model="m2ost", split="s1") in planned


def test_changed_field_of_view_retiles_every_slide_but_keeps_expression(fast_run, tmp_path):
    def change(config):
        config["views"][0]["fov_um"] = 100

    planned = dry_run(fast_run.workdir, write_config(tmp_path / "config.yaml", change))
    expected = {job("tile", sample=s) for s in ST + HE} | model_jobs(MODELS, SPLITS) | embed_jobs(SPLIT_SAMPLES)
    assert_plan(planned, expected)
    assert not {rule for rule, _ in planned} & {"expression", "panel", "spots", "prepare_slide"}


def test_changed_encoder_reembeds_and_retrains_the_feature_models_only(fast_run, tmp_path):
    """The embeddings and the models on them follow the encoder's settings, and so does the
    model that fine-tunes the encoder; nothing else does. How embeddings are stored (the token
    grids, the batch size) or pooled (tta) does not touch the fine-tuned model."""
    def change(config):
        config["encoder"]["input_px"] = 96

    planned = dry_run(fast_run.workdir, write_config(tmp_path / "config.yaml", change))
    assert_plan(planned, model_jobs(with_ensemble(FEATURE + FINETUNED), SPLITS, predict=False)
                | embed_jobs(SPLIT_SAMPLES))

    def pooling(config):
        config["encoder"]["tta"] = True

    planned = dry_run(fast_run.workdir, write_config(tmp_path / "pooling.yaml", pooling))
    assert_plan(planned, model_jobs(with_ensemble(FEATURE), SPLITS, predict=False) | embed_jobs(SPLIT_SAMPLES))


def test_feature_model_scores_the_demo_above_chance(fast_run):
    """encoder_ridge learns the demo's image-driven expression (a model that learns nothing
    scores about 0 per-gene Pearson on the held-out patient)."""
    table = pd.read_csv(fast_run.workdir / "results/metrics/summary.tsv", sep="\t")
    for m in FEATURE:
        row = table[(table["model"] == m) & (table["split"] == "mean")]
        assert float(row["gene_pcc_mean"].iloc[0]) > 0.2, table


def test_ensemble_holds_its_members_of_the_same_split(fast_run):
    """The ensemble of each split was fitted on that split's members (their fingerprints), and
    no test sample of the split was in its training or validation."""
    for split, sides in CONFIG["splits"]["explicit"].items():
        payload = torch.load(fast_run.workdir / f"results/models/ensemble/{split}/model.pt", weights_only=True)
        assert payload["train_samples"] == sides["train"] and not set(payload["train_samples"]) & set(sides["test"])
        kept = payload["model_cfg"]["members"]
        assert kept and set(kept) <= set(MEMBERS)
        for name, fingerprint in zip(kept, payload["model_cfg"]["member_fingerprints"]):
            member = torch.load(fast_run.workdir / f"results/models/{name}/{split}/model.pt", weights_only=True)
            assert member["fingerprint"] == fingerprint and member["train_samples"] == sides["train"]


def test_changed_learning_rate_retrains_the_neural_models_only(fast_run, tmp_path):
    def change(config):
        config.setdefault("train", {})["lr"] = 0.002

    configfile = write_config(tmp_path / "config.yaml", change)
    assert_plan(dry_run(fast_run.workdir, configfile), model_jobs(with_ensemble(NEURAL), SPLITS))
    # The reruns train in the folders of the first run, whose checkpoints are now another run's:
    # the rule lets the trainer replace them (tests/test_robustness_inputs.py) instead of failing.
    assert (fast_run.workdir / f"results/models/m2ost/{SPLITS[0]}/checkpoints/last.pt").exists()
    printed = snakemake(fast_run.workdir, "-n", "-p", "--configfile", str(configfile)).stdout
    launched = [line for line in printed.splitlines() if " -m m2ost train " in line]
    assert launched and all("--restart-stale-checkpoint" in line for line in launched), launched


def test_two_training_processes_relaunch_the_neural_models_under_torchrun(fast_run, tmp_path):
    def change(config):
        config["launch"] = {"train_processes": 2}

    configfile = write_config(tmp_path / "config.yaml", change)
    assert_plan(dry_run(fast_run.workdir, configfile), model_jobs(with_ensemble(NEURAL), SPLITS))
    printed = snakemake(fast_run.workdir, "-n", "-p", "--configfile", str(configfile)).stdout
    launched = [line for line in printed.splitlines() if " -m m2ost train " in line and "--kind ensemble" not in line]
    assert launched and all("torch.distributed.run --standalone --nproc_per_node=2 -m m2ost train"
                            in line for line in launched), launched


def test_changed_qc_reruns_expression_but_not_tiling(fast_run, tmp_path):
    def change(config):
        config["expression"]["min_counts"] = 12

    planned = dry_run(fast_run.workdir, write_config(tmp_path / "config.yaml", change))
    expected = {job("expression", sample=s) for s in ST} | {job("panel", split=s) for s in SPLITS + ["all"]}
    assert_plan(planned, expected | {job("data_summary")} | model_jobs(MODELS, SPLITS))


def test_changed_prediction_settings_rerun_prediction_only(fast_run, tmp_path):
    def batch(config):
        config["predict"] = {"batch_size": 7}

    planned = dry_run(fast_run.workdir, write_config(tmp_path / "batch.yaml", batch))
    assert_plan(planned, {job("predict", sample=s) for s in HE} | {job("all")})

    def spacing(config):
        config["predict"] = {"spot_spacing_um": 120}

    planned = dry_run(fast_run.workdir, write_config(tmp_path / "spacing.yaml", spacing))
    expected = {job(rule, sample=s) for rule in ("grid_spots", "tile", "predict") for s in HE} | {job("all")}
    assert_plan(planned, expected)


def test_added_sample_runs_its_data_stages_and_only_the_splits_it_joins(fast_run, tmp_path):
    wd = copy_workdir(fast_run.workdir, tmp_path / "run")
    demo = wd / CONFIG["data_root"]
    shutil.copytree(demo / "P2_S2", demo / "P4_S1", copy_function=shutil.copy2)
    sheet = (wd / CONFIG["samples"]).read_text().rstrip("\n").split("\n")
    row = next(line for line in sheet if line.startswith("P2_S2\t")).split("\t")
    row = [c.replace("P2_S2", "P4_S1") for c in row]
    row[1] = "P4"  # a new patient
    (wd / "config/samples_p4.tsv").write_text("\n".join(sheet + ["\t".join(row)]) + "\n")

    def change(config):
        config["samples"] = "config/samples_p4.tsv"
        # Real data, not the generated demo: the demo rule would own (and rewrite) every sample's files.
        config["demo"]["enabled"] = False
        config["splits"]["explicit"]["s2"]["train"].append("P4_S1")

    planned = dry_run(wd, write_config(tmp_path / "config.yaml", change))
    expected = {job(rule, sample="P4_S1") for rule in ("spots", "prepare_slide", "tile", "expression")}
    expected |= {job("panel", split="s2"), job("panel", split="all"), job("data_summary")} | model_jobs(MODELS, ["s2"])
    assert_plan(planned, expected | embed_jobs(["P4_S1"]))
    assert not [j for j in planned if ("split", "s1") in j[1]]


# --------------------------------------------------------------------------- reproducibility


def _h5_datasets(path):
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        attrs = {k: v for k, v in f.attrs.items() if k != "provenance"}
    return out, attrs


def _dense(x):
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def _assert_same_anndata(a, b, where):
    assert list(a.obs_names) == list(b.obs_names), where
    assert list(a.var_names) == list(b.var_names), where
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X), err_msg=f"{where}: X")
    assert set(a.layers) == set(b.layers), where
    for key in a.layers:
        np.testing.assert_array_equal(_dense(a.layers[key]), _dense(b.layers[key]), err_msg=f"{where}: layer {key}")
    pd.testing.assert_frame_equal(a.obs, b.obs, obj=f"{where}: obs")
    pd.testing.assert_frame_equal(a.var, b.var, obj=f"{where}: var")
    assert set(a.obsm) == set(b.obsm), where
    for key in a.obsm:
        np.testing.assert_array_equal(_dense(a.obsm[key]), _dense(b.obsm[key]), err_msg=f"{where}: obsm {key}")


def test_two_runs_from_scratch_are_identical(fast_run, tmp_path_factory):
    """Same config, same CPU results: bundles, expression, predictions and metrics.

    The second run is the SLURM run of test_slurm.py where a cluster can be started here,
    else a second local run.
    """
    import anndata

    other = second_run(tmp_path_factory)
    a, b = fast_run.workdir, other.workdir
    for sample in ST + HE:
        da, attrs_a = _h5_datasets(a / f"results/bundles/{sample}.h5")
        db, attrs_b = _h5_datasets(b / f"results/bundles/{sample}.h5")
        assert sorted(da) == sorted(db), sample
        for name in da:
            np.testing.assert_array_equal(da[name], db[name], err_msg=f"bundle {sample}: {name} ({other.kind} run)")
        assert attrs_a.keys() == attrs_b.keys()
        for key in attrs_a:
            np.testing.assert_array_equal(attrs_a[key], attrs_b[key], err_msg=f"bundle {sample}: attr {key}")
    for sample in ST:
        _assert_same_anndata(anndata.read_h5ad(a / f"results/expression/{sample}.h5ad"),
                             anndata.read_h5ad(b / f"results/expression/{sample}.h5ad"), f"expression {sample}")
    for split in ("s1", "s2", "all"):
        assert (a / f"results/genes/{split}.txt").read_text() == (b / f"results/genes/{split}.txt").read_text()
    assert (a / "results/metrics/summary.tsv").read_text() == (b / "results/metrics/summary.tsv").read_text(), \
        f"summary.tsv differs between the local and the {other.kind} run"
    for m in MODELS:
        for s in SPLITS:
            _assert_same_anndata(anndata.read_h5ad(a / f"results/metrics/{m}/{s}/predictions.h5ad"),
                                 anndata.read_h5ad(b / f"results/metrics/{m}/{s}/predictions.h5ad"),
                                 f"predictions {m}/{s}")
    _assert_same_anndata(anndata.read_h5ad(a / "results/predictions/P3_HE.h5ad"),
                         anndata.read_h5ad(b / "results/predictions/P3_HE.h5ad"), "predictions P3_HE")
