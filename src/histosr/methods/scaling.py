"""Input and target scaling shared by the learned methods: z-scored features (statistics of
the training data) and per-gene min-max targets (iStar's scale)."""

from __future__ import annotations

import numpy as np

#: feature columns per block of feature_stats (bounds its temporaries)
_STATS_COLS = 16


def feature_stats(X: np.ndarray, standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """float32 (mean, std) per column of ``X`` for z-scoring (a column with std < 1e-6 keeps
    std 1); ``standardize=False``: zeros and ones (the features are used as they are)."""
    X = np.asarray(X)
    d = X.shape[-1]
    if not standardize:
        return np.zeros(d, np.float32), np.ones(d, np.float32)
    if X.ndim != 2:
        raise ValueError(f"feature_stats expects (rows, features), got shape {X.shape}")
    # a few columns at a time: std's (X - mean) temporary is (rows x 16), not X's size (200 MB
    # for a whole slide's footprint superpixels); blocks of >= 4 columns reduce row by row
    # like the whole array does (the same numbers)
    edges = list(range(0, d, _STATS_COLS))
    if len(edges) > 1 and d - edges[-1] < 4:
        edges.pop()
    edges.append(d)
    mu = np.concatenate([X[:, a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])])
    sd = np.concatenate([X[:, a:b].std(axis=0) for a, b in zip(edges[:-1], edges[1:])])
    sd[sd < 1e-6] = 1.0
    return mu.astype(np.float32), sd.astype(np.float32)


def minmax(Y: np.ndarray, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column min-max scaling: (float32 Y in [0, 1], float32 min, float32 scale); a
    constant column keeps scale 1. ``Y01 * scale + min`` undoes it. ``overwrite=True``
    scales a float ndarray ``Y`` in place before the float32 cast (same values, no
    temporaries of Y's size: a whole slide's spots x genes float64 is 172 MB)."""
    lo, hi = Y.min(axis=0), Y.max(axis=0)
    scale = np.where(hi - lo > 0, hi - lo, 1.0)
    if overwrite and isinstance(Y, np.ndarray) and Y.dtype.kind == "f":
        Y -= lo
        Y /= scale
        out = Y.astype(np.float32)
    else:
        out = ((Y - lo) / scale).astype(np.float32)
    return out, lo.astype(np.float32), scale.astype(np.float32)


def minmax_rows(row_blocks, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`minmax` of the rows that ``row_blocks()`` yields, block after block (called
    twice: min/max, then the scaled float32 rows), so only the float32 result is held
    whole: no float64 (rows x columns) copy. The same numbers as ``minmax`` of the stacked
    blocks."""
    lo = hi = None
    for b in row_blocks():
        bl, bh = b.min(axis=0), b.max(axis=0)
        lo = bl if lo is None else np.minimum(lo, bl)
        hi = bh if hi is None else np.maximum(hi, bh)
    scale = np.where(hi - lo > 0, hi - lo, 1.0)
    Y = np.empty((int(n_rows), len(lo)), dtype=np.float32)
    a = 0
    for b in row_blocks():
        Y[a : a + len(b)] = (b - lo) / scale  # rounded to float32 as astype does
        a += len(b)
    if a != n_rows:
        raise ValueError(f"row blocks gave {a} rows, expected {n_rows}")
    return Y, lo.astype(np.float32), scale.astype(np.float32)


__all__ = ["feature_stats", "minmax", "minmax_rows"]


class FootprintSampler:
    """Per training spot, a fresh random subset of at most ``max_cells`` of its footprint
    cells each epoch, with weights 1/k, so that the weighted sum of the subset's predictions
    is an unbiased estimate of the footprint mean (iStar / HISTEX difference (c)).

    ``cells``: per spot, a non-empty int array of indices into the model's inputs. The
    padded (n_spots, n_max) index matrix repeats each spot's first index; padding sorts last
    in every draw and has weight 0."""

    def __init__(self, cells: list[np.ndarray], max_cells: int | None):
        import torch

        n = np.array([len(s) for s in cells])
        self.n_max = int(n.max())
        self.m = self.n_max if max_cells is None else min(self.n_max, int(max_cells))
        self.subsample = self.m < self.n_max
        P = np.empty((len(cells), self.n_max), dtype=np.int64)
        for i, s in enumerate(cells):
            P[i, : len(s)] = s
            P[i, len(s):] = s[0]
        self.padded = P
        self._P = torch.from_numpy(P)
        self._valid = torch.arange(self.n_max)[None, :] < torch.from_numpy(n)[:, None]
        k = torch.from_numpy(np.minimum(n, self.m))
        #: (n_spots, m) weights: 1/k on a spot's k drawn cells, 0 on padding
        self.weights = (torch.arange(self.m)[None, :] < k[:, None]).float() / k[:, None].float()

    def draw(self, generator):
        """(n_spots, m) indices of this epoch's cells (all of them when no subsampling:
        then no random number is drawn)."""
        import torch

        if not self.subsample:
            return self._P
        u = torch.rand(self._P.shape[0], self.n_max, generator=generator)
        u[~self._valid] = 2.0  # padding sorts last
        return self._P.gather(1, u.argsort(dim=1)[:, : self.m])


__all__ += ["FootprintSampler"]
