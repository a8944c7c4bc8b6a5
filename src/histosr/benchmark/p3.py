"""P3 - H&E only, leave one section out (BENCHMARKS.md; HESpotEx's protocol).

For each scored section (default her2st C2..C6): fit the method on the OTHER sections'
measured spots, predict the held-out section from its H&E alone and score its spots.

* Image only: the method predicts an :func:`image_only_view` of the held-out section (the
  image, the pixel size, the spot positions and ids; a counts table with NO genes), so no
  method can read the held-out counts, even by accident.
* Genes: ``hvg1000`` and ``top50`` (its first 50) by the HEST rule on the pooled TRAINING
  spots (count > 0 in >= 10% of them; variance of log1p CP10k with each spot's full
  library), restricted to genes measured in every training section. A chosen gene that the
  held-out section did not measure counts as zero there (it then scores r = 0).
* Scores (per held-out section): per-gene Pearson r across its spots between the
  prediction (log1p CP10k, the spot methods' output) and log1p CP10k of its measured counts
  (library = each spot's total over all its genes): ``top50_pcc`` (mean), ``top50_pcc_median``,
  ``hvg1000_pcc``, ``mae`` (log1p scale, top50).
* ``--method knn`` means kNN in image-feature space (``knn_features``): the spatial ``knn``
  baseline interpolates measured spots of the predicted section and has none here. The
  mapping is recorded in ``params["method_mapped_from"]``. ``consistency`` does not apply
  (spot methods; recorded as ``"consistency": false``).
* Folds are independent: ``scheduler=None`` runs them one after the other; ``"local"``
  starts a Dask ``distributed.LocalCluster``; an address (``"tcp://host:8786"``) or a
  ``distributed.Client`` uses that cluster. Every fold builds a fresh method with the same
  ``seed`` and seeds its own generators when it starts, so the numbers do not depend on the
  execution order or on which worker ran the fold (tests check serial == Dask).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import metrics
from ..arrays import columns
from ..errors import InputError
from ..image_only import image_only_view
from ..pp import select_genes
from .common import (
    Timer,
    depth_params,
    gene_scores,
    log,
    method_factory,
    peak_rss_mb,
    protocol_cache,
)

PROTOCOL = "p3"
SCORING = {
    "scale": "log1p CP10k; truth library = measured total over all genes of the spot",
    "genes": "hvg1000/top50 by the HEST rule on the pooled spots of the TRAINING sections",
    "mae": "log1p scale, top50 genes",
    "input": "the held-out section's H&E, pixel size and spot positions only",
}
#: P3 names whose registered meaning cannot predict an unmeasured section
METHOD_MAP = {"knn": "knn_features"}


def truth_matrix(section, genes: list[str]) -> np.ndarray:
    """log1p CP10k of ``genes`` (zeros for genes the section did not measure)."""
    lib = np.asarray(section.counts.X.sum(axis=1), dtype=np.float64).ravel()
    have = [g for g in genes if g in section.counts.var_names]
    out = np.zeros((section.n_spots, len(genes)))
    if have:
        idx = [genes.index(g) for g in have]
        out[:, idx] = metrics.log_cp10k(section.dense_counts(have), lib)
    return out


def score_section(pred: np.ndarray, section, genes: list[str], n_top: int = 50) -> dict:
    """P3 scores of ``pred`` (spots x ``genes``, log1p CP10k, the section's spot order)."""
    truth = truth_matrix(section, genes)
    return {**gene_scores(pred, truth, n_top),
            "n_spots": int(section.n_spots), "n_genes": int(len(genes)),
            "n_genes_unmeasured": int(sum(g not in section.counts.var_names for g in genes))}


def _load(spec, data):
    if isinstance(spec, str):
        from .common import read_section

        return read_section(data, spec)
    return spec


def run_fold(test, train, method, data=None, n_genes: int = 1000, progress: bool = False,
             depth: float | None = None, seed: int = 0, encoder: str = "handcrafted",
             cache_dir=None, stain_norm: str = "none", stain_ref="builtin") -> dict:
    """One P3 fold: fit a fresh copy of ``method`` (an unfitted template) on ``train``
    (names or Sections; counts thinned to a median of ``depth`` UMI per spot when given),
    predict the image-only view of ``test``, score it against its full counts. With
    ``stain_norm`` (``"macenko"``/``"reinhard"``, :mod:`histosr.stain`) every section's image
    is normalised to ``stain_ref`` first. Returns ``{"name", "scores", "fit_info"}``.
    Self-contained (a Dask task). A superpixel method (``image_only``, e.g. ``hybrid``) gets
    ``encoder`` FeatureMaps of every section and predicts sums over the held-out spots'
    disks, put on the log1p CP10k scale with the library its prediction implies (as
    P1/P2), or, when it predicts them as whole spots (the layer ``WHOLE_SPOT_LAYER``), that
    log1p CP10k, as the spot methods."""
    from ..methods.base import SPOT, WHOLE_SPOT_LAYER
    from ..stain import normalize_section
    from .common import section_features, thin

    t = Timer().__enter__()
    test_sec = normalize_section(_load(test, data), stain_norm, stain_ref, seed)
    train_secs = [normalize_section(thin(_load(s, data), depth, seed), stain_norm, stain_ref,
                                    seed) for s in train]
    genes = select_genes(train_secs, n_genes)
    if len(genes) < 2:
        raise InputError(f"fold {test_sec.name}: fewer than 2 genes pass the 10% filter")
    m = dataclasses.replace(method)
    log(progress, f"{test_sec.name}: fit {m.name} on {', '.join(s.name for s in train_secs)} "
                  f"({sum(s.n_spots for s in train_secs)} spots, {len(genes)} genes)")
    view = image_only_view(test_sec)
    if m.kind == SPOT:
        m.fit(train_secs, genes=genes)
        X = columns(m.predict(view, at="spots"), genes)
    else:
        fms = [section_features(s, m, encoder, cache_dir, progress) for s in train_secs]
        m.fit(train_secs, fms, genes=genes)
        fm = section_features(view, m, encoder, cache_dir, progress)
        pred = m.predict(view, fm, at="spots", consistency=False, calibrate=False)
        if WHOLE_SPOT_LAYER in pred.layers:  # predicted as whole spots: scored as spots
            X = columns(pred, genes, layer=WHOLE_SPOT_LAYER)
        else:
            C = np.clip(columns(pred, genes), 0, None)
            tot = sum(float(np.asarray(s.counts.X.sum())) for s in train_secs)
            sel = sum(float(np.asarray(s.counts[:, genes].X.sum())) for s in train_secs)
            phi = sel / tot if tot > 0 else 1.0
            X = metrics.log_cp10k(C, C.sum(axis=1) / max(phi, 1e-12))
    scores = score_section(X, test_sec, genes)
    scores["seconds"] = round(t.elapsed, 1)
    info = getattr(m, "fit_info_", None)
    return {"name": test_sec.name, "scores": scores, "fit_info": info}


def p3(method, sections=None, encoder: str = "handcrafted", data=None, epochs=None,
       n_states=None, seed: int = 0, consistency=None, out=None, progress: bool = True,
       scheduler=None, cache_dir=None, n_genes: int = 1000,
       downsample_depth: float | None = None, stain_norm: str = "none",
       stain_ref="builtin") -> dict:
    """Run P3 over ``sections`` (her2st names, default C2..C6, or Section objects; at least
    two) and return the results dict; with ``out`` also write ``out/results.json``.
    ``method``: a registered name (``knn`` -> ``knn_features``) or a SpotMethod instance;
    ``encoder`` sets its image encoder; ``scheduler``: None (serial), ``"local"``, an address
    or a ``distributed.Client`` (see :func:`histosr.cluster.dask_client`). ``stain_norm``
    (``"macenko"``/``"reinhard"``; default ``"none"``: measured on her2st, Macenko lowers
    ``ridge`` by 0.009 top50 on C2..C6 and by 0.024 on A1 applied from C2..C6, because the
    spot methods already z-score features within each section) and ``stain_ref``
    (``"builtin"``, a Section or an image file) set the stain normalisation of every
    section (:mod:`histosr.stain`)."""
    from ..datasets import HER2ST_SECTIONS
    from ..methods.base import SuperpixelMethod
    from ..methods.spot import SpotMethod
    from ..stain import METHODS as STAIN_METHODS
    from . import results as report

    t = Timer().__enter__()
    mapped_from = None
    if isinstance(method, str) and method in METHOD_MAP:
        mapped_from, method = method, METHOD_MAP[method]
    if isinstance(method, str):
        from ..methods.base import method_class

        cls = method_class(method)
        if not cls.tags()["image_only"]:
            raise InputError(f"P3 predicts unmeasured sections from H&E alone: method "
                             f"{method!r} is not an image-only method (use a spot-level "
                             "one: hespotex, ridge, knn_features, mean; or hybrid)")
        method = cls(seed=int(seed))
    if not isinstance(method, (SpotMethod, SuperpixelMethod)) or not method.tags()["image_only"]:
        raise InputError(f"P3 needs an image-only method, got {type(method).__name__}")
    if isinstance(method, SpotMethod):
        if not method.cache_dir:
            cache_dir = protocol_cache(cache_dir, out)
        method = dataclasses.replace(method, encoder=encoder, cache_dir=str(cache_dir)
                                     if cache_dir else method.cache_dir)
    else:
        cache_dir = protocol_cache(cache_dir, out)
    specs = list(sections or HER2ST_SECTIONS)
    if len(specs) < 2:
        raise InputError(f"P3 needs at least 2 sections (one held out), got {len(specs)}")
    # a slide-trained encoder ("ssl") is trained once on every section's image, so that
    # training and held-out sections share one feature space
    from ..features.ssl import UNTRAINED, shared_encoder

    shared, encoder_note = shared_encoder(
        encoder, [_load(s, data) for s in specs] if encoder in UNTRAINED else [],
        cache_dir or method.cache_dir, progress)
    if isinstance(method, SpotMethod):
        method = dataclasses.replace(method, encoder=shared)
    make, params, mname = method_factory(method, epochs=epochs, n_states=n_states, seed=seed,
                                         progress=progress and scheduler is None)
    template = make()
    params = {**params, "consistency": False, "seed": int(seed), "scoring": SCORING,
              "scheduler": None if scheduler is None else str(
                  "local" if scheduler == "local" else type(scheduler).__name__
                  if not isinstance(scheduler, str) else scheduler)}
    if consistency:
        params["consistency_note"] = "not applicable to spot-level prediction (ignored)"
    if mapped_from:
        params["method_mapped_from"] = (f"{mapped_from!r}: the spatial baseline cannot predict "
                                        f"an unmeasured section; P3 runs {mname!r} (kNN in "
                                        "image-feature space)")
    params = depth_params(params, downsample_depth, seed)
    if stain_norm not in STAIN_METHODS:
        raise InputError(f"--stain-norm must be one of {', '.join(STAIN_METHODS)}, got "
                         f"{stain_norm!r}")
    params["stain_norm"] = {"method": stain_norm, "ref": str(
        getattr(stain_ref, "name", stain_ref)) if stain_norm != "none" else None}
    if encoder_note:
        params["encoder_training"] = (encoder_note + "; the held-out sections' images are "
                                      "included: P3 gives the method each held-out H&E anyway")
    names = [s if isinstance(s, str) else s.name for s in specs]
    folds = [(specs[i], [s for j, s in enumerate(specs) if j != i]) for i in range(len(specs))]

    scored: dict[str, dict] = {}
    fit_info: dict[str, object] = {}
    res = None

    def record(r):
        nonlocal res
        scored[r["name"]] = r["scores"]
        if r.get("fit_info") is not None:
            fit_info[r["name"]] = r["fit_info"]
        log(progress, f"{r['name']}: " + ", ".join(
            f"{k}={v:.3f}" for k, v in r["scores"].items()
            if isinstance(v, float) and k != "seconds"))
        ordered = {n: scored[n] for n in names if n in scored}
        p = {**params, **({"fit_info": fit_info} if fit_info else {})}
        res = report.results(PROTOCOL, mname, encoder, p, ordered, t.elapsed, peak_rss_mb())
        if out is not None:
            report.write_results(res, out)

    if scheduler is None or scheduler == "serial":
        for test, train in folds:
            record(run_fold(test, train, template, data, n_genes, progress,
                            downsample_depth, seed, encoder=shared, cache_dir=cache_dir,
                            stain_norm=stain_norm, stain_ref=stain_ref))
    else:
        from distributed import as_completed

        from ..cluster import dask_client

        with dask_client(scheduler) as client:
            held, futs = [], []
            try:
                if not all(isinstance(s, str) for s in specs):  # Sections: send each once
                    held = client.scatter(list(specs))
                    folds = [(held[i], [h for j, h in enumerate(held) if j != i])
                             for i in range(len(specs))]
                futs = [client.submit(run_fold, test, train, template, data, n_genes, False,
                                      downsample_depth, seed, encoder=shared,
                                      cache_dir=cache_dir, stain_norm=stain_norm,
                                      stain_ref=stain_ref, pure=False)
                        for test, train in folds]
                for f in as_completed(futs):
                    record(f.result())
            finally:
                client.cancel(futs + held)  # release the fold results and scattered sections
    return res


__all__ = ["p3", "run_fold", "image_only_view", "score_section",
           "METHOD_MAP"]
