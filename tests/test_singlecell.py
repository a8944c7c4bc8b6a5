"""Cells x genes from a super-resolved prediction (histosr.singlecell), the `histosr cells`
verb, the run-config switch and the cells benchmark protocol."""

import json

import anndata as ad
import numpy as np
import pytest

from histosr.cli import main
from histosr.errors import InputError
from histosr.image import ArrayImage
from histosr.image_only import empty_counts
from histosr.section import Section, make_counts
from histosr.singlecell import cells_anndata, scale_cells_to_spots, spot_of_points


@pytest.fixture(scope="module")
def small():
    """A 400 um synthetic section of known cells (pseudo-Visium spots), its `bilinear`
    superpixel prediction and its segmentation."""
    from histosr.features.featuremap import grid_only
    from histosr.methods.base import get_method
    from histosr.segment import segment
    from histosr.simulate.cells import synthetic_cells_visium

    sec = synthetic_cells_visium(seed=5, size_um=400.0, n_genes=10)
    fm = grid_only(sec, sec.truth["mask"])
    m = get_method("bilinear").fit([sec], [fm], genes=sec.genes)
    pred = m.predict(sec, fm, at="superpixels")
    seg = segment(sec, progress=False)
    return sec, pred, seg


def test_synthetic_cells_truth_is_consistent(small):
    sec, _, _ = small
    cells = sec.truth["cells"]
    n = len(cells["ids"])
    assert n > 50 and cells["counts"].shape == (n, 10)
    # the 8 um cube holds exactly the cells' counts (split by area), and the spots are its
    # sums over their disks
    np.testing.assert_allclose(sec.truth["cube"].sum(axis=(0, 1)), cells["counts"].sum(0),
                               rtol=1e-4)
    lab, nuc = cells["labels"], cells["nuclei"]
    assert np.array_equal(lab[nuc > 0], nuc[nuc > 0])
    assert set(np.unique(lab)) - {0} == set(cells["ids"].tolist())
    # visible genes follow the class of the cell
    cls, X = cells["class"], cells["counts"] / cells["area_um2"][:, None]
    g = sec.truth["genes"].index("VIS_TUMOUR_0")
    assert X[cls == 0, g].mean() > 3 * X[cls == 2, g].mean()


def test_cells_anndata_layout_and_counts_per_spot(small):
    from histosr.cells import aggregate_cells

    sec, pred, seg = small
    c = cells_anndata(pred, seg, sec)
    assert c.n_obs == seg.n_nuclei and list(c.var_names) == list(pred.var_names)
    assert {"label", "area_um2", "spot", "scaled_to_spot", "nucleus_area_um2",
            "eccentricity", "solidity", "hematoxylin_mean"} <= set(c.obs.columns)
    assert c.obsm["spatial"].shape == (c.n_obs, 2)
    assert (c.obs["area_um2"] >= c.obs["nucleus_area_um2"] - 1e-6).all()
    assert "hires" in c.uns["spatial"][sec.name]["images"]
    # each measured spot's cells sum to its measured counts
    spot = c.obs["spot"].astype(str).to_numpy()
    have = [s for s in sec.counts.obs_names if (spot == s).any()]
    assert len(have) >= 5
    for s in have:
        np.testing.assert_allclose(c.X[spot == s].sum(axis=0), sec.dense_counts()[
            sec.counts.obs_names.get_loc(s)], rtol=1e-4, atol=1e-3)
    # cells outside every spot keep the area-weighted prediction
    raw = aggregate_cells(pred, seg.cells, um_per_px=0.5)
    out = spot == ""
    assert out.any()
    np.testing.assert_allclose(c.X[out], np.asarray(raw.X)[out], rtol=1e-5)
    assert c.obs["scaled_to_spot"].to_numpy().sum() == (~out).sum()


def test_bins_smaller_than_cells_are_not_scaled_to(small):
    import dataclasses

    sec, pred, seg = small
    bins = dataclasses.replace(sec, spot_diameter_um=8.0)  # as Visium HD 8 um bins
    c = cells_anndata(pred, seg, bins)
    assert not c.obs["scaled_to_spot"].any()
    assert "smaller than a cell" in c.uns["histosr"]["cells"]["not_scaled"]


def test_scale_to_spots_by_hand():
    X = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 5.0]])
    spot = np.array([0, 0, -1])
    M = np.array([[8.0, 6.0]])
    area = np.array([10.0, 30.0, 5.0])
    out = scale_cells_to_spots(X, spot, M, area)
    # gene 0: 1 + 3 -> 8 (x2); gene 1: predicted 0 in the spot, measured 6: split by area
    np.testing.assert_allclose(out, [[2.0, 1.5], [6.0, 4.5], [2.0, 5.0]])


