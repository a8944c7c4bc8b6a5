"""``Section``: one tissue section (image + spots + counts) and its validation.

Coordinates are full-resolution image pixels, x = column, y = row (the scanpy/squidpy
``obsm["spatial"]`` convention). Readers build a Section and call :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .image import ImageSource

# Spot pitch (centre to centre, um) of platforms whose lattice is fixed by the slide.
PLATFORM_PITCH_UM = {"visium": 100.0, "st": 200.0}
PLATFORM_DIAMETER_UM = {"visium": 55.0, "st": 100.0}


class SectionError(InputError):
    """Invalid input data; the message says what was expected and how to fix it."""


@dataclass
class Section:
    """One tissue section.

    Attributes
    ----------
    name: section identifier (e.g. ``"C2"``).
    image: lazy image handle (full resolution, RGB uint8).
    um_per_px: microns per full-resolution pixel.
    counts: AnnData, spots x genes, raw counts in ``X``; ``obs_names`` are spot ids;
        ``obsm["spatial"]`` = (x, y) full-resolution px (float); optional ``obs``
        columns ``array_row``/``array_col`` (lattice indices).
    spot_diameter_um: measured spot diameter in um (Visium 55, legacy ST 100).
    platform: ``"visium"``, ``"st"``, ``"visium_hd"``, ``"xenium"``, ``"synthetic"``, ...
    footprints: optional per-spot list of (k, 2) arrays of disk centres (x, y px): a spot's
        footprint is the union of disks of ``spot_diameter_um`` around them (pooled
        pseudo-spots). ``None`` means one disk at the spot centre.
    truth: optional ground truth at 8 um: dict with ``"cube"`` (H_sp, W_sp, G) counts per
        superpixel on the calibrated 16 px grid, ``"genes"`` and ``"mask"`` (H_sp, W_sp).
    annotations: optional per-spot labels (pd.Series indexed by spot id).
    """

    name: str
    image: ImageSource
    um_per_px: float
    counts: ad.AnnData
    spot_diameter_um: float
    platform: str = "unknown"
    footprints: list[np.ndarray] | None = None
    truth: dict[str, Any] | None = None
    annotations: pd.Series | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return self.counts.n_obs

    @property
    def xy(self) -> np.ndarray:
        """Spot centres, (n_spots, 2) float, x = column px, y = row px."""
        return np.asarray(self.counts.obsm["spatial"], dtype=np.float64)

    @property
    def genes(self) -> list[str]:
        return list(self.counts.var_names)

    @property
    def spot_radius_px(self) -> float:
        return self.spot_diameter_um / 2.0 / self.um_per_px

    def dense_counts(self, genes: list[str] | None = None, rows=None) -> np.ndarray:
        """Raw counts as a dense float64 array (spots x genes); ``rows``: only those spots
        (a slice or integer positions), e.g. a block of a whole slide's spots."""
        from .arrays import columns, dense

        counts = self.counts if rows is None else self.counts[rows]
        return dense(counts.X) if genes is None else columns(counts, genes)

    def spot_footprints(self) -> list[np.ndarray]:
        """Per spot, the (k, 2) disk centres whose union is its footprint."""
        if self.footprints is not None:
            return self.footprints
        return [p[None, :] for p in self.xy]

    def __repr__(self) -> str:
        h, w = self.image.shape[:2]
        return (
            f"Section({self.name!r}, platform={self.platform!r}, {self.n_spots} spots x "
            f"{self.counts.n_vars} genes, image {w}x{h} px at {self.um_per_px:.3f} um/px, "
            f"spot {self.spot_diameter_um:g} um)"
        )


def take_spots(section: Section, keep, name: str | None = None) -> Section:
    """The section restricted to the spots at integer positions ``keep`` (same image; their
    footprints and annotations follow), named ``name`` (default the section's name)."""
    import dataclasses

    keep = np.asarray(keep, dtype=np.int64)
    fps = None if section.footprints is None else [section.footprints[i] for i in keep]
    ann = None if section.annotations is None else section.annotations.iloc[keep]
    return dataclasses.replace(section, name=section.name if name is None else name,
                               counts=section.counts[keep].copy(), footprints=fps,
                               annotations=ann)


