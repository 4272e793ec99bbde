"""Large inputs: memory stays bounded, sparse data stays sparse, a broken slide does not sink a cohort.

Peak memory is the maximum resident set size of the stage's process, measured by a small
wrapper process that runs it and reads ``resource.getrusage(RUSAGE_CHILDREN)`` (so nothing the
test process itself did before is counted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from robustness_helpers import REPO, leftovers, visium_outs
from synthetic import subprocess_env

GIB = 1024 ** 3

MEASURE = textwrap.dedent("""
    # Run the command given as JSON, print its exit status and its peak RSS (bytes), as JSON.
    import json, resource, subprocess, sys
    cmd = json.loads(sys.argv[1])
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: kilobytes
    print(json.dumps({"status": done.returncode, "peak_bytes": peak, "stderr": done.stderr[-4000:]}))
""")


def measured(cmd: list, timeout: float = 900) -> dict:
    """Run ``cmd`` in a fresh wrapper process; its exit status, peak RSS and stderr tail."""
    wrapper = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([str(c) for c in cmd])], cwd=REPO,
                             env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert wrapper.returncode == 0, wrapper.stderr[-3000:]
    return json.loads(wrapper.stdout.strip().splitlines()[-1])


# =============================================================================================
# A slide of several gigapixels
# =============================================================================================

GENERATE = textwrap.dedent("""
    # Write a procedural H&E-coloured pyramid of HEIGHT x WIDTH px at 0.5 µm/px.
    import sys

    from m2ost.data.pyramid import write_pyramidal_tiff
    from slide_patterns import StainedStrips  # tests/ is on PYTHONPATH (subprocess_env)

    path, height, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    write_pyramidal_tiff(path, StainedStrips(height, width), 0.5, workers=2)
