"""The data-quality table of a cohort: one line per sample from the expression stage's records."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pandas as pd

from m2ost import defaults
from m2ost.atomic import atomic_path
from m2ost.errors import InputError

log = logging.getLogger(__name__)

COLUMNS = ["sample", "spots_in_table", "spots_kept", "dropped_no_counts", "dropped_low_counts",
           "count_rows_without_spot", "median_library_size", "genes_detected", "warning"]
# A section whose median library size is under this fraction of the cohort's median is flagged
# (the public HER2+ section B4: 661 counts against 8.5k-12.6k for the C sections).
LOW_LIBRARY_FRACTION = defaults.section("expression")["low_library_fraction"]


def read_quality(path, sample: str) -> dict:
    """The quality record that the expression stage stored in ``uns["m2ost"]["qc_json"]``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            text = f["uns/m2ost/qc_json"][()]
    except FileNotFoundError:
        raise InputError("expression file not found (run the expression stage)", file=path, sample=sample) from None
    except (OSError, KeyError) as err:
        raise InputError(f"expression file has no quality record ({type(err).__name__}); rerun the expression "
                         "stage", file=path, sample=sample) from None
    return json.loads(text.decode() if isinstance(text, bytes) else str(text))


def quality_table(expression: dict[str, str | os.PathLike], low_fraction: float = LOW_LIBRARY_FRACTION
                  ) -> pd.DataFrame:
    """One row per sample; a warning (logged, and in the row) for a section whose median library
    size is under ``low_fraction`` of the cohort's median."""
    rows = [{"sample": sample, **read_quality(path, sample)} for sample, path in expression.items()]
    table = pd.DataFrame(rows)
    cohort = float(np.median(table["median_library_size"]))
    table["warning"] = ""
    for i, row in table.iterrows():
        if len(table) > 1 and row["median_library_size"] < low_fraction * cohort:
            text = (f"median library size {row['median_library_size']:.0f} is under {low_fraction:.0%} of the "
                    f"cohort median {cohort:.0f}")
            table.loc[i, "warning"] = text
            log.warning("%s: %s: low-quality section? (its expression is normalised per spot, but its "
                        "spots are noisier)", row["sample"], text)
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = 0
    return table[COLUMNS]


def write_quality_table(table: pd.DataFrame, out_tsv) -> str:
    """Write the table (TSV) and return it as aligned text, one line per sample."""
    with atomic_path(out_tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.1f")
    return table.to_string(index=False, float_format=lambda v: f"{v:.0f}")
