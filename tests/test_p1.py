"""P1 spot hold-out: the split rule, scoring and results.json layout."""

import json

import numpy as np
import pytest

from histosr.benchmark import run
from histosr.benchmark.p1 import score_held_out, split, subset
from histosr.simulate import synthetic_visium


def test_split_rule():
    ids = [f"{a}x{b}" for a in range(3, 12) for b in range(7, 10)] + ["100x1"]
    tr, ho = split(np.array(ids)[::-1])
    s = sorted(ids)  # sorted as strings ("100x1" < "10x7" < "3x7")
    perm = np.random.default_rng(0).permutation(len(s))
    assert ho == sorted(s[i] for i in perm[: len(s) // 2])
    assert len(ho) == len(s) // 2 and len(tr) == len(s) - len(s) // 2
    assert not set(tr) & set(ho) and set(tr) | set(ho) == set(ids)
    assert split(ids) == (tr, ho)  # input order does not matter


def test_score_held_out():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(30, 60))
    s = score_held_out(t.copy(), t)
    assert s["top50_pcc"] == pytest.approx(1.0) and s["mae"] == pytest.approx(0.0)
    s = score_held_out(np.zeros_like(t), t)  # constant prediction counts as r = 0
    assert s["top50_pcc"] == 0.0


@pytest.fixture(scope="module")
def sec():
    return synthetic_visium(seed=1, size_um=900, n_genes=10)


@pytest.mark.parametrize("method", ["knn", "hishrst"])
def test_p1_runs_and_writes_results(sec, method, tmp_path):
    res = run("p1", method, sections=[sec], epochs=2, out=tmp_path, progress=False)
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["protocol"] == "p1" and r["method"] == method
    one = r["sections"][sec.name]
    for k in ("top50_pcc", "top50_pcc_median", "hvg1000_pcc", "mae", "seconds"):
        assert k in one
    assert one["n_spots"] == sec.n_spots // 2
    assert r["mean"]["top50_pcc"] == pytest.approx(one["top50_pcc"], abs=1e-4)
    assert "scoring" in r["params"] and res["method"] == method
    if method == "knn":
        assert one["top50_pcc"] > 0.2
    else:
        assert r["params"]["reduced_from_published"] and r["params"]["consistency"] is False


def test_subset_keeps_lattice(sec):
    tr, ho = split(sec.counts.obs_names)
    a = subset(sec, tr)
    assert a.n_spots == len(tr) and a.image is sec.image
    assert list(a.counts.obs.columns) == list(sec.counts.obs.columns)
