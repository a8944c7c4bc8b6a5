"""H&E-only prediction end to end through the CLI: fit a spot model on sections, then
predict a slide given as an image file alone (no expression input)."""

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from _hespotex_data import synthetic
from histosr.cli import main
from histosr.image_only import hex_centres, section_from_image


def test_hex_centres_pitch():
    xy, rc = hex_centres(1000, 1000, 0.5, pitch_um=100.0)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(d[:, 1], 200.0)  # 100 um = 200 px nearest neighbours
    assert (d[:, 1:7] < 200.0 + 1e-6).sum(axis=1).max() == 6  # hexagonal: 6 neighbours


def test_fit_then_predict_from_image_alone(tmp_path):
    from histosr.io import write_istar

    a, b, c = synthetic(0), synthetic(1), synthetic(3)
    write_istar(a, tmp_path / "a")
    write_istar(b, tmp_path / "b")
    slide = tmp_path / "slide.png"
    Image.fromarray(c.image.read(0, 0, *c.image.shape[:2])).save(slide)

    assert main(["--quiet", "fit", str(tmp_path / "a"), "--reader", "istar", "--method",
                 "ridge", "--add-section", str(tmp_path / "b"), "--n-genes", "20",
                 "--out", str(tmp_path / "fit")]) == 0
    gene = "VIS_TUMOUR_0"
    out = tmp_path / "pred"
    assert main(["--quiet", "predict", "--model", str(tmp_path / "fit" / "model"),
                 "--image", str(slide), "--um-per-px", "0.5", "--pitch-um", "100",
                 "--genes", gene, "--out", str(out)]) == 0
    pred = ad.read_h5ad(out / "prediction.h5ad")
    h, w = c.image.shape[:2]
    xy = pred.obsm["spatial"]
    assert pred.n_obs > 20 and pred.n_vars == 20 and gene in pred.var_names
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    assert pred.uns["histosr"]["grid"] == "spots"
    assert pred.uns["histosr"]["spot_diameter_um"] == a.spot_diameter_um  # from the model
    assert (out / "previews" / f"{gene}.png").stat().st_size > 1000
    # the image-only prediction tracks the truth of that slide (nearest measured spot)
    from scipy.spatial import cKDTree

    from histosr.metrics import log_cp10k

    _, j = cKDTree(c.xy).query(xy)
    truth = log_cp10k(c.dense_counts([gene]), c.dense_counts().sum(1))[j, 0]
    assert np.corrcoef(np.asarray(pred[:, gene].X).ravel(), truth)[0, 1] > 0.3

    # superpixel grid on a small slide
    small = tmp_path / "small.png"
    Image.fromarray(c.image.read(0, 0, 400, 400)).save(small)
    assert main(["--quiet", "predict", "--model", str(tmp_path / "fit" / "model"),
                 "--image", str(small), "--um-per-px", "0.5", "--grid", "superpixels",
                 "--genes", gene, "--out", str(tmp_path / "sp")]) == 0
    sp = ad.read_h5ad(tmp_path / "sp" / "prediction.h5ad")
    assert {"row", "col"} <= set(sp.obs) and list(sp.uns["histosr"]["grid_shape"]) == [25, 25]
    # streamed (ridge is blockwise): per-gene statistics, previews of the kept genes, no
    # temporary file left
    assert "mean_per_superpixel" in sp.var and sp.uns["histosr"]["grid"] == "superpixels"
    assert (tmp_path / "sp" / "previews" / f"{gene}.png").stat().st_size > 1000
    assert sorted(p.name for p in (tmp_path / "sp").iterdir()) == ["prediction.h5ad",
                                                                   "previews"]


def test_image_only_errors(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path), "--image", "x.png",
                 "--out", str(tmp_path)]) == 2
    assert "--um-per-px" in capsys.readouterr().err
    img = np.full((200, 200, 3), 245, np.uint8)  # glass only
    import pytest

    from histosr.section import SectionError

    with pytest.raises(SectionError, match="no tissue"):
        section_from_image(img, 0.5)


