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
