"""H&E-only spot baselines: ``ridge`` (HEST protocol), ``knn_features`` and ``mean``.

All three predict a spot's log1p CP10k from its image alone, so they can predict sections
that were never sequenced (BENCHMARKS P3):

* ``ridge``: the HEST-Benchmark linear probe. Spot-crop features
  (:mod:`histosr.methods.imagefeat`; default crops of 1 and 3 spot diameters, encoder
  ``handcrafted``), standardised (default within each section, see below), PCA to
  ``min(256, n_training_spots - 1, n_features)`` components, then ridge regression of every
  gene (with intercept). Deliberate differences from HEST: HEST z-scores with the training
  statistics and uses one near-zero penalty (alpha ~ 100 / (dims x genes)), which on a few
  hundred spots interpolates noise. Here ``alpha=None`` (default) picks the penalty from a
  fixed grid by leave-one-TRAINING-section-out (mean per-gene Pearson r on the left-out
  training section, PCA fitted once on all training features, which are label-free); with one
  training section, by efficient leave-one-spot-out (generalised cross-validation). A number
  fixes it.
* ``knn_features``: the same features, standardisation and PCA, then the mean expression of
  the ``k = 20`` nearest training spots in that space (Euclidean, uniform weights). k = 20 is
  about the square root of the ~600 spots of four her2st training sections, fixed a priori;
  uniform weights because distances between high-dimensional image features concentrate, so
  inverse-distance weights would be nearly uniform anyway and unstable for near-duplicates.
  (The spatial baseline ``knn`` interpolates MEASURED neighbouring spots of the same
  section and cannot predict an unmeasured one; P3 maps ``--method knn`` to this one.)
* ``mean``: every spot gets the training spots' mean of each gene (scores r = 0 by
  definition; the floor of P3).

``standardize="section"`` (default, as the BENCHMARKS P3 anchor row): features are z-scored
within each section; at prediction over the points being predicted (see
:mod:`~histosr.methods.imagefeat`). ``"global"``: training statistics (the HEST recipe).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..params import Interval, Options
from .base import register_method
from .imagefeat import STANDARDIZE, spot_image_features, zscore
from .spot import SpotMethod

#: penalties tried by ``alpha=None`` (features are z-scored PCA scores; targets log1p CP10k)
ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))


@dataclass
class ImageSpotMethod(SpotMethod):
    """Shared feature pipeline: crops -> standardise -> PCA (``n_pcs``)."""

    constraints: ClassVar[dict] = {"standardize": Options(*STANDARDIZE),
                                   "n_pcs": Interval(int, 1)}
    blockwise: ClassVar[bool] = True

    scales: tuple[float, ...] = (1.0, 3.0)
    standardize: str = "section"
    n_pcs: int = 256

    def _raw_features(self, section, xy: np.ndarray) -> np.ndarray:
        """Crop features at full-res (x, y) px points, before any standardisation."""
        return spot_image_features(section, xy, self.encoder, tuple(self.scales),
                                   self.cache_dir)

    def _standardized(self, raw: np.ndarray, stats: tuple | None = None) -> np.ndarray:
        """One section's points: z-scored over themselves (``"section"``; ``stats``: the
        section's (mean, std) when ``raw`` is a block of its points) or as is."""
        if self.standardize != "section":
            return raw
        return zscore(raw, *(stats or (None, None)))[0]

    def _fit_features(self, sections) -> list[np.ndarray]:
        from ..features.ssl import shared_encoder

        # a slide-trained encoder ("ssl"): one network trained on the training sections'
        # images, kept (as "ssl:<weights>") so that predicted sections share its features
        self.encoder = shared_encoder(self.encoder, sections, self.cache_dir, False)[0]
        self.train_diameter_um_ = float(np.median([s.spot_diameter_um for s in sections]))
        return self.fit_projection([self._raw_features(s, s.xy) for s in sections])

    def fit_projection(self, raws: list[np.ndarray]) -> list[np.ndarray]:
        """Fit the standardisation and PCA on raw crop features (one array per training
        section, rows = its spots) and return each section's projection."""
        feats = [self._standardized(f) for f in raws]
        allf = np.concatenate(feats)
        if self.standardize == "global":
            _, self.fmean_, self.fstd_ = zscore(allf)
            feats = [zscore(f, self.fmean_, self.fstd_)[0] for f in feats]
            allf = np.concatenate(feats)
        from sklearn.decomposition import PCA

        n = int(min(self.n_pcs, max(1, allf.shape[0] - 1), allf.shape[1]))
        pca = PCA(n_components=n, random_state=int(self.seed)).fit(allf)
        # the projection as arrays (a model folder holds no scikit-learn object)
        self.pca_mean_, self.pca_components_ = pca.mean_, pca.components_
        return [self._project(f) for f in feats]

    def _project(self, f: np.ndarray) -> np.ndarray:
        # scikit-learn's PCA.transform, in the same order of operations
        out = f @ self.pca_components_.T
        out -= self.pca_mean_[None] @ self.pca_components_.T
        return out.astype(np.float64)

    def transform_raw(self, raw: np.ndarray, stats: tuple | None = None) -> np.ndarray:
        """Projection of raw crop features of points of ONE section (standardised over
        these points with ``"section"``: predict a section's points at once, or give
        ``stats``, the (mean, std) over all of them, of :meth:`section_features`)."""
        f = self._standardized(raw, stats)
        if self.standardize == "global":
            f = zscore(f, self.fmean_, self.fstd_)[0]
        return self._project(f)

    def _transform(self, section, xy) -> np.ndarray:
        return self.transform_raw(self._raw_features(section, xy))

    def _from_projection(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover
        """(n, genes) float32 log1p CP10k from projected features (n, n_pcs)."""
        raise NotImplementedError

    def _predict_spots(self, section, xy):
        return self._from_projection(self._transform(section, xy))

    # -- block by block -------------------------------------------------------------------
    def point_bytes(self) -> int:
        d = int(self.pca_components_.shape[1]) if hasattr(self, "pca_components_") else 0
        return 4 * max(1, len(self.genes_)) + 12 * d  # genes + raw, z-scored (f4), f8 copy

    def section_features(self, section, xy: np.ndarray, block: int,
                         scratch: Path | None = None) -> tuple[np.ndarray, tuple]:
        """Raw crop features of all points (full-res px, x = column, y = row), computed
        ``block`` points at a time into an (n, d) float32 array (``scratch``: a .npy
        memmap in that folder, else in memory), and their (mean, std) per column over all
        points, as :func:`~histosr.methods.imagefeat.zscore` computes them (float64;
        blocks merged by Chan et al.'s pairwise update)."""
        n, b = len(xy), max(1, int(block))
        raw = mean = m2 = None
        for i in range(0, n, b):
            f = self._raw_features(section, xy[i : i + b])
            if raw is None:
                shape = (n, f.shape[1])
                if scratch is None:
                    raw = np.empty(shape, np.float32)
                else:
                    Path(scratch).mkdir(parents=True, exist_ok=True)
                    raw = np.lib.format.open_memmap(Path(scratch) / "raw_features.npy",
                                                    mode="w+", dtype=np.float32, shape=shape)
                mean, m2 = np.zeros(shape[1]), np.zeros(shape[1])
            raw[i : i + len(f)] = f
            x = np.asarray(f, dtype=np.float64)
            mb = x.mean(axis=0)
            delta = mb - mean
            mean += delta * (len(x) / (i + len(x)))
            m2 += ((x - mb) ** 2).sum(axis=0) + delta**2 * (i * len(x) / (i + len(x)))
        if raw is None:  # no point: zscore's statistics of an empty array
            d = self._raw_features(section, np.zeros((0, 2))).shape[1]
            return np.zeros((0, d), np.float32), (np.zeros(d), np.ones(d))
        std = np.sqrt(m2 / n) if n > 1 else np.ones_like(mean)
        return raw, (mean, std)

    def predict_blocks(self, section, xy: np.ndarray, block: int,
                       scratch: Path | None = None) -> Iterator[np.ndarray]:
        """As :meth:`SpotMethod.predict_blocks`; with ``standardize="section"`` two passes:
        raw crop features of every point first (:meth:`section_features`, on disk in
        ``scratch``) with their section-wide statistics, then per block the same
        standardisation, projection and prediction as :meth:`predict` of all points."""
        if self.standardize != "section":
            yield from super().predict_blocks(section, xy, block, scratch)
            return
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        raw, stats = self.section_features(section, xy, block, scratch)
        b = max(1, int(block))
        for i in range(0, len(xy), b):
            X = self.transform_raw(np.asarray(raw[i : i + b]), stats)
            yield np.asarray(self._from_projection(X), dtype=np.float32)
        del raw


def _ridge_svd(X: np.ndarray, Y: np.ndarray):
    """Centred SVD pieces of a ridge fit with intercept: (x_mean, y_mean, U, s, Vt)."""
    xm, ym = X.mean(axis=0), Y.mean(axis=0)
    U, s, Vt = np.linalg.svd(X - xm, full_matrices=False)
    return xm, ym, U, s, Vt


def _ridge_coef(U, s, Vt, Yc, alpha: float) -> np.ndarray:
    d = s / (s**2 + alpha)
    return Vt.T @ (d[:, None] * (U.T @ Yc))


def _mean_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    from ..metrics import pcc_per_gene

    return float(np.mean(pcc_per_gene(pred, truth)))


def choose_alpha(Xs: list[np.ndarray], Ys: list[np.ndarray], alphas=ALPHAS) -> float:
    """Ridge penalty by leave-one-section-out over ``Xs``/``Ys`` (mean per-gene Pearson r on
    the left-out section, averaged over folds); with one section, generalised CV (mean
    squared leave-one-out error)."""
    alphas = [float(a) for a in alphas]
    if len(Xs) >= 2:
        score = np.zeros(len(alphas))
        for i in range(len(Xs)):
            Xtr = np.concatenate([x for j, x in enumerate(Xs) if j != i])
            Ytr = np.concatenate([y for j, y in enumerate(Ys) if j != i])
            xm, ym, U, s, Vt = _ridge_svd(Xtr, Ytr)
            for a, alpha in enumerate(alphas):
                W = _ridge_coef(U, s, Vt, Ytr - ym, alpha)
                score[a] += _mean_pcc((Xs[i] - xm) @ W + ym, Ys[i])
        return alphas[int(np.argmax(score))]
    X, Y = Xs[0], Ys[0]
    xm, ym, U, s, Vt = _ridge_svd(X, Y)
    Yc = Y - ym
    n = len(X)
    err = []
    for alpha in alphas:
        h = (U**2 * (s**2 / (s**2 + alpha))).sum(axis=1) + 1.0 / n  # hat diagonal (+ intercept)
        W = _ridge_coef(U, s, Vt, Yc, alpha)
        resid = Yc - (X - xm) @ W
        err.append(float(np.mean((resid / np.maximum(1 - h, 1e-6)[:, None]) ** 2)))
    return alphas[int(np.argmin(err))]


@register_method("ridge")
@dataclass
class Ridge(ImageSpotMethod):
    """HEST-protocol ridge on spot-crop features (see the module docstring).
    ``alpha=None``: chosen by leave-one-training-section-out."""

    constraints: ClassVar[dict] = {"alpha": Interval(float, 0)}

    alpha: float | None = None

    def _fit_spots(self, sections, targets) -> None:
        self._fit_projected(self._fit_features(sections), targets)

    def fit_raw(self, raws: list[np.ndarray], targets: list[np.ndarray]) -> Ridge:
        """Fit on raw crop features already computed (one array per training section, e.g.
        :meth:`_raw_features` of a subset of its spots) and their log1p CP10k targets: the
        same standardisation, PCA and penalty choice as :meth:`fit`, without reading crops
        (the ``hybrid`` method refits it on its cross-validation folds this way)."""
        self._fit_projected(self.fit_projection(raws), targets)
        return self

    def _fit_projected(self, Xs, targets) -> None:
        Ys = [np.asarray(t, dtype=np.float64) for t in targets]
        alpha = float(self.alpha) if self.alpha is not None else choose_alpha(Xs, Ys)
        X, Y = np.concatenate(Xs), np.concatenate(Ys)
        xm, ym, U, s, Vt = _ridge_svd(X, Y)
        self.coef_ = _ridge_coef(U, s, Vt, Y - ym, alpha)
        self.xmean_, self.intercept_, self.alpha_ = xm, ym, alpha
        self.fit_info_ = {"alpha": alpha, "n_pcs": int(self.pca_components_.shape[0])}

    def predict_raw(self, raw: np.ndarray, stats: tuple | None = None) -> np.ndarray:
        """log1p CP10k from raw crop features of points of one section (rows x genes;
        ``stats``: see :meth:`transform_raw`)."""
        return self._from_projection(self.transform_raw(raw, stats))

    def _from_projection(self, X: np.ndarray) -> np.ndarray:
        return ((X - self.xmean_) @ self.coef_ + self.intercept_).astype(np.float32)


@register_method("knn_features")
@dataclass
class KNNFeatures(ImageSpotMethod):
    """Mean expression of the ``k`` training spots nearest in (standardised, PCA) image
    feature space; uniform weights (see the module docstring)."""

    constraints: ClassVar[dict] = {"k": Interval(int, 1)}

    k: int = 20

    def _fit_spots(self, sections, targets) -> None:
        self.train_x_ = np.concatenate(self._fit_features(sections)).astype(np.float32)
        self.train_y_ = np.concatenate(targets).astype(np.float32)

    def _from_projection(self, X: np.ndarray) -> np.ndarray:
        from scipy.spatial import cKDTree

        k = int(min(self.k, len(self.train_x_)))
        _, idx = cKDTree(self.train_x_).query(X, k=k)
        idx = np.asarray(idx).reshape(len(X), k)
        return self.train_y_[idx].mean(axis=1).astype(np.float32)


@register_method("mean")
@dataclass
class TrainingMean(SpotMethod):
    """Every spot gets the mean log1p CP10k of the training spots (reads no image)."""

    blockwise: ClassVar[bool] = True

    def _fit_spots(self, sections, targets) -> None:
        self.mean_ = np.concatenate(targets).mean(axis=0).astype(np.float32)

    def _predict_spots(self, section, xy):
        return np.repeat(self.mean_[None], len(xy), axis=0)


__all__ = ["Ridge", "KNNFeatures", "TrainingMean", "choose_alpha", "ALPHAS"]
