"""Legacy Spatial Transcriptomics (ST) readers: the her2st layout and a single-folder layout.

Legacy ST spots are 100 um wide on a square lattice with 200 um pitch; spot ids are
``"<x>x<y>"`` array coordinates. The pixel size is estimated from the lattice pitch (and
cross-checked against a value the user passes).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..section import (
    PLATFORM_DIAMETER_UM,
    Section,
    SectionError,
    check_pixel_size,
    make_counts,
    validate,
)
from ._common import (
    MissingFileError,
    PathLike,
    counts_frame_to_matrix,
    match_spots,
    numeric_columns,
    open_image_checked,
    read_table,
    require_columns,
    require_dir,
    require_file,
)

# Display images shipped instead of the full-resolution one: name -> width (px) of the
# original image the selection file's pixel coordinates refer to.
_DISPLAY_ORIGINAL_WIDTH = {"A1": 6954}


def _read_counts(path: Path) -> pd.DataFrame:
    df = read_table(path, "count table", sep="\t", index_col=0)
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise SectionError(
            f"count table {path} is empty: expected spots x genes with the spot id "
            "('<x>x<y>') in the first column"
        )
    df.index = df.index.astype(str)
    return df


def _read_spot_table(path: Path, xy_cols=("pixel_x", "pixel_y")) -> pd.DataFrame:
    sel = read_table(path, "spot table", sep="\t")
    cols = ["x", "y", *xy_cols]
    require_columns(sel, cols, "spot table", path)
    numeric_columns(sel, cols, "spot table", path)
    return sel


def _st_section(
    name: str,
    counts: pd.DataFrame,
    counts_path: Path,
    spots: pd.DataFrame,
    spots_path: Path,
    image,
    um_per_px: float | None,
    coord_scale: float,
    meta: dict,
) -> Section:
    # Every listed spot takes part in the join; which spots are kept is decided by the
    # count table (a "selected" column, when present, is not needed for that).
    ids = (
        spots["x"].round().astype(int).astype(str) + "x" + spots["y"].round().astype(int).astype(str)
    )
    where = match_spots(counts.index, pd.Index(ids), f"count table {counts_path}",
                        f"spot table {spots_path}")
    sp_rows = spots.iloc[where]
    xy = sp_rows[["pixel_x", "pixel_y"]].to_numpy(np.float64) * float(coord_scale)
    obs = pd.DataFrame(
        {
            "array_row": sp_rows["y"].round().astype(int).to_numpy(),
            "array_col": sp_rows["x"].round().astype(int).to_numpy(),
        }
    )
    x = counts_frame_to_matrix(counts, counts_path)
    source = "the um_per_px argument"
    # The pitch is estimated from every lattice spot listed (more robust than in-tissue only).
    lattice_xy = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64) * float(coord_scale)
    um = check_pixel_size(um_per_px, lattice_xy, "st", source=source)
    meta.setdefault("um_per_px_source", "spot pitch (200 um)" if um_per_px is None else source)
    meta["coord_scale"] = float(coord_scale)
    section = Section(
        name=name,
        image=image,
        um_per_px=um,
        counts=make_counts(x, counts.index, counts.columns, xy, obs=obs),
        spot_diameter_um=PLATFORM_DIAMETER_UM["st"],
        platform="st",
        meta=meta,
    )
    return section


def read_her2st(
    root: PathLike,
    name: str,
    *,
    um_per_px: float | None = None,
    image: PathLike | None = None,
    coord_scale: float | None = None,
    annotations: bool = True,
) -> Section:
    """Read one section of the her2st layout (``counts/``, ``spots/``, ``images/``).

    Parameters
    ----------
    root: the her2st folder holding ``counts/<name>.tsv.gz``, ``spots/<name>_selection.tsv``
        and ``images/<name>.jpg``.
    name: section name, e.g. ``"C2"``.
    um_per_px: optional pixel size of the image; by default it is estimated from the 200 um
        spot pitch. A given value is cross-checked against the pitch.
    image: optional image to use instead of ``images/<name>.jpg`` (e.g. a downscaled display
        image). Pass ``coord_scale`` with it when it is not the image the selection file's
        ``pixel_x``/``pixel_y`` refer to.
    coord_scale: factor applied to ``pixel_x``/``pixel_y`` (image width / width of the image the
        coordinates were measured on). Default 1, except for known display images: when
        ``images/<name>.jpg`` is absent and ``images/<name>_display.png`` exists for a section
        whose original width is known (A1: 2000 px shown of 6954 px, so 2000 / 6954), that image
        and scale are used.
    annotations: load ``labels/<name>_labeled_coordinates.tsv`` (pathologist labels) into
        ``section.annotations`` when the file exists; the join is on rounded array
        coordinates.

    Spots in the count table without a row in the selection file are an error (unmatched
    spot ids); selection rows without counts are background spots and are dropped.
    """
    root = require_dir(root, "her2st folder")
    name = str(name)
    counts_path = require_file(
        root / "counts" / f"{name}.tsv.gz", f"count table of section {name!r}",
        _available_hint(root),
    )
    spots_path = require_file(root / "spots" / f"{name}_selection.tsv",
                              f"spot selection file of section {name!r}")
    meta: dict = {"reader": "her2st", "counts_path": str(counts_path),
                  "spots_path": str(spots_path)}
    if image is None:
        img_path = root / "images" / f"{name}.jpg"
        display = root / "images" / f"{name}_display.png"
        if not img_path.is_file() and display.is_file() and name in _DISPLAY_ORIGINAL_WIDTH:
            img_path = display
            img = open_image_checked(img_path)
            if coord_scale is None:
                coord_scale = img.shape[1] / _DISPLAY_ORIGINAL_WIDTH[name]
            meta["display_image"] = True
        else:
            img = open_image_checked(
                require_file(img_path, f"H&E image of section {name!r}",
                             "Pass image= (and coord_scale= for a rescaled image) to use "
                             "another file."))
    else:
        img_path = Path(image) if not hasattr(image, "shape") else None
        img = open_image_checked(image)
    meta["image_path"] = str(img_path) if img_path is not None else None
    section = _st_section(
        name, _read_counts(counts_path), counts_path, _read_spot_table(spots_path), spots_path,
        img, um_per_px, 1.0 if coord_scale is None else coord_scale, meta,
    )
    lab_path = root / "labels" / f"{name}_labeled_coordinates.tsv"
    if annotations and lab_path.is_file():
        section.annotations = _read_labels(lab_path, section)
        meta["annotations_path"] = str(lab_path)
    return validate(section)


def _available_hint(root: Path) -> str:
    d = root / "counts"
    names = sorted(p.name[: -len(".tsv.gz")] for p in d.glob("*.tsv.gz")) if d.is_dir() else []
    return f"Sections available: {names}." if names else ""


def _read_labels(path: Path, section: Section) -> pd.Series:
    lab = read_table(path, "annotation table", sep="\t")
    require_columns(lab, ["x", "y", "label"], "annotation table", path)
    numeric_columns(lab, ["x", "y"], "annotation table", path)
    keys = lab["x"].round().astype(int).astype(str) + "x" + lab["y"].round().astype(int).astype(str)
    labels = pd.Series(lab["label"].astype(str).to_numpy(), index=pd.Index(keys))
    labels = labels[~labels.index.duplicated()]
    obs = section.counts.obs
    spot_keys = obs["array_col"].astype(str) + "x" + obs["array_row"].astype(str)
    out = pd.Series(labels.reindex(spot_keys.to_numpy()).to_numpy(), index=obs.index,
                    name="label")
    n_missing = int(out.isna().sum())
    if n_missing == len(out):
        raise SectionError(
            f"annotation table {path} matches none of the {len(out)} spots of section "
            f"{section.name!r}: expected x, y array coordinates like the selection file"
        )
    if n_missing:
        warnings.warn(f"{n_missing} spot(s) of {section.name!r} have no label in {path}",
                      stacklevel=3)
    return out


def read_st(
    folder: PathLike,
    *,
    um_per_px: float | None = None,
    name: str | None = None,
    counts: str = "counts.tsv",
    spots: str = "spots.tsv",
    image: PathLike | None = None,
) -> Section:
    """Read a legacy ST section stored as one folder.

    ``counts.tsv`` (spots x genes, index ``"<x>x<y>"``), ``spots.tsv`` (columns ``x y ...
    pixel_x pixel_y``, ``pixel_x`` = image column) and ``image.jpg`` (or ``image=``); an
    optional ``mask.png`` is recorded in ``section.meta["tissue_mask_path"]``. The pixel size
    is estimated from the 200 um spot pitch unless ``um_per_px`` is given (then cross-checked).
    """
    folder = require_dir(folder, "ST folder")
    counts_path = require_file(folder / counts, "count table")
    spots_path = require_file(folder / spots, "spot table")
    if image is None:
        cands = [folder / n for n in ("image.jpg", "image.jpeg", "image.png", "image.tif",
                                      "image.tiff")]
        found = [c for c in cands if c.is_file()]
        if not found:
            raise MissingFileError(
                f"H&E image not found: expected {folder / 'image.jpg'} (or .png/.tif), or "
                "pass image= with its path"
            )
        image = found[0]
    img = open_image_checked(image)
    meta: dict = {"reader": "st", "counts_path": str(counts_path), "spots_path": str(spots_path),
                  "image_path": str(image) if not hasattr(image, "shape") else None}
    mask = folder / "mask.png"
    if mask.is_file():
        meta["tissue_mask_path"] = str(mask)
    section = _st_section(
        name or folder.name, _read_counts(counts_path), counts_path,
        _read_spot_table(spots_path), spots_path, img, um_per_px, 1.0, meta,
    )
    return validate(section)
