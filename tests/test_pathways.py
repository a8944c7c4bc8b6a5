"""Gene sets in, pathway maps and enrichment out (histosr.pathways via histosr.tl)."""

import json
from math import comb

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import histosr as hs
from histosr import pathways as pw


def planted(n: int = 24, n_genes: int = 120, seed: int = 0):
    """Spots on an n x n grid (100 px apart); genes G0..G7 rise with a Gaussian 'programme'
    activity centred at (6, 16), genes G20..G27 with a second one at (18, 5)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    a1 = np.exp(-((xx - 6) ** 2 + (yy - 16) ** 2) / 30.0).ravel()
    a2 = np.exp(-((xx - 18) ** 2 + (yy - 5) ** 2) / 30.0).ravel()
    genes = [f"G{i}" for i in range(n_genes)]
    rate = np.outer(np.ones(n * n), rng.gamma(2.0, 2.0, n_genes))
    rate[:, :8] *= np.exp(2.0 * a1)[:, None]
    rate[:, 20:28] *= np.exp(2.0 * a2)[:, None]
    a = ad.AnnData(X=rng.poisson(rate).astype(np.float32), var=pd.DataFrame(index=genes))
    a.obs_names = [f"s{i}" for i in range(n * n)]
    a.obsm["spatial"] = np.stack([xx.ravel() * 100.0 + 50, yy.ravel() * 100.0 + 50], 1)
    return a, a1, a2


SETS = {"prog1": [f"G{i}" for i in range(8)], "prog2": [f"G{i}" for i in range(20, 28)],
        "control": [f"G{i}" for i in range(60, 70)]}


def test_gmt_reader_reports_measured_unknown_and_duplicated(tmp_path):
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("# comment\n"
                   "ERBB2_AMPLICON\tchr17q12\tERBB2\tGRB7\tGRB7\tPGAP3\tNOPE1\n"
                   "\n"
                   "PLASMA\thttp://x\tIGKC\tjchain\tMZB1\n")
    gs = hs.tl.read_gene_sets(gmt)
    assert list(gs) == ["ERBB2_AMPLICON", "PLASMA"]
    assert gs.sets["ERBB2_AMPLICON"] == ["ERBB2", "GRB7", "PGAP3", "NOPE1"]
    assert gs.descriptions["PLASMA"] == "http://x"
    rep = hs.tl.gene_set_report(gs, ["ERBB2", "GRB7", "PGAP3", "IGKC", "JCHAIN", "ACTB"])
    assert rep.loc["ERBB2_AMPLICON", "n_genes"] == 4
    assert rep.loc["ERBB2_AMPLICON", "n_measured"] == 3
    assert rep.loc["ERBB2_AMPLICON", "unknown"] == "NOPE1"
    assert rep.loc["ERBB2_AMPLICON", "duplicated"] == "GRB7"
    assert rep.loc["PLASMA", "n_measured"] == 1
    assert rep.loc["PLASMA", "unknown"] == "jchain(->JCHAIN),MZB1"  # case hint
    assert rep.loc["PLASMA", "frac_measured"] == pytest.approx(1 / 3)
    bad = tmp_path / "bad.gmt"
    bad.write_text("A\td\tX\tY\nB\td\tZ\nA\td\tQ\n")
    with pytest.raises(ValueError, match=r"bad.gmt:3: gene set 'A' is already defined on line 1"):
        hs.tl.read_gene_sets(bad)
    bad.write_text("A d X Y\n")  # spaces, not tabs
    with pytest.raises(ValueError, match=r"bad.gmt:1: expected name<TAB>description<TAB>gene"):
        hs.tl.read_gene_sets(bad)
    with pytest.raises(FileNotFoundError, match="gene set file not found"):
        hs.tl.read_gene_sets(tmp_path / "missing.gmt")


def test_ora_equals_hand_computed_hypergeometric():
    universe = [f"U{i}" for i in range(60)]
    query = [f"U{i}" for i in range(12)] + ["NOT_IN_UNIVERSE"]
    sets = {"A": [f"U{i}" for i in range(0, 10)] + ["ALIEN"],  # overlap 10 of 10
            "B": [f"U{i}" for i in range(8, 20)],  # overlap 4 (U8..U11) of 12
            "C": [f"U{i}" for i in range(40, 55)]}  # overlap 0 of 15
    t = hs.tl.ora(query, sets, universe).set_index("set")
    M, N = 60, 12

    def p_ge(k, n):  # P(X >= k), X ~ hypergeometric(M, n, N), by hand
        return sum(comb(n, i) * comb(M - n, N - i) for i in range(k, min(n, N) + 1)) / comb(M, N)

    expect = {"A": p_ge(10, 10), "B": p_ge(4, 12), "C": 1.0}
    for s, p in expect.items():
        assert t.loc[s, "pvalue"] == pytest.approx(p, rel=1e-9)
    assert (t.loc["A", "overlap"], t.loc["B", "overlap"], t.loc["C", "overlap"]) == (10, 4, 0)
    assert t.loc["A", "n_set"] == 10 and t.loc["B", "n_query"] == 12
    assert t.loc["B", "expected"] == pytest.approx(12 * 12 / 60)
    # Benjamini-Hochberg over the 3 sets, by hand
    p = np.array([expect["A"], expect["B"], expect["C"]])
    order = np.argsort(p)
    adj = np.minimum.accumulate((p[order] * 3 / np.arange(1, 4))[::-1])[::-1]
    bh = np.empty(3)
    bh[order] = np.minimum(adj, 1)
    np.testing.assert_allclose(t.loc[["A", "B", "C"], "padj"], bh, rtol=1e-12)
    assert t.loc["B", "genes"] == "U8,U9,U10,U11"


@pytest.mark.parametrize("method", ["ulm", "zscore", "mean"])
def test_scores_recover_a_planted_programme(method):
    a, a1, a2 = planted()
    with pytest.warns(UserWarning, match=r"fewer than 3 measured genes were skipped: \['tiny'\]"):
        hs.tl.score_gene_sets(a, {**SETS, "tiny": ["G0", "NOPE"]}, method=method)
    s = a.obsm["pathways"]
    assert list(s.columns) == ["prog1", "prog2", "control"]  # 'tiny' has 1 measured gene
    assert a.uns["pathways"]["dropped"] == ["tiny"]
    assert a.uns["pathways"]["n_measured"]["prog1"] == 8
    assert np.corrcoef(s["prog1"], a1)[0, 1] > 0.8
    assert np.corrcoef(s["prog2"], a2)[0, 1] > 0.8
    assert abs(np.corrcoef(s["control"], a1)[0, 1]) < 0.3
    assert abs(np.corrcoef(s["prog1"], a2)[0, 1]) < 0.4


def test_scoring_errors_are_clear():
    a, _, _ = planted(n=6)
    with pytest.raises(ValueError, match="method must be one of"):
        hs.tl.score_gene_sets(a, SETS, method="gsea")
    with pytest.raises(ValueError, match=r"no gene set has 3 or more measured genes"):
        hs.tl.score_gene_sets(a, {"x": ["A", "B", "C"]})


def test_maps_stream_tile_by_tile_like_the_whole_slide(tmp_path):
    """score_maps on maps.zarr, 16 x 16 superpixels at a time, equals scoring the superpixel
    AnnData at once (ULM scores each superpixel on its own)."""
    from histosr.outputs import write_maps_from_anndata

    a, a1, _ = planted(n=40)
    rr, cc = np.mgrid[0:40, 0:40]
    keep = ((rr - 20) ** 2 + (cc - 20) ** 2 < 18**2).ravel()  # tissue disk
    sp = a[keep].copy()
    sp.obs["row"], sp.obs["col"] = rr.ravel()[keep], cc.ravel()[keep]
    sp.uns["histosr"] = {"grid_shape": [40, 40], "method": "test"}
    write_maps_from_anndata(sp, tmp_path / "maps.zarr")
    out = hs.tl.score_maps(tmp_path / "maps.zarr", SETS, tmp_path / "pw.zarr", tile=16)
    import zarr

    z = zarr.open_group(str(out), mode="r")
    scores = np.asarray(z["scores"])
    info = json.loads(z.attrs["histosr"])
    assert info["sets"] == ["prog1", "prog2", "control"] and scores.shape == (3, 40, 40)
    assert np.isnan(scores[:, ~keep.reshape(40, 40)]).all()
    hs.tl.score_gene_sets(sp, SETS, method="ulm")
    ref = sp.obsm["pathways"].to_numpy()
    got = scores[:, sp.obs["row"], sp.obs["col"]].T
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    png = pw.map_previews(out, tmp_path / "prev")
    assert len(png) == 3 and all(p.stat().st_size > 1000 for p in png)
    with pytest.raises(ValueError, match="per-observation method"):
        hs.tl.score_maps(tmp_path / "maps.zarr", SETS, tmp_path / "x.zarr", method="mean")


def test_enrich_names_the_programme_of_each_domain(tmp_path):
    a, a1, a2 = planted()
    dom = np.where(a1 > 0.3, "1", np.where(a2 > 0.3, "2", "0"))
    a.obs["domain"] = pd.Categorical(dom)
    t = hs.tl.enrich(a, SETS, n_markers=20, n_svg=20)
    assert set(t["query"]) == {"domain 0", "domain 1", "domain 2", "spatially variable"}
    s = pw.summarize(t).set_index("query")
    assert s.loc["domain 1", "enriched_for"] == "prog1"
    assert s.loc["domain 2", "enriched_for"] == "prog2"
    assert s.loc["domain 0", "enriched_for"] == "none"
    assert set(s.loc["spatially variable", "all_significant"].split(",")) >= {"prog1", "prog2"}
    assert (t["universe"] == a.n_vars).all()
    assert a.uns["enrichment"] is t
    from histosr.pl import enrichment

    fig = enrichment(t)
    fig.savefig(tmp_path / "dot.png")
    assert (tmp_path / "dot.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"run histosr.tl.domains\(adata\) first"):
        hs.tl.enrich(a, SETS, groupby="leiden")


def test_run_config_analysis_and_cli_enrich(tmp_path):
    """`histosr run` with analysis.gene_sets: pathway maps in the report, each map agreeing
    with its genes' measured spots; `histosr enrich RUN_DIR` on the finished run."""
    import yaml

    from histosr.cli import main
    from histosr.io import write_istar
    from histosr.simulate import CLASSES, synthetic_visium

    s = synthetic_visium(seed=3, size_um=800)
    write_istar(s, tmp_path / "sec")
    gmt = tmp_path / "classes.gmt"
    gmt.write_text("".join(f"{c}\tsynthetic\t" + "\t".join(
        g for g in s.genes if g.startswith(f"VIS_{c.upper()}_")) + "\tNOT_A_GENE\n"
        for c in CLASSES))
    cfg = {"section": {"reader": "istar", "path": str(tmp_path / "sec")},
           "method": {"name": "knn"}, "genes": {"n_top": 12}, "seed": 0,
           "analysis": {"gene_sets": str(gmt), "n_domains": 4, "n_markers": 8, "n_svg": 10},
           "out": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--quiet", "run", str(tmp_path / "cfg.yaml")]) == 0
    run = tmp_path / "run"
    rep = json.loads((run / "report.json").read_text())
    pcc = {k: v for k, v in rep["metrics"].items() if k.startswith("pathway_spot_pcc")}
    assert len(pcc) == 4 and min(pcc.values()) > 0.5, pcc
    assert sum(i.startswith("previews/pathway_") for i in rep["images"]) == 4
    assert "enrichment.png" in rep["images"]
    assert any(k.startswith("enriched[domain") for k in rep["metrics"])
    gsr = pd.read_csv(run / "gene_sets_report.tsv", sep="\t", index_col=0)
    assert (gsr["unknown"] == "NOT_A_GENE").all()
    scores = ad.read_h5ad(run / "pathways.h5ad")
    assert list(scores.var_names) == list(CLASSES) and "row" in scores.obs
    table = pd.read_csv(run / "enrichment.tsv", sep="\t")
    assert {"query", "set", "overlap", "pvalue", "padj"} <= set(table.columns)
    # the CLI verb on the finished run (the run folder itself is not modified)
    before = (run / "prediction.h5ad").stat().st_mtime_ns
    assert main(["--quiet", "enrich", str(run), "--gene-sets", str(gmt), "--n-domains", "3",
                 "--n-markers", "8", "--n-svg", "10"]) == 0
    assert (run / "enrich" / "enrichment.tsv").is_file()
    assert (run / "enrich" / "enrichment.png").stat().st_size > 1000
    assert (run / "prediction.h5ad").stat().st_mtime_ns == before
    # user mistakes: one line, exit 2, before any heavy work
    assert main(["--quiet", "enrich", str(run), "--gene-sets", str(tmp_path / "no.gmt")]) == 2
    cfg["analysis"] = {"gene_sets": str(tmp_path / "no.gmt")}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--quiet", "run", str(tmp_path / "bad.yaml")]) == 2
    cfg["analysis"] = {"gene_sets": str(gmt), "colour": "red"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--quiet", "run", str(tmp_path / "bad.yaml")]) == 2


# -- real data: her2st (legacy ST, HER2+ breast cancer) ----------------------------------------
HER2ST_GMT = ("ERBB2_amplicon\tchr17q12 amplicon\tERBB2\tGRB7\tPGAP3\tSTARD3\tPNMT\tMIEN1\tTCAP\n"
              "plasma_B\tplasma / B cells\tIGKC\tIGHG1\tIGHG3\tIGHM\tJCHAIN\tMZB1\n"
              "fibroblast_ECM\tfibroblasts, extracellular matrix\tCOL1A1\tCOL1A2\tCOL3A1\tFN1"
              "\tDCN\tLUM\n")


def test_her2st_a1_domains_are_enriched_for_known_programmes(tmp_path, data_dir, capsys):
    """A1 (346 spots, pathologist labels): k-means domains of the measured spots (2000 most
    variable genes), then ORA of each domain's 100 markers against three programmes, with
    every detected gene as the universe."""
    (tmp_path / "her2st.gmt").write_text(HER2ST_GMT)
    s = hs.read_her2st(data_dir / "her2st", "A1")
    a = s.counts.copy()
    a.uns["histosr"] = {"um_per_px": s.um_per_px}
    hv = hs.pp.select_genes(s, 2000, min_frac=0.1)
    b = hs.tl.domains(a[:, list(hv)].copy(), n_domains=6)
    a.obs["domain"] = b.obs["domain"].to_numpy()
    t = hs.tl.enrich(a, tmp_path / "her2st.gmt", n_markers=100, n_svg=100)
    summ = pw.summarize(t)
    labels = pd.crosstab(a.obs["domain"], pd.Series(s.annotations).reindex(a.obs_names))
    with capsys.disabled():
        print("\nA1 domain -> programme (majority pathologist label):")
        for _, r in summ.iterrows():
            d = r["query"].split()[-1]
            maj = (f"{labels.loc[d].idxmax()} {labels.loc[d].max()}/{labels.loc[d].sum()}"
                   if d in labels.index else "")
            print(f"  {r['query']:>18}: {r['enriched_for']:<15} padj={r['padj']:.2g} "
                  f"{r['genes']:<24} {maj}")
    named = set(summ.loc[summ["query"].str.startswith("domain"), "enriched_for"])
    assert {"ERBB2_amplicon", "plasma_B", "fibroblast_ECM"} <= named
    sv = summ.set_index("query").loc["spatially variable", "all_significant"].split(",")
    assert {"plasma_B", "ERBB2_amplicon"} <= set(sv)
    assert (t["universe"] > 10000).all()  # detected genes of the 15k measured


@pytest.mark.slow
def test_her2st_c2_pathway_maps_follow_the_measured_spots(tmp_path, data_dir, capsys):
    """`histosr run` on C2 (knn super-resolution, 100 genes + the sets' genes) with
    analysis.gene_sets: each programme's 8 um map, averaged over each spot's footprint,
    correlates with the mean z-scored measured expression of its genes."""
    import yaml

    from histosr.cli import main

    (tmp_path / "her2st.gmt").write_text(HER2ST_GMT)
    cfg = {"section": {"reader": "her2st", "path": str(data_dir / "her2st"), "name": "C2"},
           "method": {"name": "knn"}, "genes": {"n_top": 100}, "predict": {"n_previews": 0},
           "analysis": {"gene_sets": str(tmp_path / "her2st.gmt"), "enrich": False},
           "out": str(tmp_path / "run")}
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--quiet", "run", str(tmp_path / "c2.yaml")]) == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    pcc = {k[len("pathway_spot_pcc["):-1]: v for k, v in rep["metrics"].items()
           if k.startswith("pathway_spot_pcc[")}
    with capsys.disabled():
        print("\nC2 spot-level PCC, programme map vs measured genes:",
              {k: round(v, 3) for k, v in pcc.items()})
    assert set(pcc) == {"ERBB2_amplicon", "plasma_B", "fibroblast_ECM"}
    assert min(pcc.values()) > 0.5
    assert {f"previews/pathway_{k}.png" for k in pcc} <= set(rep["images"])
