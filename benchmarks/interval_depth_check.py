"""How the interval calibration holds on a training section it did not calibrate on: validation
spots only, no held-out section.

For each trained model given, each training section in turn is left out of the validation spots
stored in its ``model.pt`` (``intervals.spots``); the other sections' spots calibrate the
intervals afresh (difficulty head and scores, :func:`m2ost.eval.intervals.fit_calibration`), and
the left-out section's spots are scored, once at the other sections' depths
(``intervals.depth: training``) and once at each left-out spot's own library size
(``measured``). This is the check that chose the depth correction: it needs no held-out
section, and a training section sequenced less deeply than the others shows whether the
intervals follow a measurement's depth.

    python benchmarks/interval_depth_check.py results/models/*/*/model.pt [--level L] [--calibration C]

Prints, per model and left-out section: its validation spots, their median library size
against the other sections', and the coverage and mean width at both depths; then the means
over the models and splits, for sections sequenced less than half as deeply as the others and
for the rest.
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
from m2ost.eval.intervals import fit_calibration, interval_scores, intervals  # noqa: E402
from m2ost.learn.training.calibration import calibration_of  # noqa: E402


def section_rows(payload: dict, level: float, calibration: str) -> list[dict]:
    """One row per training section left out of the stored validation spots."""
    state = calibration_of(payload)
    if state is None or state.get("spots") is None:
        return []
    spots = state["spots"]
    group = np.asarray(spots["group"])
    names = list(payload.get("train_samples", []))
    rows = []
    for g in np.unique(group):
        out = group == g
        if out.sum() < 5 or (~out).sum() < 10:
            continue
        rest = fit_calibration(spots["pred"][~out], spots["truth"][~out], group[~out], int(state["seed"]),
                               spots["depth"][~out], spots["target_sum"])
        row = {"section": names[g] if g < len(names) else f"section {g}", "spots": int(out.sum()),
               "depth_ratio": float(np.median(spots["depth"][out]) / np.median(spots["depth"][~out]))}
        for mode, depth in (("training", None), ("measured", spots["depth"][out])):
            lower, upper = intervals(rest, spots["pred"][out], level, calibration, depth)
            scored = interval_scores(spots["truth"][out], lower, upper)
            row[f"coverage_{mode}"] = scored["interval_coverage"]
            row[f"width_{mode}"] = scored["interval_width"]
        rows.append(row)
    return rows


def print_means(rows: list[dict]) -> None:
    """Means over the rows of the shallow sections (under half the others' depth) and the rest."""
    for label, pick in (("shallower than half", lambda r: r["depth_ratio"] < 0.5),
                        ("the others", lambda r: r["depth_ratio"] >= 0.5)):
        chosen = [r for r in rows if pick(r)]
        if chosen:
            means = {k: np.mean([r[k] for r in chosen]) for k in
                     ("coverage_training", "coverage_measured", "width_training", "width_measured")}
            print(f"mean, left-out sections {label} ({len(chosen)}): coverage {means['coverage_training']:.3f} "
                  f"-> {means['coverage_measured']:.3f}, width {means['width_training']:.2f} -> "
                  f"{means['width_measured']:.2f} (training depth -> measured depth)")


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
    every = []
    for path in args.models:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model, split = Path(path).parent.parent.name, Path(path).parent.name
        for r in section_rows(payload, args.level, args.calibration):
            every.append(r)
            print(f"{model}\t{split}\t{r['section']}\t{r['spots']}\t{r['depth_ratio']:.3f}\t"
                  f"{r['coverage_training']:.3f}\t{r['coverage_measured']:.3f}\t"
                  f"{r['width_training']:.2f}\t{r['width_measured']:.2f}")
    print_means(every)


if __name__ == "__main__":
    main()
