"""Spot-crop features (histosr.features.crops)."""

import numpy as np

from histosr.features import crop_dim, crop_features
from histosr.features.crops import read_crop
from histosr.image import ArrayImage
from histosr.section import Section, make_counts


def _section(um_per_px=1.0):
    """White 400 x 400 px image with a red 20 x 20 px square centred at (x=300, y=100)."""
    img = np.full((400, 400, 3), 255, np.uint8)
    img[90:110, 290:310] = (255, 0, 0)
    xy = np.array([[300.0, 100.0], [100.0, 300.0]])
    counts = make_counts(np.ones((2, 1)), ["a", "b"], ["g"], xy)
    return Section(name="sq", image=ArrayImage(img), um_per_px=um_per_px, counts=counts,
                   spot_diameter_um=55.0)


def test_crop_is_centred_on_the_point_at_half_micron_pixels():
    s = _section(um_per_px=1.0)  # 1 um/px: a 40 um crop is 80 calibrated px
    crop = read_crop(s, (300.0, 100.0), 80)
    assert crop.shape == (80, 80, 3)
    red = (crop[..., 0] > 200) & (crop[..., 1] < 80)
    rows, cols = np.nonzero(red)
    # the 20 px (20 um) square is 40 calibrated px wide and sits in the middle
    assert abs(rows.mean() - 39.5) < 1.5 and abs(cols.mean() - 39.5) < 1.5
    assert 30 <= red.sum() ** 0.5 <= 42
    # off-image parts are white
    edge = read_crop(s, (0.0, 0.0), 40)
    assert (edge[:18, :18] == 255).all()


def test_crop_features_shapes_subpatches_and_cache(tmp_path):
    s = _section()
    f = crop_features(s, "handcrafted", size_um=40)
    assert f.shape == (2, crop_dim("handcrafted")) and np.isfinite(f).all()
    assert not np.allclose(f[0], f[1])  # the red square is in spot 0's crop only
    g = crop_features(s, "handcrafted", size_um=96, grid=3, cache_dir=tmp_path)
    assert g.shape == (2, 9, crop_dim("handcrafted"))
    # the red square is in the centre sub-patch (index 4) of spot 0 only
    d = np.abs(g[0] - g[1]).sum(axis=1)
    assert d.argmax() == 4
    files = list(tmp_path.glob("crops-*.npy"))
    assert len(files) == 1
    np.testing.assert_array_equal(crop_features(s, "handcrafted", size_um=96, grid=3,
                                                cache_dir=tmp_path), g)
    # other centres -> another cache entry
    crop_features(s, "handcrafted", size_um=96, grid=3, cache_dir=tmp_path,
                  centers=np.array([[200.0, 200.0]]))
    assert len(list(tmp_path.glob("crops-*.npy"))) == 2
