"""Nucleus / cell segmentation streamed tile by tile (histosr.segment)."""

import sys
import types

import numpy as np
import pytest

from histosr.errors import InputError
from histosr.segment import (
    Segmentation,
    _pass_cells,
    measure_nuclei,
    nuclei_per_spot,
    segment,
)

BG, NUC = (236, 218, 228), (75, 45, 125)


def _disk_image(centres, size=(400, 400), radius=6.0, seed=0):
    """Pale pink 0.5 um/px image with hematoxylin-dark disks of ``radius`` px at ``centres``
    (row, col), plus pixel noise."""
    rng = np.random.default_rng(seed)
    img = np.full((*size, 3), BG, np.float64)
    yy, xx = np.mgrid[0:size[0], 0:size[1]]
    for cy, cx in centres:
        img[np.hypot(yy + 0.5 - cy, xx + 0.5 - cx) < radius] = NUC
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


def _planted(n=40, size=400, seed=1, border=128):
    """Separated disk centres, a third of them straddling the tile borders (multiples of
    ``border`` px)."""
    rng = np.random.default_rng(seed)
    cs = []
    lines = np.arange(border, size, border)
    while len(cs) < n:
        c = rng.uniform(12, size - 12, 2)
        if len(cs) % 3 == 0:  # put this one on a tile border (row or column)
            c[len(cs) % 2] = rng.choice(lines) + rng.uniform(-2, 2)
        if all(np.hypot(*(c - d)) > 20 for d in cs):
            cs.append(c)
    return np.array(cs)


@pytest.fixture(scope="module")
def planted():
    cs = _planted()
    img = _disk_image(cs)
    tiled = segment(img, 0.5, tile_um=64, margin_um=12, expand_um=5, tissue=False,
                    progress=False)  # 128 px tiles: 9 tiles, many nuclei on their borders
    whole = segment(img, 0.5, tile_um=400, margin_um=12, expand_um=5, tissue=False,
                    progress=False)
    threads = segment(img, 0.5, tile_um=64, margin_um=12, expand_um=5, tissue=False,
                      progress=False, n_jobs=3)  # tiles on threads: the same result
    assert np.array_equal(np.asarray(threads.nuclei), np.asarray(tiled.nuclei))
    assert threads.table.equals(tiled.table)
    return cs, img, tiled, whole


def test_planted_nuclei_found_once_across_tile_borders(planted):
    cs, _, seg, whole = planted
    assert seg.n_nuclei == whole.n_nuclei == len(cs)
    found = seg.table[["y", "x"]].to_numpy()  # full-res px = label px here (0.5 um/px)
    d = np.hypot(*(found[:, None, :] - cs[None]).transpose(2, 0, 1))
    assert (d.min(axis=0) < 1.0).all()  # every planted nucleus found where it is
    assert (d.min(axis=1) < 1.0).all()  # nothing else found
    assert len(set(d.argmin(axis=1))) == len(cs)  # none twice
    # each planted disk is one label, whole (not cut at the border): its pixels carry one id
    lab = np.asarray(seg.nuclei)
    yy, xx = np.mgrid[0:400, 0:400]
    for cy, cx in cs:
        inside = lab[np.hypot(yy + 0.5 - cy, xx + 0.5 - cx) < 5.0]
        assert len(np.unique(inside)) == 1 and inside[0] > 0
    # areas: a 6 px disk is 28.3 um^2 (+ the 1 um smoothing of the threshold)
    a = seg.table["area_um2"].to_numpy()
    assert np.all((a > 0.85 * np.pi * 9) & (a < 1.5 * np.pi * 9))
    assert seg.table["eccentricity"].max() < 0.4 and seg.table["solidity"].min() > 0.85
    # labels are global and consecutive; the table matches the label image
    assert sorted(seg.table.index) == list(range(1, len(cs) + 1))
    assert set(np.unique(lab)) == set(range(len(cs) + 1))


def test_cells_grow_nuclei_without_overlap(planted):
    from scipy import ndimage as ndi

    _, _, seg, _ = planted
    nuc, cells = np.asarray(seg.nuclei), np.asarray(seg.cells)
    assert np.array_equal(cells[nuc > 0], nuc[nuc > 0])  # a cell holds its own nucleus
    # every cell pixel is within 5 um (10 px) of a nucleus, and of its own nucleus
    d, idx = ndi.distance_transform_edt(nuc == 0, return_indices=True)
    on = cells > 0
    assert d[on].max() <= 10.0 + 1e-9
    assert np.array_equal(cells[on], nuc[idx[0][on], idx[1][on]])
    assert not (cells[d <= 9.0] == 0).any()  # nothing within reach is left out


