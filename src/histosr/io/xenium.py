"""10x Xenium output folder (Xenium Onboard Analysis ``outs``) paired with its H&E image.

Files used: ``experiment.xenium`` (JSON; ``pixel_size`` = um per morphology-image pixel,
0.2125), ``cell_feature_matrix.h5`` or ``cell_feature_matrix/`` (mtx), ``cells.parquet``
(or ``cells.csv.gz``: ``cell_id``, ``x_centroid``, ``y_centroid`` in um, ``cell_area`` in
um^2), optionally ``cell_boundaries.parquet`` (``cell_id``, ``vertex_x``, ``vertex_y`` in um),
the post-Xenium H&E (``*he_image*.tif``) and its alignment (``*he_imagealignment.csv``: a
3x3 affine taking H&E pixels (x = column, y = row) to morphology-image pixels, as exported
by Xenium Explorer). Cells become the Section's "spots" at their centroids in H&E pixels.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..section import Section, SectionError, check_pixel_size, make_counts, validate
from ._common import (
    MissingFileError,
    PathLike,
    open_image_checked,
    outs_folder,
    require_file,
)

XENIUM_PIXEL_SIZE_UM = 0.2125
HE_PATTERNS = ("*he_image*.ome.tif", "*he_image*.tif", "*he_image*.tiff", "*_he.ome.tif",
               "he_image.ome.tif")
ALIGN_PATTERNS = ("*he_imagealignment.csv", "*imagealignment.csv")


def _outs(path: Path) -> Path:
    return outs_folder(path, "experiment.xenium", "Xenium output folder",
                       "experiment.xenium, cells.parquet and cell_feature_matrix.h5 (the "
                       "Xenium Onboard Analysis 'outs' folder)")


def _find(folder: Path, patterns, what: str) -> Path | None:
    """First match of ``patterns`` in the folder or its parent (10x ships the H&E files
    next to the unzipped ``outs``)."""
    for base in (folder, folder.parent):
        for pat in patterns:
            hits = sorted(p for p in base.glob(pat) if p.is_file())
            if hits:
                return hits[0]
    return None


def read_alignment(path: PathLike) -> np.ndarray:
    """The 3x3 H&E-pixel -> morphology-pixel affine from a Xenium ``*imagealignment.csv``."""
    path = require_file(path, "H&E alignment matrix (CSV)")
    try:
        m = pd.read_csv(path, header=None).to_numpy(np.float64)
    except Exception as e:  # noqa: BLE001 - pandas raises many types
        raise SectionError(f"could not read {path} as a 3x3 CSV matrix: {e}") from e
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise SectionError(f"{path}: expected a 3x3 numeric matrix (no header), got shape "
                           f"{m.shape}")
    if not np.allclose(m[2], [0, 0, 1], atol=1e-6) or abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise SectionError(f"{path}: expected an invertible affine matrix with last row 0 0 1, "
                           f"got {m.tolist()}")
    return m


def _read_cells(outs: Path) -> tuple[pd.DataFrame, Path]:
    p = outs / "cells.parquet"
    if p.is_file():
        df = pd.read_parquet(p)
    else:
        p = require_file(outs / "cells.csv.gz", "Xenium cell table",
                         "Expected cells.parquet or cells.csv.gz in the Xenium output folder.")
        df = pd.read_csv(p)
    miss = [c for c in ("cell_id", "x_centroid", "y_centroid") if c not in df.columns]
    if miss:
        raise SectionError(f"{p} lacks columns {miss}: expected cell_id, x_centroid, y_centroid "
                           f"(um); found {list(df.columns)[:12]}")
    df["cell_id"] = _ids(df["cell_id"])
    return df, p


def _ids(col: pd.Series) -> pd.Series:
    return col.map(lambda v: v.decode() if isinstance(v, bytes) else str(v))


def _read_matrix(outs: Path, meta: dict):
    from .visium import _gene_expression, read_10x_h5, read_10x_mtx

    h5, mtx = outs / "cell_feature_matrix.h5", outs / "cell_feature_matrix"
    if h5.is_file():
        (m, bc, feats), src = read_10x_h5(h5), h5
    elif mtx.is_dir():
        (m, bc, feats), src = read_10x_mtx(mtx), mtx
    else:
        raise MissingFileError(f"cell-feature matrix not found in {outs}: expected "
                               "cell_feature_matrix.h5 or cell_feature_matrix/ (mtx)")
    meta["counts_path"] = str(src)
    m, genes, feats = _gene_expression(m, feats, meta)
    return m, [str(b) for b in bc], genes, feats


def to_image_px(xy_um: np.ndarray, pixel_size_um: float, alignment: np.ndarray) -> np.ndarray:
    """Xenium um (x, y) -> H&E px (x = column, y = row) through the inverse alignment."""
    morph = np.asarray(xy_um, dtype=np.float64) / pixel_size_um
    inv = np.linalg.inv(alignment)
    return morph @ inv[:2, :2].T + inv[:2, 2]


def read_xenium(
    path: PathLike,
    image: PathLike | None = None,
    alignment: PathLike | np.ndarray | None = None,
    um_per_px: float | None = None,
    *,
    name: str | None = None,
    max_outside: float = 0.5,
) -> Section:
    """Read a Xenium output folder with its H&E image; cells become the section's spots.

    Parameters
    ----------
    path: the Xenium ``outs`` folder (with ``experiment.xenium``) or its parent.
    image: the H&E image; default the ``*he_image*.tif`` found in the folder or its parent.
    alignment: the 3x3 H&E-px -> morphology-px affine (array or CSV path); default the
        ``*he_imagealignment.csv`` found next to the image. ``None`` with a user ``image`` and
        no CSV means the image is already in the morphology frame at ``um_per_px``.
    um_per_px: H&E pixel size; default ``pixel_size * sqrt(|det A|)`` from the alignment.
    max_outside: cells whose centroid falls outside the H&E image are dropped (with a
        warning); more than this fraction outside is an error (wrong alignment direction).

    ``spot_diameter_um`` is the diameter of a disk of the median ``cell_area``.
    ``meta["boundaries_path"]`` names ``cell_boundaries.parquet`` when present, and
    ``meta["alignment"]``/``meta["xenium_pixel_size_um"]`` map um to H&E px (see
    :func:`to_image_px`).
    """
    outs = _outs(Path(path))
    meta: dict = {"reader": "xenium", "path": str(outs)}
    try:
        exp = json.loads((outs / "experiment.xenium").read_text())
    except json.JSONDecodeError as e:
        raise SectionError(f"{outs / 'experiment.xenium'} is not valid JSON: {e}") from e
    px = float(exp.get("pixel_size", XENIUM_PIXEL_SIZE_UM))
    if not (0.05 <= px <= 2.0):
        raise SectionError(f"{outs / 'experiment.xenium'}: pixel_size {px!r} um is implausible "
                           f"(expected about {XENIUM_PIXEL_SIZE_UM})")
    meta["xenium_pixel_size_um"] = px
    if "pixel_size" not in exp:
        meta["note_pixel_size"] = f"experiment.xenium has no pixel_size; {px} um assumed"

    he = Path(image) if image is not None and not hasattr(image, "shape") else image
    if he is None:
        he = _find(outs, HE_PATTERNS, "H&E image")
        if he is None:
            raise MissingFileError(
                f"no H&E image found for the Xenium run {outs}: expected *he_image*.ome.tif "
                "(and *he_imagealignment.csv) in the folder or next to it. Pass image= (and "
                "alignment=, the 3x3 CSV from Xenium Explorer's image alignment)."
            )
    if isinstance(alignment, np.ndarray):
        A = np.asarray(alignment, dtype=np.float64)
        if A.shape != (3, 3):
            raise SectionError(f"alignment must be a 3x3 affine matrix, got shape {A.shape}")
        meta["alignment_source"] = "argument"
    elif alignment is not None:
        A = read_alignment(alignment)
        meta["alignment_source"] = str(alignment)
    else:
        found = _find(outs, ALIGN_PATTERNS, "alignment")
        if found is not None:
            A = read_alignment(found)
            meta["alignment_source"] = str(found)
        elif image is not None:
            s = (um_per_px or px) / px
            A = np.diag([s, s, 1.0])
            meta["alignment_source"] = "none: image in the morphology frame"
        else:
            raise MissingFileError(
                f"found the H&E image {he} but no *he_imagealignment.csv next to it: pass "
                "alignment= (3x3 affine from H&E px to morphology px)")
    meta["alignment"] = A.tolist()
    um_est = px * float(np.sqrt(abs(np.linalg.det(A[:2, :2]))))
    um = check_pixel_size(um_per_px if um_per_px is not None else um_est, np.zeros((0, 2)),
                          "xenium", source="the um_per_px argument" if um_per_px is not None
                          else "the alignment matrix and experiment.xenium pixel_size")
    img = open_image_checked(he, "Xenium H&E image")
    meta["image_path"] = None if hasattr(he, "shape") else str(he)

    cells, cells_path = _read_cells(outs)
    meta["cells_path"] = str(cells_path)
    m, bc, genes, feats = _read_matrix(outs, meta)
    pos = pd.Index(cells["cell_id"])
    where = pos.get_indexer(pd.Index(bc))
    if (where < 0).any():
        raise SectionError(
            f"{int((where < 0).sum())} of {len(bc)} cells of the matrix are missing from "
            f"{cells_path} (e.g. {np.asarray(bc)[where < 0][:3].tolist()}): expected every "
            "matrix barcode to be a cell_id"
        )
    cells = cells.iloc[where].reset_index(drop=True)
    xy_um = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)
    xy = to_image_px(xy_um, px, A)
    h, w = img.shape[:2]
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    if inside.mean() < 1.0 - max_outside:
        raise SectionError(
            f"{int((~inside).sum())} of {len(xy)} cells fall outside the {w}x{h} px H&E image "
            "after alignment: expected the alignment to map H&E pixels to morphology pixels "
            "(Xenium Explorer's *_he_imagealignment.csv). If yours maps the other way pass "
            "alignment=np.linalg.inv(matrix); check also that the image is the aligned H&E."
        )
    if not inside.all():
        warnings.warn(f"{int((~inside).sum())} of {len(xy)} Xenium cells lie outside the H&E "
                      "image and were dropped", stacklevel=2)
        meta["dropped_outside_image"] = int((~inside).sum())
    keep = np.flatnonzero(inside)
    obs = pd.DataFrame({"x_um": xy_um[keep, 0], "y_um": xy_um[keep, 1]})
    if "cell_area" in cells.columns:
        obs["cell_area_um2"] = cells["cell_area"].to_numpy(np.float64)[keep]
        diam = 2.0 * float(np.sqrt(np.nanmedian(obs["cell_area_um2"]) / np.pi))
    else:
        diam = 10.0
        meta["note_diameter"] = "no cell_area in the cell table: 10 um assumed"
    counts = make_counts(m[keep], np.asarray(bc)[keep], genes, xy[keep], obs=obs)
    counts.var["gene_ids"] = feats["id"].to_numpy()
    bpath = outs / "cell_boundaries.parquet"
    if bpath.is_file():
        meta["boundaries_path"] = str(bpath)
    elif (outs / "cell_boundaries.csv.gz").is_file():
        meta["boundaries_path"] = str(outs / "cell_boundaries.csv.gz")
    section = Section(
        name=name or str(exp.get("region_name") or exp.get("run_name")
                         or (outs.parent.name if outs.name == "outs" else outs.name)),
        image=img,
        um_per_px=um,
        counts=counts,
        spot_diameter_um=diam,
        platform="xenium",
        meta=meta,
    )
    return validate(section)


def read_cell_boundaries(section: Section) -> dict[str, np.ndarray] | None:
    """Cell polygons of a :func:`read_xenium` section in its H&E px (x = column, y = row),
    keyed by cell id (only the section's cells); ``None`` without a boundaries file."""
    bpath = section.meta.get("boundaries_path")
    if not bpath:
        return None
    bpath = Path(bpath)
    df = pd.read_parquet(bpath) if bpath.suffix == ".parquet" else pd.read_csv(bpath)
    miss = [c for c in ("cell_id", "vertex_x", "vertex_y") if c not in df.columns]
    if miss:
        raise SectionError(f"{bpath} lacks columns {miss}: expected cell_id, vertex_x, vertex_y "
                           "(um)")
    ids = _ids(df["cell_id"]).to_numpy()
    xy = to_image_px(df[["vertex_x", "vertex_y"]].to_numpy(np.float64),
                     float(section.meta["xenium_pixel_size_um"]),
                     np.asarray(section.meta["alignment"], dtype=np.float64))
    # vertices of one cell are consecutive rows
    cuts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    starts = np.concatenate([[0], cuts])
    wanted = set(section.counts.obs_names)
    return {ids[s]: part for s, part in zip(starts, np.split(xy, cuts)) if ids[s] in wanted}


__all__ = ["read_xenium", "read_alignment", "read_cell_boundaries", "to_image_px"]
