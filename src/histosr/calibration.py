"""Calibrated detail: an optional post-step of every super-resolution method (beside the
consistency step, applied before it) that keeps each gene's image-driven detail in
proportion to how well it predicts measured spots.

Why: a method's 8 um map = its spot-level trend + detail it reads from the image. Where a
gene's image signal is noise (low depth, genes the image does not show), the detail adds
noise that the consistency step cannot remove (consistency fixes footprint sums, not what
happens inside a footprint). Such genes should fall back to the spot level.

Per gene ``g`` a weight ``w_g`` in [0, 1], and at every superpixel, on the log scale::

    log(v' + f) = S(x) + w_g * (log(v + f) - S(x))

``v``: the method's counts per superpixel, ``f``: a small floor (1e-3 x the gene's mean
prediction), ``S``: the spot level, a Gaussian kernel field (:class:`~histosr.methods.field.
KernelField`, bandwidth chosen by leave-one-out on the measured spots) of the log of the
method's own mean count per footprint superpixel at each measured spot. ``w = 1`` keeps the
map, ``w = 0`` gives the smooth spot level (which the consistency step then scales to the
measured spots, i.e. interpolation of the measured spots).

The weight. Within-spot truth is never measured, so the detail is judged at the scale that
is: the measured spots. At each spot ``i``, ``e_i`` = measured log1p CP10k minus the field
of the OTHER spots' measured values (what interpolation misses) and ``d_i`` = the method's
log1p CP10k there (library implied by its own prediction, as the protocols score) minus the
field of its values at the other spots (the method's own image-driven departure from its
spot level). Per gene ``w`` minimises ``sum (e - w d)^2`` (clipped to [0, 1]), is shrunk
toward the mean over genes by ``SHRINK`` and multiplied by the evidence factor
``max(0, 1 - 3.84 / (n rho^2))`` (``rho^2``: the share of ``sum e^2`` that ``w d``
removes; with no signal ``n rho^2`` is chi2(1)), the rule ``hybrid`` uses for its image part.

Cost. ``folds=0`` (default, cheap): ``d`` from the fitted method's own predictions at the
spots it was fitted on: one more prediction over the footprints, no refit; optimistic for
a method that reproduces its training spots closely (its ``d`` then follows ``e``).
``folds=K >= 2``: K refits on spatially blocked folds (square blocks of 2 spot pitches),
``d`` and ``e`` on each fold's held-out spots from the refit on the others: honest, K times
the fit's cost.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import metrics
from .arrays import row_sums
from .geometry import section_footprints

#: chi2(1) 95% quantile (see the module docstring)
EVIDENCE = 3.84
#: pull of each gene's weight toward the mean weight over genes
SHRINK = 0.3
#: relative floor added before taking logs (as the consistency step's floor)
FLOOR = 1e-3
#: CV block side in spot pitches (``folds >= 2``)
BLOCK_PITCHES = 2.0


def detail_weights(E: np.ndarray, D: np.ndarray, shrink: float = SHRINK) -> np.ndarray:
    """Per column (gene), the weight in [0, 1] of ``D`` (the method's detail) in predicting
    ``E`` (what interpolation misses) at ``n`` spots (rows): least squares through the
    origin, clipped, shrunk toward the mean over genes, times the chi2(1) evidence factor."""
    E, D = np.asarray(E, np.float64), np.asarray(D, np.float64)
    num, den, ee = (E * D).sum(axis=0), (D**2).sum(axis=0), (E**2).sum(axis=0)
    raw = np.clip(np.divide(num, den, out=np.zeros_like(num), where=den > 1e-12), 0, 1)
    rho2 = np.divide(num**2, den * ee, out=np.zeros_like(num), where=(den > 1e-12) & (ee > 1e-12))
    evidence = np.clip(1 - EVIDENCE / np.maximum(len(E) * rho2, 1e-12), 0, 1)
    return (evidence * ((1 - shrink) * raw + shrink * raw.mean())).astype(np.float32)


def _pooled_mean(b: np.ndarray, se2: np.ndarray) -> float:
    return float(np.average(b, weights=1.0 / se2))


def _ls_weights(E: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: least-squares weight through the origin, its squared standard error and
    whether it is defined."""
    num, den = (E * D).sum(axis=0), (D**2).sum(axis=0)
    res_ok = den > 1e-12
    b = np.divide(num, den, out=np.zeros_like(num), where=res_ok)
    res = ((E - b * D) ** 2).sum(axis=0) / max(len(E) - 1, 1)
    se2 = np.divide(res, den, out=np.full_like(num, np.inf), where=res_ok)
    return b, se2, res_ok & np.isfinite(se2) & (se2 > 0)


def pooled_weights(E: np.ndarray, D: np.ndarray, folds: np.ndarray | None = None
                   ) -> np.ndarray:
    """Per column (gene), the weight in [0, 1] of ``D`` in predicting ``E`` at ``n`` spots
    (rows), by empirical Bayes across genes: each gene's least-squares weight ``b`` (through
    the origin, standard error ``se``) is pulled toward the precision-weighted mean ``m``
    over genes by ``se^2 / (se^2 + tau^2)``, ``tau^2`` = the spread of the true weights
    between genes (variance of ``b`` minus the mean ``se^2``, at least 0), then clipped.
    Genes borrow strength from each other: a gene whose own evidence is weak gets about
    the weight the image earns on all genes, and a gene with strong evidence keeps its own.
    ``folds`` (the CV fold of each row): ``m`` is multiplied by
    ``max(0, 1 - q / z^2)``, ``z`` = the mean over folds of each fold's own ``m`` over its
    standard error across folds, ``q`` = the 95 % quantile of F(1, folds - 1): genes share
    their spots, and spatially blocked folds are the independent replicates, so this is
    what says whether the image earns anything at all (with no image signal, ``m`` and
    ``tau^2`` are ~0 and so is every weight).
    Why not a per-gene significance test: on her2st P1 the image lowers the held-out error
    of most genes while only about half of them pass a 5 % test on ~150 spots, so a
    test-based factor removes most of what the image adds (top50 0.393 vs 0.421 here)."""
    from scipy.stats import f as f_dist

    E, D = np.asarray(E, np.float64), np.asarray(D, np.float64)
    b, se2, good = _ls_weights(E, D)
    if not good.any():
        return np.zeros(E.shape[1], dtype=np.float32)
    m = _pooled_mean(b[good], se2[good])
    if folds is not None:
        folds = np.asarray(folds)
        per = []
        for k in np.unique(folds):
            bk, sk, gk = _ls_weights(E[folds == k], D[folds == k])
            if gk.any():
                per.append(_pooled_mean(bk[gk], sk[gk]))
        if len(per) >= 2:
            K = len(per)
            se_m2 = float(np.var(per, ddof=1)) / K
            z2 = float(np.mean(per)) ** 2 / max(se_m2, 1e-300)
            m *= float(np.clip(1 - f_dist.ppf(0.95, 1, K - 1) / max(z2, 1e-12), 0, 1))
    tau2 = max(float(np.var(b[good]) - np.mean(se2[good])), 0.0)
    w = np.where(good, m + (b - m) * tau2 / (tau2 + np.where(good, se2, 1.0)), 0.0)
    return np.clip(w, 0, 1).astype(np.float32)


def _spot_log_cp10k(sums: np.ndarray, phi: float) -> np.ndarray:
    """log1p CP10k of predicted footprint sums with the library the prediction implies
    (sum over the fitted genes / their share ``phi`` of the measured counts)."""
    sums = np.clip(np.asarray(sums, np.float64), 0, None)
    return metrics.log_cp10k(sums, sums.sum(axis=1) / max(phi, 1e-12))


@dataclasses.dataclass
class DetailCalibrator:
    """The fitted post-step for one section (see the module docstring)."""

    field: object  # KernelField of the log spot level (positions in um)
    weights: np.ndarray  # (G,)
    floor: np.ndarray  # (G,)
    um_per_px: float
    grid: object

    @classmethod
    def from_method(cls, method, section, features, folds: int = 0) -> DetailCalibrator:
        from .methods.field import KernelField, loo_bandwidth

        grid = features.grid
        F = section_footprints(section, grid)
        n = np.diff(F.indptr)
        keep = np.flatnonzero(n > 0)
        cells = np.unique(F.indices)
        pred = np.asarray(method._predict_cells(section, features, cells), np.float64)
        Fk = F[keep][:, cells]
        sums = np.asarray(Fk @ pred)  # (spots, G) footprint sums
        floor = np.where(pred.mean(axis=0) > 1e-8, FLOOR * pred.mean(axis=0), FLOOR)
        measured = section.dense_counts(method.genes_)[keep]
        lib = row_sums(section.counts.X)[keep]
        Y = metrics.log_cp10k(measured, lib)
        tot = float(lib.sum())
        phi = float(measured.sum()) / tot if tot > 0 else 1.0
        xy = section.xy[keep] * float(grid.um_per_px)
        h, _ = loo_bandwidth(xy, Y)
        if folds >= 2:
            E, D = _folds_ed(method, section, features, keep, Fk, cells, xy, Y, h, phi,
                             folds)
        else:
            M = _spot_log_cp10k(sums, phi)
            E = Y - KernelField(xy, Y, h)(xy, loo=True)
            D = M - KernelField(xy, M, h)(xy, loo=True)
        level = np.log(sums / n[keep, None] + floor)
        return cls(KernelField(xy, level, h), detail_weights(E, D), floor.astype(np.float32),
                   float(grid.um_per_px), grid)

    def apply(self, values: np.ndarray, flat_cells: np.ndarray) -> np.ndarray:
        """Counts per superpixel with each gene's detail scaled by its weight."""
        r, c = self.grid.unflat(np.asarray(flat_cells, dtype=np.int64))
        S = self.field(self.grid.xy_of_cells(r, c) * self.um_per_px)
        logv = np.log(np.clip(values, 0, None) + self.floor)
        out = np.exp(S + self.weights * (logv - S)) - self.floor
        return np.clip(out, 0, None).astype(np.float32)


def _folds_ed(method, section, features, keep, Fk, cells, xy, Y, h, phi, folds: int):
    """``E`` and ``D`` at every fold's held-out spots from a refit on the other folds."""
    from .methods.field import KernelField, pitch_um, spatial_folds
    from .section import take_spots

    fold = spatial_folds(xy, folds, BLOCK_PITCHES * pitch_um(xy), method.seed)
    Es, Ds = [], []
    for k in range(folds):
        held, rest = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        if len(held) == 0 or len(rest) < 3:
            continue
        sub = take_spots(section, keep[rest], f"{section.name}_calfold{k}")
        clone = type(method)(**{**method.params(), "calibrate": False, "consistency": False})
        clone.fit([sub], [features], genes=list(method.genes_))
        # the refit's footprint sums at every spot (its field, if any, from ``sub`` only)
        M = _spot_log_cp10k(np.asarray(Fk @ clone._predict_cells(sub, features, cells),
                                       np.float64), phi)
        Es.append(Y[held] - KernelField(xy[rest], Y[rest], h)(xy[held]))
        Ds.append(M[held] - KernelField(xy[rest], M[rest], h)(xy[held]))
    return np.concatenate(Es), np.concatenate(Ds)


__all__ = ["DetailCalibrator", "detail_weights"]
