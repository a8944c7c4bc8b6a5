"""End to end, as a user runs it: `histosr run` from a YAML config for every reader and every
fixture in ../shared/data/fixtures (plus a her2st section and synthetic folders in the layouts
of the readers without a fixture), with a fast method (knn) and a learned one at tiny settings.

A new reader or fixture joins by being listed once in CASES. Every run must write the
AnnData, maps, previews and report; an input with nothing to learn from must stop with a
message that names what was found.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
import zarr

from histosr.cli import main

#: learned method at tiny settings (the matrix checks the plumbing, not accuracy)
LEARNED = {"name": "istar", "params": {"epochs": 2, "n_states": 1, "hidden": 16}}
FAST = {"name": "knn"}


def _synthetic(seed=4):
    from histosr.simulate import synthetic_section

    return synthetic_section(seed=seed, size_um=640.0, n_genes=12)


def _istar(tmp: Path) -> dict:
    from histosr.io import write_istar
    from histosr.simulate import pseudo_visium

    write_istar(pseudo_visium(_synthetic()), tmp / "istar")
    return {"reader": "istar", "path": str(tmp / "istar")}


def _visium_hd(tmp: Path) -> dict:
    from _layouts import write_visium_hd_layout

    write_visium_hd_layout(_synthetic(), tmp / "hd")
    return {"reader": "visium_hd", "path": str(tmp / "hd" / "outs"), "bin_size": 8}


def _xenium(tmp: Path) -> dict:
    from _layouts import write_xenium_layout

    write_xenium_layout(_synthetic(), tmp / "xen")
    return {"reader": "xenium", "path": str(tmp / "xen" / "outs"),
            "image": str(tmp / "xen" / "synx_he_image.ome.tif"),
            "alignment": str(tmp / "xen" / "synx_he_imagealignment.csv")}


def _h5ad(tmp: Path) -> dict:
    from PIL import Image

    from histosr.simulate import pseudo_visium

    sec = pseudo_visium(_synthetic())
    sec.counts.write_h5ad(tmp / "spots.h5ad")
    Image.fromarray(sec.image.array).save(tmp / "he.png")
    return {"reader": "h5ad", "path": str(tmp / "spots.h5ad"), "image": str(tmp / "he.png"),
            "um_per_px": sec.um_per_px, "spot_diameter_um": sec.spot_diameter_um}


def _spatialdata(tmp: Path) -> dict:
    pytest.importorskip("spatialdata")
    from histosr.io import write_spatialdata
    from histosr.simulate import pseudo_visium

    write_spatialdata(tmp / "sd.zarr", pseudo_visium(_synthetic()))
    return {"reader": "spatialdata", "path": str(tmp / "sd.zarr")}


def _simulated(tmp: Path) -> dict:
    from histosr.simulate import synthetic_visium, write_simulated

    write_simulated(synthetic_visium(seed=5, size_um=640.0, n_genes=12), tmp / "sim")
    return {"reader": "simulated", "path": str(tmp / "sim")}


def _data(rel: str, **kw):
    def make(tmp: Path, data: Path) -> dict:
        return {"path": str(data / rel), **kw}
    return make


#: id -> (section spec maker, expected: "ok" or an error message fragment, extra outputs)
CASES = {
    "her2st_C2": (_data("her2st", reader="her2st", name="C2"), "ok", {}),
    "st_mouse_olfactory_bulb": (_data("fixtures/st_mouse_olfactory_bulb", reader="st"), "ok", {}),
    "visium_v1_mouse_brain": (_data("fixtures/visium_v1_mouse_brain_100genes", reader="visium"),
                              "ok", {}),
    "visium_v1_human_100spots": (_data("fixtures/visium_v1_human_100spots", reader="visium"),
                                 "ok", {}),
    # a CytAssist section with only a low-resolution image: SpatialData output of a run
    "visium_sr3_cytassist_embryo": (_data("fixtures/visium_sr3_cytassist_mouse_embryo",
                                          reader="visium"), "ok", {"spatialdata": True}),
    "visium_hd_fixture_10bins": (_data("fixtures/visium_hd_layout_10bins", reader="visium_hd",
                                       bin_size=2), "no counts at all", {}),
    "xenium_cells_lung_core": (_data("fixtures/xenium_cells_lung_core", reader="hest",
                                     um_per_px=1.7, platform="xenium"), "ok", {}),
    "istar_folder": (lambda tmp, data: _istar(tmp), "ok", {}),
    "visium_hd_layout": (lambda tmp, data: _visium_hd(tmp), "ok", {}),
    "xenium_layout": (lambda tmp, data: _xenium(tmp), "ok", {}),
    "h5ad_file": (lambda tmp, data: _h5ad(tmp), "ok", {}),
    "spatialdata_store": (lambda tmp, data: _spatialdata(tmp), "ok", {}),
    "simulated_folder": (lambda tmp, data: _simulated(tmp), "ok", {}),
}


def test_every_reader_is_in_the_matrix():
    from histosr.io import READERS

    readers = {"her2st", "st", "visium", "visium_hd", "hest", "istar", "xenium", "h5ad",
               "spatialdata", "simulated"}
    assert set(READERS) == readers, "add a case for the new reader to CASES"


def test_every_fixture_is_in_the_matrix(data_dir):
    listed = {v[0](Path("."), data_dir)["path"] for k, v in CASES.items()
              if v[0].__name__ == "make"}
    for f in sorted((data_dir / "fixtures").iterdir()):
        if f.is_dir():
            assert str(f) in listed, f"add fixture {f.name} to CASES"


def _run(cfg: dict, tmp: Path, capsys) -> tuple[int, str]:
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["--quiet", "run", str(path)])
    return rc, capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", [FAST, LEARNED], ids=["knn", "istar"])
@pytest.mark.parametrize("case", list(CASES))
def test_run_matrix(case, method, tmp_path, data_dir, capsys, one_torch_thread):
    make, expect, outputs = CASES[case]
    section = make(tmp_path, data_dir)
    out = tmp_path / "run"
    cfg = {"section": section, "method": {**method, "consistency": True},
           "genes": {"n_top": 40}, "predict": {"n_previews": 2}, "out": str(out)}
    if outputs and method is LEARNED:
        cfg["outputs"] = outputs
    rc, err = _run(cfg, tmp_path, capsys)
    if expect != "ok":
        assert rc == 2 and expect in err and "Traceback" not in err, err
        assert not (out / "model").exists()  # stopped before any heavy work
        return
    assert rc == 0, err
    pred = ad.read_h5ad(out / "prediction.h5ad")
    spots = ad.read_h5ad(out / "prediction_spots.h5ad")
    assert pred.n_obs > 0 and pred.n_vars >= 2 and np.isfinite(pred.X).all()
    assert pred.uns["histosr"]["method"] == method["name"]
    assert spots.n_vars == pred.n_vars and spots.n_obs > 0
    maps = zarr.open_group(str(out / "maps.zarr"), mode="r")["maps"]
    r, c = pred.obs["row"].to_numpy(), pred.obs["col"].to_numpy()
    np.testing.assert_allclose(maps[0][r, c], np.asarray(pred.X[:, 0]).ravel(), rtol=1e-5)
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["images"]) == 2 and (out / "report.html").is_file()
    for img in rep["images"]:
        assert (out / img).stat().st_size > 5000
    assert np.isfinite(rep["metrics"]["in_sample_spot_pcc_mean"])
    if outputs.get("spatialdata") and method is LEARNED:
        from histosr.io import read_spatialdata
        from histosr.pipeline import read_section

        sd = read_spatialdata(out / "spatialdata.zarr")
        assert sd.n_spots == spots.n_obs
        assert sd.image.shape == read_section(section).image.shape  # written whole
