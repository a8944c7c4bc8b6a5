"""High-density pseudo-spots on square, hexagonal, brick and pooled lattices."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from histosr.image import ArrayImage
from histosr.lattice import hr_from_values, hr_pseudospots, infer_lattice
from histosr.section import Section, make_counts
from histosr.simulate import pseudo_visium_centres


def _nn(xy):
    d, _ = cKDTree(xy).query(xy, k=2)
    return d[:, 1]


def _linear(xy):
    return np.stack([xy[:, 0] / 100.0, 3.0 + xy[:, 1] / 50.0], axis=1)


def test_square_lattice_half_pitch_exact():
    a, b = np.meshgrid(np.arange(5), np.arange(4))
    xy = np.stack([a.ravel() * 200.0 + 30.5, b.ravel() * 200.0 + 50.25], axis=1)
    hxy, hv, info = hr_from_values(xy, _linear(xy))
    lat = info["lattice"]
    assert not lat.checkerboard and lat.pitch == pytest.approx(200.0)
    assert len(hxy) == 9 * 7  # (2*5 - 1) x (2*4 - 1): nothing outside the measured area
    np.testing.assert_allclose(_nn(hxy), 100.0, rtol=1e-9)  # exact half pitch, float
    # measured spots kept with their own position and value; bilinear = exact on a plane
    m = info["measured"]
    assert m.sum() == len(xy)
    np.testing.assert_allclose(hxy[m], xy[info["spot"][m]])
    np.testing.assert_allclose(hv, _linear(hxy), rtol=1e-5)


def test_square_isolated_and_single_neighbour_positions_dropped():
    a, b = np.meshgrid(np.arange(4), np.arange(4))
    xy = np.stack([a.ravel() * 200.0, b.ravel() * 200.0], axis=1)
    xy = np.concatenate([xy, [[1400.0, 1400.0]]])  # an isolated spot on the lattice
    hxy, hv, info = hr_from_values(xy, np.ones((len(xy), 1)))
    iso = np.linalg.norm(hxy - [1400.0, 1400.0], axis=1)
    # the isolated spot is kept itself, but no interpolated position comes from it alone
    assert (iso < 1e-6).sum() == 1 and (iso[iso > 1e-6] > 500).all()
    assert len(hxy) == 7 * 7 + 1
    assert (info["n_measured"][~info["measured"]] >= 2).all()


def test_hex_visium_lattice_from_array_and_from_coordinates():
    rows, cols = np.meshgrid(np.arange(6), np.arange(12), indexing="ij")
    keep = (rows + cols) % 2 == 0  # Visium: array_col steps by 2 along a row
    r, c = rows[keep], cols[keep]
    xy = np.stack([c * 50.0 + 10.0, r * 50.0 * np.sqrt(3) + 20.0], axis=1)
    hxy, hv, info = hr_from_values(xy, _linear(xy), np.stack([c, r], axis=1))
    lat = info["lattice"]
    assert lat.checkerboard and lat.source == "array"
    assert lat.pitch == pytest.approx(100.0)
    np.testing.assert_allclose(_nn(hxy), 50.0, rtol=1e-9)
    assert info["measured"].sum() == len(xy)
    np.testing.assert_allclose(hv, _linear(hxy), rtol=1e-5)
    # every interpolated position is the midpoint of two measured spots 100 um apart
    d, _ = cKDTree(xy).query(hxy[~info["measured"]], k=2)
    np.testing.assert_allclose(d, 50.0, rtol=1e-9)
    # ~4x the density inside; the same set when the lattice is inferred from coordinates
    assert 3.0 < len(hxy) / len(xy) < 4.0
    hxy2, _, info2 = hr_from_values(xy, _linear(xy))
    assert info2["lattice"].source == "coordinates" and info2["lattice"].checkerboard
    np.testing.assert_allclose(np.sort(hxy2, axis=0), np.sort(hxy, axis=0), atol=1e-6)


def test_brick_pseudo_visium_lattice():
    xy_um, arr = pseudo_visium_centres(1000.0, 800.0)
    xy = xy_um / 0.5
    hxy, _, info = hr_from_values(xy, np.ones((len(xy), 2)), arr[:, ::-1])
    assert info["lattice"].checkerboard
    # columns 100 um apart, spots 100 um apart in a column, odd columns offset 50 um:
    # HR positions every 50 um down each column, and midway (x + 50 um, y + 25 um) on the
    # diagonal edges between columns
    um = hxy * 0.5
    assert set(np.round(np.diff(np.unique(np.round(um[:, 0], 6))), 6)) == {50.0}
    assert set(np.round(np.diff(np.unique(np.round(um[:, 1], 6))), 6)) == {25.0}
    assert _nn(um).min() == pytest.approx(50.0)
    hxy2, _, _ = hr_from_values(xy, np.ones((len(xy), 2)))
    np.testing.assert_allclose(np.sort(hxy2, axis=0), np.sort(hxy, axis=0), atol=1e-6)


def test_pooled_blocks_off_lattice_means():
    """P2 pooled pseudo-spots: a 2x2-block lattice (array coords = block index), positions
    the mean of the members - off the lattice for incomplete blocks."""
    rng = np.random.default_rng(0)
    a, b = np.meshgrid(np.arange(6), np.arange(5))
    ab = np.stack([a.ravel(), b.ravel()], axis=1)
    xy = ab * 400.0 + 100.0 + rng.normal(scale=2.0, size=ab.shape)
    xy[[0, 7]] += [[-100.0, 0.0], [0.0, 100.0]]  # incomplete blocks
    lat, ab2 = infer_lattice(xy, ab)
    assert not lat.checkerboard and lat.pitch == pytest.approx(400.0, rel=0.01)
    hxy, _, info = hr_from_values(xy, np.ones((len(xy), 1)), ab)
    q = ~info["measured"]
    np.testing.assert_allclose(hxy[q], lat.xy(info["half_ab"][q] / 2.0))
    np.testing.assert_allclose(hxy[~q], xy[info["spot"][~q]])


def test_hr_pseudospots_section():
    rows, cols = np.meshgrid(np.arange(4), np.arange(8), indexing="ij")
    keep = (rows + cols) % 2 == 0
    r, c = rows[keep], cols[keep]
    xy = np.stack([c * 50.0 + 60.0, r * 86.6 + 60.0], axis=1)  # 1 um/px
    counts = np.stack([np.arange(len(xy)), np.full(len(xy), 2.0)], axis=1)
    import pandas as pd

    obs = pd.DataFrame({"array_row": r, "array_col": c})
    sec = Section("hex", ArrayImage(np.full((500, 500, 3), 200, np.uint8)), 1.0,
                  make_counts(counts, [f"s{i}" for i in range(len(xy))], ["a", "b"], xy,
                              obs=obs), 55.0)
    hr = hr_pseudospots(sec, genes=["b"])
    assert list(hr.var_names) == ["b"] and hr.obsm["spatial"].dtype == np.float64
    np.testing.assert_allclose(hr.X, 2.0)
    assert hr.uns["densify"]["checkerboard"] and hr.uns["densify"]["source"] == "array"
    meas = hr.obs["measured"].to_numpy()
    assert sorted(hr.obs["spot"][meas]) == sorted(sec.counts.obs_names)
    assert (hr.obs["spot"][~meas] == "").all()


def test_one_row_has_no_lattice():
    xy = np.stack([np.arange(5) * 200.0, np.full(5, 50.0)], axis=1)
    with pytest.raises(ValueError, match="two distinct"):
        hr_from_values(xy, np.ones((5, 1)))
