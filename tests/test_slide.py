"""Whole-slide images: synthetic pyramidal slides written by tifffile (Aperio SVS with the MPP
in the description, OME-TIFF with physical sizes), read through tiffslide / openslide."""

import numpy as np
import pytest

from histosr.geometry import read_calibrated
from histosr.image import ArrayImage, FileImage, open_image
from histosr.section import SectionError
from histosr.slide import SlideImage, is_slide, slide_um_per_px, write_pyramidal_tiff


def smooth_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth H&E-like image: pink tissue blob on white glass, low-frequency texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    blob = ((yy - h / 2) / (0.35 * h)) ** 2 + ((xx - w / 2) / (0.35 * w)) ** 2 < 1
    img = np.full((h, w, 3), 245, np.float32)
    tex = 20 * np.sin(yy / 9.0 + rng.uniform(0, 6)) * np.cos(xx / 13.0)
    tissue = np.stack([220 + tex, 140 + tex, 190 + tex], axis=-1)
    img[blob] = tissue[blob]
    return np.clip(img, 0, 255).astype(np.uint8)


def box(a: np.ndarray, f: int) -> np.ndarray:
    """Hand-written f x f box average (rounded), remainder rows/cols dropped."""
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    m = a[:h, :w].astype(np.float64).reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))
    return np.rint(m).astype(np.uint8)


@pytest.fixture(scope="module")
def base():
    return smooth_rgb(1100, 1400)


@pytest.fixture(scope="module")
def svs(tmp_path_factory, base):
    p = tmp_path_factory.mktemp("slides") / "synthetic.svs"
    return write_pyramidal_tiff(base, p, um_per_px=0.25, kind="svs", downsamples=(1, 2, 8),
                                tile=128, compression="zlib")


@pytest.fixture(scope="module")
def ome(tmp_path_factory, base):
    p = tmp_path_factory.mktemp("slides") / "synthetic.ome.tif"
    return write_pyramidal_tiff(base, p, um_per_px=0.5, kind="ome", downsamples=(1, 4),
                                tile=128, compression="zlib")


def test_svs_levels_mpp_and_tiles_match_downsampled_base(svs, base):
    im = open_image(svs)
    assert isinstance(im, SlideImage) and im.backend == "tiffslide"
    assert im.um_per_px == pytest.approx(0.25) and im.mpp_source == "tiffslide.mpp-x"
    assert im.shape == (1100, 1400, 3)
    assert [im.level_shape(k) for k in range(3)] == [(1100, 1400), (550, 700), (137, 175)]
    np.testing.assert_array_equal(im.read(130, 250, 300, 260), base[130:430, 250:510])
    l1 = box(base, 2)
    np.testing.assert_array_equal(im.read_level(1, 40, 77, 200, 150), l1[40:240, 77:227])
    l2 = im.read_level(2, 0, 0, 137, 175).astype(int)
    assert np.abs(l2 - box(l1, 4).astype(int)).max() <= 1  # x8 = box of the x2 level
    # white outside the slide, at any level
    assert (im.read_level(1, 540, 690, 20, 20)[10:, :] == 255).all()


def test_ome_tiff_physical_size_in_any_unit(tmp_path, ome, base):
    im = open_image(ome)
    assert isinstance(im, SlideImage) and im.um_per_px == pytest.approx(0.5)
    assert im.mpp_source == "OME PhysicalSizeX"  # no TIFF resolution tags were written
    np.testing.assert_array_equal(im.read_level(1, 10, 20, 50, 60), box(base, 4)[10:60, 20:80])
    import tifffile

    p = tmp_path / "nm.ome.tif"
    tifffile.imwrite(p, base[:256, :256], tile=(128, 128), photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 350.0,
                               "PhysicalSizeXUnit": "nm"})
    assert open_image(p).um_per_px == pytest.approx(0.35)


