"""``cells`` - single-cell output scored against known cells (``histosr benchmark cells``).

Sections carry ``truth["cells"]``: synthetic sections of planted nuclei and cells
(:func:`histosr.simulate.cells.synthetic_cells_visium`, the default, names ``cells<seed>``)
or simulated sections from Xenium cells (``--data`` a folder written by ``histosr simulate
--format xenium``). Per section the method is fitted on the pseudo-Visium spots and the
H&E, predicts every tissue superpixel (as P4), the H&E is segmented
(:func:`histosr.segment.segment`, classical by default) and the prediction is aggregated
over each cell and scaled to the measured spots (:func:`histosr.singlecell.cells_anndata`).

Scores (genes: the hvg1000 rule on the pseudo-spots, those with a cell truth; per gene
Pearson r over cells of counts per cell, the mean over genes):

* ``pcc``: the segmented cells matched to true cells (nucleus IoU > 0.5 where the truth has
  nuclei, else mutual nearest centroids within ``match_um``), against the true cells'
  counts; ``pcc_spot_value`` and ``pcc_nuclei_split`` on the same cells for the two
  baselines: every cell gets its spot's value (the spot's counts per um^2 times the cell's
  area: the cell-level twin of ``nearest``) and the spot's counts split equally among the
  cells in it (the nucleus-count-weighted split). A cell's spot is the one whose disk holds
  its centroid, else the nearest;
* ``density_pcc`` / ``density_pcc_spot_value``: the same on counts per um^2 of cell (the
  predicted cell's area, the true cell's area), i.e. composition rather than cell size;
* ``within_pcc`` / ``within_pcc_spot_value``: the same after removing each spot's mean over
  its cells (grouped by the cell's spot): what the prediction adds inside a spot, where the
  spot value only varies with the cell's area;
* ``true_cells_pcc`` (and its two baselines): the same on the TRUE cells' outlines (the
  prediction aggregated over them, scaled to spots), which isolates the expression from the
  segmentation;
* segmentation (where the truth has nuclei): ``seg_precision``, ``seg_recall``, ``seg_f1``
  of nuclei matched at IoU > 0.5, ``seg_recall_<class>`` per tissue class of a synthetic
  section; ``count_error`` = (found - true) / true.
* ``pcc_<kind>`` and ``pcc_spot_value_<kind>`` per gene kind of a synthetic section
  (visible / gradient / mixed / noise).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .. import metrics
from ..errors import InputError
from .common import (
    Timer,
    fit_predict_truth,
    log,
    method_factory,
    protocol_cache,
    score_sections,
)

PROTOCOL = "cells"
SCORING = {
    "scale": "counts per cell; Pearson r per gene over cells, mean over genes",
    "genes": "hvg1000 rule on the pseudo-spots, genes with a cell truth",
    "matching": "nuclei IoU > 0.5 (mutual nearest centroids within match_um without nuclei "
                "truth)",
    "cells": "nuclei segmented on the H&E grown by expand_um; prediction scaled to spots",
    "spot_value": "the spot's counts per um^2 x the cell's area (cell twin of nearest)",
    "nuclei_split": "the spot's counts / number of cells in the spot",
}


def match_nuclei(pred_labels, true_labels, threshold: float = 0.5):
    """Nuclei of two label images of the same shape matched at IoU > ``threshold`` (>= 0.5
    makes the matching one-to-one). Returns (pred ids, true ids) of the matched pairs and the
    numbers of predicted and true nuclei."""
    P = np.asarray(pred_labels).astype(np.int64)
    T = np.asarray(true_labels).astype(np.int64)
    if P.shape != T.shape:
        raise InputError(f"label images differ in shape: {P.shape} vs {T.shape}")
    area_p = np.bincount(P.ravel())
    area_t = np.bincount(T.ravel())
    n_p, n_t = int((area_p[1:] > 0).sum()), int((area_t[1:] > 0).sum())
    both = (P > 0) & (T > 0)
    K = int(T.max()) + 1
    pair, inter = np.unique(P[both] * K + T[both], return_counts=True)
    p, t = pair // K, pair % K
    iou = inter / (area_p[p] + area_t[t] - inter)
    ok = iou > threshold
    return p[ok], t[ok], n_p, n_t


def match_centroids(xy_pred: np.ndarray, xy_true: np.ndarray, max_dist: float):
    """Mutual nearest neighbours within ``max_dist`` (same units): (pred idx, true idx)."""
    from scipy.spatial import cKDTree

    if not len(xy_pred) or not len(xy_true):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    d, j = cKDTree(xy_true).query(xy_pred)
    _, i_back = cKDTree(xy_pred).query(xy_true)
    i = np.arange(len(xy_pred))
    ok = (d <= max_dist) & (i_back[j] == i)
    return i[ok], j[ok]


def baselines(section, xy: np.ndarray, area_um2: np.ndarray, genes: list[str]) -> dict:
    """The two spot baselines for cells at ``xy`` (full-res px) of ``area_um2``: (cells x
    genes) ``spot_value`` and ``nuclei_split`` (see the module docstring)."""
    from scipy.spatial import cKDTree

    from ..singlecell import spot_of_points

    M = section.dense_counts(genes).astype(np.float64)
    inside = spot_of_points(section, xy)
    nearest = cKDTree(section.xy).query(np.asarray(xy, np.float64).reshape(-1, 2))[1] \
        if len(xy) else np.zeros(0, np.int64)
    owner = np.where(inside >= 0, inside, nearest).astype(np.int64)
    spot_area = np.pi * (section.spot_diameter_um / 2.0) ** 2
    n = np.bincount(owner, minlength=section.n_spots).astype(np.float64)
    return {"spot_value": M[owner] * (np.asarray(area_um2) / spot_area)[:, None],
            "nuclei_split": M[owner] / np.maximum(n[owner], 1.0)[:, None], "spot": owner}


def _truth_counts(cells: dict, truth_genes: list[str], genes: list[str]) -> np.ndarray:
    import scipy.sparse as sp

    X = cells["counts"]
    idx = [truth_genes.index(g) for g in genes]
    X = X[:, idx]
    return np.asarray(X.todense() if sp.issparse(X) else X, np.float64)


def _true_cells_prediction(pred, section, cells: dict):
    """The prediction over the true cells' outlines (labels or polygons), scaled to spots:
    (AnnData rows in truth order, centroids)."""
    from ..cells import aggregate_cells
    from ..singlecell import scale_cells_to_spots, spot_of_points

    ids = np.asarray(cells["ids"])
    if cells.get("labels") is not None:
        agg = aggregate_cells(pred, np.asarray(cells["labels"]),
                              um_per_px=float(cells.get("label_um_per_px", 0.5)))
        lab = agg.obs_names.astype(np.int64).to_numpy()
        pos = {int(v): i for i, v in enumerate(ids)}
        rows = np.array([pos[int(v)] for v in lab], np.int64)
    elif cells.get("polygons") is not None:
        agg = aggregate_cells(pred, list(cells["polygons"]))
        rows = np.arange(agg.n_obs)
    else:
        return None, None
    X = np.full((len(ids), agg.n_vars), np.nan)
    X[rows] = np.asarray(agg.X, np.float64)
    area = np.asarray(cells["area_um2"], np.float64)
    ok = np.isfinite(X[:, 0])
    spot = spot_of_points(section, np.asarray(cells["xy"]))
    genes = [g for g in agg.var_names if g in section.counts.var_names]
    gi = agg.var_names.get_indexer(genes)
    Xs = X.copy()
    Xs[np.ix_(ok, gi)] = scale_cells_to_spots(X[np.ix_(ok, gi)], spot[ok],
                                              section.dense_counts(genes), area[ok])
    return Xs, ok


def _mean_r(pred, truth) -> tuple[float, np.ndarray]:
    r = metrics.pcc_per_gene(pred, truth) if len(truth) >= 3 else np.zeros(truth.shape[1])
    return float(np.mean(r)), r


def score_cells(pred, section, seg, genes: list[str], match_um: float = 5.0) -> dict:
    """Cell-level scores of a superpixel prediction and a segmentation of ``section`` (see
    the module docstring)."""
    from ..arrays import columns
    from ..singlecell import cells_anndata

    truth = section.truth or {}
    cells = truth.get("cells")
    if cells is None:
        raise InputError(f"section {section.name!r} has no cell truth (truth['cells']): use "
                         "synthetic cell sections or `histosr simulate --format xenium`")
    tgenes = list(truth["genes"])
    genes = [g for g in genes if g in tgenes and g in pred.var_names]
    if not genes:
        raise InputError("no predicted gene has a cell truth")
    T = _truth_counts(cells, tgenes, genes)
    xy_true = np.asarray(cells["xy"], np.float64).reshape(-1, 2)
    out: dict = {"n_true_cells": int(len(T)), "n_cells": int(seg.n_nuclei),
                 "n_genes": len(genes), "n_spots": int(section.n_spots)}
    # segmentation quality and the matched cells
    ids_true = np.asarray(cells["ids"])
    nuc = cells.get("nuclei")
    lab_pred = np.zeros(0, np.int64)
    if nuc is not None and np.shape(nuc) == tuple(seg.nuclei.shape):
        p, t, n_p, n_t = match_nuclei(seg.nuclei, nuc)
        tp = len(p)
        out.update({"seg_precision": tp / max(n_p, 1), "seg_recall": tp / max(n_t, 1),
                    "seg_f1": 2 * tp / max(n_p + n_t, 1),
                    "count_error": (n_p - n_t) / max(n_t, 1)})
        pos = {int(v): i for i, v in enumerate(ids_true)}
        lab_pred, true_row = p, np.array([pos[int(v)] for v in t], np.int64)
        classes = section.meta.get("classes")
        if cells.get("class") is not None and classes:  # which nuclei the segmenter misses
            found = np.zeros(len(ids_true), bool)
            found[true_row] = True
            cls = np.asarray(cells["class"])
            for k, name in enumerate(classes):
                if (cls == k).any():
                    out[f"seg_recall_{name}"] = float(found[cls == k].mean())
    else:
        out["count_error"] = (seg.n_nuclei - len(T)) / max(len(T), 1)
    cells_ad = cells_anndata(pred, seg, section, scale_to_spots=True)
    if cells_ad.n_obs:
        labels = cells_ad.obs["label"].to_numpy(np.int64)
        if nuc is None or np.shape(nuc) != tuple(seg.nuclei.shape):
            s = float(section.um_per_px)
            i, j = match_centroids(np.asarray(cells_ad.obsm["spatial"]), xy_true, match_um / s)
            rows_pred, true_row = i, j
        else:
            where = {int(v): k for k, v in enumerate(labels)}
            keep = np.array([int(v) in where for v in lab_pred], bool)
            rows_pred = np.array([where[int(v)] for v in lab_pred[keep]], np.int64)
            true_row = true_row[keep]
        out["n_matched"] = int(len(rows_pred))
        P = columns(cells_ad, genes)[rows_pred]
        Tm = T[true_row]
        out["pcc"], r = _mean_r(P, Tm)
        out["pcc_median"] = float(np.median(r))
        base = baselines(section, np.asarray(cells_ad.obsm["spatial"])[rows_pred],
                         cells_ad.obs["area_um2"].to_numpy()[rows_pred], genes)
        out["pcc_spot_value"] = _mean_r(base["spot_value"], Tm)[0]
        out["pcc_nuclei_split"] = _mean_r(base["nuclei_split"], Tm)[0]
        # composition, not size: counts per um^2 of cell (the spot value is one density
        # per spot)
        area = cells_ad.obs["area_um2"].to_numpy()[rows_pred][:, None]
        dens_t = Tm / np.asarray(cells["area_um2"])[true_row][:, None]
        out["density_pcc"] = _mean_r(P / area, dens_t)[0]
        out["density_pcc_spot_value"] = _mean_r(base["spot_value"] / area, dens_t)[0]
        # what the prediction adds inside a spot: r after removing each spot's cell mean
        out["within_pcc"] = float(np.mean(metrics.pcc_within_groups(P, Tm, base["spot"])))
        out["within_pcc_spot_value"] = float(np.mean(metrics.pcc_within_groups(
            base["spot_value"], Tm, base["spot"])))
        r_sv = metrics.pcc_per_gene(base["spot_value"], Tm) if len(Tm) >= 3 else r * 0
        kinds = section.meta.get("gene_kind") or {}
        for kind in ("visible", "gradient", "mixed", "noise"):
            sel = [k for k, g in enumerate(genes) if kinds.get(g) == kind]
            if sel:
                out[f"pcc_{kind}"] = float(np.mean(r[sel]))
                out[f"pcc_spot_value_{kind}"] = float(np.mean(r_sv[sel]))
    else:
        out["n_matched"] = 0
    # the same on the true cells' outlines
    Xt, ok = _true_cells_prediction(pred, section, cells)
    if Xt is not None and ok.sum() >= 3:
        gi = [list(pred.var_names).index(g) for g in genes]
        out["true_cells_pcc"] = _mean_r(Xt[ok][:, gi], T[ok])[0]
        base = baselines(section, xy_true[ok], np.asarray(cells["area_um2"])[ok], genes)
        out["true_cells_pcc_spot_value"] = _mean_r(base["spot_value"], T[ok])[0]
        out["true_cells_pcc_nuclei_split"] = _mean_r(base["nuclei_split"], T[ok])[0]
    return out


def run_section(section, make_method, encoder: str, cache_dir: Path | None, seed: int = 0,
                progress: bool = True, segmenter: str = "classical", expand_um: float = 15.0,
                match_um: float = 5.0, segmenter_params: dict | None = None) -> dict:
    """Fit on a pseudo-spot section with a cell truth, predict, segment, score."""
    from ..segment import segment

    t = Timer().__enter__()
    pred, genes = fit_predict_truth(section, make_method, encoder, cache_dir, progress)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(cache_dir) / f"segmentation-{section.name}.zarr" if cache_dir else \
            Path(tmp) / "segmentation.zarr"
        seg = segment(section, out=out, segmenter=segmenter, expand_um=expand_um,
                      progress=False, **(segmenter_params or {}))
        t_seg = time.perf_counter() - t0
        scores = score_cells(pred, section, seg, genes, match_um=match_um)
    scores["segmentation_seconds"] = round(t_seg, 1)
    scores["seconds"] = round(t.elapsed, 1)
    return scores


def _synthetic(s):
    from ..simulate.cells import synthetic_cells_visium

    if not isinstance(s, (str, int, np.integer)):
        return s  # a Section with a cell truth
    txt = str(s)
    digits = txt[len("cells"):] if txt.startswith("cells") else txt
    try:
        sd = int(digits)
    except ValueError:
        raise InputError(f"cells section {s!r}: expected 'cells<seed>' or an integer seed (or "
                         "--data with sections from `histosr simulate --format xenium`)") \
            from None
    return synthetic_cells_visium(seed=sd)


def cells(method, sections=None, encoder: str = "handcrafted", epochs=None, n_states=None,
          seed: int = 0, consistency=None, out=None, cache_dir=None, n_sections: int = 2,
          progress: bool = True, data=None, segmenter: str = "classical",
          expand_um: float = 15.0, match_um: float = 5.0,
          segmenter_params: dict | None = None) -> dict:
    """Run the cells protocol and return the results dict (``out/results.json`` with
    ``out``). ``sections``: ``cells<k>`` / integer seeds or Sections with a cell truth;
    default ``n_sections`` synthetic sections with seeds ``seed, seed + 1, ...``; ``data``: a
    folder of simulated sections with cells (``histosr simulate --format xenium``)."""
    from ..segment import check_segmenter

    check_segmenter(segmenter, segmenter_params)
    t = Timer().__enter__()
    make, params, mname = method_factory(method, epochs=epochs, n_states=n_states, seed=seed,
                                         progress=progress, consistency=consistency)
    params = {**params, "seed": int(seed), "segmenter": segmenter,
              "segmenter_params": dict(segmenter_params or {}), "expand_um": float(expand_um),
              "match_um": float(match_um), "scoring": SCORING}
    cache_dir = protocol_cache(cache_dir, out)
    if data is not None:
        from ..simulate import simulated_sections

        sections = simulated_sections(data, names=sections)
    if sections is None:
        sections = [f"cells{seed + i}" for i in range(n_sections)]

    def score_one(s):
        sec = _synthetic(s)
        if sec.truth is None or sec.truth.get("cells") is None:
            raise InputError(f"the cells protocol needs sections with a cell truth; "
                             f"{sec.name!r} has none (simulate it from Xenium cells)")
        log(progress, f"{sec.name}: {sec.n_spots} pseudo-spots, "
                      f"{len(sec.truth['cells']['ids'])} true cells")
        return sec.name, run_section(sec, make, encoder, cache_dir, seed, progress,
                                     segmenter=segmenter, expand_um=expand_um,
                                     match_um=match_um, segmenter_params=segmenter_params)

    return score_sections(PROTOCOL, sections, score_one, method_name=mname, encoder=encoder,
                          params=params, timer=t, out=out, progress=progress,
                          skip_log=("seconds", "segmentation_seconds"))


__all__ = ["cells", "score_cells", "match_nuclei", "match_centroids", "baselines"]
