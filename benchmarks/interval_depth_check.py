"""How the interval calibration holds on a training section it did not calibrate on: validation
spots only, no held-out section.

For each trained model given, each training section in turn is left out of the calibration
spots stored in its ``model.pt`` (``intervals.spots``, the second half of the validation spots;
the difficulty head is kept) and the others calibrate the intervals of its spots, once at the
calibration spots' depths (``intervals.depth: training``) and once at each left-out spot's own
library size (``measured``). This is the check that chose the depth correction: it needs no
held-out section, and a training section sequenced less deeply than the others shows whether the
intervals follow a measurement's depth.

    python benchmarks/interval_depth_check.py results/models/*/*/model.pt [--level L] [--calibration C]

Prints, per model and left-out section: its calibration spots, their median library size
against the other sections', and the coverage and mean width at both depths.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2ost import defaults  # noqa: E402
from m2ost.eval.intervals import interval_scores, intervals  # noqa: E402
from m2ost.learn.training.calibration import calibration_of  # noqa: E402


def without(state: dict, keep: np.ndarray) -> dict:
    """The calibration state on the spots ``keep`` only (same head)."""
    spots = {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in state["spots"].items()}
    return {**state, "scores": state["scores"][keep], "groups": state["groups"][keep], "spots": spots}


def section_rows(payload: dict, level: float, calibration: str) -> list[dict]:
    """One row per training section left out of the stored calibration spots."""
    state = calibration_of(payload)
    if state is None or state.get("spots") is None:
        return []
    groups, spots = np.asarray(state["groups"]), state["spots"]
    names = list(payload.get("train_samples", []))
    rows = []
    for g in np.unique(groups):
        out = groups == g
        if out.sum() < 5 or (~out).sum() < 10:
            continue
        rest = without(state, ~out)
        row = {"section": names[g] if len(names) == len(np.unique(groups)) else f"section {g}",
               "spots": int(out.sum()),
               "depth_ratio": float(np.median(spots["depth"][out]) / np.median(spots["depth"][~out]))}
        for mode, depth in (("training", None), ("measured", spots["depth"][out])):
            lower, upper = intervals(rest, spots["pred"][out], level, calibration, depth)
            scored = interval_scores(spots["truth"][out], lower, upper)
            row[f"coverage_{mode}"] = scored["interval_coverage"]
            row[f"width_{mode}"] = scored["interval_width"]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model.pt files (results/models/{model}/{split}/model.pt)")
    workflow = defaults.section("intervals")
    parser.add_argument("--level", type=float, default=workflow["level"], help="nominal coverage (intervals.level)")
    parser.add_argument("--calibration", default=workflow["calibration"], help="spots or sections")
    args = parser.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.1f}; level {args.level}, calibration {args.calibration}")
    print("model\tsplit\tleft out\tspots\tdepth / others'\tcoverage (training depth)\tcoverage (measured depth)"
          "\twidth (training)\twidth (measured)")
    for path in args.models:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model, split = Path(path).parent.parent.name, Path(path).parent.name
        for r in section_rows(payload, args.level, args.calibration):
            print(f"{model}\t{split}\t{r['section']}\t{r['spots']}\t{r['depth_ratio']:.3f}\t"
                  f"{r['coverage_training']:.3f}\t{r['coverage_measured']:.3f}\t"
                  f"{r['width_training']:.2f}\t{r['width_measured']:.2f}")


if __name__ == "__main__":
    main()
