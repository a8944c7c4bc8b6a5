"""Readers on every real fixture and on her2st (C2, A1), plus round trips."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from histosr.image import ArrayImage, ImageSource
from histosr.io import (
    detect_platform,
    read,
    read_h5ad,
    read_her2st,
    read_istar,
    read_st,
    read_visium,
    read_visium_hd,
    write_istar,
)
from histosr.io._common import UpsampledImage, make_unique
from histosr.io.visium import read_10x_h5, read_10x_mtx
from histosr.section import Section, SectionError

XENIUM_UM_PER_PX = 1.7  # not recorded in the fixture; estimated from nucleus size (see report)


def _check_common(s: Section) -> None:
    h, w = s.image.shape[:2]
    xy = s.xy
    assert xy.shape == (s.n_spots, 2)
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all()
    assert (xy[:, 1] >= 0).all() and (xy[:, 1] < h).all()
    assert s.counts.obs_names.is_unique and s.counts.var_names.is_unique
    assert 0.1 <= s.um_per_px <= 10
    if "array_row" in s.counts.obs:
        assert pd.api.types.is_integer_dtype(s.counts.obs["array_row"])
        assert pd.api.types.is_integer_dtype(s.counts.obs["array_col"])


@pytest.fixture(scope="module")
def fx(data_dir):
    return data_dir / "fixtures"


def test_her2st_c2(data_dir):
    s = read_her2st(data_dir / "her2st", "C2")
    _check_common(s)
    assert 178 <= s.n_spots <= 187
    assert 15000 <= s.counts.n_vars <= 16500
    assert 0.70 <= s.um_per_px <= 0.80
    assert s.platform == "st" and s.spot_diameter_um == 100
    assert s.image.shape[:2] == (9911, 9274)  # header only, never decoded
    assert getattr(s.image, "_array", None) is None
    obs = s.counts.obs
    ids = obs["array_col"].astype(str) + "x" + obs["array_row"].astype(str)
    assert (ids == s.counts.obs_names).all()
    # spot ~130-140 px wide
    assert 125 <= 2 * s.spot_radius_px <= 145
    assert s.counts.X.max() > 0


def test_her2st_a1_display_and_annotations(data_dir):
    s = read_her2st(data_dir / "her2st", "A1")
    _check_common(s)
    assert s.n_spots == 346
    assert s.image.shape[1] == 2000
    assert s.meta["coord_scale"] == pytest.approx(2000 / 6954)
    assert 3.0 <= s.um_per_px <= 3.8
    a = s.annotations
    assert a is not None and a.index.equals(s.counts.obs_names)
    assert a.notna().all()
    assert {"invasive cancer", "connective tissue", "adipose tissue"} <= set(a.unique())


def test_her2st_user_pixel_size_accepted(data_dir):
    s = read_her2st(data_dir / "her2st", "C2", um_per_px=0.75)
    assert s.um_per_px == 0.75


def test_read_st_olfactory_bulb(fx):
    s = read_st(fx / "st_mouse_olfactory_bulb")
    _check_common(s)
    assert s.n_spots == 282 and s.counts.n_vars == 10
    assert 6.0 <= s.um_per_px <= 8.5
    assert s.meta["tissue_mask_path"].endswith("mask.png")
    assert s.counts.obs.loc["17x17", "array_col"] == 17
    np.testing.assert_allclose(s.counts[["17x17"]].obsm["spatial"][0], [462.1, 465.8])


def test_visium_v1_mouse_brain(fx):
    with pytest.warns(UserWarning, match="low-resolution"):
        s = read_visium(fx / "visium_v1_mouse_brain_100genes")
    _check_common(s)
    assert s.n_spots == 2695 and s.counts.n_vars == 100
    assert s.platform == "visium" and s.spot_diameter_um == 55
    assert s.meta["image_source"] == "lowres"
    assert s.meta["um_per_px_fullres"] == pytest.approx(100 / 137, rel=0.02)
    # spots are 100 um apart in the image the Section carries
    from histosr.section import estimate_pitch_px

    assert estimate_pitch_px(s.xy) * s.um_per_px == pytest.approx(100, rel=0.03)


def test_visium_v1_human_placeholder_hires(fx):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = read_visium(fx / "visium_v1_human_100spots")
    assert any("placeholder" in str(w.message) for w in rec)
    _check_common(s)
    assert s.n_spots == 100
    assert s.meta["image_source"] == "lowres" and s.meta["hires_placeholder"]


def test_visium_sr3_mtx(fx):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = read_visium(fx / "visium_sr3_cytassist_mouse_embryo")
    _check_common(s)
    assert s.n_spots == 2898 and s.counts.n_vars == 19465
    assert s.meta["var_names_made_unique"] > 0
    assert "detected_tissue" not in s.meta["image_path"]
    assert s.counts.X.sum() > 0


def test_visium_user_image_keeps_fullres_coordinates(fx):
    class Blank(ImageSource):  # a full-resolution image without the memory
        shape = (12000, 12000, 3)

        def _read(self, y0, x0, y1, x1):
            return np.full((y1 - y0, x1 - x0, 3), 230, np.uint8)

    d = fx / "visium_v1_mouse_brain_100genes"
    big = Blank()
    s = read_visium(d, image=big)
    pos = pd.read_csv(d / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    b = s.counts.obs_names[0]
    np.testing.assert_allclose(s.counts[[b]].obsm["spatial"][0], pos.loc[b, [5, 4]].to_numpy())
    assert s.um_per_px == pytest.approx(0.73, rel=0.02)
    s2 = read_visium(d, image=big, um_per_px=0.7)
    assert s2.um_per_px == 0.7


def test_visium_hd(fx):
    with pytest.warns(UserWarning, match="low-resolution"):
        s = read_visium_hd(fx / "visium_hd_layout_10bins")
    _check_common(s)
    assert s.platform == "visium_hd" and s.spot_diameter_um == 2.0
    assert s.n_spots == 10 and s.counts.n_vars == 10
    assert s.meta["um_per_px_fullres"] == pytest.approx(0.27382, rel=1e-4)
    with pytest.warns(UserWarning):
        s2 = read_visium_hd(fx / "visium_hd_layout_10bins" / "square_002um", bin_size=None)
    np.testing.assert_allclose(s2.xy, s.xy)


def test_10x_h5_and_mtx_agree(fx):
    d = fx / "visium_hd_layout_10bins" / "square_002um"
    m1, b1, f1 = read_10x_h5(d / "filtered_feature_bc_matrix.h5")
    m2, b2, f2 = read_10x_mtx(d / "filtered_feature_bc_matrix")
    assert b1 == b2 and f1["name"].tolist() == f2["name"].tolist()
    assert (m1 != m2).nnz == 0


def test_xenium_h5ad(fx):
    d = fx / "xenium_cells_lung_core"
    s = read_h5ad(d / "NCBI858.h5ad", d / "NCBI858.jpg", XENIUM_UM_PER_PX, 20.0,
                  platform="xenium", xy_columns=("y_pixel", "x_pixel"))
    _check_common(s)
    assert s.n_spots == 200 and s.counts.n_vars == 338
    obs = s.counts.obs
    np.testing.assert_allclose(s.xy[:, 0], obs["y_pixel"])
    np.testing.assert_allclose(s.xy[:, 1], obs["x_pixel"])


def test_h5ad_obsm_spatial_and_scale(tmp_path):
    import anndata as ad
    from PIL import Image

    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.poisson(2, (5, 3)).astype(np.float32))
    a.obs_names = [f"s{i}" for i in range(5)]
    a.var_names = ["G1", "G2", "G3"]
    a.obsm["spatial"] = np.array([[10, 20], [30, 40], [50, 60], [70, 80], [90, 10]], float)
    a.write_h5ad(tmp_path / "a.h5ad")
    Image.new("RGB", (100, 50), "white").save(tmp_path / "im.png")
    s = read_h5ad(tmp_path / "a.h5ad", tmp_path / "im.png", 0.5, 10.0, coord_scale=0.5)
    np.testing.assert_allclose(s.xy, a.obsm["spatial"] * 0.5)


def test_istar_round_trip(fx, tmp_path):
    s = read_st(fx / "st_mouse_olfactory_bulb")
    write_istar(s, tmp_path / "ist")
    assert sorted(p.name for p in (tmp_path / "ist").iterdir()) == sorted(
        ["he-raw.jpg", "cnts.tsv", "locs-raw.tsv", "pixel-size-raw.txt", "radius-raw.txt"])
    r = read_istar(tmp_path / "ist", platform="st")
    assert r.counts.obs_names.tolist() == s.counts.obs_names.tolist()
    np.testing.assert_allclose(r.xy, s.xy)
    np.testing.assert_array_equal(r.dense_counts(), s.dense_counts())
    assert r.um_per_px == pytest.approx(s.um_per_px)
    assert r.spot_diameter_um == pytest.approx(100)
    assert r.image.shape == s.image.shape


def test_istar_from_encoded_image(fx, tmp_path):
    with pytest.warns(UserWarning):
        s = read_visium(fx / "visium_v1_mouse_brain_100genes")
    write_istar(s, tmp_path / "v")  # image is an upsampled preview: encoded, not copied
    r = read_istar(tmp_path / "v")
    assert r.platform == "visium" and r.n_spots == s.n_spots
    assert r.image.shape == s.image.shape
    assert r.spot_diameter_um == pytest.approx(55)


def test_read_dispatch(data_dir, fx):
    assert detect_platform(data_dir / "her2st") == "her2st"
    assert detect_platform(fx / "st_mouse_olfactory_bulb") == "st"
    assert detect_platform(fx / "visium_sr3_cytassist_mouse_embryo") == "visium"
    assert detect_platform(fx / "visium_v1_human_100spots" / "filtered_feature_bc_matrix.h5") == "visium"
    assert detect_platform(fx / "visium_hd_layout_10bins") == "visium_hd"
    assert detect_platform(fx / "xenium_cells_lung_core" / "NCBI858.h5ad") == "h5ad"
    assert read(data_dir / "her2st", section="C2").n_spots == 187
    assert read(fx / "st_mouse_olfactory_bulb").platform == "st"
    with pytest.warns(UserWarning):
        assert read(fx / "visium_v1_mouse_brain_100genes").platform == "visium"
        assert read(fx / "visium_hd_layout_10bins").platform == "visium_hd"
    with pytest.raises(SectionError, match="pass section="):
        read(data_dir / "her2st")


def test_make_unique_like_anndata():
    from anndata.utils import make_index_unique

    names = ["a", "a", "a-1", "b", "a", "b"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = list(make_index_unique(pd.Index(names)))
    assert make_unique(names) == (ref, 3)


def test_upsampled_image():
    base = ArrayImage(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3))
    up = UpsampledImage(base, 3)
    assert up.shape == (12, 15, 3)
    full = np.repeat(np.repeat(base.array, 3, 0), 3, 1)
    np.testing.assert_array_equal(up.read(0, 0, 12, 15), full)
    np.testing.assert_array_equal(up.read(4, 2, 5, 7), full[4:9, 2:9])


def test_10x_h5_v2_layout(tmp_path):
    import h5py

    m = np.array([[1, 0, 2], [0, 3, 0]], dtype=np.int32)  # genes x barcodes
    import scipy.sparse as sp

    csc = sp.csc_matrix(m)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        g = f.create_group("GRCh38")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices, csc.indptr
        g["shape"] = np.array(m.shape)
        g["barcodes"] = np.array([b"A-1", b"B-1", b"C-1"])
        g["gene_names"] = np.array([b"G1", b"G1"])
        g["genes"] = np.array([b"E1", b"E2"])
    x, bc, feats = read_10x_h5(tmp_path / "m.h5")
    assert bc == ["A-1", "B-1", "C-1"] and feats["id"].tolist() == ["E1", "E2"]
    np.testing.assert_array_equal(x.toarray(), m.T)
