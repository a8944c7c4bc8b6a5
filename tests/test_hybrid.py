"""The hybrid method (spatial field + image residual, per-gene weights) and depth thinning:
the image part helps where the image carries the signal, vanishes where it does not, and
the benchmarks can fit on thinned counts while scoring against full depth."""

from __future__ import annotations

import json

import numpy as np
import pytest

import histosr as hs
from histosr.arrays import columns
from histosr.benchmark.p1 import split, subset
from histosr.features.featuremap import FeatureMap


@pytest.fixture(scope="module")
def syn():
    from histosr.simulate import synthetic_visium

    sec = synthetic_visium(seed=3, size_um=1100.0, n_genes=12)
    fm = hs.features(sec, progress=False)
    train_ids, held = split(sec.counts.obs_names)
    train, test = subset(sec, train_ids), subset(sec, held, "_held_out")
    genes = list(sec.counts.var_names)
    lib = np.asarray(test.counts.X.sum(axis=1)).ravel()
    truth = hs.metrics.log_cp10k(test.dense_counts(genes), lib)
    return train, test, fm, genes, truth


def _field_only(m):
    """The fitted hybrid without its image part: the spatial field of the spots."""
    m.image_weight_[:] = 0
    if m.spot_model_ == "crops":
        m.crop_weight_[:] = 0
    m.spots_ = {}  # the stored fields hold Y - w x image: rebuilt from the spots at w = 0


def _held_out(m, syn, fm=None, zero_image=False):
    """Log1p of the predicted held-out spot counts (and the fitted method)."""
    train, test, fm0, genes, _ = syn
    fm = fm0 if fm is None else fm
    m.fit([train], [fm], genes=genes)
    if zero_image:
        _field_only(m)
    return np.log1p(columns(m.predict(train, fm, at=test.xy), genes)), m


def test_hybrid_uses_the_image_only_where_it_carries_the_gene(syn):
    *_, genes, truth = syn
    pred, m = _held_out(hs.get_method("hybrid", progress=False), syn)
    field, _ = _held_out(hs.get_method("hybrid", progress=False), syn, zero_image=True)
    r, r0 = hs.metrics.pcc_per_gene(pred, truth), hs.metrics.pcc_per_gene(field, truth)
    vis = np.array([g.startswith("VIS_") for g in genes])
    grad = np.array([g.startswith("GRAD_") for g in genes])
    # class-driven genes: the image part adds what interpolating the spots cannot see
    assert r[vis].mean() > r0[vis].mean() + 0.08, (r[vis], r0[vis])
    # smooth fields the image knows nothing of: no worse than the field
    assert r[grad].mean() > r0[grad].mean() - 0.02, (r[grad], r0[grad])
    rel = m.reliability()
    assert list(rel.index) == genes
    assert rel.loc[vis, "image_weight"].mean() > rel.loc[grad, "image_weight"].mean() + 0.1
    # self-validation ranks the genes where the image helps: cv gain larger on VIS genes
    gain = rel["heldout_pcc"] - rel["heldout_pcc_interpolation"]
    assert gain[vis].mean() > gain[grad].mean() + 0.03, (gain[vis], gain[grad])


def test_hybrid_returns_the_field_when_the_image_carries_nothing(syn):
    *_, fm, genes, _ = syn
    noise = FeatureMap(np.random.default_rng(0).standard_normal(
        np.asarray(fm.features).shape).astype(np.float32), fm.mask, fm.grid, "noise", {})
    # the 8 um features are noise; the spot model reads the same noise map (footprint)
    pred, m = _held_out(hs.get_method("hybrid", progress=False, spot_features="footprint"),
                        syn, fm=noise)
    _field_only(m)
    train, test = syn[0], syn[1]
    field = np.log1p(columns(m.predict(train, noise, at=test.xy), genes))
    assert np.abs(pred - field).max() < 0.1
    assert hs.metrics.pcc_per_gene(pred, field).min() > 0.99


