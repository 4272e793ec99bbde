"""Reference predictors that the neural models must beat.

- ``mean``: predicts the training-set mean expression for every spot. Its per-gene Pearson is
  undefined (a constant prediction) while its per-spot "paper" figure is high: the control that
  exposes the per-spot metric.
- ``ridge``: ridge regression on handcrafted colour and texture features of the same views
  (per view: RGB/HSV/HED channel means and standard deviations, grey-level statistics, gradient
  magnitude, Laplacian variance, a uniform-LBP histogram and GLCM properties), standardised on
  the training spots, with the penalty chosen on the validation spots by mean per-gene Pearson.

Both follow the harness interface of the neural models (:class:`Predictor`): fitted on the
training spots of a split, they turn a :class:`~m2ost.learn.inputs.loader.SpotDataset` into an
(n_spots, n_genes) array, and they are saved to and loaded from the same ``model.pt`` format.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from m2ost.learn.inputs.loader import SpotDataset, make_loader
from m2ost.errors import InputError
from m2ost.eval.metrics import mean_gene_pcc

DEFAULT_ALPHAS = tuple(float(a) for a in 10.0 ** np.arange(-2.0, 5.01, 0.5))

_STATS = ("mean", "std")
FEATURE_NAMES = (
    [f"rgb_{c}_{s}" for c in "rgb" for s in _STATS]
    + [f"hsv_{c}_{s}" for c in "hsv" for s in _STATS]
    + [f"hed_{c}_{s}" for c in "hed" for s in _STATS]
    + ["grey_mean", "grey_std", "gradient_mean", "laplacian_var"]
    + [f"lbp_{i}" for i in range(10)]
    + [f"glcm_d{d}_{p}" for d in (1, 4)
       for p in ("contrast", "homogeneity", "energy", "correlation")]
)


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> HSV in [0, 1] (a fast version of skimage's rgb2hsv)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    safe = np.where(delta > 0, delta, 1.0)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe,
                                                  4.0 + (r - g) / safe))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1.0), 0.0)
    return np.stack([h, s, v], -1)


def _channel_stats(a: np.ndarray) -> list[float]:
    flat = np.ascontiguousarray(a.reshape(-1, 3).T)  # channel-major: fast reductions
    return list(np.stack([flat.mean(1), flat.std(1)], 1).ravel())


def view_features(img: np.ndarray) -> np.ndarray:
    """A fixed-length colour/texture vector (``len(FEATURE_NAMES)``) of one uint8 RGB view."""
    from skimage.color import rgb2hed
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
    from skimage.filters import laplace, sobel

    rgb = img.astype(np.float32) / 255.0
    feats = []
    for space in (rgb, _hsv(rgb), rgb2hed(rgb)):
        feats += _channel_stats(space)
    grey = rgb @ np.array([0.2125, 0.7154, 0.0721], np.float32)  # skimage's rgb2gray weights
    feats += [grey.mean(), grey.std(), sobel(grey).mean(), laplace(grey).var()]
    grey8 = (grey * 255).astype(np.uint8)
    lbp = local_binary_pattern(grey8, P=8, R=1, method="uniform")
    feats.extend(np.bincount(lbp.astype(np.int64).ravel(), minlength=10)[:10] / lbp.size)
    q = grey8 // 8  # 32 grey levels keep the GLCM small and fast
    glcm = graycomatrix(q, distances=[1, 4], angles=[0, np.pi / 2], levels=32, symmetric=True,
                        normed=True)
    for d in range(2):
        for prop in ("contrast", "homogeneity", "energy", "correlation"):
            with np.errstate(invalid="ignore", divide="ignore"):
                feats.append(np.nanmean(graycoprops(glcm, prop)[d]))
    out = np.nan_to_num(np.asarray(feats, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return out.astype(np.float32)


class _Features(Dataset):
    """Features of every (un-augmented) item of a SpotDataset, computed in the loader workers."""

    def __init__(self, dataset: SpotDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        views = self.dataset.read(i)
        return torch.from_numpy(np.concatenate([view_features(v) for v in views]))


def extract_features(dataset: SpotDataset, workers: int = 0, batch_size: int = 64) -> np.ndarray:
    """(n_items, n_views * n_features) float64 features of ``dataset`` in item order."""
    if len(dataset) == 0:
        return np.zeros((0, len(dataset.views) * len(FEATURE_NAMES)))
    loader = make_loader(_Features(dataset), batch_size, workers)
    return np.concatenate([b.numpy() for b in loader]).astype(np.float64)


# --------------------------------------------------------------------------------------------

class MeanPredictor:
    """Predicts the mean training expression for every spot."""

    kind = "mean"

    def __init__(self, mean: np.ndarray | None = None):
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)

    def fit(self, train: SpotDataset, val: SpotDataset | None = None,
            workers: int = 0) -> list[dict]:
        """Fit on the training spots; return log rows (validation scores)."""
        y = train.targets()
        if len(y) == 0:
            raise InputError("no training spots to fit the mean predictor")
        self.mean = y.mean(axis=0).astype(np.float32)
        row = {"val_loss": float("nan"), "val_gene_pcc": float("nan")}
        if val is not None and len(val):
            yv = val.targets()
            row["val_loss"] = float(((yv - self.mean) ** 2).mean())
            row["val_gene_pcc"] = mean_gene_pcc(yv, np.broadcast_to(self.mean, yv.shape))
        return [row]

    def predict(self, dataset: SpotDataset, batch_size: int = 64, workers: int = 0) -> np.ndarray:
        return np.tile(self.mean, (len(dataset), 1))

    def state(self) -> dict:
        return {"mean": torch.from_numpy(self.mean)}

    @classmethod
    def from_state(cls, state: dict) -> MeanPredictor:
        return cls(state["mean"].numpy())


class RidgePredictor:
    """Ridge regression on :func:`view_features` of the selected views.

    Parameters
    ----------
    alphas
        Penalties tried; the one with the best mean per-gene Pearson on the validation spots is
        kept (ties and undefined scores fall back to the lower validation MSE). Without
        validation spots, leave-one-out cross-validation on the training spots picks it.
    """

    kind = "ridge"

    def __init__(self, alphas=DEFAULT_ALPHAS):
        self.alphas = tuple(float(a) for a in alphas)
        self.alpha: float | None = None
        self.x_mean = self.x_scale = self.coef = self.intercept = None

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return (x - self.x_mean) / self.x_scale

    def fit(self, train: SpotDataset, val: SpotDataset | None = None,
            workers: int = 0) -> list[dict]:
        """Fit on the training spots, choose alpha on ``val``; return one log row per alpha."""
        x = extract_features(train, workers)
        y = train.targets().astype(np.float64)
        if len(y) < 2:
            raise InputError(f"ridge needs at least 2 training spots, got {len(y)}")
        self.x_mean = x.mean(0)
        scale = x.std(0)
        self.x_scale = np.where(scale > 1e-12, scale, 1.0)  # constant features stay 0
        xs = self._standardise(x)
        y_mean = y.mean(0)
        u, s, vt = np.linalg.svd(xs, full_matrices=False)
        uty = u.T @ (y - y_mean)

        def solve(alpha):
            return vt.T @ ((s / (s ** 2 + alpha))[:, None] * uty)

        rows = []
        if val is not None and len(val):
            xv = self._standardise(extract_features(val, workers))
            yv = val.targets().astype(np.float64)
            best = None
            for alpha in self.alphas:
                coef = solve(alpha)
                pred = xv @ coef + y_mean
                row = {"alpha": alpha, "val_loss": float(((pred - yv) ** 2).mean()),
                       "val_gene_pcc": mean_gene_pcc(yv, pred)}
                rows.append(row)
                pcc = row["val_gene_pcc"]
                key = (pcc if np.isfinite(pcc) else -np.inf, -row["val_loss"])
                if best is None or key > best[0]:
                    best = (key, alpha)
            self.alpha = best[1]
        else:
            from sklearn.linear_model import RidgeCV

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.alpha = float(RidgeCV(alphas=self.alphas).fit(xs, y).alpha_)
            rows.append({"alpha": self.alpha, "val_loss": float("nan"),
                         "val_gene_pcc": float("nan")})
        for row in rows:
            row["chosen"] = row["alpha"] == self.alpha
        self.coef = solve(self.alpha)
        self.intercept = y_mean
        return rows

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        return (self._standardise(x) @ self.coef + self.intercept).astype(np.float32)

    def predict(self, dataset: SpotDataset, batch_size: int = 64, workers: int = 0) -> np.ndarray:
        return self.predict_features(extract_features(dataset, workers, batch_size))

    def state(self) -> dict:
        t = torch.from_numpy
        return {"alpha": self.alpha, "alphas": list(self.alphas), "x_mean": t(self.x_mean),
                "x_scale": t(self.x_scale), "coef": t(self.coef), "intercept": t(self.intercept)}

    @classmethod
    def from_state(cls, state: dict) -> RidgePredictor:
        r = cls(state["alphas"])
        r.alpha = state["alpha"]
        r.x_mean, r.x_scale = state["x_mean"].numpy(), state["x_scale"].numpy()
        r.coef, r.intercept = state["coef"].numpy(), state["intercept"].numpy()
        return r


BASELINES = {"mean": MeanPredictor, "ridge": RidgePredictor}
