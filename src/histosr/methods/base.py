"""One estimator contract for every method (scikit-learn style, built by name).

Every method is a dataclass whose fields are its hyper-parameters (published defaults),
validated declaratively (:mod:`histosr.params`) when it is built and when it is fitted::

    m = get_method("istar", epochs=100)      # ParameterError for a bad value or name
    m.fit(sections, features, genes=None)    # genes: default the HEST rule's top 1000
    adata = m.predict(section, features)     # at=None: the method's natural target
    m.save("model"); m2 = load_method("model")

Two kinds, told apart by the tag ``kind`` (see :meth:`Method.tags`), never by ``getattr``:

* ``"superpixel"`` (super-resolution: istar, histex, deephex and the nearest / bilinear / knn
  baselines): counts per 8 um superpixel; natural target ``"superpixels"``;
  ``at="spots"`` (or an (n, 2) array of px) gives sums over spot footprints; the shared
  mass-preserving consistency step (:mod:`histosr.consistency`) is a parameter.
* ``"spot"`` (hishrst, trihrge, ridge, knn_features, mean, hespotex): log1p CP10k of whole
  spot-sized disks from spot-crop features they read themselves; natural target
  ``"spots"``; they also predict at any (n, 2) array of px (densified grids, image-only
  lattices).

Fitted state lives in attributes ending with ``_``; a model folder is JSON + arrays +
tensors (:mod:`histosr.methods.persist`), never a pickle.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd

from ..errors import InputError
from ..geometry import Grid, disk_cells, footprint_matrix
from ..keys import digest, dumps, jsonable
from ..params import Interval, ParameterError, check_names, validate_fields
from ..registry import Registry
from ..stain import applied as stain_applied

SUPERPIXEL, SPOT = "superpixel", "spot"
KINDS = (SUPERPIXEL, SPOT)
#: what X holds in a method's predictions, per kind
SCALES = {SUPERPIXEL: "counts per 8 um superpixel", SPOT: "log1p_cp10k"}
#: layer of a superpixel method's prediction at points that it predicted as whole spots on
#: the log1p CP10k scale (e.g. ``hybrid``): the protocols score it as they score spot methods
WHOLE_SPOT_LAYER = "log1p_cp10k"
#: default genes fitted when none are given: the HEST rule's top N (histosr.pp.select_genes)
DEFAULT_N_GENES = 1000


class NotFittedError(InputError, AttributeError):
    """``predict``/``save`` called on a method that was not fitted (scikit-learn's name)."""


class PredictionTooLargeError(InputError):
    """An in-memory prediction that would not fit in memory; the message gives its size and
    the alternatives."""


def memory_budget() -> float:
    """Bytes an in-memory prediction may take: 60% of the memory available now."""
    import psutil

    return 0.6 * psutil.virtual_memory().available


def check_prediction_size(n_obs: int, n_genes: int, copies: float, what: str, advice: str,
                          max_bytes: float | None = None) -> None:
    """Raise :class:`PredictionTooLargeError` before any work when ``copies`` float32
    (``n_obs`` x ``n_genes``) arrays would exceed ``max_bytes`` (default
    :func:`memory_budget`). ``what``: the observations (e.g. "superpixels"); ``advice``:
    what to do instead (ends the message)."""
    need = float(n_obs) * int(n_genes) * 4 * float(copies)
    if max_bytes is None:
        max_bytes = memory_budget()
    if need > max_bytes:
        raise PredictionTooLargeError(
            f"predicting {int(n_obs):,} {what} x {int(n_genes):,} genes in memory needs about "
            f"{need / 2**30:.1f} GB, more than the {max_bytes / 2**30:.1f} GB allowed: {advice}")


def _load_builtin() -> None:
    # importing the modules registers them
    from . import baselines, hespotex, hishrst, histex, hybrid, istar, ridge, trihrge  # noqa: F401


REGISTRY = Registry("method", _load_builtin)


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def deco(cls):
        cls.name = name
        return REGISTRY.register(name)(cls)

    return deco


def available_methods() -> list[str]:
    return REGISTRY.names()


def method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (:class:`UnknownNameError` otherwise)."""
    return REGISTRY.get(name)


def get_method(name: str, **params) -> Method:
    """Build a method by name with plain keyword hyper-parameters, validated."""
    cls = method_class(name)
    check_names(f"method {name!r}", params, cls.param_names())
    return cls(**params)


def section_record(section) -> dict:
    """What identifies a section's measurements: name, spots, a digest of ids and counts."""
    return {"name": str(section.name), "n_spots": int(section.n_spots),
            "key": digest(list(map(str, section.counts.obs_names)),
                          list(map(str, section.counts.var_names)), section.counts.X)}


@dataclass
class Method:
    """Base estimator: parameters, validation, fitted check, persistence, tags. Subclass
    :class:`SuperpixelMethod` or :class:`~histosr.methods.spot.SpotMethod`, not this."""

    name: ClassVar[str] = "method"
    kind: ClassVar[str] = SUPERPIXEL
    #: False for methods that read no superpixel FeatureMap channels (only its grid and
    #: mask, or nothing): callers may then pass a grid-only FeatureMap
    needs_features: ClassVar[bool] = True
    #: True for methods that can predict a section from its image alone (no measured spot)
    image_only: ClassVar[bool] = False
    #: True for methods that give a per-superpixel uncertainty (``uncertainty_cells``)
    has_uncertainty: ClassVar[bool] = False
    #: what that uncertainty measures (recorded with the ``uncertainty`` maps)
    uncertainty_units: ClassVar[str] = ""
    #: ranges and choices of parameters (types come from the field annotations)
    constraints: ClassVar[dict] = {"seed": Interval(int, 0)}
    #: parameters that change how a fit runs, not what it learns: not saved with a model,
    #: not part of checkpoint keys
    runtime: ClassVar[tuple] = ("progress", "device", "checkpoint_dir", "cache_dir")

    seed: int = 0
    progress: bool = True
    genes_: list[str] | None = field(default=None, init=False, repr=False)
    training_sections_: list[dict] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.validate_params()

    # -- parameters -------------------------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def all_constraints(cls) -> dict:
        out: dict = {}
        for k in reversed(cls.__mro__):
            out.update(k.__dict__.get("constraints", {}))
        return out

    def validate_params(self) -> None:
        """Check every parameter's type and range (:class:`ParameterError`)."""
        validate_fields(self, self.all_constraints(), self.name)
        self._check_params()

    def _check_params(self) -> None:
        """Checks that involve several parameters (subclasses)."""

    def params(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.param_names()}

    def set_params(self, **params) -> Method:
        """Set parameters by name (validated, scikit-learn's ``set_params``)."""
        check_names(f"method {self.name!r}", params, self.param_names())
        for k, v in params.items():
            setattr(self, k, v)
        self.validate_params()
        return self

    def learned_params(self) -> dict[str, Any]:
        """Parameters without the runtime ones (what a fit depends on)."""
        return {k: v for k, v in self.params().items() if k not in self.runtime}

    @classmethod
    def tags(cls) -> dict:
        """What a caller needs to know about a method without building it."""
        return {"kind": cls.kind, "target": "superpixels" if cls.kind == SUPERPIXEL else "spots",
                "scale": SCALES[cls.kind], "needs_features": bool(cls.needs_features),
                "image_only": bool(cls.image_only),
                "consistency": cls.kind == SUPERPIXEL,
                "calibrate": cls.kind == SUPERPIXEL,
                "uncertainty": bool(cls.has_uncertainty)}

    @property
    def target(self) -> str:
        return self.tags()["target"]

    # -- fitting ----------------------------------------------------------------------------
    def fit(self, sections, features=None, genes=None) -> Method:
        """Fit on one or more sections (their measured spots) and, for methods that read
        them, their FeatureMaps. ``genes``: a list (each must be measured in every
        section), ``"all"`` (every gene measured in all sections) or ``None`` (default: the
        HEST rule's top 1000 over the pooled spots, :func:`histosr.pp.select_genes`)."""
        self.validate_params()
        sections = list(sections) if isinstance(sections, (list, tuple)) else [sections]
        if not sections:
            raise InputError(f"{self.name}: fit needs at least one section")
        if features is not None:
            features = list(features) if isinstance(features, (list, tuple)) else [features]
            if len(features) != len(sections):
                raise InputError(f"got {len(sections)} sections but {len(features)} feature maps")
        self.genes_ = fit_genes(sections, genes)
        self.training_sections_ = [section_record(s) for s in sections]
        self._fit_kind(sections, features)
        return self

    def _fit_kind(self, sections, features) -> None:  # pragma: no cover - per kind
        raise NotImplementedError

    def check_fitted(self) -> None:
        if self.genes_ is None:
            raise NotFittedError(f"this {self.name} is not fitted yet: call fit(sections, "
                                 "features) first (or load a fitted model folder)")


    def predict(self, section, features=None, at=None, **kw) -> ad.AnnData:  # pragma: no cover
        raise NotImplementedError

    def reliability(self) -> pd.DataFrame | None:
        """Per fitted gene, the method's own held-out estimate of how well it predicts
        (a DataFrame indexed by gene: :data:`histosr.outputs.HELDOUT_PCC` and
        :data:`~histosr.outputs.HELDOUT_PCC_INTERP`), or
        None for methods that do not validate themselves. Predictions carry it in ``var``."""
        return None

    def _add_reliability(self, adata: ad.AnnData) -> ad.AnnData:
        rel = self.reliability()
        if rel is not None:
            for col in rel.columns:
                adata.var[col] = rel[col].reindex(adata.var_names).to_numpy()
        return adata

    def fitted_on(self, section) -> bool:
        """Whether ``section`` (its very counts) is one the method was fitted on."""
        key = section_record(section)["key"]
        return any(r.get("key") == key for r in self.training_sections_ or [])

    def _uns(self, section, **extra) -> dict:
        from .. import __version__

        out = {"method": self.name, "kind": self.kind, "scale": SCALES[self.kind],
               "params": dumps(self.learned_params()), "seed": int(self.seed),
               "version": __version__, "section": str(getattr(section, "name", "")),
               "fitted_on": dumps([r["name"] for r in self.training_sections_ or []]),
               "in_sample": bool(section is not None and self.fitted_on(section)),
               "stain_norm": dumps(stain_applied(section))}
        out.update(extra)
        return out

    # -- persistence --------------------------------------------------------------------------
    def _state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k.endswith("_")
                and not k.startswith("_")}

    def save(self, path: str | Path) -> Path:
        """Write the fitted method to the folder ``path`` (replaced atomically): model.json
        (parameters, versions, state) + arrays.npz + weights.pt, no pickle, no runtime or
        absolute fields."""
        from .. import __version__
        from .persist import save_folder

        self.check_fitted()
        header = {"histosr_version": __version__, "method": self.name, "kind": self.kind,
                  "params": jsonable(self.learned_params())}
        return save_folder(path, header, self._state())

    @classmethod
    def load(cls, path: str | Path, **runtime) -> Method:
        """A fitted method from a model folder (see :meth:`save`); ``runtime`` sets runtime
        parameters (``device``, ``progress``, ``cache_dir``...)."""
        from .. import __version__
        from .persist import ModelFileError, load_folder

        header, state = load_folder(path)
        name = header.get("method")
        if name not in available_methods():
            raise ModelFileError(f"{path}: unknown method {name!r} in model.json (this histosr "
                                 f"has {', '.join(available_methods())})")
        if header.get("histosr_version") != __version__:
            warnings.warn(f"{path} was written by histosr {header.get('histosr_version')}; "
                          f"loading it with {__version__}", stacklevel=2)
        params = dict(header.get("params") or {})
        try:
            m = get_method(name, **params, **runtime)
        except ParameterError as e:
            raise ModelFileError(f"{path}: model.json holds invalid parameters ({e})") from e
        if "genes_" not in state:
            raise ModelFileError(f"{path}: model.json holds no fitted state (genes_)")
        m.__dict__.update(state)
        m._after_load()
        return m

    def _after_load(self) -> None:
        """Restore what JSON does not keep (subclasses)."""


