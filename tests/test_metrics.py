import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr

from histosr import metrics


def test_log_cp10k_rows_and_given_library():
    x = np.array([[1.0, 3.0], [0.0, 0.0], [5.0, 5.0]])
    out = metrics.log_cp10k(x)
    np.testing.assert_allclose(out[0], np.log1p([2500.0, 7500.0]))
    np.testing.assert_array_equal(out[1], 0.0)  # empty spot: no division by zero
    lib = np.array([100.0, 1.0, 10.0])
    np.testing.assert_allclose(metrics.log_cp10k(x, lib)[2], np.log1p([5000.0, 5000.0]))
    np.testing.assert_allclose(metrics.log_cp10k(sp.csr_matrix(x)), out)


def test_pcc_perfect_anti_constant(rng):
    t = rng.normal(size=(50, 3))
    p = np.stack([2 * t[:, 0] + 1, -t[:, 1], np.full(50, 4.0)], axis=1)
    r = metrics.pcc_per_gene(p, t)
    np.testing.assert_allclose(r, [1.0, -1.0, 0.0], atol=1e-12)
    # constant truth also scores 0, and float32 rounding of a constant is still constant
    t2 = t.copy()
    t2[:, 0] = 3.0
    assert metrics.pcc_per_gene(t, t2)[0] == 0.0
    c = (np.full(50, 0.1, np.float32) * np.float32(3)).astype(np.float64)
    assert metrics.pcc_per_gene(c + 1e-9 * (np.arange(50) % 2), t[:, 0])[0] == 0.0


def test_pcc_matches_scipy(rng):
    p, t = rng.normal(size=(40, 4)), rng.normal(size=(40, 4))
    ref = [pearsonr(p[:, g], t[:, g])[0] for g in range(4)]
    np.testing.assert_allclose(metrics.pcc_per_gene(p, t), ref, atol=1e-10)
    ref = [spearmanr(p[:, g], t[:, g])[0] for g in range(4)]
    np.testing.assert_allclose(metrics.spearman_per_gene(p, t), ref, atol=1e-10)


def test_errors():
    p = np.array([[1.0, 2.0], [3.0, 4.0]])
    t = np.array([[1.0, 0.0], [3.0, 8.0]])
    np.testing.assert_allclose(metrics.rmse_per_gene(p, t), [0.0, np.sqrt((4 + 16) / 2)])
    assert metrics.mae(p, t) == pytest.approx((0 + 2 + 0 + 4) / 4)
    assert metrics.mse(p, t) == pytest.approx((4 + 16) / 4)
    assert metrics.mae(t, t) == 0.0
    with pytest.raises(ValueError, match="shape"):
        metrics.mae(p, t[:1])


def test_within_groups():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(10), 4)
    means = rng.normal(size=(10, 2))[groups] * 10
    noise = rng.normal(size=(40, 2))
    truth = means + noise
    # a block-level prediction scores 0 within blocks; noise recovered scores 1
    np.testing.assert_allclose(metrics.pcc_within_groups(means, truth, groups), 0.0)
    np.testing.assert_allclose(metrics.pcc_within_groups(noise, truth, groups), 1.0)
    # singleton groups are dropped
    g2 = groups.copy()
    g2[0] = 99
    assert np.isfinite(metrics.pcc_within_groups(noise, truth, g2)).all()


def test_ssim_rmse_maps(rng):
    mask = np.zeros((20, 24), bool)
    mask[3:17, 4:20] = True
    truth = rng.gamma(2.0, size=(20, 24, 3)) * mask[..., None]
    assert metrics.ssim_per_gene(truth, truth, mask) == pytest.approx([1.0] * 3)
    np.testing.assert_allclose(metrics.rmse_maps(truth, truth, mask), 0.0)
    # min-max normalisation: an affine rescaling of the prediction changes nothing
    np.testing.assert_allclose(metrics.ssim_per_gene(3 * truth + 2, truth, mask), 1.0)
    # values outside the tissue are ignored
    noisy = truth + 100.0 * (~mask)[..., None]
    np.testing.assert_allclose(metrics.rmse_maps(noisy, truth, mask), 0.0)
    worse = metrics.ssim_per_gene(rng.permutation(truth.reshape(-1, 3)).reshape(truth.shape),
                                  truth, mask)
    assert (worse < 0.9).all()
    norm = metrics.normalise_maps(truth, mask)
    assert norm[mask].min() == 0.0 and norm[mask].max() == 1.0 and (norm[~mask] == 0).all()