""")

GIGA_HEIGHT, GIGA_WIDTH = 48_000, 64_000  # 3.07 gigapixels, 9.2 GB of raw RGB


@pytest.mark.slow
def test_tiling_a_gigapixel_slide_stays_under_1_gib(tmp_path):
    slide = tmp_path / "giga.tif"
    gen = measured([sys.executable, "-c", GENERATE, slide, GIGA_HEIGHT, GIGA_WIDTH])
    assert gen["status"] == 0, gen["stderr"]
    # Writing the pyramid streams too: well under the 9.2 GB a full level 0 would take.
    assert gen["peak_bytes"] < GIB, f"pyramid writer peaked at {gen['peak_bytes'] / GIB:.2f} GiB"

    import openslide

    with openslide.OpenSlide(str(slide)) as s:
        assert s.dimensions == (GIGA_WIDTH, GIGA_HEIGHT) and s.level_count >= 7
    # 400 spots spread over the whole slide, the default views (112/224/448 µm, 224 px).
    xs, ys = np.meshgrid(np.linspace(1000, GIGA_WIDTH - 1000, 20), np.linspace(1000, GIGA_HEIGHT - 1000, 20))
    pd.DataFrame({"spot_id": [f"s{i}" for i in range(xs.size)], "x": xs.ravel(), "y": ys.ravel(),
                  "array_row": np.nan, "array_col": np.nan}).to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    (tmp_path / "info.json").write_text(json.dumps({"slide": str(slide), "mpp": 0.5, "mpp_source": "test"}))
    views = [{"fov_um": f, "size_px": 224} for f in (112, 224, 448)]
    out = tmp_path / "bundles" / "giga.h5"
    tile = measured([sys.executable, "-m", "m2ost", "tile", "--sample", "giga", "--slide-info", tmp_path / "info.json",
                     "--spots", tmp_path / "spots.tsv", "--settings", json.dumps({"views": views}), "--workers", 1,
                     "--no-progress", "--out", out])
    assert tile["status"] == 0, tile["stderr"]
    assert tile["peak_bytes"] < GIB, f"tiling peaked at {tile['peak_bytes'] / GIB:.2f} GiB"
    from m2ost.data.bundle import verify_bundle

    meta = verify_bundle(out, "giga")
    assert meta["n_spots"] == 400 and list(meta["levels"]) == [0, 1, 2]
    print(f"\ngigapixel slide: pyramid writer peak {gen['peak_bytes'] / 2**20:.0f} MiB, "
          f"tiling peak {tile['peak_bytes'] / 2**20:.0f} MiB")


# =============================================================================================
# A Visium-sized count matrix
# =============================================================================================

def write_sparse_10x_h5(path, n_spots: int, n_genes: int, genes_per_spot: int, seed: int = 0) -> list[str]:
    """A 10x HDF5 matrix (genes x spots, CSC) written straight from sparse data; returns the barcodes."""
    rng = np.random.default_rng(seed)
    indptr = np.arange(n_spots + 1, dtype=np.int64) * genes_per_spot
    # Sorted gene indices per spot, without a dense matrix: a random subset of each spot's genes.
    indices = np.empty(n_spots * genes_per_spot, np.int64)
    for s in range(n_spots):
        indices[indptr[s]:indptr[s + 1]] = np.sort(rng.choice(n_genes, genes_per_spot, replace=False))
    data = rng.geometric(0.4, indices.size).astype(np.int32)
    barcodes = [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(n_spots)]
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S18")
        m["data"], m["indices"], m["indptr"] = data, indices, indptr
        m["shape"] = np.array([n_genes, n_spots], dtype=np.int32)
        feat = m.create_group("features")
        feat["id"] = np.array([f"ENSG{i:011d}" for i in range(n_genes)], dtype="S15")
        feat["name"] = np.array([f"GENE{i:05d}" for i in range(n_genes)], dtype="S9")
        feat["feature_type"] = np.array([b"Gene Expression"] * n_genes)
        feat["genome"] = np.array([b"GRCh38"] * n_genes)
        feat["_all_tag_keys"] = np.array([b"genome"])
    return barcodes


@pytest.mark.slow
def test_expression_of_a_visium_sized_sample_stays_sparse_and_under_2_gib(tmp_path):
    n_spots, n_genes, per_spot = 5000, 18000, 2500  # 12.5 M counts, 14 % dense, as Visium
    barcodes = write_sparse_10x_h5(tmp_path / "matrix.h5", n_spots, n_genes, per_spot)
    side = int(np.ceil(np.sqrt(n_spots)))
    pd.DataFrame({"spot_id": barcodes, "x": 100.0 + 200 * (np.arange(n_spots) % side),
                  "y": 100.0 + 200 * (np.arange(n_spots) // side), "array_row": np.nan, "array_col": np.nan}
                 ).to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    out = tmp_path / "expression" / "V.h5ad"
    run = measured([sys.executable, "-m", "m2ost", "expression", "--sample", "V", "--format", "visium", "--counts",
                    tmp_path / "matrix.h5", "--spots", tmp_path / "spots.tsv", "--settings",
                    json.dumps({"min_counts": 10}), "--out", out])
    assert run["status"] == 0, run["stderr"]
    assert run["peak_bytes"] < 2 * GIB, f"expression stage peaked at {run['peak_bytes'] / GIB:.2f} GiB"
    import anndata
    import scipy.sparse as sp

    adata = anndata.read_h5ad(out, backed="r")
    try:
        assert adata.shape == (n_spots, n_genes)
        assert isinstance(adata.X, anndata.abc.CSRDataset) or sp.issparse(adata.X)
        with h5py.File(out, "r") as f:  # stored sparse, not as dense arrays
            assert f["X"].attrs["encoding-type"] == "csr_matrix"
            assert f["layers"]["counts"].attrs["encoding-type"] == "csr_matrix"
            assert f["X"]["data"].shape == (n_spots * per_spot,)
    finally:
        adata.file.close()
    print(f"\nVisium-sized expression stage: peak {run['peak_bytes'] / 2**20:.0f} MiB")


# =============================================================================================
# A cohort of 50 slides, one broken, through the data stages with --keep-going
# =============================================================================================

N_COHORT = 50
BROKEN = "S50"


def _damage_tiles(path) -> None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        spans = [(p.dataoffsets[i], p.databytecounts[i]) for p in tif.pages for i in range(len(p.dataoffsets))]
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset:offset + min(count, 32)] = b"\0" * min(count, 32)
    path.write_bytes(bytes(data))


def _cohort(root: Path) -> Path:
    """50 Visium-style samples of 10 patients: 640-px slides at 2 µm/px, 25 spots each; S50's tiles damaged."""
    from robustness_helpers import tissue_image

    from m2ost.data.pyramid import write_pyramidal_tiff

    data = root / "data"
    rows = []
    for i in range(1, N_COHORT + 1):
        name = f"S{i}"
        folder = data / name
        visium_outs(folder, n_rows=5, n_cols=5, mpp=2.0, seed=i, origin_px=120.0,
                    genes=tuple(f"G{g}" for g in range(12)))
        write_pyramidal_tiff(folder / "image.tif", tissue_image(640, 640, seed=i), 2.0, min_size=256, workers=1)
        rows.append(f"{name}\tP{(i - 1) // 5 + 1}\t{name}/image.tif\tvisium\t{name}/outs\t\t")
    _damage_tiles(data / BROKEN / "image.tif")
    sheet = root / "samples.tsv"
    sheet.write_text("sample\tpatient\tslide\tformat\tcounts\tpositions\tmpp\n" + "\n".join(rows) + "\n")
    config = {"samples": str(sheet), "data_root": str(data),
              "views": [{"fov_um": 100, "size_px": 16}, {"fov_um": 200, "size_px": 16}],
              "tiling": {"threads": 1}, "expression": {"min_counts": 1}}
    (root / "config.yaml").write_text(json.dumps(config))
    return root / "config.yaml"