def test_level_choice_reads_the_level_nearest_the_working_resolution(svs, base, monkeypatch):
    im = SlideImage(svs)
    assert im.best_level(1.0) == 0 and im.best_level(1.9) == 0
    assert im.best_level(2.0) == 1 and im.best_level(7.0) == 1 and im.best_level(100) == 2
    assert im.level_for_um_per_px(0.5) == 1  # 0.25 um/px slide, 0.5 um/px features: x2
    seen = []
    orig = SlideImage._read_level
    monkeypatch.setattr(SlideImage, "_read_level",
                        lambda self, lv, *a: seen.append(lv) or orig(self, lv, *a))
    got = read_calibrated(im, 0.25, 100, 150, 120, 90)  # 0.5 um/px: the x2 level, 1:1
    assert set(seen) == {1}
    np.testing.assert_array_equal(got, box(base, 2)[100:220, 150:240])
    seen.clear()
    thumb = im.thumbnail(150)  # 1/10 of the width: from the x8 level only
    assert set(seen) == {2} and thumb.shape == (110, 140, 3)
    seen.clear()
    assert im.thumbnail(200).shape == (158, 200, 3) and set(seen) == {1}  # 1/7: the x2
    seen.clear()
    from histosr.tissue import mean_rgb_sp

    rgb = mean_rgb_sp(im, 0.25)  # 32 px per superpixel: the x8 level (4 px each)
    assert set(seen) == {2}
    ref = mean_rgb_sp(ArrayImage(base), 0.25)
    assert rgb.shape == ref.shape and np.abs(rgb - ref).mean() < 1.5


def test_missing_mpp_is_an_error_naming_metadata_and_flag(tmp_path, base):
    p = write_pyramidal_tiff(base, tmp_path / "nompp.svs", um_per_px=None, kind="svs",
                             downsamples=(1, 4), tile=128, compression="zlib")
    im = open_image(p)
    assert im.um_per_px is None
    with pytest.raises(SectionError, match=r"--um-per-px.*") as e:
        slide_um_per_px(im)
    assert "MPP" in str(e.value) and "nompp.svs" in str(e.value)
    assert slide_um_per_px(im, 0.3) == 0.3
    from histosr.cli import main

    # the CLI says so (exit 2) before loading any model
    assert main(["--quiet", "predict", "--model", str(tmp_path / "no_model"), "--image",
                 str(p), "--out", str(tmp_path / "o")]) == 2


def test_plain_images_stay_plain(tmp_path, base):
    import tifffile
    from PIL import Image

    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, base[:200, :300], photometric="rgb")
    jpg = tmp_path / "x.jpg"
    Image.fromarray(base[:50, :60]).save(jpg)
    assert not is_slide(flat) and isinstance(open_image(flat), FileImage)
    assert isinstance(open_image(jpg), FileImage) and open_image(jpg).um_per_px is None
    assert open_image(flat).level_downsamples == (1.0,)


def test_openslide_backend_reads_the_same_pixels(svs, base):
    pytest.importorskip("openslide")
    im = SlideImage(svs, backend="openslide")
    assert im.um_per_px == pytest.approx(0.25) and im.level_downsamples[:2] == (1.0, 2.0)
    np.testing.assert_array_equal(im.read(5, 7, 64, 80), base[5:69, 7:87])
    np.testing.assert_array_equal(im.read_level(1, 3, 4, 30, 40), box(base, 2)[3:33, 4:44])


def test_reader_accepts_a_slide(tmp_path, data_dir):
    """A reader's image= takes a whole slide: the real ST mouse olfactory bulb fixture with
    its H&E rewritten as a pyramidal SVS."""
    from histosr.io import read_st

    folder = data_dir / "fixtures" / "st_mouse_olfactory_bulb"
    jpg = read_st(folder)
    slide = write_pyramidal_tiff(jpg.image, tmp_path / "mob.svs", um_per_px=jpg.um_per_px,
                                 kind="svs", downsamples=(1, 2), tile=128, compression="zlib")
    s = read_st(folder, image=slide)
    assert isinstance(s.image, SlideImage) and s.image.shape == jpg.image.shape
    np.testing.assert_allclose(s.xy, jpg.xy)
    np.testing.assert_array_equal(s.image.read(100, 200, 50, 40), jpg.image.read(100, 200, 50, 40))