def fit_genes(sections: list, genes=None) -> list[str]:
    """The genes a fit uses (see :meth:`Method.fit`), checked against every section."""
    from ..pp import select_genes, shared_genes

    where = "every training section" if len(sections) > 1 else f"section {sections[0].name!r}"
    if genes is None:
        genes = select_genes(sections, DEFAULT_N_GENES)
        if not genes:
            n = sum(s.n_spots for s in sections)
            tot = sum(float(np.asarray(s.counts.X.sum())) for s in sections)
            raise InputError(f"no gene is detected in at least 10% of the {n} spots of {where} "
                             f"({tot:g} counts in all): nothing to fit. Check that the counts are "
                             "raw UMI counts of in-tissue spots, or pass genes= explicitly")
        return genes
    if isinstance(genes, str):
        if genes != "all":
            raise InputError(f"genes must be a list of names, 'all' or None, got {genes!r}")
        genes = shared_genes(sections)
    genes = [str(g) for g in genes]
    missing = [g for g in genes if any(g not in s.counts.var_names for s in sections)]
    if missing:
        raise InputError(f"{len(missing)} gene(s) not measured in {where}: "
                         f"{', '.join(missing[:10])}")
    if not genes:
        raise InputError(f"no gene is measured in {where}")
    if len(set(genes)) != len(genes):
        raise InputError("genes are listed more than once: " + ", ".join(
            sorted({g for g in genes if genes.count(g) > 1})[:10]))
    return genes


