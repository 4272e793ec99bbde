"""The GPU path of training and prediction: what runs on the CPU here (losses read back in
blocks, not one wait for the device per step; normalisation constants that survive inference
mode), and CUDA checks that run where a GPU is (benchmarks/gpu_run.sh runs this file there)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import TINY_MODEL, poison_network_after, make_sample, panel_genes, tiny_train_cfg

import m2ost.learn.inputs.augment as A
import m2ost.learn.training.trainer as T
from m2ost.errors import TrainingDiverged
from m2ost.learn.training.checkpoints import read_log
from m2ost.learn.inputs.dataset import load_sample
from m2ost.learn.training.fit_on_views import fit_model
from m2ost.learn.inputs.loader import SpotDataset, make_loader
from m2ost.learn.inference.predictor import predict_network
from m2ost.model import build_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _run(study, out, cfg=None):
    return fit_model("m2ost", study["bundles"], study["expressions"], study["genes_file"], ["A", "B"],
                     TINY_MODEL, cfg or tiny_train_cfg(), out)


def _reads(monkeypatch) -> list[int]:
    """Record how many steps' losses each read-back covers."""
    sizes, read = [], T._read_losses

    def counting(run, pending, *args):
        if pending:
            sizes.append(len(pending))
        return read(run, pending, *args)
    monkeypatch.setattr(T, "_read_losses", counting)
    return sizes


def test_losses_are_read_back_in_blocks_with_the_same_result(study, tmp_path, monkeypatch):
    sizes = _reads(monkeypatch)
    _run(study, tmp_path / "once")
    assert sizes == [4, 4]  # 4 steps per epoch, one wait for the device per epoch
    sizes.clear()
    monkeypatch.setattr(T, "_READ_EVERY", 3)
    _run(study, tmp_path / "blocks")
    assert sizes == [3, 1, 3, 1]
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True)["state_dict"] for d in ("once", "blocks"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[{k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / d / "log.csv")]
            for d in ("once", "blocks")]
    assert logs[0] == logs[1]


def test_nan_loss_in_a_later_block_names_its_step(study, tmp_path, monkeypatch):
    poison_network_after(monkeypatch, 8)  # epoch 2, step 4 (of 4), in the second block of 3
    monkeypatch.setattr(T, "_READ_EVERY", 3)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2, step 4 of 4.*epoch 1"):
        _run(study, tmp_path, tiny_train_cfg(epochs=3))
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


def test_normalisation_made_during_inference_serves_training(monkeypatch):
    """Evaluation may be the first to normalise a batch on a device; training must still work after."""
    monkeypatch.setattr(A, "_NORMALISERS", {})
    images = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        A.prepare_batch(images, torch.device("cpu"))
    model = build_model(dict(TINY_MODEL), 4, 3, 32)
    x = A.prepare_batch(images, torch.device("cpu"), torch.tensor([[1, 1, 0, 1.1, 0.9, 1.0]] * 2))
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_regression_head_runs_in_fp32_under_bf16_autocast():
    """Under autocast (bf16 on CUDA) the body runs in bf16 but the output is not rounded to bf16."""
    torch.manual_seed(0)
    model = build_model(dict(TINY_MODEL), 6, 3, 32).eval()
    bias = torch.linspace(5.0, 5.01, 6)  # log1p-scale outputs 2e-3 apart; bf16 steps there are 1/32
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(bias)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 3, 32, 32))
    assert y.dtype == torch.float32 and torch.equal(y, bias.expand(2, 6))


def test_prediction_starts_no_more_workers_than_batches_after_the_first(tmp_path, monkeypatch):
    """Validation runs every epoch: workers forked for one batch would cost more than they read."""
    import m2ost.learn.inference.predictor as P

    ds, _ = _spots(tmp_path, n=24)
    model = build_model(dict(TINY_MODEL), ds.n_genes, 3, ds.image_size)
    started, make = [], P.make_loader

    def recording(dataset, batch, workers, *a, **k):
        started.append(workers)
        return make(dataset, batch, workers, *a, **k)
    monkeypatch.setattr(P, "make_loader", recording)
    one = predict_network(model, ds, torch.device("cpu"), batch_size=32, workers=2)
    three = predict_network(model, ds, torch.device("cpu"), batch_size=8, workers=4)
    assert started == [0, 2]
    assert np.array_equal(one, three)


def _spots(tmp_path: Path, n: int = 24) -> tuple[SpotDataset, dict]:
    d = make_sample(tmp_path, "S", n_spots=n)
    s = load_sample(d["bundle"], d["expression"], panel_genes(), sample="S")
    # every augmentation on, stain jitter included: the device path must match the CPU's
    aug = {"flip": True, "rot90": True, "color_jitter": 0.1, "hed_jitter": 0.05}
    return SpotDataset([s], augment=aug, seed=3), d


@CUDA
def test_prepare_batch_on_cuda_matches_the_cpu(tmp_path):
    ds, _ = _spots(tmp_path)
    images, _, aug = next(iter(make_loader(ds, len(ds), workers=2, pin=True)))
    assert images.is_pinned()
    cpu = A.prepare_batch(images, torch.device("cpu"), aug)
    gpu = A.prepare_batch(images, torch.device("cuda"), aug)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)


@CUDA
def test_bf16_prediction_on_cuda_is_close_to_fp32_on_the_cpu(tmp_path):
    ds, _ = _spots(tmp_path)
    torch.manual_seed(0)
    model = build_model(dict(TINY_MODEL), ds.n_genes, 3, ds.image_size)
    cpu = predict_network(model, ds, torch.device("cpu"), batch_size=5)
    gpu = predict_network(model.to("cuda"), ds, torch.device("cuda"), batch_size=5, workers=2)
    assert gpu.shape == cpu.shape and np.isfinite(gpu).all()
    assert np.abs(gpu - cpu).max() <= 0.05 * np.abs(cpu).max()  # bf16 autocast


@CUDA
def test_training_on_cuda_with_workers_and_compile(study, tmp_path):
    cfg = tiny_train_cfg(device="cuda", workers=2, compile=True, epochs=2)
    result = _run(study, tmp_path, cfg)
    log = read_log(tmp_path / "log.csv")
    assert result["epochs_run"] == 2 and all(np.isfinite(r["train_loss"]) for r in log)
    eager = tmp_path / "eager"
    _run(study, eager, tiny_train_cfg(device="cuda", workers=0, epochs=2))
    first = read_log(eager / "log.csv")[0]["train_loss"]
    assert log[0]["train_loss"] == pytest.approx(first, rel=2e-2)