def test_spot_of_points_by_hand():
    counts = empty_counts(["a", "b"], [[100.0, 100.0], [300.0, 100.0]])
    sec = Section("s", ArrayImage(np.full((200, 400, 3), 255, np.uint8)), 1.0, counts, 100.0)
    xy = np.array([[100.0, 140.0], [100.0, 160.0], [290.0, 90.0], [200.0, 100.0]])
    assert spot_of_points(sec, xy).tolist() == [0, -1, 1, -1]


def test_no_nucleus_gives_an_empty_anndata_with_a_warning(small):
    from histosr.segment import segment

    _, pred, _ = small
    blank = Section("blank", ArrayImage(np.full((400, 400, 3), 242, np.uint8)), 2.0,
                    make_counts(np.ones((3, pred.n_vars)), ["a", "b", "c"],
                                list(pred.var_names),
                                np.array([[60.0, 60.0], [200.0, 60.0], [60.0, 200.0]])), 55.0)
    seg = segment(blank, tissue=False, progress=False)
    assert seg.n_nuclei == 0
    pred = pred[:0].copy()
    pred.uns["histosr"] = {**pred.uns["histosr"], "grid_shape": list(seg.grid.shape),
                           "um_per_px": 2.0}
    with pytest.warns(UserWarning, match="no nucleus"):
        c = cells_anndata(pred, seg, blank)
    assert c.n_obs == 0 and c.n_vars == pred.n_vars


def test_grid_mismatch_is_an_error(small):
    _, pred, seg = small
    bad = pred.copy()
    bad.uns["histosr"] = {**bad.uns["histosr"], "grid_shape": [3, 3]}
    with pytest.raises(InputError, match="does not match"):
        cells_anndata(bad, seg)


def test_benchmark_protocol_scores(small, tmp_path):
    from histosr import benchmark
    from histosr.benchmark.cells import baselines, match_nuclei

    sec, _, _ = small
    res = benchmark.run("cells", "bilinear", sections=[sec], out=tmp_path, progress=False)
    s = res["sections"][sec.name]
    assert res["protocol"] == "cells" and json.loads((tmp_path / "results.json").read_text())
    assert s["seg_f1"] > 0.75 and abs(s["count_error"]) < 0.3 and s["n_matched"] > 50
    for k in ("pcc", "pcc_spot_value", "pcc_nuclei_split", "true_cells_pcc",
              "true_cells_pcc_spot_value", "pcc_visible", "pcc_spot_value_visible",
              "within_pcc", "within_pcc_spot_value", "density_pcc", "density_pcc_spot_value"):
        assert -1.0 <= s[k] <= 1.0
    assert s["seg_recall_tumour"] > 0.9  # dark round nuclei are found
    assert s["true_cells_pcc"] > 0.3 and s["pcc"] > 0.3
    # matching and baselines by hand
    P = np.zeros((6, 6), int)
    T = np.zeros((6, 6), int)
    P[0:2, 0:2], T[0:2, 0:2] = 1, 5  # IoU 1
    P[3:5, 3:5], T[3:5, 3:6] = 2, 6  # IoU 4/6
    P[0:1, 4:6], T[0:2, 4:6] = 3, 7  # IoU 1/2: not a match (> 0.5 needed)
    p, t, n_p, n_t = match_nuclei(P, T)
    assert sorted(zip(p.tolist(), t.tolist())) == [(1, 5), (2, 6)] and (n_p, n_t) == (3, 3)
    counts = make_counts(np.array([[10.0], [40.0]]), ["a", "b"], ["g"],
                         np.array([[100.0, 100.0], [300.0, 100.0]]))
    two = Section("s", ArrayImage(np.full((200, 400, 3), 255, np.uint8)), 1.0, counts, 100.0)
    b = baselines(two, np.array([[100.0, 100.0], [110.0, 90.0], [300.0, 100.0]]),
                  np.array([np.pi * 2500 / 10, np.pi * 2500 / 5, np.pi * 2500]), ["g"])
    np.testing.assert_allclose(b["spot_value"][:, 0], [1.0, 2.0, 40.0])
    np.testing.assert_allclose(b["nuclei_split"][:, 0], [5.0, 5.0, 40.0])


