import json

import numpy as np
import pytest

from _hespotex_data import sections
from histosr import benchmark
from histosr.benchmark.p3 import image_only_view
from histosr.methods.hespotex import HESpotEx
from histosr.pp import select_genes


def test_image_only_view_hides_counts():
    s = sections()[0]
    v = image_only_view(s)
    assert v.counts.n_vars == 0 and v.n_spots == s.n_spots
    np.testing.assert_array_equal(v.xy, s.xy)
    assert v.image is s.image and v.um_per_px == s.um_per_px


def test_genes_from_training_sections_only():
    a, b, c = sections()[:3]
    g = select_genes([a, b], 10)
    assert len(g) == 10 and all(x in a.genes and x in b.genes for x in g)
    assert g[:5] == select_genes([a, b], 5)  # top-n is a prefix (top50 of hvg1000)


def test_p3_serial_equals_dask_and_writes_results(tmp_path):
    distributed = pytest.importorskip("distributed")
    secs = sections()[:3]
    kw = dict(sections=secs, progress=False, consistency=True)
    serial = benchmark.run("p3", "knn", out=tmp_path / "serial", **kw)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    tiny = HESpotEx(gate_epochs=30, epochs=5, head_hidden=64, gate_hidden=32, progress=False)
    try:
        par = benchmark.run("p3", "knn", out=tmp_path / "dask", scheduler=client, **kw)
        # torch training in two worker threads at once gives the serial numbers too
        hs_par = benchmark.run("p3", tiny, scheduler=client, **kw)
    finally:
        client.close()
        cluster.close()
    assert list(serial["sections"]) == [s.name for s in secs] == list(par["sections"])
    for name in serial["sections"]:
        for key in ("top50_pcc", "hvg1000_pcc", "mae"):
            assert serial["sections"][name][key] == par["sections"][name][key]
    hs = benchmark.run("p3", tiny, **kw)
    assert all(hs["sections"][n][k] == hs_par["sections"][n][k] for n in hs["sections"]
               for k in ("top50_pcc", "hvg1000_pcc", "mae"))
    res = json.loads((tmp_path / "serial" / "results.json").read_text())
    assert res["protocol"] == "p3" and res["method"] == "knn_features"
    assert "knn" in res["params"]["method_mapped_from"] and res["params"]["consistency"] is False
    assert set(res["mean"]) >= {"top50_pcc", "hvg1000_pcc", "mae"}
    assert res["mean"]["top50_pcc"] > 0.2


def test_p3_rejects_methods_needing_measured_spots():
    with pytest.raises(ValueError, match="spot-level"):
        benchmark.run("p3", "nearest", sections=sections()[:2], progress=False)
