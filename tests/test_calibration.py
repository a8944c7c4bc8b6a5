"""Calibrated detail (the shared post-step), the normalised ``knn`` baseline, the hybrid's
per-superpixel uncertainty in maps.zarr and P1's self-validation score."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest

from histosr import metrics
from histosr.calibration import DetailCalibrator, detail_weights
from histosr.geometry import footprint_matrix
from histosr.methods import get_method
from histosr.methods.base import SuperpixelMethod
from histosr.section import make_counts
from test_methods import DIAM, make_synthetic


@dataclass
class Planted(SuperpixelMethod):
    """Test method: the true 8 um map (``noise=0``), or each gene's mean density times
    i.i.d. log-normal noise per superpixel and gene (``noise>0``: detail with no signal)."""

    needs_features: ClassVar[bool] = False
    noise: float = 0.0

    def _fit(self, sections, features):
        self.truth_ = np.asarray(sections[0].truth["cube"], np.float64)

    def _predict_cells(self, section, features, flat_cells):
        r, c = features.grid.unflat(np.asarray(flat_cells))
        if self.noise == 0:
            return self.truth_[r, c].astype(np.float32)
        z = np.random.default_rng(1).standard_normal(self.truth_.shape)
        mean = self.truth_.mean(axis=(0, 1))
        return (mean * np.exp(self.noise * z[r, c])).astype(np.float32)


@pytest.fixture(scope="module")
def syn():
    return make_synthetic(seed=2, n_genes=6)


def test_detail_weights_hand_cases():
    rng = np.random.default_rng(0)
    d = rng.standard_normal((400, 1))
    # the detail predicts what interpolation misses exactly: least squares 1, rho^2 = 1,
    # evidence factor 1 - 3.84 / 400 (one gene: the shrink toward the mean changes nothing)
    assert detail_weights(d, d)[0] == pytest.approx(1 - 3.84 / 400, rel=1e-6)
    # twice the needed amplitude: least squares says 1/2
    assert detail_weights(d, 2 * d)[0] == pytest.approx(0.5 * (1 - 3.84 / 400), rel=1e-6)
    # independent noise: no evidence, weight 0
    w = detail_weights(rng.standard_normal((400, 3)), rng.standard_normal((400, 3)))
    assert np.all(w < 0.05)


def test_calibration_keeps_signal_and_drops_noise(syn):
    sec, fm, truth = syn
    cells = np.arange(fm.grid.shape[0] * fm.grid.shape[1])
    genes = list(sec.counts.var_names)
    # image-driven detail that is the truth: kept
    good = Planted(progress=False).fit(sec, fm, genes=genes)
    raw = good.predict_cells(sec, fm, cells)
    cal = good.predict_cells(sec, fm, cells, calibrate=True)
    assert metrics.pcc_per_gene(cal, raw).min() > 0.98
    t = truth.reshape(-1, len(genes))
    assert metrics.pcc_per_gene(cal, t).mean() > 0.95
    # detail that is noise: falls back to the spot level; with consistency that is
    # interpolation of the measured spots
    bad = Planted(noise=1.0, progress=False).fit(sec, fm, genes=genes)
    assert np.all(DetailCalibrator.from_method(bad, sec, fm).weights < 0.1)
    raw_b = bad.predict_cells(sec, fm, cells, consistency=True)
    cal_b = bad.predict_cells(sec, fm, cells, consistency=True, calibrate=True)
    interp = get_method("knn", consistency=True).fit(sec, fm, genes=genes).predict_cells(
        sec, fm, cells, consistency=True)
    assert metrics.pcc_per_gene(cal_b, interp).mean() > 0.9
    assert metrics.pcc_per_gene(raw_b, interp).mean() < 0.7
    assert metrics.pcc_per_gene(cal_b, t).mean() > metrics.pcc_per_gene(raw_b, t).mean() + 0.2
    # the footprint sums still equal the measured counts
    F = footprint_matrix(fm.grid, sec.spot_footprints(), DIAM)
    np.testing.assert_allclose(F @ cal_b, sec.dense_counts(genes), rtol=1e-3)


def test_calibration_refit_folds(syn):
    sec, fm, _ = syn
    genes = list(sec.counts.var_names)
    cells = np.arange(0, fm.grid.shape[0] * fm.grid.shape[1], 7)
    m = Planted(noise=1.0, calibrate=True, calibrate_folds=2, progress=False)
    m.fit(sec, fm, genes=genes)
    a = m.predict(sec, fm)
    assert a.uns["histosr"]["calibrate"] is True and np.isfinite(a.X).all()
    b = Planted(noise=1.0, progress=False).fit(sec, fm, genes=genes)
    assert not np.allclose(m.predict_cells(sec, fm, cells), b.predict_cells(sec, fm, cells))
    # judged on held-out spots of refits: noise detail still gets (almost) no weight
    assert np.all(DetailCalibrator.from_method(m, sec, fm, folds=2).weights < 0.1)
    with pytest.raises(ValueError, match="calibrate_folds"):
        Planted(calibrate_folds=1)


def test_knn_interpolates_normalised_expression(syn):
    """A deep and a shallow spot of opposite composition: the midpoint of the two gets
    the mean of their log1p CP10k (``values="log1p_cp10k"``, the default), not the deep
    spot's composition (``values="counts"``)."""
    sec, fm, _ = syn
    rng = np.random.default_rng(0)
    n = sec.n_spots
    share = rng.uniform(0.05, 0.95, n)
    lib = np.where(np.arange(n) % 2 == 0, 10000.0, 100.0)
    counts = np.round(np.stack([share, 1 - share], axis=1) * lib[:, None])
    s2 = dataclasses.replace(sec, counts=make_counts(counts, list(sec.counts.obs_names),
                                                     ["a", "b"], sec.xy))
    i, j = 0, 1  # neighbours on the lattice, libraries 10000 and 100
    mid = (s2.xy[i] + s2.xy[j]) / 2
    r, c = fm.grid.cell_of_xy(mid[None])
    cell = fm.grid.flat(r, c)
    nfp = np.diff(footprint_matrix(fm.grid, s2.spot_footprints(), DIAM).indptr)
    w = 1.0 / np.sum((fm.grid.xy_of_cells(r, c)[0] - s2.xy[[i, j]]) ** 2, axis=1)
    w /= w.sum()
    norm = get_method("knn", k=2).fit(s2, fm, genes="all")._predict_cells(s2, fm, cell)[0]
    cnt = get_method("knn", k=2, values="counts").fit(s2, fm, genes="all")._predict_cells(
        s2, fm, cell)[0]
    dens = counts[[i, j]] / nfp[[i, j], None]
    logv = np.log1p(counts[[i, j]] / counts[[i, j]].sum(axis=1, keepdims=True) * 1e4)
    libd = counts[[i, j]].sum(axis=1) / nfp[[i, j]]
    np.testing.assert_allclose(cnt, w @ dens, rtol=1e-5)
    np.testing.assert_allclose(norm, np.expm1(w @ logv) * (w @ libd) / 1e4, rtol=1e-5)
    # the shares differ: counts follow the deep spot, log1p CP10k weighs both
    assert abs(cnt[0] / cnt.sum() - counts[i, 0] / lib[i]) < 0.05
    assert abs(norm[0] / norm.sum() - cnt[0] / cnt.sum()) > 0.1