def test_hybrid_crops_return_the_field_when_the_image_is_noise(syn):
    """Spot crops (the default) read the section's image: an image of pure noise gives
    the spatial field at held-out spots."""
    import dataclasses

    train, test, _, genes, _ = syn
    from histosr.image import ArrayImage

    noisy = dataclasses.replace(train, name="noise_train", image=ArrayImage(
        np.random.default_rng(1).integers(0, 256, train.image.shape).astype(np.uint8)))
    fm = hs.features(noisy, progress=False)
    m = hs.get_method("hybrid", progress=False).fit([noisy], [fm], genes=genes)
    pred = np.log1p(columns(m.predict(noisy, fm, at=test.xy), genes))
    _field_only(m)
    field = np.log1p(columns(m.predict(noisy, fm, at=test.xy), genes))
    assert np.abs(pred - field).max() < 0.1
    assert hs.metrics.pcc_per_gene(pred, field).min() > 0.99


def test_hybrid_is_deterministic_and_reloads(syn, tmp_path):
    a, m = _held_out(hs.get_method("hybrid", progress=False, seed=4), syn)
    b, _ = _held_out(hs.get_method("hybrid", progress=False, seed=4), syn)
    np.testing.assert_array_equal(a, b)
    m.save(tmp_path / "model")
    m2 = hs.load_method(tmp_path / "model")
    train, test, fm, genes, _ = syn
    # held-out spots (outside every measured footprint) are predicted as whole spots by the
    # crop model; points inside measured spots come from the 8 um map (super-resolution)
    from histosr.methods.base import WHOLE_SPOT_LAYER

    assert WHOLE_SPOT_LAYER in m.predict(train, fm, at=test.xy).layers
    assert WHOLE_SPOT_LAYER not in m.predict(train, fm, at=train.xy + 4.0).layers
    np.testing.assert_array_equal(np.log1p(columns(m2.predict(train, fm, at=test.xy), genes)), a)


def test_downsample_depth_is_seeded_and_keeps_proportions():
    from histosr.simulate import synthetic_visium

    sec = synthetic_visium(seed=1, size_um=700.0, n_genes=8)
    X = np.asarray(sec.counts.X.todense() if hasattr(sec.counts.X, "todense") else sec.counts.X)
    med = float(np.median(X.sum(axis=1)))
    a = hs.pp.downsample_depth(sec, med / 4, seed=2)
    b = hs.pp.downsample_depth(sec, med / 4, seed=2)
    c = hs.pp.downsample_depth(sec, med / 4, seed=3)
    A = a.dense_counts()
    np.testing.assert_array_equal(A, b.dense_counts())
    assert not np.array_equal(A, c.dense_counts())
    assert np.all(A <= X) and np.all(A == np.round(A))  # thinning: integer, never more
    assert np.median(A.sum(axis=1)) == pytest.approx(med / 4, rel=0.1)
    # every gene keeps about a quarter of its counts (binomial: the expected proportions)
    big = X.sum(axis=0) > 2000
    np.testing.assert_allclose(A.sum(axis=0)[big] / X.sum(axis=0)[big], 0.25, atol=0.03)
    assert a.meta["downsampled"]["p"] == pytest.approx(0.25)
    assert hs.pp.downsample_depth(sec, med * 2).dense_counts().sum() == X.sum()  # not deeper
    with pytest.raises(hs.InputError, match="median_umi"):
        hs.pp.downsample_depth(sec, 0)


@pytest.mark.slow
def test_benchmark_downsample_depth_scores_against_full_depth(data_dir, tmp_path, capsys):
    """``--downsample-depth`` is recorded and says what the scores are against; thinner
    counts recover the truth worse; protocols without measured counts refuse it."""
    from histosr.cli import main

    out = tmp_path / "p1"
    rc = main(["--quiet", "benchmark", "p1", "--method", "knn", "--sections", "C2",
               "--downsample-depth", "300", "--data", str(data_dir), "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["params"]["downsample_depth"] == {"median_umi": 300.0, "seed": 0}
    assert "full-depth" in res["params"]["scoring"]["depth"]
    # README: knn recovers C2's held-out spots at 0.394 from full-depth counts
    assert 0.1 < res["mean"]["top50_pcc"] < 0.39
    rc = main(["--quiet", "benchmark", "p4", "--method", "knn", "--downsample-depth", "300",
               "--out", str(tmp_path / "p4")])
    assert rc == 2 and "applies to p1, p2 and p3" in capsys.readouterr().err