def test_pcc_log_cp10k_blocks_equal_whole(monkeypatch):
    # gene-blocked log1p CP10k PCC (bounded memory on whole slides) = the formula on the
    # whole matrix; each side keeps its own library over all the columns given
    import scipy.sparse as sps

    from histosr import metrics

    rng = np.random.default_rng(0)
    a = rng.poisson(2.0, (60, 300)).astype(np.float32)
    b = rng.poisson(a + 0.5).astype(np.float64)
    want = metrics.pcc_per_gene(metrics.log_cp10k(a), metrics.log_cp10k(b))
    monkeypatch.setattr(metrics, "PCC_BLOCK", 7)
    got = metrics.pcc_log_cp10k(a, sps.csr_matrix(b))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert got.mean() > 0.3  # correlated by construction
    # a library over a subset of columns is not the same quantity
    assert not np.allclose(metrics.pcc_log_cp10k(a[:, :7], b[:, :7]), want[:7])


def test_columns_blocks_equal_whole():
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from histosr.arrays import columns

    x = np.random.default_rng(1).poisson(0.7, (57, 9)).astype(np.float32)
    genes = ["g3", "g0", "g8"]
    for m in (x, sp.csr_matrix(x)):
        a = ad.AnnData(m, var=pd.DataFrame(index=[f"g{k}" for k in range(9)]))
        for block in (1, 8, 1000):
            got = columns(a, genes, block=block)
            assert got.dtype == np.float64
            np.testing.assert_array_equal(got, x[:, [3, 0, 8]])


def test_add_sparse_product_same_values():
    import scipy.sparse as sp

    from histosr.arrays import add_sparse_product

    rng = np.random.default_rng(3)
    A = sp.random(30, 50, density=0.05, random_state=4, format="csc")
    B = rng.normal(size=(50, 7)).astype(np.float32)
    out = rng.normal(size=(30, 7))
    want = out + A @ B
    got = add_sparse_product(out, A, B)
    assert got is out
    np.testing.assert_array_equal(got, want)
    empty = np.diff(A.tocsr().indptr) == 0
    assert empty.any()


def test_feature_stats_in_column_blocks_same_values():
    from histosr.methods.scaling import feature_stats

    rng = np.random.default_rng(5)
    for d in (3, 17, 63, 66):  # last blocks of 1 and 2 columns merge into the one before
        X = (rng.gamma(2, 3, (5000, d)) * rng.uniform(0.1, 100, d)).astype(np.float32)
        X[:, 0] = 7.0  # constant: std 1
        mu, sd = feature_stats(X)
        want = X.std(axis=0)
        want[want < 1e-6] = 1.0
        np.testing.assert_array_equal(mu, X.mean(axis=0))
        np.testing.assert_array_equal(sd, want)


def test_minmax_rows_blockwise_same_values():
    import pytest

    from histosr.methods.scaling import minmax, minmax_rows

    y = np.random.default_rng(6).gamma(2.0, 3.0, (50, 5))
    y[:, 1] = 2.5
    blocks = lambda: (y[a : a + 8] for a in range(0, 50, 8))  # noqa: E731
    for a, b in zip(minmax(y), minmax_rows(blocks, 50)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expected 51"):
        minmax_rows(blocks, 51)


def test_minmax_overwrite_same_values():
    from histosr.methods.scaling import minmax

    y = np.random.default_rng(2).gamma(2.0, 3.0, (40, 6))
    y[:, 2] = 5.0  # a constant column keeps scale 1
    want = minmax(y.copy())
    got = minmax(y, overwrite=True)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    assert got[0].dtype == np.float32 and got[0][:, 2].max() == 0.0


def test_column_stats_blocks_equal_whole():
    import scipy.sparse as sp

    from histosr.arrays import column_stats

    x = np.random.default_rng(0).poisson(0.7, (57, 9)).astype(np.float32)
    for m in (x, sp.csr_matrix(x), sp.csc_matrix(x)):
        for block in (1, 8, 1000):
            mean, det = column_stats(m, block)
            np.testing.assert_allclose(mean, x.mean(axis=0, dtype=np.float64), rtol=1e-12)
            np.testing.assert_allclose(det, (x > 0).mean(axis=0))
