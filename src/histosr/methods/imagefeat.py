"""Image features of spots for the H&E-only spot methods (``ridge``, ``knn_features``,
``hespotex``): encoder embeddings of spot-centred crops, optionally standardised within
each section.

* Crops: :func:`histosr.features.crop_features` (0.5 um/px, cached on disk), one crop per
  size in ``scales`` x the section's spot diameter, concatenated. ``(1.0, 3.0)`` is the spot
  itself plus its neighbourhood (100 and 300 um for legacy ST spots, 55 and 165 um for
  Visium), the "100-300 um crops" of the BENCHMARKS P3 anchors.
* Within-section standardisation (``"section"``): every feature is z-scored over the points
  of ONE section (the training section's spots; at prediction the points being predicted,
  so predict a whole section at once, not spot by spot). Staining and scanning differ
  between sections far more than within one, and a model fitted on other sections sees the
  new section's features shifted; z-scoring per section removes that shift. It uses only the
  section's image, never its counts, so it is allowed in the H&E-only protocol (P3).
  ``"global"`` z-scores with the training statistics only; ``"none"`` leaves features as is.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

STANDARDIZE = ("section", "global", "none")


def encoder_of(name: str, params: dict | None = None):
    """An encoder instance by registry name (``params`` e.g. ``{"weights": PATH}``)."""
    from ..features.registry import get_encoder

    return get_encoder(name, **(params or {}))


def spot_image_features(section, xy: np.ndarray, encoder, scales=(1.0, 3.0),
                        cache_dir=None, diameter_um: float | None = None) -> np.ndarray:
    """float32 (n, d * len(scales)) crop features at full-res (x = column, y = row) px
    points; crop side = scale x spot diameter (um; default the section's)."""
    from ..features.crops import crop_features

    d = float(diameter_um or section.spot_diameter_um)
    if not scales:
        raise InputError("expected at least one crop scale (multiples of the spot diameter)")
    parts = [crop_features(section, encoder, size_um=float(s) * d, centers=xy,
                           cache_dir=cache_dir) for s in scales]
    return np.concatenate([p.reshape(len(xy), -1) for p in parts], axis=1).astype(np.float32)


def zscore(x: np.ndarray, mean: np.ndarray | None = None,
           std: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z-score columns (with the given statistics, else the rows' own); constant columns
    give 0. Returns (z, mean, std)."""
    x = np.asarray(x, dtype=np.float64)
    if mean is None:
        mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
        std = x.std(axis=0) if len(x) > 1 else np.ones(x.shape[1])
    std = np.where(std > 1e-8, std, 1.0)
    return ((x - mean) / std).astype(np.float32), mean, std


__all__ = ["spot_image_features", "zscore", "encoder_of", "STANDARDIZE"]