@pytest.mark.slow
def test_cohort_of_50_slides_with_one_broken_keeps_going(tmp_path):
    config = _cohort(tmp_path)
    samples = [f"S{i}" for i in range(1, N_COHORT + 1)]
    targets = [f"results/bundles/{s}.h5" for s in samples] + [f"results/expression/{s}.h5ad" for s in samples]
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "-d", tmp_path,
                          "--configfile", config, "--cores", "2", "--keep-going", "--show-failed-logs", *targets],
                         capture_output=True, text=True, timeout=1800, env=subprocess_env())
    report = run.stdout + run.stderr
    assert run.returncode != 0, "the broken slide must fail the run"
    # The failure names the rule and the output, and shows the log whose last line is the reason.
    assert "Error in rule tile" in report and f"output: results/bundles/{BROKEN}.h5" in report, report[-4000:]
    assert report.count("Error in rule") == 1, report[-4000:]
    reason = (f"m2ost: error: [sample {BROKEN}, file {tmp_path / 'data' / BROKEN / 'image.tif'}] cannot decode the "
              "slide's pixels (")
    log = (tmp_path / "logs" / "tile" / f"{BROKEN}.log").read_text()
    assert log.strip().splitlines()[-1].startswith(reason) and "Traceback" not in log
    assert reason in report  # --show-failed-logs: the user sees it in Snakemake's own output

    from m2ost.data.bundle import verify_bundle
    from m2ost.data.expression import read_expression

    bundles = tmp_path / "results" / "bundles"
    assert leftovers(bundles) == sorted(f"{s}.h5" for s in samples if s != BROKEN)
    for s in samples:
        if s != BROKEN:
            assert verify_bundle(bundles / f"{s}.h5", s)["n_spots"] == 25
        # The expression stage does not read the slide: every sample's file is complete.
        assert read_expression(tmp_path / "results" / "expression" / f"{s}.h5ad", s).n_obs == 25
