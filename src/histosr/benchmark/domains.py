"""Protocol ``domains`` - tissue domains from super-resolved expression against pathologist
labels (her2st A1).

Per section with pathologist labels (``section.annotations``; spots labelled
``undetermined`` or unlabelled are clustered but not scored), k = the number of distinct
scored labels (fixed by the labels' count, never chosen by ARI), genes = the ``hvg1000``
rule (:func:`histosr.pp.select_genes`) on the measured spots (``n_genes`` to change).
Both arms use the same clustering (:func:`histosr.tl.domains`: log1p of counts scaled to
1e4 over those genes, genes z-scored, 30 PCs, k-means with ``n_init=10`` and the run's
seed, centres fitted on a seeded sample of at most 20,000 observations, no spatial
smoothing):

(a) ``ari_spots``: the measured spots clustered directly.
(b) ``ari_superresolved``: the method is fitted on the section's own spots (consistency on
    unless switched off), predicts every tissue superpixel (8 um), the superpixels are
    clustered, and each spot takes the majority domain over the superpixels of its
    footprint (ties: the smaller domain label). Majority over the footprint rather than
    clustering the prediction summed to each spot: with consistency on, the footprint sums
    ARE the measured counts, so that variant would repeat arm (a).

Scores: adjusted Rand index (``sklearn.metrics.adjusted_rand_score``) of each arm's spot
domains against the labels over the scored spots; ``nmi_*`` the normalised mutual
information; ``ari_superpixels`` the superpixel-level ARI (every superpixel inside exactly
one scored spot's footprint, against that spot's label); ``ari_superresolved_vs_spots``
the agreement of the two arms over all spots. ``domains_<section>.png`` in the out folder
shows the super-resolved domains over the H&E, the measured-spot domains and the labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..pp import select_genes
from .common import (
    Timer,
    log,
    method_factory,
    protocol_cache,
    read_section,
    score_sections,
    section_features,
)

PROTOCOL = "domains"
EXCLUDED_LABELS = ("undetermined",)
DEFAULT_SECTIONS = ["A1"]
CLUSTERING = {"use": "latent", "method": "kmeans", "smooth": 0.0, "n_pcs": 30,
              "normalize": True, "scale": True, "max_fit": 20000}
SCORING = {
    "labels": "section.annotations (pathologist), 'undetermined' and unlabelled spots not "
              "scored",
    "k": "number of distinct scored labels",
    "genes": "hvg1000 rule on the measured spots (histosr.pp.select_genes)",
    "clustering": "tl.domains: log1p of counts scaled to 1e4 over the selected genes, genes "
                  "z-scored (clip 10), 30 PCs, k-means n_init=10, seed = run seed, no "
                  "smoothing; the same for spots and superpixels (above 20,000 superpixels "
                  "the centres are fitted on a seeded sample of 20,000, all assigned)",
    "aggregation": "superresolved: each spot takes the majority superpixel domain over its "
                   "footprint (footprint sums would equal the measured counts under "
                   "consistency)",
    "score": "sklearn adjusted_rand_score / normalized_mutual_info_score",
}


def spot_anndata(section, genes: list[str]):
    """Measured counts of ``genes`` as an AnnData (obsm spatial, uns um_per_px)."""
    import anndata as ad
    import pandas as pd

    a = ad.AnnData(X=section.dense_counts(genes).astype(np.float32),
                   obs=pd.DataFrame(index=section.counts.obs_names.copy()),
                   var=pd.DataFrame(index=pd.Index(genes)))
    a.obsm["spatial"] = section.xy.copy()
    a.uns["histosr"] = {"um_per_px": float(section.um_per_px)}
    return a


def footprint_majority(pred, section, key: str = "domain") -> np.ndarray:
    """Per spot of ``section``, the most frequent ``obs[key]`` code among the predicted
    superpixels of its footprint (-1 when none of them was predicted)."""
    from ..geometry import grid_for, section_footprints

    grid = grid_for(section)
    F = section_footprints(section, grid)
    codes = np.asarray(pred.obs[key].cat.codes, dtype=np.int64)
    k = int(codes.max()) + 1
    flat = grid.flat(pred.obs["row"].to_numpy(), pred.obs["col"].to_numpy())
    import scipy.sparse as sp

    onehot = sp.csr_matrix((np.ones(len(flat)), (flat, codes)), shape=(F.shape[1], k))
    votes = np.asarray((F @ onehot).todense())
    out = votes.argmax(axis=1).astype(np.int64)
    out[votes.sum(axis=1) == 0] = -1
    return out


def _superpixel_labels(pred, section, labels: np.ndarray, scored: np.ndarray):
    """Superpixels inside exactly one scored spot's footprint: (pred row index, label)."""
    from ..geometry import grid_for, section_footprints

    grid = grid_for(section)
    F = section_footprints(section, grid)[np.flatnonzero(scored)].tocsc()
    n_cov = np.diff(F.indptr)
    owner = np.full(F.shape[1], -1, dtype=np.int64)
    one = np.flatnonzero(n_cov == 1)
    owner[one] = F.indices[F.indptr[one]]
    flat = grid.flat(pred.obs["row"].to_numpy(), pred.obs["col"].to_numpy())
    spot = owner[flat]
    rows = np.flatnonzero(spot >= 0)
    return rows, labels[np.flatnonzero(scored)][spot[rows]]


def score_domains(spot_domains: np.ndarray, labels: np.ndarray, scored: np.ndarray) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    d, y = np.asarray(spot_domains)[scored], np.asarray(labels)[scored]
    return {"ari": float(adjusted_rand_score(y, d)),
            "nmi": float(normalized_mutual_info_score(y, d))}


