"""Baselines that spread measured spot values onto the 8 um superpixel grid.

Each spot's value is its density: counts divided by its number of footprint superpixels
(counts per superpixel, the scale every super-resolution method predicts). The baselines
use no image features, only the grid of the FeatureMap.

They interpolate the MEASURED spots of the section being predicted: fit and predict on
the same section. ``fit`` stores the training sections' spot densities; ``predict`` on one
of those sections uses them, and on any other section it interpolates that section's own
measured counts (which it must therefore have for the fitted genes). They are not
predictors for unmeasured sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.spatial import cKDTree

from ..errors import InputError
from ..geometry import footprint_matrix, nearest_spot
from ..keys import digest
from ..params import Interval, Options
from .base import SuperpixelMethod, register_method

# float32 bytes of one (cells x genes) block computed at once
_BLOCK_BYTES = 2**25


def spot_densities(section, grid, genes: list[str]) -> dict:
    """Measured counts per footprint superpixel of a section's spots (spots whose footprint
    misses the grid entirely are dropped): ``xy`` centres, ``footprints``, ``density``."""
    fps = section.spot_footprints()
    F = footprint_matrix(grid, fps, section.spot_diameter_um)
    n = np.diff(F.indptr)
    keep = np.flatnonzero(n > 0)
    if len(keep) == 0:
        raise InputError(f"section {section.name!r}: no spot footprint lies on the grid")
    from ..arrays import row_sums

    counts = section.dense_counts(genes)[keep]
    return {
        "xy": section.xy[keep],
        "footprints": [np.asarray(fps[i], dtype=np.float64) for i in keep],
        "density": (counts / n[keep, None]).astype(np.float32),
        # the spot's library (ALL measured genes) per footprint superpixel
        "libdens": (row_sums(section.counts.X)[keep] / n[keep]).astype(np.float32),
    }


def section_key(section, grid, genes) -> str:
    """Identity of a section's measurements (ids, positions, counts, grid): the key under
    which a method that interpolates the measured spots stores a fitted section."""
    fps = section.footprints
    return digest(section.name, list(section.counts.obs_names), section.xy,
                       section.dense_counts(genes).astype(np.float32), section.spot_diameter_um,
                       None if fps is None else np.concatenate(fps),
                       [grid.um_per_px, list(grid.image_shape)])


@dataclass
class SpotInterpolator(SuperpixelMethod):
    """Base of the spot-spreading baselines (see the module docstring)."""

    needs_features: ClassVar[bool] = False  # only the grid: no image features

    def _fit(self, sections, features) -> None:
        self.spots_ = {}
        for sec, fm in zip(sections, features):
            self.spots_[section_key(sec, fm.grid, self.genes_)] = spot_densities(sec, fm.grid, self.genes_)

    def _spots_for(self, section, features) -> dict:
        missing = [g for g in self.genes_ if g not in section.counts.var_names]
        if missing:
            raise InputError(
                f"{self.name} interpolates the measured spots of the section it predicts, but "
                f"section {section.name!r} lacks fitted genes {missing[:5]}"
            )
        stored = self.spots_.get(section_key(section, features.grid, self.genes_))
        if stored is not None:
            return stored
        return spot_densities(section, features.grid, self.genes_)

    def _predict_cells(self, section, features, flat_cells: np.ndarray) -> np.ndarray:
        spots = self._spots_for(section, features)
        grid = features.grid
        flat_cells = np.asarray(flat_cells, dtype=np.int64)
        G = spots["density"].shape[1]
        out = np.empty((len(flat_cells), G), dtype=np.float32)
        chunk = max(1024, _BLOCK_BYTES // (4 * max(G, 1)))
        state = self._prepare(spots)
        for a in range(0, len(flat_cells), chunk):
            cells = flat_cells[a : a + chunk]
            out[a : a + chunk] = self._interpolate(state, spots, grid, cells)
        return out

    def _prepare(self, spots: dict):
        return None

    def _interpolate(self, state, spots, grid, cells) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


@register_method("nearest")
@dataclass
class Nearest(SpotInterpolator):
    """Each superpixel takes the density of the spot owning the nearest footprint disk
    centre (inside a footprint: that footprint's spot)."""

    def _interpolate(self, state, spots, grid, cells):
        return spots["density"][nearest_spot(grid, spots["footprints"], cells)]


@register_method("bilinear")
@dataclass
class Bilinear(SpotInterpolator):
    """Piecewise-linear interpolation of spot densities over the Delaunay triangulation of
    the spot centres (scipy ``LinearNDInterpolator``); outside their convex hull (or with
    fewer than three non-collinear spots) the ``nearest`` value."""

    def _prepare(self, spots):
        from scipy.interpolate import LinearNDInterpolator
        from scipy.spatial import QhullError

        try:
            return LinearNDInterpolator(spots["xy"], spots["density"].astype(np.float64))
        except (QhullError, ValueError):
            return None

    def _interpolate(self, state, spots, grid, cells):
        r, c = grid.unflat(cells)
        if state is None:
            vals = np.full((len(cells), spots["density"].shape[1]), np.nan)
        else:
            vals = np.asarray(state(grid.xy_of_cells(r, c)))
        outside = np.isnan(vals).any(axis=1)
        if outside.any():
            owner = nearest_spot(grid, spots["footprints"], cells[outside])
            vals[outside] = spots["density"][owner]
        return vals.astype(np.float32)


#: what ``knn`` averages (see :class:`KNN`)
KNN_VALUES = ("log1p_cp10k", "cp10k", "counts")


@register_method("knn")
@dataclass
class KNN(SpotInterpolator):
    """Inverse-distance weighting (Shepard) over the ``k`` nearest spot centres, weights
    ``1 / d**power``. Default ``power=2`` (Shepard's classic choice: the nearest spots
    dominate, yet the map is continuous). A superpixel centre exactly at a spot centre
    takes that spot's value.

    ``values``: what is averaged. ``"log1p_cp10k"`` (default, as a careful user
    interpolates): each spot's log1p CP10k (library = all its genes), turned back into
    counts per superpixel with the same average of the spots' library per footprint
    superpixel, ``expm1(v) x L / 1e4``; so one deep or shallow neighbour does not dominate
    (at low depth library-size noise otherwise does: P1 at 650 UMI per spot). ``"counts"``:
    the spots' counts per footprint superpixel themselves (linear in the counts)."""

    constraints: ClassVar[dict] = {"k": Interval(int, 1), "power": Interval(float, 0),
                                   "values": Options(*KNN_VALUES)}

    k: int = 8
    power: float = 2.0
    values: str = "log1p_cp10k"

    def _prepare(self, spots):
        if self.values == "counts":
            return cKDTree(spots["xy"]), spots["density"]
        dens = spots["density"].astype(np.float64)
        lib = spots["libdens"].astype(np.float64)[:, None]
        cp = np.divide(dens, lib, out=np.zeros_like(dens), where=lib > 0) * 1e4
        v = np.log1p(cp) if self.values == "log1p_cp10k" else cp
        return cKDTree(spots["xy"]), np.concatenate([v, lib], axis=1)

    def _interpolate(self, state, spots, grid, cells):
        tree, vals = state
        r, c = grid.unflat(cells)
        k = min(self.k, len(spots["xy"]))
        d, idx = tree.query(grid.xy_of_cells(r, c), k=k)
        d, idx = d.reshape(len(cells), k), idx.reshape(len(cells), k)
        exact = d <= 1e-9
        with np.errstate(divide="ignore"):
            w = np.where(exact, 0.0, 1.0 / np.maximum(d, 1e-300) ** self.power)
        hit = exact.any(axis=1)
        w[hit] = exact[hit].astype(np.float64)
        w /= w.sum(axis=1, keepdims=True)
        out = np.zeros((len(cells), vals.shape[1]), dtype=np.float64)
        for j in range(k):
            out += w[:, j, None] * vals[idx[:, j]]
        if self.values == "counts":
            return out.astype(np.float32)
        cp = np.expm1(out[:, :-1]) if self.values == "log1p_cp10k" else out[:, :-1]
        return (cp * out[:, -1:] / 1e4).astype(np.float32)
