"""``FeatureMap``: per-superpixel features on the calibrated 8 um grid, in chunked zarr."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..geometry import Grid

# Stored feature bytes read at once by FeatureMap.gather (whole slides: bounded reads).
_GATHER_BYTES = 2**24


@dataclass
class FeatureMap:
    """Features (H_sp, W_sp, D) (zarr or numpy, fp16 by default) + tissue mask (H_sp, W_sp).

    ``grid`` ties the map to the full-resolution image of its section; ``encoder`` names the
    encoder (and ``meta`` holds its parameters / weights hash).
    """

    features: object  # zarr.Array or np.ndarray, (H_sp, W_sp, D)
    mask: np.ndarray  # bool (H_sp, W_sp)
    grid: Grid
    encoder: str
    meta: dict
    path: str | None = None

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.features.shape[:2])  # type: ignore[return-value]

    def gather(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """float32 features of superpixels (rows, cols), in the order given. Reads only the
        bounding box of the requested cells, chunk by chunk for large requests."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if len(rows) == 0:
            return out
        if isinstance(self.features, np.ndarray):
            out[:] = self.features[rows, cols]
            return out
        band = self._gather_band()
        order = np.argsort(rows, kind="stable")
        rs = rows[order]
        starts = np.searchsorted(rs, np.arange(rs[0], rs[-1] + 1 + band, band))
        for a, b in zip(starts[:-1], starts[1:]):
            if a == b:
                continue
            sel = order[a:b]
            r0, r1 = rows[sel].min(), rows[sel].max() + 1
            c0, c1 = cols[sel].min(), cols[sel].max() + 1
            block = np.asarray(self.features[r0:r1, c0:c1])
            out[sel] = block[rows[sel] - r0, cols[sel] - c0]
        return out

    def _gather_band(self) -> int:
        """Superpixel rows per read of :meth:`gather`: a whole number of zarr chunk rows
        holding about ``_GATHER_BYTES`` of stored features over the full width (a fixed
        256 rows read 80 MB at a time on a 40,000 px slide)."""
        W = self.features.shape[1]
        row_bytes = max(1, W * self.dim * np.dtype(self.features.dtype).itemsize)
        band = max(1, _GATHER_BYTES // row_bytes)
        step = int(getattr(self.features, "chunks", (1,))[0] or 1)
        return max(step, band // step * step)

    def tissue_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) of tissue superpixels, row-major."""
        r, c = np.nonzero(self.mask)
        return r, c

    def save(self, path: str | Path) -> FeatureMap:
        """Write to a zarr folder (atomically: a temp folder renamed at the end)."""
        import shutil

        import zarr

        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        root = zarr.open_group(str(tmp), mode="w")
        h, w, d = self.features.shape
        arr = _create(root, "features", (h, w, d), (min(h, 256), min(w, 256), d), "f2")
        for r0 in range(0, h, 256):
            arr[r0 : r0 + 256] = np.asarray(self.features[r0 : r0 + 256], dtype=np.float16)
        m = _create(root, "mask", (h, w), (min(h, 1024), min(w, 1024)), "bool")
        m[:] = self.mask
        root.attrs["histosr"] = json.dumps(self._attrs())
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return FeatureMap.load(path)

    def _attrs(self) -> dict:
        return {
            "encoder": self.encoder,
            "meta": self.meta,
            "um_per_px": self.grid.um_per_px,
            "image_shape": list(self.grid.image_shape),
        }

    @classmethod
    def load(cls, path: str | Path) -> FeatureMap:
        import zarr

        root = zarr.open_group(str(path), mode="r")
        a = json.loads(root.attrs["histosr"])
        grid = Grid(float(a["um_per_px"]), tuple(a["image_shape"]))
        return cls(root["features"], np.asarray(root["mask"][:], dtype=bool), grid,
                   a["encoder"], a["meta"], str(path))


def grid_only(section, mask: np.ndarray | None = None) -> FeatureMap:
    """A FeatureMap with no feature channels: the section's superpixel grid and a tissue
    mask (default: superpixels covered by the section's spot footprints), for methods that
    read no image features (``needs_features`` False)."""
    from ..geometry import grid_for, section_footprints

    grid = grid_for(section)
    if mask is None:
        F = section_footprints(section, grid)
        mask = np.zeros(grid.shape[0] * grid.shape[1], dtype=bool)
        mask[F.indices] = True
        mask = mask.reshape(grid.shape)
    return FeatureMap(np.zeros((*grid.shape, 0), dtype=np.float16), np.asarray(mask, bool),
                      grid, "none", {"note": "grid only: the method reads no image features"})


def _create(group, name, shape, chunks, dtype):
    """zarr v2/v3 compatible array creation."""
    try:
        return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype)
    except AttributeError:
        return group.create_dataset(name, shape=shape, chunks=chunks, dtype=dtype)


def create_zarr_array(group, name, shape, chunks, dtype):
    """Public helper: create a chunked array in a zarr group (zarr 2 or 3)."""
    return _create(group, name, shape, chunks, dtype)
