"""SpatialData output (written, opened with spatialdata.read_zarr, read back as a Section) and
per-cell aggregation of super-resolved predictions (labels image and polygons)."""

from __future__ import annotations

import numpy as np
import pytest

from histosr.cells import aggregate_cells, polygon_weights
from histosr.features.featuremap import grid_only
from histosr.methods import get_method
from histosr.simulate import synthetic_visium


@pytest.fixture(scope="module")
def fitted():
    sec = synthetic_visium(seed=5, size_um=480.0, n_genes=6)
    fm = grid_only(sec, np.asarray(sec.truth["mask"], bool))
    m = get_method("bilinear").fit([sec], [fm])
    return sec, fm, m.predict(sec, fm, at="superpixels")


def test_spatialdata_write_read_zarr(fitted, tmp_path):
    sd = pytest.importorskip("spatialdata")
    from histosr.io import read, read_spatialdata, write_spatialdata

    sec, _, pred = fitted
    path = write_spatialdata(tmp_path / "out.zarr", sec, pred)
    sdata = sd.read_zarr(path)
    assert set(sdata.images) == {"image"} and set(sdata.shapes) == {"spots", "superpixels"}
    t = sdata.tables["prediction"]
    np.testing.assert_allclose(np.asarray(t.X), np.asarray(pred.X))
    assert list(t.var_names) == list(pred.var_names)
    assert t.uns["spatialdata_attrs"]["region"] == "superpixels"
    boxes = sdata.shapes["superpixels"].geometry
    assert len(boxes) == pred.n_obs
    size = 8.0 / sec.um_per_px
    np.testing.assert_allclose(boxes.area, size * size)
    c = boxes.centroid  # squares centred on the superpixel centres
    np.testing.assert_allclose(np.stack([c.x, c.y], 1), pred.obsm["spatial"], atol=1e-6)
    from histosr.io.spatialdata import XarrayImage, _level0

    img = XarrayImage(_level0(sdata.images["image"]))
    np.testing.assert_array_equal(img.read(0, 0, *img.shape[:2]), sec.image.array)

    # read back as a Section: the measured spots, in image pixels, same pixel size
    back = read(path)
    assert back.platform == "visium" and back.um_per_px == sec.um_per_px
    np.testing.assert_allclose(back.xy, sec.xy)
    np.testing.assert_allclose(back.dense_counts(), sec.dense_counts())
    assert back.spot_diameter_um == 55.0

    # spots stored in microns (a scale to "global") land in the same pixels
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    um = sec.um_per_px
    pts = ShapesModel.parse(sec.xy * um, geometry=0, radius=np.full(sec.n_spots, 27.5),
                            index=np.arange(sec.n_spots),
                            transformations={"global": Scale([1 / um, 1 / um], axes=("x", "y"))})
    a = sec.counts.copy()
    a.obs["region"] = "um_spots"
    a.obs["region"] = a.obs["region"].astype("category")
    a.obs["inst"] = np.arange(a.n_obs)
    tbl = TableModel.parse(a, region="um_spots", region_key="region", instance_key="inst")
    s2 = sd.SpatialData(images={"he": sdata.images["image"]}, shapes={"um_spots": pts},
                        tables={"t": tbl})
    sd.transformations.set_transformation(s2.images["he"], Identity(), "global")
    from histosr.io.spatialdata import save_spatialdata

    save_spatialdata(s2, tmp_path / "um.zarr")
    r2 = read_spatialdata(tmp_path / "um.zarr", um_per_px=um)
    np.testing.assert_allclose(r2.xy, sec.xy, atol=1e-6)
    assert r2.spot_diameter_um == pytest.approx(55.0)


def test_spatialdata_pipeline_flag(fitted, tmp_path):
    pytest.importorskip("spatialdata")
    from histosr.config import validate

    cfg = validate({"section": {"reader": "istar", "path": "x"},
                    "outputs": {"spatialdata": True}})
    assert cfg.outputs.spatialdata is True


def test_cells_polygons_and_labels_agree(fitted):
    sec, _, pred = fitted
    size = 8.0 / sec.um_per_px  # superpixel side, full-res px
    # cell A = exactly superpixel (10, 12); cell B = half of (14, 14) and half of (14, 15)
    ra, ca, rb, cb = 10, 12, 14, 14
    A = np.array([[ca, ra], [ca + 1, ra], [ca + 1, ra + 1], [ca, ra + 1]], float) * size
    B = np.array([[cb + 0.5, rb], [cb + 1.5, rb], [cb + 1.5, rb + 1], [cb + 0.5, rb + 1]],
                 float) * size
    cells = aggregate_cells(pred, {"A": A, "B": B})
    val = {(r, c): pred.X[i] for i, (r, c) in enumerate(zip(pred.obs["row"], pred.obs["col"]))}
    np.testing.assert_allclose(cells.X[0], val[(ra, ca)], rtol=1e-5)
    np.testing.assert_allclose(cells.X[1], 0.5 * (val[(rb, cb)] + val[(rb, cb + 1)]), rtol=1e-5)
    np.testing.assert_allclose(cells.obsm["spatial"][0], [(ca + 0.5) * size, (ra + 0.5) * size])
    assert cells.obs["area_um2"].tolist() == pytest.approx([64.0, 64.0])
    assert list(cells.var_names) == list(pred.var_names)

    h, w = sec.image.shape[:2]
    labels = np.zeros((h, w), np.int32)
    labels[int(ra * size):int((ra + 1) * size), int(ca * size):int((ca + 1) * size)] = 7
    labels[int(rb * size):int((rb + 1) * size),
           int((cb + 0.5) * size):int((cb + 1.5) * size)] = 9
    lab = aggregate_cells(pred, labels)
    assert list(lab.obs_names) == ["7", "9"]
    np.testing.assert_allclose(lab.X, cells.X, rtol=1e-5)
    np.testing.assert_allclose(lab.obsm["spatial"], cells.obsm["spatial"])


def test_cells_polygon_weights_area():
    from histosr.cells import disk_polygon

    W = polygon_weights([disk_polygon(np.array([5.0, 5.0]), 2.0)], (10, 10), sub=16)
    assert W.sum() == pytest.approx(np.pi * 4, rel=0.01)
    tiny = polygon_weights([np.array([[3.2, 4.2], [3.25, 4.2], [3.25, 4.25]])], (10, 10))
    assert tiny[0, 4 * 10 + 3] > 0
    with pytest.raises(ValueError, match="polygon 0"):
        polygon_weights([np.zeros((2, 2))], (4, 4))


def test_spatialdata_image_larger_than_one_chunk(tmp_path):
    """Images over one 2048 px chunk are written whole (chunked lazily), pixel for pixel."""
    sd = pytest.importorskip("spatialdata")
    from histosr.io import write_spatialdata
    from histosr.io.spatialdata import XarrayImage, _level0

    sec = synthetic_visium(seed=1, size_um=1100.0, n_genes=2)
    assert max(sec.image.shape[:2]) > 2048
    path = write_spatialdata(tmp_path / "big.zarr", sec)
    img = XarrayImage(_level0(sd.read_zarr(path).images["image"]))
    assert img.shape == sec.image.shape
    np.testing.assert_array_equal(img.read(2000, 100, 150, 60),
                                  sec.image.array[2000:2150, 100:160])
