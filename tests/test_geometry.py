import anndata as ad
import numpy as np
import pytest

from histosr.geometry import (
    Grid,
    disk_cells,
    disk_offsets,
    footprint_matrix,
    nearest_spot,
    pool_spots,
    read_calibrated,
)
from histosr.image import ArrayImage
from histosr.section import Section, SectionError, make_counts, validate


def test_disk_of_55um_spot_has_37_superpixels():
    assert len(disk_offsets(55 / 2 / 8)) == 37
    g = Grid(0.5, (1600, 1600))
    # centred on a superpixel centre: the same 37 cells
    assert len(disk_cells(g, np.array([16 * 40 + 8.0, 16 * 40 + 8.0]), 55)) == 37


def test_grid_round_trip_and_units():
    g = Grid(0.25, (4000, 3000))  # 0.25 um/px -> calibrated = half the size
    assert g.calibrated_shape == (2000, 1500)
    assert g.shape == (125, 94)
    rc = np.array([[3, 7], [10, 2]])
    xy = g.xy_of_cells(rc[:, 0], rc[:, 1])
    r, c = g.cell_of_xy(xy)
    assert (r == rc[:, 0]).all() and (c == rc[:, 1]).all()
    # superpixel (0, 0) centre: calibrated (8, 8) px = full-res (16, 16) px at 0.25 um/px
    np.testing.assert_allclose(g.xy_of_cells(np.array([0]), np.array([0])), [[16.0, 16.0]])


def test_read_calibrated_rescales_and_pads_white():
    img = np.zeros((100, 60, 3), np.uint8)
    img[:, 30:] = 200
    tile = read_calibrated(ArrayImage(img), 1.0, 0, 0, 220, 140)  # 1 um/px -> x2
    assert tile.shape == (220, 140, 3)
    assert tile[10, 10, 0] == 0 and tile[10, 100, 0] == 200
    assert (tile[210, :, :] == 255).all()  # beyond the image: white


def test_footprints_union_and_nearest_owner():
    g = Grid(0.5, (1600, 1600))
    fps = [np.array([[408.0, 408.0], [600.0, 408.0]]), np.array([[1208.0, 1208.0]])]
    F = footprint_matrix(g, fps, 55)
    assert F.shape == (2, g.shape[0] * g.shape[1])
    assert F[0].sum() == 74 and F[1].sum() == 37
    owner = nearest_spot(g, fps, F.indices)
    assert (owner[: F.indptr[1]] == 0).all() and (owner[F.indptr[1]:] == 1).all()


def _lattice_section(n=6, pitch_px=200.0):
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    xy = np.stack([cols.ravel() * pitch_px + 300, rows.ravel() * pitch_px + 300], 1)
    X = np.arange(n * n * 3, dtype=float).reshape(n * n, 3)
    import pandas as pd

    obs = pd.DataFrame({"array_row": rows.ravel(), "array_col": cols.ravel()})
    counts = make_counts(X, [f"s{i}" for i in range(n * n)], ["a", "b", "c"], xy, obs=obs)
    img = ArrayImage(np.full((n * 200 + 600, n * 200 + 600, 3), 128, np.uint8))
    return Section("t", img, 1.0, counts, 100.0, platform="st")


def test_pool_spots_sums_counts_and_keeps_members():
    s = _lattice_section()
    pooled, block = pool_spots(s, 2)
    assert pooled.n_spots == 9
    np.testing.assert_allclose(pooled.dense_counts().sum(0), s.dense_counts().sum(0))
    assert all(len(f) == 4 for f in pooled.footprints)
    first = block.index[block == pooled.counts.obs_names[0]]
    np.testing.assert_allclose(pooled.xy[0], s.counts[first].obsm["spatial"].mean(0))


def test_validate_rejects_negative_counts_and_outside_spots():
    s = _lattice_section()
    s.counts.X[0, 0] = -1
    with pytest.raises(SectionError, match="negative"):
        validate(s)
    s = _lattice_section()
    s.counts.obsm["spatial"][0] = [1e5, 10]
    with pytest.raises(SectionError, match="outside"):
        validate(s)
    assert isinstance(s.counts, ad.AnnData)
