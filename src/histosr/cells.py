"""Cells and the 8 um superpixel grid: polygon rasterisation and per-cell aggregation.

Coordinates are x = column, y = row. Polygons given to :func:`polygon_weights` are in
superpixel units (superpixel (r, c) covers x in [c, c+1), y in [r, r+1)); the public
:func:`aggregate_cells` takes full-resolution pixels and converts them with the
prediction's pixel size (8 um superpixel = ``8 / um_per_px`` full-res px).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .arrays import dense
from .errors import InputError
from .geometry import SP_UM


def polygon_area(poly: np.ndarray) -> float:
    """Area of a simple polygon ((k, 2) vertices, any orientation), shoelace formula."""
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def polygon_centroid(poly: np.ndarray) -> np.ndarray:
    """Area centroid (x, y) of a simple polygon; the vertex mean for degenerate ones."""
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2.0
    if abs(a) < 1e-12:
        return poly.mean(axis=0)
    return np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6.0 * a)


def disk_polygon(center_xy: np.ndarray, radius: float, n: int = 24) -> np.ndarray:
    """A regular ``n``-gon approximating a disk (same units as the inputs)."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    # scale so the polygon's area equals the disk's
    r = radius * np.sqrt(2.0 * np.pi / (n * np.sin(2.0 * np.pi / n)))
    return np.stack([center_xy[0] + r * np.cos(t), center_xy[1] + r * np.sin(t)], axis=1)


