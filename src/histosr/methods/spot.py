"""Spot-level methods: expression of whole spots (log1p CP10k) from spot-crop features.

Recovery / densification (HisHRST, TriHRGE) and H&E-only prediction (HESpotEx, ``ridge``)
predict one value per spot-sized disk, not per 8 um superpixel. They share this base:

* ``fit(sections, features=None, genes=None)``: one or more sections with measured spots;
  targets are :func:`spot_targets` (log1p of counts per 10,000 of each spot's full library,
  the BENCHMARKS.md scale). ``features`` (superpixel FeatureMaps) are accepted for interface
  compatibility with :class:`~histosr.methods.base.Method` and ignored: spot methods read
  their own crop features (:func:`histosr.features.crop_features`, cached in ``cache_dir``).
* ``predict(section, features=None, at="spots" | (n, 2) array)``: AnnData, one observation
  per spot or per given full-res (x, y) px point, X on the log1p CP10k scale
  (``uns["histosr"]["scale"] == "log1p_cp10k"``). The section needs an image; its counts are
  only used by methods that read neighbouring measured spots (recovery).

Subclasses implement ``_fit_spots(sections, targets)`` and ``_predict_spots(section, xy)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import anndata as ad
import numpy as np
import pandas as pd

from ..metrics import log_cp10k
from .base import Method, shared_genes

SCALE = "log1p_cp10k"


def spot_targets(section, genes: list[str]) -> np.ndarray:
    """(n_spots, n_genes) float32 log1p CP10k of ``genes``, with each spot's library = its
    total counts over ALL measured genes (not only ``genes``)."""
    lib = np.asarray(section.counts.X.sum(axis=1)).reshape(-1).astype(np.float64)
    return log_cp10k(section.dense_counts(genes), lib).astype(np.float32)


@dataclass
class SpotMethod(Method):
    """Base of the spot-level methods (see the module docstring)."""

    kind: ClassVar[str] = "spot"
    needs_features: ClassVar[bool] = False  # crops are read by the method itself

    encoder: str = "handcrafted"
    cache_dir: str | None = None

    # -- to implement -------------------------------------------------------------------
    def _fit_spots(self, sections: list, targets: list[np.ndarray]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _predict_spots(self, section, xy: np.ndarray) -> np.ndarray:  # pragma: no cover
        """(n, n_genes) float32 log1p CP10k at full-res (x, y) px points."""
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------
    def fit(self, sections, features=None, genes: list[str] | None = None) -> SpotMethod:
        """Fit on one or more sections' measured spots. ``genes`` restricts the genes
        (default: genes shared by all sections)."""
        sections = list(sections) if isinstance(sections, (list, tuple)) else [sections]
        self.genes_ = shared_genes(sections, genes)
        self._fit_spots(sections, [spot_targets(s, self.genes_) for s in sections])
        return self

    def predict(self, section, features=None, at: str | np.ndarray = "spots",
                consistency: bool | None = None, diameter_um: float | None = None) -> ad.AnnData:
        """Predict log1p CP10k at the section's spots (``at="spots"``) or at an (n, 2) array
        of full-res (x, y) px. ``consistency``/``diameter_um`` do not apply to spot methods
        (accepted for interface compatibility; ``consistency=True`` is an error)."""
        self._check_fitted()
        if consistency:
            raise ValueError(f"{self.name} predicts whole spots: the superpixel consistency "
                             "step does not apply (use consistency=False)")
        if isinstance(at, str):
            if at != "spots":
                raise ValueError(f"{self.name} predicts at spots: expected at='spots' or an "
                                 f"(n, 2) array of full-res (x, y) px, got {at!r}")
            xy, ids = section.xy, [str(i) for i in section.counts.obs_names]
        else:
            xy = np.asarray(at, dtype=np.float64).reshape(-1, 2)
            ids = [str(i) for i in range(len(xy))]
        X = np.asarray(self._predict_spots(section, xy), dtype=np.float32)
        if X.shape != (len(xy), len(self.genes_)):
            raise RuntimeError(f"{self.name}: predicted {X.shape}, expected "
                               f"{(len(xy), len(self.genes_))}")
        out = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(ids)),
                         var=pd.DataFrame(index=pd.Index(self.genes_)))
        out.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
        out.uns["histosr"] = self._spot_uns()
        return out

    def _spot_uns(self) -> dict:
        import json

        from .. import __version__
        from .base import _jsonable

        return {"method": self.name, "params": json.dumps(_jsonable(self.params())),
                "encoder": self.encoder, "scale": SCALE, "seed": int(self.seed),
                "consistency": False, "version": __version__}


__all__ = ["SpotMethod", "spot_targets", "SCALE"]
