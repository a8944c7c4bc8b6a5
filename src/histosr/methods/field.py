"""A smooth spatial field of normalised spot expression: a Gaussian kernel smoother
(Nadaraya-Watson) over the measured spots, bandwidth chosen by leave-one-out.

Why a kernel smoother and not kriging: it has one parameter (the bandwidth), its
leave-one-out predictions cost nothing extra (drop the spot's own weight), it is linear in
the spot values (so it is fitted once for all genes) and it stays bounded by the measured
values. With the nearest ``k`` spots only, it costs O(points x k x genes) and streams.

Positions are in um (x = column, y = row); values are any per-spot quantity, in histosr
log1p CP10k of the spot's own library (the scale the protocols score) and the library per
footprint superpixel (to turn a log1p CP10k map back into counts per superpixel).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

#: candidate bandwidths, in multiples of the spot pitch (median nearest-neighbour distance)
BANDWIDTHS = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0)
#: weight of the global mean in the smoother (keeps points far from every spot finite)
PRIOR = 1e-6
_BLOCK = 2**24  # float32 elements of one (points x genes) block


def pitch_um(xy_um: np.ndarray) -> float:
    """Median nearest-neighbour distance of the points (um); 1 for fewer than 2 points."""
    if len(xy_um) < 2:
        return 1.0
    d, _ = cKDTree(xy_um).query(xy_um, k=2)
    return float(max(np.median(d[:, 1]), 1e-6))


class KernelField:
    """Gaussian kernel smoother of ``values`` (n_spots x q) at spot positions ``xy_um``
    over the nearest spots (at most ``k``; no more than lie within 3 bandwidths on a lattice
    of this pitch, where the kernel has fallen below 1 %), bandwidth ``h_um``."""

    def __init__(self, xy_um: np.ndarray, values: np.ndarray, h_um: float, k: int = 32):
        self.xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
        self.values = np.asarray(values, dtype=np.float32)
        if self.values.ndim == 1:
            self.values = self.values[:, None]
        self.h = float(h_um)
        # spots within 3 h on a square lattice of the median pitch (a hexagonal one holds
        # fewer), plus one
        reach = int(np.ceil(np.pi * (3 * self.h) ** 2 / pitch_um(self.xy) ** 2)) + 1
        self.k = int(max(1, min(k, reach, len(self.xy))))
        self.tree = cKDTree(self.xy)
        self.mean = self.values.mean(axis=0) if len(self.values) else np.zeros(
            self.values.shape[1], np.float32)

    def _weights(self, xy: np.ndarray, loo: bool) -> tuple[np.ndarray, np.ndarray]:
        k = min(self.k + int(loo), len(self.xy))
        d, idx = self.tree.query(xy, k=k)
        d, idx = d.reshape(len(xy), k), idx.reshape(len(xy), k)
        if loo:  # the point itself is its own nearest neighbour: drop it
            d, idx = d[:, 1:], idx[:, 1:]
        w = np.exp(-0.5 * (d / self.h) ** 2)
        return w, idx

    def __call__(self, xy_um: np.ndarray, loo: bool = False) -> np.ndarray:
        """(m, q) float32 smoothed values at ``xy_um`` (m, 2); ``loo=True`` means the
        points are the spots themselves, each predicted without its own value."""
        xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
        q = self.values.shape[1]
        out = np.empty((len(xy), q), dtype=np.float32)
        step = max(256, _BLOCK // max(q, 1))
        import scipy.sparse as sp

        for a in range(0, len(xy), step):
            w, idx = self._weights(xy[a : a + step], loo)
            tot = w.sum(axis=1, keepdims=True) + PRIOR
            m, kk = w.shape
            # a sparse (points x spots) weight matrix: one C-level product for all genes
            W = sp.csr_matrix(((w / tot).ravel().astype(np.float32), idx.ravel(),
                               np.arange(0, m * kk + 1, kk)), shape=(m, len(self.xy)))
            out[a : a + step] = W @ self.values + (PRIOR / tot) * self.mean
        return out


def loo_bandwidth(xy_um: np.ndarray, values: np.ndarray, k: int = 32,
                  candidates=BANDWIDTHS) -> tuple[float, dict]:
    """The bandwidth (um) among ``candidates`` x pitch with the smallest leave-one-out
    squared error, each column weighted by 1 / its variance (so every gene counts, not the
    most expressed); returns (h_um, {h_um: relative LOO error})."""
    p = pitch_um(xy_um)
    v = np.asarray(values, dtype=np.float64)
    var = v.var(axis=0)
    wcol = np.where(var > 1e-12, 1.0 / np.maximum(var, 1e-12), 0.0)
    errs = {}
    for c in candidates:
        h = float(c) * p
        pred = KernelField(xy_um, values, h, k)(xy_um, loo=True)
        errs[h] = float((((pred - v) ** 2) * wcol).mean())
    best = min(errs, key=errs.get)
    return best, errs


def spatial_folds(xy_um: np.ndarray, n_folds: int, block_um: float, seed: int) -> np.ndarray:
    """Fold (0..n_folds-1) of each point: square blocks of side ``block_um`` assigned to
    folds at random (seeded), so a held-out point's close neighbours are mostly held out
    with it (spatially blocked cross-validation)."""
    xy = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    b = np.floor((xy - xy.min(axis=0)) / max(block_um, 1e-6)).astype(np.int64)
    _, block = np.unique(b, axis=0, return_inverse=True)
    block = np.asarray(block).ravel()
    n_blocks = int(block.max()) + 1 if len(block) else 0
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 7])).permutation(n_blocks)
    fold_of_block = np.empty(n_blocks, dtype=np.int64)
    fold_of_block[order] = np.arange(n_blocks) % n_folds
    return fold_of_block[block]


__all__ = ["KernelField", "loo_bandwidth", "spatial_folds", "pitch_um", "BANDWIDTHS"]
