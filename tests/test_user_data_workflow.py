"""Real users' runs through the real ``snakemake`` command (issue 11): a one-slide HEST-1k sheet runs
its data stages; bad inputs print their one-line error on the terminal; a sheet of H&E-only slides
with predict.model_path is a complete run; layered config files print the splits they merge into;
absolute paths and Space Ranger's hires image plan.

Each run is small (data stages only, tiny inputs); the plans are dry runs (seconds).
"""

from __future__ import annotations

import json
import re

import pytest
import tifffile
import yaml
from realdata import SVS
from robustness_helpers import tissue_image, visium_outs
from user_data import hest_sample, write_sheet
from workflow_helpers import FAST_CONFIG, REPO, copy_repo, parse_dry_run, snakemake

VIEWS = [{"fov_um": 112, "size_px": 32}, {"fov_um": 224, "size_px": 32}]


def _config(path, sheet, data_root, **changes):
    config = {"samples": str(sheet), "data_root": str(data_root), "demo": {"enabled": False}, "views": VIEWS,
              "expression": {"min_counts": 10}, "panel": {"n_genes": 4}, "models": ["mean"],
              "train": {"epochs": 1, "workers": 0}}
    config.update(changes)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return copy_repo(tmp_path_factory.mktemp("userdata") / "repo", commit=False)


def test_one_slide_hest_sheet_runs_its_data_stages(workdir, tmp_path):
    """One HEST-1k sample, no split possible: planning says so and runs spots, slide, tiles,
    expression and the data-quality table, printed on the terminal."""
    data = tmp_path / "data"
    h = hest_sample(data / "hest", "NCBI1", size=1400)
    sheet = write_sheet(tmp_path / "one.tsv", [{"sample": "H1", "patient": "P1", "slide": "", "format": "hest",
                                                "counts": str(data / "hest"), "hest_id": "NCBI1"}])
    config = _config(tmp_path / "one.yaml", sheet, data)
    proc = snakemake(workdir, "--cores", "2", "--configfile", str(config), timeout=600)
    out = proc.stdout
    assert "m2ost: no training or evaluation (leave-one-patient-out needs at least 2" in out
    assert re.search(r"m2ost: data quality per sample .*\n.*median_library_size.*\n\s*H1\s+24\s+24\s", out), out[-3000:]
    info = json.loads((workdir / "results/slides/H1.json").read_text())
    assert info["mpp"] == pytest.approx(0.5) and info["mpp_source"] == "slide metadata"
    assert "HEST metadata 0.5000" in (workdir / "logs/prepare_slide/H1.log").read_text()
    assert (workdir / "results/bundles/H1.h5").is_file() and (workdir / "results/expression/H1.h5ad").is_file()
    assert not (workdir / "results/models").exists()
    assert h["n_spots"] == 24


def _bad_inputs(root):
    """Four samples, each broken in one way a user meets, and the error each must print."""
    from m2ost.data.pyramid import write_pyramidal_tiff

    v = visium_outs(root / "V1")
    v["scalefactors"].write_text(json.dumps({"tissue_hires_scalef": 0.1}))
    (root / "L1").mkdir()
    tifffile.imwrite(root / "L1" / "he.tif", tissue_image(200, 200))  # no resolution tags
    (root / "L1" / "sel.tsv").write_text("x\ty\tpixel_x\tpixel_y\n" + "".join(
        f"{c}\t{r}\t80\t80\n" for r in range(1, 4) for c in range(1, 4)))
    (root / "L1" / "counts.tsv").write_text("\tG1\tG2\n" + "".join(f"{c}x{r}\t20\t30\n" for r in range(1, 4)
                                                                  for c in range(1, 4)))
    h = hest_sample(root / "hest", "BLACK", size=1400, blank=True)
    write_pyramidal_tiff(root / "M1.tif", tissue_image(400, 400), 0.5, min_size=128, workers=1)
    rows = [{"sample": "V1", "patient": "P1", "slide": "V1/he.tif", "format": "visium", "counts": "V1/outs"},
            {"sample": "L1", "patient": "P2", "slide": "L1/he.tif", "format": "legacy_st",
             "counts": "L1/counts.tsv", "positions": "L1/sel.tsv"},
            {"sample": "B1", "patient": "P3", "slide": "", "format": "hest", "counts": "hest", "hest_id": "BLACK"},
            {"sample": "M1", "patient": "P4", "slide": "M1.tif", "mpp": "500"}]
    write_pyramidal_tiff(root / "V1" / "he.tif", tissue_image(1400, 1400), 0.5, min_size=128, workers=1)
    expected = {"V1": (v["scalefactors"], "scalefactors lacks spot_diameter_fullres"),
                "L1": (root / "L1" / "he.tif", "degenerate spot grid: 9 spots on 1 distinct pixel"),
                "B1": (h["wsi"], "the slide is blank under every spot"),
                "M1": (root / "M1.tif", "resolution 500 µm/px from the sample sheet is outside the plausible range")}
    return rows, expected


