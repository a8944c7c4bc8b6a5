"""HISTEX and DeepHEx on a small synthetic section with known 8 um truth."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from histosr.features.featuremap import FeatureMap
from histosr.geometry import Grid, footprint_matrix
from histosr.image import ArrayImage
from histosr.methods import get_method, load_method
from histosr.methods.base import NotFittedError
from histosr.section import Section, make_counts, validate

H = 40  # superpixels per side at 0.5 um/px
DIAM = 40.0  # um: radius 2.5 superpixels -> 5 x 5 window, 21 footprint cells
# small networks and a higher learning rate keep each fit to a few seconds on one core
SMALL = {"epochs": 40, "lr": 1e-3, "n_states": 1, "embed_dim": 32, "hidden": (64, 64),
         "batch_size": 8, "progress": False, "device": "cpu"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def synthetic(seed=0, n_genes=4, pooled=False):
    """Three cell types in blobs smaller than a spot; features reveal the type; spots are
    40 um disks on a 5-superpixel square lattice; counts are footprint sums of the truth."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(H, H)), 1.0)
    types = np.digitize(field, np.quantile(field, [1 / 3, 2 / 3]))
    truth = rng.uniform(0.2, 5.0, size=(3, n_genes))[types]
    feats = np.concatenate([2.0 * np.eye(3)[types] + 0.2 * rng.normal(size=(H, H, 3)),
                            rng.normal(size=(H, H, 3))], axis=2).astype(np.float32)
    grid = Grid(0.5, (H * 16, H * 16))
    centres = np.arange(2, H - 1, 5)
    cc, rr = np.meshgrid(centres, centres)
    xy = np.stack([cc.ravel() * 16 + 8.0, rr.ravel() * 16 + 8.0], axis=1)
    if pooled:
        blk = (rr.ravel() // 10) * len(centres) + cc.ravel() // 10
        fps = [xy[blk == b] for b in np.unique(blk)]
        xy = np.stack([f.mean(axis=0) for f in fps])
    else:
        fps = [p[None] for p in xy]
    counts = np.asarray(footprint_matrix(grid, fps, DIAM) @ truth.reshape(-1, n_genes))
    genes = [f"g{i}" for i in range(n_genes)]
    sec = Section("syn", ArrayImage(np.full((H * 16, H * 16, 3), 200, np.uint8)), 0.5,
                  make_counts(counts, [f"s{i}" for i in range(len(xy))], genes, xy), DIAM,
                  platform="synthetic", footprints=fps if pooled else None)
    fm = FeatureMap(feats, np.ones((H, H), bool), grid, "test", {})
    return validate(sec), fm, truth


@pytest.fixture(scope="module")
def syn():
    return synthetic()


def _pcc(pred, truth):
    return np.array([np.corrcoef(pred[:, g], truth[:, g])[0, 1] if pred[:, g].std() > 0
                     else 0.0 for g in range(truth.shape[1])])


def test_registry_defaults():
    h, d = get_method("histex"), get_method("deephex")
    assert (h.epochs, h.n_states, h.lr, h.embed_dim, h.heads, h.n_blocks, h.k_neighbors,
            h.activation, h.rgb_pos, h.shuffle) == (500, 5, 1e-4, 128, 8, 2, 5, "identity",
                                                    True, False)
    assert (d.epochs, d.n_states, d.embed_dim, d.n_blocks, d.k_neighbors, d.activation,
            d.rgb_pos) == (400, 1, 256, 1, 6, "leaky", False)
    assert tuple(h.hidden) == tuple(d.hidden) == (1024, 512, 512, 512)


@pytest.fixture(scope="module")
def fitted(syn):
    sec, fm, _ = syn
    return {name: get_method(name, **SMALL).fit(sec, fm, genes="all") for name in ("histex", "deephex")}


@pytest.mark.parametrize("name", ["histex", "deephex"])
def test_learns_beyond_nearest(syn, fitted, name):
    sec, fm, truth = syn
    m = fitted[name]
    a = m.predict(sec, fm)
    near = get_method("nearest").fit(sec, fm, genes="all").predict(sec, fm)
    t = truth[a.obs["row"].to_numpy(), a.obs["col"].to_numpy()]
    p_m, p_n = _pcc(np.asarray(a.X), t), _pcc(np.asarray(near.X), t)
    assert a.n_obs == H * H and list(a.var_names) == sec.genes
    assert p_m.mean() > p_n.mean() + 0.2, (p_m, p_n)
    assert m.window_half_ == 2 and m.loss_history_[0][-1] < m.loss_history_[0][0]
    # counts per superpixel: footprint sums approximate the measured spot counts
    spots = m.predict(sec, fm, at="spots")
    rel = np.abs(spots.X - sec.dense_counts()).sum() / sec.dense_counts().sum()
    assert rel < 0.3, rel


@pytest.mark.parametrize("name", ["histex", "deephex"])
def test_save_load_round_trip(syn, fitted, name, tmp_path):
    sec, fm, _ = syn
    m = fitted[name]
    cells = np.arange(0, H * H, 7)
    ref = m._predict_cells(sec, fm, cells)
    m.save(tmp_path / name)
    m2 = load_method(tmp_path / name)
    assert m2.learned_params() == m.learned_params()
    np.testing.assert_array_equal(m2._predict_cells(sec, fm, cells), ref)


def test_seeds_and_median_of_states(syn):
    sec, fm, _ = syn
    cells = np.arange(0, H * H, 5)
    kw = {**SMALL, "epochs": 2, "n_states": 3}
    a = get_method("histex", **kw).fit(sec, fm, genes="all")
    b = get_method("histex", **kw).fit(sec, fm, genes="all")
    c = get_method("histex", **kw, seed=1).fit(sec, fm, genes="all")
    pa = a._predict_cells(sec, fm, cells)
    np.testing.assert_array_equal(pa, b._predict_cells(sec, fm, cells))
    assert not np.allclose(pa, c._predict_cells(sec, fm, cells))
    per = a.state_predictions(sec, fm, cells)
    assert per.shape == (3, len(cells), len(sec.genes))
    np.testing.assert_allclose(pa, np.median(per, axis=0), rtol=1e-6)
    # the order of requested cells does not change a cell's prediction
    rev = a._predict_cells(sec, fm, cells[::-1])
    np.testing.assert_allclose(rev[::-1], pa, rtol=1e-5, atol=1e-6)


def test_pooled_footprints_checkpoint_and_consistency(tmp_path, monkeypatch):
    from histosr import train

    sec, fm, _ = synthetic(pooled=True)
    assert max(len(f) for f in sec.spot_footprints()) == 4
    kw = {**SMALL, "epochs": 2, "max_cells_per_spot": None,
          "checkpoint_dir": str(tmp_path / "ck")}
    m = get_method("deephex", consistency=True, **kw).fit(sec, fm, genes="all")
    assert m.n_train_spots_ == sec.n_spots
    spots = m.predict(sec, fm, at="spots")
    np.testing.assert_allclose(spots.X, sec.dense_counts(), rtol=1e-4, atol=1e-3)
    a = m.predict(sec, fm, consistency=False)
    assert np.isfinite(a.X).all() and (a.X >= 0).all()

    def boom(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(train, "train_loop", boom)
    again = get_method("deephex", consistency=True, **kw).fit(sec, fm, genes="all")
    cells = np.arange(0, H * H, 9)
    np.testing.assert_array_equal(again._predict_cells(sec, fm, cells),
                                  m._predict_cells(sec, fm, cells))


def test_errors(syn, fitted):
    sec, fm, _ = syn
    other = FeatureMap(np.zeros((H, H, 2), np.float32), fm.mask, fm.grid, "other", {})
    with pytest.raises(ValueError, match="encoder it was fitted with"):
        fitted["histex"].predict(sec, other)
    with pytest.raises(ValueError, match="'embed_dim' parameter of histex must be a multiple of 'heads'"):
        get_method("histex", embed_dim=30).fit(sec, fm, genes="all")
    with pytest.raises(NotFittedError, match="not fitted"):
        get_method("deephex").predict(sec, fm)
    with pytest.raises(ValueError, match="'context' parameter of histex must be one of"):
        get_method("histex", context="none")


def test_context_ablations_change_what_the_tokens_see(syn):
    sec, fm, _ = syn
    m = get_method("histex", **SMALL).fit(sec, fm, genes="all")
    _, v = m._context(sec)
    for ctx in ("off", "shuffled"):
        m.context = ctx
        _, va = m._context(sec)
        assert va.shape == v.shape and not np.array_equal(va, v)
        if ctx == "off":
            assert not va.any()
        else:  # the same values at other positions
            np.testing.assert_array_equal(np.sort(va, axis=0), np.sort(v, axis=0))


@pytest.mark.parametrize("tk", [3, 40])
def test_attention_equals_the_fused_formula(tk):
    """The written-out attention (with the few-keys reordering when heads * keys < E)
    equals out(softmax(Q K^T / sqrt(hd)) V) computed by PyTorch's fused kernel."""
    import torch

    from histosr.methods.histex import build_model

    torch.manual_seed(0)
    ca = build_model(6, 5, 16, 4, 1, "identity", (8,)).blocks[0].ab.double()
    q, kv = torch.randn(2, 7, 6, dtype=torch.float64), torch.randn(2, tk, 5, dtype=torch.float64)
    K, V = ca.project_kv(kv)
    Q = ca.q(q).view(2, 7, 4, 4).transpose(1, 2)
    o = torch.nn.functional.scaled_dot_product_attention(Q, K, V)
    ref = ca.out(o.transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(ca(q, kv), ref, rtol=1e-12, atol=1e-12)


def test_states_trained_together_equal_one_after_the_other(syn):
    sec, fm, _ = syn
    cells = np.arange(0, H * H, 5)
    kw = {**SMALL, "epochs": 2, "n_states": 2, "lr": 1e-4}
    a = get_method("histex", **kw, batch_states=True).fit(sec, fm, genes="all")
    b = get_method("histex", **kw, batch_states=False).fit(sec, fm, genes="all")
    assert a.learned_params() == b.learned_params()  # a runtime switch
    np.testing.assert_allclose(a.state_predictions(sec, fm, cells),
                               b.state_predictions(sec, fm, cells), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.loss_history_, b.loss_history_, rtol=1e-4)


def test_bf16_precision_switch(syn):
    from histosr.errors import InputError

    sec, fm, _ = syn
    cells = np.arange(0, H * H, 5)
    kw = {**SMALL, "epochs": 2, "lr": 1e-4}
    p32 = get_method("histex", **kw).fit(sec, fm, genes="all")._predict_cells(sec, fm, cells)
    m16 = get_method("histex", **kw, precision="bf16").fit(sec, fm, genes="all")
    p16 = m16._predict_cells(sec, fm, cells)
    assert m16.learned_params()["precision"] == "bf16"
    assert np.isfinite(p16).all() and not np.array_equal(p16, p32)
    np.testing.assert_allclose(p16, p32, rtol=0.05, atol=0.05 * np.abs(p32).max())
    with pytest.raises(InputError, match="precision"):
        get_method("histex", precision="fp16")
