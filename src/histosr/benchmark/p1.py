"""P1 - spot hold-out ("recovery", HisHRST/TriHRGE; BENCHMARKS.md).

Per her2st section: the spot ids, sorted as strings, are permuted by
``numpy.random.default_rng(0)``; the first ``n // 2`` of the permutation are held out
(:func:`split`). The method is fitted on the other half (their expression + the whole H&E),
with the ``hvg1000`` genes chosen on ALL the section's own spots (BENCHMARKS: "the scored
section's own spots"); it predicts the held-out spot centres and only those are scored.

* Spot methods (``kind == "spot"``: hishrst, trihrge, ridge, ...) predict log1p CP10k
  directly (their targets use each spot's full library), which is the truth's scale.
* Super-resolution / superpixel methods (``knn``, ``nearest``, ``istar``, ...) are fitted on
  the training half with their FeatureMap and predict counts summed over each held-out
  spot's disk. They are put on the log1p CP10k scale with the library the prediction
  itself implies (``library="predicted"``, the default, as P2): L_i = sum over the scored
  genes of the predicted counts / phi, phi = the share of the scored genes in the measured
  counts of the training spots (known to the method). ``library="measured"`` divides by
  the held-out spot's measured library instead (hands the method the truth's library).
  A superpixel method that predicts the held-out points as whole spots on the log1p CP10k
  scale (its prediction has the layer ``WHOLE_SPOT_LAYER``, e.g. ``hybrid``) is scored on
  that layer, as the spot methods are.

Scores per section: ``top50_pcc`` (mean per-gene Pearson r over the held-out spots),
``top50_pcc_median``, ``hvg1000_pcc``, ``mae`` (log1p scale, top50 genes). Methods that
validate themselves on the training half (:meth:`~histosr.methods.base.Method.reliability`,
e.g. ``hybrid``) add ``selfval_spearman`` (across the hvg1000 genes: Spearman r between
the method's own held-out estimate and the PCC measured on the held-out half),
``selfval_spearman_top50`` and ``selfval_estimate`` (see :func:`self_validation`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .. import metrics
from ..arrays import columns
from ..errors import InputError
from ..methods.base import SPOT, WHOLE_SPOT_LAYER
from ..pp import select_genes
from .common import (
    Timer,
    depth_params,
    gene_scores,
    log,
    method_factory,
    protocol_cache,
    score_her2st,
    section_features,
    thin,
)

PROTOCOL = "p1"
SPLIT_SEED = 0
SCORING = {
    "scale": "log1p CP10k; truth library = measured total over all genes",
    "split": "ids sorted as strings, numpy.random.default_rng(0).permutation; first n // 2 "
             "held out, the rest fitted",
    "genes": "hvg1000/top50 chosen on all spots of the scored section",
    "scored": "held-out spots only",
    "mae": "log1p scale, top50 genes",
}


def split(ids, seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """``(train_ids, held_out_ids)``: ids sorted as strings, permuted by
    ``default_rng(seed)``; the first ``n // 2`` of the permutation are held out. Both lists
    are returned in sorted order."""
    ids = sorted(str(i) for i in ids)
    perm = np.random.default_rng(seed).permutation(len(ids))
    n_hold = len(ids) // 2
    held = sorted(ids[i] for i in perm[:n_hold])
    hs = set(held)
    return [i for i in ids if i not in hs], held


def subset(section, ids: list[str], suffix: str = "_train"):
    """The section restricted to the spots ``ids`` (same image), in the section's order."""
    from ..section import take_spots

    names = np.asarray(section.counts.obs_names).astype(str)
    return take_spots(section, np.flatnonzero(np.isin(names, list(ids))),
                      f"{section.name}{suffix}")


def predict_held_out(method, train_sec, held_xy: np.ndarray, genes: list[str], encoder: str,
                     cache_dir, progress: bool, diameter_um: float,
                     library: str = "predicted",
                     measured_library: np.ndarray | None = None) -> np.ndarray:
    """Fit ``method`` on ``train_sec`` and return log1p CP10k predictions (held-out x genes,
    in ``genes`` order); ``library="measured"`` uses ``measured_library`` (the held-out
    spots' measured totals) for a superpixel method's counts."""
    if method.kind == SPOT:
        if cache_dir is not None and method.cache_dir is None:
            method.cache_dir = str(cache_dir)
        method.fit([train_sec], genes=genes)
        pred = method.predict(train_sec, at=held_xy)
        return columns(pred, genes)
    fm = section_features(train_sec, method, encoder, cache_dir, progress)
    method.fit([train_sec], [fm], genes=genes)
    pred = method.predict(train_sec, fm, at=held_xy, diameter_um=diameter_um)
    if WHOLE_SPOT_LAYER in pred.layers:  # predicted as whole spots (log1p CP10k): as spots
        return columns(pred, genes, layer=WHOLE_SPOT_LAYER)
    C = np.clip(columns(pred, genes), 0, None)
    if library == "predicted":
        tot = float(np.asarray(train_sec.counts.X.sum()))
        sel = float(np.asarray(train_sec.counts[:, genes].X.sum()))
        phi = sel / tot if tot > 0 else 1.0
        lib = C.sum(axis=1) / max(phi, 1e-12)
    else:
        lib = measured_library
    return metrics.log_cp10k(C, lib)


