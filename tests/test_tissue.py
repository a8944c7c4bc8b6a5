import numpy as np
import pandas as pd
import pytest

from histosr.geometry import grid_for
from histosr.image import ArrayImage, FileImage
from histosr.section import Section, estimate_pitch_px, make_counts
from histosr.tissue import mean_rgb_sp, section_tissue_mask, tissue_mask


def blob_image(background=243, seed=0):
    """(96, 128) superpixels at 0.5 um/px: an elliptical tissue blob with a white fat hole,
    plus a tiny tissue speck that should be dropped. Returns (image, truth at sp)."""
    rng = np.random.default_rng(seed)
    hs, ws = 96, 128
    yy, xx = np.mgrid[0:hs, 0:ws]
    blob = ((yy - 48) / 34.0) ** 2 + ((xx - 60) / 48.0) ** 2 <= 1
    hole = ((yy - 50) / 5.0) ** 2 + ((xx - 60) / 6.0) ** 2 <= 1
    speck = (np.abs(yy - 8) <= 1) & (np.abs(xx - 120) <= 1)
    sp = np.full((hs, ws, 3), float(background))
    pink = np.array([215.0, 140.0, 190.0]) + rng.normal(0, 12, (hs, ws, 3))
    sp[blob | speck] = pink[blob | speck]
    sp[hole] = 240.0  # fat: white, inside tissue
    img = np.repeat(np.repeat(sp, 16, 0), 16, 1)
    img = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    return img, blob


@pytest.mark.parametrize("background", [243, 0])  # glass, blacked out
def test_mask_synthetic_blob(background):
    img, truth = blob_image(background)
    rgb = mean_rgb_sp(ArrayImage(img), 0.5)
    assert rgb.shape == truth.shape + (3,)
    m = tissue_mask(rgb)
    iou = (m & truth).sum() / (m | truth).sum()
    assert iou > 0.95
    assert m[50, 60]  # fat hole filled
    assert not m[:16, 112:].any()  # speck removed


def test_mask_all_tissue_and_all_glass():
    rng = np.random.default_rng(0)
    tissue = np.clip(rng.normal([210, 140, 190], 10, (40, 40, 3)), 0, 255)
    assert tissue_mask(tissue).mean() > 0.98
    glass = np.clip(rng.normal(240, 2, (40, 40, 3)), 0, 255)
    assert tissue_mask(glass).mean() < 0.02
    assert tissue_mask(tissue / 255.0).mean() > 0.98  # 0-1 scale accepted
    with pytest.raises(ValueError):
        tissue_mask(tissue[..., 0])


def test_mean_rgb_matches_block_means():
    img = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    rgb = mean_rgb_sp(ArrayImage(img), 0.5, band_sp=2)
    ref = img.reshape(4, 16, 5, 16, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(rgb, ref, atol=1.0)


def test_mask_her2st_c2(data_dir):
    d = data_dir / "her2st"
    spots = pd.read_csv(d / "spots" / "C2_selection.tsv", sep="\t")
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    um = 200.0 / estimate_pitch_px(xy)
    counts = make_counts(np.ones((len(xy), 1)), [f"{a}x{b}" for a, b in zip(spots.x, spots.y)],
                         ["g"], xy)
    sec = Section("C2", FileImage(d / "images" / "C2.jpg"), um, counts, 100.0, "st")
    m = section_tissue_mask(sec)
    g = grid_for(sec)
    assert m.shape == g.shape
    r, c = g.cell_of_xy(xy)
    assert m[r, c].mean() >= 0.95
    assert 0.05 < m.mean() < 0.6
