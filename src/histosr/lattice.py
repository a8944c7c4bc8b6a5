"""Densified spot grids: high-density ("HR") pseudo-spots on the spot lattice.

HISTEX and DeepHEx (METHODS.md 2.1 "High-density pseudo-spots", 3.1) give their models the
expression of pseudo-spots at half the spot pitch, interpolated from the measured spots
alone (no image): the counts are gridded on the spot lattice by nearest neighbour, the grid
is upsampled bilinearly x2, and an interpolated position is kept only when at least two
measured spots are among its lattice neighbours. The result has about 4x the spot density.

The lattice is described by :class:`Lattice`: integer indices ``(a, b)`` mapped affinely to
full-resolution px, either a full square lattice (legacy ST, pooled pseudo-spots) or a
checkerboard (only ``a + b`` of one parity occupied: Visium's hexagon, where ``array_col``
steps by 2 along a row, and HISTEX's pseudo-Visium "brick" lattice). :func:`infer_lattice`
reads it from ``obs["array_col"]``/``obs["array_row"]`` when present (an affine least-squares
fit, robust to pooled pseudo-spots whose mean position is off the lattice) and otherwise
from the coordinates, as DeepHEx does (``find_robust_step_and_offset``: median gap between
the distinct x, resp. y, values; axis-aligned lattices only).

Densification is exact on the lattice: the HR set is the lattice scaled by 1/2 (all
midpoints of nearest-neighbour pairs, and for a square lattice also the cell centres), and
an HR value is the mean of the gridded values at its nearest lattice points, which is what
bilinear x2 interpolation with ``align_corners=True`` gives (edge midpoint: 2 endpoints;
square-cell centre: 4 corners). Where histosr deliberately differs from the released code:

(a) Positions are exact half-pitch float coordinates from the fitted lattice (HISTEX
    hard-codes the pseudo-Visium layout, ``x = gx * 200 + 55``; DeepHEx infers it, but both
    snap to integer px); measured spots keep their own position and their own counts
    (``F.interpolate(..., align_corners=False)`` to ``2h - 1`` samples shifts every sample,
    so measured positions get only approximately their own values).
(b) Lattice positions without a measured spot keep the nearest-neighbour fill instead of
    being zeroed, so HR values at the tissue edge are not diluted by zeros; they are never
    output themselves.
(c) Works on square, hexagonal and brick lattices in either orientation, not only on the
    pseudo-Visium layout.
(d) An interpolated position is kept when at least ``min_neighbours`` (2) of its nearest
    lattice sites are measured AND it is the midpoint of two measured sites: a square-cell
    centre with only two adjacent measured corners lies half a pitch outside the measured
    area and would be an extrapolation, so it is dropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.spatial import cKDTree

from .errors import InputError

__all__ = ["Lattice", "infer_lattice", "hr_pseudospots", "hr_from_values",
           "generation_positions", "GENERATION_OFFSETS"]


@dataclass(frozen=True)
class Lattice:
    """Spot lattice: index ``(a, b)`` sits at ``origin + a * step_a + b * step_b`` (full-res
    px, x then y). ``checkerboard``: only indices with ``(a + b) % 2 == parity`` exist."""

    origin: tuple[float, float]
    step_a: tuple[float, float]
    step_b: tuple[float, float]
    checkerboard: bool
    parity: int = 0
    source: str = "coordinates"

    def xy(self, ab: np.ndarray) -> np.ndarray:
        """Full-res (x, y) px of (possibly fractional) indices ``ab`` (n, 2)."""
        ab = np.asarray(ab, dtype=np.float64).reshape(-1, 2)
        M = np.array([self.step_a, self.step_b], dtype=np.float64)
        return np.asarray(self.origin, dtype=np.float64) + ab @ M

    def exists(self, ab: np.ndarray) -> np.ndarray:
        """Whether integer indices ``ab`` (..., 2) are lattice sites."""
        ab = np.asarray(ab)
        if not self.checkerboard:
            return np.ones(ab.shape[:-1], dtype=bool)
        return (ab[..., 0] + ab[..., 1]) % 2 == self.parity

    @property
    def pitch(self) -> float:
        """Nearest-neighbour distance between sites (px)."""
        a, b = np.asarray(self.step_a), np.asarray(self.step_b)
        if self.checkerboard:
            cands = [2 * a, 2 * b, a + b, a - b]
        else:
            cands = [a, b]
        return float(min(np.linalg.norm(c) for c in cands))

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _axis_step(v: np.ndarray, tol: float) -> tuple[float, float]:
    """Robust step and offset of 1-D positions lying on ``offset + k * step``: distinct
    values are clusters separated by more than ``tol``; the step is the median gap between
    consecutive clusters (DeepHEx ``find_robust_step_and_offset``), then refined by a least
    squares fit of the positions to their rounded indices."""
    s = np.sort(np.asarray(v, dtype=np.float64))
    breaks = np.flatnonzero(np.diff(s) > tol)
    groups = np.split(s, breaks + 1)
    centres = np.array([g.mean() for g in groups])
    gaps = np.diff(centres)
    gaps = gaps[gaps > tol]
    if len(gaps) == 0:
        return float("nan"), float(centres[0])
    step = float(np.median(gaps))
    # a few missing columns give gaps of 2-3 steps: refine with the smallest-gap estimate
    k = np.round((centres - centres[0]) / step)
    A = np.stack([np.ones_like(k), k], axis=1)
    (off, step), *_ = np.linalg.lstsq(A, centres, rcond=None)
    return float(step), float(off)


def infer_lattice(xy: np.ndarray, array_ab: np.ndarray | None = None) -> tuple[Lattice, np.ndarray]:
    """Infer the spot lattice; returns ``(lattice, ab)`` with ``ab`` the (n, 2) integer index of
    each spot.

    ``array_ab``: known integer lattice indices (``array_col``, ``array_row``), fitted
    affinely to ``xy`` (outliers beyond a quarter pitch, e.g. pooled pseudo-spots of
    incomplete blocks, are dropped from the fit). Without them the lattice is inferred from
    the coordinates alone (axis-aligned: the distinct x and y values).
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if len(xy) < 2:
        raise InputError("densify needs at least 2 spots to infer the spot lattice")
    if array_ab is not None:
        ab = np.asarray(array_ab).astype(np.int64).reshape(-1, 2)
        A = np.column_stack([np.ones(len(ab)), ab.astype(np.float64)])
        if np.linalg.matrix_rank(A) < 3:
            raise InputError("array_row/array_col do not span two dimensions")
        keep = np.ones(len(ab), dtype=bool)
        for _ in range(2):
            M, *_ = np.linalg.lstsq(A[keep], xy[keep], rcond=None)
            res = np.linalg.norm(A @ M - xy, axis=1)
            lat = _make(M[0], M[1], M[2], ab, "array")
            keep = res <= 0.25 * lat.pitch
            if keep.sum() < 3:
                keep[:] = True
                break
        M, *_ = np.linalg.lstsq(A[keep], xy[keep], rcond=None)
        return _make(M[0], M[1], M[2], ab, "array"), ab
    d, _ = cKDTree(xy).query(xy, k=2)
    tol = 0.2 * float(np.median(d[:, 1]))
    sx, ox = _axis_step(xy[:, 0], tol)
    sy, oy = _axis_step(xy[:, 1], tol)
    if not np.isfinite(sx) or not np.isfinite(sy):
        raise InputError("densify: spots must span at least two distinct x and y positions")
    ab = np.stack([np.round((xy[:, 0] - ox) / sx), np.round((xy[:, 1] - oy) / sy)],
                  axis=1).astype(np.int64)
    return _make((ox, oy), (sx, 0.0), (0.0, sy), ab, "coordinates"), ab


