"""Ligand-receptor co-localisation (histosr.interactions, LIANA+ bivariate statistics)."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("liana")

from histosr import interactions as ia  # noqa: E402

UM_PER_PX = 0.5
FILLERS = [f"FILL{i}" for i in range(12)]
RESOURCE = pd.DataFrame({"ligand": ["RND1", "LIG", "RND3", "LIG2"],
                         "receptor": ["RND2", "REC", "RND4", "RA_RB"]})


def _in_region(xy_um, centre, radius):
    return np.hypot(xy_um[:, 0] - centre[0], xy_um[:, 1] - centre[1]) < radius


def _counts(xy_um, rng, planted: dict) -> tuple[np.ndarray, list[str]]:
    """Poisson counts: fillers at rate 10, random genes at 5, planted genes at 2 outside and
    25 inside their region(s) (``planted``: gene -> list of (centre, radius) in um)."""
    n = len(xy_um)
    genes = FILLERS + ["RND1", "RND2", "RND3", "RND4"] + list(planted)
    rate = np.empty((n, len(genes)))
    rate[:, : len(FILLERS)] = 10.0
    rate[:, len(FILLERS): len(FILLERS) + 4] = 5.0
    for j, regions in enumerate(planted.values(), start=len(FILLERS) + 4):
        inside = np.zeros(n, bool)
        for centre, radius in regions:
            inside |= _in_region(xy_um, centre, radius)
        rate[:, j] = np.where(inside, 25.0, 2.0)
    return rng.poisson(rate).astype(np.float32), genes


def spot_section(seed=0, side=24, pitch_um=100.0, planted=None):
    """Spots on a square lattice (``pitch_um``), L/R planted together in one corner."""
    rng = np.random.default_rng(seed)
    ii, jj = np.mgrid[0:side, 0:side]
    xy_um = np.stack([jj.ravel(), ii.ravel()], 1) * pitch_um + pitch_um / 2
    planted = planted or {"LIG": [((500, 500), 450)], "REC": [((500, 500), 450)]}
    X, genes = _counts(xy_um, rng, planted)
    a = ad.AnnData(X, obs=pd.DataFrame(index=[f"s{i}" for i in range(len(X))]),
                   var=pd.DataFrame(index=genes))
    a.obsm["spatial"] = xy_um / UM_PER_PX
    a.uns["histosr"] = {"um_per_px": UM_PER_PX}
    return a


def superpixel_map(seed=0, side=96, planted=None):
    """A super-resolved-like AnnData: one observation per 8 um superpixel (obs row/col)."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:side, 0:side]
    r, c = r.ravel(), c.ravel()
    xy_um = np.stack([c, r], 1) * 8.0 + 4.0
    planted = planted or {"LIG": [((200, 200), 150)], "REC": [((200, 200), 150)]}
    X, genes = _counts(xy_um, rng, planted)
    X = X / 8.0  # fewer counts per superpixel than per spot
    a = ad.AnnData(X.astype(np.float32),
                   obs=pd.DataFrame({"row": r.astype(np.int32), "col": c.astype(np.int32)},
                                    index=[f"{i}_{j}" for i, j in zip(r, c)]),
                   var=pd.DataFrame(index=genes))
    a.obsm["spatial"] = xy_um / UM_PER_PX
    a.uns["histosr"] = {"um_per_px": UM_PER_PX, "superpixel_um": 8.0,
                        "grid_shape": [side, side]}
    return a


@pytest.fixture(scope="module")
def spots_result():
    a = spot_section()
    t = ia.interactions(a, RESOURCE.iloc[:3], n_perms=300, n_top=3)
    return a, t


def test_planted_pair_ranked_first_random_pairs_not(spots_result):
    a, t = spots_result
    assert t.index[0] == "LIG^REC"
    assert t.loc["LIG^REC", "pval"] == pytest.approx(1 / 301)
    assert t.loc["LIG^REC", "qval"] < 0.01
    for rnd in ("RND1^RND2", "RND3^RND4"):
        assert t.loc[rnd, "rank"] > 1
        assert t.loc[rnd, "qval"] > 0.05
        assert abs(t.loc[rnd, "morans_r"]) < 0.05 < 0.15 < t.loc["LIG^REC", "morans_r"]
    # what is written where
    assert list(a.uns["interactions"]["global"].index) == list(t.index)
    assert a.obsm["interactions"].shape == (a.n_obs, 3)
    assert a.uns["interactions"]["params"]["bandwidth_um"] == 100.0
    assert a.uns["interactions"]["params"]["aggregated"] is False


def test_local_scores_mark_the_planted_region(spots_result):
    a, _ = spots_result
    xy_um = a.obsm["spatial"] * UM_PER_PX
    inside = _in_region(xy_um, (500, 500), 350)
    far = ~_in_region(xy_um, (500, 500), 900)
    hot = a.obsm["interactions_cats"]["LIG^REC"].to_numpy() == 1
    assert hot[inside].mean() > 0.95 and hot[far].mean() < 0.25
    loc = a.obsm["interactions"]["LIG^REC"].to_numpy()
    assert loc[inside].mean() > 5 * max(abs(loc[far].mean()), 0.01)