def test_hybrid_uncertainty_in_maps(syn, tmp_path, monkeypatch):
    import zarr

    import histosr.outputs as outputs
    from histosr.outputs import predict_maps

    monkeypatch.setattr(outputs, "MAP_ROWS", 7)  # several bands
    sec, fm, _ = syn
    m = get_method("hybrid", n_folds=3, progress=False).fit(sec, fm, genes="all")
    assert m.tags()["uncertainty"] and not get_method("knn").tags()["uncertainty"]
    path = predict_maps(m, sec, fm, tmp_path / "maps.zarr", genes=["g1", "g0"],
                        progress=False)
    root = zarr.open_group(str(path), mode="r")
    maps, unc = np.asarray(root["maps"]), np.asarray(root["uncertainty"])
    assert unc.shape == maps.shape == (2, *fm.grid.shape)
    assert np.isfinite(unc).all() and (unc >= 0).all()
    cells = np.arange(fm.grid.shape[0] * fm.grid.shape[1])
    u = m.uncertainty_cells(sec, fm, cells)
    np.testing.assert_allclose(unc[1].ravel(), u[:, 0], rtol=1e-5, atol=1e-7)
    # where the image gets weight, the folds disagree somewhere
    w = m.reliability()["image_weight"].to_numpy()
    assert (u[:, w > 0].max(axis=0) > 0).all() and np.all(u[:, w == 0] == 0)
    knn = get_method("knn").fit(sec, fm, genes="all")
    p2 = predict_maps(knn, sec, fm, tmp_path / "knn.zarr", progress=False)
    assert "uncertainty" not in zarr.open_group(str(p2), mode="r")


def test_p3_hybrid_is_the_image_model_alone(tmp_path):
    """P3 runs the hybrid on image-only views (FeatureMaps, no counts): its spot-level
    image model alone, ``ridge``'s pipeline on spot crops, so it scores as ``ridge`` does
    (up to the library its counts imply)."""
    from _hespotex_data import sections
    from histosr import benchmark

    secs = sections((0, 1), 700.0)
    res = benchmark.run("p3", get_method("hybrid", n_folds=3, progress=False),
                        sections=secs, progress=False, out=tmp_path / "h")
    assert res["method"] == "hybrid" and len(res["sections"]) == 2
    assert res["mean"]["top50_pcc"] > 0.3
    ridge = benchmark.run("p3", "ridge", sections=secs, progress=False, out=tmp_path / "r")
    assert abs(res["mean"]["top50_pcc"] - ridge["mean"]["top50_pcc"]) < 0.02, (
        res["mean"], ridge["mean"])