def test_bad_inputs_print_their_error_line_on_the_terminal(workdir, tmp_path):
    """Four bad samples in one run (keep-going): each failed job's ``[sample, file] problem`` line
    is on Snakemake's terminal output, not only in logs/."""
    data = tmp_path / "bad"
    data.mkdir()
    rows, expected = _bad_inputs(data)
    sheet = write_sheet(tmp_path / "bad.tsv", rows)
    config = _config(tmp_path / "bad.yaml", sheet, data)
    targets = [f"results/bundles/{s}.h5" for s in expected]
    proc = snakemake(workdir, *targets, "--cores", "2", "--keep-going", "--configfile", str(config), check=False,
                     timeout=600)
    assert proc.returncode != 0
    for sample, (file, problem) in expected.items():
        line = f"m2ost: error: [sample {sample}, file {file}] "
        found = [x for x in proc.stdout.splitlines() if x.startswith(line)]
        assert found and problem in found[0], (sample, proc.stdout[-4000:])


def test_profiles_show_failed_logs():
    """The SLURM run shows a failed job's log (whose last line is the error) on the terminal."""
    for name in ("default", "slurm"):
        profile = yaml.safe_load((REPO / "workflow/profiles" / name / "config.yaml").read_text())
        assert profile["show-failed-logs"] is True


@pytest.fixture(scope="module")
def mean_model_file(tmp_path_factory):
    """A model trained elsewhere: the mean baseline of a synthetic study (views 55/110/220 µm, 32 px)."""
    from synthetic import make_study, tiny_train_cfg

    from m2ost.learn.training.fit_on_views import fit_model

    study = make_study(tmp_path_factory.mktemp("elsewhere"))
    out = tmp_path_factory.mktemp("model")
    fit_model("mean", study["bundles"], study["expressions"], study["genes_file"], ["A", "B"], None,
              tiny_train_cfg(), out)
    return out / "model.pt"


def test_sheet_of_he_slides_with_a_given_model_is_a_complete_run(workdir, tmp_path, mean_model_file):
    """predict.model_path: the real SVS (H&E only) is predicted with a model trained elsewhere and
    nothing is trained; the sheet uses an absolute path."""
    if not SVS.is_file():
        pytest.skip(f"real slide not found at {SVS} (../shared/data)")
    from synthetic import FOV_UM, VIEW_SIZE

    sheet = write_sheet(tmp_path / "he.tsv", [{"sample": "CMU1", "patient": "X", "slide": str(SVS)}])
    config = _config(tmp_path / "he.yaml", sheet, tmp_path, views=[{"fov_um": f, "size_px": VIEW_SIZE}
                                                                   for f in FOV_UM],
                     predict={"model_path": str(mean_model_file), "spot_spacing_um": 200})
    proc = snakemake(workdir, "--cores", "2", "--configfile", str(config), timeout=600)
    assert f"m2ost: predicting 1 H&E-only sample(s) with {mean_model_file}; training nothing" in proc.stdout
    import anndata

    pred = anndata.read_h5ad(workdir / "results/predictions/CMU1.h5ad")
    assert pred.n_obs > 10 and pred.n_vars > 0
    assert "rule train" not in proc.stdout and not (workdir / "results/models").exists()


def test_layered_config_files_print_the_splits_they_merge_into(workdir, tmp_path):
    """Two --configfile files with explicit splits: Snakemake merges them into the union, and the
    run says so at the start (four splits here, not the two of either file)."""
    first = tmp_path / "a.yaml"
    second = tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"splits": {"scheme": "explicit", "explicit": {
        "x1": {"train": ["P1_S1"], "test": ["P2_S1"]}, "x2": {"train": ["P1_S2"], "test": ["P2_S2"]}}}}))
    second.write_text(yaml.safe_dump({"splits": {"explicit": {"y1": {"train": ["P2_S1"], "test": ["P1_S1"]}}}}))
    proc = snakemake(workdir, "-n", "--configfile", FAST_CONFIG, str(first), str(second))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("m2ost: ") and "split(s)" in x)
    assert line.startswith("m2ost: 5 split(s) of scheme explicit: ")
    for name in ("s1", "s2", "x1", "x2", "y1"):
        assert f"{name} (train " in line


def test_absolute_paths_and_hires_image_plan(workdir, tmp_path):
    """A demo sheet with one absolute path plans (it once crashed: "Can't mix absolute and relative
    paths"); a Visium row whose slide is tissue_hires_image.png reads its spots scaled."""
    demo = yaml.safe_load((REPO / FAST_CONFIG).read_text())
    root = workdir / demo["data_root"]
    rows = [line.split("\t") for line in (REPO / demo["samples"]).read_text().splitlines()]
    header, body = rows[0], rows[1:]
    body[0][header.index("slide")] = str(root / body[0][header.index("slide")])
    body[1][header.index("slide")] = body[1][header.index("slide")].replace("image.tif",
                                                                            "outs/spatial/tissue_hires_image.png")
    sheet = tmp_path / "abs.tsv"
    sheet.write_text("\n".join("\t".join(r) for r in [header, *body]) + "\n")
    config = tmp_path / "abs.yaml"
    config.write_text(yaml.safe_dump({**demo, "samples": str(sheet)}))  # data_root stays relative
    proc = snakemake(workdir, "-n", "-p", "--configfile", str(config))
    planned = parse_dry_run(proc.stdout)
    assert any(rule == "demo_cohort" for rule, _ in planned)
    hires = body[1][0]
    assert re.search(rf"m2ost spots --sample {hires} .*--slide-scale tissue_hires_scalef", proc.stdout)
    assert re.search(rf"m2ost convert-slide --sample {hires} .*--scalefactors .*--slide-scale tissue_hires_scalef",
                     proc.stdout)
