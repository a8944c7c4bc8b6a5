"""The slide-trained ``ssl`` encoder: deterministic for a seed, resumed from its cache, clear
errors, and features that tell tissue compartments apart."""

import numpy as np
import pytest

from histosr.errors import InputError
from histosr.features import compute, crop_features, get_encoder, ssl
from histosr.features.registry import check_encoder
from test_features import make_section, synth_he

TINY = {"steps": 4, "n_tiles": 48, "batch_size": 16, "dim": 8}


@pytest.fixture(scope="module")
def sec():
    return make_section(synth_he(384, 512))  # 24 x 32 superpixels, tumour | stroma halves


@pytest.fixture(scope="module")
def trained(sec, tmp_path_factory, one_torch_thread):
    cache = tmp_path_factory.mktemp("ssl")
    fm = compute(sec, "ssl", out=cache / "f.zarr", cache_dir=cache, progress=False, **TINY)
    return cache, fm, np.asarray(fm.features[:], np.float32)


def test_deterministic_for_a_seed(sec, trained, tmp_path):
    _, fm, a = trained
    assert fm.dim == 8 * 3 and a.shape == (24, 32, 24)
    # a fresh cache folder: trained again from scratch, same weights, same features
    again = compute(sec, "ssl", out=tmp_path / "f.zarr", cache_dir=tmp_path / "c",
                    progress=False, **TINY)
    np.testing.assert_array_equal(np.asarray(again.features[:], np.float32), a)
    assert again.meta["encoder_params"]["weights_sha256"] == \
        fm.meta["encoder_params"]["weights_sha256"]
    other = ssl.train(sec, tmp_path / "c2", progress=False, **{**TINY, "seed": 1})
    assert get_encoder(f"ssl:{other}").params["weights_sha256"] != \
        fm.meta["encoder_params"]["weights_sha256"]


def test_resumes_from_cache_without_training(sec, trained, tmp_path, monkeypatch):
    cache, fm, a = trained

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the weights are cached")

    monkeypatch.setattr(ssl, "_train_state", no_training)
    path = ssl.train(sec, cache, progress=False, **TINY)
    assert path.parent == cache and path.name.startswith("ssl-")
    # new feature file, cached weights: identical features
    b = compute(sec, "ssl", out=tmp_path / "g.zarr", cache_dir=cache, progress=False, **TINY)
    np.testing.assert_array_equal(np.asarray(b.features[:], np.float32), a)
    # the trained file is an encoder of its own, also on spot crops
    c = crop_features(sec, f"ssl:{path}", size_um=40.0)
    assert c.shape == (2, 2 * fm.dim) and np.isfinite(c).all()


def test_features_separate_compartments(trained):
    """The two tissue halves (nuclei-dense tumour | striped stroma) get different tokens:
    the gap between the halves' mean features exceeds the spread within each."""
    _, fm, a = trained
    tok = a[..., :8]
    left, right = tok[6:18, 6:14].reshape(-1, 8), tok[6:18, 18:26].reshape(-1, 8)
    gap = np.linalg.norm(left.mean(0) - right.mean(0))
    spread = np.sqrt(left.var(0).sum() + right.var(0).sum())
    assert gap > spread


def test_bad_parameters_fail_clearly(tmp_path):
    with pytest.raises(InputError, match="steps"):
        check_encoder("ssl", steps=0)
    with pytest.raises(InputError, match="batch_size"):
        get_encoder("ssl", batch_size=1)
    with pytest.raises(InputError, match="trained on the section"):
        get_encoder("ssl").embed_tiles(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(InputError, match="not found"):
        get_encoder(f"ssl:{tmp_path / 'missing.pt'}")
    bad = tmp_path / "bad.pt"
    import torch

    torch.save({"state": {}}, bad)
    with pytest.raises(InputError, match="not an ssl encoder checkpoint"):
        get_encoder(f"ssl:{bad}")


def test_ridge_keeps_one_network_for_predicted_sections(tmp_path, monkeypatch):
    """A spot method fitted with "ssl" trains one network on its training sections' images
    and keeps it ("ssl:<weights>"): predicting another section trains nothing."""
    from _hespotex_data import sections
    from histosr.image_only import image_only_view
    from histosr.methods.base import get_method
    from histosr.pp import select_genes

    for k, v in TINY.items():
        monkeypatch.setitem(ssl.TRAIN_DEFAULTS, k, v)
    train, test = sections()[:2], sections()[3]
    genes = select_genes(train, 20)
    m = get_method("ridge", encoder="ssl", scales=(1.0,), cache_dir=str(tmp_path))
    m.fit(train, genes=genes)
    assert m.encoder.startswith("ssl:") and m.encoder.endswith(".pt")
    monkeypatch.setattr(ssl, "_train_state", lambda *a, **k: pytest.fail("trained again"))
    pred = m.predict(image_only_view(test))
    assert pred.shape == (test.n_spots, 20) and np.isfinite(np.asarray(pred.X)).all()
