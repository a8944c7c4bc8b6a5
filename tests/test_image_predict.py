"""H&E-only prediction end to end through the CLI: fit a spot model on sections, then
predict a slide given as an image file alone (no expression input)."""

import anndata as ad
import numpy as np
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
