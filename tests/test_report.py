"""Outputs people look at: scanpy's uns["spatial"] in every written AnnData (drawn by
sc.pl.spatial over the H&E), previews on one quantity and colour range, the self-contained
HTML report (structure always; rendered in headless Chromium when it is installed)."""

import base64
import dataclasses
import json
import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
from PIL import Image

from histosr.cli import main
from histosr.image import ArrayImage, open_image, thumbnail_factor
from histosr.outputs import HELDOUT_PCC, HELDOUT_PCC_INTERP, add_spatial, spatial_images
from histosr.report import RunReport, best_of, report_for_results


# -- uns["spatial"] -------------------------------------------------------------------------------
def test_spatial_images_scale_factors_by_hand():
    a = np.full((3000, 2000, 3), 255, np.uint8)
    a[1000:1100, 400:500] = (200, 0, 0)  # a red square at x 400-500, y 1000-1100 (full res)
    im = spatial_images(ArrayImage(a))
    # hires: f = ceil(3000 / 2000) = 2 -> 1500 x 1000; lowres: f = ceil(3000 / 600) = 5
    assert im["hires"].shape == (1500, 1000, 3) and im["tissue_hires_scalef"] == 0.5
    assert im["lowres"].shape == (600, 400, 3) and im["tissue_lowres_scalef"] == 0.2
    # the square's centre (450, 1050) full res lands on red at scalef * (x, y)
    for key in ("hires", "lowres"):
        s = im[f"tissue_{key}_scalef"]
        assert tuple(im[key][int(1050 * s), int(450 * s)]) == (200, 0, 0)
    small = spatial_images(ArrayImage(np.zeros((500, 400, 3), np.uint8)))
    assert small["hires"].shape == (500, 400, 3) and small["tissue_hires_scalef"] == 1.0


def test_jpeg_thumbnails_decode_at_reduced_size(tmp_path):
    a = np.zeros((1600, 2400, 3), np.uint8)
    a[:, :1200] = (180, 40, 120)
    a[:, 1200:] = (240, 230, 235)
    p = tmp_path / "slide.jpg"
    Image.fromarray(a).save(p, quality=95)
    img = open_image(p)
    t = img.thumbnail(600)
    f = thumbnail_factor(img.shape, 600)
    assert f == 4 and t.shape == (400, 600, 3)
    assert img._array is None and img._draft_cache[1] == 4  # never decoded at full size
    assert np.abs(t[200, 100].astype(int) - (180, 40, 120)).max() < 12
    assert np.abs(t[200, 500].astype(int) - (240, 230, 235)).max() < 12
    assert img.thumbnail(600) is t  # kept per size
    z = img.read_scaled(800, 1100, 200, 200, 2)  # straddles the colour boundary at x = 1200
    assert z.shape == (100, 100, 3) and img._draft_cache[1] == 2
    assert z[:, :40].mean(axis=(0, 1))[1] < 80 and z[:, 60:].mean(axis=(0, 1))[1] > 200