def estimate_pitch_px(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance between spot centres, in px."""
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        raise SectionError("need at least 2 spots to estimate the spot pitch")
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def check_pixel_size(
    um_per_px: float | None,
    xy: np.ndarray,
    platform: str,
    *,
    source: str = "metadata",
    tolerance: float = 0.15,
) -> float:
    """Return the pixel size (um/px), estimated from the spot pitch and cross-checked.

    ``um_per_px`` is the value from platform metadata (or the user); ``None`` means
    estimate it from the pitch. A relative mismatch above ``tolerance`` is an error that
    names both values.
    """
    pitch_um = PLATFORM_PITCH_UM.get(platform)
    est = None
    if pitch_um is not None and len(xy) >= 2:
        est = pitch_um / estimate_pitch_px(xy)
    if um_per_px is None:
        if est is None:
            raise SectionError(
                f"pixel size unknown for platform {platform!r}: pass um_per_px (microns per "
                "full-resolution pixel, typically 0.2-1.0 for a microscope H&E)"
            )
        um_per_px = est
    um_per_px = float(um_per_px)
    if not (0.1 <= um_per_px <= 10.0) or not np.isfinite(um_per_px):
        raise SectionError(
            f"pixel size {um_per_px!r} um/px from {source} is implausible: expected 0.1-10 "
            "um/px. Check the value (microns per pixel, not pixels per micron)."
        )
    if est is not None and abs(um_per_px - est) / est > tolerance:
        raise SectionError(
            f"pixel size {um_per_px:.4f} um/px from {source} disagrees with the spot pitch: "
            f"spots are {estimate_pitch_px(xy):.1f} px apart, which for {platform} "
            f"({pitch_um:g} um pitch) means {est:.4f} um/px. Either the {source} value is wrong "
            "or the spot coordinates belong to a differently scaled image (e.g. hires vs "
            "full resolution)."
        )
    return um_per_px


def validate(section: Section) -> Section:
    """Check a Section; raise :class:`SectionError` with a specific message when invalid."""
    c = section.counts
    if c.n_obs == 0:
        raise SectionError(
            f"section {section.name!r} has no spots (empty tissue): expected at least one "
            "in-tissue spot with counts"
        )
    if c.n_vars == 0:
        raise SectionError(f"section {section.name!r} has no genes")
    if not c.obs_names.is_unique:
        dup = c.obs_names[c.obs_names.duplicated()].unique()[:5].tolist()
        raise SectionError(
            f"duplicated spot ids in section {section.name!r}: {dup}. Each spot id must "
            "appear once."
        )
    if not c.var_names.is_unique:
        dup = c.var_names[c.var_names.duplicated()].unique()[:5].tolist()
        raise SectionError(f"duplicated gene names in section {section.name!r}: {dup}")
    if any((not isinstance(g, str)) or g.strip() == "" for g in c.var_names):
        raise SectionError(f"empty or non-text gene names in section {section.name!r}")
    if "spatial" not in c.obsm:
        raise SectionError('counts need obsm["spatial"] with (x, y) pixel coordinates')
    xy = np.asarray(c.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or not np.isfinite(xy).all():
        raise SectionError('obsm["spatial"] must be finite (n_spots, 2) x, y pixel coordinates')
    h, w = section.image.shape[:2]
    out = (xy[:, 0] < 0) | (xy[:, 0] >= w) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
    if out.any():
        bad = c.obs_names[out][:3].tolist()
        swapped = (
            (xy[:, 1] >= 0).all() and (xy[:, 1] < w).all() and (xy[:, 0] >= 0).all()
            and (xy[:, 0] < h).all()
        )
        hint = (
            " The coordinates fit if x and y are swapped: x must be the image column and y "
            "the row." if swapped else " Check the pixel scale of the coordinates (full "
            "resolution vs a downscaled image)."
        )
        raise SectionError(
            f"{int(out.sum())} of {len(xy)} spots lie outside the {w}x{h} px image (e.g. "
            f"{bad} at {xy[out][0].round(1).tolist()}).{hint}"
        )
    x = c.X
    vals = x.data if sp.issparse(x) else np.asarray(x)
    if vals.size and not np.isfinite(vals).all():
        raise SectionError("counts contain NaN or infinite values: expected raw counts")
    if vals.size and vals.min() < 0:
        raise SectionError(
            f"counts contain negative values (min {vals.min():g}): expected raw, "
            "non-negative counts (not log-normalised or scaled data)"
        )
    if not (section.spot_diameter_um > 0):
        raise SectionError(f"spot diameter must be > 0 um, got {section.spot_diameter_um!r}")
    if not (0.1 <= section.um_per_px <= 10.0):
        raise SectionError(
            f"pixel size {section.um_per_px!r} um/px is implausible: expected 0.1-10 um/px"
        )
    return section


def make_counts(
    X: np.ndarray | sp.spmatrix,
    spot_ids: list[str] | pd.Index,
    genes: list[str] | pd.Index,
    xy: np.ndarray,
    obs: pd.DataFrame | None = None,
) -> ad.AnnData:
    """Build the counts AnnData (spots x genes) with ``obsm["spatial"]`` = (x, y) px."""
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32)
    else:
        X = np.asarray(X, dtype=np.float32)
    obs = pd.DataFrame(index=pd.Index([str(s) for s in spot_ids])) if obs is None else obs.copy()
    obs.index = pd.Index([str(s) for s in spot_ids])
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index([str(g) for g in genes])))
    a.obsm["spatial"] = np.asarray(xy, dtype=np.float64)
    return a
