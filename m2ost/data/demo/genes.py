"""Genes of the demo cohort: their roles and weights, and the counts of every spot."""

from __future__ import annotations

import numpy as np
import pandas as pd

from m2ost.data.demo.params import REGION_TYPES


def _roles(rng: np.random.Generator, n_genes: int) -> np.ndarray:
    """About 5% flat genes, the rest half own, half neighbourhood, in a random order."""
    n_flat = max(1, n_genes // 20)
    n_own = (n_genes - n_flat) // 2
    roles = np.array(["own"] * n_own + ["neighbourhood"] * (n_genes - n_flat - n_own) + ["flat"] * n_flat)
    return roles[rng.permutation(n_genes)]


def _region_weights(rng: np.random.Generator, role: str, i: int) -> np.ndarray:
    """Weights of the region fractions of the ``i``-th gene of a role: one region type up, another down."""
    k = len(REGION_TYPES)
    primary = i % k  # cycle so every region type drives some genes
    secondary = (primary + 1 + int(rng.integers(0, k - 1))) % k
    w = np.zeros(k)
    if role == "own":
        w[primary] = rng.uniform(1.8, 2.6)
        w[secondary] = -rng.uniform(0.5, 1.0)
    else:
        # Ring fractions vary about half as much as own fractions (they average over a larger
        # area), so larger weights give a comparable spread of expression.
        w[primary] = rng.uniform(3.0, 4.0)
        w[secondary] = -rng.uniform(0.8, 1.5)
    return w


def _weights(rng: np.random.Generator, roles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w_own, w_ring, w_nuclei) of every gene; flat genes have none."""
    n_genes, k = len(roles), len(REGION_TYPES)
    w_own, w_ring, w_nuc = np.zeros((n_genes, k)), np.zeros((n_genes, k)), np.zeros(n_genes)
    counter = {"own": 0, "neighbourhood": 0}
    for g, role in enumerate(roles):
        if role == "flat":
            continue
        i = counter[role]
        counter[role] += 1
        w = _region_weights(rng, role, i)
        if role == "own":
            w_own[g] = w
            # Every third own gene is mostly about nucleus density.
            w_nuc[g] = rng.choice([-1, 1]) * (rng.uniform(0.8, 1.1) if i % 3 == 2 else rng.uniform(0, 0.3))
            if i % 3 == 2:
                w_own[g] *= 0.3
        else:
            w_ring[g] = w
    return w_own, w_ring, w_nuc


def gene_table(rng: np.random.Generator, n_genes: int) -> pd.DataFrame:
    """Roles and weights of the generative expression model.

    ``log mean = base + sum_k w_own[k] * own_frac[k] + w_nuclei * z(own nuclei)
    + sum_k w_ring[k] * ring_frac[k]``, with only the terms of the gene's role set.
    """
    roles = _roles(rng, n_genes)
    w_own, w_ring, w_nuc = _weights(rng, roles)
    table = pd.DataFrame(
        {
            "gene": [f"GENE{g + 1:03d}" for g in range(n_genes)],
            "gene_id": [f"DEMOG{g + 1:08d}" for g in range(n_genes)],
            "role": roles,
            "base_log_mean": np.log(rng.uniform(4.0, 40.0, n_genes)),
            "dispersion": rng.uniform(5.0, 15.0, n_genes),
            "w_own_nuclei": w_nuc,
        }
    )
    for i, name in enumerate(REGION_TYPES):
        table[f"w_own_{name}"] = w_own[:, i]
    for i, name in enumerate(REGION_TYPES):
        table[f"w_ring_{name}"] = w_ring[:, i]
    return table


def _log_means(genes: pd.DataFrame, feats: pd.DataFrame) -> np.ndarray:
    """Log expected counts (spots x genes) before library size."""
    # Fixed standardisation (not data-driven) so the relation is shared by all slides.
    z_nuc = (feats["own_nuclei_per_mm2"].to_numpy() - 2500.0) / 2000.0
    eta = genes["base_log_mean"].to_numpy()[None, :] + z_nuc[:, None] * genes["w_own_nuclei"].to_numpy()
    for name in REGION_TYPES:
        eta = eta + np.outer(feats[f"own_{name}"], genes[f"w_own_{name}"])
        eta = eta + np.outer(feats[f"ring_{name}"], genes[f"w_ring_{name}"])
    return eta


def sample_counts(rng, genes: pd.DataFrame, feats: pd.DataFrame, slide_depth: float) -> np.ndarray:
    """Negative-binomial counts (spots x genes), int32."""
    mu = np.exp(_log_means(genes, feats))
    library = slide_depth * np.exp(rng.normal(0, 0.3, len(feats)))
    mu = mu * library[:, None]
    r = genes["dispersion"].to_numpy()[None, :]
    lam = rng.gamma(r, mu / r)  # gamma-Poisson mixture = negative binomial
    return rng.poisson(lam).astype(np.int32)
