"""Single-cell output: a cells x genes AnnData from a super-resolved prediction and the H&E.

Cells come from :func:`histosr.segment.segment` (nuclei on the H&E, grown by ``expand_um``);
each cell gets the prediction aggregated over its area: the area-weighted sum over the 8 um
superpixels it covers (:func:`histosr.cells.aggregate_cells`), i.e. counts in the cell.
With a section whose spots were measured, the counts are then scaled per spot and gene so
that the cells of each measured spot (centroid inside its footprint) sum to its measured
counts (``scale_to_spots``; a gene predicted 0 in every cell of a spot that measured it gets
the spot's counts split by cell area). Cells outside every spot keep the prediction; spots
smaller than a cell (Visium HD bins, < 25 um) are not used for scaling.

The AnnData (:func:`cells_anndata`): ``X`` counts per cell (float32); ``obs``: ``label`` (the
cell's label in the segmentation), ``area_um2``, ``covered_frac`` (part of the cell on
predicted superpixels), ``spot`` (parent spot id, "" when none), ``scaled_to_spot``, and the
nucleus morphology ``nucleus_area_um2``, ``eccentricity``, ``solidity``, ``major_axis_um``,
``minor_axis_um``, ``hematoxylin_mean``, ``hematoxylin_std``; ``obsm["spatial"]`` cell
centroids and ``obsm["nucleus_spatial"]`` nucleus centroids (full-resolution px, x = column,
y = row); ``uns["spatial"]`` scanpy's image + scale factors, so ``sc.pl.spatial`` draws it;
``uns["histosr"]`` the prediction's record plus ``cells`` (how they were segmented).

``histosr cells RUN_DIR`` (:func:`cells_for_run`) and the run-config switch
``outputs: {cells: true}`` write it as ``cells/cells.h5ad`` next to the segmentation
(``cells/segmentation.zarr``) and previews of cells coloured by a gene.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .segment import LABEL_UM_PER_PX, TABLE_COLUMNS, Segmentation

#: options of ``outputs.cells`` in a run config and of :func:`run_cells`
OPTIONS = {"segmenter": "classical", "params": {}, "expand_um": 15.0, "tile_um": 512.0,
           "margin_um": 32.0, "scale_to_spots": True, "previews": None, "n_jobs": 1}
MORPHOLOGY = {"area_um2": "nucleus_area_um2", **{c: c for c in TABLE_COLUMNS[3:]}}
#: spots smaller than this (Visium HD bins, Xenium cells) hold parts of cells, not cells:
#: the cells are not scaled to them
MIN_SCALE_SPOT_UM = 25.0
#: most spots compared with the classical nuclei counter (a seeded sample beyond)
DENSITY_CHECK_SPOTS = 500


def options(setting) -> dict | None:
    """``outputs.cells`` of a run config: false/absent -> None (off), true -> defaults, or a
    mapping of :data:`OPTIONS` (``params``: the segmenter's parameters). Checked without
    loading any model."""
    from .params import check_names
    from .segment import check_segmenter

    if setting is None or setting is False:
        return None
    if setting is True:
        setting = {}
    if not isinstance(setting, dict):
        raise InputError(f"outputs.cells must be true, false or a mapping of options "
                         f"{sorted(OPTIONS)}, got {setting!r}")
    check_names("outputs.cells", setting, list(OPTIONS), what="option")
    opts = {**OPTIONS, **setting}
    if not isinstance(opts["params"], dict):
        raise InputError(f"outputs.cells.params must be a mapping of segmenter parameters, "
                         f"got {opts['params']!r}")
    check_segmenter(str(opts["segmenter"]), opts["params"])
    if isinstance(opts["n_jobs"], bool) or not isinstance(opts["n_jobs"], int) or \
            opts["n_jobs"] < 1:
        raise InputError(f"outputs.cells.n_jobs must be an integer >= 1 (threads), got "
                         f"{opts['n_jobs']!r}")
    for k, lo in (("expand_um", 0.0), ("tile_um", 16.0), ("margin_um", 2.0)):
        v = opts[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= lo:
            raise InputError(f"outputs.cells.{k} must be a number >= {lo:g} (um), got {v!r}")
    return opts


# -- cells x genes -----------------------------------------------------------------------------
def spot_of_points(section, xy: np.ndarray) -> np.ndarray:
    """int (n,) index of the spot whose footprint (its disk, or any disk of a pooled spot)
    contains each full-resolution point (x, y), the nearest when several; -1 for none."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if section is None or not section.n_spots or not len(xy):
        return np.full(len(xy), -1, np.int64)
    fps = section.spot_footprints()
    centres = np.concatenate(fps)
    owner = np.concatenate([np.full(len(f), i) for i, f in enumerate(fps)])
    d, j = cKDTree(centres).query(xy, distance_upper_bound=section.spot_radius_px)
    out = np.full(len(xy), -1, np.int64)
    ok = np.isfinite(d)
    out[ok] = owner[j[ok]]
    return out


def scale_cells_to_spots(X: np.ndarray, spot: np.ndarray, measured: np.ndarray,
                         area: np.ndarray) -> np.ndarray:
    """Counts (cells x genes) scaled per spot and gene so the cells of each spot (``spot``:
    index per cell, -1 = none) sum to ``measured`` (spots x genes). Where the cells of a spot
    are all predicted 0 for a gene the spot measured, its counts are split by cell
    ``area``. Cells outside spots are unchanged."""
    import scipy.sparse as sp

    X = np.array(X, dtype=np.float64)
    inside = np.flatnonzero(spot >= 0)
    if not len(inside):
        return X.astype(np.float32)
    s = spot[inside]
    n_spots = measured.shape[0]
    S = sp.csr_matrix((np.ones(len(inside)), (s, np.arange(len(inside)))),
                      shape=(n_spots, len(inside)))
    P = np.asarray(S @ X[inside])
    M = np.asarray(measured, np.float64)
    F = np.divide(M, P, out=np.zeros_like(M), where=P > 0)
    A = np.asarray(S @ np.asarray(area, np.float64)[inside]).ravel()
    share = np.divide(area[inside], A[s], out=np.zeros(len(inside)), where=A[s] > 0)
    zero = (P <= 0) & (M > 0)
    X[inside] = X[inside] * F[s] + zero[s] * M[s] * share[:, None]
    return X.astype(np.float32)


def _spatial_uns(section, seg: Segmentation, library_id: str, max_side: int = 2000) -> dict:
    """scanpy's ``uns["spatial"]``: a thumbnail as the ``hires`` image and its scale."""
    h, w = seg.image_shape
    med = float(np.median(seg.table["area_um2"])) if seg.n_nuclei else 100.0
    diam_px = 2.0 * np.sqrt(med / np.pi) / seg.um_per_px
    entry = {"scalefactors": {"spot_diameter_fullres": diam_px, "tissue_hires_scalef": 1.0},
             "metadata": {"source": "histosr cells"}}
    if section is not None:
        thumb = section.image.thumbnail(max_side)
        entry["images"] = {"hires": np.asarray(thumb, np.uint8)}
        entry["scalefactors"]["tissue_hires_scalef"] = float(thumb.shape[1]) / float(w)
    return {library_id: entry}


def _empty(pred, seg: Segmentation, info: dict):
    import anndata as ad

    obs = pd.DataFrame({"label": np.zeros(0, np.int64), "area_um2": np.zeros(0),
                        "spot": pd.Series([], dtype=str)})
    out = ad.AnnData(X=np.zeros((0, pred.n_vars), np.float32), obs=obs,
                     var=pd.DataFrame(index=pred.var_names.copy()))
    out.obsm["spatial"] = np.zeros((0, 2))
    out.uns["histosr"] = {**dict(pred.uns.get("histosr", {})), "cells": info}
    out.uns["histosr"].pop("grid_shape", None)
    return out


def cells_anndata(pred, seg: Segmentation, section=None, *, scale_to_spots: bool = True):
    """Cells x genes AnnData from a superpixel prediction (``predict(at="superpixels")``) and
    a :class:`~histosr.segment.Segmentation` of the same image (see the module docstring).
    ``section`` (the run's) gives the parent spots, the scaling to measured counts and the
    image for ``uns["spatial"]``. No nucleus: an empty AnnData and a warning."""
    from .cells import aggregate_cells

    uns = dict(pred.uns.get("histosr", {}))
    if "grid_shape" not in uns or "row" not in pred.obs:
        raise InputError("cells need a superpixel prediction (obs row/col, uns['histosr'] "
                         "grid_shape: predict(at='superpixels'), prediction.h5ad of a run)")
    if tuple(uns["grid_shape"]) != tuple(seg.grid.shape):
        raise InputError(f"the prediction's 8 um grid {tuple(uns['grid_shape'])} does not match "
                         f"the segmented image's {seg.grid.shape}: segment the image the "
                         "prediction was made on")
    info = {**{k: v for k, v in seg.info.items() if k != "key"}, "n_nuclei": seg.n_nuclei,
            "scaled_to_spots": False}
    library_id = str(section.name) if section is not None else "histosr"
    if seg.n_nuclei == 0:
        warnings.warn("no nucleus was found on the image (segmenter "
                      f"{seg.info.get('segmenter')!r}): the cells AnnData is empty",
                      stacklevel=2)
        out = _empty(pred, seg, info)
        out.uns["spatial"] = _spatial_uns(section, seg, library_id)
        return out
    w = seg.cells.shape[1]
    block = int(max(64, min(2048, (1 << 24) // max(w, 1))))
    cells = aggregate_cells(pred, seg.cells, um_per_px=LABEL_UM_PER_PX, block_rows=block)
    labels = cells.obs_names.astype(np.int64).to_numpy()
    xy = np.asarray(cells.obsm["spatial"], np.float64) / seg.scale  # label px -> full-res px
    tab = seg.table.reindex(labels)
    obs = pd.DataFrame({"label": labels, "area_um2": cells.obs["area_um2"].to_numpy(),
                        "covered_frac": cells.obs["covered_frac"].to_numpy()},
                       index=pd.Index([str(v) for v in labels]))
    spot = spot_of_points(section, xy)
    ids = np.asarray(section.counts.obs_names) if section is not None and section.n_spots \
        else np.zeros(0, str)
    obs["spot"] = pd.Categorical(np.where(spot >= 0, ids[np.maximum(spot, 0)], "")
                                 if len(ids) else np.full(len(labels), ""))
    X = np.asarray(cells.X, np.float32)
    scaled = np.zeros(len(labels), bool)
    if scale_to_spots and section is not None and section.n_spots and \
            section.spot_diameter_um < MIN_SCALE_SPOT_UM:
        info["not_scaled"] = (f"spots of {section.spot_diameter_um:g} um are smaller than a "
                              "cell: cells are not scaled to them")
    elif scale_to_spots and section is not None and section.n_spots:
        genes = [g for g in cells.var_names if g in section.counts.var_names]
        if genes:
            gi = cells.var_names.get_indexer(genes)
            M = section.dense_counts(genes)
            X[:, gi] = scale_cells_to_spots(X[:, gi], spot, M, obs["area_um2"].to_numpy())
            scaled = spot >= 0
            info["scaled_to_spots"] = True
    obs["scaled_to_spot"] = scaled
    for src, dst in MORPHOLOGY.items():
        obs[dst] = tab[src].to_numpy()
    import anndata as ad

    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=cells.var_names.copy()))
    out.obsm["spatial"] = xy
    out.obsm["nucleus_spatial"] = tab[["x", "y"]].to_numpy(np.float64)
    out.uns["histosr"] = {**{k: v for k, v in uns.items() if k != "grid_shape"},
                          "cells": info,
                          "aggregated": "cells: area-weighted sum over 8 um superpixels"
                          + (", scaled to the measured spots" if info["scaled_to_spots"]
                             else "")}
    out.uns["spatial"] = _spatial_uns(section, seg, library_id)
    return out


def density_check(seg: Segmentation, section) -> dict:
    """Nuclei per spot of the segmentation (centroids in the spot disk) against the
    classical nuclei counter of :mod:`histosr.nuclei` (square crops of the spot diameter):
    Pearson r over the spots (at most :data:`DENSITY_CHECK_SPOTS`, a seeded sample)."""
    from .nuclei import count_nuclei
    from .segment import nuclei_per_spot

    if section is None or section.n_spots < 3:
        return {}
    idx = np.arange(section.n_spots)
    if len(idx) > DENSITY_CHECK_SPOTS:  # the counter reads one crop per spot
        idx = np.sort(np.random.default_rng(0).choice(idx, DENSITY_CHECK_SPOTS, replace=False))
    a = nuclei_per_spot(seg, section)[idx].astype(np.float64)
    b = count_nuclei(section, section.xy[idx]).astype(np.float64)
    r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    return {"nuclei_per_spot_vs_classical_r": round(r, 4), "density_check_spots": len(idx),
            "nuclei_per_spot_mean": round(float(a.mean()), 2),
            "classical_count_per_spot_mean": round(float(b.mean()), 2)}


# -- previews ----------------------------------------------------------------------------------
def _value_image(labels: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float image of each label's value (NaN on background and unknown labels)."""
    order = np.argsort(ids)
    sid, sv = ids[order], values[order]
    pos = np.clip(np.searchsorted(sid, labels), 0, max(len(sid) - 1, 0))
    out = np.full(labels.shape, np.nan, np.float32)
    if len(sid):
        hit = (labels > 0) & (sid[pos] == labels)
        out[hit] = sv[pos[hit]]
    return out


def plot_cells(cells, seg: Segmentation, gene: str, section=None, path=None,
               window_um: float = 250.0, max_side: int = 1024):
    """Cells coloured by ``gene`` (log1p counts): the whole section (left) and a
    ``window_um`` square at full detail around the densest cells (right: the H&E at
    0.5 um/px, cells filled, cell outlines white, nuclei outlines black). Saved to ``path``
    (PNG) when given; returns the figure."""
    from skimage.segmentation import find_boundaries

    from .arrays import gene_values
    from .geometry import read_calibrated
    from .pl import _plt, save_figure

    if gene not in cells.var_names:
        raise InputError(f"gene {gene!r} is not in the cells AnnData")
    plt = _plt()
    ids = cells.obs["label"].to_numpy(np.int64)
    v = np.log1p(gene_values(cells, gene))
    vmax = float(np.nanpercentile(v, 99)) if len(v) else 1.0
    H, W = seg.cells.shape
    fh, fw = seg.image_shape
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    f = max(1, int(np.ceil(max(H, W) / max_side)))
    lab = np.asarray(seg.cells[::f, ::f])
    if section is not None:
        axes[0].imshow(section.image.thumbnail(max_side), extent=(0, fw, fh, 0))
    im = axes[0].imshow(_value_image(lab, ids, v), extent=(0, W / seg.scale, H / seg.scale, 0),
                        cmap="magma", vmin=0, vmax=vmax or 1.0, alpha=0.85,
                        interpolation="nearest")
    axes[0].set_title(f"{gene}: {cells.n_obs} cells")
    n = int(round(window_um / LABEL_UM_PER_PX))
    if len(ids):
        from scipy.spatial import cKDTree

        xy = np.asarray(cells.obsm["spatial"]) * seg.scale  # label px
        k = cKDTree(xy).query_ball_point(xy, n / 2.0, return_length=True)
        cx, cy = xy[int(np.argmax(k))]
    else:
        cx, cy = W / 2.0, H / 2.0
    y0 = int(np.clip(cy - n / 2, 0, max(H - n, 0)))
    x0 = int(np.clip(cx - n / 2, 0, max(W - n, 0)))
    crop_c = np.asarray(seg.cells[y0:y0 + n, x0:x0 + n])
    crop_n = np.asarray(seg.nuclei[y0:y0 + n, x0:x0 + n])
    if section is not None:
        axes[1].imshow(read_calibrated(section.image, section.um_per_px, y0, x0,
                                       crop_c.shape[0], crop_c.shape[1]))
    axes[1].imshow(_value_image(crop_c, ids, v), cmap="magma", vmin=0, vmax=vmax or 1.0,
                   alpha=0.45, interpolation="nearest")
    edge = np.zeros((*crop_c.shape, 4), np.float32)
    edge[find_boundaries(crop_c, mode="inner")] = (1, 1, 1, 0.9)
    edge[find_boundaries(crop_n, mode="inner")] = (0, 0, 0, 0.9)
    axes[1].imshow(edge, interpolation="nearest")
    axes[1].set_title(f"{window_um:g} um window")
    from matplotlib.patches import Rectangle

    axes[0].add_patch(Rectangle((x0 / seg.scale, y0 / seg.scale), n / seg.scale, n / seg.scale,
                                fill=False, edgecolor="cyan", linewidth=1.2))
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, fraction=0.03, pad=0.02, label="log1p counts per cell")
    if path is not None:
        save_figure(fig, path)
    return fig


# -- runs --------------------------------------------------------------------------------------
def run_cells(pred, section, out, opts: dict | None = None, genes=None,
              progress: bool = True, report=None) -> dict:
    """Segment ``section``'s H&E, build the cells AnnData from ``pred`` and write into
    ``out``: ``segmentation.zarr``, ``cells.h5ad``, ``previews/cells_<gene>.png``. Returns a
    summary (counts, seconds, peak memory, paths, nuclei density vs the classical counter);
    with a :class:`~histosr.report.RunReport`, also adds it there."""
    from .outputs import write_h5ad
    from .pl import _safe
    from .report import peak_rss_mb
    from .segment import segment

    opts = options(opts if opts is not None else True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seg = segment(section, out=out / "segmentation.zarr", segmenter=opts["segmenter"],
                  expand_um=float(opts["expand_um"]), tile_um=float(opts["tile_um"]),
                  margin_um=float(opts["margin_um"]), progress=progress,
                  n_jobs=int(opts["n_jobs"]), **opts["params"])
    t_seg = time.perf_counter() - t0
    cells = cells_anndata(pred, seg, section, scale_to_spots=bool(opts["scale_to_spots"]))
    path = write_h5ad(cells, out / "cells.h5ad")
    show = [g for g in (opts["previews"] or genes or list(pred.var_names[:1]))
            if g in cells.var_names]
    images = []
    for g in show if cells.n_obs else []:
        images.append(out / "previews" / f"cells_{_safe(g)}.png")
        plot_cells(cells, seg, g, section, images[-1])
    summary = {"n_cells": int(cells.n_obs), "n_genes": int(cells.n_vars),
               "segmenter": opts["segmenter"], "expand_um": float(opts["expand_um"]),
               "segmentation_seconds": round(t_seg, 1),
               "seconds": round(time.perf_counter() - t0, 1),
               "peak_rss_mb": round(peak_rss_mb(), 1),
               "median_cell_area_um2": round(float(np.median(cells.obs["area_um2"])), 1)
               if cells.n_obs else None,
               "cells": str(path), "segmentation": str(out / "segmentation.zarr"),
               "previews": [str(p) for p in images],
               **density_check(seg, section)}
    if report is not None:
        report.outputs["cells"] = str(path)
        report.outputs["n_cells"] = summary["n_cells"]
        if "nuclei_per_spot_vs_classical_r" in summary:
            report.metrics["cells_nuclei_per_spot_vs_classical_r"] = \
                summary["nuclei_per_spot_vs_classical_r"]
        report.images += images
    return summary


def cells_for_run(run_dir, out=None, *, segmenter: str = "classical", params=None,
                  expand_um: float = 15.0, scale_to_spots: bool = True, genes=None,
                  n_jobs: int = 1, progress: bool = True) -> dict:
    """``histosr cells RUN_DIR``: the cells of a finished run (its ``prediction.h5ad`` and the
    section re-read from ``report.json``), written into ``out`` (default ``RUN_DIR/cells``)
    with ``report.html``/``report.json``; the run folder is otherwise only read."""
    import anndata as ad

    from .pipeline import read_section
    from .report import RunReport

    run_dir = Path(run_dir)
    pred_path, rep_path = run_dir / "prediction.h5ad", run_dir / "report.json"
    if not rep_path.is_file():
        raise InputError(f"{run_dir} is not a run folder: expected report.json and "
                         "prediction.h5ad (written by `histosr run`)")
    if not pred_path.is_file():
        raise InputError(f"{run_dir} has no prediction.h5ad: cells need a super-resolution run "
                         "(8 um prediction); spot-level methods predict whole spots only")
    opts = options({"segmenter": segmenter, "params": dict(params or {}),
                    "expand_um": expand_um, "scale_to_spots": scale_to_spots,
                    "previews": list(genes) if genes else None, "n_jobs": int(n_jobs)})
    params_run = json.loads(rep_path.read_text()).get("params", {})
    spec = params_run.get("section")
    if not isinstance(spec, dict) or "path" not in spec:
        raise InputError(f"{rep_path} does not record the section (params.section): re-run "
                         "the config with this version of histosr")
    pred = ad.read_h5ad(pred_path)
    if not genes:
        pv = params_run.get("predict", {}) or {}
        genes = [g for g in (pv.get("previews") or list(pred.var_names[: pv.get("n_previews",
                                                                                   4)]))
                 if g in pred.var_names]
        opts["previews"] = genes
    section = read_section(spec)
    out = Path(out) if out else run_dir / "cells"
    rep = RunReport("histosr cells", out, params={"run_dir": str(run_dir), **{
        k: v for k, v in opts.items()}})
    with rep.stage("cells"):
        summary = run_cells(pred, section, out, opts, progress=progress, report=rep)
    rep.notes.append(f"{summary['n_cells']} cells from {run_dir / 'prediction.h5ad'}")
    rep.write()
    summary["report"] = str(out / "report.html")
    return summary


def run_in_pipeline(setting, pred, section, out: Path, rep, genes=None,
                    progress: bool = True) -> None:
    """The ``outputs: {cells: ...}`` step of ``histosr run`` (a no-op when off)."""
    opts = options(setting)
    if opts is None:
        return
    with rep.stage("cells"):
        summary = run_cells(pred, section, Path(out) / "cells", opts, genes=genes,
                            progress=progress, report=rep)
    rep.notes.append(f"cells: {summary['n_cells']} cells ({opts['segmenter']} nuclei + "
                     f"{opts['expand_um']:g} um) in cells/cells.h5ad")


__all__ = ["cells_anndata", "cells_for_run", "run_cells", "plot_cells", "density_check",
           "scale_cells_to_spots", "spot_of_points", "options", "OPTIONS"]
