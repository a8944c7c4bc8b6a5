"""Spot-level methods: expression of whole spots (log1p CP10k) from spot-crop features.

Recovery / densification (HisHRST, TriHRGE) and H&E-only prediction (HESpotEx, ``ridge``)
predict one value per spot-sized disk, not per 8 um superpixel. They share this base:

* ``fit(sections, features=None, genes=None)``: one or more sections with measured spots;
  targets are :func:`spot_targets` (log1p of counts per 10,000 of each spot's full library,
  the BENCHMARKS.md scale). ``features`` (superpixel FeatureMaps) are ignored: spot methods
  read their own crop features (:func:`histosr.features.crop_features`, cached in
  ``cache_dir``), so the same call fits every method (the contract of
  :class:`~histosr.methods.base.Method`).
* ``predict(section, features=None, at=None | "spots" | (n, 2) array)``: AnnData, one
  observation per spot or per given full-res (x, y) px point, X on the log1p CP10k scale
  (``uns["histosr"]["scale"] == "log1p_cp10k"``). The section needs an image; its counts are
  only used by methods that read neighbouring measured spots (recovery: ``image_only`` is
  False for them).

Subclasses implement ``_fit_spots(sections, targets)`` and ``_predict_spots(section, xy)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import anndata as ad
import numpy as np
import pandas as pd

from ..errors import InputError
from ..metrics import log_cp10k
from .base import SCALES, SPOT, Method

SCALE = SCALES[SPOT]


def spot_targets(section, genes: list[str]) -> np.ndarray:
    """(n_spots, n_genes) float32 log1p CP10k of ``genes``, with each spot's library = its
    total counts over ALL measured genes (not only ``genes``)."""
    from ..arrays import row_sums

    return log_cp10k(section.dense_counts(genes), row_sums(section.counts.X)).astype(np.float32)


@dataclass
class SpotMethod(Method):
    """Base of the spot-level methods (see the module docstring)."""

    kind: ClassVar[str] = SPOT
    needs_features: ClassVar[bool] = False  # crops are read by the method itself
    #: True for methods that read only the image of the section they predict (no measured
    #: spot of it), so they can predict sections that were never sequenced
    image_only: ClassVar[bool] = True
    #: True when :meth:`predict_blocks` gives ``predict``'s rows a block of points at a time
    #: (each point predicted from its own crops, given section-wide statistics); False when
    #: a prediction needs all its points at once (e.g. a graph over neighbouring points)
    blockwise: ClassVar[bool] = False
    #: float32 (points x genes) arrays an in-memory :meth:`predict` holds at its peak
    #: (:func:`~histosr.methods.base.check_prediction_size`)
    predict_copies: ClassVar[float] = 4.0

    encoder: str = "handcrafted"
    cache_dir: str | None = None

    # -- to implement -------------------------------------------------------------------
    def _fit_spots(self, sections: list, targets: list[np.ndarray]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _predict_spots(self, section, xy: np.ndarray) -> np.ndarray:  # pragma: no cover
        """(n, n_genes) float32 log1p CP10k at full-res (x, y) px points."""
        raise NotImplementedError

    def _check_params(self) -> None:
        from ..features.registry import REGISTRY as ENCODERS

        ENCODERS.key(self.encoder)  # an unknown encoder fails before any work

    def point_bytes(self) -> int:
        """Bytes one predicted point takes while a block is predicted (its float32 genes;
        methods with wide per-point features add them): sizes :meth:`predict_blocks`."""
        return 4 * max(1, len(self.genes_))

    def predict_blocks(self, section, xy: np.ndarray, block: int,
                       scratch: Path | None = None) -> Iterator[np.ndarray]:
        """``predict(section, at=xy).X`` as consecutive blocks of at most ``block`` points
        (full-res px, x = column, y = row): (rows, genes) float32 log1p CP10k each, so the
        points x genes prediction never sits in memory. ``scratch``: a folder for temporary
        files (e.g. section-wide features on disk; the caller removes it). Only for
        :attr:`blockwise` methods."""
        if not self.blockwise:
            raise NotImplementedError(f"{self.name} predicts all its points at once")
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        b = max(1, int(block))
        for i in range(0, len(xy), b):
            yield np.asarray(self._predict_spots(section, xy[i : i + b]), dtype=np.float32)

    def prediction_uns(self, section) -> dict:
        """``uns["histosr"]`` of a prediction of this section's points (see :meth:`predict`)."""
        return self._uns(section, encoder=self.encoder, consistency=False,
                         um_per_px=float(section.um_per_px))

    # -- public API -----------------------------------------------------------------------
    def _fit_kind(self, sections, features) -> None:
        self._fit_spots(sections, [spot_targets(s, self.genes_) for s in sections])

    def predict(self, section, features=None, at: str | np.ndarray | None = None,
                consistency: bool | None = None, diameter_um: float | None = None
                ) -> ad.AnnData:
        """Predict log1p CP10k at the section's spots (``at=None``/``"spots"``) or at an
        (n, 2) array of full-res (x, y) px. ``features`` is ignored (spot methods read their
        own crops); ``consistency`` and ``diameter_um`` do not apply to whole-spot
        predictions (``consistency=True`` is an error)."""
        self.check_fitted()
        if consistency:
            raise InputError(f"{self.name} predicts whole spots: the superpixel consistency "
                             "step does not apply (use consistency=False)")
        at = "spots" if at is None else at
        in_sample = None
        if isinstance(at, str):
            if at != "spots":
                raise InputError(f"{self.name} is a spot-level method: it predicts spot-sized "
                                 "disks (log1p CP10k), not 8 um superpixels; expected "
                                 f"at='spots' or an (n, 2) array of full-res (x, y) px, got "
                                 f"{at!r}")
            xy, ids = section.xy, [str(i) for i in section.counts.obs_names]
        else:
            xy = np.asarray(at, dtype=np.float64).reshape(-1, 2)
            ids = [str(i) for i in range(len(xy))]
            in_sample = False
        X = np.asarray(self._predict_spots(section, xy), dtype=np.float32)
        if X.shape != (len(xy), len(self.genes_)):
            raise RuntimeError(f"{self.name}: predicted {X.shape}, expected "
                               f"{(len(xy), len(self.genes_))}")
        out = ad.AnnData(X=X, obs=pd.DataFrame(index=pd.Index(ids)),
                         var=pd.DataFrame(index=pd.Index(self.genes_)))
        out.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
        uns = self.prediction_uns(section)
        if in_sample is not None:
            uns["in_sample"] = in_sample
        out.uns["histosr"] = uns
        return out


__all__ = ["SpotMethod", "spot_targets", "SCALE"]
