from types import SimpleNamespace

import numpy as np
import pytest

from _hespotex_data import sections
from histosr.benchmark.p3 import score_section
from histosr.image_only import image_only_view
from histosr.methods.base import Method, get_method
from histosr.methods.hespotex import HESpotEx, image_graph, pearson_rows, spot_graph
from histosr.pp import select_genes

FAST = dict(gate_epochs=60, epochs=30, head_hidden=128, gate_hidden=64, progress=False,
            target="log1p_cp10k")


def test_graphs():
    xy = np.stack(np.meshgrid(np.arange(6.0), np.arange(5.0)), -1).reshape(-1, 2) * 100
    src, dst = spot_graph(xy, k=8)
    edges = set(zip(src.tolist(), dst.tolist()))
    assert all((j, i) in edges for i, j in edges)  # undirected
    assert all((i, i) in edges for i in range(len(xy)))  # self-loops
    nb = image_graph(xy, 4)
    assert nb.shape == (30, 4) and not (nb == np.arange(30)[:, None]).any()
    d = np.hypot(*(xy[nb] - xy[:, None]).transpose(2, 0, 1))
    assert d.max() <= 200 + 1e-9  # a corner point: 100, 100, 141, 200


def test_pearson_rows_nan_is_zero():
    import torch

    a = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]])
    r = pearson_rows(a, torch.tensor([[2.0, 4.0, 6.5], [0.0, 1.0, 2.0]]))
    assert r[0] > 0.99 and r[1] == 0


def test_gate_reconstructs_graph_signal_better_than_mean():
    rng = np.random.default_rng(0)
    xy = np.stack(np.meshgrid(np.arange(14.0), np.arange(14.0)), -1).reshape(-1, 2) * 100
    fields = np.stack([np.sin(xy[:, 0] / 300 + p) + np.cos(xy[:, 1] / 400 - p)
                       for p in rng.uniform(0, 6, 3)], 1)  # smooth spatial factors
    X = (fields @ rng.normal(size=(3, 30)) + 0.3 * rng.normal(size=(len(xy), 30)))
    X = (X - X.min()).astype(np.float32)
    m = HESpotEx(gate_epochs=300, gate_hidden=64, latent_dim=8, progress=False)
    import torch

    zs, loss = m._fit_gate(0, [SimpleNamespace(xy=xy)], [X], torch.device("cpu"))
    baseline = float(((X - X.mean(0)) ** 2).mean())
    assert zs[0].shape == (len(xy), 8)
    assert loss[0] < 0.5 * baseline


def test_hespotex_learns_from_images_and_round_trips(tmp_path):
    train, test = sections()[:3], sections()[3]
    genes = select_genes(train, 1000)
    m = get_method("hespotex", cache_dir=str(tmp_path), **FAST).fit(train, genes=genes)
    info = m.fit_info_
    assert info["validation"] in [s.name for s in train] and info["validation"] != test.name
    assert 1 <= info["best_epoch"] <= FAST["epochs"] and len(info["validation_pcc_loss"]) == 30
    view = image_only_view(test)
    pred = m.predict(view)
    s = score_section(np.asarray(pred.X), test, genes)
    assert s["top50_pcc"] > 0.2, s
    assert np.isfinite(pred.X).all() and (np.asarray(pred.X) >= 0).all()
    m.save(tmp_path / "model")
    np.testing.assert_allclose(Method.load(tmp_path / "model").predict(view).X, pred.X,
                               rtol=1e-4, atol=1e-5)
    # same seed, same model
    m2 = get_method("hespotex", cache_dir=str(tmp_path), **FAST).fit(train, genes=genes)
    np.testing.assert_allclose(m2.predict(view).X, pred.X, rtol=1e-4, atol=1e-5)


def test_ablations_run_and_errors(tmp_path):
    train = sections()[:2]
    genes = select_genes(train, 12)
    for kw in ({"lstm_branch": False, "latent_loss": False, "target": "log_cpm"},
               {"graph_layers": False, "nuclei": False, "target": "log1p_cp10k",
                "refit": False}):
        m = get_method("hespotex", cache_dir=str(tmp_path), **{**FAST, "epochs": 3, **kw})
        m.fit(train, genes=genes)
        assert m.predict(image_only_view(sections()[3])).shape == (sections()[3].n_spots, 12)
    with pytest.raises(ValueError, match="target"):
        get_method("hespotex", **{**FAST, "target": "cpm"}).fit(train, genes=genes)
    with pytest.raises(ValueError, match="validation section"):
        get_method("hespotex", validation="nope", **FAST).fit(train, genes=genes)


def test_states_median_and_resume_on_the_shared_loop(tmp_path, monkeypatch):
    """hespotex trains on histosr.train like every learned method: n_states members and
    checkpoints that a killed or repeated fit resumes from."""
    from histosr import train as training

    secs = sections()[:2]
    genes = select_genes(secs, 8)
    kw = {**FAST, "gate_epochs": 5, "epochs": 3, "n_states": 2,
          "checkpoint_dir": str(tmp_path / "ck")}
    m = get_method("hespotex", cache_dir=str(tmp_path), **kw).fit(secs, genes=genes)
    assert len(m.states_) == 2 and len(m.fit_info_["members"]) == 2
    view = image_only_view(sections()[3])
    pred = m.predict(view).X

    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(training, "train_loop", boom)
    again = get_method("hespotex", cache_dir=str(tmp_path), **kw).fit(secs, genes=genes)
    np.testing.assert_array_equal(again.predict(view).X, pred)
