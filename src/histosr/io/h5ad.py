"""Generic AnnData reader: spots (or cells) x genes with pixel coordinates, plus an image.

Coordinates come from ``obsm[spatial_key]`` (x = column, y = row; the scanpy convention) or
from two ``obs`` columns named by ``xy_columns`` = (column-source, row-source). Example: in the
DeepSpot/HEST Xenium fixture ``NCBI858.h5ad`` ``obs["x_pixel"]`` is the image ROW and
``obs["y_pixel"]`` the COLUMN, so pass ``xy_columns=("y_pixel", "x_pixel")``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..section import (
    PLATFORM_PITCH_UM,
    Section,
    SectionError,
    check_pixel_size,
    make_counts,
    validate,
)
from ._common import PathLike, open_image_checked, require_file


def read_h5ad(
    path: PathLike,
    image: PathLike,
    um_per_px: float,
    spot_diameter_um: float,
    platform: str = "unknown",
    spatial_key: str = "spatial",
    xy_columns: tuple[str, str] | None = None,
    coord_scale: float = 1.0,
    *,
    layer: str | None = None,
    name: str | None = None,
) -> Section:
    """Read an ``.h5ad`` file and pair it with its H&E image.

    Parameters
    ----------
    path: the AnnData file (observations = spots or cells, ``X`` or ``layers[layer]`` = raw
        counts).
    image: the H&E image the coordinates refer to (after ``coord_scale``).
    um_per_px: microns per pixel of ``image``; cross-checked against the pitch for platforms
        with a fixed lattice (``"visium"``, ``"st"``), else checked for plausibility only.
    spot_diameter_um: spot (or cell) diameter in um.
    spatial_key: ``obsm`` key of the (x, y) coordinates, used when ``xy_columns`` is None.
    xy_columns: ``(column_source, row_source)``: names of the ``obs`` columns holding the image
        column (x) and the image row (y).
    coord_scale: factor from the stored coordinates to ``image`` pixels.
    """
    import anndata as ad

    path = require_file(path, "AnnData file (.h5ad)")
    try:
        a = ad.read_h5ad(path)
    except Exception as e:  # noqa: BLE001 - h5py/anndata raise many types
        raise SectionError(f"could not read {path} as AnnData (.h5ad): {e}") from e
    if xy_columns is not None:
        if len(xy_columns) != 2:
            raise SectionError("xy_columns must be two obs column names: (column, row)")
        miss = [c for c in xy_columns if c not in a.obs.columns]
        if miss:
            raise SectionError(
                f"{path}: obs lacks {miss}; obs columns are {list(a.obs.columns)[:20]}"
            )
        xy = np.column_stack([pd.to_numeric(a.obs[c], errors="coerce").to_numpy(np.float64)
                              for c in xy_columns])
        src = f"obs[{xy_columns[0]!r}] (column), obs[{xy_columns[1]!r}] (row)"
    elif spatial_key in a.obsm:
        xy = np.asarray(a.obsm[spatial_key], dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise SectionError(f'{path}: obsm["{spatial_key}"] must be (n, 2) x, y coordinates')
        xy = xy[:, :2]
        src = f'obsm["{spatial_key}"]'
    else:
        cand = [c for c in a.obs.columns if any(k in c.lower() for k in ("x", "y", "pixel",
                                                                           "row", "col"))]
        raise SectionError(
            f'{path} has no obsm["{spatial_key}"]: expected (x = column, y = row) pixel '
            f"coordinates there, or pass xy_columns=(column_source, row_source) naming two "
            f"obs columns (candidates: {cand[:8]}); obsm keys: {list(a.obsm.keys())}"
        )
    if not np.isfinite(xy).all():
        raise SectionError(f"{path}: coordinates from {src} contain missing or non-numeric values")
    xy = xy * float(coord_scale)
    img = open_image_checked(image)
    if layer is not None:
        if layer not in a.layers:
            raise SectionError(f"{path}: no layer {layer!r}; layers are {list(a.layers.keys())}")
        x = a.layers[layer]
    else:
        x = a.X
    if x is None:
        raise SectionError(f"{path} has no count matrix in X")
    x = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)
    lattice = xy if platform in PLATFORM_PITCH_UM else np.zeros((0, 2))
    um = check_pixel_size(um_per_px, lattice, platform, source="the um_per_px argument")
    obs = a.obs.copy()
    section = Section(
        name=name or Path(path).stem,
        image=img,
        um_per_px=um,
        counts=make_counts(x, a.obs_names, a.var_names, xy, obs=obs),
        spot_diameter_um=float(spot_diameter_um),
        platform=platform,
        meta={"reader": "h5ad", "path": str(path), "coordinates": src,
              "coord_scale": float(coord_scale)},
    )
    section.counts.var = a.var.copy().set_axis(section.counts.var_names)
    return validate(section)
