"""Training: outputs, exact resume (in-process and after a killed process), refused checkpoints,
divergence, DistributedDataParallel, baselines, and evaluation of a trained network."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from synthetic import TINY_MODEL, poison_network_after, subprocess_env, tiny_train_cfg

import m2ost.learn.training.distributed as D
import m2ost.learn.training.trainer as T
from m2ost.errors import InputError, TrainingDiverged
from m2ost.learn.training.baselines import BASELINES
from m2ost.learn.training.checkpoints import LOG_COLUMNS, read_log
from m2ost.learn.training.device import resolve_device
from m2ost.learn.training.fit_on_views import fit_model
from m2ost.learn.training.network import gene_loss_weights, training_loss
from m2ost.learn.inference.predictor import load_model
from m2ost.learn.training.trainer import train


def _run(study, out, cfg=None, model_cfg=TINY_MODEL, samples=("A", "B"), kind="m2ost"):
    return fit_model(kind, study["bundles"], study["expressions"], study["genes_file"],
                     list(samples), model_cfg, cfg or tiny_train_cfg(), out)


def _weights(out) -> dict:
    return torch.load(Path(out) / "model.pt", weights_only=True)["state_dict"]


def _assert_same_run(a, b, exact=True, atol=0.0):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), \
                (k, float((wa[k] - wb[k]).abs().max()))
    la, lb = read_log(Path(a) / "log.csv"), read_log(Path(b) / "log.csv")
    assert len(la) == len(lb)
    for ra, rb in zip(la, lb):
        for col in ("epoch", "train_loss", "val_loss", "val_gene_pcc", "lr"):
            if exact:
                assert ra[col] == rb[col], (col, ra, rb)
            else:
                assert ra[col] == pytest.approx(rb[col], abs=max(atol, 1e-6) * 10), (col, ra, rb)


@pytest.fixture(scope="module")
def ref(study, tmp_path_factory):
    """An uninterrupted 2-epoch run (cosine schedule, augmentations on)."""
    out = tmp_path_factory.mktemp("ref")
    result = _run(study, out)
    return out, result


def test_outputs(ref, study):
    out, result = ref
    assert result["epochs_run"] == 2 and result["best_epoch"] in (1, 2)
    log = read_log(out / "log.csv")
    assert [r["epoch"] for r in log] == [1, 2]
    assert list(log[0]) == list(LOG_COLUMNS)
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in log)
    assert (out / "checkpoints" / "last.pt").exists() and (out / "checkpoints" / "best.pt").exists()
    meta = torch.load(out / "model.pt", weights_only=True)
    assert meta["kind"] == "m2ost" and meta["genes"] == study["genes"]
    assert meta["views"] == [0, 1, 2] and meta["img_size"] == 32
    assert meta["normalisation"]["mean"] == [0.485, 0.456, 0.406]
    assert json.loads(meta["provenance"])["versions"]["torch"]
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "augment_rng", "epoch", "best_key",
            "run_parts"} <= set(last)
    assert last["epoch"] == 2


def test_resume_after_interruption_is_exact(ref, study, tmp_path, monkeypatch):
    """Interrupt right after the first checkpoint, restart: identical to the uninterrupted run."""
    save = T.save_checkpoint

    def save_then_crash(obj, path):
        save(obj, path)
        if path.name == "last.pt":
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(T, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        _run(study, tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "model.pt").exists()
    monkeypatch.setattr(T, "save_checkpoint", save)
    _run(study, tmp_path)
    _assert_same_run(ref[0], tmp_path)


def test_extend_a_run_without_schedule(study, tmp_path):
    """Without a schedule, train 1 epoch, then ask for 2: same as 2 epochs straight."""
    cfg = tiny_train_cfg(scheduler="none")
    _run(study, tmp_path / "straight", cfg)
    _run(study, tmp_path / "steps", {**cfg, "epochs": 1})
    assert len(read_log(tmp_path / "steps" / "log.csv")) == 1
    _run(study, tmp_path / "steps", cfg)
    _assert_same_run(tmp_path / "straight", tmp_path / "steps")


KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    import m2ost.learn.training.fit_on_views as F
    import m2ost.learn.training.trainer as T
    save = T.save_checkpoint
    def slow(obj, path):
        save(obj, path)
        if path.name == "last.pt":
            time.sleep(120)  # the test kills us here, after the first checkpoint
    T.save_checkpoint = slow
    args = json.loads(open(sys.argv[1]).read())
    F.fit_model(**args)
""")


