"""``hybrid``: a spatial field of the measured spots plus an image model of what the field
misses, weighted per gene by cross-validation (histosr's own method).

Algorithm (all on log1p CP10k of each spot's own library, the scale the protocols score):

1. **Spatial field.** A Gaussian kernel smoother of the measured spots
   (:class:`~histosr.methods.field.KernelField`), bandwidth chosen per section by
   leave-one-out among 0.35-2 spot pitches. Interpolating the measured spots is the strong
   baseline on every protocol with measured spots; the method starts from it.
2. **Image part.** Ridge regression (alpha by generalised cross-validation) from the
   z-scored image features averaged over each spot's footprint. Default
   (``image_target="expression"``, regression kriging): the ridge is fitted to the spots'
   expression, and the image part at a place is the ridge there minus the field of the
   ridge's own values at the measured spots, i.e. only the image's deviation from what
   interpolating its spot values would give. ``image_target="residual"``: the ridge is
   fitted to each spot's residual against its *leave-one-out* field value (what
   interpolation from the neighbours misses) and its intercept is dropped. On her2st C2
   (P1) the first is better (0.415 vs 0.406 top50, field alone 0.391).
3. **Per-gene weight.** Spatially blocked K-fold cross-validation on the measured spots
   (square blocks of ``block_pitches`` spot pitches assigned to folds at random): each fold
   refits the field and the ridge on the other folds and predicts it. Per gene, the weight
   ``w`` of the image part minimises the out-of-fold squared error of ``field + w x image``
   (clipped to [0, 1]), is shrunk toward the mean over genes by ``shrink`` (stability for
   genes with few informative spots) and multiplied by the evidence factor
   ``max(0, 1 - 3.84 / (n rho^2))`` (``rho^2``: the share of the field's out-of-fold
   squared error the image part removes over ``n`` spots; with no signal ``n rho^2`` is
   chi2(1), so a gene gets image weight only where that share is significant at ~5 %).
   Where the image does not help a gene, ``w`` is 0 and the method returns the spatial
   field. The same folds give each gene's self-validation: out-of-fold Pearson r of the
   field alone (``var["heldout_pcc_interpolation"]`` of its predictions) and of the hybrid
   (``var["heldout_pcc"]``); blocked folds put held-out spots farther from the measured
   ones than a prediction usually is, so both are conservative, and ``heldout_pcc`` reuses
   the folds that chose ``w`` (slightly optimistic for it).
4. **8 um map.** At each superpixel: the field at its centre plus ``w`` x the image part
   on its own features (the within-spot detail; the field of ``Y - w x ridge`` is smoothed
   once, as the smoother is linear), turned into counts per superpixel with the field of
   the spots' library per footprint superpixel: ``expm1(v) x L / 1e4``. The shared
   consistency step then makes every measured footprint sum to its counts.
5. **Nothing measured** (an image-only section: counts with no genes, e.g. P3's held-out
   section): the image model alone (ridge on the footprint- or superpixel-mean features,
   fitted on all training spots), on the training spots' mean library per superpixel.

Deterministic for a seed (the fold assignment is the only random draw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import metrics
from ..arrays import row_sums
from ..errors import InputError
from ..geometry import section_footprints
from ..params import Interval, Options
from .base import SuperpixelMethod, register_method
from .baselines import section_key
from .field import KernelField, loo_bandwidth, pitch_um, spatial_folds
from .scaling import feature_stats

#: what the image model is fitted to (see the module docstring)
IMAGE_TARGETS = ("expression", "residual")
#: chi2(1) 95% quantile: the out-of-fold evidence a gene's image part needs to get weight
EVIDENCE = 3.84
#: ridge penalties tried by generalised cross-validation (features are z-scored)
ALPHAS = np.logspace(-1, 5, 13)


def spot_table(section, fm, genes: list[str]) -> dict:
    """Per measured spot with a footprint on the grid: position (um), log1p CP10k of the
    fitted genes (library = all genes), library per footprint superpixel, and the mean of
    its footprint superpixels' features (absent for a grid-only FeatureMap)."""
    F = section_footprints(section, fm.grid)
    n = np.diff(F.indptr)
    keep = np.flatnonzero(n > 0)
    if len(keep) < 3:
        raise InputError(f"hybrid: section {section.name!r} has {len(keep)} spots on the "
                         "superpixel grid; at least 3 are needed for a spatial field")
    lib = row_sums(section.counts.X)[keep]
    Y = metrics.log_cp10k(section.dense_counts(genes)[keep], lib).astype(np.float32)
    out = {"xy_um": section.xy[keep] * float(fm.grid.um_per_px), "Y": Y,
           "libdens": (lib / n[keep]).astype(np.float32)}
    if fm.dim > 0:
        Fk = F[keep]
        uniq, inv = np.unique(Fk.indices, return_inverse=True)
        r, c = fm.grid.unflat(uniq)
        cells = fm.gather(r, c).astype(np.float64)
        import scipy.sparse as sp

        M = sp.csr_matrix((np.ones_like(inv, dtype=np.float64), inv, Fk.indptr),
                          shape=(len(keep), len(uniq)))
        M = sp.diags(1.0 / np.diff(M.indptr)) @ M
        out["X"] = np.asarray(M @ cells, dtype=np.float32)
    return out


