import numpy as np
import pytest

from histosr.geometry import footprint_matrix, grid_for
from histosr.section import SectionError
from histosr.simulate import CLASSES, pseudo_visium, pseudo_visium_centres, synthetic_section


@pytest.fixture(scope="module")
def syn():
    return synthetic_section(seed=3, size_um=800.0, n_genes=12)


@pytest.fixture(scope="module")
def vis(syn):
    return pseudo_visium(syn)


def test_truth_shapes(syn):
    grid = grid_for(syn)
    cube, mask = syn.truth["cube"], syn.truth["mask"]
    assert syn.um_per_px == 0.5 and syn.image.shape == (1600, 1600, 3)
    assert cube.shape == (*grid.shape, 12) == (100, 100, 12)
    assert mask.shape == grid.shape and mask.dtype == bool and 0.3 < mask.mean() < 0.95
    assert syn.truth["genes"] == syn.genes and len(set(syn.genes)) == 12
    assert (cube[~mask] == 0).all() and (cube >= 0).all()
    np.testing.assert_array_equal(cube, np.round(cube))  # counts
    kinds = set(syn.meta["gene_kind"].values())
    assert {"visible", "gradient"} <= kinds
    # the section's own spots are its tissue superpixels, with the truth counts
    assert syn.n_spots == mask.sum()
    r, c = syn.counts.obs["sp_row"].to_numpy(), syn.counts.obs["sp_col"].to_numpy()
    np.testing.assert_array_equal(syn.dense_counts(), cube[r, c])


def test_deterministic():
    a = synthetic_section(seed=5, size_um=400.0, n_genes=6)
    b = synthetic_section(seed=5, size_um=400.0, n_genes=6)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    np.testing.assert_array_equal(a.truth["cube"], b.truth["cube"])


def test_image_regions_differ_in_colour(syn):
    frac = syn.truth["classes"]
    img = syn.image.array.astype(np.float64)
    h, w = frac.shape[:2]
    sp_rgb = img.reshape(h, 16, w, 16, 3).mean(axis=(1, 3))
    sp_dark = (img.mean(axis=2) < 140).reshape(h, 16, w, 16).mean(axis=(1, 3))
    means, dark = {}, {}
    for k, name in enumerate(CLASSES):
        pure = frac[..., k] > 0.99
        if pure.sum() >= 5:
            means[name] = sp_rgb[pure].mean(axis=0)
            dark[name] = sp_dark[pure].mean()
    assert len(means) >= 3
    names = list(means)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            d = np.abs(means[names[i]] - means[names[j]]).max()
            assert d > 8 or abs(dark[names[i]] - dark[names[j]]) > 0.05, (names[i], names[j])
    bg = sp_rgb[~syn.truth["mask"]].mean(axis=0)
    assert (bg > 230).all()  # white background
    if "tumour" in means and "stroma" in means:
        assert dark["tumour"] > dark["stroma"]  # dense nuclei vs sparse ones


def test_lattice():
    xy, arr = pseudo_visium_centres(1000.0, 1000.0)
    cols = np.unique(xy[:, 0])
    np.testing.assert_allclose(np.diff(cols), 100.0)
    assert cols[0] == 27.5
    for i, x in enumerate(cols):
        ys = np.sort(xy[xy[:, 0] == x, 1])
        np.testing.assert_allclose(np.diff(ys), 100.0)
        assert ys[0] == pytest.approx(27.5 + (50.0 if i % 2 else 0.0))
        assert (arr[xy[:, 0] == x, 1] == i).all()
    # array_row counts 50 um half-steps: y = 27.5 + 50 * array_row
    np.testing.assert_allclose(xy[:, 1], 27.5 + 50.0 * arr[:, 0])
    assert ((arr[:, 0] % 2) == (arr[:, 1] % 2)).all()
    assert (xy + 27.5 <= 1000.0).all()


def test_pseudo_visium_counts_are_disk_sums(syn, vis):
    assert vis.platform == "visium" and vis.spot_diameter_um == 55.0
    assert {"array_row", "array_col"} <= set(vis.counts.obs)
    assert vis.truth is syn.truth and vis.image is syn.image
    grid = grid_for(vis)
    xy_um = vis.xy * vis.um_per_px
    np.testing.assert_allclose((xy_um[:, 0] - 27.5) % 100.0, 0.0, atol=1e-6)
    F = footprint_matrix(grid, [p[None] for p in vis.xy], 55.0)
    assert 30 <= np.diff(F.indptr).min() and np.diff(F.indptr).max() <= 40
    cube = syn.truth["cube"].reshape(-1, 12).astype(np.float64)
    np.testing.assert_allclose(vis.dense_counts(), F @ cube, rtol=1e-6)
    # kept spots are mostly on tissue
    frac = (F @ syn.truth["mask"].ravel().astype(float)) / np.diff(F.indptr)
    assert (frac >= 0.5).all()
    # and spots fully on tissue are all kept
    xy_all, _ = pseudo_visium_centres(800.0, 800.0)
    F_all = footprint_matrix(grid, [p[None] for p in xy_all / 0.5], 55.0)
    full = (F_all @ syn.truth["mask"].ravel().astype(float)) == np.diff(F_all.indptr)
    assert vis.n_spots >= full.sum()


def test_pseudo_visium_needs_truth(vis):
    import dataclasses

    with pytest.raises(SectionError, match="truth"):
        pseudo_visium(dataclasses.replace(vis, truth=None))