def test_weights_follow_the_kernel_in_um():
    a = spot_section(side=6)
    u = ia.units(a, ["LIG", "REC"], UM_PER_PX)
    W = ia._liana_adata(u, 100.0, "gaussian", 0.1).obsp["spatial_connectivities"].toarray()
    # by hand: neighbours 100 um apart weigh exp(-1/2); diagonal (141 um) exp(-1); 200 um
    # exp(-2); self 1; 224 um would be exp(-2.5) = 0.082 < 0.1 (dropped)
    i = 2 * 6 + 2
    assert W[i, i] == pytest.approx(1.0)
    assert W[i, i + 1] == pytest.approx(np.exp(-0.5), rel=1e-5)
    assert W[i, i + 7] == pytest.approx(np.exp(-1.0), rel=1e-5)
    assert W[i, i + 2] == pytest.approx(np.exp(-2.0), rel=1e-5)
    assert W[i, i + 2 + 6] == 0.0


def test_deterministic_for_a_seed():
    a, b, c = spot_section(side=12), spot_section(side=12), spot_section(side=12)
    ta = ia.interactions(a, RESOURCE.iloc[:3], n_perms=50, seed=3)
    tb = ia.interactions(b, RESOURCE.iloc[:3], n_perms=50, seed=3)
    tc = ia.interactions(c, RESOURCE.iloc[:3], n_perms=50, seed=4)
    pd.testing.assert_frame_equal(ta, tb)
    pd.testing.assert_frame_equal(a.obsm["interactions"], b.obsm["interactions"])
    assert not np.array_equal(ta.sort_index()["pval"], tc.sort_index()["pval"])
    pd.testing.assert_series_equal(ta.sort_index()["morans_r"], tc.sort_index()["morans_r"])


def test_unmeasured_resource_is_a_clear_error():
    a = spot_section(side=6)
    res = pd.DataFrame({"ligand": ["CXCL12", "TGFB1"], "receptor": ["CXCR4", "TGFBR1"]})
    with pytest.raises(ValueError, match="none of the 2 ligand-receptor pairs"):
        ia.interactions(a, res, n_perms=10)
    with pytest.raises(ValueError, match="lacks the column"):
        ia.interactions(a, pd.DataFrame({"source": ["LIG"], "target": ["REC"]}))
    with pytest.raises(ValueError, match="unknown ligand-receptor resource 'nope'"):
        ia.interactions(a, "nope")
    del a.uns["histosr"]
    with pytest.raises(ValueError, match="pass um_per_px="):
        ia.interactions(a, RESOURCE, n_perms=10)


def test_shipped_resource_and_complexes(tmp_path):
    """The consensus resource ships with liana; a complex takes the min of its subunits."""
    res = ia.resource_table("consensus")
    assert len(res) > 1000
    assert res["receptor"].str.contains("_").any()  # multi-subunit complexes
    row = res[res["receptor"].str.contains("_")].iloc[0]
    lig, (s1, s2) = row["ligand"], row["receptor"].split("_")[:2]
    sub = res[(res["ligand"] == lig) & (res["receptor"] == row["receptor"])]
    a = spot_section(side=16, planted={lig: [((500, 500), 450)], s1: [((500, 500), 450)],
                                       s2: [((500, 500), 450)]})
    t = ia.interactions(a, sub, n_perms=100, n_top=1)
    assert t.index[0] == f"{lig}^{row['receptor']}" and t["qval"].iloc[0] < 0.05
    # a user table from a TSV file
    p = tmp_path / "pairs.tsv"
    RESOURCE.to_csv(p, sep="\t", index=False)
    assert len(ia.resource_table(p)) == 4


