import numpy as np
import pytest

from _hespotex_data import sections
from histosr.benchmark.p3 import score_section
from histosr.image_only import image_only_view
from histosr.methods.base import Method, get_method
from histosr.methods.ridge import choose_alpha
from histosr.pp import select_genes


def _fold(name, **kw):
    train, test = sections()[:3], sections()[3]
    genes = select_genes(train, 1000)
    m = get_method(name, **kw).fit(train, genes=genes)
    pred = m.predict(image_only_view(test))
    assert pred.uns["histosr"]["scale"] == "log1p_cp10k"
    return m, score_section(np.asarray(pred.X), test, genes)


def test_ridge_and_knn_beat_training_mean_on_held_out_section(tmp_path):
    _, mean = _fold("mean")
    assert mean["top50_pcc"] == 0.0
    m, ridge = _fold("ridge", cache_dir=str(tmp_path))
    assert ridge["top50_pcc"] > 0.3 and ridge["mae"] < mean["mae"]
    assert m.fit_info_["alpha"] > 0 and m.pca_components_.shape[0] <= 256
    _, knn = _fold("knn_features", cache_dir=str(tmp_path))
    assert knn["top50_pcc"] > 0.25
    # save / load round trip predicts the same
    m.save(tmp_path / "model")
    m2 = Method.load(tmp_path / "model")
    test = image_only_view(sections()[3])
    np.testing.assert_allclose(m2.predict(test).X, m.predict(test).X, rtol=1e-5, atol=1e-5)


def test_standardize_modes_and_errors():
    train = sections()[:2]
    genes = select_genes(train, 20)
    m = get_method("ridge", standardize="global", alpha=10.0).fit(train, genes=genes)
    assert m.alpha_ == 10.0 and m.predict(image_only_view(sections()[3])).shape[1] == 20
    with pytest.raises(ValueError, match="standardize"):
        get_method("ridge", standardize="bogus").fit(train, genes=genes)


def test_choose_alpha_prefers_strong_penalty_on_noise():
    rng = np.random.default_rng(0)
    Xs = [rng.normal(size=(40, 30)) for _ in range(3)]
    Ys = [rng.normal(size=(40, 5)) for _ in range(3)]
    assert choose_alpha(Xs, Ys) >= 100.0
    w = rng.normal(size=(30, 5))
    Ys = [x @ w + 0.01 * rng.normal(size=(40, 5)) for x in Xs]
    assert choose_alpha(Xs, Ys) <= 10.0
    assert choose_alpha(Xs[:1], Ys[:1]) <= 10.0  # one section: GCV
