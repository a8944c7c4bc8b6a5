import numpy as np
import pytest
from scipy import ndimage as ndi

import histosr.features.tiling as tiling
from histosr.features import FeatureMap, compute, get_encoder, nuclear
from histosr.features.handcrafted import BASE_FEATURES
from histosr.geometry import grid_for
from histosr.image import ArrayImage
from histosr.section import Section, make_counts


def synth_he(h, w, seed=0, texture_split=False):
    """White glass with a tissue rectangle. Left half: pink with dense dark nuclei; right
    half: stroma-like pink, or (``texture_split``) flat noise of the left half's mean colour
    so that only texture tells the halves apart."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(243, 3, (h, w, 3)), 0, 255)
    t0, t1 = 64, h - 64
    l0, l1 = 64, w - 64
    mid = w // 2
    tum = np.clip(rng.normal([215, 150, 195], 8, (t1 - t0, mid - l0, 3)), 0, 255)
    seeds = rng.random((t1 - t0, mid - l0)) < 0.006
    nuc = ndi.binary_dilation(seeds, iterations=4)
    tum[nuc] = rng.normal([70, 40, 130], 10, (int(nuc.sum()), 3))
    img[t0:t1, l0:mid] = tum
    if texture_split:
        mean = tum.reshape(-1, 3).mean(0)
        img[t0:t1, mid:l1] = np.clip(rng.normal(mean, 8, (t1 - t0, l1 - mid, 3)), 0, 255)
    else:
        yy = np.arange(t0, t1)[:, None]
        stripes = 12 * np.sin(yy / 3.0 + np.arange(mid, l1)[None, :] / 9.0)
        base = np.array([232, 160, 185])[None, None] + stripes[..., None]
        img[t0:t1, mid:l1] = np.clip(base + rng.normal(0, 5, (t1 - t0, l1 - mid, 3)), 0, 255)
    return img.astype(np.uint8)


def make_section(img, um_per_px=0.5, name="syn"):
    xy = np.array([[img.shape[1] / 2, img.shape[0] / 2], [img.shape[1] / 3, img.shape[0] / 2]])
    counts = make_counts(np.ones((2, 1)), ["a", "b"], ["g"], xy)
    return Section(name, ArrayImage(img), um_per_px, counts, 55.0, "synthetic")


@pytest.fixture(scope="module")
def sec():
    return make_section(synth_he(1024, 1280))  # 64 x 80 superpixels


def arr(fm):
    return np.asarray(fm.features[:]).astype(np.float32)


def test_encoder_protocol():
    assert get_encoder("handcrafted").params == get_encoder("handcrafted:v1").params
    enc = get_encoder("handcrafted:v2")  # with the nuclei group
    assert enc.dim == len(enc.feature_names) == 3 * (len(BASE_FEATURES) + len(nuclear.FEATURES))
    v1 = get_encoder("handcrafted:v1")  # the original 63-dim encoder, same parameters
    assert v1.dim == 3 * len(BASE_FEATURES) and "groups" not in v1.params
    assert enc.context_sp == 8 and enc.patch_um == 8.0
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    out = enc.embed_tiles(tiles)
    assert out.shape == (2, 4, 3, enc.dim) and out.dtype == np.float32
    assert np.isfinite(out).all()
    with pytest.raises(ValueError):
        enc.embed_tiles(tiles[:, :40])


def test_shape_dim_mask(sec, tmp_path):
    fm = compute(sec, out=tmp_path / "f.zarr", progress=False)
    assert fm.shape == grid_for(sec).shape == (64, 80)
    assert fm.dim == get_encoder("handcrafted").dim
    assert fm.features.dtype == np.float16
    assert fm.mask.shape == fm.shape
    # tissue rectangle is px 64..960 x 64..1216 -> superpixels 4..60 x 4..76
    assert fm.mask[6:58, 6:74].all() and not fm.mask[:3].any() and not fm.mask[:, :3].any()
    f = arr(fm)
    assert np.isfinite(f).all()
    assert (np.abs(f[fm.mask]).sum(axis=1) > 0).all()
    assert fm.meta["feature_names"][:3] == ["r_mean", "g_mean", "b_mean"]
    np.testing.assert_allclose(f[fm.mask][:, 0].mean(), 0.8, atol=0.1)  # pink-ish red mean


@pytest.mark.parametrize("tissue_only", [False, True])
def test_tiling_invariance(sec, tmp_path, tissue_only):
    a = compute(sec, "handcrafted:v2", out=tmp_path / "a.zarr", tile_sp=16, progress=False,
                tissue_only=tissue_only, n_jobs=1)
    b = compute(sec, "handcrafted:v2", out=tmp_path / "b.zarr", tile_sp=64, progress=False,
                tissue_only=tissue_only, n_jobs=2)
    fa, fb = arr(a), arr(b)
    sel = a.mask if tissue_only else np.ones(a.shape, bool)
    px = 3 * len(BASE_FEATURES)  # pixel statistics: exact whatever the tiling
    np.testing.assert_allclose(fa[sel][:, :px], fb[sel][:, :px], rtol=2e-3, atol=2e-4)
    # nuclear morphometrics: a clump of nuclei cut by a tile edge (beyond the 24 um halo)
    # can split differently; a few superpixels change, none by much at context scales
    na, nb = fa[sel][:, px:], fb[sel][:, px:]
    scale = na.std(axis=0) + 1e-3
    assert np.mean(np.abs(na - nb) / scale > 0.05) < 0.03


def test_context_blocks_invariance(sec, tmp_path, monkeypatch):
    # pass 2 (context) runs in blocks of columns with a halo on every side, so its memory
    # does not grow with the slide's width: narrow blocks give the same features
    from histosr.features import tiling

    a = arr(compute(sec, "handcrafted", out=tmp_path / "a.zarr", tile_sp=16, progress=False,
                    tissue_only=False, n_jobs=1))
    monkeypatch.setattr(tiling, "PASS2_COLS", 5)
    b = arr(compute(sec, "handcrafted", out=tmp_path / "b.zarr", tile_sp=16, progress=False,
                    tissue_only=False, n_jobs=1))
    assert a.shape[1] > 3 * 5  # several blocks per band
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)


def test_tiling_invariance_resampled(tmp_path):
    # 0.6 um/px: tiles are resampled to 0.5 um/px; tiles differ only by resampling rounding
    # (+-1 grey level), which can flip a few threshold/count features of single superpixels
    s = make_section(synth_he(700, 800, seed=3), um_per_px=0.6)
    a = arr(compute(s, "handcrafted:v2", out=tmp_path / "a.zarr", tile_sp=16, progress=False,
                    tissue_only=False))
    b = arr(compute(s, "handcrafted:v2", out=tmp_path / "b.zarr", tile_sp=48, progress=False,
                    tissue_only=False))
    scale = a.reshape(-1, a.shape[2]).std(axis=0) + 1e-3
    err = np.abs(a - b) / scale
    px = 3 * len(BASE_FEATURES)  # pixel statistics; then the nuclear morphometrics
    assert np.mean(err[..., :px] > 0.05) < 5e-3
    assert (np.percentile(err[..., :px].reshape(-1, px), 95, axis=0) < 0.05).all()
    # a +-1 grey level can move a nucleus's centroid into the neighbouring superpixel or
    # split it differently: per-superpixel nuclear values flip more often, context less
    assert np.mean(err[..., px:] > 0.05) < 0.05
    assert np.median(err[..., px:]) < 0.01


def test_generic_encoder_halo(sec, tmp_path):
    class BoxRGB:
        """Plain protocol encoder with context: mean colour over 5 x 5 superpixels."""

        name, dim, patch_um, context_sp = "boxrgb", 3, 8.0, 2
        params = {"v": 1}

        def embed_tiles(self, batch):
            b, t, u, _ = batch.shape
            m = batch.reshape(b, t // 16, 16, u // 16, 16, 3).mean(axis=(2, 4))
            return ndi.uniform_filter(m, size=(1, 5, 5, 1), mode="nearest").astype(np.float32)

    a = arr(compute(sec, BoxRGB(), out=tmp_path / "a.zarr", tile_sp=8, progress=False,
                    tissue_only=False))
    b = arr(compute(sec, BoxRGB(), out=tmp_path / "b.zarr", tile_sp=40, progress=False,
                    tissue_only=False))
    inner = (slice(2, -2), slice(2, -2))  # the image border sees white padding, not reflection
    np.testing.assert_allclose(a[inner], b[inner], rtol=1e-3)


def test_deterministic(sec, tmp_path):
    a = arr(compute(sec, out=tmp_path / "a.zarr", progress=False))
    b = arr(compute(sec, out=tmp_path / "b.zarr", progress=False, n_jobs=1))
    assert np.array_equal(a, b)


def test_features_discriminate_texture(tmp_path):
    """Same mean colour, different texture (nuclei vs flat): a linear classifier on the
    standardised 8 um base features (no context) classifies held-out rows of superpixels."""
    from sklearn.linear_model import LogisticRegression

    s = make_section(synth_he(1024, 1024, seed=1, texture_split=True))
    fm = compute(s, out=tmp_path / "f.zarr", progress=False)
    nb = len(BASE_FEATURES)
    f = arr(fm)[..., :nb]
    rows = np.arange(8, 56)
    left, right = f[rows][:, 8:28], f[rows][:, 36:56]  # away from the boundary at col 32
    # the mean colours match, so colour means alone cannot separate the halves
    assert np.abs(left[..., :3].mean((0, 1)) - right[..., :3].mean((0, 1))).max() < 0.03

    def xy(sl):
        x = np.concatenate([left[sl].reshape(-1, nb), right[sl].reshape(-1, nb)])
        y = np.r_[np.ones(left[sl].shape[0] * left.shape[1]), np.zeros(right[sl].shape[0] * right.shape[1])]
        return x, y

    x, y = xy(slice(0, 24))
    xt, yt = xy(slice(24, 48))
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000).fit((x - mu) / sd, y)
    assert clf.score((xt - mu) / sd, yt) > 0.95
    i = BASE_FEATURES.index("nuclei_count")
    assert left[..., i].mean() > 2 * right[..., i].mean() + 0.5


def test_cache_reuse_and_resume(sec, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = tiling.read_calibrated

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(tiling, "read_calibrated", counting)
    a = compute(sec, cache_dir=tmp_path, tile_sp=16, progress=False, tissue_only=False)
    full = calls["n"]
    assert full == 4 * 5
    calls["n"] = 0
    b = compute(sec, cache_dir=tmp_path, tile_sp=16, progress=False, tissue_only=False)
    assert calls["n"] == 0 and b.path == a.path
    # a different parameter is a different entry
    c = compute(sec, cache_dir=tmp_path, tile_sp=16, progress=False, tissue_only=False,
                context_um=(32.0,))
    assert c.path != a.path and c.dim == 2 * len(BASE_FEATURES)  # the default: no nuclei

    # resume: a run killed after two bands restarts from the third
    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 11:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "resume.zarr"
    monkeypatch.setattr(tiling, "read_calibrated", dying)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        compute(sec, out=out, tile_sp=16, progress=False, tissue_only=False, n_jobs=1)
    assert not out.exists() and (tmp_path / "resume.zarr.partial").exists()
    monkeypatch.setattr(tiling, "read_calibrated", counting)
    calls["n"] = 0
    r = compute(sec, out=out, tile_sp=16, progress=False, tissue_only=False)
    assert calls["n"] == full - 2 * 5
    assert np.array_equal(arr(r), arr(a))
    assert not (tmp_path / "resume.zarr.partial").exists()


def test_temporary_output_and_roundtrip(sec, tmp_path, monkeypatch):
    monkeypatch.delenv("HISTOSR_CACHE_DIR", raising=False)  # no shared cache: a temp store
    fm = compute(sec, progress=False, tile_sp=32)
    assert fm.path is not None and "histosr-features-" in fm.path
    saved = fm.save(tmp_path / "copy.zarr")
    loaded = FeatureMap.load(tmp_path / "copy.zarr")
    assert np.array_equal(arr(loaded), arr(fm)) and np.array_equal(loaded.mask, fm.mask)
    assert loaded.grid == fm.grid and loaded.encoder == "handcrafted"
    assert loaded.meta["feature_names"] == fm.meta["feature_names"] == saved.meta["feature_names"]
    r, c = fm.tissue_cells()
    np.testing.assert_array_equal(loaded.gather(r[:50], c[:50]), arr(fm)[r[:50], c[:50]])


def test_gather_reads_bounded_bands(sec, tmp_path, monkeypatch):
    """gather reads whole zarr chunk rows of about _GATHER_BYTES: the same cells, in the
    order asked, whatever the band (a tiny budget forces one chunk row per read)."""
    from histosr.features import featuremap

    fm = compute(sec, out=tmp_path / "b.zarr", tile_sp=8, progress=False, tissue_only=False)
    loaded = FeatureMap.load(tmp_path / "b.zarr")
    step = loaded.features.chunks[0]
    monkeypatch.setattr(featuremap, "_GATHER_BYTES", 1)
    assert loaded._gather_band() == step
    rng = np.random.default_rng(0)
    h, w = loaded.shape
    r, c = rng.integers(0, h, 500), rng.integers(0, w, 500)
    np.testing.assert_array_equal(loaded.gather(r, c), arr(fm)[r, c].astype(np.float32))
    monkeypatch.setattr(featuremap, "_GATHER_BYTES", 2**40)
    assert loaded._gather_band() >= h
    np.testing.assert_array_equal(loaded.gather(r, c), arr(fm)[r, c].astype(np.float32))


def test_given_mask(sec, tmp_path):
    m = np.zeros(grid_for(sec).shape, bool)
    m[20:30, 20:30] = True
    fm = compute(sec, out=tmp_path / "m.zarr", mask=m, tile_sp=16, progress=False)
    assert np.array_equal(fm.mask, m)
    f = arr(fm)
    assert (np.abs(f[m]).sum(1) > 0).all()
    # tiles with no tissue within context_sp (8) superpixels are skipped: zeros
    assert (f[48:] == 0).all() and (f[:, 48:] == 0).all()
    assert (np.abs(f[12:16, 12:16]).sum(-1) > 0).all()
    with pytest.raises(ValueError, match="mask shape"):
        compute(sec, out=tmp_path / "bad.zarr", mask=m[:-1], progress=False)
