"""Space Ranger-style files of a demo slide: 10x HDF5 counts, spot positions, scale factors, images."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from PIL import Image
from scipy import sparse

from m2ost.atomic import atomic_path
from m2ost.data.demo.params import FIDUCIAL_DIAMETER_UM, MPP, SPOT_DIAMETER_UM


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: pd.DataFrame, sample: str) -> None:
    """10x Genomics HDF5 (v3 layout): genes x spots CSC matrix under ``matrix``."""
    csc = sparse.csc_matrix(counts.T)  # genes x spots; CSC = one column per barcode
    csc.sort_indices()
    n = len(genes)

    def strings(values):
        values = [str(v).encode() for v in values]
        return np.array(values, dtype=f"S{max(1, max(len(v) for v in values))}")

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["chemistry_description"] = np.bytes_("Spatial 3' v1")
        f.attrs["filetype"] = np.bytes_("matrix")
        f.attrs["library_ids"] = strings([sample])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        f.attrs["software_version"] = np.bytes_("m2ost-demo")
        f.attrs["version"] = np.int64(2)
        m = f.create_group("matrix")
        kw = dict(compression="gzip", compression_opts=4, shuffle=True)
        m.create_dataset("barcodes", data=strings(barcodes), **kw)
        m.create_dataset("data", data=csc.data.astype(np.int32), **kw)
        m.create_dataset("indices", data=csc.indices.astype(np.int64), **kw)
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64), **kw)
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        feat = m.create_group("features")
        feat.create_dataset("_all_tag_keys", data=strings(["genome"]))
        feat.create_dataset("feature_type", data=strings(["Gene Expression"] * n), **kw)
        feat.create_dataset("genome", data=strings(["DEMO"] * n), **kw)
        feat.create_dataset("id", data=strings(genes["gene_id"]), **kw)
        feat.create_dataset("name", data=strings(genes["gene"]), **kw)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def write_tsv(path: Path, df: pd.DataFrame, sep: str = "\t") -> None:
    write_text(path, df.to_csv(sep=sep, index=False, lineterminator="\n", float_format="%.6g"))


def _write_png(path: Path, image: np.ndarray, scale: float) -> None:
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    with atomic_path(path) as tmp:
        # Fast zlib level: these previews are incompressible grain anyway.
        Image.fromarray(image).resize(size, Image.Resampling.BOX).save(tmp, format="PNG", compress_level=1)


def write_visium(
    sample_dir: Path, sample: str, image: np.ndarray, feats: pd.DataFrame, counts: np.ndarray, genes: pd.DataFrame
) -> None:
    """Space Ranger-style ``outs/`` for one sample."""
    spatial = sample_dir / "outs" / "spatial"
    positions = feats[
        ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    ]
    write_tsv(spatial / "tissue_positions.csv", positions, sep=",")
    longest = max(image.shape[:2])
    scale = {
        "spot_diameter_fullres": SPOT_DIAMETER_UM / MPP,
        "tissue_hires_scalef": min(1.0, 2000 / longest),
        "fiducial_diameter_fullres": FIDUCIAL_DIAMETER_UM / MPP,
        "tissue_lowres_scalef": min(1.0, 600 / longest),
    }
    write_text(spatial / "scalefactors_json.json", json.dumps(scale, indent=4) + "\n")
    _write_png(spatial / "tissue_hires_image.png", image, scale["tissue_hires_scalef"])
    _write_png(spatial / "tissue_lowres_image.png", image, scale["tissue_lowres_scalef"])
    # Space Ranger lists filtered barcodes in sorted order, not in grid order.
    in_tissue = feats["in_tissue"].to_numpy() == 1
    order = np.argsort(feats.loc[in_tissue, "barcode"].to_numpy(), kind="stable")
    barcodes = feats.loc[in_tissue, "barcode"].to_numpy()[order]
    write_10x_h5(sample_dir / "outs" / "filtered_feature_bc_matrix.h5", counts[order], list(barcodes), genes, sample)
