"""The one gene-selection rule (HEST), pooled over sections like scanpy's batch_key."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from histosr import metrics
from histosr.pp import select_genes, shared_genes


def _adata(x, genes):
    return ad.AnnData(X=x, var=pd.DataFrame(index=genes))


@pytest.fixture
def table():
    rng = np.random.default_rng(0)
    n = 200
    x = np.zeros((n, 5))
    x[:, 0] = rng.poisson(20, n)  # expressed, low variance relative to mean
    x[:, 1] = rng.poisson(3, n) * rng.integers(1, 4, n)  # expressed, highly variable
    x[:15, 2] = 500  # very variable but in only 7.5% of spots: filtered out
    x[:, 3] = rng.poisson(5, n)
    x[:, 4] = 1000  # housekeeping: sets the library
    return x, ["a", "b", "c", "d", "e"]


def test_rule_on_dense_and_sparse(table):
    x, genes = table
    top = select_genes(_adata(x, genes), 2)
    assert top[0] == "b" and len(top) == 2
    assert "c" not in select_genes(_adata(x, genes), 10)
    assert select_genes(_adata(x, genes), 10, min_frac=0.05)[0] == "c"
    # the order follows the variance of log1p CP10k with the all-gene library
    lg = metrics.log_cp10k(x)
    keep = [0, 1, 3, 4]
    want = [genes[keep[i]] for i in np.argsort(-lg[:, keep].var(axis=0), kind="stable")]
    assert select_genes(_adata(x, genes), 10) == want
    for fmt in (sp.csr_matrix, sp.csc_matrix):
        assert select_genes(_adata(fmt(x), genes), 10) == want
    assert select_genes(_adata(x, genes)[:150], 10) == select_genes(_adata(x[:150], genes), 10)
    assert select_genes(_adata(x, genes), 3) == want[:3]  # a prefix: top50 of hvg1000


def test_pooled_over_sections_equals_concatenation(table):
    x, genes = table
    a, b = _adata(x[:120], genes), _adata(x[120:, ::-1], genes[::-1])  # other gene order
    assert shared_genes([a, b]) == genes
    assert select_genes([a, b], 10) == select_genes(_adata(x, genes), 10)
    c = _adata(x[:, :3], genes[:3])  # measures fewer genes: only shared genes compete
    assert set(select_genes([a, c], 10)) <= set(genes[:3])


def test_named_genes_are_added_and_unmeasured_ones_warned(table):
    x, genes = table
    with pytest.warns(UserWarning, match="not measured.*NOPE"):
        got = select_genes(_adata(x, genes), 1, include=["c", "NOPE", "b"])
    assert got[0] == "b" and got[1:] == ["c"]
    with pytest.raises(ValueError, match="n_top"):
        select_genes(_adata(x, genes), 0)


def test_spot_blocks_give_the_whole_matrix_answer(monkeypatch):
    """Detection and variance are accumulated over blocks of spots (bounded memory): any
    block size gives the ranking of the whole-matrix computation, pooled over tables."""
    import histosr.pp as pp

    rng = np.random.default_rng(3)
    genes = [f"g{i}" for i in range(40)]
    tabs = [_adata(sp.csr_matrix(rng.poisson(rng.gamma(1.0, 2.0, 40), (n, 40)).astype(float)),
                   genes) for n in (37, 53)]
    x = np.concatenate([t.X.toarray() for t in tabs])
    det = (x > 0).mean(axis=0)
    keep = np.flatnonzero(det >= 0.3)
    var = metrics.log_cp10k(x[:, keep], x.sum(axis=1)).var(axis=0)
    want = [genes[keep[i]] for i in np.argsort(-var, kind="stable")[:12]]
    for block in (1, 7, 4096):
        monkeypatch.setattr(pp, "SPOT_BLOCK", block)
        assert select_genes(tabs, 12, 0.3) == want
