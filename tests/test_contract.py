"""The method contract, checked on every registered method (scikit-learn's check_estimator
idea): a method joins the registry only with an entry in TINY, and then has to fit on a tiny
synthetic section, predict its natural target with the right genes and shape, give the
identical prediction after save/load, reject a bad parameter with the validation message,
and give the same output for the same seed."""

import json

import numpy as np
import pytest

import histosr as hs
from histosr.methods.base import KINDS, SCALES, NotFittedError
from histosr.params import ParameterError

#: tiny settings per method (fast fits); every registered method must have an entry
TINY = {
    "istar": {"epochs": 3, "n_states": 2, "hidden": 16, "device": "cpu"},
    "histex": {"epochs": 2, "n_states": 1, "embed_dim": 16, "heads": 2, "hidden": (16,),
               "batch_size": 8, "device": "cpu"},
    "deephex": {"epochs": 2, "n_states": 1, "embed_dim": 16, "heads": 2, "hidden": (16,),
                "batch_size": 8, "device": "cpu"},
    "nearest": {}, "bilinear": {}, "knn": {}, "hybrid": {"n_folds": 3},
    "hishrst": {"epochs": 2, "crop_um": 32.0, "chunk_size": 12, "hidden": 32, "device": "cpu"},
    "trihrge": {"epochs": 2, "target_um": 32.0, "region_um": 96.0, "chunk_size": 12, "dim": 32,
                "device": "cpu"},
    "ridge": {"scales": (1.0,)}, "knn_features": {"scales": (1.0,), "k": 5}, "mean": {},
    "hespotex": {"gate_epochs": 3, "epochs": 2, "head_hidden": 16, "gate_hidden": 16,
                 "latent_dim": 8, "nuclei": False, "device": "cpu"},
}
GENES = None  # filled by the fixture: the tiny section's 6 most variable genes
METHODS = hs.available_methods()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    from histosr.simulate import synthetic_visium

    sec = synthetic_visium(seed=0, size_um=700, n_genes=10)
    fm = hs.features(sec, cache_dir=tmp_path_factory.mktemp("f"), progress=False)
    genes = hs.pp.select_genes(sec, 6)
    return sec, fm, genes


def test_every_method_has_tiny_settings():
    assert sorted(TINY) == sorted(METHODS), "add tiny settings for new methods to TINY"


def _build(name, tmp, **extra):
    m = hs.get_method(name, **TINY[name], **extra)
    m.progress = False
    if "cache_dir" in m.param_names():
        m.cache_dir = str(tmp)
    return m


def _fit_predict(name, tiny, tmp, **extra):
    sec, fm, genes = tiny
    m = _build(name, tmp, **extra)
    feats = fm if m.kind == "superpixel" else None
    m.fit(sec, feats, genes=genes)
    return m, m.predict(sec, feats)


@pytest.mark.parametrize("name", METHODS)
def test_contract(name, tiny, tmp_path):
    sec, fm, genes = tiny
    cls = hs.methods.base.method_class(name)
    tags = cls.tags()
    assert tags["kind"] in KINDS and tags["scale"] == SCALES[tags["kind"]]
    with pytest.raises(NotFittedError, match="not fitted"):
        _build(name, tmp_path).predict(sec, fm)
    m, pred = _fit_predict(name, tiny, tmp_path)
    # the natural target, the right genes and shape, the declared scale
    assert list(pred.var_names) == genes
    if tags["target"] == "superpixels":
        assert pred.n_obs == int(fm.mask.sum()) and {"row", "col"} <= set(pred.obs)
    else:
        assert list(pred.obs_names) == list(sec.counts.obs_names)
    info = pred.uns["histosr"]
    assert info["method"] == name and info["kind"] == tags["kind"]
    assert info["scale"] == tags["scale"] and info["in_sample"] is True
    assert np.isfinite(pred.X).all()
    # hs.predict is the same call, at the same natural target
    np.testing.assert_array_equal(hs.predict(m, sec, fm).X, pred.X)
    # save / load: identical prediction; the folder holds no pickle and no absolute path
    m.save(tmp_path / "model")
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert "model.json" in files and not any(f.endswith((".pkl", ".pickle")) for f in files)
    doc = json.loads((tmp_path / "model" / "model.json").read_text())
    assert not {"cache_dir", "checkpoint_dir", "device", "progress"} & set(doc["params"])
    assert doc["histosr_version"] == hs.__version__
    m2 = hs.load_method(tmp_path / "model", **({"cache_dir": str(tmp_path)}
                                                 if "cache_dir" in m.param_names() else {}))
    m2.progress = False
    np.testing.assert_array_equal(m2.predict(sec, fm if m.kind == "superpixel" else None).X,
                                  pred.X)
    # the same seed gives the same output
    _, again = _fit_predict(name, tiny, tmp_path)
    np.testing.assert_array_equal(again.X, pred.X)


@pytest.mark.parametrize("name", METHODS)
def test_bad_parameters_are_named(name):
    with pytest.raises(ParameterError, match=f"the 'seed' parameter of {name} must be an int"
                                             " >= 0, got -3"):
        hs.get_method(name, seed=-3)
    with pytest.raises(ParameterError, match="has no parameter 'sead' .did you mean 'seed'"):
        hs.get_method(name, sead=1)
    m = hs.get_method(name)
    with pytest.raises(ParameterError, match="'seed' parameter"):
        m.set_params(seed="one")


def test_public_api_is_discoverable():
    """``dir(histosr)`` lists the verbs and readers, and the README's method table names
    every registered method with its kind."""
    from pathlib import Path

    for name in ("read", "read_visium", "read_her2st", "read_xenium", "read_hest", "pp", "tl",
                 "pl", "fit", "predict", "features", "get_method", "available_methods",
                 "load_method"):
        assert name in dir(hs), name
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Methods", 1)[1].split("\n\n", 2)[1]
    for name in METHODS:
        row = next((line for line in table.splitlines()
                    if f"`{name}`" in line.split(" | ")[0]), None)  # the name column
        assert row is not None, f"README method table lacks {name}"
        assert f"| {hs.get_method(name).tags()['kind']} |" in row, row
