"""The CLI verbs chained as a user would: simulate → features → fit → predict → evaluate."""

import json

import anndata as ad
import numpy as np
import pytest

from histosr.cli import main


def test_simulate_fit_predict_evaluate(tmp_path, capsys):
    sec = tmp_path / "sec"
    assert main(["--quiet", "simulate", "--seed", "1", "--out", str(sec)]) == 0
    assert (sec / "he-raw.jpg").is_file() and (sec / "cnts.tsv").is_file()
    assert main(["--quiet", "features", str(sec), "--reader", "istar",
                 "--out", str(tmp_path / "f.zarr")]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(["--quiet", "fit", str(sec), "--reader", "istar", "--features",
                 str(tmp_path / "f.zarr"), "--method", "istar", "--params",
                 '{"epochs": 30, "n_states": 1}', "--n-genes", "20", "--out", str(run)]) == 0
    assert (run / "model" / "model.json").is_file()
    assert main(["--quiet", "predict", str(sec), "--reader", "istar", "--features",
                 str(tmp_path / "f.zarr"), "--model", str(run / "model"), "--at", "spots",
                 "--out", str(tmp_path / "pred")]) == 0
    pred = ad.read_h5ad(tmp_path / "pred" / "prediction.h5ad")
    assert pred.n_vars == 20 and pred.uns["histosr"]["consistency"]
    capsys.readouterr()
    assert main(["--quiet", "evaluate", str(sec), "--reader", "istar", "--prediction",
                 str(tmp_path / "pred" / "prediction.h5ad")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # consistency on the fitted spots: footprint sums reproduce the measured counts
    assert res["n_spots"] == pred.n_obs and res["pcc_mean"] > 0.99
    assert res["in_sample"] is True and "consistency forces" in res["note"]
    assert np.isfinite(res["pcc_median"])


def test_benchmark_p4_cli_writes_results(tmp_path, capsys):
    out = tmp_path / "p4"
    assert main(["--quiet", "benchmark", "p4", "--method", "knn", "--sections", "0",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == "p4" and res["method"] == "knn"
    m = res["mean"]
    assert m["pcc"] > m["shuffled_pcc"] + 0.2 and m["ssim"] > m["shuffled_ssim"]


def test_set_values_keep_words_as_strings():
    from histosr.config import ConfigError, apply_overrides, parse_assignments

    assert parse_assignments(["context=off", "epochs=10", "rgb-pos=false", "hidden=[8,4]"]) == {
        "context": "off", "epochs": 10, "rgb_pos": False, "hidden": [8, 4]}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignments(["context"])
    cfg = apply_overrides({"method": {"name": "istar"}}, parse_assignments(
        ["method.params.epochs=20", "genes.n_top=50", "method.consistency=false"]))
    assert cfg == {"method": {"name": "istar", "params": {"epochs": 20}, "consistency": False},
                   "genes": {"n_top": 50}}
