"""Where the real public data lives (../shared/data beside the repository), and skips without it."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HER2ST = SHARED_DATA / "her2st"
SVS = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"
HER2ST_SECTIONS = ("B4", "C2", "C3", "C4", "C5")

needs_her2st = pytest.mark.skipif(not (HER2ST / "images" / "HE" / "B4.jpg").is_file(),
                                  reason=f"real HER2+ data not found at {HER2ST} (../shared/data/her2st)")
needs_svs = pytest.mark.skipif(not SVS.is_file(), reason=f"real SVS slide not found at {SVS}")


def her2st_files(section: str) -> dict[str, Path]:
    return {"image": HER2ST / "images" / "HE" / f"{section}.jpg",
            "counts": HER2ST / "count-matrices" / f"{section}.tsv.gz",
            "positions": HER2ST / "spot-selections" / f"{section}_selection.tsv"}