def test_cells_pass_is_independent_of_tiling():
    from skimage.segmentation import expand_labels

    rng = np.random.default_rng(3)
    nuc = np.zeros((300, 260), np.int32)
    for i, (y, x) in enumerate(rng.integers(0, [300, 260], (60, 2))):
        nuc[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = i + 1
    tiles = [(y, x) for y in range(0, 300, 64) for x in range(0, 260, 64)]
    cells = np.zeros_like(nuc)
    _pass_cells(nuc, cells, tiles, 64, 7.5, progress=False)  # 15 px, more than a tile's 1/5
    assert np.array_equal(cells, expand_labels(nuc, 15))


def test_measure_nuclei_matches_regionprops():
    from scipy.spatial import ConvexHull
    from skimage.measure import regionprops_table

    rng = np.random.default_rng(0)
    lab = np.zeros((160, 160), np.int32)
    yy, xx = np.mgrid[:160, :160]
    k = 0
    for cy in range(15, 160, 30):
        for cx in range(15, 160, 30):
            k += 1
            a, th = rng.uniform(4, 10), rng.uniform(0, np.pi)
            b = rng.uniform(3, a)
            u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
            v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
            lab[(u / a) ** 2 + (v / b) ** 2 <= 1] = k
    lab[100:104, 60:90] = 99  # a bar: solidity exactly 1
    h = rng.uniform(0, 0.3, lab.shape)
    m = measure_nuclei(lab, h)
    rp = regionprops_table(lab, intensity_image=h, properties=(
        "area", "centroid", "eccentricity", "axis_major_length", "axis_minor_length",
        "intensity_mean"))
    np.testing.assert_allclose(m["area_um2"], rp["area"] * 0.25)
    np.testing.assert_allclose(m["cy"] - 0.5, rp["centroid-0"])
    np.testing.assert_allclose(m["eccentricity"], rp["eccentricity"], atol=1e-9)
    np.testing.assert_allclose(m["major_axis_um"], rp["axis_major_length"] * 0.5)
    np.testing.assert_allclose(m["minor_axis_um"], rp["axis_minor_length"] * 0.5)
    np.testing.assert_allclose(m["hematoxylin_mean"], rp["intensity_mean"])
    exact = []
    for lbl in m.index:
        rr, cc = np.nonzero(lab == lbl)
        pts = np.concatenate([np.stack([rr + a, cc + b], 1) for a in (0, 1) for b in (0, 1)])
        exact.append(len(rr) / ConvexHull(pts).volume)
    np.testing.assert_allclose(m["solidity"], exact, rtol=0.03)
    assert m.loc[99, "solidity"] == pytest.approx(1.0)


def test_zarr_output_reloads_and_is_reused(tmp_path, monkeypatch):
    cs = _planted(12, size=200, seed=2)
    img = _disk_image(cs, size=(200, 200))
    out = tmp_path / "seg.zarr"
    seg = segment(img, 0.5, out=out, tile_um=50, margin_um=12, tissue=False, progress=False)
    assert seg.n_nuclei == 12 and seg.path == str(out)
    back = Segmentation.load(out)
    assert back.n_nuclei == 12 and back.info["key"] == seg.info["key"]
    assert np.array_equal(np.asarray(back.cells), np.asarray(seg.cells))
    import histosr.segment as hseg

    def boom(*a, **k):
        raise AssertionError("segmented again")

    monkeypatch.setattr(hseg, "make_segmenter", boom)  # same image + settings: reused
    again = segment(img, 0.5, out=out, tile_um=50, margin_um=12, tissue=False, progress=False)
    assert again.n_nuclei == 12
    with pytest.raises(InputError, match="not a segmentation folder"):
        Segmentation.load(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="exists and is not a segmentation folder"):
        segment(img, 0.5, out=tmp_path / "mine", tissue=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_resolution_and_nuclei_per_spot():
    """A 0.25 um/px image is segmented at 0.5 um/px; centroids come back in its own px."""
    from PIL import Image

    from histosr.image import ArrayImage
    from histosr.image_only import empty_counts
    from histosr.section import Section

    cs = np.array([[40.0, 40.0], [40.0, 160.0], [150.0, 60.0], [160.0, 150.0], [100, 100]])
    img = _disk_image(cs, size=(200, 200))
    big = np.asarray(Image.fromarray(img).resize((400, 400), Image.BILINEAR))
    seg = segment(big, 0.25, tissue=False, progress=False)
    assert seg.nuclei.shape == (200, 200) and seg.n_nuclei == 5
    xy = seg.table[["x", "y"]].to_numpy()
    d = np.hypot(*(xy[:, None, :] - cs[None, :, ::-1] * 2).transpose(2, 0, 1))
    assert (d.min(axis=1) < 2.0).all()
    sec = Section("s", ArrayImage(big), 0.25, empty_counts(["a", "b"], [[80, 80], [320, 300]]),
                  40.0)  # 40 um disks: the first nucleus alone, the fourth alone
    assert nuclei_per_spot(seg, sec).tolist() == [1, 1]


def test_blank_image_has_no_nuclei():
    img = np.full((120, 120, 3), 240, np.uint8)
    seg = segment(img, 0.5, tissue=False, progress=False)
    assert seg.n_nuclei == 0 and not np.asarray(seg.cells).any()


def test_bad_settings_are_clear_errors():
    img = np.full((64, 64, 3), 240, np.uint8)
    with pytest.raises(InputError, match="did you mean 'cellpose'"):
        segment(img, 0.5, segmenter="cellpos")
    with pytest.raises(InputError, match="has no parameter 'min_odd'.*did you mean 'min_od'"):
        segment(img, 0.5, min_odd=0.1)
    with pytest.raises(InputError, match="expand_um must be"):
        segment(img, 0.5, expand_um=-1)
    with pytest.raises(InputError, match="tissue mask"):
        segment(img, 0.5, tissue=np.ones((2, 2), bool))


def test_weighted_segmenters_never_download(tmp_path, monkeypatch):
    img = np.full((64, 64, 3), 240, np.uint8)
    for name, pkg in (("cellpose", "cellpose"), ("stardist", "stardist")):
        monkeypatch.setitem(sys.modules, pkg, None)  # not installed
        with pytest.raises(InputError, match=f"needs the {pkg} package.*never downloads"):
            segment(img, 0.5, segmenter=name, tissue=False)
    monkeypatch.delenv("INSTANSEG_MODEL", raising=False)
    with pytest.raises(InputError, match="needs model=PATH.*never"):
        segment(img, 0.5, segmenter="instanseg", tissue=False)
    bad = tmp_path / "instanseg.pt"
    bad.write_text("not a model")
    with pytest.raises(InputError, match="not a TorchScript model"):
        segment(img, 0.5, segmenter="instanseg", model=str(tmp_path), tissue=False)


def test_cellpose_with_local_weights(tmp_path, monkeypatch):
    """The Cellpose adapter with a stand-in package: weights must be in the model folder,
    and the labels it returns go through the same tiling."""
    from histosr.nuclei import nuclei_labels_classical

    calls = {}

    class CellposeModel:
        def __init__(self, gpu=False, pretrained_model=None, model_type=None):
            calls["model"] = pretrained_model or model_type

        def eval(self, x, **kw):
            calls["kw"] = kw
            return nuclei_labels_classical(x), None, None

    models = types.SimpleNamespace(CellposeModel=CellposeModel)  # cellpose >= 4
    monkeypatch.setitem(sys.modules, "cellpose", types.SimpleNamespace(models=models))
    monkeypatch.setitem(sys.modules, "cellpose.models", models)
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path))
    cs = _planted(8, size=200, seed=4)
    img = _disk_image(cs, size=(200, 200))
    with pytest.raises(InputError, match="not found in .*never downloads"):
        segment(img, 0.5, segmenter="cellpose", model="cpsam", tissue=False)
    (tmp_path / "cpsam").write_bytes(b"weights")
    seg = segment(img, 0.5, segmenter="cellpose", model="cpsam", diameter_um=6,
                  tile_um=50, tissue=False, progress=False)
    assert seg.n_nuclei == 8 and calls["model"] == "cpsam"
    assert calls["kw"]["diameter"] == 12.0 and "channels" not in calls["kw"]


def test_instanseg_torchscript_model(tmp_path):
    """A local TorchScript model in InstanSeg's contract (normalised RGB in, labels out)."""
    torch = pytest.importorskip("torch")

    class Dark(torch.nn.Module):
        def forward(self, x):
            return (x[:, :1] < 0.5).to(torch.int32)  # every dark pixel: label 1

    path = tmp_path / "instanseg.pt"
    torch.jit.save(torch.jit.script(Dark()), str(path))
    img = _disk_image([(60.0, 70.0)], size=(160, 160), radius=8)
    seg = segment(img, 0.5, segmenter="instanseg", model=str(path), tissue=False,
                  progress=False)
    assert seg.n_nuclei == 1
    assert seg.table["x"].iloc[0] == pytest.approx(70.0, abs=1.0)
    assert seg.table["area_um2"].iloc[0] == pytest.approx(np.pi * 16, rel=0.15)
