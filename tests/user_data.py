"""Inputs as real users bring them: HEST-1k samples, Space Ranger's downscaled images, bad rows.

Every fixture is generated in the test, small, in exactly the layout of the real source:

- HEST-1k (mahmoodlab/HEST, ``hest.readers`` / ``HESTData``): a root with ``st/{id}.h5ad``
  (raw counts in X; obs ``in_tissue``, ``array_row``, ``array_col``, ``pxl_col_in_fullres``,
  ``pxl_row_in_fullres``; obsm["spatial"] = spot centres (x, y) in full-resolution px of the WSI;
  uns["spatial"]["ST"] with a downscaled image and its scale factor), ``wsis/{id}.tif`` (pyramidal
  TIFF) and ``metadata/{id}.json`` (``pixel_size_um_estimated``, ``spot_diameter``,
  ``inter_spot_dist`` in µm, ``st_technology``).
- Space Ranger ``outs/spatial`` with ``tissue_hires_image.png`` (robustness_helpers.visium_outs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from robustness_helpers import pyramid_slide, tissue_image, visium_hex


def hest_sample(root, sample_id: str, *, size: int = 1400, mpp: float = 0.5, blank: bool = False,
                seed: int = 0, genes: int = 8) -> dict:
    """One HEST-1k sample under ``root`` (st/, wsis/, metadata/)."""
    import anndata
    import scipy.sparse as sp

    from m2ost.data.pyramid import write_pyramidal_tiff

    root = Path(root)
    for folder in ("st", "wsis", "metadata"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    grid = visium_hex(4, 6, mpp, origin_px=(size - 1100 * 0.5 / mpp) / 2)
    n = len(grid)
    grid["in_tissue"] = 1
    grid.index = pd.Index([f"{'ACGT'[i % 4]}{i:04d}GATC-1" for i in range(n)])
    counts = np.random.default_rng(seed).poisson(30, (n, genes)).astype(np.float32)
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=grid,
                            var=pd.DataFrame(index=pd.Index([f"GENE{g}" for g in range(genes)])))
    adata.obsm["spatial"] = grid[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    down = 0.05
    adata.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": np.zeros((int(size * down),) * 2 + (3,),
                                                                              np.uint8)},
                                   "scalefactors": {"tissue_downscaled_fullres_scalef": down,
                                                    "spot_diameter_fullres": 55.0 / mpp}}}
    st = root / "st" / f"{sample_id}.h5ad"
    adata.write_h5ad(st)
    image = np.zeros((size, size, 3), np.uint8) if blank else tissue_image(size, size, seed)
    wsi = root / "wsis" / f"{sample_id}.tif"
    write_pyramidal_tiff(wsi, image, mpp, min_size=128, workers=1)
    meta = {"pixel_size_um_estimated": mpp, "pixel_size_um_embedded": mpp, "spot_diameter": 55.0,
            "inter_spot_dist": 100.0, "st_technology": "Visium", "species": "Homo sapiens",
            "fullres_px_width": size, "fullres_px_height": size, "spots_under_tissue": n}
    metadata = root / "metadata" / f"{sample_id}.json"
    metadata.write_text(json.dumps(meta))
    return {"root": root, "st": st, "wsi": wsi, "metadata": metadata, "n_spots": n}


def hires_png(outs: dict, fullres_px: tuple[int, int], scale: float) -> Path:
    """Space Ranger's ``tissue_hires_image.png``: the full-resolution image downscaled by ``scale``."""
    w, h = (max(1, round(d * scale)) for d in fullres_px)
    path = Path(outs["spatial"]) / "tissue_hires_image.png"
    Image.fromarray(tissue_image(h, w)).save(path)
    return path


def write_sheet(path, rows: list[dict]) -> Path:
    columns = ["sample", "patient", "slide", "format", "counts", "positions", "mpp"]
    extra = [c for r in rows for c in r if c not in columns]
    columns += list(dict.fromkeys(extra))
    lines = ["\t".join(columns)] + ["\t".join(str(r.get(c, "")) for c in columns) for r in rows]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


__all__ = ["hest_sample", "hires_png", "pyramid_slide", "visium_hex", "write_sheet"]
