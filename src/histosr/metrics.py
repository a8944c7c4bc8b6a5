"""Scores: per-gene PCC / Spearman / RMSE across spots, MAE, MSE, SSIM and RMSE on 8 um
maps. The only code that turns predictions into the numbers
of ``BENCHMARKS.md``.

Matrices are (observations x genes): rows are spots or superpixels, columns genes. Maps are
(H, W, G) cubes on the superpixel grid, like ``Section.truth["cube"]``.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

# relative spread below which a column counts as constant (float32 rounding is ~1e-7)
_REL_TOL = 1e-6


def _dense(x) -> np.ndarray:
    from .arrays import dense

    return dense(x)


def _as_2d(x) -> np.ndarray:
    x = _dense(x)
    return x[:, None] if x.ndim == 1 else x


def log_cp10k(counts, library_size=None) -> np.ndarray:
    """log1p(counts / library * 1e4) per row (spot). ``library_size`` (n,) defaults to the
    row sums of ``counts``; a row with library 0 scores 0 everywhere."""
    x = _as_2d(counts)
    lib = x.sum(axis=1) if library_size is None else _dense(library_size).ravel()
    if lib.shape[0] != x.shape[0]:
        raise InputError(f"library_size has {lib.shape[0]} entries for {x.shape[0]} rows")
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(x * scale[:, None])


def _check_pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    p, t = _as_2d(pred), _as_2d(truth)
    if p.shape != t.shape:
        raise InputError(f"prediction {p.shape} and truth {t.shape} differ in shape")
    return p, t


#: genes per block of :func:`pcc_per_gene`: its float64 temporaries are (rows x block), not
#: (rows x genes) - 21,000 spots x 1000 genes would otherwise need ~1 GB of them
PCC_BLOCK = 128


def pcc_per_gene(pred, truth) -> np.ndarray:
    """Pearson r per column (gene) across rows. A gene constant (or non-finite) in the
    prediction or the truth scores 0 (the BENCHMARKS rule). Computed in blocks of
    :data:`PCC_BLOCK` columns (float64), each column on its own: the same numbers."""
    p, t = _check_pair(pred, truth)
    r = np.zeros(p.shape[1])
    if p.shape[0] < 2:
        return r
    n = p.shape[0]
    for j0 in range(0, p.shape[1], PCC_BLOCK):
        pb = np.asarray(p[:, j0 : j0 + PCC_BLOCK], dtype=np.float64)
        tb = np.asarray(t[:, j0 : j0 + PCC_BLOCK], dtype=np.float64)
        pc = pb - pb.mean(axis=0)
        tc = tb - tb.mean(axis=0)
        num = (pc * tc).sum(axis=0)
        spp, stt = (pc**2).sum(axis=0), (tc**2).sum(axis=0)
        den = np.sqrt(spp * stt)
        # a column constant up to float32 rounding (relative spread < _REL_TOL) is constant
        flat = ((np.sqrt(spp / n) <= _REL_TOL * np.abs(pb).max(axis=0))
                | (np.sqrt(stt / n) <= _REL_TOL * np.abs(tb).max(axis=0)))
        ok = np.isfinite(den) & (den > 0) & ~flat
        rb = np.zeros(pb.shape[1])
        rb[ok] = num[ok] / den[ok]
        r[j0 : j0 + PCC_BLOCK] = rb
    return np.clip(r, -1.0, 1.0)


def pcc_log_cp10k(pred, truth) -> np.ndarray:
    """Per-gene PCC of log1p CP10k of ``pred`` and ``truth`` (rows x genes, dense or
    sparse), each row with its own library over the columns given: composition, not
    library size. Gene block by gene block (:data:`PCC_BLOCK`), so memory is that of the
    inputs plus (rows x block) temporaries."""
    from .arrays import dense, row_sums

    if pred.shape != truth.shape:
        raise InputError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    lp, lt = row_sums(pred), row_sums(truth)
    r = np.zeros(pred.shape[1])
    for j0 in range(0, pred.shape[1], PCC_BLOCK):
        j1 = min(j0 + PCC_BLOCK, pred.shape[1])
        r[j0:j1] = pcc_per_gene(log_cp10k(dense(pred[:, j0:j1]), lp),
                                log_cp10k(dense(truth[:, j0:j1]), lt))
    return r


def spearman_per_gene(pred, truth) -> np.ndarray:
    """Spearman rho per gene (Pearson r of average ranks); constant genes score 0."""
    from scipy.stats import rankdata

    p, t = _check_pair(pred, truth)
    return pcc_per_gene(rankdata(p, axis=0), rankdata(t, axis=0))


def rmse_per_gene(pred, truth) -> np.ndarray:
    """Root mean squared error per gene across rows."""
    p, t = _check_pair(pred, truth)
    return np.sqrt(((p - t) ** 2).mean(axis=0))


def mae(pred, truth) -> float:
    """Mean absolute error over all entries."""
    p, t = _check_pair(pred, truth)
    return float(np.abs(p - t).mean())


def mse(pred, truth) -> float:
    """Mean squared error over all entries."""
    p, t = _check_pair(pred, truth)
    return float(((p - t) ** 2).mean())


def _maps(x, mask: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[..., None]
    if x.shape[:2] != mask.shape:
        raise InputError(f"maps {x.shape[:2]} and mask {mask.shape} differ in shape")
    return x


def normalise_maps(maps, mask) -> np.ndarray:
    """Per-gene min-max normalisation of (H, W, G) maps over the tissue superpixels, with
    everything outside the tissue set to 0 (BENCHMARKS P4). A gene constant over the tissue
    becomes 0 there."""
    mask = np.asarray(mask, dtype=bool)
    x = _maps(maps, mask)
    vals = x[mask]  # (n_tissue, G)
    out = np.zeros_like(x)
    if vals.size == 0:
        return out
    lo, hi = vals.min(axis=0), vals.max(axis=0)
    rng = hi - lo
    scale = np.divide(1.0, rng, out=np.zeros_like(rng), where=rng > 0)
    out[mask] = (vals - lo) * scale
    return out


def ssim_per_gene(pred_maps, truth_maps, mask) -> np.ndarray:
    """SSIM per gene between (H, W, G) maps (BENCHMARKS P4, HISTEX SSIM.py): each map is
    min-max normalised per gene over the tissue, outside tissue = 0, then skimage
    ``structural_similarity(truth, pred, data_range=1)`` with its default 7x7 window on the
    whole map."""
    from skimage.metrics import structural_similarity

    mask = np.asarray(mask, dtype=bool)
    p = normalise_maps(pred_maps, mask)
    t = normalise_maps(truth_maps, mask)
    if p.shape != t.shape:
        raise InputError(f"prediction maps {p.shape} and truth maps {t.shape} differ in shape")
    if min(mask.shape) < 7:
        raise InputError(f"SSIM needs maps of at least 7x7 superpixels, got {mask.shape}")
    return np.array([structural_similarity(t[..., g], p[..., g], data_range=1.0)
                     for g in range(p.shape[2])])


def rmse_maps(pred_maps, truth_maps, mask) -> np.ndarray:
    """RMSE per gene between (H, W, G) maps after the SSIM normalisation, over tissue
    superpixels only (HISTEX RMSE.py)."""
    mask = np.asarray(mask, dtype=bool)
    p = normalise_maps(pred_maps, mask)[mask]
    t = normalise_maps(truth_maps, mask)[mask]
    if p.shape != t.shape:
        raise InputError(f"prediction maps {p.shape} and truth maps {t.shape} differ in shape")
    return rmse_per_gene(p, t)


__all__ = [
    "log_cp10k", "pcc_per_gene", "spearman_per_gene", "rmse_per_gene", "mae", "mse",
    "normalise_maps", "ssim_per_gene", "rmse_maps",
]


def pcc_within_groups(pred, truth, groups) -> np.ndarray:
    """Per-gene Pearson r after subtracting, from prediction and truth, their mean over the
    rows of the same group (BENCHMARKS P2 ``top50_within_pcc``: groups are pooled blocks).
    Rows of groups with a single member are dropped. Constant genes score 0."""
    p, t = _check_pair(pred, truth)
    groups = np.asarray(groups)
    if groups.shape[0] != p.shape[0]:
        raise InputError(f"{groups.shape[0]} group labels for {p.shape[0]} rows")
    _, inv, size = np.unique(groups, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    keep = size[inv] >= 2
    if keep.sum() < 2:
        return np.zeros(p.shape[1])
    inv, p, t = inv[keep], p[keep], t[keep]
    n = np.bincount(inv).astype(np.float64)
    n[n == 0] = 1.0

    def centre(x):
        sums = np.zeros((len(n), x.shape[1]))
        np.add.at(sums, inv, x)
        c = x - (sums / n[:, None])[inv]
        # differences at rounding level of the uncentred values are no signal
        c[np.abs(c) <= _REL_TOL * np.abs(x).max(axis=0)] = 0.0
        return c

    return pcc_per_gene(centre(p), centre(t))


__all__ += ["pcc_within_groups"]
