"""Gene panel: the genes a model predicts, chosen from the training samples only.

Methods: ``list`` (a fixed file), ``top_mean`` (highest mean normalised expression),
``hvg`` (scanpy highly variable genes, batch-aware across samples), ``moran`` (spatially
variable genes by Moran's I, squidpy, averaged over samples). Candidates are restricted to
genes present in every sample of the split (training and held-out) so evaluation is possible.
"""

from __future__ import annotations

import logging

import numpy as np

from m2ost import defaults
from m2ost.atomic import atomic_path
from m2ost.errors import InputError

log = logging.getLogger(__name__)

METHODS = ("list", "top_mean", "hvg", "moran")


def read_gene_list(path, sample: str | None = None) -> list[str]:
    try:
        with open(path) as handle:
            genes = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    except OSError as err:
        raise InputError(f"cannot read gene panel: {err.strerror}", file=path, sample=sample) from None
    if not genes:
        raise InputError("gene panel file is empty", file=path, sample=sample)
    seen, dups = set(), []
    for g in genes:
        if g in seen:
            dups.append(g)
        seen.add(g)
    if dups:
        raise InputError(f"gene panel lists {len(dups)} gene(s) twice, e.g. {', '.join(dups[:3])}",
                         file=path, sample=sample)
    return genes


def _load(paths: dict[str, str]):
    from m2ost.data.expression import read_expression

    return {s: read_expression(p, s) for s, p in paths.items()}


def common_genes(adatas: dict) -> list[str]:
    names = None
    for adata in adatas.values():
        current = set(adata.var_names)
        names = current if names is None else names & current
    first = next(iter(adatas.values()))
    return [g for g in first.var_names if g in names]


def select_panel(method: str, n_genes: int, train: dict[str, str], others: dict[str, str] | None = None,
                 list_file=None, min_spot_fraction: float | None = None, seed: int = 0) -> list[str]:
    """Choose the panel.

    Parameters
    ----------
    train, others
        sample -> expression file for the training samples and the other samples of the split.
    min_spot_fraction
        Data-driven methods only consider genes detected in at least this fraction of training spots
        (default: the workflow's, ``panel.min_spot_fraction``).
    """
    if min_spot_fraction is None:
        min_spot_fraction = defaults.section("panel")["min_spot_fraction"]
    if method not in METHODS:
        raise InputError(f"unknown gene panel method {method!r}; use one of {', '.join(METHODS)}")
    adatas = _load({**train, **(others or {})})
    candidates = common_genes(adatas)
    if method == "list":
        return _listed_panel(list_file, adatas, candidates)
    train_data = _detected_training_data(adatas, train, candidates, min_spot_fraction, n_genes)
    score = _scores(method, train_data, adatas, list(train), n_genes)
    order = np.argsort(-score, kind="stable")[:n_genes]
    genes = [train_data.var_names[i] for i in sorted(order)]
    log.info("panel (%s): %d genes from %d candidates in %d training samples", method, len(genes),
             len(candidates), len(train))
    return genes


def _listed_panel(list_file, adatas: dict, candidates: list[str]) -> list[str]:
    """The genes of the list file, each present in every sample (a missing one names its sample)."""
    genes = read_gene_list(list_file)
    present = set(candidates)
    for sample, adata in adatas.items():
        names = set(adata.var_names)
        missing = [g for g in genes if g not in names]
        if missing:
            upper = {n.upper(): n for n in names}
            cased = [(g, upper[g.upper()]) for g in missing if g.upper() in upper]
            hint = (f" (letter case differs, e.g. {cased[0][0]} vs {cased[0][1]} in the data)"
                    if cased else "")
            raise InputError(f"{len(missing)} of {len(genes)} panel genes missing from this sample, e.g. "
                             f"{', '.join(missing[:5])}{hint}", file=list_file, sample=sample)
    return [g for g in genes if g in present]


def _detected_training_data(adatas: dict, train: dict, candidates: list[str], min_spot_fraction: float,
                            n_genes: int):
    """The training samples concatenated, on the candidates detected in ``min_spot_fraction`` of spots."""
    import anndata

    train_data = anndata.concat([adatas[s][:, candidates] for s in train], label="sample",
                                keys=list(train), index_unique="-")
    detected = np.asarray((train_data.layers["counts"] > 0).mean(axis=0)).ravel()
    keep = detected >= min_spot_fraction
    if keep.sum() < n_genes:
        raise InputError(f"only {int(keep.sum())} genes are detected in {min_spot_fraction:.0%} of the training "
                         f"spots; fewer than the {n_genes} requested")
    return train_data[:, keep].copy()


def _scores(method: str, train_data, adatas: dict, train: list[str], n_genes: int) -> np.ndarray:
    """Each gene's score under a data-driven method (higher first)."""
    import scanpy as sc

    if method == "top_mean":
        return np.asarray(train_data.X.mean(axis=0)).ravel()
    if method == "hvg":
        batch = "sample" if len(train) > 1 else None
        table = sc.pp.highly_variable_genes(train_data, n_top_genes=n_genes, batch_key=batch, inplace=False)
        rank_col = "highly_variable_nbatches" if batch else "dispersions_norm"
        return np.nan_to_num(table[rank_col].to_numpy(float)) * 1e6 + np.nan_to_num(
            table["dispersions_norm"].to_numpy(float))
    return _moran_scores(adatas, train, list(train_data.var_names))


def _moran_scores(adatas: dict, train: list[str], genes: list[str]) -> np.ndarray:
    """Mean Moran's I of each gene over the training samples (squidpy, 6 nearest neighbours)."""
    import squidpy as sq

    total = np.zeros(len(genes))
    for sample in train:
        adata = adatas[sample][:, genes].copy()
        sq.gr.spatial_neighbors_knn(adata, n_neighs=6)
        table = sq.gr.spatial_autocorr(adata, mode="moran", genes=genes, n_perms=None, copy=True,
                                       show_progress_bar=False)
        total += np.nan_to_num(table.reindex(genes)["I"].to_numpy(float))
    return total / len(train)


def write_panel(genes: list[str], path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(genes) + "\n")