def test_predict_on_a_slide_without_um_per_px(tmp_path):
    """`histosr predict --model M --image S.svs`: the pixel size comes from the slide; the
    prediction equals the one from the same pixels as a PNG with --um-per-px."""
    import anndata as ad
    from PIL import Image

    from _hespotex_data import synthetic
    from histosr.cli import main
    from histosr.io import write_istar

    a, c = synthetic(0), synthetic(3)
    write_istar(a, tmp_path / "a")
    assert main(["--quiet", "fit", str(tmp_path / "a"), "--reader", "istar", "--method",
                 "ridge", "--n-genes", "10", "--params", '{"scales": [1.0]}',
                 "--out", str(tmp_path / "fit")]) == 0
    pixels = c.image.read(0, 0, *c.image.shape[:2])
    png = tmp_path / "c.png"
    Image.fromarray(pixels).save(png)
    svs = write_pyramidal_tiff(pixels, tmp_path / "c.svs", um_per_px=c.um_per_px,
                               downsamples=(1, 4, 16), tile=128, compression="zlib")
    model = str(tmp_path / "fit" / "model")
    gene = "VIS_TUMOUR_0"
    assert main(["--quiet", "predict", "--model", model, "--image", str(svs), "--genes", gene,
                 "--out", str(tmp_path / "p_svs")]) == 0
    assert main(["--quiet", "predict", "--model", model, "--image", str(png), "--um-per-px",
                 str(c.um_per_px), "--out", str(tmp_path / "p_png")]) == 0
    ps = ad.read_h5ad(tmp_path / "p_svs" / "prediction.h5ad")
    pp = ad.read_h5ad(tmp_path / "p_png" / "prediction.h5ad")
    assert ps.uns["histosr"]["um_per_px"] == pytest.approx(c.um_per_px)
    assert (tmp_path / "p_svs" / "previews" / f"{gene}.png").stat().st_size > 1000
    # the tissue mask comes from a low level, so the lattices can differ at the edge only
    common = ps.obs_names.intersection(pp.obs_names)
    assert len(common) >= 0.9 * max(ps.n_obs, pp.n_obs)
    r = np.corrcoef(ps[common, gene].X.ravel(), pp[common, gene].X.ravel())[0, 1]
    assert r > 0.95


def test_pyramidal_tiff_without_slide_library_reads_level_0(ome, svs, base, monkeypatch):
    def missing(self, name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(SlideImage, "_open_with", missing)
    with pytest.warns(UserWarning, match=r"read as a plain TIFF.*histosr\[slides\]"):
        im = open_image(ome)
    assert isinstance(im, FileImage)
    np.testing.assert_array_equal(im.read(10, 20, 30, 40), base[10:40, 20:60])
    with pytest.raises(ValueError, match=r"pip install 'histosr\[slides\]'"):
        open_image(svs)  # a .svs is a slide or nothing


@pytest.mark.parametrize("mode,suffix", [("RGB", ".jpg"), ("L", ".jpg"), ("RGBA", ".png")])
def test_whole_decode_equals_pil_with_and_without_imagecodecs(tmp_path, mode, suffix,
                                                              monkeypatch):
    # a JPEG decodes straight into the array (no PIL copies: 3 bytes per pixel at the
    # peak); every path gives PIL's RGB pixels
    import sys

    from PIL import Image

    from histosr import image as himage

    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (1100, 700, 4), dtype=np.uint8)
    im = Image.fromarray(px, "RGBA").convert(mode)
    path = tmp_path / f"x{suffix}"
    im.save(path)
    want = np.asarray(Image.open(path).convert("RGB"))
    got = FileImage(str(path)).read(0, 0, 1100, 700)
    np.testing.assert_array_equal(got, want)
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # not installed
    monkeypatch.setattr(himage, "_DECODE_ROWS", 256)  # several strips
    np.testing.assert_array_equal(FileImage(str(path)).read(0, 0, 1100, 700), want)


def test_release_drops_the_decoded_jpeg_and_reads_again(tmp_path):
    """After release() a JPEG's full decode is gone (memory) and reads decode it again,
    pixel-identical."""
    from PIL import Image

    from histosr.image import open_image

    a = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    p = tmp_path / "he.jpg"
    Image.fromarray(a).save(p, quality=95)
    img = open_image(p)
    first = img.read(10, 20, 30, 40).copy()
    assert img._array is not None
    img.release()
    assert img._array is None
    np.testing.assert_array_equal(img.read(10, 20, 30, 40), first)
