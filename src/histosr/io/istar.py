"""iStar's input layout: ``he-raw.jpg``, ``cnts.tsv``, ``locs-raw.tsv``,
``pixel-size-raw.txt`` and ``radius-raw.txt`` (see METHODS.md 1.1).

``locs-raw.tsv`` holds the spot id and ``x`` (image column), ``y`` (image row) in raw image
pixels; ``radius-raw.txt`` the spot radius in raw pixels (iStar's Visium recipe writes
``spot_diameter_fullres / 2`` there, which spans 65 um rather than 55; the diameter is taken
as written: ``2 * radius * um_per_px``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..image import FileImage
from ..section import (
    PLATFORM_PITCH_UM,
    Section,
    SectionError,
    check_pixel_size,
    make_counts,
    validate,
)
from ._common import (
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

FILES = ("he-raw.jpg", "cnts.tsv", "locs-raw.tsv", "pixel-size-raw.txt", "radius-raw.txt")


def _read_number(path: Path, what: str) -> float:
    path = require_file(path, what)
    txt = path.read_text().strip()
    try:
        v = float(txt.split()[0])
    except (ValueError, IndexError):
        raise SectionError(f"{path} must hold one number ({what}), found {txt[:40]!r}") from None
    if not np.isfinite(v) or v <= 0:
        raise SectionError(f"{path}: {what} must be a positive number, found {v!r}")
    return v


def read_istar(
    folder: PathLike,
    platform: str = "visium",
    *,
    name: str | None = None,
    image: PathLike | None = None,
) -> Section:
    """Read an iStar input folder. ``platform`` (default ``"visium"``) selects the pitch used to
    cross-check ``pixel-size-raw.txt``; platforms without a fixed lattice are only checked for
    plausibility."""
    folder = require_dir(folder, "iStar folder")
    cnts_path = require_file(folder / "cnts.tsv", "count table (iStar cnts.tsv)")
    locs_path = require_file(folder / "locs-raw.tsv", "spot locations (iStar locs-raw.tsv)")
    um = _read_number(folder / "pixel-size-raw.txt", "pixel size in um/px")
    radius = _read_number(folder / "radius-raw.txt", "spot radius in raw px")
    img = open_image_checked(
        image if image is not None else require_file(folder / "he-raw.jpg", "H&E image")
    )
    cnts = read_table(cnts_path, "count table", sep="\t", index_col=0)
    if cnts.shape[0] == 0 or cnts.shape[1] == 0:
        raise SectionError(f"count table {cnts_path} is empty: expected spots x genes")
    cnts.index = cnts.index.astype(str)
    locs = read_table(locs_path, "spot locations", sep="\t", index_col=0)
    require_columns(locs, ["x", "y"], "spot locations", locs_path)
    numeric_columns(locs, ["x", "y"], "spot locations", locs_path)
    locs.index = locs.index.astype(str)
    where = match_spots(cnts.index, locs.index, f"count table {cnts_path}",
                        f"spot locations {locs_path}")
    xy = locs[["x", "y"]].to_numpy(np.float64)[where]
    source = f"{folder / 'pixel-size-raw.txt'}"
    if platform in PLATFORM_PITCH_UM:
        um = check_pixel_size(um, locs[["x", "y"]].to_numpy(np.float64), platform, source=source)
    else:
        um = check_pixel_size(um, np.zeros((0, 2)), platform, source=source)
    section = Section(
        name=name or folder.name,
        image=img,
        um_per_px=um,
        counts=make_counts(counts_frame_to_matrix(cnts, cnts_path), cnts.index, cnts.columns, xy),
        spot_diameter_um=2.0 * radius * um,
        platform=platform,
        meta={"reader": "istar", "path": str(folder), "radius_px": radius,
              "um_per_px_source": source},
    )
    return validate(section)


def write_istar(section: Section, folder: PathLike, *, jpeg_quality: int = 95) -> Path:
    """Write a Section in iStar's layout (the five files of :data:`FILES`).

    The image is copied when it is a JPEG file already, else encoded from its pixels (the
    whole image is read into memory: meant for moderate sizes).
    """
    from PIL import Image

    validate(section)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = getattr(section.image, "path", None)
    dst = folder / "he-raw.jpg"
    if (isinstance(section.image, FileImage) and src and Path(src).is_file()
            and Path(src).suffix.lower() in (".jpg", ".jpeg")):
        if Path(src).resolve() != dst.resolve():
            shutil.copyfile(src, dst)
    else:
        h, w = section.image.shape[:2]
        Image.fromarray(section.image.read(0, 0, h, w)).save(dst, quality=jpeg_quality)
    x = section.counts.X
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    ids = pd.Index(section.counts.obs_names, name="spot")
    x = np.asarray(x)
    if np.allclose(x, np.round(x)):
        x = np.round(x).astype(np.int64)
    pd.DataFrame(x, index=ids, columns=section.counts.var_names).to_csv(
        folder / "cnts.tsv", sep="\t"
    )
    xy = section.xy
    pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}, index=ids).to_csv(
        folder / "locs-raw.tsv", sep="\t"
    )
    (folder / "pixel-size-raw.txt").write_text(f"{section.um_per_px!r}\n")
    (folder / "radius-raw.txt").write_text(f"{section.spot_radius_px!r}\n")
    return folder