def test_predict_image_applies_the_models_stain_target(tmp_path, capsys):
    """fit --stain-norm macenko keeps its target in the model; predict --image maps a
    re-stained slide to it by default (recorded in uns), so the prediction moves back
    towards that of the original slide; --stain-norm none turns it off."""
    import json

    from histosr.io import write_istar
    from histosr.stain import HE_REF, StainNormalizer, macenko_fit

    a, c = synthetic(0), synthetic(3)
    write_istar(a, tmp_path / "a")
    img = c.image.read(0, 0, 1200, 1200)  # 600 um: ~36 spots
    src = macenko_fit(img)
    # the same slide re-stained: bluer hematoxylin, paler and more orange eosin
    he2 = np.array([[0.75, 0.10], [0.62, 0.90], [0.23, 0.42]])
    he2 /= np.linalg.norm(he2, axis=0)
    restain = StainNormalizer("macenko", src, {"he": he2, "maxc": src["maxc"] * [1.3, 0.6]})
    Image.fromarray(img).save(tmp_path / "orig.png")
    Image.fromarray(restain.transform(img)).save(tmp_path / "restained.png")

    model = tmp_path / "fit" / "model"
    fit = ["--quiet", "fit", str(tmp_path / "a"), "--reader", "istar", "--method", "ridge",
           "--n-genes", "20", "--out", str(tmp_path / "fit")]
    # bad values fail before any section is read
    assert main(fit + ["--stain-ref", str(tmp_path / "nope.png")]) == 2
    assert "stain reference" in capsys.readouterr().err
    assert main(fit + ["--stain-norm", "none", "--stain-ref", "builtin"]) == 2
    assert "--stain-ref needs a stain normalisation" in capsys.readouterr().err
    assert not model.exists()
    assert main(fit + ["--stain-norm", "macenko"]) == 0
    rec = json.loads((model / "model.json").read_text())["state"]["stain_norm_"]
    assert rec["method"] == "macenko" and rec["ref"] == "builtin"
    np.testing.assert_allclose(rec["target"]["he"], HE_REF)

    def predict(image, *extra):
        out = tmp_path / f"p{len(list(tmp_path.iterdir()))}"
        assert main(["--quiet", "predict", "--model", str(model), "--image",
                     str(tmp_path / image), "--um-per-px", "0.5", "--pitch-um", "100",
                     *extra, "--out", str(out)]) == 0
        pred = ad.read_h5ad(out / "prediction.h5ad")
        return np.asarray(pred.X), json.loads(pred.uns["histosr"]["stain_norm"])

    orig, st_o = predict("orig.png")
    back, st_b = predict("restained.png")
    raw, st_r = predict("restained.png", "--stain-norm", "none")
    assert st_o["method"] == st_b["method"] == "macenko" and st_r == {"method": "none"}
    np.testing.assert_allclose(st_b["target"]["he"], np.round(HE_REF, 6))
    # the fitted source stain differs between the two slides: it was measured on each
    assert not np.allclose(st_o["source"]["he"], st_b["source"]["he"], atol=0.02)
    err_norm, err_raw = np.abs(back - orig).mean(), np.abs(raw - orig).mean()
    assert err_norm < 0.7 * err_raw, (err_norm, err_raw)
    assert main(["predict", "--model", str(model), "--image", "x.png", "--um-per-px", "0.5",
                 "--stain-ref", str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 2
    assert "stain reference" in capsys.readouterr().err


def _small_image() -> np.ndarray:
    """240 x 240 px of the synthetic slide 3 at its tissue's edge (0.5 um/px: 15 x 15
    superpixels of 8 um, ~150 of them tissue)."""
    return synthetic(3).image.read(0, 400, 240, 240)


def _small_superpixel_section():
    return section_from_image(_small_image(), 0.5, grid="superpixels", name="small")


@pytest.mark.parametrize("name", ["ridge", "knn_features"])
def test_streamed_superpixel_prediction_equals_in_memory(tmp_path, monkeypatch, name):
    """predict --image --grid superpixels streams: crop features of every point first
    (on disk, with the section-wide z-score statistics), then a block of points at a time
    into a chunked h5ad; with blocks of 37 points it equals the in-memory prediction of
    all points at once (and differs from z-scoring each block by itself)."""
    import h5py

    from histosr import outputs
    from histosr.methods import get_method

    a = synthetic(0)
    genes = list(a.counts.var_names[:12])
    m = get_method(name).fit([a], genes=genes)
    sec = _small_superpixel_section()
    n = sec.counts.n_obs
    assert n > 100
    ref = m.predict(sec)
    monkeypatch.setattr(outputs, "BAND_BYTES", m.point_bytes() * 37)
    assert outputs.band_points(m.point_bytes()) == 37  # several blocks, the last partial
    keep = [genes[3], genes[0]]
    sp = outputs.stream_spot_prediction(m, sec, tmp_path / "prediction.h5ad", {"grid": "x"},
                                        keep=keep, progress=False)
    assert sp.n_obs == n and not (tmp_path / "prediction.h5ad.scratch").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prediction.h5ad"]
    got = ad.read_h5ad(tmp_path / "prediction.h5ad")
    np.testing.assert_allclose(got.X, ref.X, rtol=1e-5, atol=1e-6)
    assert list(got.obs_names) == list(ref.obs_names) == list(sec.counts.obs_names)
    assert list(got.var_names) == genes
    np.testing.assert_array_equal(got.obsm["spatial"], sec.xy)
    np.testing.assert_array_equal(got.obs["row"], sec.counts.obs["row"])
    np.testing.assert_array_equal(got.obs["col"], sec.counts.obs["col"])
    info = got.uns["histosr"]
    assert info["scale"] == "log1p_cp10k" and info["method"] == name and info["grid"] == "x"
    assert list(info["grid_shape"]) == [15, 15] and "small" in got.uns["spatial"]
    np.testing.assert_allclose(got.var[outputs.PRED_MEAN], ref.X.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(got.var[outputs.PRED_MAX], ref.X.max(axis=0), rtol=1e-5)
    # the kept preview genes, in the stream's order of points
    np.testing.assert_allclose(sp.kept.X, ref[:, keep].X, rtol=1e-5, atol=1e-6)
    with h5py.File(tmp_path / "prediction.h5ad") as f:
        assert f["X"].chunks is not None  # a chunked on-disk X, not one block
    backed = ad.read_h5ad(tmp_path / "prediction.h5ad", backed="r")
    np.testing.assert_allclose(np.asarray(backed[:5, genes[2]].X).ravel(),
                               ref.X[:5, 2], rtol=1e-5, atol=1e-6)
    backed.file.close()
    # z-scoring each block over itself (not the section) would give another prediction
    naive = np.concatenate([m.predict(sec, at=sec.xy[i : i + 37]).X for i in range(0, n, 37)])
    assert not np.allclose(naive, ref.X, rtol=1e-3, atol=1e-3)


def test_predict_image_superpixels_hespotex_size_guard(tmp_path, monkeypatch, capsys):
    """hespotex (a graph over neighbouring points) predicts in memory: predict --image
    --grid superpixels checks the size first and says what to do when it would not fit;
    under the limit it predicts."""
    from histosr.methods import base, get_method

    a = synthetic(0)
    m = get_method("hespotex", gate_epochs=2, epochs=1, gate_hidden=16, head_hidden=16,
                   latent_dim=4, nuclei=False, progress=False, target="log1p_cp10k")
    m.fit([a], genes=list(a.counts.var_names[:8]))
    m.save(tmp_path / "model")
    small = tmp_path / "small.png"
    Image.fromarray(_small_image()).save(small)
    cmd = ["--quiet", "predict", "--model", str(tmp_path / "model"), "--image", str(small),
           "--um-per-px", "0.5", "--grid", "superpixels"]
    monkeypatch.setattr(base, "memory_budget", lambda: 1000.0)
    assert main(cmd + ["--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "superpixels x 8 genes in memory" in err and "hespotex predicts all" in err
    assert "--grid spots" in err and "--n-genes" in err
    assert not (tmp_path / "no" / "prediction.h5ad").exists()
    monkeypatch.setattr(base, "memory_budget", lambda: 2.0**40)
    assert main(cmd + ["--out", str(tmp_path / "yes")]) == 0
    pred = ad.read_h5ad(tmp_path / "yes" / "prediction.h5ad")
    assert pred.n_vars == 8 and {"row", "col"} <= set(pred.obs)
