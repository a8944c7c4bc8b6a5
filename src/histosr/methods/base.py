"""Method base class and registry (scikit-learn style estimators, built by name).

A super-resolution method predicts raw-count-like values per 8 um superpixel: the sum over
a spot's footprint approximates that spot's counts. Subclasses implement ``_fit`` and
``_predict_cells``; the base class turns cell predictions into AnnData at superpixels,
at the section's spots or at arbitrary coordinates, and applies the shared
mass-preserving consistency step (:mod:`histosr.consistency`).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd

from ..geometry import Grid, disk_cells, footprint_matrix

_REGISTRY: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: register a :class:`Method` subclass under ``name``."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str, **params) -> Method:
    """Build a method by name with plain keyword hyper-parameters."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(available_methods())}")
    cls = _REGISTRY[name]
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(params) - names)
    if bad:
        raise ValueError(
            f"method {name!r} has no parameter(s) {bad}: expected some of {sorted(names)}"
        )
    return cls(**params)


def _load_builtin() -> None:
    # register built-in methods; hespotex, ridge: H&E-only spot methods (P3); hishrst,
    # trihrge: spot recovery / densification
    from . import baselines, hespotex, hishrst, histex, istar, ridge, trihrge  # noqa: F401


@dataclass
class Method:
    """Base estimator. Hyper-parameters are dataclass fields (published defaults).

    Fitted state lives in attributes ending with ``_`` (``genes_`` etc.).
    """

    name: ClassVar[str] = "method"
    #: super-resolution methods predict per superpixel; spot-level methods override predict
    kind: ClassVar[str] = "superpixel"
    #: False for methods that read no image features (only the FeatureMap's grid and mask):
    #: benchmarks then skip the encoder and pass a grid-only FeatureMap
    needs_features: ClassVar[bool] = True

    seed: int = 0
    consistency: bool = False
    genes_: list[str] | None = field(default=None, init=False, repr=False)

    # -- to implement -------------------------------------------------------------------
    def _fit(self, sections: list, features: list) -> None:  # pragma: no cover
        raise NotImplementedError

    def _predict_cells(self, section, features, flat_cells: np.ndarray) -> np.ndarray:
        """(n_cells, n_genes) float32 counts per superpixel at flat grid indices."""
        raise NotImplementedError  # pragma: no cover

    # -- public API -----------------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def fit(self, sections, features, genes: list[str] | None = None) -> Method:
        """Fit on one or more sections (their spots' counts) and their FeatureMaps.
        ``genes`` restricts the genes (default: genes shared by all sections)."""
        sections = list(sections) if isinstance(sections, (list, tuple)) else [sections]
        features = list(features) if isinstance(features, (list, tuple)) else [features]
        if len(sections) != len(features):
            raise ValueError(f"got {len(sections)} sections but {len(features)} feature maps")
        self.genes_ = shared_genes(sections, genes)
        self._fit(sections, features)
        return self

    def _check_fitted(self) -> None:
        if self.genes_ is None:
            raise RuntimeError(f"{self.name}: call fit(...) before predict(...)")

    def predict(self, section, features, at: str | np.ndarray = "superpixels",
                consistency: bool | None = None, diameter_um: float | None = None) -> ad.AnnData:
        """Predict expression.

        ``at``: ``"superpixels"`` (one observation per tissue superpixel, counts per 8 um
        superpixel), ``"spots"`` (the section's own spots: footprint sums) or an (n, 2)
        array of full-res (x, y) px (sums over disks of ``diameter_um``, default the
        section's spot diameter). ``consistency`` (default: the method's setting)
        rescales so each measured spot's footprint sums to its measured counts.
        """
        self._check_fitted()
        grid = features.grid
        use_cons = self.consistency if consistency is None else consistency
        if isinstance(at, str) and at == "superpixels":
            r, c = features.tissue_cells()
            cells = grid.flat(r, c)
            vals = self.predict_cells(section, features, cells, use_cons)
            return superpixel_anndata(vals, r, c, grid, self.genes_, self._uns(features, use_cons))
        if isinstance(at, str) and at == "spots":
            fps, ids, xy = section.spot_footprints(), section.counts.obs_names, section.xy
        elif isinstance(at, str):
            raise ValueError(f"at must be 'superpixels', 'spots' or an (n, 2) array, got {at!r}")
        else:
            xy = np.asarray(at, dtype=np.float64).reshape(-1, 2)
            fps, ids = [p[None] for p in xy], [str(i) for i in range(len(xy))]
        d = diameter_um or section.spot_diameter_um
        F = footprint_matrix(grid, fps, d)
        cells = np.unique(F.indices)
        vals = self.predict_cells(section, features, cells, use_cons)
        Fc = F[:, cells]
        X = np.asarray(Fc @ vals, dtype=np.float32)
        out = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index([str(i) for i in ids])),
                         var=pd.DataFrame(index=pd.Index(self.genes_)))
        out.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
        out.uns["histosr"] = self._uns(features, use_cons)
        return out

    def predict_cells(self, section, features, flat_cells: np.ndarray,
                      consistency: bool = False) -> np.ndarray:
        """Counts per superpixel at the given flat cells, optionally made consistent with
        the section's measured spots."""
        from ..consistency import ConsistencyScaler

        vals = np.asarray(self._predict_cells(section, features, flat_cells), dtype=np.float32)
        if consistency:
            scaler = ConsistencyScaler.from_method(self, section, features)
            vals = scaler.apply(vals, flat_cells)
        return vals

    def _uns(self, features, consistency: bool) -> dict:
        from .. import __version__

        return {
            "method": self.name,
            "params": json.dumps(_jsonable(self.params())),
            "encoder": features.encoder,
            "encoder_meta": json.dumps(_jsonable(features.meta)),
            "um_per_px": float(features.grid.um_per_px),
            "superpixel_um": 8.0,
            "seed": int(self.seed),
            "consistency": bool(consistency),
            "version": __version__,
        }

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the fitted method to a folder (params.json + state.pkl), atomically."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "params.json").write_text(
            json.dumps({"method": self.name, "params": _jsonable(self.params())}, indent=1)
        )
        tmp = path / "state.pkl.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(self._state(), f)
        tmp.replace(path / "state.pkl")

    def _state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k.endswith("_")}

    @classmethod
    def load(cls, path: str | Path) -> Method:
        path = Path(path)
        meta = json.loads((path / "params.json").read_text())
        m = get_method(meta["method"], **meta["params"])
        with open(path / "state.pkl", "rb") as f:
            m.__dict__.update(pickle.load(f))
        return m


def shared_genes(sections: list, genes: list[str] | None = None) -> list[str]:
    """``genes`` checked against every section, or (``None``) the genes measured in all of
    them, in the first section's order."""
    if genes is None:
        common = set(sections[0].genes)
        for s in sections[1:]:
            common &= set(s.genes)
        genes = [g for g in sections[0].genes if g in common]
    missing = [g for g in genes if any(g not in s.counts.var_names for s in sections)]
    if missing:
        raise ValueError(f"genes not measured in every training section: {missing[:10]}")
    if not genes:
        raise ValueError("no gene is measured in every training section")
    return list(genes)


def load_method(path: str | Path) -> Method:
    return Method.load(path)


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


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


__all__ = ["Method", "register_method", "get_method", "available_methods", "load_method",
           "superpixel_anndata", "disk_cells"]
