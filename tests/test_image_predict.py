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
