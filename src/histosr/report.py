"""The run report: one self-contained HTML page (pictures embedded) plus ``report.json``.

Top to bottom: a summary (what histosr did and how good it was), the input (the slide with
its spots and tissue mask, pixel size and where it came from, spots, genes, UMI per spot),
what ran (method, kind, encoder, parameters against the published defaults, versions),
results (metrics, a method x metric table with the best of each column highlighted when
several methods were scored, a per-gene table sortable by any column), the gene-map
gallery, timings and peak memory, the warnings raised during the run, next steps (how to
open the outputs in scanpy / squidpy / napari-spatialdata) and the output files.

The page has no external resource (it opens from an e-mail attachment), reads in a narrow
window (tables scroll sideways, pictures shrink) and prints (navigation hidden, long
tables cut to their first rows, pictures kept whole on a page).
:func:`report_for_results` renders benchmark ``results.json`` files the same way.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import resource
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent  # warnings raised from here are histosr's own
#: metrics where lower is better (everything else: higher is better)
LOWER_IS_BETTER = ("rmse", "mae", "mse", "seconds", "peak_rss", "time")
#: rows of the per-gene table kept when printing
PRINT_ROWS = 30
#: embedded pictures larger than this are re-encoded as palette PNGs (report size)
MAX_IMAGE_BYTES = 400_000


def _rss(mb) -> str:
    return "" if mb is None else f"{float(mb):,.0f}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0  # Linux reports KiB


def release_heap() -> None:
    """Hand freed heap memory back to the operating system (glibc ``malloc_trim``; a no-op
    elsewhere). Once large arrays have been freed, glibc raises its mmap threshold and
    serves later blocks of up to 32 MB from the heap, which it keeps after they are freed:
    without this, one stage's temporaries stay resident through the next stages. Called at
    the end of every :meth:`RunReport.stage`."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def versions() -> dict:
    """Versions of Python and the packages a result depends on (without importing them)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("histosr", "numpy", "torch", "anndata", "scanpy", "scikit-learn", "zarr"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class RunReport:
    """What a run did, filled stage by stage and written by :meth:`write`.

    ``images`` are the gene maps and analysis pictures (paths in the run folder);
    ``qc_images`` pictures of the input. ``genes``: one dict per gene (columns of the
    per-gene table); ``comparisons``: method x metric tables, each ``{"title": str, "rows":
    {method: {metric: value}}, "caption": str}`` (best of each column highlighted);
    ``tables``: further tables ``{"title": str, "rows": [dict, ...]}``; ``next_steps``:
    ``(what, code)`` pairs.
    """

    title: str
    out_dir: Path
    params: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    #: per stage, the process's peak resident memory (MB) when the stage ended
    stage_rss_mb: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    images: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    summary: list = field(default_factory=list)
    ran: dict = field(default_factory=dict)
    settings: list = field(default_factory=list)
    input_qc: dict = field(default_factory=dict)
    qc_images: list = field(default_factory=list)
    genes: list = field(default_factory=list)
    gene_note: str = ""
    comparisons: list = field(default_factory=list)
    tables: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    next_steps: list = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter)
    _section: object = field(default=None, repr=False)
    _mask: object = field(default=None, repr=False)

    @contextmanager
    def stage(self, name: str):
        """Time a pipeline stage: ``with report.stage("features"): ...``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t, 2)
            self.stage_rss_mb[name] = round(peak_rss_mb(), 1)
            release_heap()

    @contextmanager
    def capture_warnings(self):
        """Record every warning raised inside the block into :attr:`warnings` (then shown as
        before: the CLI prints histosr's own, one line each)."""
        with warnings.catch_warnings():
            shown = warnings.showwarning

            def record(message, category, filename, lineno, file=None, line=None):
                text = str(message).strip().splitlines()[0] if str(message).strip() else \
                    category.__name__
                where = Path(str(filename))
                origin = "histosr" if where.resolve().is_relative_to(_PACKAGE) else \
                    where.parent.name or "python"
                item = {"message": text, "category": category.__name__, "origin": origin}
                if item not in self.warnings:
                    self.warnings.append(item)
                shown(message, category, filename, lineno, file, line)

            warnings.showwarning = record
            yield self

    # -- describing the run -------------------------------------------------------------------
    def describe_section(self, section, mask=None, n_fitted_genes: int | None = None) -> None:
        """Input facts (pixel size and its source, spots, genes, UMI per spot, tissue) and,
        at :meth:`write`, a picture of the slide with the spots and ``mask`` (the tissue
        mask on the 8 um grid, optional)."""
        import numpy as np

        from .arrays import row_sums

        self._section, self._mask = section, mask
        c = section.counts
        h, w = section.image.shape[:2]
        umi = row_sums(c.X) if c.n_vars else np.zeros(c.n_obs)
        detected = np.asarray((c.X > 0).sum(axis=1)).ravel() if c.n_vars else np.zeros(c.n_obs)
        src = section.meta.get("um_per_px_source") or (
            getattr(section.image, "mpp_source", None) and "slide metadata") or \
            "the reader (source not recorded)"

        def q(a, p: float) -> float:
            return float(np.percentile(a, p)) if len(a) else float("nan")

        qc = {
            "section": section.name, "platform": section.platform,
            "image": f"{w:,} x {h:,} px" + (f" ({Path(section.image.path).name})"
                                            if getattr(section.image, "path", None) else ""),
            "pixel size": f"{section.um_per_px:.4f} um/px, from {src}",
            "image size": f"{w * section.um_per_px / 1000:.2f} x {h * section.um_per_px / 1000:.2f}"
                          " mm",
            "spots": f"{section.n_spots:,} (diameter {section.spot_diameter_um:g} um = "
                     f"{section.spot_radius_px * 2:.0f} px)",
            "genes measured": f"{c.n_vars:,}",
        }
        if n_fitted_genes is not None:
            qc["genes fitted"] = f"{n_fitted_genes:,}"
        if c.n_vars and c.n_obs:
            qc["UMI per spot"] = (f"median {q(umi, 50):,.0f} (quartiles {q(umi, 25):,.0f}-"
                                  f"{q(umi, 75):,.0f}; min {umi.min():,.0f}, max "
                                  f"{umi.max():,.0f})")
            qc["genes detected per spot"] = f"median {q(detected, 50):,.0f}"
        if mask is not None:
            from .geometry import grid_for

            m = np.asarray(mask, dtype=bool)
            g = grid_for(section)
            r, cc = g.cell_of_xy(section.xy) if section.n_spots else ([], [])
            on = float(m[r, cc].mean()) if section.n_spots else float("nan")
            qc["tissue"] = (f"{int(m.sum()):,} superpixels of 8 um ({m.sum() * 64e-6:.2f} mm2); "
                            f"{on:.0%} of the spot centres lie on it")
        if section.meta.get("image_upsample_factor"):
            qc["note"] = (f"image upsampled x{section.meta['image_upsample_factor']} by the "
                          "reader (no full-resolution image)")
        self.input_qc.update(qc)

    def describe_method(self, method, encoder: str | None = None, genes=None) -> None:
        """What ran: the method, its kind, the encoder, versions, and every parameter next
        to its published default (the dataclass default), reduced ones flagged."""
        import dataclasses

        from .benchmark.common import REDUCIBLE
        from .keys import jsonable

        tags = method.tags()
        if not tags["needs_features"] and not tags["image_only"]:
            encoder = "none (reads no image features)"
        self.ran.update({"method": method.name,
                         "kind": f"{tags['kind']} ({tags['target']}; {tags['scale']})",
                         "encoder": encoder or getattr(method, "encoder", None) or "-",
                         "seed": getattr(method, "seed", None)})
        if genes is not None:
            self.ran["genes"] = f"{len(genes):,}"
        self.ran["versions"] = ", ".join(f"{k} {v}" for k, v in versions().items())
        defaults = {f.name: f.default for f in dataclasses.fields(type(method))
                    if f.init and f.default is not dataclasses.MISSING}
        used = jsonable(method.params())
        runtime = set(getattr(method, "runtime", ()) or ())
        self.settings = []
        for k, v in used.items():
            if k in runtime:
                continue
            d = jsonable(defaults.get(k, "-"))
            changed = k in defaults and d != v
            reduced = changed and k in REDUCIBLE and isinstance(v, (int, float)) \
                and isinstance(d, (int, float)) and not isinstance(v, bool) and v < d
            self.settings.append({"parameter": k, "used": v, "published default": d,
                                  "status": "reduced" if reduced else "changed" if changed
                                  else ""})

    # -- writing --------------------------------------------------------------------------------
    def write(self) -> Path:
        """Write ``report.html`` (self-contained) and ``report.json`` into the run folder
        (atomically). The time it takes is recorded as the ``report`` stage."""
        t = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self._section is not None and not self.qc_images:
            try:
                self.qc_images.append(qc_figure(self._section, self._mask,
                                                self.out_dir / "previews" / "input_qc.png"))
            except Exception as e:  # noqa: BLE001 - a picture never costs the report
                self.notes.append(f"input picture not drawn: {type(e).__name__}: {e}")
        data = self.as_dict()
        page = render_html(data, self.out_dir)
        self.timings["report"] = round(time.perf_counter() - t, 2)
        data = self.as_dict()
        _atomic_write(self.out_dir / "report.json", json.dumps(data, indent=1, default=str))
        _atomic_write(self.out_dir / "report.html", page.replace(
            "<!--REPORT_TIME-->", f"{self.timings['report']:.2f}"))
        return self.out_dir / "report.html"

    def as_dict(self) -> dict:
        def rel(p) -> str:  # pictures are listed relative to the run folder
            p = Path(p)
            for base in (self.out_dir, self.out_dir.resolve()):
                for q in (p, p.resolve()):
                    if q.is_relative_to(base):
                        return str(q.relative_to(base))
            return str(p)

        return {"title": self.title, "summary": self.summary, "params": self.params,
                "timings_s": self.timings, "total_s": round(time.perf_counter() - self._t0, 2),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "stage_peak_rss_mb": self.stage_rss_mb, "metrics": self.metrics,
                "outputs": self.outputs, "notes": self.notes, "ran": self.ran,
                "settings": self.settings, "input": self.input_qc,
                "comparisons": self.comparisons, "tables": self.tables, "genes": self.genes,
                "gene_note": self.gene_note, "warnings": self.warnings,
                "next_steps": self.next_steps,
                "qc_images": [rel(p) for p in self.qc_images],
                "images": [rel(p) for p in self.images]}