def test_xenium_simulation_keeps_its_cells(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _layouts import write_xenium_layout
    from histosr import benchmark
    from histosr.simulate import (
        read_simulated,
        simulate_from,
        synthetic_section,
        write_simulated,
    )

    sec = synthetic_section(seed=2, size_um=480.0, n_genes=8)
    write_xenium_layout(sec, tmp_path / "x")
    sim = simulate_from(tmp_path / "x" / "outs", format="xenium", n_genes=None,
                        image=str(tmp_path / "x" / "synx_he_image.ome.tif"),
                        alignment=str(tmp_path / "x" / "synx_he_imagealignment.csv"))
    cells = sim.truth["cells"]
    assert cells["counts"].shape == (sec.n_spots, 8) and len(cells["polygons"]) == sec.n_spots
    write_simulated(sim, tmp_path / "sims" / "x1")
    back = read_simulated(tmp_path / "sims" / "x1")
    bc = back.truth["cells"]
    assert list(bc["ids"]) == list(cells["ids"])
    np.testing.assert_allclose(bc["counts"].toarray(), cells["counts"].toarray())
    np.testing.assert_allclose(bc["polygons"][3], cells["polygons"][3])
    res = benchmark.run("cells", "bilinear", data=tmp_path / "sims", out=tmp_path / "b",
                        progress=False)
    s = res["sections"][back.name]
    # the cells are the truth's 8 um squares: the prediction over them is scored exactly
    assert s["n_true_cells"] == sec.n_spots and s["true_cells_pcc"] > 0.3
    assert "seg_f1" not in s  # no nuclei in the truth: only the count is compared


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """`histosr run` with outputs.cells on a small synthetic section of known cells."""
    import yaml

    from histosr.io import write_istar
    from histosr.simulate.cells import synthetic_cells_visium

    base = tmp_path_factory.mktemp("cellsrun")
    sec = synthetic_cells_visium(seed=6, size_um=400.0, n_genes=10)
    write_istar(sec, base / "sec")
    cfg = {"section": {"reader": "istar", "path": str(base / "sec")},
           "method": {"name": "bilinear"}, "genes": {"n_top": 10, "min_frac": 0.0},
           "predict": {"n_previews": 1},
           "outputs": {"cells": {"expand_um": 10, "params": {"max_area_um2": 250}}},
           "out": str(base / "run")}
    (base / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--quiet", "run", str(base / "cfg.yaml")]) == 0
    return base / "run"


def test_run_config_writes_cells(run_dir):
    rep = json.loads((run_dir / "report.json").read_text())
    c = ad.read_h5ad(rep["outputs"]["cells"])
    assert c.n_obs == rep["outputs"]["n_cells"] > 50
    assert c.uns["histosr"]["cells"]["expand_um"] == 10.0
    assert c.uns["histosr"]["cells"]["params"] == {"max_area_um2": 250}
    assert any("cells_" in p for p in rep["images"])
    assert (run_dir / "cells" / "segmentation.zarr").is_dir()
    assert "cells" in rep["timings_s"]


def test_cells_verb_on_a_run_folder(run_dir, tmp_path, capsys):
    assert main(["--quiet", "cells", str(run_dir), "--out", str(tmp_path / "c"),
                 "--expand-um", "5", "--genes", "VIS_TUMOUR_0", "--no-scale-to-spots"]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    c = ad.read_h5ad(tmp_path / "c" / "cells.h5ad")
    assert line["n_cells"] == c.n_obs and not c.obs["scaled_to_spot"].any()
    assert line["previews"] == [str(tmp_path / "c" / "previews" / "cells_VIS_TUMOUR_0.png")]
    assert -1.0 <= line["nuclei_per_spot_vs_classical_r"] <= 1.0
    assert (tmp_path / "c" / "report.html").is_file()
    # a folder that is not a super-resolution run: one line, exit 2
    assert main(["--quiet", "cells", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["--quiet", "cells", str(run_dir), "--segmenter-option", "min_odd=1"]) == 2
    assert "did you mean 'min_od'" in capsys.readouterr().err


def test_config_checks_cells_options():
    from histosr.config import ConfigError, validate

    base = {"section": {"reader": "istar", "path": "x"}}
    with pytest.raises(ConfigError, match="did you mean 'expand_um'"):
        validate({**base, "outputs": {"cells": {"expand": 3}}})
    with pytest.raises(ConfigError, match="did you mean 'cellpose'"):
        validate({**base, "outputs": {"cells": {"segmenter": "cellpos"}}})
    assert validate({**base, "outputs": {"cells": True}}).outputs.cells is True
