"""End to end: `histosr run` from a YAML config, the demo pieces, the CLI's error path."""

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import zarr

from histosr.cli import main
from histosr.io import write_istar
from histosr.simulate import synthetic_visium


def _config(tmp_path, section: dict, genes=None) -> str:
    import yaml

    cfg = {
        "section": section,
        "features": {"encoder": "handcrafted"},
        "method": {"name": "istar", "params": {"epochs": 20, "n_states": 2},
                   "consistency": True},
        "genes": {"n_top": 30, "min_frac": 0.1},
        "seed": 0,
        "out": str(tmp_path / "run"),
    }
    if genes:
        cfg["predict"] = {"previews": genes}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_run_config_on_istar_folder_writes_anndata_maps_report(tmp_path):
    s = synthetic_visium(seed=3, size_um=800)
    write_istar(s, tmp_path / "sec")
    cfg = _config(tmp_path, {"reader": "istar", "path": str(tmp_path / "sec")})
    assert main(["--quiet", "run", cfg]) == 0
    run = tmp_path / "run"
    pred = ad.read_h5ad(run / "prediction.h5ad")
    meta = pred.uns["histosr"]
    assert meta["method"] == "istar" and meta["consistency"]
    assert pred.n_vars == 30 and pred.n_obs > 100
    assert {"row", "col"} <= set(pred.obs.columns)
    assert (pred.X >= 0).all()
    maps = zarr.open_group(str(run / "maps.zarr"), mode="r")["maps"]
    assert maps.shape[0] == 30
    r, c = pred.obs["row"].to_numpy(), pred.obs["col"].to_numpy()
    np.testing.assert_allclose(maps[0][r, c], np.asarray(pred.X[:, 0]).ravel(), rtol=1e-5)
    rep = json.loads((run / "report.json").read_text())
    assert rep["images"] and (run / "report.html").is_file()
    assert 0.0 < rep["metrics"]["in_sample_spot_pcc_mean"] < 0.999  # before consistency
    # consistency: footprint sums equal the measured counts at the section's spots
    spots = ad.read_h5ad(run / "prediction_spots.h5ad")
    sec = s.counts[spots.obs_names, spots.var_names]
    np.testing.assert_allclose(spots.X, np.asarray(sec.X), rtol=1e-3, atol=1e-3)
    # a second run reuses the fitted model from the run cache
    assert main(["--quiet", "run", cfg]) == 0
    rep2 = json.loads((run / "report.json").read_text())
    assert any("reused" in n for n in rep2["notes"])
    assert rep2["timings_s"]["fit"] < rep["timings_s"]["fit"]


def test_cli_user_errors_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "histosr", "features", str(tmp_path / "nope"),
           "--out", str(tmp_path / "f.zarr")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.startswith("histosr: error:")
    bad = tmp_path / "bad.yaml"
    bad.write_text("section: {reader: nosuch, path: x}\n")
    r = subprocess.run([sys.executable, "-m", "histosr", "run", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown reader" in r.stderr


def test_doctor_lists_encoders_and_methods(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "handcrafted" in out and "istar" in out and "knn" in out
