"""Sections made from an H&E image alone (nothing sequenced), for H&E-only prediction.

* :func:`image_only_view`: an existing section stripped of its measurements (P3 predicts the
  held-out section through it, so no method can read its counts).
* :func:`section_from_image`: a new section from an image file: the tissue mask
  (:func:`histosr.tissue.section_tissue_mask`), then either a hexagonal spot lattice over the
  tissue (``grid="spots"``, Visium-like: ``pitch_um`` between neighbours, alternate rows
  offset by half a pitch, rows ``pitch * sqrt(3) / 2`` apart) or every tissue superpixel
  of the 8 um grid (``grid="superpixels"``: a dense map; one crop per superpixel, so it costs
  ~150x more than the spot lattice on Visium geometry).

Coordinates are full-resolution px, x = column, y = row (``obsm["spatial"]``). Counts have
no genes (``n_vars == 0``): spot-level methods only read the image and the positions.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError

GRIDS = ("spots", "superpixels")


def empty_counts(ids, xy: np.ndarray, obs=None):
    """AnnData with no genes: ``obs_names`` = ids, ``obsm["spatial"]`` = (x, y) px."""
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame(index=pd.Index([str(i) for i in ids])) if obs is None else obs.copy()
    obs.index = pd.Index([str(i) for i in ids])
    c = ad.AnnData(X=np.zeros((len(obs), 0), dtype=np.float32), obs=obs)
    c.obsm["spatial"] = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return c


def image_only_view(section):
    """The section as an H&E-only method may see it: image, pixel size, spot ids and
    positions, spot diameter; counts with no gene (nothing measured can leak)."""
    from .section import Section

    obs = section.counts.obs[[c for c in ("array_row", "array_col")
                              if c in section.counts.obs]]
    return Section(name=section.name, image=section.image, um_per_px=section.um_per_px,
                   counts=empty_counts(section.counts.obs_names, section.xy, obs),
                   spot_diameter_um=section.spot_diameter_um, platform=section.platform,
                   meta={"image_only_view_of": section.name})


def hex_centres(width_px: int, height_px: int, um_per_px: float,
                pitch_um: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """Hexagonal lattice over an image: (xy (n, 2) full-res px, (row, col) lattice indices).
    Rows are ``pitch * sqrt(3) / 2`` apart, odd rows shifted by half a pitch."""
    if pitch_um <= 0:
        raise InputError(f"pitch_um must be > 0, got {pitch_um}")
    p = pitch_um / um_per_px
    dy = p * math.sqrt(3) / 2
    xs, ys, rr, cc = [], [], [], []
    r = 0
    y = p / 2
    while y < height_px:
        off = p / 2 if r % 2 else 0.0
        x = p / 2 + off
        c = 0
        while x < width_px:
            xs.append(x)
            ys.append(y)
            rr.append(r)
            cc.append(c)
            x += p
            c += 1
        y += dy
        r += 1
    return np.stack([xs, ys], axis=1) if xs else np.zeros((0, 2)), np.stack(
        [rr, cc], axis=1) if rr else np.zeros((0, 2), dtype=int)


def section_from_image(image, um_per_px: float | None = None, grid: str = "spots",
                       spot_diameter_um: float = 55.0, pitch_um: float = 100.0,
                       name: str = "image", mask: np.ndarray | None = None):
    """A :class:`~histosr.section.Section` with no measurements from an image (path, array
    or ImageSource; whole slides read lazily) at ``um_per_px`` (default: the slide's
    metadata): points on the tissue (see the module docstring). ``mask``: a tissue mask on
    the 8 um superpixel grid (default: computed, on a low pyramid level for slides)."""
    import pandas as pd

    from .geometry import grid_for
    from .image import open_image
    from .section import Section, SectionError
    from .slide import slide_um_per_px
    from .tissue import section_tissue_mask

    if grid not in GRIDS:
        raise InputError(f"grid must be one of {GRIDS}, got {grid!r}")
    img = open_image(image)
    um_per_px = slide_um_per_px(img, um_per_px)
    if not (0.1 <= float(um_per_px) <= 10.0):
        raise SectionError(f"pixel size {um_per_px!r} um/px is implausible: expected 0.1-10 "
                           "um/px (microns per pixel of the image)")
    if spot_diameter_um <= 0:
        raise InputError(f"spot_diameter_um must be > 0, got {spot_diameter_um}")
    probe = Section(name=name, image=img, um_per_px=float(um_per_px),
                    counts=empty_counts([], np.zeros((0, 2))),
                    spot_diameter_um=float(spot_diameter_um), platform="image")
    g = grid_for(probe)
    if mask is None:
        mask = section_tissue_mask(probe)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != g.shape:
        raise InputError(f"tissue mask shape {mask.shape} does not match the image's 8 um grid "
                         f"{g.shape}")
    h, w = img.shape[:2]
    if grid == "spots":
        xy, rc = hex_centres(w, h, float(um_per_px), pitch_um)
        r, c = g.cell_of_xy(xy) if len(xy) else (np.zeros(0, int), np.zeros(0, int))
        keep = mask[r, c] if len(xy) else np.zeros(0, bool)
        xy, rc = xy[keep], rc[keep]
        ids = [f"spot{a}_{b}" for a, b in rc]
        obs = pd.DataFrame({"array_row": rc[:, 0], "array_col": rc[:, 1]})
    else:
        r, c = np.nonzero(mask)
        xy = g.xy_of_cells(r, c)
        ids = [f"sp{a}_{b}" for a, b in zip(r, c)]
        obs = pd.DataFrame({"row": r.astype(np.int32), "col": c.astype(np.int32)})
    if len(xy) == 0:
        raise SectionError(f"no tissue found in the image {name!r} (or no {grid} on it): check "
                           "um_per_px and that the image is an H&E slide")
    return Section(name=name, image=img, um_per_px=float(um_per_px),
                   counts=empty_counts(ids, xy, obs), spot_diameter_um=float(spot_diameter_um),
                   platform="image", meta={"grid": grid, "pitch_um": float(pitch_um),
                                           "grid_shape": list(g.shape)})


__all__ = ["image_only_view", "section_from_image", "hex_centres", "empty_counts", "GRIDS"]
