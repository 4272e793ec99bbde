"""Interrupted runs and outputs damaged after they were written.

- Tiling killed with SIGKILL half-way leaves nothing at the bundle's final name (the temporary
  file does not read as a bundle), no orphaned worker process, and the rerun writes the full
  bundle and removes the dead run's temporary file.
- Training killed at three random points (SIGKILL while a batch is being prepared), restarted
  each time, ends with the metrics and weights of an uninterrupted run.
- A bundle or expression file truncated or edited after it was written is refused before a
  model is trained on it, naming the file to regenerate.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from robustness_helpers import (REPO, check_error_text, cli_in_process, error_line, leftovers, pyramid_slide,
                                visium_outs)
from slide_patterns import StainedStrips
from synthetic import TINY_MODEL, make_sample, subprocess_env, tiny_train_cfg, write_genes

from m2ost.data import bundle
from m2ost.data import expression
from m2ost.data import slide
from m2ost.data import spots
from m2ost.data import tiling
from m2ost.errors import InputError
from m2ost.learn.training.checkpoints import read_log

# =============================================================================================
# Tiling killed half-way
# =============================================================================================

TILE_VIEWS = [{"fov_um": 48, "size_px": 48}, {"fov_um": 96, "size_px": 48}, {"fov_um": 192, "size_px": 48}]
N_SPOTS = 3600


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory):
    """An 8192 x 8192 px pyramid (0.5 µm/px) and 3600 spots over it: tiling takes a few seconds."""
    from m2ost.data.pyramid import write_pyramidal_tiff

    root = tmp_path_factory.mktemp("bigslide")
    path = root / "big.tif"
    write_pyramidal_tiff(path, StainedStrips(8192, 8192), 0.5, workers=2)
    side = int(np.sqrt(N_SPOTS))
    xs, ys = np.meshgrid(np.linspace(300, 7900, side), np.linspace(300, 7900, side))
    table = spots.check_spots(pd.DataFrame(
        {"spot_id": [f"s{i}" for i in range(xs.size)], "x": xs.ravel(), "y": ys.ravel(),
         "array_row": np.nan, "array_col": np.nan}), path, "BIG")
    spots.write_spots(table, root / "BIG.tsv")
    info = slide.prepare_slide("BIG", path, root / "BIG.json")
    return {"slide": path, "spots": root / "BIG.tsv", "info": root / "BIG.json", "mpp": info["mpp"]}


def _tile_cmd(big, out, workers):
    return [sys.executable, "-m", "m2ost", "tile", "--sample", "BIG", "--slide-info", str(big["info"]),
            "--spots", str(big["spots"]), "--settings", json.dumps({"views": TILE_VIEWS}), "--workers",
            str(workers), "--no-progress", "--out", str(out)]


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (forked workers share the parent's)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("workers", [1, 2])
def test_tiling_killed_halfway_leaves_no_bundle_and_rerun_completes(big_slide, tmp_path, workers):
    out = tmp_path / "bundles" / "BIG.h5"
    expected = N_SPOTS * sum(3 * v["size_px"] ** 2 for v in TILE_VIEWS)
    proc = subprocess.Popen(_tile_cmd(big_slide, out, workers), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while True:  # kill once a quarter of the views are on disk
            temps = list(out.parent.glob(".BIG.tmp-*.h5")) if out.parent.exists() else []
            if temps and temps[0].stat().st_size > expected / 4:
                break
            assert proc.poll() is None, f"tiling ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "tiling did not get a quarter of the way in 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed run must leave nothing at the final name"
    (temp,) = out.parent.glob(".BIG.tmp-*.h5")
    with pytest.raises(InputError, match="unreadable bundle|corrupt bundle"):
        bundle.read_meta(temp, "BIG")  # the dead run's file never reads as a bundle
    time.sleep(0.5)
    assert _processes_mentioning(str(out)) == [], "tiling workers outlived their killed parent"

    rerun = subprocess.run(_tile_cmd(big_slide, out, workers), cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    meta = bundle.verify_bundle(out, "BIG")
    assert meta["n_spots"] == N_SPOTS and meta["spot_ids"][:2] == ["s0", "s1"]
    assert leftovers(out.parent) == ["BIG.h5"], "the rerun removes the killed run's temporary file"


# =============================================================================================
# Training killed at three random points
# =============================================================================================

KILL_AT = textwrap.dedent("""
    # Train, and block (for the test to SIGKILL us) at the TARGET-th batch of the whole run,
    # counting the batches of the epochs already done by the checkpoint we resume from.
    import json, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import m2ost.learn.training.fit_on_views as F
    import m2ost.learn.inference.predictor as P
    import m2ost.learn.training.trainer as T
    args, target, per_epoch, marker = json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2]), \\
        int(sys.argv[3]), Path(sys.argv[4])
    last = Path(args["out_dir"]) / "checkpoints" / "last.pt"
    done = torch.load(last, weights_only=True)["epoch"] if last.exists() else 0
    count = [done * per_epoch]
    prepare = T.prepare_batch
    def counting(*a, **k):
        count[0] += 1
        if count[0] == target:
            marker.write_text(str(done))
            time.sleep(600)
        return prepare(*a, **k)
    T.prepare_batch = P.prepare_batch = counting  # training steps and validation
    F.fit_model(**args)
