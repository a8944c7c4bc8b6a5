"""Streamed outputs (``histosr run``'s path): the same AnnData and maps as in memory."""

import anndata as ad
import numpy as np
import pytest
import zarr

import histosr as hs
import histosr.consistency as consistency
import histosr.outputs as outputs
from histosr.arrays import gene_values
from histosr.simulate import synthetic_visium


@pytest.fixture(scope="module")
def fitted():
    s = synthetic_visium(seed=5, size_um=700)
    fm = hs.features(s, progress=False)
    m = hs.fit(s, fm, method="knn", genes=s.genes[:12])
    return s, fm, m.set_params(consistency=True)


def test_band_rows_shrink_with_width():
    # a band's (superpixels x genes) float32 prediction stays under BAND_BYTES: wide slides
    # get fewer rows per band, so memory does not grow with the width
    assert outputs.band_rows(800, 1000) == 20
    assert outputs.band_rows(2500, 1000) == 6
    assert outputs.band_rows(100, 20) == outputs.MAP_ROWS
    assert outputs.band_rows(10**7, 1000) == 1


@pytest.mark.parametrize("band", ["rows", "bytes"])
def test_streamed_prediction_equals_in_memory(fitted, tmp_path, monkeypatch, band):
    s, fm, m = fitted
    # several bands and several blocks per band, so the stitching is exercised; bands of
    # MAP_ROWS rows, or of one row each (a slide too wide for BAND_BYTES)
    monkeypatch.setattr(outputs, "MAP_ROWS", 5)
    if band == "bytes":
        monkeypatch.setattr(outputs, "BAND_BYTES", 1)
    monkeypatch.setattr(outputs, "X_CHUNK_ROWS", 37)
    monkeypatch.setattr(consistency, "CELL_BLOCK", 29)
    keep = [s.genes[3], s.genes[0]]
    sp = outputs.stream_prediction(m, s, fm, tmp_path / "p.h5ad", tmp_path / "m.zarr",
                                   keep=keep, progress=False)
    mem = m.predict(s, fm)  # in memory, consistency on
    got = ad.read_h5ad(sp.h5ad)
    assert got.n_obs == sp.n_obs == mem.n_obs and list(got.var_names) == list(mem.var_names)
    assert list(got.obs_names) == list(mem.obs_names)
    np.testing.assert_array_equal(got.obs["row"], mem.obs["row"])
    np.testing.assert_allclose(got.obsm["spatial"], mem.obsm["spatial"])
    np.testing.assert_allclose(got.X, mem.X, rtol=1e-5, atol=1e-6)
    assert list(got.uns["histosr"]["grid_shape"]) == list(mem.uns["histosr"]["grid_shape"])
    assert "spatial" in got.uns  # scanpy's layout
    # per-gene statistics from the stream
    np.testing.assert_allclose(got.var[outputs.PRED_MEAN], mem.X.mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(got.var[outputs.PRED_MAX], mem.X.max(axis=0), rtol=1e-5)
    # backed mode reads the chunked X lazily
    b = ad.read_h5ad(sp.h5ad, backed="r")
    np.testing.assert_allclose(np.asarray(b[:, keep[0]].X).ravel(),
                               mem[:, keep[0]].X.ravel(), rtol=1e-5, atol=1e-6)
    b.file.close()
    # the kept genes (previews) and the zarr maps hold the same values
    # (no per-superpixel names in memory; to_anndata() gives the file's layout)
    assert isinstance(sp.kept, outputs.KeptMaps) and sp.kept.n_obs == mem.n_obs
    np.testing.assert_allclose(gene_values(sp.kept, keep[1]), mem[:, keep[1]].X.ravel(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sp.kept.obsm["spatial"], mem.obsm["spatial"])
    # previews read it as an 8 um map, as they read the in-memory prediction
    from histosr.pl import PreviewContext

    assert outputs.is_superpixel(sp.kept) and outputs.is_superpixel(mem)
    assert sp.kept.uns["histosr"]["scale"] == mem.uns["histosr"]["scale"]
    assert PreviewContext(sp.kept).superpixel
    full = sp.kept.to_anndata()
    assert list(full.obs_names) == list(mem.obs_names)
    assert full.uns["histosr"]["grid_shape"] == list(mem.uns["histosr"]["grid_shape"])
    maps = zarr.open_group(str(sp.maps), mode="r")["maps"]
    r, c = mem.obs["row"].to_numpy(), mem.obs["col"].to_numpy()
    np.testing.assert_allclose(maps[3][r, c], mem[:, s.genes[3]].X.ravel(), rtol=1e-5,
                               atol=1e-6)
    assert float(np.abs(maps[3]).sum()) == pytest.approx(float(mem[:, s.genes[3]].X.sum()),
                                                        rel=1e-4)  # 0 outside tissue
    assert not (tmp_path / "p.h5ad.tmp.h5ad").exists() and not (tmp_path / "m.zarr.tmp").exists()


def test_blocked_spot_sums_equal_one_block(fitted, monkeypatch):
    s, fm, m = fitted
    whole = m.predict(s, fm, at="spots").X
    monkeypatch.setattr(consistency, "CELL_BLOCK", 7)
    np.testing.assert_allclose(m.predict(s, fm, at="spots").X, whole, rtol=1e-4, atol=1e-4)


def test_zoom_window_found_on_coarse_blocks(monkeypatch):
    """On a grid larger than ZOOM_SEARCH_SP the zoom window is searched on k x k blocks
    (bounded memory) and still lands on the planted high-variance patch."""
    import histosr.pl as pl

    rng = np.random.default_rng(1)
    img = rng.normal(0, 0.1, (700, 900)).astype(np.float32)
    img[:200] = np.nan  # off tissue
    img[400:464, 600:664] += rng.normal(0, 3, (64, 64)).astype(np.float32)
    full = pl._zoom_window(img, 64)
    monkeypatch.setattr(pl, "ZOOM_SEARCH_SP", 100)  # k = 9
    r0, c0, n = pl._zoom_window(img, 64)
    assert n == 64 and full == (400, 600, 64)
    assert abs(r0 - 400) <= 9 and abs(c0 - 600) <= 9


def test_display_grid_block_means(monkeypatch):
    import histosr.pl as pl

    img = np.arange(35, dtype=np.float32).reshape(5, 7)
    img[0, 0] = np.nan
    same, k = pl._display_grid(img)
    assert k == 1 and same is img
    monkeypatch.setattr(pl, "DISPLAY_SP", 3)  # k = 3: blocks of 3 x 3, NaN ignored
    small, k = pl._display_grid(img)
    assert k == 3 and small.shape == (2, 3)
    assert small[0, 0] == np.nanmean(img[:3, :3]) and small[1, 2] == img[3:, 6:].mean()