@dataclass
class SuperpixelMethod(Method):
    """Super-resolution methods: counts per 8 um superpixel (the sum over a spot's footprint
    approximates the spot's counts). Subclasses implement ``_fit(sections, features)`` and
    ``_predict_cells(section, features, flat_cells) -> (n_cells, n_genes)``; optionally
    ``_uncertainty_cells`` (per-superpixel spread, see :meth:`uncertainty_cells`).

    Shared post-steps, in this order (:meth:`post_steps`): ``calibrate`` (calibrated detail,
    :mod:`histosr.calibration`: each gene's detail kept in proportion to how well the method
    predicts measured spots; ``calibrate_folds`` 0 = judged on the fitted spots, cheap;
    K >= 2 = K blocked refits, honest) then ``consistency`` (:mod:`histosr.consistency`)."""

    kind: ClassVar[str] = SUPERPIXEL
    constraints: ClassVar[dict] = {"calibrate_folds": Interval(int, 0)}
    consistency: bool = False
    calibrate: bool = False
    calibrate_folds: int = 0

    def _fit_kind(self, sections, features) -> None:
        features = self._features_for(sections, features)
        self._fit(sections, features)

    def _features_for(self, sections, features):
        if features is not None:
            return features
        if self.needs_features:
            raise InputError(f"{self.name} reads image features: pass a FeatureMap per section "
                             "(features=hs.features(section))")
        from ..features.featuremap import grid_only

        return [grid_only(s) for s in sections]

    def _fit(self, sections: list, features: list) -> None:  # pragma: no cover
        raise NotImplementedError

    def _predict_cells(self, section, features, flat_cells: np.ndarray) -> np.ndarray:
        """(n_cells, n_genes) float32 counts per superpixel at flat grid indices."""
        raise NotImplementedError  # pragma: no cover

    def _check_params(self) -> None:
        if self.calibrate_folds == 1:
            raise ParameterError(f"'calibrate_folds' parameter of {self.name} must be 0 "
                                 "(judge the detail on the fitted spots) or >= 2 (blocked "
                                 "refits), got 1")

    def predict(self, section, features=None, at: str | np.ndarray | None = None,
                consistency: bool | None = None, diameter_um: float | None = None,
                max_bytes: float | None = None, calibrate: bool | None = None,
                post=None) -> ad.AnnData:
        """Predict expression.

        ``at``: ``None``/``"superpixels"`` (one observation per tissue superpixel, counts per
        8 um superpixel), ``"spots"`` (the section's own spots: footprint sums) or an (n, 2)
        array of full-res (x, y) px (sums over disks of ``diameter_um``, default the
        section's spot diameter). ``consistency`` (default: the method's setting) rescales
        so each measured spot's footprint sums to its measured counts; ``calibrate``
        (default: the method's setting) applies calibrated detail first.

        The superpixel prediction is built in memory: when it would need more than
        ``max_bytes`` (default: 60% of the memory available now) this raises
        :class:`PredictionTooLargeError` with the size; stream it to disk with
        :func:`histosr.outputs.stream_prediction` (the same AnnData as a chunked h5ad, and
        zarr maps) instead: ``histosr run`` writes its outputs that way. ``post``: the
        post-steps of :meth:`post_steps` when already fitted (then ``consistency`` and
        ``calibrate`` are theirs).
        """
        self.check_fitted()
        features = self._features_for([section], None if features is None else [features])[0]
        grid = features.grid
        use_cons = self.consistency if consistency is None else bool(consistency)
        use_cal = self.calibrate if calibrate is None else bool(calibrate)
        at = "superpixels" if at is None else at
        whole = isinstance(at, str) and at == "superpixels"
        if whole:  # before any work: would it fit?
            r, c = features.tissue_cells()
            self._check_size(len(r), use_cons, max_bytes)
        if post is None:
            post = self.post_steps(section, features, use_cons, use_cal)
        use_cons, use_cal = post.consistency, post.calibrate
        uns = self.superpixel_uns(section, features, use_cons, use_cal)
        if whole:
            cells = grid.flat(r, c)
            vals = self.predict_cells(section, features, cells, post=post)
            return self._add_reliability(superpixel_anndata(vals, r, c, grid, self.genes_, uns))
        if isinstance(at, str) and at == "spots":
            fps, ids, xy = section.spot_footprints(), section.counts.obs_names, section.xy
        elif isinstance(at, str):
            raise InputError(f"at must be 'superpixels', 'spots' or an (n, 2) array of px, "
                             f"got {at!r}")
        else:
            xy = np.asarray(at, dtype=np.float64).reshape(-1, 2)
            fps, ids = [p[None] for p in xy], [str(i) for i in range(len(xy))]
            uns["in_sample"] = False
        d = diameter_um or section.spot_diameter_um
        X = self.footprint_sums(section, features, footprint_matrix(grid, fps, d), post)
        out = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index([str(i) for i in ids])),
                         var=pd.DataFrame(index=pd.Index(self.genes_)))
        out.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
        uns["scale"] = "counts per spot footprint (sum over its 8 um superpixels)"
        out.uns["histosr"] = uns
        return self._add_reliability(out)

    def superpixel_uns(self, section, features, consistency: bool,
                       calibrate: bool = False) -> dict:
        """``uns["histosr"]`` of a prediction at this section's superpixels (without the
        grid shape, which :func:`superpixel_anndata` adds)."""
        return self._uns(section, encoder=features.encoder, encoder_meta=dumps(features.meta),
                         um_per_px=float(features.grid.um_per_px), superpixel_um=8.0,
                         consistency=bool(consistency), calibrate=bool(calibrate))

    def _check_size(self, n_cells: int, consistency: bool, max_bytes: float | None) -> None:
        check_prediction_size(
            n_cells, len(self.genes_), 3 if consistency else 2, "superpixels",
            "fit fewer genes (the default is the top 1000 of hs.pp.select_genes), predict "
            "at='spots', or stream it to disk with histosr.outputs.stream_prediction(method, "
            "section, features, 'prediction.h5ad', 'maps.zarr')", max_bytes)

    def predict_cells(self, section, features, flat_cells: np.ndarray,
                      consistency: bool = False, calibrate: bool | None = None,
                      post=None) -> np.ndarray:
        """Counts per superpixel at the given flat cells, after the post-steps
        (``post``: :meth:`post_steps` already fitted, else fitted here from ``consistency``
        and ``calibrate``; ``calibrate`` None = the method's setting)."""
        if post is None:
            post = self.post_steps(section, features, consistency, calibrate)
        return post(np.asarray(self._predict_cells(section, features, flat_cells),
                               dtype=np.float32), flat_cells)

    def post_steps(self, section, features, consistency: bool | None = None,
                   calibrate: bool | None = None) -> PostSteps:
        """The shared post-steps for ``section`` (calibrated detail, then consistency;
        ``None`` = the method's settings), fitted once here on the section's measured spots
        and then applied block by block (streams): ``post(values, flat_cells)``."""
        from ..calibration import DetailCalibrator
        from ..consistency import ConsistencyScaler

        use_cal = self.calibrate if calibrate is None else bool(calibrate)
        use_cons = self.consistency if consistency is None else bool(consistency)
        cal = DetailCalibrator.from_method(self, section, features,
                                           self.calibrate_folds) if use_cal else None
        scaler = ConsistencyScaler.from_method(self, section, features,
                                               calibrator=cal) if use_cons else None
        return PostSteps(cal, scaler)

    def footprint_sums(self, section, features, F, post=None) -> np.ndarray:
        """(n_footprints, G) float32 sums of the prediction over the rows of the footprint
        matrix ``F`` (n_footprints, n_grid_cells), predicted a block of superpixels at a
        time: memory grows with the footprints, not with the cells they cover."""
        from ..arrays import add_sparse_product
        from ..consistency import CELL_BLOCK

        post = post if post is not None else PostSteps(None, None)
        cells = np.unique(F.indices)
        Fc = F[:, cells].tocsc()
        X = np.zeros((F.shape[0], len(self.genes_)), dtype=np.float64)
        for i in range(0, len(cells), CELL_BLOCK):
            blk = cells[i : i + CELL_BLOCK]
            add_sparse_product(X, Fc[:, i : i + CELL_BLOCK],
                               self.predict_cells(section, features, blk, post=post))
        return X.astype(np.float32)

    def uncertainty_cells(self, section, features, flat_cells: np.ndarray) -> np.ndarray | None:
        """(n_cells, n_genes) float32 per-superpixel uncertainty (spread over the method's
        ensemble members or CV folds, on the log1p CP10k scale), or None for a method that
        has none (:attr:`has_uncertainty`). Written next to the maps
        (:func:`histosr.outputs.predict_maps`, array ``uncertainty``)."""
        self.check_fitted()
        if not self.has_uncertainty:
            return None
        return np.asarray(self._uncertainty_cells(section, features,
                                                  np.asarray(flat_cells, np.int64)), np.float32)

    def _uncertainty_cells(self, section, features, flat_cells):  # pragma: no cover
        raise NotImplementedError


