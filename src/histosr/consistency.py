"""Mass-preserving consistency (soScope-style), shared by every super-resolution method.

For each measured (pseudo-)spot and gene, the predicted counts summed over its footprint
are rescaled to equal the measured counts: a superpixel inside a footprint takes that
footprint's factor (measured / predicted sum), so every footprint sum is exact.

Between footprints the factor field is interpolated like the expression itself, not
copied from the nearest spot (which tiles every map into spot-pitch blocks, an artefact):
inverse-distance weighting (power 2) over the ``K_SPOTS`` nearest footprints, the distance
measured to each footprint's nearest disk EDGE, so the field meets each footprint's own
factor at its border and is continuous everywhere. Everything is local to a block of
superpixels, so the step streams over a whole slide.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from .arrays import ROW_BLOCK
from .geometry import SP_PX, Grid, section_footprints

# Added to every superpixel's prediction before scaling (relative to the mean predicted
# value per superpixel): a spot whose prediction is all zero still receives its measured
# mass, spread evenly, instead of losing it.
FLOOR = 1e-3
#: footprints whose factors are interpolated between footprints
K_SPOTS = 6
#: inverse-distance power (Shepard's choice: continuous, nearest dominate)
POWER = 2.0
#: superpixels predicted at once when the prediction is summed or streamed (x genes x 8 B)
CELL_BLOCK = 8192
#: spots per block of the factor computation
_SPOT_BLOCK = ROW_BLOCK


class _MeasuredRows:
    """A section's measured counts of ``genes`` as float64, read a block of spots per row
    slice (no whole spots x genes float64 copy: 172 MB for 21,540 spots x 1000 genes)."""

    def __init__(self, section, genes):
        self.section, self.genes = section, list(genes)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.section.dense_counts(self.genes, rows)


@dataclass
class ConsistencyScaler:
    grid: Grid
    footprints: list
    factors: np.ndarray  # (n_spots, G)
    floor: np.ndarray  # (G,)
    diameter_um: float | None = None
    inside: np.ndarray | None = None  # sorted flat cells covered by a footprint
    _tree: cKDTree | None = field(default=None, init=False, repr=False)
    _owner: np.ndarray | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_method(cls, method, section, features, calibrator=None,
                    block: int | None = None) -> ConsistencyScaler:
        """Factors of ``method``'s prediction at the section's measured spots (after
        ``calibrator``, a :class:`histosr.calibration.DetailCalibrator`, when given),
        predicted ``block`` superpixels at a time (default :data:`CELL_BLOCK`): memory is
        bounded by the block, not by the cells the spots cover."""
        from .arrays import add_sparse_product

        block = block or CELL_BLOCK
        grid = features.grid
        F = section_footprints(section, grid)
        cells = np.unique(F.indices)
        Fc = F[:, cells].tocsc()
        sums = np.zeros((F.shape[0], len(method.genes_)))
        total = np.zeros(len(method.genes_))
        for i in range(0, len(cells), block):
            blk = cells[i : i + block]
            pred = np.asarray(method._predict_cells(section, features, blk), dtype=np.float32)
            if calibrator is not None:
                pred = calibrator.apply(pred, blk)
            pred = pred.astype(np.float64)
            add_sparse_product(sums, Fc[:, i : i + block], pred)
            total += pred.sum(axis=0)
        measured = _MeasuredRows(section, method.genes_)  # read a block at a time
        return cls._from_sums(grid, section.spot_footprints(), sums,
                              total / max(len(cells), 1), np.asarray(Fc.sum(axis=1)).ravel(),
                              measured, section.spot_diameter_um, cells)

    @classmethod
    def fit(cls, grid, footprints, F, pred, measured, diameter_um: float | None = None,
            inside: np.ndarray | None = None) -> ConsistencyScaler:
        """``F`` (n_spots, n_cells) footprint matrix over the cells of ``pred`` (n_cells, G);
        ``inside``: the flat indices of those cells (the footprints' union)."""
        pred = np.asarray(pred, dtype=np.float64)
        return cls._from_sums(grid, footprints, np.asarray(F @ pred), pred.mean(axis=0),
                              np.asarray(F.sum(axis=1)).ravel(), measured, diameter_um, inside)

    @classmethod
    def _from_sums(cls, grid, footprints, sums, mean, n_cells, measured, diameter_um,
                   inside) -> ConsistencyScaler:
        """From each footprint's predicted sums (n_spots, G), the mean predicted value per
        superpixel (G,) and each footprint's number of superpixels (n_spots,); ``measured``:
        (n_spots, G) counts, anything whose row slices give float64 arrays."""
        # a gene predicted as zero everywhere gets a flat floor (any constant: it is rescaled)
        floor = np.where(mean > 1e-8, FLOOR * mean, 1.0)
        # in blocks of spots: no (spots x genes) float64 temporaries (172 MB each on a
        # 21,540-spot slide), same values
        factors = np.empty(sums.shape, dtype=np.float32)
        for a in range(0, len(sums), _SPOT_BLOCK):
            b = a + _SPOT_BLOCK
            s = sums[a:b] + n_cells[a:b, None] * floor[None, :]  # = F @ (pred + floor)
            factors[a:b] = measured[a:b] / np.maximum(s, 1e-12)
        return cls(grid, footprints, factors, floor.astype(np.float32),
                   diameter_um, None if inside is None else np.sort(np.asarray(inside)))

    def _disks(self):
        if self._tree is None:
            centres = np.concatenate(self.footprints)
            self._owner = np.concatenate([np.full(len(f), i) for i, f in
                                          enumerate(self.footprints)])
            self._tree = cKDTree(centres)
        return self._tree, self._owner

    def field(self, flat_cells: np.ndarray) -> np.ndarray:
        """(n_cells, G) scale factors at flat cells (see the module docstring)."""
        tree, owner = self._disks()
        flat_cells = np.asarray(flat_cells, dtype=np.int64)
        r, c = self.grid.unflat(flat_cells)
        xy = self.grid.xy_of_cells(r, c)
        out = np.empty((len(flat_cells), self.factors.shape[1]), dtype=np.float32)
        _, j = tree.query(xy)
        own = owner[np.asarray(j).reshape(-1)]
        inside = np.ones(len(flat_cells), bool) if self.inside is None or \
            self.diameter_um is None else _member(self.inside, flat_cells)
        out[inside] = self.factors[own[inside]]
        if (~inside).any():
            out[~inside] = self._between(xy[~inside], tree, owner)
        return out

    def _between(self, xy: np.ndarray, tree, owner) -> np.ndarray:
        px_per_sp = SP_PX / self.grid.scale
        radius = self.diameter_um / 2.0 / self.grid.um_per_px
        k = int(min(len(owner), 4 * K_SPOTS))
        d, j = tree.query(xy, k=k)
        d, j = np.asarray(d).reshape(len(xy), k), np.asarray(j).reshape(len(xy), k)
        spot = owner[j]
        # each footprint counts once, at its nearest disk (queries come sorted by distance)
        first = np.ones(spot.shape, bool)
        for a in range(1, k):
            first[:, a] = ~(spot[:, :a] == spot[:, a : a + 1]).any(axis=1)
        rank = np.cumsum(first, axis=1)
        use = first & (rank <= K_SPOTS)
        edge = np.maximum(d - radius, 0.0) + 0.5 * px_per_sp
        w = np.where(use, edge ** -POWER, 0.0)
        w /= w.sum(axis=1, keepdims=True)
        out = np.zeros((len(xy), self.factors.shape[1]), dtype=np.float64)
        for a in range(k):
            if use[:, a].any():
                out += w[:, a, None] * self.factors[spot[:, a]]
        return out.astype(np.float32)

    def apply(self, values: np.ndarray, flat_cells: np.ndarray) -> np.ndarray:
        return ((values + self.floor) * self.field(flat_cells)).astype(np.float32)


def _member(sorted_cells: np.ndarray, cells: np.ndarray) -> np.ndarray:
    i = np.searchsorted(sorted_cells, cells)
    i = np.minimum(i, len(sorted_cells) - 1)
    return sorted_cells[i] == cells if len(sorted_cells) else np.zeros(len(cells), bool)
