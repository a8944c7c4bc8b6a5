"""Mass-preserving consistency (soScope-style), shared by every super-resolution method.

For each measured (pseudo-)spot and gene, the predicted counts summed over its footprint
are rescaled to equal the measured counts. Each superpixel takes the factor of the spot
owning the nearest footprint disk centre (inside a footprint that is the footprint's own
spot), so the step streams block by block over a whole slide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import Grid, nearest_spot, section_footprints

# Added to every superpixel's prediction before scaling (relative to the mean predicted
# value per superpixel): a spot whose prediction is all zero still receives its measured
# mass, spread evenly, instead of losing it.
FLOOR = 1e-3


@dataclass
class ConsistencyScaler:
    grid: Grid
    footprints: list
    factors: np.ndarray  # (n_spots, G)
    floor: np.ndarray  # (G,)

    @classmethod
    def from_method(cls, method, section, features) -> ConsistencyScaler:
        grid = features.grid
        F = section_footprints(section, grid)
        cells = np.unique(F.indices)
        pred = np.asarray(method._predict_cells(section, features, cells), dtype=np.float64)
        measured = section.dense_counts(method.genes_)
        return cls.fit(grid, section.spot_footprints(), F[:, cells], pred, measured)

    @classmethod
    def fit(cls, grid, footprints, F, pred, measured) -> ConsistencyScaler:
        """``F`` (n_spots, n_cells) footprint matrix over the cells of ``pred`` (n_cells, G)."""
        mean = pred.mean(axis=0)
        # a gene predicted as zero everywhere gets a flat floor (any constant: it is rescaled)
        floor = np.where(mean > 1e-8, FLOOR * mean, 1.0)
        sums = np.asarray(F @ (pred + floor))
        factors = measured / np.maximum(sums, 1e-12)
        return cls(grid, footprints, factors.astype(np.float32), floor.astype(np.float32))

    def apply(self, values: np.ndarray, flat_cells: np.ndarray) -> np.ndarray:
        owner = nearest_spot(self.grid, self.footprints, flat_cells)
        return ((values + self.floor) * self.factors[owner]).astype(np.float32)
