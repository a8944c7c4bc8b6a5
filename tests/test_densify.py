"""Densified grids (HisHRST 4x / TriHRGE 8x positions): exact half steps on hex and square
lattices, no duplicates, and the end-to-end `histosr densify` output."""

import numpy as np
import pytest

from histosr.lattice import generation_positions, infer_lattice


def _hex(n_rows=6, n_cols=10, pitch=137.0):
    """Visium-like: array_col steps by 2 along a row, odd rows shifted by one."""
    ab = np.array([(c, r) for r in range(n_rows) for c in range(r % 2, 2 * n_cols, 2)])
    xy = np.stack([100 + ab[:, 0] * pitch / 2, 80 + ab[:, 1] * pitch * np.sqrt(3) / 2], 1)
    return xy, ab


def _square(n=8, pitch=290.0):
    ab = np.array([(a, b) for b in range(n) for a in range(n)])
    return 50 + ab * pitch + np.array([3.0, 7.0]), ab


@pytest.mark.parametrize("kind", ["hex", "square"])
@pytest.mark.parametrize("factor", [4, 8])
def test_positions_exact_half_steps(kind, factor):
    xy, ab = _hex() if kind == "hex" else _square()
    lat, ab2 = infer_lattice(xy, ab)
    assert lat.checkerboard == (kind == "hex")
    q, measured = generation_positions(lat, ab2, factor)
    assert len({tuple(v) for v in q}) == len(q)  # no duplicates
    assert measured.sum() == len(ab) and measured[: len(ab)].all()
    np.testing.assert_array_equal(q[measured], 2 * ab)
    gen = lat.xy(q[~measured] / 2.0)
    # every generated point is the exact midpoint of two lattice sites (or a square-cell
    # centre): its distance to the nearest lattice site is half the pitch or half a diagonal
    E = np.array([(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)])
    P = np.floor_divide(q[~measured], 2)[:, None, :] + E[None]  # nearby lattice indices
    d = np.linalg.norm(gen[:, None] - lat.xy(P.reshape(-1, 2)).reshape(P.shape), axis=2)
    d = np.where(lat.exists(P), d, np.inf).min(axis=1)  # to the nearest lattice site
    p = lat.pitch
    ok = np.isclose(d, p / 2, atol=1e-6 * p) | np.isclose(d, p / np.sqrt(2), atol=1e-6 * p)
    assert ok.all()
    if factor == 4:  # every site owns exactly 3 new positions: 4x the sites
        assert len(q) == 4 * len(ab)
    else:  # released 8x set without duplicates: the 4x set inside, padded at the edge
        q4, _ = generation_positions(lat, ab2, 4)
        lo, hi = 2 * ab2.min(axis=0) + 2, 2 * ab2.max(axis=0) - 2

        def inner(v):
            return {tuple(x) for x in v[((v >= lo) & (v <= hi)).all(axis=1)]}

        assert inner(q) == inner(q4) and len(q) > len(q4)


def test_hex_offsets_follow_dense_axis():
    xy, ab = _hex()
    lat, _ = infer_lattice(xy, ab)
    q, m = generation_positions(lat, ab, 4)
    # the first spot's +1 column copy sits half a pitch to its right
    gen = lat.xy(q[~m] / 2.0)
    target = xy[0] + np.array([lat.pitch / 2, 0.0])
    assert np.isclose(np.linalg.norm(gen - target, axis=1).min(), 0.0, atol=1e-6)
    # transposed brick lattice (dense along rows b): offsets transpose too
    lat_t, ab_t = infer_lattice(xy[:, ::-1], ab[:, ::-1])
    q_t, m_t = generation_positions(lat_t, ab_t, 4)
    assert len(q_t) == len(q)


def test_densify_cli(tmp_path):
    torch = pytest.importorskip("torch")
    from histosr import cli
    from histosr.io.istar import write_istar
    from histosr.simulate import synthetic_visium

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sec = synthetic_visium(seed=2, size_um=800, n_genes=8)
        write_istar(sec, tmp_path / "sec")
        g = sec.genes[:2]
        rc = cli.main(["--quiet", "densify", str(tmp_path / "sec"), "--reader", "istar",
                       "--method", "hishrst",
                       "--factor", "4", "--genes", ",".join(g), "--params",
                       '{"epochs": 2, "crop_um": 32}', "--out", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    import anndata as ad

    d = ad.read_h5ad(tmp_path / "out" / "densified.h5ad")
    assert (tmp_path / "out" / "densified.png").stat().st_size > 1000
    assert d.obs["measured"].sum() == sec.n_spots
    q = np.stack([d.obs["half_a"], d.obs["half_b"]], 1)
    np.testing.assert_array_equal(np.stack([d.obs["array_col"], d.obs["array_row"]], 1), q / 2)
    assert d.uns["densify"]["factor"] == 4 and d.obsm["spatial"].shape == (d.n_obs, 2)