def polygon_weights(polygons: Sequence[np.ndarray], grid_shape: tuple[int, int],
                    sub: int = 8) -> sp.csr_matrix:
    """Sparse (n_polygons, H*W) matrix: area of polygon i inside superpixel j, in superpixel
    units (1 = a whole 8 um square), row-major flat index ``r * W + c``.

    Polygons are (k, 2) vertex arrays in superpixel units (x = column, y = row). Areas are
    measured by supersampling: ``sub`` x ``sub`` sample points per superpixel (``sub=8``:
    1 um samples), so boundaries are exact to about 1/``sub`` superpixel. A polygon too small
    to contain a sample puts its whole (shoelace) area in the superpixel of its centroid.
    Parts outside the grid are dropped.
    """
    from skimage.draw import polygon as draw_polygon

    H, W = (int(v) for v in grid_shape)
    shape = (H * sub, W * sub)
    rows_out, cols_out, vals_out = [], [], []
    for i, poly in enumerate(polygons):
        p = np.asarray(poly, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] < 3 or p.shape[1] != 2 or not np.isfinite(p).all():
            raise InputError(f"polygon {i}: expected a finite (k >= 3, 2) array of (x, y) "
                             f"vertices, got shape {p.shape}")
        # sample j (in sub units) sits at j + 0.5; draw.polygon tests integer points
        rr, cc = draw_polygon(p[:, 1] * sub - 0.5, p[:, 0] * sub - 0.5, shape=shape)
        if len(rr) == 0:
            cx, cy = polygon_centroid(p)
            r, c = int(np.floor(cy)), int(np.floor(cx))
            if 0 <= r < H and 0 <= c < W:
                rows_out.append(np.array([i]))
                cols_out.append(np.array([r * W + c]))
                vals_out.append(np.array([polygon_area(p)]))
            continue
        flat = (rr // sub).astype(np.int64) * W + (cc // sub)
        u, n = np.unique(flat, return_counts=True)
        rows_out.append(np.full(len(u), i))
        cols_out.append(u)
        vals_out.append(n / float(sub * sub))
    if not rows_out:
        return sp.csr_matrix((len(polygons), H * W), dtype=np.float64)
    return sp.csr_matrix(
        (np.concatenate(vals_out), (np.concatenate(rows_out), np.concatenate(cols_out))),
        shape=(len(polygons), H * W),
    )


def label_weights(labels, sp_per_px: float, grid_shape: tuple[int, int],
                  block_rows: int = 2048) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """From a labels image (full-res px, 0 = background): (weights, label ids, centroids).

    ``weights`` is (n_labels, H*W): area of each label inside each superpixel in superpixel
    units; centroids are (x, y) full-res px (pixel centres at +0.5). ``labels`` may be any
    array-like with ``shape`` and slicing (numpy, zarr, dask); it is read in strips of
    ``block_rows`` rows, so memory stays bounded.
    """
    h, w = labels.shape[:2]
    H, W = grid_shape
    px_area_sp = sp_per_px**2
    col_sp = np.minimum(np.floor((np.arange(w) + 0.5) * sp_per_px).astype(np.int64), W - 1)
    keys, vals = [], []
    sums: dict[str, list] = {"lab": [], "n": [], "sx": [], "sy": []}
    for y0 in range(0, h, block_rows):
        blk = np.asarray(labels[y0:y0 + block_rows])
        rr, cc = np.nonzero(blk)
        if not len(rr):
            continue
        lab = blk[rr, cc].astype(np.int64)
        row_sp = np.minimum(np.floor((rr + y0 + 0.5) * sp_per_px).astype(np.int64), H - 1)
        flat = row_sp * W + col_sp[cc]
        # label x superpixel pair counts
        pair, n_pair = np.unique(lab * (H * W) + flat, return_counts=True)
        keys.append(pair)
        vals.append(n_pair)
        ul, inv, n = np.unique(lab, return_inverse=True, return_counts=True)
        sums["lab"].append(ul)
        sums["n"].append(n)
        sums["sx"].append(np.bincount(inv, weights=cc + 0.5))
        sums["sy"].append(np.bincount(inv, weights=rr + y0 + 0.5))
    if not keys:
        raise InputError("the labels image holds no cell (all pixels are 0 = background)")
    allk = np.concatenate(keys)
    allv = np.concatenate(vals).astype(np.float64) * px_area_sp
    ids, row = np.unique(allk // (H * W), return_inverse=True)
    weights = sp.csr_matrix((allv, (row, allk % (H * W))), shape=(len(ids), H * W))
    weights.sum_duplicates()
    lab = np.concatenate(sums["lab"])
    pos = np.searchsorted(ids, lab)
    n = np.bincount(pos, weights=np.concatenate(sums["n"]), minlength=len(ids))
    sx = np.bincount(pos, weights=np.concatenate(sums["sx"]), minlength=len(ids))
    sy = np.bincount(pos, weights=np.concatenate(sums["sy"]), minlength=len(ids))
    return weights, ids, np.stack([sx / n, sy / n], axis=1)


def _polygons_from(segmentation) -> tuple[list[np.ndarray], list[str]]:
    """(exterior vertex arrays in full-res px, ids) from a GeoDataFrame, a list of shapely
    polygons or a list / dict of (k, 2) arrays."""
    geoms = getattr(segmentation, "geometry", None)
    if geoms is not None:  # GeoDataFrame / GeoSeries
        ids = [str(i) for i in segmentation.index]
        items = list(geoms)
    elif isinstance(segmentation, dict):
        ids = [str(k) for k in segmentation]
        items = list(segmentation.values())
    else:
        items = list(segmentation)
        ids = [str(i) for i in range(len(items))]
    polys = []
    for i, g in zip(ids, items):
        if hasattr(g, "exterior"):
            polys.append(np.asarray(g.exterior.coords, dtype=np.float64)[:, :2])
        elif hasattr(g, "geoms"):  # MultiPolygon: its largest part
            part = max(g.geoms, key=lambda q: q.area)
            polys.append(np.asarray(part.exterior.coords, dtype=np.float64)[:, :2])
        else:
            a = np.asarray(g, dtype=np.float64)
            if a.ndim != 2 or a.shape[1] != 2:
                raise InputError(f"cell {i}: expected a polygon or a (k, 2) array of (x, y) "
                                 f"full-res px vertices, got shape {a.shape}")
            polys.append(a)
    return polys, ids


def aggregate_cells(pred, segmentation, *, um_per_px: float | None = None, sub: int = 8,
                    block_rows: int = 2048):
    """Per-cell expression from a super-resolved prediction and a cell segmentation.

    Parameters
    ----------
    pred: superpixel AnnData from ``Method.predict(..., at="superpixels")`` (obs ``row``/
        ``col``, counts per 8 um superpixel, ``uns["histosr"]`` with ``um_per_px`` and
        ``grid_shape``).
    segmentation: a labels image in full-resolution px (2-D integer array-like, 0 =
        background; numpy, zarr or dask), or polygons in full-res px (x = column, y = row):
        a GeoDataFrame/GeoSeries, a list or dict of shapely polygons or of (k, 2) arrays.
    um_per_px: full-res pixel size; default ``pred.uns["histosr"]["um_per_px"]``.
    sub: supersampling of polygons per superpixel side (see :func:`polygon_weights`).
    block_rows: rows of a labels image read at a time (memory: about 24 bytes per pixel of
        a strip; lower it for very wide slides).

    Returns AnnData cells x genes: each cell gets the area-weighted sum over superpixels,
    sum_j pred[j] * area(cell & j) / area(j), i.e. counts in the cell. ``obsm["spatial"]``
    holds centroids (x, y) full-res px; ``obs`` has ``area_um2`` and ``covered_frac`` (the
    part of the cell's area on predicted superpixels).
    """
    import anndata as ad

    uns = pred.uns.get("histosr", {})
    um = float(um_per_px if um_per_px is not None else uns.get("um_per_px", np.nan))
    if not np.isfinite(um) or um <= 0 or "grid_shape" not in uns:
        raise InputError("pred must be a superpixel prediction (uns['histosr'] with um_per_px "
                         "and grid_shape, from predict(at='superpixels')); pass um_per_px= if "
                         "it lacks the pixel size")
    H, W = (int(v) for v in uns["grid_shape"])
    sp_per_px = um / SP_UM
    if hasattr(segmentation, "shape") and hasattr(segmentation, "dtype") and len(
            segmentation.shape) == 2 and np.issubdtype(segmentation.dtype, np.integer):
        weights, ids, centroids = label_weights(segmentation, sp_per_px, (H, W),
                                                block_rows=block_rows)
        ids = [str(i) for i in ids]
    else:
        polys, ids = _polygons_from(segmentation)
        weights = polygon_weights([p * sp_per_px for p in polys], (H, W), sub=sub)
        centroids = np.array([polygon_centroid(p) for p in polys]).reshape(-1, 2)
    area_sp = np.asarray(weights.sum(axis=1)).ravel()
    flat = np.asarray(pred.obs["row"], np.int64) * W + np.asarray(pred.obs["col"], np.int64)
    Wp = weights[:, flat]  # cells x predicted superpixels
    # float64 sums, 128 genes at a time: a whole-slide prediction is never copied whole
    counts = np.empty((Wp.shape[0], pred.n_vars), dtype=np.float32)
    for g0 in range(0, pred.n_vars, 128):
        counts[:, g0:g0 + 128] = Wp @ dense(pred.X[:, g0:g0 + 128])
    covered = np.asarray(Wp.sum(axis=1)).ravel()
    obs = pd.DataFrame({"area_um2": area_sp * SP_UM**2,
                        "covered_frac": np.divide(covered, area_sp, out=np.zeros_like(covered),
                                                  where=area_sp > 0)},
                       index=pd.Index(ids))
    out = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pred.var_names.copy()))
    out.obsm["spatial"] = np.asarray(centroids, dtype=np.float64)
    out.uns["histosr"] = {**{k: v for k, v in uns.items() if k != "grid_shape"},
                          "aggregated": "cells: area-weighted sum over 8 um superpixels"}
    return out


__all__ = ["aggregate_cells", "polygon_weights", "label_weights", "polygon_area",
           "polygon_centroid", "disk_polygon"]
