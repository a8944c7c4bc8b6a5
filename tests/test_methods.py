"""istar and the spot-spreading baselines on a small synthetic section with known 8 um truth."""

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from histosr.features.featuremap import FeatureMap
from histosr.geometry import Grid, footprint_matrix
from histosr.image import ArrayImage
from histosr.methods import available_methods, get_method, load_method
from histosr.section import Section, make_counts, validate

torch.set_num_threads(2)

H = 48  # superpixels per side; 0.5 um/px -> 768 x 768 px, grid == calibrated grid
UM = 0.5
DIAM = 40.0  # um: radius 2.5 superpixels, 21 cells per disk
FAST = {"epochs": 40, "lr": 1e-3, "n_states": 1, "progress": False, "device": "cpu"}


def make_synthetic(seed=0, n_genes=5, dim=8, pooled=False, constant=None):
    """Cell types in blobs smaller than a spot; features reveal the type (plus noise);
    each type has its own expression (counts per superpixel). Spots are 40 um disks on a
    5-superpixel lattice centred on superpixel centres; counts are footprint sums of the
    truth. ``pooled``: 2x2 blocks of disks form one footprint. ``constant``: every
    superpixel expresses this value."""
    rng = np.random.default_rng(seed)
    noise = gaussian_filter(rng.normal(size=(H, H)), 1.0)
    types = np.digitize(noise, np.quantile(noise, [1 / 3, 2 / 3]))
    expr = rng.uniform(0.2, 5.0, size=(3, n_genes))
    truth = expr[types] if constant is None else np.full((H, H, n_genes), float(constant))
    feats = np.concatenate(
        [2.0 * np.eye(3)[types] + 0.2 * rng.normal(size=(H, H, 3)),
         rng.normal(size=(H, H, dim - 3))], axis=2).astype(np.float32)
    grid = Grid(UM, (H * 16, H * 16))
    centres = np.arange(3, H - 2, 5)
    cc, rr = np.meshgrid(centres, centres)
    xy = np.stack([cc.ravel() * 16 + 8.0, rr.ravel() * 16 + 8.0], axis=1)
    if pooled:
        n = len(centres)
        blk = (rr.ravel() // 10) * n + cc.ravel() // 10
        fps = [xy[blk == b] for b in np.unique(blk)]
        xy = np.stack([f.mean(axis=0) for f in fps])
    else:
        fps = [p[None] for p in xy]
    F = footprint_matrix(grid, fps, DIAM)
    counts = np.asarray(F @ truth.reshape(-1, n_genes))
    genes = [f"g{i}" for i in range(n_genes)]
    sec = Section("syn", ArrayImage(np.full((H * 16, H * 16, 3), 200, np.uint8)), UM,
                  make_counts(counts, [f"s{i}" for i in range(len(xy))], genes, xy), DIAM,
                  platform="synthetic", footprints=fps if pooled else None,
                  truth={"cube": truth, "genes": genes, "mask": np.ones((H, H), bool)})
    fm = FeatureMap(features=feats, mask=np.ones((H, H), bool), grid=grid, encoder="test",
                    meta={})
    return validate(sec), fm, truth


@pytest.fixture(scope="module")
def syn():
    return make_synthetic()


def _pcc_per_gene(pred, truth):
    out = []
    for g in range(truth.shape[1]):
        a, b = pred[:, g], truth[:, g]
        out.append(0.0 if a.std() == 0 or b.std() == 0 else np.corrcoef(a, b)[0, 1])
    return np.array(out)


def _sp_truth(adata, truth):
    return truth[adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()]


def test_registry():
    assert {"istar", "nearest", "bilinear", "knn"} <= set(available_methods())
    m = get_method("istar")
    assert (m.epochs, m.n_states, m.lr, m.batch_size, m.hidden, m.n_layers) == (
        400, 5, 1e-4, None, 256, 4)
    with pytest.raises(ValueError, match="no parameter"):
        get_method("istar", epoch=3)


def test_istar_learns_beyond_nearest(syn):
    sec, fm, truth = syn
    ist = get_method("istar", **{**FAST, "epochs": 80}).fit(sec, fm, genes="all")
    near = get_method("nearest").fit(sec, fm, genes="all")
    a_i, a_n = ist.predict(sec, fm), near.predict(sec, fm)
    assert a_i.n_obs == H * H and list(a_i.var_names) == sec.genes
    t = _sp_truth(a_i, truth)
    p_i, p_n = _pcc_per_gene(a_i.X, t), _pcc_per_gene(a_n.X, t)
    assert p_i.mean() > 0.9, p_i
    assert p_i.mean() > p_n.mean() + 0.2, (p_i, p_n)
    # counts per superpixel: footprint sums approximate the measured spot counts
    spots = ist.predict(sec, fm, at="spots")
    rel = np.abs(spots.X - sec.dense_counts()).sum() / sec.dense_counts().sum()
    assert rel < 0.15
    assert ist.loss_history_[0][-1] < ist.loss_history_[0][0]


@pytest.mark.parametrize("name", ["istar", "nearest", "knn"])
def test_consistency_preserves_spot_mass(syn, name):
    sec, fm, _ = syn
    params = {**FAST, "epochs": 5} if name == "istar" else {}
    m = get_method(name, consistency=True, **params).fit(sec, fm, genes="all")
    spots = m.predict(sec, fm, at="spots")
    np.testing.assert_allclose(spots.X, sec.dense_counts(), rtol=1e-4, atol=1e-3)
    assert spots.uns["histosr"]["consistency"] is True


def test_istar_seeds(syn):
    sec, fm, _ = syn
    cells = np.arange(0, H * H, 7)
    p = [get_method("istar", **{**FAST, "epochs": 3}, seed=s).fit(sec, fm, genes="all")
         ._predict_cells(sec, fm, cells) for s in (0, 0, 1)]
    np.testing.assert_array_equal(p[0], p[1])
    assert not np.allclose(p[0], p[2])


def test_istar_median_of_states_and_save_load(syn, tmp_path):
    sec, fm, _ = syn
    m = get_method("istar", **{**FAST, "epochs": 3, "n_states": 3}).fit(sec, fm, genes="all")
    cells = np.arange(0, H * H, 5)
    per_state = m.state_predictions(fm, cells)
    assert per_state.shape == (3, len(cells), len(sec.genes))
    pred = m._predict_cells(sec, fm, cells)
    np.testing.assert_allclose(pred, np.median(per_state, axis=0), rtol=1e-6)
    assert not np.allclose(per_state[0], per_state[1])
    m.save(tmp_path / "m")
    m2 = load_method(tmp_path / "m")
    assert m2.learned_params() == m.learned_params()
    np.testing.assert_array_equal(m2._predict_cells(sec, fm, cells), pred)


def test_istar_checkpoint_resume(syn, tmp_path, monkeypatch):
    from histosr import train

    sec, fm, _ = syn
    params = {**FAST, "epochs": 3, "n_states": 2, "checkpoint_dir": str(tmp_path / "ck")}
    m = get_method("istar", **params).fit(sec, fm, genes="all")
    cells = np.arange(0, H * H, 9)
    ref = m._predict_cells(sec, fm, cells)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["state-000.pt",
                                                                   "state-001.pt"]

    def boom(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(train, "train_loop", boom)
    again = get_method("istar", **params).fit(sec, fm, genes="all")
    np.testing.assert_array_equal(again._predict_cells(sec, fm, cells), ref)
    with pytest.raises(AssertionError, match="trained again"):  # other params: retrain
        get_method("istar", **{**params, "lr": 2e-3}).fit(sec, fm, genes="all")


def test_istar_pooled_footprints_and_sections():
    sec, fm, truth = make_synthetic(pooled=True)
    assert sec.n_spots < 81 and len(sec.spot_footprints()[0]) > 1
    sec2, fm2, _ = make_synthetic(seed=1)
    m = get_method("istar", **{**FAST, "epochs": 2, "max_cells_per_spot": None}).fit(
        [sec, sec2], [fm, fm2], genes="all")
    assert m.n_train_spots_ == sec.n_spots + sec2.n_spots
    a = m.predict(sec, fm)
    assert np.isfinite(a.X).all() and (a.X >= 0).all()
    with pytest.raises(ValueError, match="'max_cells_per_spot' parameter of istar must be an int >= 2"):
        get_method("istar", **{**FAST, "max_cells_per_spot": 1})


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("name", ["nearest", "bilinear", "knn"])
def test_baselines_reproduce_constant_field(name, pooled):
    sec, fm, _ = make_synthetic(pooled=pooled, constant=2.5)
    a = get_method(name).fit(sec, fm, genes="all").predict(sec, fm)
    assert a.n_obs == H * H
    np.testing.assert_allclose(a.X, 2.5, rtol=1e-6)


def test_knn_exact_at_spot_centres_and_nearest_inside_spot(syn):
    sec, fm, _ = syn
    r, c = fm.grid.cell_of_xy(sec.xy)
    cells = fm.grid.flat(r, c)
    F = footprint_matrix(fm.grid, sec.spot_footprints(), DIAM)
    dens = sec.dense_counts() / np.diff(F.indptr)[:, None]
    for name in ("knn", "bilinear", "nearest"):
        m = get_method(name).fit(sec, fm, genes="all")
        np.testing.assert_allclose(m._predict_cells(sec, fm, cells), dens, rtol=1e-5)
    # nearest is constant over each footprint
    near = get_method("nearest").fit(sec, fm, genes="all")
    i = 10
    vals = near._predict_cells(sec, fm, F[i].indices)
    np.testing.assert_allclose(vals, np.broadcast_to(dens[i], vals.shape), rtol=1e-6)


def test_baselines_predict_other_section_from_its_own_spots(syn, tmp_path):
    sec, fm, _ = syn
    other, fm2, _ = make_synthetic(seed=3)
    m = get_method("knn").fit(sec, fm, genes="all")
    m.save(tmp_path / "knn")
    m2 = load_method(tmp_path / "knn")
    fresh = get_method("knn").fit(other, fm2, genes="all")
    cells = np.arange(0, H * H, 11)
    np.testing.assert_allclose(m2._predict_cells(other, fm2, cells),
                               fresh._predict_cells(other, fm2, cells), rtol=1e-6)


def test_istar_states_trained_together_equal_one_after_the_other(syn):
    sec, fm, _ = syn
    cells = np.arange(0, H * H, 7)
    kw = {**FAST, "epochs": 3, "n_states": 3}
    a = get_method("istar", **kw, batch_states=True).fit(sec, fm, genes="all")
    b = get_method("istar", **kw, batch_states=False).fit(sec, fm, genes="all")
    np.testing.assert_allclose(a.state_predictions(fm, cells), b.state_predictions(fm, cells),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.loss_history_, b.loss_history_, rtol=1e-5)
    with pytest.raises(ValueError, match="precision"):
        get_method("istar", precision="half")
    m = get_method("istar", **{**FAST, "epochs": 3}, precision="bf16").fit(sec, fm, genes="all")
    assert np.isfinite(m._predict_cells(sec, fm, cells)).all()
