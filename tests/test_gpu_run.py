"""benchmarks/gpu_run.sh end to end in its tiny CPU setting, on the real HER2+ sections: the
prepared data, every phase, and the few files that come back from a GPU machine."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import h5py
import pytest
from realdata import REPO, SHARED_DATA, needs_her2st
from synthetic import subprocess_env

sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_support import Run, load_config, merge


def real_run(test):
    """The end-to-end run's tests: 99 s of CPU, 182 s of wall time at load 10 on 2 cores."""
    return needs_her2st(pytest.mark.slow(test))


OUTPUTS = {"summary.json", "summary.md", "epochs.tsv", "per_gene.tsv", "logs.txt", "run.log", "console.log"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_run")
    env = subprocess_env()
    env.update(M2OST_DATA=str(SHARED_DATA), M2OST_GPU_WHEELS="0", M2OST_GPU_RUN_TINY="1",
               M2OST_GPU_DATA=str(root / "data"), M2OST_GPU_WORK=str(root / "work"), PYTHON=sys.executable)
    env.pop("OMP_NUM_THREADS", None)
    prep = subprocess.run(["bash", str(REPO / "benchmarks/gpu_prepare.sh"), str(root / "data")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert prep.returncode == 0, prep.stderr
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu_run.sh"), str(root / "out")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, json.loads((root / "out" / "summary.json").read_text())


@real_run
def test_prepare_copies_the_five_sections(tiny_run):
    root, _ = tiny_run
    her2st = root / "data" / "her2st"
    for s in ("B4", "C2", "C3", "C4", "C5"):
        assert (her2st / "images" / "HE" / f"{s}.jpg").stat().st_size > 1_000_000
        assert (her2st / "count-matrices" / f"{s}.tsv.gz").is_file()
        assert (her2st / "spot-selections" / f"{s}_selection.tsv").is_file()
    assert len((her2st / "gene-panels" / "m2ost_250.txt").read_text().split()) == 250


@real_run
def test_every_phase_ran_and_the_outputs_are_flat(tiny_run):
    root, summary = tiny_run
    out = root / "out"
    assert {p.name for p in out.iterdir()} == OUTPUTS  # at most 8 files come back, no folders
    phases = summary["phases"]
    assert summary["phase_order"] == ["install", "cuda_tests", "data", "ddp", "train", "measure"]
    assert {name: p["status"] for name, p in phases.items()} == dict.fromkeys(phases, "ok"), phases
    assert summary["tiny"] is True and summary["machine"]["torch"]
    assert summary["versions"]["anndata"] and phases["install"]["check"] and "passed" in summary["cuda_tests"]
    assert "| loso-B4 | m2ost |" in (out / "summary.md").read_text()


@real_run
def test_bundles_at_the_paper_fields_of_view(tiny_run):
    root, summary = tiny_run
    assert set(summary["phases"]["data"]["bundle_mib"]) == {"B4", "C2"}
    with h5py.File(root / "work" / "results" / "bundles" / "B4.h5") as f:
        assert int(f.attrs["n_views"]) == 3
        assert [f[f"view_{v}"].shape[1:] for v in range(3)] == [(32, 32, 3)] * 3
        assert f["view_0"].shape[0] == 24
        fov = [float(v) for v in f.attrs["fov_um"]]
    assert fov[1] == pytest.approx(2 * fov[0], rel=1e-3) and fov[2] == pytest.approx(4 * fov[0], rel=1e-3)


@real_run
def test_training_evaluation_and_torchrun_check(tiny_run):
    root, summary = tiny_run
    assert set(summary["evaluation"]) == {"m2ost/loso-B4", "m2ost_single/loso-B4", "m2ost/lopo-C"}
    for key, e in summary["evaluation"].items():
        assert summary["training"][key]["epochs_run"] == 1
        assert e["n_spots"] > 10 and math.isfinite(e["mean"]["gene_pcc_mean"]), key
    check = summary["phases"]["train"]["torchrun_check"]
    assert check["same"] and check["rel_diff"] == 0.0  # deterministic on the CPU
    with open(root / "out" / "epochs.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert {r["run"] for r in rows} == {*summary["evaluation"], "m2ost/loso-B4 (torchrun)"}
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    with open(root / "out" / "per_gene.tsv", newline="") as f:
        genes = list(csv.DictReader(f, delimiter="\t"))
    assert len(genes) == 3 * 250 and {g["split"] for g in genes} == {"loso-B4", "lopo-C"}


@real_run
def test_throughput_loader_wait_and_compile_measured(tiny_run):
    _, summary = tiny_run
    m = summary["measure"]
    assert m["variant"] == "tiny" and m["device"] == "cpu" and not m.get("errors") and not m["skipped"]
    modes = {(r["mode"], r["batch"]) for r in m["throughput"]}
    assert modes == {("eager", 8), ("compiled", 8)}
    assert all(r["train_spots_s"] > 0 and r["infer_spots_s"] > 0 for r in m["throughput"])
    (loader,) = m["loader"]
    assert loader["workers"] == 1 and 0 <= loader["wait_share"] <= 1 and loader["spots_s"] > 0
    assert m["recompile_odd_batch"]["batch"] == 5


def test_a_failed_phase_is_logged_and_the_next_runs(tmp_path):
    run = Run(tmp_path, 60, {"a": 1, "b": 1, "c": 1}, {})

    def broken(budget):
        raise RuntimeError("no such thing")
    run.phase("a", broken)
    run.phase("b", lambda budget: {"budget_seen": budget})
    run.deadline = run.t0  # no time left
    run.phase("c", lambda budget: {})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["phases"]["a"]["status"] == "failed" and "no such thing" in summary["phases"]["a"]["error"]
    assert summary["phases"]["b"]["status"] == "ok" and 25 < summary["phases"]["b"]["budget_seen"] <= 30
    assert summary["phases"]["c"]["status"] == "skipped"
    assert "phase a: failed" in (tmp_path / "run.log").read_text()
    assert os.path.getsize(tmp_path / "summary.json") > 0


def test_the_run_trains_with_the_workflows_settings():
    """gpu_run.py fills the schema's defaults itself (no snakemake on the GPU machine): the same
    configuration as snakemake's validation of the two config files."""
    import yaml
    from snakemake.utils import validate

    files = [REPO / "config/her2st.yaml", REPO / "benchmarks/her2st_gpu.yaml"]
    config = merge(yaml.safe_load(files[0].read_text()), yaml.safe_load(files[1].read_text()))
    validate(config, str(REPO / "m2ost/schemas/config.schema.yaml"), set_default=True)
    assert load_config(*files) == config
    assert config["model"] == {"variant": "paper"} and [v["size_px"] for v in config["views"]] == [224] * 3
    assert [v["fov_px"] for v in config["views"]] == [224, 448, 896]


@needs_her2st
def test_the_gpu_setting_plans_the_paper_runs(tmp_path, monkeypatch):
    """What the GPU machine will run, checked here: five sections, the paper's views, the four
    trainings first, the measurement's arguments, and epochs sized to the budget."""
    import gpu_measure
    import gpu_run

    monkeypatch.setattr(gpu_run, "TINY", False)
    run = gpu_run.GpuRun(tmp_path / "out", SHARED_DATA, tmp_path / "work", sys.executable, 420)
    assert sorted(run.samples) == ["B4", "C2", "C3", "C4", "C5"]
    assert run.cfg["model"] == {"variant": "paper"} and run.cfg["train"]["batch_size"] == 64
    assert {s: len(v["train"]) for s, v in run.splits.items()} == {
        "loso-B4": 4, "lopo-C": 1, "loso-C2": 4, "loso-C3": 4, "loso-C4": 4, "loso-C5": 4}
    assert "extra" in run.run.weights
    args = gpu_measure.parser().parse_args([*gpu_run.GPU_MEASURE, "--json", "m.json"])
    assert args.variant == "paper" and args.img_size == 224 and 512 in args.batches
    run.calibration = {"epoch_s": 2.0, "startup_s": 20.0}
    assert run.epochs_for(150, 4) == int((0.8 * 150 - 60) / (2.0 * 1.75))
    assert run.epochs_for(10_000, 4) == 100 and run.epochs_for(10, 4) == 1