@register_method("hybrid")
@dataclass
class Hybrid(SuperpixelMethod):
    """Spatial field + image residual with per-gene cross-validated weights (module
    docstring). ``k``: spots in the kernel smoother; ``n_folds``: blocked CV folds;
    ``block_pitches``: CV block side in spot pitches; ``shrink``: pull of each gene's image
    weight toward the mean over genes (0 = none, 1 = one weight for all)."""

    #: an image-only section (no genes measured) gets the image model alone (P3)
    image_only: ClassVar[bool] = True
    constraints: ClassVar[dict] = {
        "k": Interval(int, 2), "n_folds": Interval(int, 2),
        "block_pitches": Interval(float, 0, closed="neither"),
        "shrink": Interval(float, 0, 1), "image_target": Options(*IMAGE_TARGETS)}

    k: int = 32
    n_folds: int = 5
    block_pitches: float = 2.0
    shrink: float = 0.3
    image_target: str = "expression"

    # -- fitting ----------------------------------------------------------------------------
    def _fit(self, sections, features) -> None:
        from sklearn.linear_model import RidgeCV

        tables = [spot_table(s, fm, self.genes_) for s, fm in zip(sections, features)]
        for t in tables:
            t["h"], _ = loo_bandwidth(t["xy_um"], t["Y"], self.k)
            t["pitch"] = pitch_um(t["xy_um"])
        X = np.concatenate([t["X"] for t in tables])
        self.feat_mean_, self.feat_std_ = feature_stats(X)
        self.in_dim_ = int(X.shape[1])
        # for sections with nothing measured (the image model alone)
        self.spot_mean_ = np.concatenate([t["Y"] for t in tables]).mean(axis=0).astype(
            np.float32)
        self.libdens_mean_ = float(np.mean(np.concatenate([t["libdens"] for t in tables])))

        def z(x):
            return (x - self.feat_mean_) / self.feat_std_

        residual = self.image_target == "residual"

        def ridge(parts):
            """Fit on [(table, rows)]: features -> expression, or -> residual against the
            LOO field of the same rows."""
            Xs, Rs = [], []
            for t, rows in parts:
                R = t["Y"][rows]
                if residual:
                    f = KernelField(t["xy_um"][rows], R, t["h"], self.k)
                    R = R - f(t["xy_um"][rows], loo=True)
                Rs.append(R)
                Xs.append(z(t["X"][rows]))
            return RidgeCV(alphas=ALPHAS).fit(np.concatenate(Xs), np.concatenate(Rs))

        def detail(model, t, rows, at):
            """The image part at spots ``at`` of table ``t`` when ``rows`` are measured."""
            pred = model.predict(z(t["X"][at]))
            if residual:
                return pred - model.intercept_
            own = model.predict(z(t["X"][rows]))  # the image model at the measured spots
            return pred - KernelField(t["xy_um"][rows], own, t["h"], self.k)(t["xy_um"][at])

        # out-of-fold field and image predictions on every spot (spatially blocked)
        folds = [spatial_folds(t["xy_um"], self.n_folds, self.block_pitches * t["pitch"],
                               self.seed + i) for i, t in enumerate(tables)]
        Yo, Fo, Io, fold_coef, fold_icpt = [], [], [], [], []
        for k in range(self.n_folds):
            train = [(t, np.flatnonzero(f != k)) for t, f in zip(tables, folds)]
            train = [(t, r) for t, r in train if len(r) >= 3]
            if not train:
                continue
            model = ridge(train)
            fold_coef.append(np.asarray(model.coef_, np.float32).T)
            fold_icpt.append(np.asarray(model.intercept_, np.float32).reshape(-1))
            for t, f in zip(tables, folds):
                held, rest = np.flatnonzero(f == k), np.flatnonzero(f != k)
                if len(held) == 0 or len(rest) < 3:
                    continue
                field = KernelField(t["xy_um"][rest], t["Y"][rest], t["h"], self.k)
                Yo.append(t["Y"][held])
                Fo.append(field(t["xy_um"][held]))
                Io.append(detail(model, t, rest, held))
        Yo, Fo, Io = (np.concatenate(a).astype(np.float64) for a in (Yo, Fo, Io))
        E = Yo - Fo
        num, den = (E * Io).sum(axis=0), (Io**2).sum(axis=0)
        raw = np.clip(np.divide(num, den, out=np.zeros_like(num), where=den > 1e-12), 0, 1)
        # evidence: the share of the field's out-of-fold squared error the image part
        # removes at its best weight (rho^2); with no signal n rho^2 ~ chi2(1), so the
        # factor 1 - EVIDENCE / (n rho^2) gives weight only where it exceeds the chi2(1)
        # 95% quantile, and tends to 1 as the evidence grows
        rho2 = np.divide(num**2, den * (E**2).sum(axis=0), out=np.zeros_like(num),
                         where=(den > 1e-12) & ((E**2).sum(axis=0) > 1e-12))
        evidence = np.clip(1 - EVIDENCE / np.maximum(len(Yo) * rho2, 1e-12), 0, 1)
        self.image_weight_ = (evidence * ((1 - self.shrink) * raw + self.shrink * raw.mean())
                              ).astype(np.float32)
        self.cv_pcc_interpolation_ = metrics.pcc_per_gene(Fo, Yo).astype(np.float32)
        self.cv_pcc_ = metrics.pcc_per_gene(Fo + self.image_weight_ * Io, Yo).astype(np.float32)

        # the fold models' image parts: their spread is the per-superpixel uncertainty
        self.fold_coef_ = np.stack(fold_coef)  # (folds, features, genes)
        self.fold_intercept_ = np.stack(fold_icpt)  # (folds, genes)
        final = ridge([(t, np.arange(len(t["Y"]))) for t in tables])
        self.coef_ = np.asarray(final.coef_, dtype=np.float32).T.copy()  # (features, genes)
        self.intercept_ = np.asarray(final.intercept_, dtype=np.float32).reshape(-1)
        self.alpha_ = float(final.alpha_)
        self.spots_ = {section_key(s, fm.grid, self.genes_): self._field_state(t)
                       for s, fm, t in zip(sections, features, tables)}

    def _image(self, X: np.ndarray, fold: int | None = None) -> np.ndarray:
        """The image model on raw features (rows x genes); ``fold``: that CV fold's model."""
        coef, icpt = (self.coef_, self.intercept_) if fold is None else (
            self.fold_coef_[fold], self.fold_intercept_[fold])
        out = ((X - self.feat_mean_) / self.feat_std_) @ coef
        return out if self.image_target == "residual" else out + icpt

    def _field_state(self, t: dict) -> dict:
        """What the map needs from a section's spots: positions, bandwidth and the values
        smoothed: the expression (for ``image_target="expression"`` minus ``w`` x the image
        model at the spots: the smoother is linear, so field(Y) - w field(I) is one field)
        and the library per superpixel."""
        Y = t["Y"]
        if self.image_target == "expression":
            Y = Y - self.image_weight_ * self._image(t["X"])
        return {"xy_um": t["xy_um"], "h": float(t["h"]), "X": t["X"].astype(np.float32),
                "values": np.concatenate([Y, t["libdens"][:, None]], axis=1).astype(
                    np.float32)}

    def reliability(self):
        """Per fitted gene: out-of-fold Pearson r of the hybrid and of the spatial field
        alone, and the image weight (a DataFrame indexed by gene)."""
        import pandas as pd

        self.check_fitted()
        from ..outputs import HELDOUT_PCC, HELDOUT_PCC_INTERP

        return pd.DataFrame({HELDOUT_PCC: self.cv_pcc_,
                             HELDOUT_PCC_INTERP: self.cv_pcc_interpolation_,
                             "image_weight": self.image_weight_},
                            index=pd.Index(self.genes_))

    # -- prediction -------------------------------------------------------------------------
    def _state_for(self, section, features) -> dict:
        missing = [g for g in self.genes_ if g not in section.counts.var_names]
        if missing:
            raise InputError(f"hybrid interpolates the measured spots of the section it "
                             f"predicts, but section {section.name!r} lacks fitted genes "
                             f"{missing[:5]}")
        s = self.spots_.get(section_key(section, features.grid, self.genes_))
        if s is None:  # another measured section: its own spots make the field
            t = spot_table(section, features, self.genes_)
            t["h"], _ = loo_bandwidth(t["xy_um"], t["Y"], self.k)
            s = self._field_state(t)
        return s

    def _field_for(self, section, features) -> KernelField:
        s = self._state_for(section, features)
        return KernelField(s["xy_um"], s["values"], s["h"], self.k)

    has_uncertainty: ClassVar[bool] = True
    uncertainty_units: ClassVar[str] = (
        "standard deviation over the CV-fold image models of the hybrid's log1p CP10k "
        "(w x the image part; 0 for genes with no image weight)")

    def _uncertainty_cells(self, section, features, flat_cells: np.ndarray) -> np.ndarray:
        """Per superpixel and gene: the standard deviation, over the ``n_folds`` image
        models fitted in cross-validation, of ``w x`` their image part (regression kriging:
        the model at the superpixel minus the field of its values at the measured spots),
        on the log1p CP10k scale. The field of the measured expression is the same for
        every fold, so this is the spread of the prediction itself."""
        grid = features.grid
        s = self._state_for(section, features)
        K, G = len(self.fold_coef_), len(self.genes_)
        field = None
        if self.image_target == "expression":
            spots = np.concatenate([self._image(s["X"], k) for k in range(K)], axis=1)
            field = KernelField(s["xy_um"], spots, s["h"], self.k)
        flat_cells = np.asarray(flat_cells, dtype=np.int64)
        out = np.empty((len(flat_cells), G), dtype=np.float32)
        chunk = max(256, 2**22 // max(K * G, 1))  # bounded (folds x cells x genes) block
        for a in range(0, len(flat_cells), chunk):
            r, c = grid.unflat(flat_cells[a : a + chunk])
            X = features.gather(r, c)
            parts = np.stack([self._image(X, k) for k in range(K)])  # (K, n, G)
            if field is not None:
                fld = field(grid.xy_of_cells(r, c) * float(grid.um_per_px))
                parts = parts - fld.reshape(len(X), K, G).transpose(1, 0, 2)
            out[a : a + chunk] = self.image_weight_ * parts.std(axis=0)
        return out

    def _predict_cells(self, section, features, flat_cells: np.ndarray) -> np.ndarray:
        if features.dim != self.in_dim_:
            raise InputError(f"hybrid was fitted on {self.in_dim_}-d features but got a "
                             f"{features.dim}-d FeatureMap (encoder {features.encoder!r}): "
                             "use the encoder it was fitted with")
        grid = features.grid
        G = len(self.genes_)
        out = np.empty((len(flat_cells), G), dtype=np.float32)
        chunk = max(1024, 2**24 // max(G, 1))
        if section.counts.n_vars == 0:
            # nothing measured (an image-only section, P3): the image model alone, on the
            # training spots' mean library per superpixel
            for a in range(0, len(flat_cells), chunk):
                r, c = grid.unflat(np.asarray(flat_cells[a : a + chunk]))
                v = self._image(features.gather(r, c))
                if self.image_target == "residual":
                    v = v + self.spot_mean_
                out[a : a + chunk] = np.expm1(np.clip(v, 0, None)) * self.libdens_mean_ / 1e4
            return out
        field = self._field_for(section, features)
        for a in range(0, len(flat_cells), chunk):
            r, c = grid.unflat(np.asarray(flat_cells[a : a + chunk]))
            fv = field(grid.xy_of_cells(r, c) * float(grid.um_per_px))
            # field(Y) + w (image - field(image)) = field(Y - w image) + w image
            v = fv[:, :G] + self.image_weight_ * self._image(features.gather(r, c))
            out[a : a + chunk] = np.expm1(np.clip(v, 0, None)) * fv[:, G : G + 1] / 1e4
        return out


__all__ = ["Hybrid", "spot_table"]
