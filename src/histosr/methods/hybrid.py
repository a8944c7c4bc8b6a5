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
   ``w`` of the image part: ``weights="pooled"`` (default,
   :func:`histosr.calibration.pooled_weights`): the least-squares weight of the image
   part on the field's out-of-fold error, pulled toward the mean over genes by empirical
   Bayes (by how uncertain the gene's own weight is against the spread of weights between
   genes), clipped to [0, 1]; with no image signal anywhere the mean and the spread are ~0
   and so is every weight. ``weights="evidence"`` (the rule before):
   the least-squares weight clipped to [0, 1], shrunk toward the mean over genes by
   ``shrink`` and multiplied by the evidence factor ``max(0, 1 - 3.84 / (n rho^2))``
   (``rho^2``: the share of the field's out-of-fold squared error the image part removes
   over ``n`` spots; with no signal ``n rho^2`` is chi2(1), so a gene gets image weight
   only where that share is significant at ~5 %): on her2st P1 only about half of the
   top 50 genes pass that test on ~150 spots although the image lowers the held-out error
   of most of them, so it keeps too little of the image (top50 0.393 vs 0.421 pooled).
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
5. **Whole spots** (``spot_features="crops"``; the default ``"auto"`` picks it when the
   FeatureMaps' encoder is a registered one, else ``"footprint"``): points outside every
   measured footprint, i.e. an (n, 2) array of px whose disks share no superpixel with a
   measured spot (P1's held-out spots, densified lattices between spots) or the spots of a
   section with nothing measured (P3's image-only views), are predicted as whole
   spots by a spot-level image model: the ``ridge`` method's own pipeline
   (:class:`~histosr.methods.ridge.Ridge`: crops of 1 and 3 spot diameters read with the
   FeatureMaps' encoder, z-scored within each section, PCA, penalty by
   leave-one-training-section-out or GCV), fitted on the same spots and combined with the
   field as in step 2 (the crop ridge minus the field of its values at the measured
   spots), with its own per-gene weight from the same folds (step 3; ``heldout_pcc`` is
   then this spot-level prediction's). With nothing measured it is that ridge alone, so
   H&E-only prediction is exactly ``ridge``'s. Why: footprint-mean 8 um features lose the
   spot's neighbourhood (the 3-diameter crop) and the per-section standardisation, and
   scored 0.07 below ``ridge`` on P3. Counts per footprint = ``expm1(v) x`` the field of
   the library per superpixel ``x`` the footprint's superpixels (the training mean with
   nothing measured); the post-steps (consistency, calibrated detail) act on 8 um maps and
   are not applied. ``spot_features="footprint"``: whole spots are the footprint sums of
   the 8 um map (and with nothing measured, the 8 um image model alone on the training
   spots' mean library per superpixel), the behaviour before crops.

Deterministic for a seed (the fold assignment is the only random draw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import metrics
from ..arrays import row_sums
from ..calibration import detail_weights, pooled_weights
from ..errors import InputError
from ..geometry import section_footprints
from ..params import Interval, Options
from .base import WHOLE_SPOT_LAYER, SuperpixelMethod, register_method
from .baselines import section_key
from .field import KernelField, loo_bandwidth, pitch_um, spatial_folds
from .scaling import feature_stats

#: what the image model is fitted to (see the module docstring)
IMAGE_TARGETS = ("expression", "residual")
#: per-gene weight rules (see the module docstring, step 3)
WEIGHTS = ("pooled", "evidence")
#: image features of the model that predicts whole spots (see the module docstring)
SPOT_FEATURES = ("auto", "crops", "footprint")
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
    out = {"xy_um": section.xy[keep] * float(fm.grid.um_per_px), "Y": Y, "keep": keep,
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


def crop_encoder_of(fm) -> str:
    """The encoder name that reads spot crops like the FeatureMap ``fm`` was encoded: its
    registry name, with the handcrafted feature groups it used (``handcrafted:v2`` maps
    carry the name ``handcrafted`` and their groups in ``meta["encoder_params"]``). A
    slide-trained ``ssl`` map gives ``"ssl"``: the crops' network is then trained on each
    section's own image (as ``ridge --encoder ssl`` in P1), not the map's shared one."""
    name = str(fm.encoder)
    groups = (fm.meta.get("encoder_params") or {}).get("groups") if isinstance(
        fm.meta, dict) else None
    if name == "handcrafted" and isinstance(groups, (list, tuple)) and groups:
        return "handcrafted:" + ",".join(str(g) for g in groups)
    return name


@register_method("hybrid")
@dataclass
class Hybrid(SuperpixelMethod):
    """Spatial field + image residual with per-gene cross-validated weights (module
    docstring). ``k``: spots in the kernel smoother; ``n_folds``: blocked CV folds;
    ``block_pitches``: CV block side in spot pitches; ``shrink``: pull of each gene's image
    weight toward the mean over genes (0 = none, 1 = one weight for all);
    ``spot_features``: the image model of whole spots (``"crops"``: ``ridge``'s spot crops;
    ``"footprint"``: the 8 um map's; ``"auto"``: crops when the FeatureMaps' encoder is a
    registered one; the choice is ``spot_model_``); ``cache_dir``: where crops are cached
    (default ``$HISTOSR_CACHE_DIR``)."""

    #: an image-only section (no genes measured) gets the image model alone (P3)
    image_only: ClassVar[bool] = True
    constraints: ClassVar[dict] = {
        "k": Interval(int, 2), "n_folds": Interval(int, 2),
        "block_pitches": Interval(float, 0, closed="neither"),
        "shrink": Interval(float, 0, 1), "image_target": Options(*IMAGE_TARGETS),
        "spot_features": Options(*SPOT_FEATURES), "weights": Options(*WEIGHTS)}

    k: int = 32
    n_folds: int = 5
    block_pitches: float = 2.0
    shrink: float = 0.3
    image_target: str = "expression"
    spot_features: str = "auto"
    weights: str = "pooled"
    cache_dir: str | None = None

    # -- fitting ----------------------------------------------------------------------------
    def _fit(self, sections, features) -> None:
        from sklearn.linear_model import RidgeCV

        tables = [spot_table(s, fm, self.genes_) for s, fm in zip(sections, features)]
        for t in tables:
            t["h"], _ = loo_bandwidth(t["xy_um"], t["Y"], self.k)
            t["pitch"] = pitch_um(t["xy_um"])
        from ..features.registry import REGISTRY as ENCODERS

        # the spot-level image model reads crops with the FeatureMaps' encoder ("ssl"
        # trained once: the maps carry "ssl:<weights>")
        self.crop_encoder_ = crop_encoder_of(features[0])
        try:
            ENCODERS.key(self.crop_encoder_)
            known = True
        except InputError as e:
            if self.spot_features == "crops":
                raise InputError(f"hybrid (spot_features='crops') reads spot crops with the "
                                 f"FeatureMaps' encoder {self.crop_encoder_!r}, which is not "
                                 "a registered encoder: use spot_features='footprint'") from e
            known = False
        self.spot_model_ = "crops" if self.spot_features == "crops" or (
            self.spot_features == "auto" and known) else "footprint"
        crops = self.spot_model_ == "crops"
        if crops:
            for s, t in zip(sections, tables):
                t["C"] = self._crop_ridge()._raw_features(s, s.xy[t["keep"]])
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

        def crop_detail(cmodel, t, rows, at):
            """The crop model's image part at spots ``at`` when ``rows`` are measured (each
            set of points standardised over itself, as at prediction)."""
            own = cmodel.predict_raw(t["C"][rows])
            return cmodel.predict_raw(t["C"][at]) - KernelField(
                t["xy_um"][rows], own, t["h"], self.k)(t["xy_um"][at])

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
        Yo, Fo, Io, So, Ko, fold_coef, fold_icpt = [], [], [], [], [], [], []
        for k in range(self.n_folds):
            train = [(t, np.flatnonzero(f != k)) for t, f in zip(tables, folds)]
            train = [(t, r) for t, r in train if len(r) >= 3]
            if not train:
                continue
            model = ridge(train)
            cmodel = self._crop_ridge().fit_raw([t["C"][r] for t, r in train],
                                                [t["Y"][r] for t, r in train]) if crops else None
            fold_coef.append(np.asarray(model.coef_, np.float32).T)
            fold_icpt.append(np.asarray(model.intercept_, np.float32).reshape(-1))
            for t, f in zip(tables, folds):
                held, rest = np.flatnonzero(f == k), np.flatnonzero(f != k)
                if len(held) == 0 or len(rest) < 3:
                    continue
                field = KernelField(t["xy_um"][rest], t["Y"][rest], t["h"], self.k)
                Yo.append(t["Y"][held])
                Ko.append(np.full(len(held), k))
                Fo.append(field(t["xy_um"][held]))
                Io.append(detail(model, t, rest, held))
                if crops:
                    So.append(crop_detail(cmodel, t, rest, held))
        Yo, Fo, Io = (np.concatenate(a).astype(np.float64) for a in (Yo, Fo, Io))
        self._oof_folds = np.concatenate(Ko)
        # out-of-fold pieces, kept for diagnostics (not saved with the model)
        self._oof = {"Y": Yo, "F": Fo, "I": Io, "S": np.concatenate(So) if crops else None}
        self.image_weight_ = self._weights(Yo - Fo, Io)
        self.cv_pcc_interpolation_ = metrics.pcc_per_gene(Fo, Yo).astype(np.float32)
        self.cv_pcc_ = metrics.pcc_per_gene(Fo + self.image_weight_ * Io, Yo).astype(np.float32)
        if crops:  # the spot-level (crop) image part: its own weight and self-validation
            So = np.concatenate(So).astype(np.float64)
            self.crop_weight_ = self._weights(Yo - Fo, So)
            self.cv_pcc_map_ = self.cv_pcc_  # the 8 um map's image model, at spots
            self.cv_pcc_ = metrics.pcc_per_gene(Fo + self.crop_weight_ * So, Yo).astype(
                np.float32)

        # the fold models' image parts: their spread is the per-superpixel uncertainty
        self.fold_coef_ = np.stack(fold_coef)  # (folds, features, genes)
        self.fold_intercept_ = np.stack(fold_icpt)  # (folds, genes)
        final = ridge([(t, np.arange(len(t["Y"]))) for t in tables])
        self.coef_ = np.asarray(final.coef_, dtype=np.float32).T.copy()  # (features, genes)
        self.intercept_ = np.asarray(final.intercept_, dtype=np.float32).reshape(-1)
        self.alpha_ = float(final.alpha_)
        if crops:
            cm = self._crop_ridge().fit_raw([t["C"] for t in tables], [t["Y"] for t in tables])
            self.crop_model_ = cm._state()
            for t in tables:
                t["R"] = cm.predict_raw(t["C"])
        self.spots_ = {section_key(s, fm.grid, self.genes_): self._field_state(t)
                       for s, fm, t in zip(sections, features, tables)}

    def _weights(self, E: np.ndarray, D: np.ndarray) -> np.ndarray:
        """Per-gene weight of the out-of-fold image part ``D`` on the field's out-of-fold
        error ``E`` (module docstring, step 3)."""
        if self.weights == "pooled":
            return pooled_weights(E, D, self._oof_folds)
        return detail_weights(E, D, self.shrink)

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
        and the library per superpixel; with crops, the same for the spot-level model
        (``spot_values``: expression minus its weight x the crop model at the spots)."""
        Y = t["Y"]
        if self.image_target == "expression":
            Y = Y - self.image_weight_ * self._image(t["X"])
        out = {"xy_um": t["xy_um"], "h": float(t["h"]), "X": t["X"].astype(np.float32),
               "values": np.concatenate([Y, t["libdens"][:, None]], axis=1).astype(
                   np.float32)}
        if self.spot_model_ == "crops":
            out["spot_values"] = (t["Y"] - self.crop_weight_ * t["R"]).astype(np.float32)
        return out

    def _crop_ridge(self):
        """An unfitted spot-level image model: ``ridge`` (its crops, standardisation, PCA
        and penalty choice) with the FeatureMaps' encoder."""
        import os

        from ..features.cache import CACHE_ENV
        from .ridge import Ridge

        return Ridge(encoder=self.crop_encoder_, seed=self.seed, progress=False,
                     cache_dir=self.cache_dir or os.environ.get(CACHE_ENV))

    def _crop_model(self):
        """The fitted spot-level image model (rebuilt from its saved state)."""
        m = self._crop_ridge()
        m.__dict__.update(self.crop_model_)
        return m

    def reliability(self):
        """Per fitted gene: out-of-fold Pearson r of the hybrid and of the spatial field
        alone, and the image weight (a DataFrame indexed by gene). With the crop model,
        ``heldout_pcc`` is that of its whole-spot predictions (what P1 scores) and
        ``heldout_pcc_map`` / ``image_weight`` those of the 8 um map's image model;
        ``spot_image_weight`` is the crop model's weight."""
        import pandas as pd

        self.check_fitted()
        from ..outputs import HELDOUT_PCC, HELDOUT_PCC_INTERP

        cols = {HELDOUT_PCC: self.cv_pcc_, HELDOUT_PCC_INTERP: self.cv_pcc_interpolation_,
                "image_weight": self.image_weight_}
        if self.spot_model_ == "crops":
            cols["spot_image_weight"] = self.crop_weight_
            cols["heldout_pcc_map"] = self.cv_pcc_map_
        return pd.DataFrame(cols, index=pd.Index(self.genes_))

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
            if self.spot_model_ == "crops":
                cm = self._crop_model()
                t["R"] = cm.predict_raw(cm._raw_features(section, section.xy[t["keep"]]))
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

    def predict(self, section, features=None, at=None, consistency=None, diameter_um=None,
                max_bytes=None, calibrate=None, post=None):
        """As :meth:`SuperpixelMethod.predict`; with the crop model (``spot_model_``), points
        outside every measured footprint (an (n, 2) array of px whose disks share no
        superpixel with a measured spot, or the spots of a section with nothing measured)
        are predicted as whole spots by the spot-level model (module docstring, step 5):
        counts per footprint, no post-steps (they act on 8 um maps). Points inside measured
        spots (super-resolution, e.g. P2's native spots) come from the 8 um map."""
        self.check_fitted()
        whole = at is None or (isinstance(at, str) and at == "superpixels")
        spots = isinstance(at, str) and at == "spots"
        if (self.spot_model_ != "crops" or whole or (spots and section.counts.n_vars > 0)
                or (not spots and self._inside_measured(section, features, at, diameter_um))):
            return super().predict(section, features, at, consistency, diameter_um,
                                   max_bytes, calibrate, post)
        if not spots and isinstance(at, str):
            raise InputError(f"at must be 'superpixels', 'spots' or an (n, 2) array of px, "
                             f"got {at!r}")
        return self._predict_crops(section, features, at, diameter_um)

    def _inside_measured(self, section, features, at, diameter_um) -> bool:
        """Whether any disk at the points ``at`` (px) shares a superpixel with a measured
        spot's footprint: then they are super-resolution targets inside measured spots (P2's
        native spots in pooled pseudo-spots), predicted from the 8 um map and its
        post-steps, not as whole spots."""
        from ..geometry import footprint_matrix

        if section.counts.n_vars == 0 or features is None or isinstance(at, str):
            return False
        xy = np.asarray(at, dtype=np.float64).reshape(-1, 2)
        d = diameter_um or section.spot_diameter_um
        asked = np.unique(footprint_matrix(features.grid, [p[None] for p in xy], d).indices)
        measured = np.unique(section_footprints(section, features.grid).indices)
        return bool(np.intersect1d(asked, measured, assume_unique=True).size)

    def _predict_crops(self, section, features, at, diameter_um):
        import anndata as ad
        import pandas as pd

        from ..geometry import footprint_matrix

        if features is None or features.dim != self.in_dim_:
            raise InputError(f"hybrid was fitted on {self.in_dim_}-d features: pass the "
                             f"section's FeatureMap of encoder {self.crop_encoder_!r}")
        grid = features.grid
        if isinstance(at, str):
            fps, ids, xy = section.spot_footprints(), section.counts.obs_names, section.xy
        else:
            xy = np.asarray(at, dtype=np.float64).reshape(-1, 2)
            fps, ids = [p[None] for p in xy], [str(i) for i in range(len(xy))]
        cm = self._crop_model()
        R = cm.predict_raw(cm._raw_features(section, xy))
        n_cells = np.diff(footprint_matrix(grid, fps, diameter_um or
                                           section.spot_diameter_um).indptr)
        xy_um = xy * float(grid.um_per_px)
        if section.counts.n_vars == 0:  # nothing measured: the crop model alone
            v, libdens = R, np.full(len(xy), self.libdens_mean_)
        else:  # regression kriging: field(Y - w R) + w R
            s = self._state_for(section, features)
            G = len(self.genes_)
            fv = KernelField(s["xy_um"], np.concatenate(
                [s["spot_values"], s["values"][:, G:]], axis=1), s["h"], self.k)(xy_um)
            v, libdens = fv[:, :G] + self.crop_weight_ * R, fv[:, G]
        X = np.expm1(np.clip(v, 0, None)) * (libdens * n_cells)[:, None] / 1e4
        out = ad.AnnData(X=X.astype(np.float32),
                         obs=pd.DataFrame(index=pd.Index([str(i) for i in ids])),
                         var=pd.DataFrame(index=pd.Index(self.genes_)))
        out.layers[WHOLE_SPOT_LAYER] = np.asarray(v, dtype=np.float32)
        out.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
        uns = self.superpixel_uns(section, features, False, False)
        uns["scale"] = ("counts per spot footprint (whole-spot prediction of the spot-level "
                        "model: library = the field of the spots' library x footprint "
                        f"superpixels); layers[{WHOLE_SPOT_LAYER!r}]: its log1p CP10k")
        if not isinstance(at, str):
            uns["in_sample"] = False
        out.uns["histosr"] = uns
        return self._add_reliability(out)

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
