"""Calibration, the 8 um superpixel grid, spot disks and footprints, lattices, pooling.

Units: full-resolution px (the input image), calibrated px (0.5 um/px), superpixels
(16 calibrated px = 8 um). Coordinates are x = column, y = row; grid indices are
(row, col). Superpixel (r, c) covers calibrated px rows 16r..16r+15, cols 16c..16c+15; its
centre is at calibrated (x, y) = (16c + 8, 16r + 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

TARGET_UM_PER_PX = 0.5
SP_PX = 16
SP_UM = TARGET_UM_PER_PX * SP_PX  # 8 um


@dataclass(frozen=True)
class Grid:
    """The superpixel grid of one image.

    ``um_per_px`` is the full-resolution pixel size; ``scale`` converts full-resolution px
    to calibrated px; ``shape`` = (rows, cols) in superpixels.
    """

    um_per_px: float
    image_shape: tuple[int, int]  # full-resolution (H, W) px

    @property
    def scale(self) -> float:
        return self.um_per_px / TARGET_UM_PER_PX

    @property
    def calibrated_shape(self) -> tuple[int, int]:
        h, w = self.image_shape
        return int(round(h * self.scale)), int(round(w * self.scale))

    @property
    def shape(self) -> tuple[int, int]:
        h, w = self.calibrated_shape
        return -(-h // SP_PX), -(-w // SP_PX)

    @property
    def sp_per_px(self) -> float:
        """Superpixels per full-resolution px."""
        return self.scale / SP_PX

    def sp_of_xy(self, xy: np.ndarray) -> np.ndarray:
        """Continuous (row, col) superpixel coordinates of full-res points (x, y);
        integer values are superpixel centres."""
        xy = np.asarray(xy, dtype=np.float64)
        s = self.sp_per_px
        return np.stack([xy[:, 1] * s - 0.5, xy[:, 0] * s - 0.5], axis=1)

    def cell_of_xy(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, col) integer index of the superpixel containing each point."""
        rc = np.floor(self.sp_of_xy(xy) + 0.5).astype(np.int64)
        h, w = self.shape
        return np.clip(rc[:, 0], 0, h - 1), np.clip(rc[:, 1], 0, w - 1)

    def xy_of_cells(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Full-res (x, y) px of superpixel centres."""
        s = self.sp_per_px
        rows = np.asarray(rows, dtype=np.float64)
        cols = np.asarray(cols, dtype=np.float64)
        return np.stack([(cols + 0.5) / s, (rows + 0.5) / s], axis=1)

    def flat(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.asarray(rows, dtype=np.int64) * self.shape[1] + np.asarray(cols, np.int64)

    def unflat(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(idx, dtype=np.int64)
        return idx // self.shape[1], idx % self.shape[1]

    def radius_sp(self, diameter_um: float) -> float:
        return diameter_um / 2.0 / SP_UM


def grid_for(section) -> Grid:
    """The superpixel grid of a :class:`~histosr.section.Section`."""
    h, w = section.image.shape[:2]
    return Grid(float(section.um_per_px), (int(h), int(w)))


def read_calibrated(image, um_per_px: float, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Region of the image rescaled to 0.5 um/px: ``h`` x ``w`` calibrated px at calibrated
    (row y0, column x0). Bilinear with anti-aliasing (PIL), white outside the image; reads
    only the pixels it needs, so whole slides stream tile by tile. On a pyramid (slides) it
    reads the coarsest level that is still at least 0.5 um/px fine."""
    from PIL import Image

    scale = um_per_px / TARGET_UM_PER_PX
    if abs(scale - 1.0) < 1e-9:
        return image.read(y0, x0, h, w)
    level = image.best_level(1.0 / scale) if scale < 1.0 else 0
    if level:
        ds = image.level_downsamples[level]
        scale = scale * ds  # calibrated px per px of that level
        if abs(scale - 1.0) < 1e-9:
            return image.read_level(level, y0, x0, h, w)
    fy0, fx0 = y0 / scale, x0 / scale
    fy1, fx1 = (y0 + h) / scale, (x0 + w) / scale
    margin = int(np.ceil(2.0 / min(scale, 1.0))) + 1
    ry0, rx0 = int(np.floor(fy0)) - margin, int(np.floor(fx0)) - margin
    ry1, rx1 = int(np.ceil(fy1)) + margin, int(np.ceil(fx1)) + margin
    raw = image.read_level(level, ry0, rx0, ry1 - ry0, rx1 - rx0)
    box = (fx0 - rx0, fy0 - ry0, fx1 - rx0, fy1 - ry0)
    im = Image.fromarray(raw).resize((w, h), Image.BILINEAR, box=box)
    return np.asarray(im)


def disk_offsets(radius_sp: float) -> np.ndarray:
    """(k, 2) integer (drow, dcol) offsets of superpixels whose centre lies within
    ``radius_sp`` of a superpixel centre (iStar's disk: 37 cells for a 55 um spot)."""
    r = int(np.ceil(radius_sp))
    d = np.arange(-r, r + 1)
    dr, dc = np.meshgrid(d, d, indexing="ij")
    keep = dr**2 + dc**2 <= radius_sp**2
    return np.stack([dr[keep], dc[keep]], axis=1)


def disk_cells(grid: Grid, center_xy: np.ndarray, diameter_um: float) -> np.ndarray:
    """Flat grid indices of superpixels whose centre lies within the disk of
    ``diameter_um`` around the full-res point ``center_xy`` (x, y). At least the cell
    containing the centre is returned."""
    rad = grid.radius_sp(diameter_um)
    rc = grid.sp_of_xy(np.asarray(center_xy, dtype=np.float64).reshape(1, 2))[0]
    r0, r1 = int(np.floor(rc[0] - rad)), int(np.ceil(rc[0] + rad))
    c0, c1 = int(np.floor(rc[1] - rad)), int(np.ceil(rc[1] + rad))
    h, w = grid.shape
    rr, cc = np.meshgrid(np.arange(max(r0, 0), min(r1, h - 1) + 1),
                         np.arange(max(c0, 0), min(c1, w - 1) + 1), indexing="ij")
    keep = (rr - rc[0]) ** 2 + (cc - rc[1]) ** 2 <= rad**2
    if not keep.any():
        r, c = grid.cell_of_xy(np.asarray(center_xy, dtype=np.float64).reshape(1, 2))
        return grid.flat(r, c)
    return grid.flat(rr[keep], cc[keep])


def footprint_matrix(
    grid: Grid, footprints: list[np.ndarray], diameter_um: float
) -> sp.csr_matrix:
    """Sparse (n_spots, n_superpixels_in_grid) 0/1 matrix: spot i covers superpixel j when
    j's centre lies inside any disk of ``diameter_um`` centred at ``footprints[i]`` (k, 2)
    full-res (x, y) points."""
    indptr, indices = [0], []
    for centres in footprints:
        cells = np.unique(np.concatenate([disk_cells(grid, c, diameter_um) for c in centres]))
        indices.append(cells)
        indptr.append(indptr[-1] + len(cells))
    idx = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    n = grid.shape[0] * grid.shape[1]
    return sp.csr_matrix(
        (np.ones(len(idx), np.float32), idx, np.asarray(indptr)), shape=(len(footprints), n)
    )


def section_footprints(section, grid: Grid | None = None) -> sp.csr_matrix:
    """Footprint matrix of a section's own (pseudo-)spots."""
    grid = grid or grid_for(section)
    return footprint_matrix(grid, section.spot_footprints(), section.spot_diameter_um)


def nearest_spot(grid: Grid, footprints: list[np.ndarray], flat_cells: np.ndarray) -> np.ndarray:
    """For each superpixel, the index of the spot owning the nearest footprint disk centre."""
    centres = np.concatenate(footprints)
    owner = np.concatenate([np.full(len(f), i) for i, f in enumerate(footprints)])
    r, c = grid.unflat(flat_cells)
    _, j = cKDTree(centres).query(grid.xy_of_cells(r, c))
    return owner[j]


def lattice_pitch(xy: np.ndarray) -> float:
    """Spot pitch (px): median nearest-neighbour distance."""
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def pool_spots(section, factor: int = 2):
    """Pool native spots into ``factor`` x ``factor`` blocks of array coordinates
    (``(array_col // f, array_row // f)``; the P2 protocol). A pseudo-spot's counts are the
    sum of its members' raw counts, its position the mean of theirs, its footprint the
    union of the members' disks. Returns ``(pooled_section, block_of_native)`` where
    ``block_of_native`` maps each native spot id to its pseudo-spot id."""
    import dataclasses

    import pandas as pd

    from .section import SectionError, make_counts

    obs = section.counts.obs
    if "array_row" not in obs or "array_col" not in obs:
        raise SectionError(
            "pooling needs lattice coordinates: obs columns 'array_row' and 'array_col'"
        )
    bx = (obs["array_col"].to_numpy() // factor).astype(int)
    by = (obs["array_row"].to_numpy() // factor).astype(int)
    block = pd.Series([f"{a}x{b}" for a, b in zip(bx, by)], index=section.counts.obs_names)
    ids = sorted(block.unique(), key=lambda s: tuple(int(v) for v in s.split("x")))
    member = {b: np.flatnonzero(block.to_numpy() == b) for b in ids}
    X = section.counts.X
    rows = [np.asarray(X[m].sum(axis=0)).ravel() for m in member.values()]
    xy = section.xy
    pxy = np.stack([xy[m].mean(axis=0) for m in member.values()])
    pobs = pd.DataFrame(
        {"array_col": [int(b.split("x")[0]) for b in ids],
         "array_row": [int(b.split("x")[1]) for b in ids],
         "n_members": [len(m) for m in member.values()]},
    )
    counts = make_counts(np.stack(rows), ids, section.genes, pxy, obs=pobs)
    pooled = dataclasses.replace(
        section,
        name=f"{section.name}_pooled{factor}",
        counts=counts,
        footprints=[xy[m] for m in member.values()],
        annotations=None,
        meta={**section.meta, "pooled_from": section.name, "pool_factor": factor},
    )
    return pooled, block
