import json
from dataclasses import dataclass

import numpy as np
import pytest

from histosr import benchmark
from histosr.benchmark.common import method_factory
from histosr.benchmark.results import mean_over_sections, write_results
from histosr.features.featuremap import grid_only
from histosr.methods.base import SuperpixelMethod
from histosr.simulate import synthetic_visium

SECTION_KEYS = {"top50_pcc", "top50_pcc_median", "hvg1000_pcc", "top50_within_pcc", "mae",
                "seconds"}
P4_KEYS = {"pcc", "ssim", "rmse", "shuffled_pcc", "shuffled_ssim", "shuffled_rmse"}


@dataclass
class SpotMean(SuperpixelMethod):
    """Test stub: every superpixel gets the mean density of the spots (reads no features)."""

    name = "spot_mean_stub"
    needs_features = False

    def _fit(self, sections, features):
        s = sections[0]
        self.mean_ = s.dense_counts(self.genes_).mean(axis=0) / 37.0

    def _predict_cells(self, section, features, flat_cells):
        return np.tile(self.mean_, (len(flat_cells), 1)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    return synthetic_visium(seed=1, size_um=640.0, n_genes=8)


def _check_layout(res, protocol, extra=()):
    assert set(res) == {"protocol", "method", "encoder", "params", "sections", "mean",
                        "seconds", "peak_rss_mb"}
    assert res["protocol"] == protocol
    assert isinstance(res["params"]["consistency"], bool)
    assert "reduced_from_published" in res["params"]
    for scores in res["sections"].values():
        assert SECTION_KEYS | set(extra) <= set(scores)
    assert SECTION_KEYS - {"seconds"} <= set(res["mean"])
    assert res["seconds"] >= 0 and res["peak_rss_mb"] > 0


def test_p4_end_to_end(tiny, tmp_path):
    res = benchmark.run("p4", "nearest", sections=[tiny], out=tmp_path, progress=False,
                        consistency=False)
    _check_layout(res, "p4", P4_KEYS)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(res))
    assert not list(tmp_path.glob(".results.*"))  # atomic write leaves no temp file
    s = res["sections"][tiny.name]
    assert s["coverage"] == 1.0 and s["n_superpixels"] == int(tiny.truth["mask"].sum())
    assert s["pcc"] > s["shuffled_pcc"] + 0.3
    assert abs(s["shuffled_pcc"]) < 0.05
    assert s["ssim"] > s["shuffled_ssim"] and s["rmse"] < s["shuffled_rmse"]
    assert s["top50_within_pcc"] == pytest.approx(0.0, abs=1e-6)  # constant inside a spot
    assert res["params"]["consistency"] is False


def test_p4_stub_without_features(tiny):
    res = benchmark.p4(SpotMean(), sections=[tiny], progress=False)
    s = res["sections"][tiny.name]
    assert res["method"] == "spot_mean_stub" and res["encoder"] == "handcrafted"
    assert s["pcc"] == 0.0 and s["shuffled_pcc"] == 0.0  # constant maps


def test_score_superpixels_perfect(tiny):
    import anndata as ad
    import pandas as pd

    mask = tiny.truth["mask"]
    r, c = np.nonzero(mask)
    X = tiny.truth["cube"][r, c]
    obs = pd.DataFrame({"row": r, "col": c}, index=[f"{a}_{b}" for a, b in zip(r, c)])
    pred = ad.AnnData(X=X, obs=obs,
                      var=pd.DataFrame(index=tiny.truth["genes"]))
    s = benchmark.score_superpixels(pred, tiny)
    assert s["pcc"] == pytest.approx(1.0) and s["ssim"] == pytest.approx(1.0)
    assert s["rmse"] == pytest.approx(0.0) and s["top50_within_pcc"] == pytest.approx(1.0)
    assert s["shuffled_pcc"] < 0.1


def test_p2_on_synthetic_nearest(tiny):
    """P2 runs on any section with lattice coordinates; nearest gives each native spot its
    block's value, so nothing is left within blocks."""
    res = benchmark.p2("nearest", sections=[tiny], progress=False, consistency=False)
    _check_layout(res, "p2")
    s = res["sections"][tiny.name]
    assert s["top50_within_pcc"] == pytest.approx(0.0, abs=1e-6)
    assert s["top50_pcc"] > 0.3
    assert not any(k.startswith("raw_") for k in s)
    # with consistency, the same fit is also scored without it
    s2 = benchmark.p2("bilinear", sections=[tiny], progress=False,
                      consistency=True)["sections"][tiny.name]
    assert {"raw_top50_pcc", "raw_hvg1000_pcc", "raw_top50_within_pcc"} <= set(s2)
    assert s2["raw_top50_pcc"] != s2["top50_pcc"]


def test_method_factory_records_reductions():
    make, params, name = method_factory("istar", epochs=3, n_states=1, seed=2,
                                        consistency=True)
    m = make()
    assert name == "istar" and m.epochs == 3 and m.n_states == 1 and m.consistency
    assert params["reduced_from_published"] is True
    assert params["published_defaults"] == {"epochs": 400, "n_states": 5}
    make, params, _ = method_factory("nearest", epochs=3)
    assert params["reduced_from_published"] is False and "epochs" in params["ignored"]
    with pytest.raises(ValueError, match="unknown method"):
        method_factory("no_such_method")
    with pytest.raises(ValueError, match="unknown protocol"):
        benchmark.run("p9", "nearest")


def test_report_helpers(tmp_path):
    secs = {"A": {"top50_pcc": 0.2, "seconds": 3.0, "n_spots": 5},
            "B": {"top50_pcc": 0.4, "seconds": 1.0, "n_spots": 7, "x": float("nan")}}
    assert mean_over_sections(secs) == {"top50_pcc": 0.3}
    p = write_results({"a": np.float32(1.5), "b": float("inf")}, tmp_path / "o")
    assert json.loads(p.read_text()) == {"a": 1.5, "b": None}


def test_grid_only_features(tiny):
    fm = grid_only(tiny)
    assert fm.dim == 0 and fm.mask.shape == fm.grid.shape and fm.mask.any()


@pytest.mark.slow
def test_p2_her2st_nearest(data_dir, tmp_path):
    res = benchmark.run("p2", "nearest", data=data_dir, sections=["C2"], out=tmp_path,
                        progress=False, consistency=False)
    _check_layout(res, "p2")
    s = res["sections"]["C2"]
    assert s["n_genes"] == 1000 and s["n_spots"] > 150
    assert abs(s["top50_within_pcc"]) < 0.02
    assert s["top50_pcc"] > 0.5 and s["hvg1000_pcc"] > 0.4
    assert (tmp_path / "results.json").is_file()