@dataclass
class PostSteps:
    """The shared post-steps of a super-resolution prediction, fitted on one section:
    calibrated detail (:class:`~histosr.calibration.DetailCalibrator`) then consistency
    (:class:`~histosr.consistency.ConsistencyScaler`); either may be None. Called on a
    block of predicted values: ``post(values, flat_cells)``."""

    calibrator: Any = None
    scaler: Any = None

    @property
    def consistency(self) -> bool:
        return self.scaler is not None

    @property
    def calibrate(self) -> bool:
        return self.calibrator is not None

    def __call__(self, values: np.ndarray, flat_cells: np.ndarray) -> np.ndarray:
        if self.calibrator is not None:
            values = self.calibrator.apply(values, flat_cells)
        if self.scaler is not None:
            values = self.scaler.apply(values, flat_cells)
        return np.asarray(values, dtype=np.float32)


def load_method(path: str | Path, **runtime) -> Method:
    """A fitted method from a model folder (:meth:`Method.save`)."""
    return Method.load(path, **runtime)


def superpixel_anndata(vals: np.ndarray, rows: np.ndarray, cols: np.ndarray, grid: Grid,
                       genes: list[str], uns: dict) -> ad.AnnData:
    """AnnData with one observation per superpixel (obs ``row``/``col`` grid indices,
    ``obsm["spatial"]`` superpixel centres in full-res px)."""
    obs = pd.DataFrame({"row": rows.astype(np.int32), "col": cols.astype(np.int32)},
                       index=pd.Index([f"{r}_{c}" for r, c in zip(rows, cols)]))
    a = ad.AnnData(X=np.asarray(vals, dtype=np.float32), obs=obs,
                   var=pd.DataFrame(index=pd.Index(genes)))
    a.obsm["spatial"] = grid.xy_of_cells(rows, cols)
    a.uns["histosr"] = {**uns, "grid_shape": list(grid.shape)}
    return a


__all__ = ["Method", "SuperpixelMethod", "register_method", "get_method", "available_methods",
           "method_class", "load_method", "superpixel_anndata", "disk_cells", "fit_genes",
           "NotFittedError", "PredictionTooLargeError", "check_prediction_size",
           "memory_budget", "SUPERPIXEL", "SPOT", "KINDS",
           "WHOLE_SPOT_LAYER",
           "REGISTRY"]