def test_killed_process_resumes_exactly(ref, study, tmp_path):
    out = tmp_path / "run"
    args = {"kind": "m2ost", "bundles": study["bundles"], "expressions": study["expressions"],
            "genes_file": study["genes_file"], "train_samples": ["A", "B"],
            "model_cfg": TINY_MODEL, "train_cfg": tiny_train_cfg(), "out_dir": str(out)}
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "kill.py"),
                             str(tmp_path / "args.json")], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = out / "checkpoints" / "last.pt"
    deadline = time.time() + 90
    try:
        while not last.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "no checkpoint within 90 s"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.pt").exists()
    assert torch.load(last, weights_only=True)["epoch"] == 1
    _run(study, out)
    _assert_same_run(ref[0], out)


def test_checkpoint_of_another_run_is_refused(ref, study, tmp_path):
    shutil.copytree(ref[0] / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(InputError, match=r"last\.pt.*different run.*model config"):
        _run(study, tmp_path, model_cfg={**TINY_MODEL, "depth": 1})
    panel = tmp_path / "panel.txt"
    panel.write_text("\n".join(study["genes"][:5]) + "\n")
    with pytest.raises(InputError, match=r"last\.pt.*different run.*gene panel"):
        train(study["bundles"], study["expressions"], str(panel), ["A", "B"], TINY_MODEL,
              tiny_train_cfg(), tmp_path)
    with pytest.raises(InputError, match=r"different run.*training samples"):
        _run(study, tmp_path, samples=("A", "C"))
    with pytest.raises(InputError, match=r"different run.*training settings"):
        _run(study, tmp_path, cfg=tiny_train_cfg(lr=5e-4))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(study, tmp_path, monkeypatch):
    poison_network_after(monkeypatch, 6)  # NaN from the 2nd training step of epoch 2 on (4 steps per epoch here)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, step 2 of 4.*epoch 1"):
        _run(study, tmp_path, tiny_train_cfg(epochs=3))
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "model.pt").exists()
    assert len(read_log(tmp_path / "log.csv")) == 1


