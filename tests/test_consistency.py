import numpy as np

from histosr.consistency import ConsistencyScaler
from histosr.geometry import Grid, footprint_matrix


def test_consistency_makes_footprint_sums_equal_measured():
    rng = np.random.default_rng(0)
    g = Grid(0.5, (1600, 1600))
    fps = [np.array([[x, y]]) for x in (300.0, 700.0, 1100.0) for y in (300.0, 900.0)]
    F = footprint_matrix(g, fps, 55)
    cells = np.unique(F.indices)
    pred = rng.gamma(2.0, 1.0, size=(len(cells), 4))
    pred[:, 3] = 0.0  # a gene the method predicts as zero everywhere
    measured = rng.integers(1, 50, size=(len(fps), 4)).astype(float)
    sc = ConsistencyScaler.fit(g, fps, F[:, cells], pred, measured)
    out = sc.apply(pred.astype(np.float32), cells)
    np.testing.assert_allclose(F[:, cells] @ out, measured, rtol=1e-4)
    # relative pattern inside a footprint is kept for genes with a prediction
    row = F[0, cells].toarray().ravel() > 0
    ratio = out[row, 0] / (pred[row, 0] + sc.floor[0])
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


def test_from_method_in_blocks_equals_fit_on_the_whole_prediction(monkeypatch):
    """The streamed factors (superpixel blocks added into the footprints they touch, spots
    and measured counts read a block at a time) equal the factors fitted on the whole
    footprint prediction held in memory."""
    from histosr import consistency
    from histosr.geometry import section_footprints
    from histosr.methods import get_method
    from test_methods import FAST, make_synthetic

    sec, fm, _ = make_synthetic(seed=1)
    m = get_method("istar", **{**FAST, "epochs": 2}).fit([sec], [fm])
    F = section_footprints(sec, fm.grid)
    cells = np.unique(F.indices)
    pred = m._predict_cells(sec, fm, cells)
    whole = ConsistencyScaler.fit(fm.grid, sec.spot_footprints(), F[:, cells], pred,
                                  sec.dense_counts(m.genes_), sec.spot_diameter_um, cells)
    monkeypatch.setattr(consistency, "_SPOT_BLOCK", 7)  # several blocks of spots
    streamed = ConsistencyScaler.from_method(m, sec, fm, block=50)  # and of superpixels
    assert len(cells) > 50 and sec.n_spots > 7
    np.testing.assert_allclose(streamed.factors, whole.factors, rtol=1e-6)
    np.testing.assert_allclose(streamed.floor, whole.floor, rtol=1e-6)
    np.testing.assert_array_equal(streamed.inside, whole.inside)
