"""Visium HD, Xenium and HEST readers on folders written in the real layouts from a synthetic
section, the simulation from 8 um truth (read -> simulate -> fit -> P4) and the fixtures."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from _layouts import _alignment, write_visium_hd_layout, write_xenium_layout
from histosr.io import detect_platform, read, read_hest, read_visium_hd, read_xenium
from histosr.section import SectionError
from histosr.simulate import (
    read_simulated,
    simulate_from,
    synthetic_section,
    truth_from_cells,
    write_simulated,
)


@pytest.fixture(scope="module")
def syn():
    return synthetic_section(seed=3, size_um=800.0, n_genes=12)


def _p4(sec):
    from histosr.benchmark import p4

    return p4("bilinear", sections=[sec], progress=False)["sections"][sec.name]


# ------------------------------------------------------------------------------ Visium HD
def test_visium_hd_real_layout_round_trip(syn, tmp_path):
    write_visium_hd_layout(syn, tmp_path)
    assert detect_platform(tmp_path / "outs") == "visium_hd"
    hd = read_visium_hd(tmp_path / "outs")
    assert hd.meta["image_source"] == "user" and "microscope_image_found" in hd.meta
    assert hd.um_per_px == pytest.approx(0.5) and hd.spot_diameter_um == 8.0
    assert hd.n_spots == syn.n_spots
    np.testing.assert_allclose(hd.xy, syn.xy)

    sim = simulate_from(tmp_path / "outs", n_genes=None)
    # bins sit exactly on superpixels: the truth is the synthetic cube itself
    np.testing.assert_array_equal(sim.truth["mask"], syn.truth["mask"])
    np.testing.assert_allclose(sim.truth["cube"], syn.truth["cube"])
    assert sim.platform == "visium" and sim.spot_diameter_um == 55.0 and sim.n_spots > 20
    s = _p4(sim)
    assert s["pcc"] > s["shuffled_pcc"] + 0.1 and s["ssim"] > s["shuffled_ssim"]

    # stored and read back: same spots, counts and truth
    write_simulated(sim, tmp_path / "sim")
    back = read_simulated(tmp_path / "sim")
    assert detect_platform(tmp_path / "sim") == "simulated"
    np.testing.assert_allclose(back.xy, sim.xy, atol=0.5)
    np.testing.assert_allclose(back.dense_counts(), sim.dense_counts())
    np.testing.assert_allclose(back.truth["cube"], sim.truth["cube"])
    assert list(back.counts.obs["array_row"]) == list(sim.counts.obs["array_row"])


def test_visium_hd_area_assignment_conserves_counts(syn, tmp_path):
    from histosr.simulate import truth_from_bins

    write_visium_hd_layout(syn, tmp_path)
    hd = read_visium_hd(tmp_path / "outs", bin_size="square_008um")
    # shift the bins by a quarter superpixel: each bin now straddles superpixels
    hd.counts.obsm["spatial"] = hd.xy + 4.0
    t = truth_from_bins(hd, n_genes=None, assign="area")
    np.testing.assert_allclose(t.truth["cube"].sum((0, 1)), hd.dense_counts().sum(0), rtol=1e-5)
    near = truth_from_bins(hd, n_genes=5)
    assert near.truth["cube"].shape[2] == 5 and len(near.truth["genes"]) == 5


def test_visium_hd_wrong_pixel_size_is_caught(syn, tmp_path):
    write_visium_hd_layout(syn, tmp_path)
    with pytest.warns(UserWarning, match="spot_diameter_fullres"), pytest.raises(
            SectionError, match="bin lattice"):
        read_visium_hd(tmp_path / "outs", um_per_px=0.8)


def test_visium_hd_fixture_2um(data_dir):
    with pytest.warns(UserWarning):
        s = read(data_dir / "fixtures" / "visium_hd_layout_10bins")
    assert s.platform == "visium_hd" and s.n_spots == 10 and s.spot_diameter_um == 2.0


# ---------------------------------------------------------------------------------- Xenium
def test_xenium_real_layout_round_trip(syn, tmp_path):
    write_xenium_layout(syn, tmp_path)
    assert detect_platform(tmp_path / "outs") == "xenium"
    x = read_xenium(tmp_path)
    assert x.platform == "xenium" and x.name == "synx"
    assert x.um_per_px == pytest.approx(0.5)
    assert x.counts.n_vars == len(syn.genes)  # negative-control probes dropped
    np.testing.assert_allclose(x.xy, syn.xy, atol=1e-6)
    assert x.spot_diameter_um == pytest.approx(2 * np.sqrt(64 / np.pi))

    sim = simulate_from(tmp_path / "outs", n_genes=None)
    assert sim.meta["simulated_format"] == "xenium"
    np.testing.assert_allclose(sim.truth["cube"], syn.truth["cube"], atol=1e-4)
    s = _p4(sim)
    assert s["pcc"] > s["shuffled_pcc"] + 0.1 and s["ssim"] > s["shuffled_ssim"]


def test_xenium_disks_without_boundaries_conserve_counts(syn, tmp_path):
    write_xenium_layout(syn, tmp_path, boundaries=False)
    x = read_xenium(tmp_path / "outs")
    t = truth_from_cells(x, n_genes=None)
    assert t.meta["truth_source"].startswith("xenium cell disks")
    np.testing.assert_allclose(t.truth["cube"].sum((0, 1)), x.dense_counts().sum(0), rtol=1e-4)
    assert t.truth["mask"].sum() >= 0.9 * syn.truth["mask"].sum()


def test_xenium_errors(syn, tmp_path):
    write_xenium_layout(syn, tmp_path)
    with pytest.raises(SectionError, match="alignment"):
        read_xenium(tmp_path, alignment=np.linalg.inv(_alignment()))
    (tmp_path / "synx_he_image.ome.tif").unlink()
    with pytest.raises(SectionError, match="no H&E image"):
        read_xenium(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SectionError, match="not a Xenium output folder"):
        read_xenium(tmp_path / "empty")


def test_xenium_cells_fixture(data_dir):
    d = data_dir / "fixtures" / "xenium_cells_lung_core"
    assert detect_platform(d) == "hest"
    s = read_hest(d, um_per_px=1.7, platform="xenium")
    assert s.platform == "xenium" and s.n_spots == 200 and s.counts.n_vars == 338
    assert read(d, um_per_px=1.7).n_spots == 200
    assert s.spot_diameter_um == 20.0  # cell_diameter of the json
    np.testing.assert_allclose(s.xy[:, 0], s.counts.obs["y_pixel"])  # x_pixel is the row
    with pytest.raises(SectionError, match="pixel size unknown"):
        read_hest(d)


# ------------------------------------------------------------------------------------ HEST
def test_hest_layout(syn, tmp_path):
    import anndata as ad
    import tifffile

    from histosr.simulate import pseudo_visium

    pv = pseudo_visium(syn)
    for d in ("st", "wsis", "metadata"):
        (tmp_path / d).mkdir()
    a = ad.AnnData(X=sp.csr_matrix(pv.counts.X), obs=pv.counts.obs.copy(),
                   var=pd.DataFrame(index=pv.counts.var_names))
    a.obs["pxl_col_in_fullres"], a.obs["pxl_row_in_fullres"] = pv.xy[:, 0], pv.xy[:, 1]
    a.obsm["spatial"] = pv.xy
    a.write_h5ad(tmp_path / "st" / "SYN1.h5ad")
    img = syn.image.array
    with tifffile.TiffWriter(tmp_path / "wsis" / "SYN1.tif") as tw:  # pyramidal
        tw.write(img, tile=(256, 256), subifds=1)
        tw.write(img[::2, ::2], tile=(256, 256), subfiletype=1)
    (tmp_path / "metadata" / "SYN1.json").write_text(json.dumps({
        "pixel_size_um_estimated": 0.5, "pixel_size_um_embedded": 0.49, "spot_diameter": 55.0,
        "inter_spot_dist": 100.0, "st_technology": "Visium", "id": "SYN1"}))
    assert detect_platform(tmp_path) == "hest"
    s = read(tmp_path)
    assert s.platform == "visium" and s.name == "SYN1" and s.um_per_px == 0.5
    assert s.image.shape == img.shape
    np.testing.assert_array_equal(s.image.read(100, 200, 8, 8), img[100:108, 200:208])
    np.testing.assert_allclose(s.dense_counts(), pv.dense_counts())
    with pytest.raises(SectionError, match="spot pitch"):
        read_hest(tmp_path, "SYN1", um_per_px=0.8)
    with pytest.raises(SectionError, match="not found"):
        read_hest(tmp_path, "NOPE")


# ------------------------------------------------------------------------------------- CLI
def test_visium_hd_cli_simulate_and_benchmark_p4(syn, tmp_path, capsys):
    from histosr.cli import main

    write_visium_hd_layout(syn, tmp_path / "run")
    out = tmp_path / "sims" / "hd1"
    assert main(["--quiet", "simulate", "--from", str(tmp_path / "run"), "--n-genes", "8",
                 "--out", str(out)]) == 0
    assert (out / "truth.zarr").is_dir() and (out / "he-raw.jpg").is_file()
    capsys.readouterr()
    assert main(["--quiet", "benchmark", "p4", "--method", "bilinear", "--data",
                 str(tmp_path / "sims"), "--out", str(tmp_path / "bench")]) == 0
    res = json.loads((tmp_path / "bench" / "results.json").read_text())
    sc = res["sections"][next(iter(res["sections"]))]
    assert sc["n_genes"] == 8 and sc["pcc"] > sc["shuffled_pcc"] + 0.1
    assert main(["--quiet", "simulate", "--from", str(tmp_path), "--format", "xenium",
                 "--out", str(tmp_path / "bad")]) == 2
