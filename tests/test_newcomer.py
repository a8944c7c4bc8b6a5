"""The newcomer path: the reproductions of issue #20, each behaving as designed."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

import histosr as hs
from histosr.cli import cli_words, evaluate_prediction, main
from histosr.metrics import log_cp10k, pcc_per_gene


@pytest.fixture(scope="module")
def pair():
    """Two synthetic sections (fit on one, predict the other)."""
    from histosr.simulate import synthetic_visium

    return synthetic_visium(seed=0, size_um=700, n_genes=10), \
        synthetic_visium(seed=1, size_um=700, n_genes=10)


def _cli(*args, env=None):
    import os

    e = {**os.environ, **(env or {})}
    e.pop("HISTOSR_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "histosr", *args], capture_output=True,
                          text=True, env=e)


# -- 2. evaluate ---------------------------------------------------------------------------
def test_evaluate_known_answers(pair):
    sec = pair[0]
    genes = sec.genes[:5]
    lib = np.asarray(sec.counts.X.sum(axis=1)).ravel()
    truth = log_cp10k(sec.dense_counts(genes), lib)

    def spots(X, scale, **uns):
        a = ad.AnnData(X=np.asarray(X, np.float32),
                       obs={"i": np.arange(sec.n_spots)}, var={"g": genes})
        a.obs_names, a.var_names = list(sec.counts.obs_names), genes
        a.uns["histosr"] = {"scale": scale, **uns}
        return a

    # a log1p CP10k prediction is scored as it is: the truth itself scores 1
    assert evaluate_prediction(spots(truth, "log1p_cp10k"), sec)["pcc_mean"] == \
        pytest.approx(1.0)
    # a known prediction: its PCC per gene, computed here by hand
    rng = np.random.default_rng(0)
    noisy = truth + rng.normal(0, 0.5, truth.shape)
    want = np.mean([np.corrcoef(noisy[:, j], truth[:, j])[0, 1] for j in range(5)])
    res = evaluate_prediction(spots(noisy, "log1p_cp10k"), sec)
    assert res["pcc_mean"] == pytest.approx(want, abs=1e-6) and res["in_sample"] is False
    # counts are put on the scale with the measured library (BENCHMARKS), not taken as log
    counts = sec.dense_counts(genes) * 3.0
    assert evaluate_prediction(spots(counts, "counts per spot footprint"), sec)["pcc_mean"] \
        == pytest.approx(1.0)
    # in-sample + consistency: said so
    res = evaluate_prediction(spots(truth, "log1p_cp10k", in_sample=True, consistency=True), sec)
    assert res["in_sample"] and "consistency forces" in res["note"]


def test_fit_predict_evaluate_cli_sign_is_right(pair, tmp_path, capsys):
    """The issue's chain: a spot method fitted on one section, evaluated on another: the
    score `evaluate` prints is the per-gene PCC of the file it wrote."""
    from histosr.io import write_istar

    for i, s in enumerate(pair):
        write_istar(s, tmp_path / f"s{i}")
    assert main(["--quiet", "fit", str(tmp_path / "s0"), "--method", "ridge", "--n-genes", "8",
                 "--out", str(tmp_path / "fit")]) == 0
    assert main(["--quiet", "predict", str(tmp_path / "s1"), "--model",
                 str(tmp_path / "fit" / "model"), "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(tmp_path / "s1"), "--prediction",
                 str(tmp_path / "p" / "prediction.h5ad")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pred = ad.read_h5ad(tmp_path / "p" / "prediction.h5ad")
    sec = hs.read_istar(tmp_path / "s1")
    lib = np.asarray(sec.counts.X.sum(axis=1)).ravel()
    shared = [g for g in pred.var_names if g in sec.counts.var_names]
    assert res["n_genes"] == len(shared) >= 4
    r = pcc_per_gene(pred[:, shared].X, log_cp10k(sec.dense_counts(shared), lib))
    assert res["pcc_mean"] == pytest.approx(float(np.mean(r)), abs=1e-6) and res["pcc_mean"] > 0
    assert res["in_sample"] is False


# -- 3. default genes, refusing what cannot fit ---------------------------------------------
def test_fit_defaults_to_the_top_genes_and_refuses_huge_predictions(pair):
    from histosr.methods.base import PredictionTooLargeError

    sec = pair[0]
    fm = hs.features(sec, progress=False)
    m = hs.fit(sec, fm, method="knn")
    assert m.genes_ == hs.pp.select_genes(sec, 1000)
    assert hs.fit(sec, fm, method="knn", genes="all").genes_ == sec.genes
    with pytest.raises(PredictionTooLargeError, match=r"superpixels x .* genes in memory needs "
                       r"about .* GB.*stream_prediction"):
        m.predict(sec, fm, max_bytes=1000)


# -- 4. SpatialData images larger than one chunk ---------------------------------------------
def test_dask_image_with_edge_tiles():
    pytest.importorskip("dask")
    from histosr.image import ImageSource
    from histosr.io.spatialdata import _dask_image

    class Lazy(ImageSource):  # read tile by tile, like a slide on disk
        def __init__(self, a):
            self.a = a

        @property
        def shape(self):
            return self.a.shape

        def _read(self, y0, x0, y1, x1):
            return self.a[y0:y1, x0:x1]

    a = np.random.default_rng(0).integers(0, 255, (300, 410, 3), dtype=np.uint8)
    d = _dask_image(Lazy(a), chunk=128)
    assert d.shape == (3, 300, 410)
    np.testing.assert_array_equal(np.asarray(d), a.transpose(2, 0, 1))


# -- 5. the genes a user names -----------------------------------------------------------------
def test_named_genes_are_fitted_and_unfitted_ones_warned(pair, tmp_path, capsys):
    from histosr.io import write_istar

    sec = pair[0]
    write_istar(sec, tmp_path / "s")
    rare = hs.pp.select_genes(sec, None)[-1]  # the least variable: not in a top-2 fit
    assert main(["--quiet", "fit", str(tmp_path / "s"), "--method", "knn", "--n-genes", "2",
                 "--genes", f"{rare},NOPE", "--out", str(tmp_path / "fit")]) == 0
    err = capsys.readouterr().err
    assert "not measured" in err and "NOPE" in err
    m = hs.load_method(tmp_path / "fit" / "model")
    assert rare in m.genes_ and len(m.genes_) == 3
    other = hs.pp.select_genes(sec, None)[-2]
    assert main(["--quiet", "predict", str(tmp_path / "s"), "--model",
                 str(tmp_path / "fit" / "model"), "--genes", f"{rare},{other}",
                 "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert f"not fitted on {other}" in err and f"--genes {other}" in err
    assert (tmp_path / "p" / "previews" / f"{rare}.png").is_file()
    assert not (tmp_path / "p" / "previews" / f"{other}.png").exists()


# -- 6. the error contract ---------------------------------------------------------------------
def test_user_mistakes_are_one_line_exit_2(tmp_path, pair):
    from histosr.io import write_istar

    write_istar(pair[0], tmp_path / "s")
    assert main(["--quiet", "fit", str(tmp_path / "s"), "--method", "ridge", "--out",
                 str(tmp_path / "f")]) == 0
    r = _cli("predict", "--model", str(tmp_path / "f" / "model"), "--image",
             str(tmp_path / "s" / "cnts.tsv"), "--um-per-px", "0.74", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and r.stderr.startswith("histosr: error: cannot read")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # an unknown method fails before any feature is computed
    r = _cli("fit", str(tmp_path / "s"), "--method", "istr", "--out", str(tmp_path / "g"))
    assert r.returncode == 2 and "unknown method 'istr' (did you mean 'istar'?)" in r.stderr
    assert not (tmp_path / "g").exists()
    r = _cli("fit", str(tmp_path / "s"), "--method", "istar", "--set", "epochs=-3",
             "--out", str(tmp_path / "g"))
    assert r.returncode == 2 and "the 'epochs' parameter of istar must be an int >= 1, got -3" \
        in r.stderr
    # messages name command-line flags, not Python keywords
    assert cli_words("a her2st root: pass section= one of ['C2']") == \
        "a her2st root: pass --name one of ['C2']"
    assert cli_words("Pass bin_size= (e.g. 8)") == "Pass --bin-size (e.g. 8)"
    assert cli_words("pass weights=PATH or put it there, or pass hub=True with HF_TOKEN") == \
        "pass --weights PATH or put it there, or pass --hub with HF_TOKEN"
    assert cli_words("or pass counts_file=raw.h5") == "or pass --reader-option counts_file=raw.h5"
    data = pytest.importorskip("histosr.datasets").data_dir()
    if data is not None:
        r = _cli("fit", str(data / "her2st"), "--method", "knn", "--out", str(tmp_path / "h"))
        assert r.returncode == 2 and "pass --name one of" in r.stderr


def test_internal_errors_say_bug_exit_1(monkeypatch, capsys):
    from histosr import cli

    def boom(args):
        raise ValueError("setting an array element with a sequence.")

    monkeypatch.setattr(cli, "cmd_doctor", boom)
    assert main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert "internal error (a bug in histosr" in err and "HISTOSR_DEBUG=1" in err


def test_quiet_silences_progress_and_warnings_are_one_line(pair, tmp_path):
    from histosr.io import write_istar

    write_istar(pair[0], tmp_path / "s")
    r = _cli("--quiet", "fit", str(tmp_path / "s"), "--method", "istar", "--set", "epochs=3",
             "--set", "n_states=2", "--n-genes", "3", "--genes", "NOPE",
             "--out", str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr
    assert "state 1/2" not in r.stdout + r.stderr and "it/s" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert lines and all(x.startswith("histosr: warning:") for x in lines), r.stderr


# -- 7. tissue found on the image alone ----------------------------------------------------------
@pytest.mark.slow
def test_image_only_tissue_skips_the_smear(data_dir):
    """her2st C5 has a pink smear below the tissue; C4 a faint glass area. The image-only
    lattice must stay on the tissue (the measured spots show where it is)."""
    from histosr.geometry import grid_for
    from histosr.tissue import section_tissue_mask

    for name in ("C5", "C4"):
        sec = hs.read_her2st(data_dir / "her2st", name)
        view = hs.io.read_her2st(data_dir / "her2st", name)
        view.counts = view.counts[:0].copy()  # nothing measured: the image alone decides
        m = section_tissue_mask(view)
        assert section_tissue_mask(sec).sum() == m.sum()
        r, c = grid_for(sec).cell_of_xy(sec.xy)
        assert m[r, c].mean() > 0.97  # the measured spots are on it
        rows = np.nonzero(m.any(axis=1))[0]
        y_max_px = (rows.max() + 1) * 8.0 / sec.um_per_px
        assert y_max_px < sec.xy[:, 1].max() + 0.06 * sec.image.shape[0], name
        old = section_tissue_mask(sec, method="chroma")
        assert m.sum() < 0.9 * old.sum()  # the smear / glass is gone


# -- 8. no spot-pitch blocks outside the footprints ----------------------------------------------
def test_consistency_factor_field_is_smooth_between_spots():
    from histosr.consistency import ConsistencyScaler
    from histosr.geometry import Grid, footprint_matrix

    g = Grid(0.5, (800, 1600))
    fps = [np.array([[400.0, 400.0]]), np.array([[800.0, 400.0]]), np.array([[1200.0, 400.0]])]
    F = footprint_matrix(g, fps, 55)
    cells = np.unique(F.indices)
    pred = np.ones((len(cells), 1))
    measured = np.array([[1.0], [2.0], [4.0]]) * np.asarray(F.sum(axis=1))
    sc = ConsistencyScaler.fit(g, fps, F[:, cells], pred, measured, diameter_um=55,
                               inside=cells)
    out = sc.apply(pred.astype(np.float32), cells)
    np.testing.assert_allclose(F[:, cells] @ out, measured, rtol=1e-4)  # exact sums
    row = 25  # the superpixel row through the spot centres
    line = g.flat(np.full(100, row), np.arange(100))
    f = sc.field(line)[:, 0]
    between = f[28:47]  # from the edge of spot 1 to the edge of spot 2
    assert np.all(np.diff(between) > 0)  # a ramp, not a step at the Voronoi border
    assert f[30] < 1.5 < f[45] and np.max(np.abs(np.diff(f))) < 0.25  # continuous