def _check_spatial_plot(path: Path, gene: str) -> None:
    """sc.pl.spatial draws the file over its H&E: the hires image is shown and every
    observation is drawn at scalef * obsm["spatial"], on tissue (darker than the slide's
    average)."""
    sc = pytest.importorskip("scanpy")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = ad.read_h5ad(path)
    if a.n_obs > 600:  # scanpy draws one patch per observation: a sample says the same
        a = a[np.sort(np.random.default_rng(0).choice(a.n_obs, 600, replace=False))].copy()
    (lib, sp), = a.uns["spatial"].items()
    sf = sp["scalefactors"]
    hires = np.asarray(sp["images"]["hires"])
    assert hires.ndim == 3 and max(hires.shape[:2]) <= 2000
    assert sf["spot_diameter_fullres"] > 0 and 0 < sf["tissue_lowres_scalef"] <= \
        sf["tissue_hires_scalef"] <= 1
    axes = sc.pl.spatial(a, color=gene, img_key="hires", show=False)
    ax = axes[0] if isinstance(axes, list) else axes
    assert ax.images and ax.images[0].get_array().shape[:2] == hires.shape[:2]
    # one circle per observation (scanpy draws patches, sorted by value): centres and
    # diameter in hires px
    paths = [c.get_paths() for c in ax.collections if len(c.get_paths()) == a.n_obs][0]
    lo = np.array([p.vertices.min(axis=0) for p in paths])
    hi = np.array([p.vertices.max(axis=0) for p in paths])
    xy = np.asarray(a.obsm["spatial"]) * sf["tissue_hires_scalef"]
    # match drawn centres to positions one to one (a sort by x then y breaks ties between
    # x values equal up to float rounding, e.g. densified half steps)
    from scipy.spatial import cKDTree

    d, j = cKDTree(xy).query((lo + hi) / 2)
    assert d.max() < 1e-3, d.max()
    assert len(np.unique(j)) == len(xy)
    np.testing.assert_allclose(hi[:, 0] - lo[:, 0],
                               sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"], rtol=1e-3)
    r = np.clip(xy[:, 1].astype(int), 0, hires.shape[0] - 1)
    c = np.clip(xy[:, 0].astype(int), 0, hires.shape[1] - 1)
    assert hires[r, c].mean() < hires.mean() + 1.0
    plt.close("all")


def _synthetic_outputs(tmp_path) -> dict:
    """A synthetic section through every verb that writes an AnnData: `run` (superpixels
    and spots), `densify`, `fit` + `predict --image` (spot lattice and 8 um grid)."""
    from histosr.io import write_istar
    from histosr.simulate import synthetic_visium

    s = synthetic_visium(seed=1, size_um=500, n_genes=10)
    write_istar(s, tmp_path / "sec")
    Image.fromarray(s.image.read(0, 0, *s.image.shape[:2])).save(tmp_path / "he.png")
    cfg = {"section": {"reader": "istar", "path": str(tmp_path / "sec")},
           "method": {"name": "knn"}, "genes": {"n_top": 8},
           "predict": {"previews": [s.genes[0], "NOT_A_GENE"]}, "out": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    q = "--quiet"
    assert main([q, "run", str(tmp_path / "cfg.yaml")]) == 0
    sec = ["--reader", "istar", str(tmp_path / "sec")]
    assert main([q, "densify", *sec, "--method", "mean", "--factor", "4", "--n-genes", "8",
                 "--out", str(tmp_path / "dense")]) == 0
    assert main([q, "fit", *sec, "--method", "mean", "--n-genes", "8",
                 "--out", str(tmp_path / "fit")]) == 0
    for grid in ("spots", "superpixels"):
        assert main([q, "predict", "--model", str(tmp_path / "fit" / "model"), "--image",
                     str(tmp_path / "he.png"), "--um-per-px", "0.5", "--grid", grid,
                     "--out", str(tmp_path / f"img_{grid}")]) == 0
    return {"gene": s.genes[0], "run": tmp_path / "run", "files": [
        tmp_path / "run" / "prediction.h5ad", tmp_path / "run" / "prediction_spots.h5ad",
        tmp_path / "dense" / "densified.h5ad", tmp_path / "img_spots" / "prediction.h5ad",
        tmp_path / "img_superpixels" / "prediction.h5ad"]}


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    return _synthetic_outputs(tmp_path_factory.mktemp("outputs"))


def test_every_written_anndata_draws_with_scanpy(synthetic_run):
    for f in synthetic_run["files"]:
        _check_spatial_plot(f, synthetic_run["gene"])
    sp = ad.read_h5ad(synthetic_run["files"][0]).uns["spatial"]
    (lib, d), = sp.items()
    # superpixels are drawn at the 8 um pitch: 16 px at 0.5 um/px
    assert lib == "sec" and d["scalefactors"]["spot_diameter_fullres"] == pytest.approx(16.0)
    spots = ad.read_h5ad(synthetic_run["files"][1]).uns["spatial"]["sec"]["scalefactors"]
    assert spots["spot_diameter_fullres"] == pytest.approx(110.0)  # 55 um at 0.5 um/px


def test_run_report_structure(synthetic_run):
    run = synthetic_run["run"]
    rep = json.loads((run / "report.json").read_text())
    page = (run / "report.html").read_text()
    doc = _parse(page)
    for anchor in ("input", "ran", "results", "maps", "genes", "timings", "warnings", "next",
                   "files"):
        assert anchor in doc.ids, anchor
    assert not doc.external, f"external resources: {doc.external[:3]}"
    assert len(doc.images) == len(rep["images"]) + len(rep["qc_images"]) >= 2
    for src in doc.images:  # every picture inlined and a real PNG
        raw = base64.b64decode(src.split(",", 1)[1])
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    # the warning about the unmeasured preview gene was captured into the report
    assert any("NOT_A_GENE" in w["message"] for w in rep["warnings"])
    assert "NOT_A_GENE" in page
    # per-gene table: one row per fitted gene, not validated (no held-out column), sortable
    pred = ad.read_h5ad(run / "prediction.h5ad")
    assert [g["gene"] for g in rep["genes"]] == sorted(
        pred.var_names, key=lambda g: -pred.var.loc[g, "in_sample_spot_pcc"])
    assert all(g["held-out PCC"] == "not validated" for g in rep["genes"])
    assert 'onclick="sortTable(this)"' in page and "@media print" in page
    assert "report" in rep["timings_s"] and rep["timings_s"]["report"] < 30
    assert "not validated" in rep["summary"][1].lower()
    assert "in_sample_spot_pcc" in pred.var and np.isfinite(pred.var["in_sample_spot_pcc"]).all()


class _Doc(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.external, self.best = set(), [], [], []
        self._td = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        for k in ("src", "href"):
            v = a.get(k)
            if v is not None and (re.match(r"^(https?:)?//", v)
                                  or (k == "src" and not v.startswith("data:"))):
                self.external.append(v)
        if tag == "td" and "best" in (a.get("class") or ""):
            self.best.append(a.get("data-v"))


def _parse(page: str) -> _Doc:
    d = _Doc()
    d.feed(page)
    return d


def test_report_html_structure_best_and_warnings(tmp_path):
    rep = RunReport("t", tmp_path)
    with rep.capture_warnings():
        warnings.warn("histosr-like warning", UserWarning, stacklevel=1)
    rep.comparisons.append({"title": "cmp", "rows": {
        "a": {"pcc": 0.5, "rmse": 0.3}, "b": {"pcc": 0.7, "rmse": 0.2},
        "shuffled (control)": {"pcc": 0.9, "rmse": 0.1}}})
    rep.genes = [{"gene": f"G{i}", "held-out PCC": i / 40} for i in range(40)]
    rep.next_steps = [("open", "import scanpy as sc")]
    rep.summary = ["did <this> & that"]
    html_path = rep.write()
    page = html_path.read_text()
    doc = _parse(page)
    # best of each column among methods, not the control: pcc 0.7 (highest), rmse 0.2 (lowest)
    assert sorted(doc.best) == ["0.2", "0.7"]
    assert best_of({"a": {"rmse": 1.0, "pcc": 0.1}, "b": {"rmse": 2.0, "pcc": 0.2}}) == \
        {"rmse": 1.0, "pcc": 0.2}
    assert "did &lt;this&gt; &amp; that" in page  # text is escaped
    assert page.count('class="extra"') == 40 - 30  # rows hidden when printed
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["warnings"][0]["message"] == "histosr-like warning"
    assert {"next", "results", "warnings", "timings"} <= doc.ids


def test_report_for_benchmark_results(tmp_path):
    from histosr.benchmark.results import results, write_results

    secs = {"C2": {"top50_pcc": 0.6, "rmse": 0.3}, "C3": {"top50_pcc": 0.4, "rmse": 0.5}}
    write_results(results("p2", "istar", "handcrafted", {"epochs": 100}, secs, 10, 100),
                  tmp_path / "a")
    worse = {k: {"top50_pcc": v["top50_pcc"] - 0.1, "rmse": v["rmse"] + 0.1}
             for k, v in secs.items()}
    write_results(results("p2", "nearest", "handcrafted", {}, worse, 2, 100), tmp_path / "b")
    page = report_for_results([tmp_path / "a", tmp_path / "b" / "results.json"],
                              tmp_path / "rep").read_text()
    doc = _parse(page)
    # istar: top50 mean 0.5 (best), rmse 0.4 (best); nearest is faster (2 s)
    assert sorted(doc.best, key=float) == ["0.4", "0.5", "2"]
    assert "Per section" in page
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out",
                 str(tmp_path / "cli")]) == 0 and (tmp_path / "cli" / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


# -- previews ---------------------------------------------------------------------------------------
def test_preview_context_same_quantity_and_crop():
    """Measured spots are shown as counts per superpixel of their footprint; the crop is
    the tissue's bounding box plus a margin, not the whole slide."""
    from histosr.methods.base import superpixel_anndata
    from histosr.pl import PreviewContext, _validation_text, preview
    from histosr.simulate import synthetic_visium

    s = synthetic_visium(seed=0, size_um=600, n_genes=4)
    from histosr.geometry import grid_for

    g = grid_for(s)
    r, c = np.nonzero(np.ones(g.shape, bool))
    pred = superpixel_anndata(np.ones((len(r), 1), np.float32), r, c, g, [s.genes[0]],
                              {"method": "m", "scale": "counts"})
    sub = pred[(pred.obsm["spatial"][:, 0] < 500) & (pred.obsm["spatial"][:, 1] < 400)].copy()
    spots = s.counts[:, [s.genes[0]]].copy()
    ctx = PreviewContext(sub, s, spots)
    # a 55 um disk holds about pi * 27.5^2 / 64 = 37 superpixels of 8 um
    assert np.all((ctx.spot_norm > 30) & (ctx.spot_norm < 45))
    np.testing.assert_allclose(ctx.measured(s.genes[0]),
                               s.dense_counts([s.genes[0]])[:, 0] / ctx.spot_norm)
    x0, y0, x1, y1 = ctx.box
    xy = np.concatenate([sub.obsm["spatial"], spots.obsm["spatial"]])
    assert x0 <= xy[:, 0].min() and x1 >= xy[:, 0].max() and y0 <= xy[:, 1].min()
    assert ctx.unit() == "UMI per 8 um superpixel"
    fig = preview(sub, s.genes[0], section=s, spots=spots, context=ctx)
    # every coloured layer (measured circles, predicted map, zooms) on one colour range
    clims = {tuple(np.round(m.get_clim(), 6)) for a in fig.axes
             for m in (*a.images, *a.collections)
             if m.get_array() is not None and np.ndim(m.get_array()) <= 2}
    n_layers = sum(1 for a in fig.axes for m in (*a.images, *a.collections)
                   if m.get_array() is not None and np.ndim(m.get_array()) <= 2)
    assert n_layers >= 4 and len(clims) == 1
    assert "not validated" in fig.texts[0].get_text()
    sub.var[HELDOUT_PCC] = 0.62
    sub.var[HELDOUT_PCC_INTERP] = 0.7
    assert _validation_text(sub, s.genes[0]) == \
        "held-out PCC 0.62 (interpolation 0.70; not better)"


def test_log_scale_preview_uses_each_spot_library():
    from histosr.pl import PreviewContext
    from histosr.simulate import synthetic_visium

    s = synthetic_visium(seed=0, size_um=500, n_genes=4)
    pred = s.counts[:, [s.genes[0]]].copy()
    pred.uns["histosr"] = {"scale": "log1p CP10k", "method": "m"}
    ctx = PreviewContext(pred, s, s.counts[:, [s.genes[0]]].copy())
    lib = s.dense_counts().sum(axis=1)  # every gene, not only the one shown
    np.testing.assert_allclose(ctx.measured(s.genes[0]),
                               np.log1p(s.dense_counts([s.genes[0]])[:, 0] / lib * 1e4))


def test_add_spatial_needs_coordinates():
    from histosr.simulate import synthetic_visium

    s = synthetic_visium(seed=0, size_um=400, n_genes=4)
    with pytest.raises(ValueError, match="obsm"):
        add_spatial(ad.AnnData(np.zeros((2, 1), np.float32)), s)


# -- Chromium ---------------------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


_CHECK = """<script>window.addEventListener('load', function () {
 var bad = 0; for (var i = 0; i < document.images.length; i++) {
  var im = document.images[i]; if (!(im.complete && im.naturalWidth > 0)) bad++; }
 document.body.setAttribute('data-images', document.images.length + ':' + bad); });
</script></body>"""


def test_report_renders_in_chromium_with_every_image(synthetic_run, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    page = (synthetic_run["run"] / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _CHECK))
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
           "--dump-dom", probe.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'data-images="(\d+):(\d+)"', out)
    assert m, "the page did not finish loading in Chromium"
    n, bad = int(m.group(1)), int(m.group(2))
    assert n >= 2 and bad == 0, f"{bad} of {n} images did not load"


# -- real data: her2st C2 and a Visium fixture ----------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("case", ["her2st_C2", "visium_mouse_brain"])
def test_scanpy_draws_real_outputs(case, data_dir, tmp_path):
    """prediction.h5ad (8 um superpixels), prediction_spots.h5ad, a densified grid and an
    image-only prediction of a real section, written as the pipeline and the CLI write them
    (histosr.outputs.write_h5ad with the section), all draw over the H&E with sc.pl.spatial.
    The CLI paths themselves are exercised on a synthetic section above."""
    from scipy.spatial import cKDTree

    import histosr as hs
    from histosr.densify import densify_section, write_densified
    from histosr.features.featuremap import grid_only
    from histosr.geometry import grid_for, lattice_pitch
    from histosr.image_only import section_from_image
    from histosr.outputs import write_h5ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixture's lowres-only image is announced
        s = (hs.read_her2st(data_dir / "her2st", "C2") if case == "her2st_C2" else
             hs.read_visium(data_dir / "fixtures" / "visium_v1_mouse_brain_100genes"))
    if s.n_spots > 400:  # the 400 spots nearest the middle say the same, in less time
        _, keep = cKDTree(s.xy).query(np.median(s.xy, axis=0), k=400)
        s = dataclasses.replace(s, counts=s.counts[np.sort(keep)].copy())
    genes = hs.pp.select_genes(s, 10)
    # the area the spots cover (within 0.6 lattice pitch of one) stands in for the tissue mask:
    # computing that from the full image costs seconds and is tested elsewhere
    g = grid_for(s)
    r, c = np.indices(g.shape).reshape(2, -1)
    d, _ = cKDTree(s.xy).query(g.xy_of_cells(r, c))
    mask = (d <= 0.6 * lattice_pitch(s.xy)).reshape(g.shape)
    fm = grid_only(s, mask)
    m = hs.fit(s, fm, method="knn", genes=genes)
    write_h5ad(hs.predict(m, s, fm), tmp_path / "prediction.h5ad", section=s)
    write_h5ad(hs.predict(m, s, fm, at="spots"), tmp_path / "prediction_spots.h5ad", section=s)
    dense, mean = densify_section(s, "mean", 4, n_genes=10)
    write_densified(dense, s, tmp_path / "dense")
    img = section_from_image(s.image, s.um_per_px, mask=mask, spot_diameter_um=s.spot_diameter_um,
                             pitch_um=200.0 if s.platform == "st" else 100.0, name=s.name)
    write_h5ad(mean.predict(img), tmp_path / "image_only.h5ad", section=img)
    for f in ("prediction.h5ad", "prediction_spots.h5ad", "dense/densified.h5ad",
              "image_only.h5ad"):
        _check_spatial_plot(tmp_path / f, genes[0])


def test_stage_records_peak_then_releases_heap(tmp_path, monkeypatch):
    """Each stage records the peak RSS and then hands freed heap back (so one stage's
    temporaries do not stay resident through the next), also when the stage fails."""
    from histosr import report

    calls = []
    monkeypatch.setattr(report, "release_heap", lambda: calls.append(1))
    rep = RunReport("t", tmp_path)
    with rep.stage("a"):
        pass
    with pytest.raises(RuntimeError), rep.stage("b"):
        raise RuntimeError("boom")
    assert len(calls) == 2 and set(rep.stage_rss_mb) == {"a", "b"}
    assert all(v > 0 for v in rep.stage_rss_mb.values())
    monkeypatch.undo()
    report.release_heap()  # the real one runs on any platform (a no-op without glibc)
