"""The embedding stage: pretrained-encoder features of every spot and view of a bundle.

``results/embeddings/{encoder}/{sample}.h5`` (rule ``embed``), per bundle row (bundle order):

``barcode``   (n,) spot ids, as in the bundle
``pooled``    (n, V, D) float32, the encoder's pooled features of each view: its output, then its
              last ``encoder.levels`` intermediate stages (sizes in the encoder record's ``blocks``)
``tokens``    (n, V, h*w, C) float16, its token grid (only with ``encoder.tokens``): the output's
              channels, then the last ``encoder.token_levels`` stages' maps pooled to its grid
              (sizes in the encoder record's ``token_blocks``)
attributes    sample, views (JSON: the bundle's fov_um / size_px), encoder (JSON: settings,
              weights checksum, dim), grid (h, w; 0, 0 without tokens), bundle_digest,
              format_version, provenance (JSON)

Spots are read, encoded and written batch by batch, so memory stays bounded whatever the number
of spots (``batch_size`` 0 / "auto": sized from the free memory, m2ost.learn.features.sizing); the
file gets its final name only when complete, and the log gives the spots per second. ``bundle_digest`` (a hash of the
bundle's spot ids and per-spot view digests) ties the file to the exact bundle it was computed
from: :func:`read_embeddings` refuses a file whose bundle changed since.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np
import xxhash
from tqdm.auto import tqdm

from m2ost.atomic import atomic_path
from m2ost.errors import InputError
from m2ost.learn.inputs.dataset import read_bundle_info
from m2ost.learn.features import sizing
from m2ost.learn.features.encoders import TOKEN_KEYS, Encoder, stored_settings
from m2ost.provenance import provenance_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The token cache (float16) on disk: byte-shuffled and lzf-compressed, one chunk per spot and view
# (docs/encoders.md gives the bytes per spot; encoder.token_grid shrinks it further).
TOKEN_COMPRESSION = {"shuffle": True, "compression": "lzf"}


def bundle_digest(bundle: str | os.PathLike, sample: str | None = None) -> str:
    """A hash of a bundle's spot ids and per-spot view digests (cheap: no image is read)."""
    try:
        with h5py.File(bundle, "r") as f:
            h = xxhash.xxh3_64()
            for b in f["barcode"][:]:
                h.update(b if isinstance(b, bytes) else str(b).encode())
                h.update(b"\0")
            h.update(np.ascontiguousarray(f["spot_digest"][:], np.uint64).tobytes())
            for key in ("size_px", "fov_um"):
                h.update(np.asarray(f.attrs[key], np.float64).tobytes())
    except (OSError, KeyError) as err:
        raise InputError(f"not a readable spot bundle ({err})", file=bundle, sample=sample) from None
    return h.hexdigest()


def _views_record(info: dict) -> list[dict]:
    return [{"fov_um": info["fov_um"][v], "size_px": info["size_px"][v]} for v in range(info["n_views"])]


def _warn_resolution(encoder: Encoder, info: dict, sample: str) -> None:
    """Warn of each view that reaches the encoder more than 2x away from its ``mpp``."""
    mpp = encoder.settings.get("mpp")
    for v in range(info["n_views"] if mpp else 0):
        got = info["fov_um"][v] / int(encoder.settings["input_px"])
        if not 0.5 <= got / float(mpp) <= 2.0:
            log.warning("sample %s view %d reaches the encoder at %.2f um/px; it expects about %.2f",
                        sample, v, got, float(mpp))


def write_embeddings(encoder: Encoder, bundle: str | os.PathLike, out: str | os.PathLike, *,
                     sample: str | None = None, tokens: bool = False, batch_size: int = 64,
                     progress: bool = True) -> dict:
    """Encode every view of every spot of ``bundle`` into ``out`` (see the module docstring).

    Returns the file's attributes.
    """
    info = read_bundle_info(bundle, sample)
    sample = sample or info["sample"]
    n, n_views = info["n_spots"], info["n_views"]
    _warn_resolution(encoder, info, sample)
    attrs = {"sample": sample, "views": json.dumps(_views_record(info)),
             "encoder": json.dumps(encoder.record(), sort_keys=True),
             "bundle_digest": bundle_digest(bundle, sample), "format_version": FORMAT_VERSION,
             "provenance": provenance_json({"encoder": encoder.record(), "tokens": bool(tokens),
                                            "bundle": str(bundle)})}
    batch_size = sizing.auto_batch_size(encoder, tokens) if sizing.wants_auto(batch_size) else max(1, int(batch_size))
    started = time.perf_counter()
    with atomic_path(out) as tmp, h5py.File(bundle, "r") as src, h5py.File(tmp, "w") as dst:
        dst.create_dataset("barcode", data=src["barcode"][:], dtype=h5py.string_dtype())
        pooled = dst.create_dataset("pooled", (n, n_views, encoder.dim), np.float32,
                                    chunks=(max(1, min(n, 256)), n_views, encoder.dim))
        grid, tok = (0, 0), None
        bar = tqdm(total=n, desc=f"embed {sample}", unit="spot", disable=not progress)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            for v in range(n_views):
                out_v = encoder.encode(src[f"view_{v}"][start:stop], tokens=tokens)
                if tokens:
                    out_v, grid_v = out_v
                    if tok is None:
                        grid = grid_v.shape[1:3]
                        cells = grid[0] * grid[1]
                        tok = dst.create_dataset("tokens", (n, n_views, cells, grid_v.shape[-1]),
                                                 np.float16, chunks=(1, 1, cells, grid_v.shape[-1]),
                                                 **TOKEN_COMPRESSION)
                    tok[start:stop, v] = grid_v.reshape(stop - start, -1, grid_v.shape[-1]).astype(np.float16)
                pooled[start:stop, v] = out_v
            bar.update(stop - start)
        bar.close()
        attrs["grid"] = np.asarray(grid, np.int64)
        for key, value in attrs.items():
            dst.attrs[key] = value
    seconds = time.perf_counter() - started
    log.info("embedded %d spots x %d views of %s in %.1f s: %.2f spots/s (batch %d, %s)", n, n_views, sample,
             seconds, n / max(seconds, 1e-9), batch_size, encoder.device)
    return attrs


