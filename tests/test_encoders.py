"""Foundation-model encoders (uni, uni2, timm:, quiltnet, hipt) with random weights of the
real architectures at small inputs; weights files, errors and the torchvision shim."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from histosr._compat import patch_torchvision  # noqa: E402

patch_torchvision()
pytest.importorskip("timm")

from histosr.features import available_encoders, compute, get_encoder  # noqa: E402
from histosr.features.foundation import (  # noqa: E402
    WeightsMismatchError,
    WeightsNotFoundError,
    file_sha16,
)


@pytest.fixture(autouse=True)
def _two_threads_no_weights_dir(monkeypatch, tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # no user weights folder leaks into the tests
    monkeypatch.setenv("HISTOSR_WEIGHTS_DIR", str(tmp_path_factory.mktemp("no-weights")))
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(k, raising=False)


def tiles(n, h, w=None, seed=0):
    """H&E-ish random uint8 tiles."""
    rng = np.random.default_rng(seed)
    w = h if w is None else w
    base = rng.normal([200, 140, 190], 30, (n, h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def checksum(y):
    y = np.asarray(y, dtype=np.float64)
    return [float(np.abs(y).mean()), float(y[(0,) * (y.ndim - 1)][:8].sum()),
            float((y * np.linspace(-1, 1, y.shape[-1])).sum() / y.size)]


# recorded with random_init seed 0, torch 2.13 / timm 1.0.31 / open_clip 3.3.0 (CPU, fp32)
EXPECTED = {
    "uni": [0.7981577058420768, 2.023414134979248, -0.000617725557381407],
    "uni2": [0.8007812652613863, 0.01629369705915451, 0.005023406532711436],
    "quiltnet": [0.035623902780578476, -0.055486243683844805, 0.00019700787933558814],
    "quiltnet_tokens": [0.035001831800814516, 0.0038382033817470074, -0.0018375958781768169],
    "hipt": [0.7949218918053353, -2.7273461371660233, 0.01826565970453115],
    "timm_tiny": [0.8082101047262154, -2.6957051381468773, 0.05611108317388707],
}


def assert_checksum(key, y):
    got = checksum(y)
    want = EXPECTED[key]
    assert want is not None, f"record EXPECTED[{key!r}] = {got}"
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)


@pytest.fixture(scope="module")
def uni():
    return get_encoder("uni", random_init=True, device="cpu")


@pytest.fixture(scope="module")
def quilt():
    pytest.importorskip("open_clip")
    return get_encoder("quiltnet", random_init=True, device="cpu")


@pytest.fixture(scope="module")
def hipt():
    return get_encoder("hipt", random_init=True, region_sp=32, device="cpu")


@pytest.fixture(scope="module")
def tiny():
    return get_encoder("timm:vit_tiny_patch16_224", random_init=True, seed=3, device="cpu")


# one forward per big model, shared by the tests (ViT-L on 2 cores is seconds per tile)
@pytest.fixture(scope="module")
def uni_out(uni):
    x = tiles(1, 224)
    return x, uni.embed_tiles(x)


@pytest.fixture(scope="module")
def quilt_out(quilt):
    x = tiles(1, 224)
    return x, quilt.embed_tiles(x)


@pytest.fixture(scope="module")
def hipt_out(hipt):
    x = tiles(1, 512)
    return x, hipt.embed_tiles(x)


def test_registry_lists_all_encoders():
    names = available_encoders()
    for n in ("handcrafted", "uni", "uni2", "timm:", "quiltnet", "hipt"):
        assert n in names


def test_timm_imports_after_patch():
    import timm
    import torchvision  # noqa: F401 - Python side only

    assert callable(timm.create_model)


def test_uni_tokens_one_tile(uni, uni_out):
    assert (uni.dim, uni.window_sp, uni.input_px, uni.context_sp) == (1024, 14, 224, 0)
    assert sum(p.numel() for p in uni.model.parameters()) > 300e6  # the real ViT-L/16
    y = uni_out[1]
    assert y.shape == (1, 14, 14, 1024) and y.dtype == np.float32
    assert_checksum("uni", y)
    assert uni.meta["weights_sha256"] is None and uni.params["weights"] == "random:0"


def test_uni_end_to_end_compute(uni, uni_out, tmp_path):
    """features.compute with a ViT: 224 px tiles (tile_sp=14); only the tile with tissue
    is encoded, and its tokens are those of embed_tiles on the same pixels."""
    from histosr.image import ArrayImage
    from histosr.section import Section, make_counts

    x, ref = uni_out
    img = np.full((320, 288, 3), 255, np.uint8)
    img[:224, :224] = x[0]
    xy = np.array([[100.0, 100.0], [120.0, 100.0]])
    counts = make_counts(np.ones((2, 1)), ["a", "b"], ["g"], xy)
    s = Section(image=ArrayImage(img), um_per_px=0.5, counts=counts, spot_diameter_um=55.0,
                name="vit", platform="synthetic")
    mask = np.zeros((20, 18), bool)
    mask[:14, :14] = True
    fm = compute(s, encoder=uni, tile_sp=14, progress=False, mask=mask,
                 out=tmp_path / "f.zarr", n_jobs=1)
    f = np.asarray(fm.features[:], dtype=np.float32)
    assert f.shape == (20, 18, 1024)
    np.testing.assert_allclose(f[:14, :14], ref[0], rtol=1e-2, atol=1e-2)  # fp16 on disk
    assert not f[14:].any() and not f[:, 14:].any()


def test_uni2_real_config_small_window():
    e = get_encoder("uni2", random_init=True, window_sp=4, device="cpu")
    m = e.model
    assert (m.num_prefix_tokens, m.embed_dim, len(m.blocks)) == (9, 1536, 24)
    # SwiGLUPacked = GluMlp with SiLU, packed fc1 (2 x hidden), gate first
    mlp = m.blocks[0].mlp
    assert type(mlp).__name__ == "GluMlp" and mlp.fc1.out_features == 2 * mlp.fc2.in_features
    assert isinstance(mlp.act, torch.nn.SiLU) and mlp.fc2.in_features == 4096
    assert (e.dim, e.input_px) == (1536, 56)  # 64 px window -> 56 px: one 14 px patch per sp
    y = e.embed_tiles(tiles(1, 64))
    assert y.shape == (1, 4, 4, 1536)
    assert_checksum("uni2", y)


def test_quiltnet_crop_and_tokens(quilt, quilt_out):
    y = quilt_out[1]
    assert y.shape == (1, 14, 14, 512)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-4)
    assert np.allclose(y[0, 0, 0], y[0, 13, 13])  # one embedding per 224 px window
    assert_checksum("quiltnet", y)
    c = quilt.embed_crops(tiles(2, 110))
    assert c.shape == (2, 512)
    tok = copy.copy(quilt)  # same weights, the other mode (a second build costs seconds)
    tok.mode = "tokens"
    yt = tok.embed_tiles(tiles(1, 224))
    assert yt.shape == (1, 14, 14, 512)
    assert np.allclose(yt[0, 0, 0], yt[0, 1, 1]) and not np.allclose(yt[0, 0, 0], yt[0, 2, 2])
    assert_checksum("quiltnet_tokens", yt)


def test_hipt_shapes(hipt, hipt_out):
    y = hipt_out[1]
    assert y.shape == (1, 32, 32, 576)
    region = y[0, :, :, :192]
    assert np.allclose(region[0, 0], region[15, 15]) and not np.allclose(region[0, 0],
                                                                         region[16, 16])
    assert_checksum("hipt", y)
    assert hipt.embed_crops(tiles(1, 128)).shape == (1, 384)


def test_timm_any_vit_roundtrip_by_path(tiny, tmp_path):
    e = tiny
    x = tiles(2, 224, seed=5)
    y = e.embed_tiles(x)
    assert y.shape == (2, 14, 14, 192)
    assert_checksum("timm_tiny", e.embed_tiles(tiles(1, 224)))
    path = tmp_path / "vit_tiny.pth"
    torch.save(e.model.state_dict(), path)
    e2 = get_encoder("timm:vit_tiny_patch16_224", weights=path, device="cpu")
    np.testing.assert_array_equal(e2.embed_tiles(x), y)
    assert e2.meta["weights_sha256"] == file_sha16(path) and len(file_sha16(path)) == 16
    assert e2.params["weights"] == file_sha16(path) != e.params["weights"]


def test_tiles_not_multiple_of_window(tiny):
    """Edge tiles (not whole windows) are white-padded to a window and cropped back."""
    e = tiny
    t = tiles(2, 224, seed=6)
    t[:, :, 128:] = 255
    t[:, 160:] = 255
    y = e.embed_tiles(t[:, :160, :128])  # 10 x 8 sp
    assert y.shape == (2, 10, 8, 192)
    np.testing.assert_allclose(y, e.embed_tiles(t)[:, :10, :8], rtol=1e-5, atol=1e-5)
    y2 = e.embed_tiles(np.concatenate([t, t], axis=2))  # 14 x 28 sp: two windows
    np.testing.assert_allclose(y2[:, :, 14:], y2[:, :, :14], rtol=1e-5, atol=1e-5)


def test_hipt_roundtrip_dino_checkpoints_from_weights_dir(hipt, hipt_out, tmp_path,
                                                          monkeypatch):
    d = tmp_path / "w"
    (d / "hipt").mkdir(parents=True)
    # DINO-style files: {"teacher": {"backbone.<key>": ..., "head.<dino head>": ...}}
    for fname, mod in (("vit256_small_dino.pth", hipt.vit256),
                       ("vit4k_xs_dino.pth", hipt.vit4k)):
        sd = {f"backbone.{k}": v for k, v in mod.state_dict().items()}
        sd["head.last_layer.weight"] = torch.zeros(4, 4)
        torch.save({"teacher": sd, "epoch": 1}, d / "hipt" / fname)
    monkeypatch.setenv("HISTOSR_WEIGHTS_DIR", str(d))
    h2 = get_encoder("hipt", region_sp=32, device="cpu")
    x, y = hipt_out
    np.testing.assert_array_equal(h2.embed_tiles(x), y)
    assert h2.meta["weights_source"] == "file" and "+" in h2.meta["weights_sha256"]


def test_quiltnet_roundtrip_full_clip_checkpoint(quilt, quilt_out, tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    sd = {f"visual.{k}": v for k, v in quilt.model.state_dict().items()}
    sd["text_projection"] = torch.zeros(2, 2)  # the text tower is ignored
    torch.save(sd, path)
    q2 = get_encoder("quiltnet", weights=tmp_path, device="cpu")  # a folder works too
    x, y = quilt_out
    np.testing.assert_array_equal(q2.embed_tiles(x), y)


def test_missing_weights_say_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HISTOSR_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsNotFoundError) as ei:
        get_encoder("uni")
    msg = str(ei.value)
    assert "huggingface.co/MahmoodLab/UNI" in msg and "pytorch_model.bin" in msg
    assert "$HISTOSR_WEIGHTS_DIR/uni/pytorch_model.bin" in msg and "weights=" in msg
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        get_encoder("uni2", weights=tmp_path / "nope.bin")
    with pytest.raises(WeightsNotFoundError, match="HF_TOKEN"):
        get_encoder("uni", hub=True)
    with pytest.raises(WeightsNotFoundError, match="vit256_small_dino.pth"):
        get_encoder("hipt")
    with pytest.raises(WeightsNotFoundError, match="QuiltNet-B-32"):
        get_encoder("quiltnet")


def test_mismatched_checkpoint_is_explained(tiny, tmp_path):
    e = tiny
    path = tmp_path / "pytorch_model.bin"
    torch.save(e.model.state_dict(), path)
    with pytest.raises(WeightsMismatchError) as ei:
        get_encoder("uni", weights=path)
    msg = str(ei.value)
    assert "UNI architecture" in msg and "shape mismatch" in msg
    assert "huggingface.co/MahmoodLab/UNI" in msg
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="not a readable"):
        get_encoder("uni", weights=path)