def test_superpixels_are_binned_and_scores_return_to_every_superpixel():
    a = superpixel_map()
    t = ia.interactions(a, RESOURCE.iloc[:3], bandwidth_um=40.0, n_perms=200, n_top=2)
    prm = a.uns["interactions"]["params"]
    # bins of k x k superpixels with k * 8 um >= 40 / 3 um: k = 2 -> 48 x 48 bins
    assert prm["aggregated"] and prm["bin_um"] == 16.0 and prm["n_units"] == 48 * 48
    assert t.index[0] == "LIG^REC" and t["qval"].iloc[0] < 0.01
    loc = a.obsm["interactions"]
    assert loc.shape == (a.n_obs, 2) and list(loc.index) == list(a.obs_names)
    # the four superpixels of one bin share its score
    r, c = a.obs["row"].to_numpy(), a.obs["col"].to_numpy()
    blk = (r // 2 == 10) & (c // 2 == 10)
    assert blk.sum() == 4 and np.unique(loc.loc[blk, "LIG^REC"]).size == 1
    # at most max_obs bins: the bins grow
    b = superpixel_map()
    ia.interactions(b, RESOURCE.iloc[:3], bandwidth_um=40.0, n_perms=20, max_obs=600)
    assert b.uns["interactions"]["params"]["n_units"] <= 600


def test_backed_anndata_is_read_in_chunks(tmp_path, monkeypatch):
    a = superpixel_map(side=48)
    p = tmp_path / "pred.h5ad"
    a.write_h5ad(p)
    monkeypatch.setattr(ia, "_chunk_rows", lambda n_vars: 500)
    b = ad.read_h5ad(p, backed="r")
    tb = ia.interactions(b, RESOURCE.iloc[:3], bandwidth_um=40.0, n_perms=30)
    ta = ia.interactions(a, RESOURCE.iloc[:3], bandwidth_um=40.0, n_perms=30)
    pd.testing.assert_frame_equal(ta, tb, rtol=1e-5)


def test_compare_spots_and_super_resolved_map():
    """Pair 1 co-localises in the same region in both; pair 2 (LIG2/RA_RB) in different
    regions in the spots and in the map: it changes most."""
    sr = superpixel_map(side=100, planted={
        "LIG": [((250, 250), 200)], "REC": [((250, 250), 200)],
        "LIG2": [((600, 600), 200)], "RA": [((600, 600), 200)], "RB": [((600, 600), 200)]})
    spots = spot_section(side=8, pitch_um=100.0, planted={
        "LIG": [((250, 250), 200)], "REC": [((250, 250), 200)],
        "LIG2": [((600, 150), 200)], "RA": [((600, 150), 200)], "RB": [((600, 150), 200)]})
    res = RESOURCE.iloc[[1, 3]]
    cmp_ = ia.compare_interactions(spots, sr, res, bandwidth_um=40.0, n_perms=100,
                                   spot_diameter_um=100.0)
    assert list(cmp_.index) == ["LIG2^RA_RB", "LIG^REC"]
    assert cmp_.loc["LIG^REC", "local_pearson"] > 0.5 > cmp_.loc["LIG2^RA_RB", "local_pearson"]
    assert 0 < cmp_.loc["LIG^REC", "within_spot_frac"] < 1
    assert sr.uns["interactions"]["comparison"] is cmp_
    assert list(spots.obsm["interactions"].columns) == list(sr.obsm["interactions"].columns)


def test_report_and_cli_on_a_run_folder(tmp_path):
    from histosr.cli import main

    run = tmp_path / "run"
    run.mkdir()
    sr = superpixel_map(side=60)
    spots = spot_section(side=5, pitch_um=100.0)
    sr.var_names = ["CXCL12" if g == "LIG" else "CXCR4" if g == "REC" else g
                    for g in sr.var_names]
    spots.var_names = sr.var_names
    sr.write_h5ad(run / "prediction.h5ad")
    spots.write_h5ad(run / "prediction_spots.h5ad")
    (run / "report.json").write_text(json.dumps({"params": {}}))
    rc = main(["--quiet", "interactions", str(run), "--n-perms", "50", "--bandwidth-um",
               "40", "--n-top", "3"])
    assert rc == 0
    out = run / "interactions"
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["interactions_top_pair_superpixels"].startswith("CXCL12^CXCR4")
    g = pd.read_csv(out / "global_superpixels.tsv", sep="\t", index_col=0)
    assert g.index[0] == "CXCL12^CXCR4" and {"morans_r", "pval", "qval"} <= set(g.columns)
    assert (out / "comparison.tsv").is_file() and rep["images"]
    assert main(["interactions", str(tmp_path / "missing")]) == 2


def test_run_config_switch(tmp_path):
    from histosr.config import ConfigError, validate
    from histosr.report import RunReport

    assert validate({"section": {"path": "x"}}).analysis.interactions is False
    cfg = validate({"section": {"path": "x"}, "analysis": {"interactions": {"n_perms": 30}}})
    assert cfg.analysis.interactions == {"n_perms": 30}
    with pytest.raises(ConfigError, match="unknown analysis.interactions options"):
        validate({"section": {"path": "x"}, "analysis": {"interactions": {"n_perm": 30}}})
    sr, spots = superpixel_map(side=48), spot_section(side=4)
    res = tmp_path / "pairs.csv"
    RESOURCE.to_csv(res, index=False)
    rep = RunReport("t", tmp_path, params={"seed": 5})
    ia.run_in_pipeline({"interactions": False}, sr, spots, None, tmp_path, rep)
    assert not rep.metrics and "interactions" not in sr.uns
    with pytest.raises(ValueError, match="unknown analysis.interactions options"):
        ia.run_in_pipeline({"interactions": {"n_perm": 30}}, sr, spots, None, tmp_path, rep)
    with pytest.raises(ValueError, match="n_perms must be a positive integer"):
        ia.run_in_pipeline({"interactions": {"n_perms": 0, "resource": str(res)}}, sr, spots,
                           None, tmp_path, rep)
    ia.run_in_pipeline({"interactions": {"n_perms": 30, "bandwidth_um": 40.0, "n_maps": 1,
                                         "resource": str(res)}}, sr, spots, None, tmp_path, rep)
    assert rep.metrics["interactions_top_pair_superpixels"].startswith("LIG^REC")
    assert sr.uns["interactions"]["params"]["seed"] == 5  # the run's seed
    assert "interactions" in rep.timings and (tmp_path / "interactions" / "comparison.tsv").is_file()
    assert "interactions" not in spots.uns  # the caller's spots are left as they were