@dataclass
class Embeddings:
    """The content of one embeddings file (see the module docstring)."""

    sample: str
    barcode: np.ndarray          # (n,) str
    pooled: np.ndarray           # (n, V, D) float32
    tokens: np.ndarray | None    # (n, V, h*w, C) float16, when read with tokens=True
    grid: tuple[int, int]        # token grid (h, w); (0, 0) when the file has no tokens
    encoder: dict                # settings, checksum, dim
    views: list[dict]            # the bundle's views: fov_um, size_px
    bundle_digest: str


def _read_open_file(f: h5py.File, path: str | os.PathLike, sample: str | None,
                    rows: Sequence[int] | None, tokens: bool) -> Embeddings:
    """The contents of an open embeddings file (see :func:`read_embeddings`), checked."""
    a = f.attrs
    if int(a.get("format_version", -1)) != FORMAT_VERSION:
        raise InputError("not an embeddings file of this m2ost version; rerun the embed stage",
                         file=path, sample=sample)
    stored = json.loads(a["encoder"])
    got = Embeddings(sample=str(a["sample"]), barcode=None, pooled=None, tokens=None,
                     grid=tuple(int(g) for g in a["grid"]), encoder=stored,
                     views=json.loads(a["views"]), bundle_digest=str(a["bundle_digest"]))
    if sample is not None and got.sample != sample:
        raise InputError(f"embeddings of sample {got.sample}, expected {sample}", file=path,
                         sample=sample)
    n = f["pooled"].shape[0]
    sel = np.arange(n) if rows is None else np.asarray(rows, np.int64)
    if sel.size and (sel.min() < 0 or sel.max() >= n):
        raise InputError(f"rows outside the {n} spots of the embeddings", file=path, sample=sample)
    barcode = f["barcode"][:]
    got.barcode = np.array([b.decode() if isinstance(b, bytes) else str(b) for b in barcode],
                           dtype=object)[sel]
    got.pooled = _take(f["pooled"], sel).astype(np.float32, copy=False)
    if tokens:
        if "tokens" not in f:
            raise InputError("embeddings hold no token grid (set encoder.tokens: true and rerun "
                             "the embed stage)", file=path, sample=sample)
        got.tokens = _take(f["tokens"], sel)
    return got


def _check_encoder(stored: dict, encoder: dict, tokens: bool, path: str | os.PathLike,
                   sample: str | None) -> None:
    """The file's encoder record ``stored`` must match ``encoder`` (see :func:`read_embeddings`)."""
    had = stored_settings(stored) if "settings" in stored else {}
    # the pooled features do not depend on what the token grids carry
    keys = [k for k in encoder.get("settings", {}) if tokens or k not in TOKEN_KEYS]
    differ = [k for k in keys if had.get(k) != encoder["settings"][k]]
    if encoder.get("checksum") != stored.get("checksum"):
        differ.append("weights file checksum")
    if differ:
        raise InputError(f"embeddings were computed with another encoder (differs in: {', '.join(differ)}); "
                         "rerun the embed stage", file=path, sample=sample)


def read_embeddings(path: str | os.PathLike, sample: str | None = None, tokens: bool = False, *,
                    bundle: str | os.PathLike | None = None, rows: Sequence[int] | None = None,
                    encoder: dict | None = None) -> Embeddings:
    """Read an embeddings file, with checks.

    Parameters
    ----------
    tokens
        Also read the token grid (an error when the file has none: set ``encoder.tokens``).
    bundle
        The bundle the file must have been computed from (its spots and views unchanged).
    rows
        Bundle rows to read (default all), e.g. ``SampleData.rows``.
    encoder
        An :meth:`Encoder.record` the file must match (same settings and weights checksum;
        ``token_levels`` only when the tokens are read).
    """
    try:
        with h5py.File(path, "r") as f:
            got = _read_open_file(f, path, sample, rows, tokens)
    except FileNotFoundError:
        raise InputError("embeddings file not found (run the embed stage)", file=path, sample=sample) from None
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"not a readable embeddings file ({err}); delete it and rerun the embed stage",
                         file=path, sample=sample) from None
    if bundle is not None and bundle_digest(bundle, sample) != got.bundle_digest:
        raise InputError(f"embeddings were computed from another version of the bundle {bundle}; "
                         "rerun the embed stage", file=path, sample=sample)
    if encoder is not None:
        _check_encoder(got.encoder, encoder, tokens, path, sample)
    return got


def _take(ds: h5py.Dataset, sel: np.ndarray) -> np.ndarray:
    """Rows ``sel`` (any order) of a dataset, read in sorted order (h5py needs increasing indices)."""
    if sel.size == ds.shape[0] and np.array_equal(sel, np.arange(ds.shape[0])):
        return ds[:]
    order = np.argsort(sel, kind="stable")
    uniq, inverse = np.unique(sel[order], return_inverse=True)
    block = ds[uniq] if uniq.size else np.zeros((0, *ds.shape[1:]), ds.dtype)
    out = np.empty((sel.size, *ds.shape[1:]), ds.dtype)
    out[order] = block[inverse]
    return out
