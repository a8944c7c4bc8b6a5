"""Input and target scaling shared by the learned methods: z-scored features (statistics of
the training data) and per-gene min-max targets (iStar's scale)."""

from __future__ import annotations

import numpy as np


def feature_stats(X: np.ndarray, standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """float32 (mean, std) per column of ``X`` for z-scoring (a column with std < 1e-6 keeps
    std 1); ``standardize=False``: zeros and ones (the features are used as they are)."""
    X = np.asarray(X)
    if not standardize:
        return np.zeros(X.shape[-1], np.float32), np.ones(X.shape[-1], np.float32)
    mu, sd = X.mean(axis=0), X.std(axis=0)
    sd[sd < 1e-6] = 1.0
    return mu.astype(np.float32), sd.astype(np.float32)


def minmax(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column min-max scaling: (float32 Y in [0, 1], float32 min, float32 scale); a
    constant column keeps scale 1. ``Y01 * scale + min`` undoes it."""
    lo, hi = Y.min(axis=0), Y.max(axis=0)
    scale = np.where(hi - lo > 0, hi - lo, 1.0)
    return ((Y - lo) / scale).astype(np.float32), lo.astype(np.float32), scale.astype(np.float32)


__all__ = ["feature_stats", "minmax"]
