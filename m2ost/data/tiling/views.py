"""What a view is (field of view, output size) and which pyramid level it is read from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class View:
    """One view: its field of view (µm, or level-0 px when ``fov_px`` is set) and output size."""

    size_px: int
    fov_um: float | None = None
    fov_px: float | None = None

    @classmethod
    def from_config(cls, entry: dict) -> View:
        return cls(size_px=int(entry["size_px"]), fov_um=entry.get("fov_um"), fov_px=entry.get("fov_px"))

    def level0_px(self, mpp: float) -> float:
        return float(self.fov_px) if self.fov_px else float(self.fov_um) / mpp


@dataclass(frozen=True)
class ReadPlan:
    """How one view is read: from ``level`` a square of ``read_px`` px covering ``fov0`` level-0 px."""

    level: int
    downsample: float
    fov0: float
    read_px: int
    size_px: int


def plan_views(views: list[View], mpp: float, level_downsamples, strategy: str = "pyramid") -> list[ReadPlan]:
    """Pick the pyramid level of every view."""
    plans = []
    for view in views:
        fov0 = view.level0_px(mpp)
        needed = fov0 / view.size_px
        level = 0
        if strategy == "pyramid":
            # Largest downsample not above the needed one (with a hair of tolerance for float noise).
            candidates = [i for i, d in enumerate(level_downsamples) if d <= needed * (1 + 1e-6)]
            level = max(candidates, key=lambda i: level_downsamples[i]) if candidates else 0
        elif strategy != "naive":
            raise ValueError(f"unknown tiling strategy {strategy!r}")
        ds = float(level_downsamples[level])
        plans.append(ReadPlan(level=level, downsample=ds, fov0=fov0,
                              read_px=max(1, int(round(fov0 / ds))), size_px=view.size_px))
    return plans



def view_origin(cx: float, cy: float, plan: ReadPlan) -> tuple[int, int, int, int]:
    """(x0, y0) level-0 and (lx, ly) plan-level top-left pixel of the view centred on (cx, cy)."""
    x0 = int(round(cx - plan.fov0 / 2))
    y0 = int(round(cy - plan.fov0 / 2))
    return x0, y0, int(round(x0 / plan.downsample)), int(round(y0 / plan.downsample))


def tile_span(start: int, length: int, limit: int, tile: int) -> range:
    """Indices of the tiles of edge ``tile`` that the pixels [start, start + length) ∩ [0, limit) touch."""
    lo, hi = max(start, 0), min(start + length, limit)
    if lo >= hi:
        return range(0)
    return range(lo // tile, (hi - 1) // tile + 1)