def score_held_out(pred: np.ndarray, truth: np.ndarray, n_top: int = 50) -> dict:
    """P1 scores of log1p CP10k predictions against the truth (both held-out x genes, genes
    ranked so that top50 = the first 50)."""
    return gene_scores(pred, truth, n_top)


def self_validation(method, pred: np.ndarray, truth: np.ndarray, genes: list[str]) -> dict:
    """For a method that estimates its own per-gene accuracy (:meth:`Method.reliability`,
    computed on the training half only): the Spearman correlation across ``genes`` between
    that estimate and the Pearson r measured on the held-out half (``selfval_spearman``;
    ``selfval_spearman_top50`` over the top 50), and the mean estimate
    (``selfval_estimate``), to set beside ``hvg1000_pcc``. Empty for other methods."""
    from scipy.stats import spearmanr

    from ..outputs import HELDOUT_PCC

    rel = method.reliability()
    if rel is None or HELDOUT_PCC not in rel:
        return {}
    est = rel[HELDOUT_PCC].reindex(genes).to_numpy(dtype=np.float64)
    measured = metrics.pcc_per_gene(pred, truth)
    ok = np.isfinite(est) & np.isfinite(measured)
    top = ok & (np.arange(len(genes)) < 50)

    def rho(sel):
        return float(spearmanr(est[sel], measured[sel])[0]) if sel.sum() > 2 else float("nan")

    return {"selfval_spearman": rho(ok), "selfval_spearman_top50": rho(top),
            "selfval_estimate": float(np.mean(est[ok])) if ok.any() else float("nan")}


def run_section(native, make_method, encoder: str, cache_dir: Path | None,
                progress: bool = True, library: str = "predicted", depth: float | None = None,
                seed: int = 0) -> dict:
    """Score one section (already read) under P1; ``depth``: fit on counts thinned to that
    median UMI per spot, score against the full-depth held-out counts."""
    t = Timer().__enter__()
    train_ids, held = split(native.counts.obs_names)
    genes = select_genes(native, 1000)
    if len(genes) < 2:
        raise InputError(f"section {native.name!r}: fewer than 2 genes pass the 10% filter")
    train_sec = subset(thin(native, depth, seed), train_ids)
    test = subset(native, held, "_held_out")
    method = make_method()
    log(progress, f"{native.name}: fit {method.name} on {train_sec.n_spots} spots, predict "
                  f"{test.n_spots} held-out spots, {len(genes)} genes")
    lib = np.asarray(test.counts.X.sum(axis=1), dtype=np.float64).ravel()
    pred = predict_held_out(method, train_sec, test.xy, genes, encoder, cache_dir, progress,
                            native.spot_diameter_um, library, lib)
    truth = metrics.log_cp10k(test.dense_counts(genes), lib)
    scores = score_held_out(pred, truth)
    scores.update(self_validation(method, pred, truth, genes))
    scores.update({"n_spots": int(test.n_spots), "n_train_spots": int(train_sec.n_spots),
                   "n_genes": int(len(genes)), "seconds": round(t.elapsed, 1)})
    return scores


def p1(method, sections=None, encoder: str = "handcrafted", data=None, epochs=None,
       n_states=None, seed: int = 0, consistency=None, out=None, cache_dir=None,
       progress: bool = True, library: str = "predicted",
       downsample_depth: float | None = None) -> dict:
    """Run P1 on her2st ``sections`` (names, default C2..C6, or Section objects) and return
    the results dict; with ``out`` also write ``out/results.json`` after every section.
    ``downsample_depth``: fit on counts thinned to that median UMI per spot (seeded by
    ``seed``), score against the full-depth counts.
    ``consistency`` applies to super-resolution methods only (spot methods predict whole
    spots: recorded as False for them)."""
    from ..methods.base import method_class

    if library not in ("predicted", "measured"):
        raise InputError(f"library must be 'predicted' or 'measured', got {library!r}")
    t = Timer().__enter__()
    cls = method_class(method) if isinstance(method, str) else type(method)
    spot = cls.kind == SPOT
    if spot:
        consistency = False  # does not apply: spot methods predict whole spots
        # spot methods read their own crop features: ``encoder`` is their parameter (as in
        # P3), not the FeatureMap's, or --encoder would be recorded but not used
        template = cls(seed=int(seed)) if isinstance(method, str) else method
        method = dataclasses.replace(template, encoder=encoder)
    make, params, mname = method_factory(method, epochs=epochs, n_states=n_states, seed=seed,
                                         progress=progress, consistency=consistency)
    params = {**params, "seed": int(seed), "scoring": {
        **SCORING, "prediction": "log1p CP10k from the method (spot method)" if spot else (
            "counts over the held-out spot's disk; library = "
            + ("sum of predicted scored-gene counts / scored-gene share of the training spots"
               if library == "predicted" else "measured held-out library (all genes)"))}}
    params = depth_params(params, downsample_depth, seed)
    cache_dir = protocol_cache(cache_dir, out)
    return score_her2st(PROTOCOL, sections, data,
                        lambda native: run_section(native, make, encoder, cache_dir, progress,
                                                   library, downsample_depth, seed),
                        method_name=mname, encoder=encoder, params=params, timer=t, out=out,
                        progress=progress)


__all__ = ["p1", "self_validation", "split", "subset", "score_held_out", "run_section", "SCORING"]
