"""Tiny synthetic spot bundles and expression files, in the formats of the pipeline.

``write_bundle`` writes ``results/bundles/{sample}.h5`` and ``write_expression`` writes
``results/expression/{sample}.h5ad`` exactly as the tiling and expression stages describe them,
small enough for tests that train a network in seconds. The expression is a function of the
spot's colour, so models have something to learn.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np

N_GENES = 8
VIEW_SIZE = 32
FOV_UM = (55.0, 110.0, 220.0)


def _tiny_model() -> dict:
    """The model's ``tiny`` variant (meant for CPU tests). While its preset does not build
    (mlp_dim=64 is not divisible by 3 in the variant table at the time of writing), the nearest
    size that does; the model's own tests flag the preset itself."""
    from m2ost.model import build_model

    try:
        build_model({"variant": "tiny"}, 2, 3, VIEW_SIZE)
        return {"variant": "tiny"}
    except ValueError:
        return {"variant": "tiny", "mlp_dim": 96}


TINY_MODEL = _tiny_model()


def spot_images(rng: np.random.Generator, n_spots: int, n_views: int, size: int,
                identical_views: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-view uint8 arrays (n_spots, size, size, 3) and the latent colour (n_spots, 3).

    Each image has an asymmetric motif (a bright corner block and a gradient) so that flips
    and rotations change it.
    """
    z = rng.uniform(0.2, 0.8, (n_spots, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    views = []
    for v in range(1 if identical_views else n_views):
        img = z[:, None, None, :] * (1.0 - 0.15 * v)
        img = img + 0.15 * xx[None, :, :, None] - 0.1 * yy[None, :, :, None]
        img[:, : size // 4, : size // 3, :] += 0.2  # top-left motif
        img = img + rng.normal(0, 0.03, img.shape)
        views.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    if identical_views:
        views = [views[0].copy() for _ in range(n_views)]
    return views, z


def write_bundle(path, sample: str, views: list[np.ndarray], coords: np.ndarray,
                 barcodes: list[str], padded: np.ndarray | None = None,
                 fov_um=FOV_UM, mpp: float = 0.5, format_version: int = 3) -> Path:
    """Write a spot bundle in the layout of ``results/bundles/{sample}.h5``, by hand.

    ``coords``: the spot centres. Format 3 stores them as ``centers`` and the top-left corner of
    view 0 as ``coords`` (HEST's meaning); format 2 (the layout before) stored the centres as
    ``coords``.
    """
    from m2ost.data.bundle import DIGEST_ALGORITHM, spot_digest

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n, n_views = len(barcodes), len(views)
    padded = np.zeros((n, n_views), bool) if padded is None else padded
    with h5py.File(path, "w") as f:
        for v, arr in enumerate(views):
            s = arr.shape[1]
            f.create_dataset(f"view_{v}", data=arr, chunks=(1, s, s, 3))
        f["img"] = f["view_0"]  # hard link, HEST layout
        f.create_dataset("barcode", data=np.array(barcodes, dtype=object),
                         dtype=h5py.string_dtype())
        centers = np.asarray(coords, np.int64)
        if format_version >= 3:
            half = int(round(list(fov_um)[0] / mpp)) // 2
            f.create_dataset("coords", data=centers - half)
            f.create_dataset("centers", data=centers)
        else:
            f.create_dataset("coords", data=centers)
        f.create_dataset("padded", data=padded)
        f.create_dataset("tissue_fraction", data=np.ones(n, np.float32))
        f.create_dataset("spot_digest", data=np.array(
            [spot_digest([arr[i] for arr in views]) for i in range(n)], dtype=np.uint64))
        f.attrs.update({"n_views": n_views, "n_spots": n, "mpp": mpp, "format_version": format_version,
                        "digest_algorithm": DIGEST_ALGORITHM,
                        "fov_um": list(fov_um)[:n_views],
                        "size_px": [int(a.shape[1]) for a in views], "sample": sample,
                        "provenance": json.dumps({"synthetic": True})})
    return path


def write_expression(path, sample: str, barcodes: list[str], rows: np.ndarray,
                     x: np.ndarray, genes: list[str], coords: np.ndarray,
                     depth: tuple[np.ndarray, float] | None = None) -> Path:
    """Write an expression file in the layout of ``results/expression/{sample}.h5ad``; ``depth``:
    the spots' library sizes and the target sum of x = log1p(counts / library size * target sum),
    recorded as the expression stage does."""
    import anndata
    import pandas as pd
    from scipy import sparse

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = np.round(np.expm1(x) * 10).astype(np.float32)
    obs = pd.DataFrame({"bundle_row": np.asarray(rows, np.int64)},
                       index=pd.Index([barcodes[r] for r in rows]))
    adata = anndata.AnnData(X=sparse.csr_matrix(x.astype(np.float32)), obs=obs,
                            var=pd.DataFrame(index=pd.Index(genes)),
                            layers={"counts": sparse.csr_matrix(counts)},
                            obsm={"spatial": np.asarray(coords, np.float64)[rows]})
    adata.uns["m2ost"] = json.dumps({"sample": sample, "synthetic": True})
    if depth is not None:
        adata.obs["total_counts"] = np.asarray(depth[0], np.float64)
        adata.uns["m2ost"] = {"sample": sample, "synthetic": True, "target_sum": float(depth[1])}
    adata.write_h5ad(path)
    return path


def expression_of(z: np.ndarray, rng: np.random.Generator, n_genes: int = N_GENES,
                  zero_gene: bool = True) -> np.ndarray:
    """log1p-like targets driven by the latent colour; the last gene is all zeros if asked."""
    w = np.random.default_rng(123).normal(0, 1.5, (3, n_genes))  # same genes in every sample
    x = np.log1p(np.exp(z @ w + rng.normal(0, 0.1, (len(z), n_genes))))
    if zero_gene:
        x[:, -1] = 0.0
    return x.astype(np.float32)


def make_sample(root, sample: str, n_spots: int = 20, n_views: int = 3, size: int = VIEW_SIZE,
                seed: int = 0, identical_views: bool = False, padded_rows=(),
                expression_rows=None, extra_genes: int = 2) -> dict:
    """Write one sample's bundle and expression under ``root``; return their paths and data."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    views, z = spot_images(rng, n_spots, n_views, size, identical_views)
    barcodes = [f"{sample}_s{i:03d}" for i in range(n_spots)]
    side = int(np.ceil(np.sqrt(n_spots)))
    coords = np.array([(1000 + 100 * (i % side), 2000 + 100 * (i // side))
                       for i in range(n_spots)])
    padded = np.zeros((n_spots, n_views), bool)
    for r in padded_rows:
        padded[r, -1] = True
    bundle = write_bundle(root / "bundles" / f"{sample}.h5", sample, views, coords, barcodes,
                          padded)
    rows = np.arange(n_spots) if expression_rows is None else np.asarray(expression_rows)
    genes = panel_genes() + [f"EXTRA{i}" for i in range(extra_genes)]
    x_all = expression_of(z, rng)
    x = np.concatenate([x_all, rng.uniform(0, 1, (n_spots, extra_genes))], 1)[rows]
    expr = write_expression(root / "expression" / f"{sample}.h5ad", sample, barcodes, rows, x,
                            genes, coords)
    return {"bundle": str(bundle), "expression": str(expr), "views": views, "z": z,
            "barcodes": barcodes, "rows": rows, "x": x[:, :N_GENES], "coords": coords}


def panel_genes(n: int = N_GENES) -> list[str]:
    return [f"G{i}" for i in range(n)]


def write_genes(path, genes: list[str]) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(genes) + "\n")
    return str(path)


def make_study(root, samples: dict[str, int] | None = None, **kwargs) -> dict:
    """Several samples (name -> seed); returns bundles, expressions, genes_file, genes."""
    samples = samples or {"A": 1, "B": 2, "C": 3}
    out = {"bundles": {}, "expressions": {}, "data": {}}
    for name, seed in samples.items():
        d = make_sample(root, name, seed=seed, **kwargs)
        out["bundles"][name] = d["bundle"]
        out["expressions"][name] = d["expression"]
        out["data"][name] = d
    out["genes"] = panel_genes()
    out["genes_file"] = write_genes(Path(root) / "genes" / "panel.txt", out["genes"])
    return out


def embed_study(study: dict, root, encoder_cfg: dict) -> dict:
    """Embeddings of every sample of ``study`` by the encoder of ``encoder_cfg``, in ``root``:
    {"files": sample -> path, "encoder": the Encoder, "root": root}."""
    from m2ost.learn.features.embeddings import write_embeddings
    from m2ost.learn.features.encoders import load_encoder

    encoder = load_encoder(encoder_cfg, "cpu")
    files = {}
    for s, bundle in study["bundles"].items():
        files[s] = str(Path(root) / f"{s}.h5")
        write_embeddings(encoder, bundle, files[s], sample=s, batch_size=16, progress=False)
    return {"files": files, "encoder": encoder, "root": Path(root)}


def tiny_train_cfg(**overrides) -> dict:
    """Training settings for second-long CPU runs."""
    cfg = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01, "workers": 0,
           "val_fraction": 0.2, "patience": 0, "seed": 7, "device": "cpu",
           "drop_padded": True, "augment": {"flip": True, "rot90": True, "color_jitter": 0.1},
           "scheduler": "cosine", "warmup_epochs": 0.5, "progress": False}
    cfg.update(overrides)
    return cfg


def subprocess_env() -> dict:
    """Environment for child Python processes: the repository importable, one thread, and this
    interpreter's bin folder first on PATH (a workflow's rules call ``python``)."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(repo), str(repo / "tests"), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def poison_network_after(monkeypatch, calls: int) -> None:
    """Make the trainer's network return NaN from its ``calls``-th training forward pass on
    (evaluation passes are left alone), to test what a diverged training does."""
    import torch

    import m2ost.learn.training.trainer as trainer

    build = trainer.build_network

    class Poisoned(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            y = self.inner(x)
            if self.training:
                self.calls += 1
                if self.calls >= calls:
                    return y * float("nan")
            return y

    monkeypatch.setattr(trainer, "build_network", lambda *a: Poisoned(build(*a)))
