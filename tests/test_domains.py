"""histosr.tl (domains, marker scores, Moran's I), pl domain plots, the domains protocol."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from histosr import tl
from histosr.simulate import CLASSES, synthetic_section


@pytest.fixture(scope="module")
def syn():
    return synthetic_section(seed=0, size_um=800, n_genes=40)


def _superpixels(sec, X) -> ad.AnnData:
    r, c = np.nonzero(sec.truth["mask"])
    a = ad.AnnData(X=np.asarray(X, np.float32),
                   obs=pd.DataFrame({"row": r, "col": c}, index=[f"{i}_{j}" for i, j in zip(r, c)]),
                   var=pd.DataFrame(index=pd.Index(sec.truth["genes"])))
    a.obsm["spatial"] = np.stack([(c + 0.5) * 16, (r + 0.5) * 16], axis=1).astype(float)
    a.uns["histosr"] = {"um_per_px": 0.5, "grid_shape": list(sec.truth["mask"].shape)}
    return a


def _truth_classes(sec):
    """Dominant class per tissue superpixel and where it is obvious (>= 90% of it)."""
    m = sec.truth["mask"]
    frac = sec.truth["classes"][m]
    return frac.argmax(axis=1), frac.max(axis=1) >= 0.9


def _ari(a, dom, obvious):
    return adjusted_rand_score(dom[obvious], a.obs["domain"].cat.codes.to_numpy()[obvious])


def test_domains_true_expression_recovers_regions(syn):
    m = syn.truth["mask"]
    a = _superpixels(syn, syn.truth["rate"][m])
    dom, obvious = _truth_classes(syn)
    out = tl.domains(a, n_domains=4, seed=0)
    assert out is a and isinstance(a.obs["domain"].dtype, pd.CategoricalDtype)
    assert list(a.obs["domain"].cat.categories) == ["0", "1", "2", "3"]
    assert _ari(a, dom, obvious) > 0.95
    assert a.uns["domain"]["method"] == "kmeans" and a.uns["domain"]["n_domains"] == 4
    # domains are numbered by decreasing size
    sizes = a.obs["domain"].value_counts(sort=False).to_numpy()
    assert np.all(np.diff(sizes) <= 0)


def test_smoothing_improves_noisy_expression(syn):
    m = syn.truth["mask"]
    rng = np.random.default_rng(0)
    noisy = rng.binomial(syn.truth["cube"][m].astype(np.int64), 0.05)  # ~0.08 counts/gene
    dom, obvious = _truth_classes(syn)
    raw = _ari(tl.domains(_superpixels(syn, noisy), n_domains=4, seed=0), dom, obvious)
    smooth = _ari(tl.domains(_superpixels(syn, noisy), n_domains=4, smooth=16.0, seed=0),
                  dom, obvious)
    assert smooth > raw + 0.2 and smooth > 0.9


def test_copy_obsm_and_expression(syn):
    m = syn.truth["mask"]
    a = _superpixels(syn, syn.truth["rate"][m])
    b = tl.domains(a, n_domains=3, use="expression", copy=True)
    assert b is not a and "domain" not in a.obs and b.obs["domain"].nunique() == 3
    # an obsm representation is used as given ("X_latent" also for use="latent")
    a.obsm["X_latent"] = np.repeat(np.eye(2)[(a.obs["row"].to_numpy() > 50).astype(int)], 3,
                                   axis=1)
    tl.domains(a, n_domains=2, use="latent")
    assert adjusted_rand_score(a.obs["row"] > 50, a.obs["domain"]) == 1.0
    with pytest.raises(ValueError, match="use must be"):
        tl.domains(a, n_domains=2, use="X_missing")


def test_leiden_fallback_planted_partition():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(5), 80)
    P = np.where(g[:, None] == g[None, :], 0.15, 0.005)
    A = np.triu(rng.random((len(g), len(g))) < P, 1)
    A = sp.csr_matrix((A | A.T).astype(float))
    lab = tl.leiden_fallback(A, resolution=1.0, seed=0)
    assert adjusted_rand_score(g, lab) > 0.95
    # every community is connected
    from scipy.sparse.csgraph import connected_components

    for k in np.unique(lab):
        idx = np.flatnonzero(lab == k)
        assert connected_components(A[idx][:, idx], directed=False)[0] == 1


def test_leiden_domains_on_spots_with_smoothing():
    # three well-separated expression groups on a spot lattice, one per vertical band
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:15, 0:30]
    xy = np.stack([xx.ravel() * 200.0, yy.ravel() * 200.0], axis=1)  # 100 um pitch at 0.5
    group = (xx.ravel() // 10).astype(int)
    prof = rng.gamma(2.0, 2.0, size=(3, 30))
    X = rng.poisson(prof[group] * 5)
    a = ad.AnnData(X=X.astype(np.float32), var=pd.DataFrame(index=[f"g{i}" for i in range(30)]))
    a.obs_names = [f"s{i}" for i in range(a.n_obs)]
    a.obsm["spatial"] = xy
    tl.domains(a, n_domains=3, method="leiden", seed=0)
    assert a.obs["domain"].nunique() == 3
    assert adjusted_rand_score(group, a.obs["domain"]) > 0.95
    assert a.uns["domain"]["backend"] in ("leidenalg", "histosr fallback")
    with pytest.raises(ValueError, match="um_per_px"):
        tl.domains(a, n_domains=3, smooth=150.0)
    tl.domains(a, n_domains=3, smooth=150.0, um_per_px=0.5)
    assert adjusted_rand_score(group, a.obs["domain"]) > 0.9
    # a sketch bigger than nothing: large inputs go through the sketch + kNN assignment
    tl.domains(a, n_domains=3, method="leiden", max_nodes=200, seed=0)
    assert adjusted_rand_score(group, a.obs["domain"]) > 0.9


def test_marker_score_highest_in_its_region(syn):
    m = syn.truth["mask"]
    dom, obvious = _truth_classes(syn)
    a = _superpixels(syn, syn.truth["cube"][m])
    for k, cls in enumerate(CLASSES):
        genes = [g for g in a.var_names if g.startswith(f"VIS_{cls.upper()}_")] + ["NOT_A_GENE"]
        with pytest.warns(UserWarning, match="NOT_A_GENE"):
            tl.marker_score(a, genes, key_added=f"score_{cls}")
        means = [a.obs[f"score_{cls}"].to_numpy()[obvious & (dom == j)].mean()
                 for j in range(len(CLASSES))]
        assert int(np.argmax(means)) == k
    with pytest.raises(ValueError, match="none of the marker genes"):
        tl.marker_score(a, ["NOPE"])


def test_morans_i_ranks_smooth_above_noise(syn):
    m = syn.truth["mask"]
    a = _superpixels(syn, syn.truth["cube"][m])
    top = tl.spatially_variable_genes(a, n=5)
    mi = a.var["moran_i"]
    assert mi["GRAD_0"] > 0.3 and abs(mi["NOISE_0"]) < 0.05 and mi["GRAD_0"] > mi["NOISE_0"]
    assert len(top) == 5 and a.var["spatially_variable"].sum() == 5
    assert not any(g.startswith("NOISE") for g in top.index)
    # explicit dense check of the vectorised formula on one gene
    W = tl.spatial_weights(a)
    z = np.log1p(a[:, "GRAD_0"].X.ravel().astype(float))
    z -= z.mean()
    expect = a.n_obs / W.sum() * (z @ (W @ z)) / (z @ z)
    assert mi["GRAD_0"] == pytest.approx(expect, rel=1e-5)
    # spot level: kNN weights on obsm["spatial"]
    spots = ad.AnnData(X=a.X, var=a.var[[]].copy())
    spots.obsm["spatial"] = a.obsm["spatial"]
    mi_s = tl.morans_i(spots, genes=["GRAD_0", "NOISE_0"])
    assert mi_s["GRAD_0"] > mi_s["NOISE_0"]


def test_pl_domains(syn, tmp_path):
    from histosr import pl

    m = syn.truth["mask"]
    a = _superpixels(syn, syn.truth["rate"][m])
    tl.domains(a, n_domains=4)
    ax = pl.domains(a, section=syn)
    ax.figure.savefig(tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 0


@pytest.mark.slow
def test_domains_protocol_a1(data_dir, tmp_path):
    from histosr import cli
    from histosr.benchmark import PROTOCOLS, domains, read_results

    assert "domains" in PROTOCOLS
    args = cli.build_parser().parse_args(
        ["benchmark", "domains", "--method", "istar", "--sections", "A1", "--out", "x"])
    assert args.protocol == "domains"
    res = domains("istar", sections=["A1"], data=data_dir, epochs=3, n_states=1,
                  out=tmp_path, n_genes=50, progress=False)
    on_disk = read_results(tmp_path)
    assert json.loads(json.dumps(on_disk)) == on_disk
    assert set(on_disk) >= {"protocol", "method", "encoder", "params", "sections", "mean",
                            "seconds", "peak_rss_mb"}
    assert on_disk["protocol"] == "domains" and on_disk["method"] == "istar"
    s = on_disk["sections"]["A1"]
    for k in ("ari_superresolved", "ari_spots"):
        assert -1.0 <= s[k] <= 1.0 and k in on_disk["mean"]
    assert s["n_domains"] == len(s["labels"]) and "undetermined" not in s["labels"]
    assert on_disk["params"]["consistency"] is True
    assert on_disk["params"]["reduced_from_published"] is True
    assert (tmp_path / "domains_A1.png").stat().st_size > 0
    assert res["mean"] == on_disk["mean"]
