"""HEST-1k samples: ``st/<id>.h5ad`` + ``wsis/<id>.tif`` + ``metadata/<id>.json``.

The AnnData holds raw counts with ``obsm["spatial"]`` = (x = column, y = row) in pixels of the
full-resolution WSI (HEST also stores ``obs`` ``pxl_col_in_fullres``/``pxl_row_in_fullres``).
The metadata JSON gives ``pixel_size_um_estimated`` (preferred) / ``pixel_size_um_embedded``,
``spot_diameter`` and ``inter_spot_dist`` (um) and ``st_technology``.

A flat folder ``<id>.h5ad`` + ``<id>.jpg|png|tif`` + ``<id>.json`` (the DeepSpot example layout,
e.g. the ``xenium_cells_lung_core`` fixture) is read too. There, ``obs["x_pixel"]`` is the image
ROW and ``obs["y_pixel"]`` the COLUMN; that convention is used only when no ``obsm["spatial"]``
and no ``pxl_*_in_fullres`` columns exist (``xy_columns`` overrides it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..section import PLATFORM_DIAMETER_UM, Section, SectionError, estimate_pitch_px
from ._common import MissingFileError, PathLike, require_dir
from .h5ad import read_h5ad

TECHNOLOGY = {"visium": "visium", "visium hd": "visium_hd", "xenium": "xenium",
              "spatial transcriptomics": "st", "st": "st"}
IMAGE_SUFFIXES = (".tif", ".tiff", ".btf", ".jpg", ".jpeg", ".png")


def _files(path: Path, sample_id: str | None) -> tuple[Path, Path, Path | None, str]:
    """(h5ad, image, metadata json or None, sample id) for either layout."""
    if path.is_file() and path.suffix == ".h5ad":
        sample_id = sample_id or path.stem
        root = path.parent.parent if path.parent.name == "st" else path.parent
        path = root
    root = require_dir(path, "HEST folder")
    nested = (root / "st").is_dir()
    st_dir = root / "st" if nested else root
    ids = sorted(p.stem for p in st_dir.glob("*.h5ad"))
    if sample_id is None:
        if len(ids) != 1:
            raise SectionError(
                f"{root} holds {len(ids)} HEST samples: pass sample_id= one of {ids[:10]}"
                if ids else f"no .h5ad in {st_dir}: expected a HEST-1k folder (st/<id>.h5ad, "
                "wsis/<id>.tif, metadata/<id>.json) or <id>.h5ad next to its image")
        sample_id = ids[0]
    h5 = st_dir / f"{sample_id}.h5ad"
    if not h5.is_file():
        raise MissingFileError(f"HEST sample {sample_id!r} not found: expected {h5} "
                               f"(available: {ids[:10]})")
    img_dir = root / "wsis" if nested else root
    imgs = [img_dir / f"{sample_id}{s}" for s in IMAGE_SUFFIXES if (img_dir / f"{sample_id}{s}")
            .is_file()]
    if not imgs:
        raise MissingFileError(f"H&E image of HEST sample {sample_id!r} not found: expected "
                               f"{img_dir / (sample_id + '.tif')} (or .jpg/.png)")
    meta_dir = root / "metadata" if nested else root
    mpath = meta_dir / f"{sample_id}.json"
    return h5, imgs[0], (mpath if mpath.is_file() else None), sample_id


def _number(meta: dict, *keys) -> tuple[float | None, str | None]:
    for k in keys:
        v = meta.get(k)
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if np.isfinite(v) and v > 0:
            return v, k
    return None, None


def read_hest(
    path: PathLike,
    sample_id: str | None = None,
    um_per_px: float | None = None,
    *,
    platform: str | None = None,
    spot_diameter_um: float | None = None,
    xy_columns: tuple[str, str] | None = None,
    name: str | None = None,
) -> Section:
    """Read one HEST-1k sample (or a flat ``<id>.h5ad`` + image + json folder).

    ``path``: the HEST root (with ``st/``, ``wsis/``, ``metadata/``), a flat folder, or the
    ``.h5ad`` itself. ``sample_id`` is needed when the folder holds several samples.
    ``um_per_px`` overrides the metadata (``pixel_size_um_estimated``, else ``_embedded``);
    ``platform`` overrides ``st_technology``; ``spot_diameter_um`` overrides
    ``spot_diameter`` / ``cell_diameter`` (um). When ``inter_spot_dist`` is known the pixel
    size is cross-checked against the measured spot pitch.
    """
    import anndata as ad

    h5, img, mpath, sid = _files(Path(path), sample_id)
    meta = json.loads(mpath.read_text()) if mpath is not None else {}
    if um_per_px is None:
        um_per_px, key = _number(meta, "pixel_size_um_estimated", "pixel_size_um_embedded")
        if um_per_px is None:
            raise SectionError(
                f"pixel size unknown for HEST sample {sid!r}: "
                f"{mpath or 'its metadata json'} has no pixel_size_um_estimated or "
                "pixel_size_um_embedded; pass um_per_px (microns per WSI pixel)")
        src = f"{mpath.name} {key}"
    else:
        src = "the um_per_px argument"
    tech = str(meta.get("st_technology", "")).strip().lower()
    platform = platform or TECHNOLOGY.get(tech, tech.replace(" ", "_") or "unknown")
    if spot_diameter_um is None:
        spot_diameter_um, _ = _number(meta, "spot_diameter", "cell_diameter")
    if spot_diameter_um is None:
        spot_diameter_um = PLATFORM_DIAMETER_UM.get(platform)
    if spot_diameter_um is None:
        raise SectionError(f"spot diameter unknown for HEST sample {sid!r} (platform "
                           f"{platform!r}): pass spot_diameter_um")
    kw: dict = {}
    if xy_columns is None:
        a = ad.read_h5ad(h5, backed="r")
        cols, has_spatial = set(a.obs.columns), "spatial" in a.obsm
        a.file.close()
        if not has_spatial:
            if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= cols:
                xy_columns = ("pxl_col_in_fullres", "pxl_row_in_fullres")
            elif {"x_pixel", "y_pixel"} <= cols:
                xy_columns = ("y_pixel", "x_pixel")  # DeepSpot layout: x_pixel is the row
    if xy_columns is not None:
        kw["xy_columns"] = tuple(xy_columns)
    section = read_h5ad(h5, img, float(um_per_px), float(spot_diameter_um), platform=platform,
                        name=name or sid, **kw)
    pitch_um, _ = _number(meta, "inter_spot_dist")
    if pitch_um is not None and section.n_spots >= 10:
        est = pitch_um / estimate_pitch_px(section.xy)
        if abs(section.um_per_px - est) / est > 0.15:
            raise SectionError(
                f"pixel size {section.um_per_px:.4f} um/px from {src} disagrees with the spot "
                f"pitch: spots are {estimate_pitch_px(section.xy):.1f} px apart, which for "
                f"inter_spot_dist {pitch_um:g} um means {est:.4f} um/px; pass um_per_px")
    section.meta.update(reader="hest", sample_id=sid, um_per_px_source=src,
                        hest_metadata=meta, image_path=str(img))
    return section


__all__ = ["read_hest"]