""")

EPOCHS = 3


def _train_to_the_end(script: Path, args: dict, per_epoch: int, tmp_path: Path) -> None:
    """Run the training script in a fresh process without stopping it (target batch 0 never comes)."""
    (tmp_path / "full.json").write_text(json.dumps(args))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "full.json"), "0", str(per_epoch),
                           str(tmp_path / "never")], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_training_killed_at_three_random_points_resumes_exactly(study, tmp_path):
    """Every run is a fresh process (reference included), so all of them use the same code and settings."""
    cfg = tiny_train_cfg(epochs=EPOCHS)
    # Batches per epoch: 32 training spots in batches of 8, and 8 validation spots in one batch.
    per_epoch = 4 + 1
    ref, out = tmp_path / "ref", tmp_path / "run"
    args = {"kind": "m2ost", "bundles": study["bundles"], "expressions": study["expressions"],
            "genes_file": study["genes_file"], "train_samples": ["A", "B"], "model_cfg": TINY_MODEL,
            "train_cfg": cfg, "out_dir": str(out)}
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "kill.py").write_text(KILL_AT)
    _train_to_the_end(tmp_path / "kill.py", {**args, "out_dir": str(ref)}, per_epoch, tmp_path)
    points = sorted(random.Random(20251125).sample(range(1, EPOCHS * per_epoch + 1), 3))
    resumed_from = []
    for target in points:
        marker = tmp_path / f"at-{target}"
        proc = subprocess.Popen([sys.executable, str(tmp_path / "kill.py"), str(tmp_path / "args.json"),
                                 str(target), str(per_epoch), str(marker)], env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        try:
            while not marker.exists():
                assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
                assert time.time() < deadline, f"batch {target} not reached in 120 s"
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not (out / "model.pt").exists()
        resumed_from.append(int(marker.read_text()))
        last = out / "checkpoints" / "last.pt"
        if last.exists():  # the checkpoint holds every epoch finished before the kill, no more
            assert torch.load(last, weights_only=True)["epoch"] == (target - 1) // per_epoch
    assert resumed_from == sorted(resumed_from)
    _train_to_the_end(tmp_path / "kill.py", args, per_epoch, tmp_path)  # the last restart runs to the end

    a, b = read_log(ref / "log.csv"), read_log(out / "log.csv")
    assert [r["epoch"] for r in b] == list(range(1, EPOCHS + 1))
    for ra, rb in zip(a, b):
        for col in ("train_loss", "val_loss", "val_gene_pcc", "lr"):
            assert ra[col] == rb[col], (points, col, ra, rb)
    wa = torch.load(ref / "model.pt", weights_only=True)
    wb = torch.load(out / "model.pt", weights_only=True)
    assert wa["best_epoch"] == wb["best_epoch"] and wa["best_val_gene_pcc"] == wb["best_val_gene_pcc"]
    assert all(torch.equal(wa["state_dict"][k], wb["state_dict"][k]) for k in wa["state_dict"])
    assert leftovers(out / "checkpoints") == ["best.pt", "last.pt"]


# =============================================================================================
# Outputs damaged or edited after they were written
# =============================================================================================

def _train_mean(bundles: dict, expressions: dict, genes_file, out, capsys) -> tuple[int, str]:
    argv = ["train", "--kind", "mean", "--bundle", *[f"{s}={p}" for s, p in bundles.items()],
            "--expression", *[f"{s}={p}" for s, p in expressions.items()], "--genes", genes_file,
            "--settings", json.dumps({"train": tiny_train_cfg()}), "--out-dir", out]
    return cli_in_process(argv, capsys)


def _refused(status_err, *, sample, file, problem, out):
    status, err = status_err
    assert status == 1, err
    check_error_text(error_line(err).removeprefix("m2ost: error: "), sample=sample, file=file, problem=problem)
    assert not Path(out).exists() or leftovers(out) == [], "nothing may be written"


def test_truncated_bundle_is_refused_before_training(tmp_path, capsys):
    d = make_sample(tmp_path, "X", n_spots=12)
    genes = write_genes(tmp_path / "panel.txt", ["G0", "G1", "G2"])
    data = Path(d["bundle"]).read_bytes()
    Path(d["bundle"]).write_bytes(data[: int(len(data) * 0.7)])
    _refused(_train_mean({"X": d["bundle"]}, {"X": d["expression"]}, genes, tmp_path / "m", capsys),
             sample="X", file=d["bundle"], problem=r"unreadable bundle \(.*\); delete it and rerun tiling",
             out=tmp_path / "m")


def test_edited_bundle_is_refused_before_training(tmp_path, capsys):
    """One pixel of one view of one used spot changed: its digest no longer matches."""
    d = make_sample(tmp_path, "X", n_spots=12)
    genes = write_genes(tmp_path / "panel.txt", ["G0", "G1", "G2"])
    with h5py.File(d["bundle"], "r+") as f:
        f["view_2"][5, 3, 3] = 255 - f["view_2"][5, 3, 3]
    _refused(_train_mean({"X": d["bundle"]}, {"X": d["expression"]}, genes, tmp_path / "m", capsys),
             sample="X", file=d["bundle"],
             problem=r"spot 5 \(X_s005\) does not match its stored digest: the bundle was modified or damaged "
                     "after tiling; delete it and rerun the tiling stage", out=tmp_path / "m")


def test_edit_of_a_spot_that_is_not_used_does_not_block_training(tmp_path, capsys):
    """Only the rows a run uses are verified (one read of each): a spot without expression is not."""
    d = make_sample(tmp_path, "X", n_spots=12, expression_rows=[0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11])
    genes = write_genes(tmp_path / "panel.txt", ["G0", "G1", "G2"])
    with h5py.File(d["bundle"], "r+") as f:
        f["view_0"][5, 0, 0] = 255 - f["view_0"][5, 0, 0]
    status, err = _train_mean({"X": d["bundle"]}, {"X": d["expression"]}, genes, tmp_path / "m", capsys)
    assert status == 0, err
    with pytest.raises(InputError, match=r"spot 5 \(X_s005\) does not match"):
        bundle.verify_bundle(d["bundle"], "X")  # the full check still sees it


@pytest.fixture
def tiled_sample(tmp_path):
    """A sample through the real data stages: slide, Visium outs, spots, bundle, expression."""
    v = visium_outs(tmp_path / "V", n_rows=3, n_cols=3, mpp=0.5)
    table = spots.read_positions("visium", v["positions"], "V")
    slide_path = pyramid_slide(tmp_path / "V.tif", size=768, mpp=0.5)
    views = [tiling.View(16, fov_um=32), tiling.View(16, fov_um=64)]
    tiling.tile_slide("V", slide_path, table, 0.5, views, tmp_path / "V.h5", progress=False)
    expression.build_expression("V", "visium", v["matrix"], table, tmp_path / "V.h5ad", min_counts=1)
    genes = write_genes(tmp_path / "panel.txt", ["GA", "GB", "GC"])
    return {"bundle": tmp_path / "V.h5", "expression": tmp_path / "V.h5ad", "genes": genes, "n": len(table)}


def test_sample_from_the_data_stages_trains(tiled_sample, tmp_path, capsys):
    """The reference for the two tests below: untouched outputs pass every check."""
    status, err = _train_mean({"V": tiled_sample["bundle"]}, {"V": tiled_sample["expression"]},
                              tiled_sample["genes"], tmp_path / "m", capsys)
    assert status == 0, err
    assert (tmp_path / "m" / "model.pt").exists()


def test_truncated_expression_is_refused_before_training(tiled_sample, tmp_path, capsys):
    path = tiled_sample["expression"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(_train_mean({"V": tiled_sample["bundle"]}, {"V": path}, tiled_sample["genes"], tmp_path / "m", capsys),
             sample="V", file=path, problem=r"unreadable expression file \(.*\); delete it and rerun the expression "
                                            "stage$", out=tmp_path / "m")


@pytest.mark.parametrize("edit", ["value", "spot_order"])
def test_edited_expression_is_refused_before_training(tiled_sample, tmp_path, capsys, edit):
    """A value of X changed, or two spots' rows swapped, by hand: the stored digest no longer matches."""
    path = tiled_sample["expression"]
    with h5py.File(path, "r+") as f:
        if edit == "value":
            f["X"]["data"][0] = f["X"]["data"][0] + 1.0
        else:
            names = f["obs"]["_index"][:]
            names[[0, 1]] = names[[1, 0]]
            f["obs"]["_index"][:] = names
    _refused(_train_mean({"V": tiled_sample["bundle"]}, {"V": path}, tiled_sample["genes"], tmp_path / "m", capsys),
             sample="V", file=path, problem="expression file does not match its stored digest: it was edited or "
                                            "damaged after the expression stage wrote it; delete it and rerun the "
                                            "expression stage", out=tmp_path / "m")