def run_section(section, make_method, encoder: str, cache_dir: Path | None, seed: int = 0,
                n_genes: int = 1000, out: Path | None = None, progress: bool = True) -> dict:
    """Both arms on one labelled section; returns its scores (and writes the figure)."""
    from sklearn.metrics import adjusted_rand_score

    from .. import tl

    t = Timer().__enter__()
    if section.annotations is None:
        raise InputError(f"section {section.name!r} has no pathologist labels "
                         "(labels/<name>_labeled_coordinates.tsv)")
    lab = section.annotations.reindex(section.counts.obs_names)
    labels = lab.astype(object).where(lab.notna(), None).to_numpy()
    scored = np.array([v is not None and str(v) not in EXCLUDED_LABELS for v in labels])
    labels = np.array([str(v) for v in labels], dtype=object)
    k = len(set(labels[scored]))
    if k < 2:
        raise InputError(f"section {section.name!r}: fewer than 2 scored labels")
    genes = select_genes(section, n_genes)
    opts = {k_: v for k_, v in CLUSTERING.items() if k_ != "smooth"}

    spots = spot_anndata(section, genes)
    tl.domains(spots, n_domains=k, smooth=CLUSTERING["smooth"], seed=seed, **opts)
    spot_dom = np.asarray(spots.obs["domain"].cat.codes, dtype=np.int64)
    a = score_domains(spot_dom, labels, scored)
    log(progress, f"{section.name}: spots clustered (k={k}): ARI {a['ari']:.3f}")

    method = make_method()
    if cache_dir is not None and hasattr(method, "checkpoint_dir"):
        # finished ensemble members are reused: a killed run resumes where it stopped
        method.checkpoint_dir = str(Path(cache_dir) / f"ckpt-{section.name}")
    fm = section_features(section, method, encoder, cache_dir, progress)
    log(progress, f"{section.name}: fit {method.name} on {section.n_spots} spots, "
                  f"{len(genes)} genes")
    method.fit([section], [fm], genes=genes)
    pred = method.predict(section, fm, at="superpixels")
    log(progress, f"{section.name}: clustering {pred.n_obs} super-resolved superpixels")
    tl.domains(pred, n_domains=k, smooth=CLUSTERING["smooth"], seed=seed, **opts)
    sr_dom = footprint_majority(pred, section)
    b = score_domains(sr_dom, labels, scored)
    rows, sp_lab = _superpixel_labels(pred, section, labels, scored)
    sp_codes = np.asarray(pred.obs["domain"].cat.codes)[rows]
    scores = {
        "ari_superresolved": b["ari"],
        "ari_spots": a["ari"],
        "nmi_superresolved": b["nmi"],
        "nmi_spots": a["nmi"],
        "ari_superpixels": float(adjusted_rand_score(sp_lab, sp_codes)) if len(rows) else None,
        "ari_superresolved_vs_spots": float(adjusted_rand_score(spot_dom, sr_dom)),
        "n_domains": int(k),
        "n_spots": int(section.n_spots),
        "n_scored_spots": int(scored.sum()),
        "n_spots_without_superpixels": int((sr_dom < 0).sum()),
        "n_superpixels": int(pred.n_obs),
        "n_superpixels_scored": int(len(rows)),
        "n_genes": int(len(genes)),
        "labels": sorted(set(labels[scored])),
    }
    if out is not None:
        from .. import pl

        spots.obs["domain"] = spots.obs["domain"].astype("category")
        fig = pl.domains_vs_labels(pred, section, labels=section.annotations,
                                   spot_domains=spots,
                                   title=f"{section.name}: {method.name} super-resolved "
                                         f"domains (k={k})")
        Path(out).mkdir(parents=True, exist_ok=True)
        p = Path(out) / f"domains_{section.name}.png"
        fig.savefig(p, dpi=110)
        pl._plt().close(fig)
        scores["figure"] = p.name
    scores["seconds"] = round(t.elapsed, 1)
    return scores


def domains(method="istar", sections=None, encoder: str = "handcrafted", data=None,
            epochs=None, n_states=None, seed: int = 0, consistency=None, out=None,
            cache_dir=None, progress: bool = True, n_genes: int = 1000) -> dict:
    """Run the ``domains`` protocol (module docstring) on labelled her2st ``sections``
    (names, default A1; or Sections with ``annotations``) and return the results dict;
    with ``out`` also write ``out/results.json`` and ``out/domains_<section>.png``.
    ``consistency=None`` means on (the protocol's setting)."""
    t = Timer().__enter__()
    if consistency is None:
        consistency = True
    make, params, mname = method_factory(method, epochs=epochs, n_states=n_states, seed=seed,
                                         progress=progress, consistency=consistency)
    params = {**params, "seed": int(seed), "n_genes": int(n_genes), "clustering": CLUSTERING,
              "scoring": SCORING}
    cache_dir = protocol_cache(cache_dir, out)
    if cache_dir is not None:
        params["checkpoints"] = "cache_dir/ckpt-<section> (finished states are reused)"
    def score_one(s):
        sec = read_section(data, s) if isinstance(s, str) else s
        log(progress, f"{sec.name}: {sec.n_spots} spots")
        return sec.name, run_section(sec, make, encoder, cache_dir, seed, n_genes, out,
                                     progress)

    return score_sections(PROTOCOL, list(sections or DEFAULT_SECTIONS), score_one,
                          method_name=mname, encoder=encoder, params=params, timer=t, out=out,
                          progress=progress)