def _make(origin, step_a, step_b, ab, source) -> Lattice:
    par = (ab[:, 0] + ab[:, 1]) % 2
    checker = bool(np.all(par == par[0]))
    return Lattice(tuple(float(v) for v in origin), tuple(float(v) for v in step_a),
                   tuple(float(v) for v in step_b), checker, int(par[0]) if checker else 0,
                   source)


def hr_from_values(xy: np.ndarray, values: np.ndarray, array_ab: np.ndarray | None = None,
                   min_neighbours: int = 2):
    """Densify per-spot ``values`` (n, G) at ``xy`` (n, 2) full-res px.

    Returns ``(hr_xy, hr_values, info)``: HR positions (m, 2) float px, their values (m, G)
    float32, and a dict of per-position arrays (``measured``: a measured spot, with its own
    value and position; ``half_ab``: doubled lattice index; ``n_measured``: measured spots
    among its nearest lattice sites; ``spot``: index of the measured spot or -1) plus the
    ``lattice``.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(len(xy), -1)
    lat, ab = infer_lattice(xy, array_ab)
    # one value per occupied site (two spots on one site: their mean)
    sites, inv = np.unique(ab, axis=0, return_inverse=True)
    inv = inv.ravel()
    n_sites = len(sites)
    site_val = np.zeros((n_sites, values.shape[1]))
    np.add.at(site_val, inv, values)
    cnt = np.bincount(inv, minlength=n_sites)
    site_val /= cnt[:, None]
    site_spot = np.full(n_sites, -1, dtype=np.int64)
    site_spot[inv[::-1]] = np.arange(len(xy))[::-1]  # first spot of each site
    site_xy = np.zeros((n_sites, 2))
    np.add.at(site_xy, inv, xy)
    site_xy /= cnt[:, None]
    lo = sites.min(axis=0) - 2
    table = np.full(tuple(sites.max(axis=0) - lo + 3), -1, dtype=np.int64)
    table[sites[:, 0] - lo[0], sites[:, 1] - lo[1]] = np.arange(n_sites)

    # candidate HR positions in doubled indices q: the measured sites and the midpoints
    # towards every nearest-neighbour direction (and square-cell centres)
    if lat.checkerboard:
        D = np.array([(0, 0), (1, 1), (1, -1), (-1, 1), (-1, -1), (2, 0), (-2, 0), (0, 2),
                      (0, -2)])
    else:
        D = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)])
    q = np.unique((2 * sites[:, None, :] + D[None]).reshape(-1, 2), axis=0)
    # nearest lattice sites of each candidate: among the 3x3 sites around floor(q/2)
    E = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)])
    P = np.floor_divide(q, 2)[:, None, :] + E[None]  # (nq, 9, 2)
    exists = lat.exists(P)
    M = np.array([lat.step_a, lat.step_b])
    dist = np.linalg.norm((P - q[:, None, :] / 2.0) @ M, axis=2)
    dist[~exists] = np.inf
    dmin = dist.min(axis=1, keepdims=True)
    near = dist <= dmin * 1.1 + 1e-9 * lat.pitch
    site_idx = table[P[..., 0] - lo[0], P[..., 1] - lo[1]]
    measured_near = near & (site_idx >= 0)
    n_meas = measured_near.sum(axis=1)
    on_site = dmin[:, 0] <= 1e-9 * lat.pitch
    # interpolate, never extrapolate: the position must be the midpoint of two measured
    # sites (an edge's two ends, or a diagonal of a square cell)
    mirror = q[:, None, :] - P
    mir_idx = table[np.clip(mirror[..., 0] - lo[0], 0, table.shape[0] - 1),
                    np.clip(mirror[..., 1] - lo[1], 0, table.shape[1] - 1)]
    between = (measured_near & (mir_idx >= 0)).any(axis=1)
    keep = np.where(on_site, n_meas == 1, (n_meas >= min_neighbours) & between)
    q, P, near, site_idx, n_meas, on_site = (q[keep], P[keep], near[keep], site_idx[keep],
                                             n_meas[keep], on_site[keep])
    # nearest-neighbour gridding: an unmeasured site takes its nearest measured site's value
    tree = cKDTree(lat.xy(sites))
    fill = site_idx.copy()
    miss = near & (fill < 0)
    if miss.any():
        _, j = tree.query(lat.xy(P[miss]))
        fill[miss] = j
    w = near.astype(np.float64)
    w /= w.sum(axis=1, keepdims=True)
    hr_val = np.einsum("qk,qkg->qg", w, site_val[np.where(near, fill, 0)])
    hr_xy = lat.xy(q / 2.0)
    on = np.flatnonzero(on_site)
    own = site_idx[on, near[on].argmax(axis=1)]  # on a site, its only nearest site
    hr_xy[on] = site_xy[own]
    hr_val[on] = site_val[own]
    spot = np.full(len(q), -1, dtype=np.int64)
    spot[on] = site_spot[own]
    info = {"measured": on_site, "half_ab": q, "n_measured": n_meas, "spot": spot,
            "lattice": lat}
    return hr_xy, hr_val.astype(np.float32), info


def hr_pseudospots(section, genes: list[str] | None = None, min_neighbours: int = 2):
    """High-density pseudo-spots of a section's (pseudo-)spots: AnnData (HR spots x genes,
    interpolated raw counts), ``obsm["spatial"]`` full-res (x, y) px (float, exact half
    pitch), ``obs`` columns ``measured``, ``spot`` (id of the measured spot or ""),
    ``half_a``/``half_b`` (lattice index x 2), ``n_measured`` (measured nearest lattice
    sites); ``uns["densify"]`` the lattice. See the module docstring."""
    import anndata as ad
    import pandas as pd

    genes = list(section.genes) if genes is None else list(genes)
    obs = section.counts.obs
    ab = None
    if "array_row" in obs and "array_col" in obs:
        ab = np.stack([obs["array_col"].to_numpy(), obs["array_row"].to_numpy()], axis=1)
        if not np.all(np.isfinite(ab.astype(np.float64))) or np.any(ab != np.round(ab)):
            ab = None
    hr_xy, vals, info = hr_from_values(section.xy, section.dense_counts(genes), ab,
                                       min_neighbours)
    ids = np.asarray(section.counts.obs_names)
    spot = info["spot"]
    q = info["half_ab"]
    hobs = pd.DataFrame(
        {"measured": info["measured"],
         "spot": np.where(spot >= 0, ids[np.maximum(spot, 0)], ""),
         "half_a": q[:, 0], "half_b": q[:, 1], "n_measured": info["n_measured"]},
        index=pd.Index([f"hr{a}_{b}" for a, b in q]))
    out = ad.AnnData(X=vals, obs=hobs, var=pd.DataFrame(index=pd.Index(genes)))
    out.obsm["spatial"] = hr_xy
    out.uns["densify"] = {**info["lattice"].as_dict(), "section": section.name,
                          "min_neighbours": int(min_neighbours)}
    return out


# -- generation positions of HisHRST (4x) and TriHRGE (8x) ----------------------------------
# Offsets in lattice-index units (a = column index, b = row index) for a checkerboard lattice
# whose dense axis is a (Visium: row neighbours at a +- 2), i.e. the released array-coordinate
# offsets (METHODS 4.2, 5.1), and their square-lattice analogues (half steps).
GENERATION_OFFSETS = {
    ("checkerboard", 4): ((1, 0), (0.5, 0.5), (-0.5, 0.5)),
    ("checkerboard", 8): ((1, 0), (0.5, 0.5), (-0.5, 0.5), (0.5, -0.5), (-0.5, -0.5), (-1, 0),
                          (0, 1)),
    ("square", 4): ((0.5, 0), (0, 0.5), (0.5, 0.5)),
    ("square", 8): ((0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5), (0.5, 0.5), (-0.5, 0.5),
                    (0.5, -0.5), (-0.5, -0.5)),
}


def generation_positions(lat: Lattice, ab: np.ndarray, factor: int = 4):
    """Positions of the densified grid of HisHRST (``factor=4``) / TriHRGE (``factor=8``).

    Every measured site ``ab`` (n, 2 integer lattice indices) plus its offset copies
    (:data:`GENERATION_OFFSETS`; on a checkerboard lattice whose dense axis is b the
    offsets are transposed), without duplicates. Returns ``(q, measured)``: ``q`` (m, 2)
    integer DOUBLED lattice indices (position = ``lat.xy(q / 2)``, half steps exact) and
    whether each is a measured site; measured sites first, in the order of ``ab``.

    Where histosr deliberately differs from the released code: offsets are in lattice units
    derived from the measured lattice (the released 68/34/60/120 px are DLPFC-pitch
    specific), and duplicates are removed. On a full lattice the released 8x set then has
    the same interior density as the 4x set (4 positions per site: every offset is an edge
    midpoint shared by two sites, or a site); it differs at the tissue edge, where it pads
    half a step on every side (the 4x set only towards +a / +b).
    """
    if factor not in (4, 8):
        raise InputError(f"generation factor must be 4 or 8, got {factor}")
    ab = np.asarray(ab, dtype=np.int64).reshape(-1, 2)
    kind = "checkerboard" if lat.checkerboard else "square"
    off = np.asarray(GENERATION_OFFSETS[(kind, factor)], dtype=np.float64)
    if lat.checkerboard:
        a, b = np.asarray(lat.step_a), np.asarray(lat.step_b)
        if np.linalg.norm(2 * b) < np.linalg.norm(2 * a):  # dense axis is b: transpose
            off = off[:, ::-1]
    first = np.unique(2 * ab, axis=0, return_index=True)[1]
    sites = (2 * ab)[np.sort(first)]
    cand = (sites[:, None, :] + np.round(2 * off).astype(np.int64)[None]).reshape(-1, 2)
    have = {tuple(s) for s in sites}
    extra, seen = [], set()
    for c in map(tuple, cand):
        if c not in have and c not in seen:
            seen.add(c)
            extra.append(c)
    extra = np.asarray(extra, dtype=np.int64).reshape(-1, 2)
    q = np.concatenate([sites, extra])
    measured = np.concatenate([np.ones(len(sites), bool), np.zeros(len(extra), bool)])
    return q, measured