def qc_figure(section, mask, path: Path) -> Path:
    """The input at a glance: the slide (from its 2000 px thumbnail, cropped to the spots and
    the tissue) with every spot drawn at its measured diameter and coloured by its UMI
    count, the tissue ``mask`` (8 um grid) outlined; next to it the distribution of UMI per
    spot."""
    import numpy as np

    from .arrays import row_sums
    from .outputs import HIRES_PX
    from .pl import _circles, _plt, save_figure

    plt = _plt()
    from matplotlib.colors import LogNorm

    from .image import _resize, thumbnail_factor

    img = section.image
    H, W = img.shape[:2]
    # crop to the spots and the tissue (plus a margin): slides are mostly glass
    pts = [section.xy] if section.n_spots else []
    sp = 8.0 / float(section.um_per_px)  # full-res px per superpixel
    if mask is not None and np.asarray(mask).any():
        rr, cc = np.nonzero(np.asarray(mask, dtype=bool))
        pts.append(np.array([[cc.min() * sp, rr.min() * sp],
                             [(cc.max() + 1) * sp, (rr.max() + 1) * sp]]))
    if pts:
        allp = np.concatenate(pts)
        lo, hi = allp.min(axis=0), allp.max(axis=0)
        pad = 0.06 * float(max(hi - lo)) + 2 * section.spot_radius_px
        x0, y0 = max(0, int(lo[0] - pad)), max(0, int(lo[1] - pad))
        x1, y1 = min(W, int(np.ceil(hi[0] + pad))), min(H, int(np.ceil(hi[1] + pad)))
    else:
        x0, y0, x1, y1 = 0, 0, W, H
    f = thumbnail_factor(img.shape, HIRES_PX)
    thumb = img.thumbnail(HIRES_PX)[y0 // f : -(-y1 // f), x0 // f : -(-x1 // f)]
    k = max(thumb.shape[:2]) / 900
    if k > 1:
        thumb = _resize(thumb, max(1, int(thumb.shape[0] / k)), max(1, int(thumb.shape[1] / k)))
    c = section.counts
    umi = row_sums(c.X) if c.n_vars else np.ones(c.n_obs)
    # fixed positions: a layout engine costs seconds of text measuring on a busy CPU
    fig = plt.figure(figsize=(10, 4.6))
    ax = fig.add_axes((0.01, 0.03, 0.52, 0.87))
    cax = fig.add_axes((0.545, 0.15, 0.013, 0.63))
    hax = fig.add_axes((0.73, 0.13, 0.25, 0.74))
    ax.imshow(thumb, extent=(x0, x1, y1, y0))
    if mask is not None:
        # every s-th superpixel: the figure is < 1000 px wide, and a 40,000 px slide's
        # 5,000 x 5,000 float grids would cost 600 MB; superpixel row r is centred at
        # (r + 0.5) * sp
        s = max(1, -(-max(np.shape(mask)) // 1000))
        m = np.asarray(mask, dtype=bool)[::s, ::s].astype(np.float32)
        ax.contour((np.arange(m.shape[1]) * s + 0.5) * sp, (np.arange(m.shape[0]) * s + 0.5)
                   * sp, m, levels=[0.5], colors=["#00a0ff"], linewidths=0.8)
    if section.n_spots:
        lo = max(1.0, float(np.percentile(umi, 1)))
        hi = max(lo * 1.01, float(np.percentile(umi, 99)))
        im = _circles(ax, section.xy, np.clip(umi, lo, hi), 2 * section.spot_radius_px,
                      "viridis", LogNorm(lo, hi))
        im.set_alpha(0.8)
        cb = fig.colorbar(im, cax=cax)
        cb.set_label("UMI per spot", fontsize=8)
    else:
        cax.set_axis_off()
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    ax.set_axis_off()
    um = float(section.um_per_px)
    ax.set_title(f"{section.name}: {section.n_spots:,} spots at their measured size"
                 + (", tissue mask in blue" if mask is not None else "")
                 + f" ({(x1 - x0) * um / 1000:.1f} x {(y1 - y0) * um / 1000:.1f} mm shown)",
                 fontsize=9)
    ax = hax
    if section.n_spots and c.n_vars:
        ax.hist(np.log10(np.maximum(umi, 1)), bins=30, color="#4a6fa5")
        ax.set_xlabel("log10 UMI per spot")
        ax.set_ylabel("spots")
        med = float(np.median(umi))
        ax.axvline(np.log10(max(med, 1)), color="k", lw=0.8)
        ax.set_title(f"median {med:,.0f} UMI per spot", fontsize=9)
    else:
        ax.set_axis_off()
    return save_figure(fig, path, dpi=80, palette=True)


def gene_table(var, section=None, shown=(), extra: dict | None = None) -> tuple[list, str]:
    """Rows of the per-gene table from a prediction's ``var`` (the self-validation and
    in-sample columns of :mod:`histosr.outputs`, when present), the measured spots (mean
    UMI per spot, % of spots where detected) and ``extra`` ({column: {gene: value}}).
    Sorted by held-out PCC when there is one, else by in-sample PCC. Returns (rows, a
    sentence summarising the self-validation, or "" when the genes are not validated)."""
    import numpy as np

    from .arrays import column_stats
    from .outputs import HELDOUT_PCC, HELDOUT_PCC_INTERP, IN_SAMPLE_PCC

    genes = [str(g) for g in var.index]
    cols = {}
    for key, name in ((HELDOUT_PCC, "held-out PCC"),
                      (HELDOUT_PCC_INTERP, "interpolation held-out PCC"),
                      (IN_SAMPLE_PCC, "in-sample spot PCC")):
        if key in var:
            cols[name] = np.asarray(var[key], dtype=np.float64)
    for name, values in (extra or {}).items():
        cols[name] = np.array([float(values.get(g, np.nan)) for g in genes])
    if section is not None and section.counts.n_vars:
        have = [g for g in genes if g in section.counts.var_names]
        if have:
            j = section.counts.var_names.get_indexer(have)
            mean, det = column_stats(section.counts.X)  # spot blocks: no dense copy
            mean, det = mean[j], det[j] * 100
            idx = {g: i for i, g in enumerate(have)}
            cols["mean UMI per spot"] = np.array([mean[idx[g]] if g in idx else np.nan
                                                  for g in genes])
            cols["detected in % of spots"] = np.array([det[idx[g]] if g in idx else np.nan
                                                       for g in genes])
    shown = set(shown or ())
    rows = []
    for i, g in enumerate(genes):
        row = {"gene": g}
        for name, v in cols.items():
            row[name] = float(v[i]) if np.isfinite(v[i]) else None
        if "held-out PCC" not in cols:
            row = {"gene": g, "held-out PCC": "not validated", **{k: v for k, v in row.items()
                                                                  if k != "gene"}}
        if shown:
            row["map"] = "shown" if g in shown else ""
        rows.append(row)
    key = "held-out PCC" if "held-out PCC" in cols else "in-sample spot PCC" \
        if "in-sample spot PCC" in cols else next(iter(extra or {}), None)
    if key is not None:
        rows.sort(key=lambda r: -(r.get(key) if isinstance(r.get(key), float) else -np.inf))
    sentence = ""
    if "held-out PCC" in cols:
        h = cols["held-out PCC"]
        ok = np.isfinite(h)
        sentence = (f"Self-validation on held-out spots: median PCC {np.median(h[ok]):.2f} "
                    f"over {int(ok.sum()):,} genes") if ok.any() else \
            "Self-validation ran but scored no gene"
        if "interpolation held-out PCC" in cols and ok.any():
            i = cols["interpolation held-out PCC"]
            both = ok & np.isfinite(i)
            sentence += (f"; better than interpolation for {int((h[both] > i[both]).sum()):,} "
                         f"of {int(both.sum()):,} genes (interpolation median "
                         f"{np.median(i[both]):.2f})") if both.any() else ""
        sentence += "."
    return rows, sentence


def next_steps(files: dict, gene: str, method: str, superpixels: bool) -> list:
    """(what, code) pairs telling how to open a run's outputs and go further."""
    pred = str(files.get("prediction"))
    steps = [
        ("Open the prediction in scanpy (drawn over the H&E)",
         f"import scanpy as sc\nad = sc.read_h5ad({pred!r})\n"
         f"sc.pl.spatial(ad, color={gene!r}, img_key='hires')"
         + ("  # one dot per 8 um superpixel" if superpixels else "")),
        ("... or in squidpy (same uns['spatial'])",
         f"import squidpy as sq\nsq.pl.spatial_scatter(ad, color={gene!r}, img_res_key='hires')"),
    ]
    sd = files.get("spatialdata")
    if sd:
        steps.append(("Explore in napari (pip install 'napari-spatialdata[all]')",
                      f"import spatialdata as sd\nfrom napari_spatialdata import Interactive\n"
                      f"Interactive(sd.read_zarr({str(sd)!r})).run()"))
    else:
        steps.append(("Explore in napari: write spatialdata.zarr too",
                      "histosr run CONFIG.yaml --set outputs.spatialdata=true\n"
                      "# then: Interactive(spatialdata.read_zarr('RUN/spatialdata.zarr')).run()"
                      "  (pip install 'napari-spatialdata[all]')"))
    proto = "p2" if superpixels else "p1"
    steps.append(("Measure accuracy on held-out spots",
                  f"histosr benchmark {proto} --method {method} --out bench/{proto}_{method}"))
    if files.get("model"):
        steps.append(("Predict another section with this model",
                      f"histosr predict SECTION --model {files['model']} --out pred_other"))
    return steps


# -- HTML ---------------------------------------------------------------------------------------
_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
 color:#1d1d1f;line-height:1.45;margin:0;background:#fff}
main{max-width:1100px;margin:0 auto;padding:0 14px 40px}
header{background:#23395d;color:#fff;padding:18px 14px}
header .in{max-width:1100px;margin:0 auto}
header h1{margin:0 0 4px;font-size:1.45em}
header p{margin:0;opacity:.85}
nav{position:sticky;top:0;background:#f4f6fa;border-bottom:1px solid #dde;z-index:2;
 padding:6px 14px;font-size:.9em;overflow-x:auto;white-space:nowrap}
nav a{margin-right:14px;color:#23395d;text-decoration:none}
h2{border-bottom:2px solid #23395d;padding-bottom:3px;margin-top:1.8em;font-size:1.25em}
h3{font-size:1.05em;margin-bottom:.4em}
.summary{background:#eef4ff;border-left:4px solid #3a6ea5;padding:10px 14px;margin:14px 0}
.summary p{margin:.3em 0}
.scroll{overflow-x:auto;max-width:100%}
.tall{max-height:460px;overflow-y:auto}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em}
th,td{border:1px solid #d0d4dc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f6}
table.kv th{width:15em;font-weight:600}
table.sortable th{cursor:pointer;position:sticky;top:0}
table.sortable th:after{content:" \\2195";color:#99a}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{background:#d6f5d6;font-weight:700}
td.bad{color:#a33}
.muted{color:#667}
.warn{background:#fff6e0;border-left:4px solid #e0a000;padding:6px 12px;margin:6px 0}
figure{margin:12px 0;break-inside:avoid;page-break-inside:avoid}
figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{font-size:.85em;color:#445}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:8px 10px;overflow-x:auto;
 font-size:.85em;white-space:pre}
.bar{background:#7b9acc;height:.8em;display:inline-block;vertical-align:middle}
@media (max-width:640px){table.kv th{width:auto}body{font-size:15px}}
@media print{nav,.noprint{display:none}header{background:none;color:#000;padding:0}
 .tall{max-height:none;overflow:visible}.scroll{overflow:visible}
 tr.extra{display:none}a{color:inherit;text-decoration:none}
 pre{white-space:pre-wrap;overflow:visible}
 h2{break-after:avoid;page-break-after:avoid}}
"""

_JS = """
function sortTable(th){
 var table=th.closest('table'),body=table.tBodies[0],i=Array.prototype.indexOf.call(
 th.parentNode.children,th),asc=th.dataset.dir!=='asc';
 var rows=Array.prototype.slice.call(body.rows);
 rows.sort(function(a,b){
  var x=a.cells[i].dataset.v,y=b.cells[i].dataset.v;
  var nx=parseFloat(x),ny=parseFloat(y);
  if(isNaN(nx)&&isNaN(ny)){return asc?x.localeCompare(y):y.localeCompare(x);}
  if(isNaN(nx))return 1; if(isNaN(ny))return -1;
  return asc?nx-ny:ny-nx;});
 rows.forEach(function(r,k){body.appendChild(r);r.className=k>=PRINT_ROWS?'extra':'';});
 Array.prototype.forEach.call(th.parentNode.children,function(h){delete h.dataset.dir;});
 th.dataset.dir=asc?'asc':'desc';
}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v).lower()
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        a = abs(v)
        return f"{v:,.0f}" if a >= 1000 else f"{v:.1f}" if a >= 10 else \
            f"{v:.2g}" if 0 < a < 0.001 else f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _num(v) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    return None


def _kv(d: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in d.items())
    return f'<div class="scroll"><table class="kv">{rows}</table></div>'


def _table(rows: list[dict], columns: list[str] | None = None, sortable: bool = False,
           best: dict | None = None, cls: str = "", cut: int | None = None) -> str:
    """An HTML table of dict rows; ``best``: column -> best value to highlight."""
    if not rows:
        return '<p class="muted">none</p>'
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(
        (f'<th onclick="sortTable(this)" title="sort">{_e(c)}</th>' if sortable else
         f"<th>{_e(c)}</th>") for c in cols)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for c in cols:
            v = r.get(c, "")
            n = _num(v)
            klass = "num" if n is not None else ""
            if best and c in best and n is not None and best[c] is not None \
                    and abs(n - best[c]) <= 1e-12:
                klass += " best"
            shown = _fmt(v) if v != "" else ""
            key = f"{n:.6g}" if n is not None else _e(str(v))
            cells.append(f'<td class="{klass.strip()}" data-v="{key}">{_e(shown)}</td>')
        extra = ' class="extra"' if cut is not None and i >= cut else ""
        body.append(f"<tr{extra}>{''.join(cells)}</tr>")
    table = (f'<table class="{"sortable " if sortable else ""}{cls}"><thead><tr>{head}</tr>'
             f"</thead><tbody>{''.join(body)}</tbody></table>")
    return f'<div class="scroll{" tall" if len(rows) > 15 else ""}">{table}</div>'


def best_of(rows: dict[str, dict]) -> dict:
    """Per metric (column), the best value over methods (rows): the largest, or the
    smallest for :data:`LOWER_IS_BETTER` metrics; none for shuffled controls and counts."""
    out = {}
    metrics = list(dict.fromkeys(k for r in rows.values() for k in r))
    for m in metrics:
        if m.startswith(("shuffled", "n_")) or m in ("coverage", "settings"):
            continue
        vals = [_num(r.get(m)) for name, r in rows.items() if "control" not in name]
        vals = [v for v in vals if v is not None]
        if len(vals) < 2:
            continue
        low = any(t in m.lower() for t in LOWER_IS_BETTER)
        out[m] = min(vals) if low else max(vals)
    return out


def _img_tag(path: Path, alt: str) -> str:
    """``<img>`` with the picture inlined as base64 PNG (re-encoded as a palette PNG when
    large)."""
    raw = Path(path).read_bytes()
    if len(raw) > MAX_IMAGE_BYTES:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(raw)) as im:
            q = im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
            buf = io.BytesIO()
            q.save(buf, format="PNG")
        if buf.tell() < len(raw):
            raw = buf.getvalue()
    b64 = base64.b64encode(raw).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{_e(alt)}">'


def _caption(rel: str) -> str:
    stem = Path(rel).stem
    if stem == "input_qc":
        return "The input: spots over the slide, tissue mask, UMI per spot."
    if stem.startswith("pathway_"):
        return f"Gene set {stem[len('pathway_'):]}: measured spots (mean z-score) and map."
    if Path(rel).parent.name == "previews":
        return (f"{stem}: H&E, measured spots and prediction on one quantity and colour "
                "range; bottom row: zoom at full 8 um resolution (where shown).")
    return rel


def render_html(d: dict, out_dir: Path) -> str:
    """The report page for :meth:`RunReport.as_dict` output (pictures read from
    ``out_dir`` and embedded)."""
    sections = []
    toc = []

    def add(anchor: str, title: str, body: str) -> None:
        toc.append(f'<a href="#{anchor}">{_e(title)}</a>')
        sections.append(f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>')

    if d.get("summary"):
        sections.append('<div class="summary">' + "".join(
            f"<p>{_e(s)}</p>" for s in d["summary"] if s) + "</div>")
    if d.get("input") or d.get("qc_images"):
        body = _kv(d.get("input", {}))
        for p in d.get("qc_images", []):
            if (out_dir / p).is_file():
                body += (f"<figure>{_img_tag(out_dir / p, 'input')}"
                         f"<figcaption>{_e(_caption(p))}</figcaption></figure>")
        add("input", "Input", body)
    if d.get("ran") or d.get("settings"):
        body = _kv(d.get("ran", {}))
        if d.get("settings"):
            red = [s["parameter"] for s in d["settings"] if s.get("status") == "reduced"]
            body += "<h3>Parameters (used vs published default)</h3>"
            if red:
                body += (f'<p class="warn">Reduced from the published settings: '
                         f"{_e(', '.join(red))}. Results may differ from the paper's.</p>")
            body += _table(d["settings"], ["parameter", "used", "published default", "status"])
        add("ran", "What ran", body)
    body = ""
    for comp in d.get("comparisons") or []:
        rows = comp.get("rows") or {}
        if not rows:
            continue
        best = best_of(rows)
        cols = comp.get("columns") or list(dict.fromkeys(k for r in rows.values() for k in r))
        trs = [{"method": name, **{c: r.get(c, "") for c in cols}} for name, r in rows.items()]
        body += f"<h3>{_e(comp.get('title') or 'Methods compared')}</h3>"
        if comp.get("caption"):
            body += f'<p class="muted">{_e(comp["caption"])}</p>'
        body += _table(trs, ["method", *cols], best=best, cls="compare")
    if d.get("metrics"):
        if d.get("comparisons") or len(d["metrics"]) > 12:  # the tables above say it better
            body += (f"<details><summary>all {len(d['metrics'])} metrics (as in report.json)"
                     f"</summary>{_kv(d['metrics'])}</details>")
        else:
            body += "<h3>Metrics</h3>" + _kv(d["metrics"])
    for t in d.get("tables") or []:
        body += f"<h3>{_e(t.get('title', ''))}</h3>" + _table(t.get("rows") or [],
                                                              sortable=True, cut=PRINT_ROWS)
    if d.get("notes"):
        body += "<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in d["notes"]) + \
            "</ul>"
    if body:
        add("results", "Results", body)
    figs = []
    for p in d.get("images", []):
        if (out_dir / p).is_file():
            figs.append(f'<figure id="fig-{_e(Path(p).stem)}">{_img_tag(out_dir / p, p)}'
                        f"<figcaption>{_e(_caption(p))} <span class='muted'>({_e(p)})</span>"
                        "</figcaption></figure>")
    if figs:
        add("maps", "Gene maps", "".join(figs))
    if d.get("genes"):
        body = ""
        if d.get("gene_note"):
            body += f'<p class="warn">{_e(d["gene_note"])}</p>'
        body += (f'<p class="muted">{len(d["genes"]):,} genes; click a column to sort.</p>'
                 + _table(d["genes"], sortable=True, cut=PRINT_ROWS))
        if len(d["genes"]) > PRINT_ROWS:
            body += (f'<p class="muted">Printed copies show the first {PRINT_ROWS} rows; the '
                     "full table is in report.json.</p>")
        add("genes", "Per gene", body)
    t = d.get("timings_s", {})
    tot = max([float(d.get("total_s") or 0)] + [float(v) for v in t.values()] + [1e-9])
    rss = d.get("stage_peak_rss_mb") or {}
    trs = "".join(
        f"<tr><th>{_e(k)}</th><td class='num'>{float(v):.2f}</td>"
        f"<td class='num'>{_rss(rss.get(k))}</td><td style='width:50%'>"
        f"<span class='bar' style='width:{100 * float(v) / tot:.1f}%'></span></td></tr>"
        for k, v in t.items())
    if "report" not in t:  # written last: its time is filled in after rendering
        trs += ("<tr><th>report</th><td class='num'><!--REPORT_TIME--></td><td></td>"
                "<td></td></tr>")
    add("timings", "Timings and memory",
        f"<p>Total {float(d.get('total_s') or 0):.1f} s; peak memory (resident) "
        f"{float(d.get('peak_rss_mb') or 0):,.0f} MB; this report took "
        "<!--REPORT_TIME--> s to write.</p>"
        f'<div class="scroll"><table><thead><tr><th>stage</th><th>seconds</th><th>peak MB so far</th><th></th></tr>'
        f"</thead><tbody>{trs}</tbody></table></div>")
    ws = d.get("warnings") or []
    own = [w for w in ws if w.get("origin") == "histosr"]
    other = [w for w in ws if w.get("origin") != "histosr"]
    body = "".join(f'<p class="warn">{_e(w["message"])}</p>' for w in own) or \
        "<p>histosr raised no warning during the run.</p>"
    if other:
        body += (f"<details><summary>{len(other)} notice(s) from libraries</summary><ul>"
                 + "".join(f"<li>{_e(w['origin'])}: {_e(w['category'])}: {_e(w['message'])}"
                           "</li>" for w in other) + "</ul></details>")
    add("warnings", "Warnings", body)
    if d.get("next_steps"):
        body = "".join(f"<h3>{_e(what)}</h3><pre>{_e(code)}</pre>"
                       for what, code in d["next_steps"])
        add("next", "Next steps", body)
    if d.get("outputs"):
        add("files", "Output files", _kv(d["outputs"]))
    if d.get("params"):
        add("config", "Configuration",
            f"<details><summary>the run's configuration</summary><pre>"
            f"{_e(json.dumps(d['params'], indent=1, default=str))}</pre></details>")
    from . import __version__

    sub = f"histosr {_e(__version__)} - {time.strftime('%Y-%m-%d %H:%M')}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(d['title'])}</title><style>{_CSS}</style>
<script>var PRINT_ROWS={PRINT_ROWS};{_JS}</script></head><body>
<header><div class="in"><h1>{_e(d['title'])}</h1><p>{sub}</p></div></header>
<nav class="noprint">{''.join(toc)}</nav>
<main>
{''.join(sections)}
</main></body></html>
"""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- benchmark results -------------------------------------------------------------------------
def report_for_results(results, out: str | Path, title: str | None = None) -> Path:
    """One report page for benchmark ``results.json`` files (paths, folders or dicts):
    per protocol a method x metric table of the means over sections, the best of each
    column highlighted, then each run's settings and per-section scores. Writes
    ``out/report.html`` and ``out/report.json``; returns the HTML path."""
    from .benchmark.results import read_results

    runs = [r if isinstance(r, dict) else read_results(r) for r in results]
    if not runs:
        raise ValueError("report_for_results needs at least one results.json")
    rep = RunReport(title or "histosr benchmark results", Path(out))
    by_protocol: dict[str, dict] = {}
    for r in runs:
        p = r.get("params") or {}
        label = r.get("method", "?")
        red = p.get("reduced_from_published")
        extra = [f"{k}={p[k]}" for k in ("epochs", "n_states") if k in p]
        if extra:
            label += f" ({', '.join(extra)}{'; reduced' if red else ''})"
        if p.get("consistency"):
            label += " + consistency"
        row = dict(r.get("mean") or {})
        row["seconds"] = r.get("seconds")
        by_protocol.setdefault(r.get("protocol", "?"), {})[label] = row
    rep.summary.append(f"{len(runs)} benchmark run(s): " + "; ".join(
        f"{proto.upper()}: {', '.join(rows)}" for proto, rows in by_protocol.items()))
    for proto, rows in by_protocol.items():
        rep.comparisons.append({"title": f"{proto.upper()}: mean over sections", "rows": rows,
                                "caption": "best of each column in green (the highest; the "
                                           "lowest for errors and time); shuffled_* are "
                                           "controls"})
    rep.tables.append({"title": "Per section", "rows": [
        {"protocol": r.get("protocol"), "method": r.get("method"), "section": s,
         **{k: v for k, v in sc.items() if _num(v) is not None}}
        for r in runs for s, sc in (r.get("sections") or {}).items()]})
    rep.ran["versions"] = ", ".join(f"{k} {v}" for k, v in versions().items())
    rep.params = {"runs": [{k: r.get(k) for k in ("protocol", "method", "encoder", "params",
                                                  "seconds", "peak_rss_mb")} for r in runs]}
    return rep.write()


__all__ = ["RunReport", "render_html", "report_for_results", "qc_figure", "best_of",
           "gene_table", "next_steps", "peak_rss_mb", "versions"]