def test_ddp_two_processes_match_one(study, tmp_path):
    """2 gloo processes with half the batch each follow the single-process run. They are
    launched as the train rule launches them when ``launch.train_processes`` is 2."""
    # 2 x 20 spots, 4 validation spots each: 32 training spots = 4 full batches of 8, so both
    # runs see exactly the same batches (no padding by the sampler, no partial batch).
    cfg = tiny_train_cfg(val_fraction=0.2)
    _run(study, tmp_path / "single", cfg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "m2ost", "train", "--kind", "m2ost",
           "--bundle", *[f"{s}={study['bundles'][s]}" for s in ("A", "B")],
           "--expression", *[f"{s}={study['expressions'][s]}" for s in ("A", "B")],
           "--genes", str(study["genes_file"]),
           "--settings", json.dumps({"model": TINY_MODEL, "train": cfg}),
           "--out-dir", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_same_run(tmp_path / "single", tmp_path / "ddp", exact=False, atol=1e-5)


def test_ddp_batch_must_split_evenly(study, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)  # pretend a launcher did it
    monkeypatch.setattr(D.dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(D.dist, "get_rank", lambda: 0)
    with pytest.raises(InputError, match="batch_size 8 is not divisible by the 3 processes"):
        _run(study, tmp_path)


def test_single_view_model_and_bad_settings(study, tmp_path):
    res = _run(study, tmp_path / "single", tiny_train_cfg(epochs=1), kind="m2ost_single")
    meta = torch.load(res["model_file"], weights_only=True)
    assert meta["views"] == [0] and meta["kind"] == "m2ost_single"
    with pytest.raises(InputError, match=r"unknown setting train\.epoch"):
        _run(study, tmp_path / "x", {"epoch": 3})
    with pytest.raises(InputError, match="model configuration rejected"):
        _run(study, tmp_path / "y", model_cfg={"variant": "nope"})
    with pytest.raises(InputError, match="kind 'cnn'"):
        _run(study, tmp_path / "z", kind="cnn")


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="not understood"):
        resolve_device("tpu")


def test_baselines_fit_and_predict(study, tmp_path):
    ridge = _run(study, tmp_path / "ridge", kind="ridge")
    mean = _run(study, tmp_path / "mean", kind="mean")
    assert ridge["alpha"] in BASELINES["ridge"]().alphas
    assert np.isfinite(ridge["val_gene_pcc"]) and mean["val_gene_pcc"] == 0.0  # a constant scores 0
    assert ridge["val_loss"] < mean["val_loss"]  # colour predicts the synthetic expression
    rows = read_log(tmp_path / "ridge" / "log.csv")
    assert len(rows) == len(BASELINES["ridge"]().alphas)
    assert sum(r["chosen"] == "True" for r in rows) == 1
    from m2ost.learn.inputs.dataset import load_samples
    from m2ost.learn.inputs.loader import SpotDataset

    for kind in ("ridge", "mean"):
        p = load_model(tmp_path / kind / "model.pt", "cpu")
        ds = SpotDataset(load_samples(study["bundles"], study["expressions"], p.genes, ["C"],
                                      p.views), p.views)
        pred = p.predict(ds)
        assert pred.shape == (20, len(study["genes"])) and np.isfinite(pred).all()


def test_evaluate_network_and_predict_bundle(ref, study, tmp_path):
    from m2ost.learn.inference.heldout import evaluate
    from m2ost.learn.inference.new_slides import predict_bundle

    res = evaluate(ref[0] / "model.pt", study["bundles"], study["expressions"], ["C"],
                   tmp_path / "eval", model_name="m2ost-tiny", split="loso-C", device="cpu",
                   batch_size=7)
    assert res["model"] == "m2ost-tiny" and res["split"] == "loso-C"
    s = res["samples"]["C"]
    assert s["n_spots"] == 20 and s["n_genes_undefined"] >= 1  # the synthetic all-zero gene
    assert (tmp_path / "eval" / "figures" / "C.maps.jpg").exists()
    adata = predict_bundle(ref[0] / "model.pt", study["bundles"]["C"], tmp_path / "C.h5ad",
                           device="cpu")
    assert adata.shape == (20, len(study["genes"]))
    import anndata

    pred = anndata.read_h5ad(tmp_path / "eval" / "predictions.h5ad")
    assert np.allclose(pred.X, adata.X, atol=1e-5)  # batching does not change predictions
    # The model's per-gene Pearson r on its validation spots travels into both files: undefined
    # for the all-zero gene, and averaging to the best epoch's validation score of the log.
    val = adata.var["val_pcc"].to_numpy()
    assert np.allclose(pred.var["val_pcc"], val, equal_nan=True)
    assert np.isnan(val).sum() == s["n_genes_undefined"] and np.isfinite(val).any()
    assert np.nanmean(val) == pytest.approx(ref[1]["best_val_gene_pcc"], abs=1e-5)
    assert set(pred.var["unit"]) == {pred.uns["m2ost"]["unit"]} and "log1p" in pred.uns


def test_best_epoch_is_chosen_on_validation_and_patience_stops(study, tmp_path, monkeypatch):
    scores = iter([0.5, 0.1, 0.05, 0.9])  # best at epoch 1, then 2 epochs without progress

    monkeypatch.setattr(T, "_validate", lambda *a: (1.0, next(scores)))
    res = _run(study, tmp_path, tiny_train_cfg(epochs=4, patience=2))
    assert res["best_epoch"] == 1 and res["epochs_run"] == 3 and res["stopped_early"]
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert best["epoch"] == 1 and last["epoch"] == 3
    weights = _weights(tmp_path)
    assert all(torch.equal(weights[k], best["model"][k]) for k in weights)
    assert not all(torch.equal(weights[k], last["model"][k]) for k in weights)
    assert [r["val_gene_pcc"] for r in read_log(tmp_path / "log.csv")] == [0.5, 0.1, 0.05]


def test_standardized_targets_weigh_every_gene_alike():
    """train.standardize_targets: each gene's squared error in units of its training spread."""
    rng = np.random.default_rng(0)
    y = np.stack([rng.normal(5, 1, 400), rng.normal(5, 10, 400), np.full(400, 2.0)], 1)
    w = gene_loss_weights(y, torch.device("cpu")).numpy()
    std = y.std(0)
    np.testing.assert_allclose(w[:2], 1 / std[:2] ** 2, rtol=1e-6)
    assert w[2] == pytest.approx(1 / 0.05**2)  # a constant gene is capped, not infinite
    pred, target = torch.randn(8, 3), torch.randn(8, 3)
    z = ((pred - target) / torch.as_tensor(np.maximum(std, 0.05), dtype=torch.float32)).square().mean()
    assert float(training_loss(pred, target, torch.as_tensor(w))) == pytest.approx(float(z), rel=1e-5)
    assert float(training_loss(pred, target, None)) == pytest.approx(float((pred - target).square().mean()), rel=1e-6)
