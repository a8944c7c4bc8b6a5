"""P4 - synthetic 8 um super-resolution (the HISTEX simulation protocol, BENCHMARKS.md).

A section with a known 8 um truth (default :func:`histosr.simulate.synthetic_visium`) is
turned into pseudo-Visium spots; the method is fitted on those spots and the H&E and
predicts every tissue superpixel. The tissue mask is the simulation's own
(``truth["mask"]``, as the HISTEX evaluation uses the simulation mask), given to the
feature extractor so every tissue superpixel is predicted. Genes: the ``hvg1000`` rule on
the pseudo-spots (the training spots); ``top50`` the first 50 of them.

Scores per section (:func:`score_superpixels`), over tissue superpixels, on counts per
superpixel (PCC is scale-free; SSIM/RMSE min-max normalise each map):
``pcc``/``pcc_median`` (all scored genes), ``top50_pcc``, ``top50_pcc_median``,
``hvg1000_pcc``, ``top50_within_pcc`` (superpixels inside a pseudo-spot's footprint, minus
that spot's mean: what super-resolution adds inside a measured spot), ``ssim``, ``rmse``,
``mae`` (normalised maps), the ``shuffled_*`` twins for the prediction with its tissue
superpixels permuted (``numpy.random.default_rng(seed)``), and ``pcc_<kind>`` per gene kind
of a synthetic section (visible / gradient / mixed / noise). With calibrated detail on
(``--set calibrate=true``) the same fit is also scored without it (``nocal_pcc``,
``nocal_top50_pcc``, ``nocal_top50_within_pcc``, ``nocal_ssim``, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import metrics
from ..arrays import columns
from ..errors import InputError
from ..geometry import grid_for, section_footprints
from .common import (
    Timer,
    fit_truth,
    log,
    method_factory,
    nocal_scores,
    protocol_cache,
    score_sections,
)

PROTOCOL = "p4"
SCORING = {
    "scale": "counts per 8 um superpixel; SSIM/RMSE/MAE on maps min-max normalised per gene "
             "over tissue, outside tissue = 0",
    "genes": "hvg1000/top50 rule on the pseudo-spots",
    "mask": "simulation tissue mask (truth['mask'])",
    "shuffle": "prediction permuted over tissue superpixels, numpy default_rng(seed)",
}


def _spot_of_cells(section, mask: np.ndarray) -> np.ndarray:
    """Per tissue superpixel (row-major), the index of the pseudo-spot whose footprint
    covers it, -1 when none (or when footprints overlap there)."""
    grid = grid_for(section)
    F = section_footprints(section, grid).tocsc()
    n_cov = np.diff(F.indptr)
    owner = np.full(F.shape[1], -1, dtype=np.int64)
    one = np.flatnonzero(n_cov == 1)
    owner[one] = F.indices[F.indptr[one]]
    return owner[np.flatnonzero(mask.ravel())]


def score_superpixels(pred, section, seed: int = 0, genes: list[str] | None = None,
                      n_top: int = 50) -> dict:
    """Score a superpixel prediction (AnnData with obs ``row``/``col``, counts per
    superpixel) against ``section.truth`` over its tissue mask (see the module docstring).
    ``genes`` (ranked; default the predicted genes that have a truth) sets the scored genes;
    tissue superpixels without a prediction count as 0 (``coverage`` says how many had one).
    """
    truth = section.truth
    if truth is None:
        raise InputError(f"section {section.name!r} has no 8 um truth to score against")
    tgenes = list(truth["genes"])
    genes = [g for g in (genes or list(pred.var_names)) if g in tgenes and g in pred.var_names]
    if not genes:
        raise InputError("no predicted gene has a truth map")
    mask = np.asarray(truth["mask"], dtype=bool)
    cube = np.asarray(truth["cube"])
    T = cube[..., [tgenes.index(g) for g in genes]].astype(np.float64)
    rows = np.asarray(pred.obs["row"], dtype=np.int64)
    cols = np.asarray(pred.obs["col"], dtype=np.int64)
    X = columns(pred, genes)
    P = np.zeros(T.shape)
    P[rows, cols] = X
    covered = np.zeros(mask.shape, dtype=bool)
    covered[rows, cols] = True

    tr, tc = np.nonzero(mask)
    pv, tv = P[tr, tc], T[tr, tc]
    perm = np.random.default_rng(seed).permutation(len(tr))
    Ps = np.zeros_like(P)
    Ps[tr, tc] = pv[perm]

    top = slice(0, min(n_top, len(genes)))
    r = metrics.pcc_per_gene(pv, tv)
    rs = metrics.pcc_per_gene(pv[perm], tv)
    owner = _spot_of_cells(section, mask)
    inside = owner >= 0
    within = metrics.pcc_within_groups(pv[inside][:, top], tv[inside][:, top], owner[inside])
    ssim = metrics.ssim_per_gene(P, T, mask)
    ssim_s = metrics.ssim_per_gene(Ps, T, mask)
    rmse = metrics.rmse_maps(P, T, mask)
    rmse_s = metrics.rmse_maps(Ps, T, mask)
    norm_p = metrics.normalise_maps(P, mask)[mask]
    norm_t = metrics.normalise_maps(T, mask)[mask]
    out = {
        "pcc": float(np.mean(r)),
        "pcc_median": float(np.median(r)),
        "top50_pcc": float(np.mean(r[top])),
        "top50_pcc_median": float(np.median(r[top])),
        "hvg1000_pcc": float(np.mean(r)),
        "top50_within_pcc": float(np.mean(within)),
        "ssim": float(np.mean(ssim)),
        "rmse": float(np.mean(rmse)),
        "mae": metrics.mae(norm_p, norm_t),
        "shuffled_pcc": float(np.mean(rs)),
        "shuffled_ssim": float(np.mean(ssim_s)),
        "shuffled_rmse": float(np.mean(rmse_s)),
    }
    kinds = section.meta.get("gene_kind") or {}
    for kind in ("visible", "gradient", "mixed", "noise"):
        sel = [i for i, g in enumerate(genes) if kinds.get(g) == kind]
        if sel:
            out[f"pcc_{kind}"] = float(np.mean(r[sel]))
    out.update({
        "coverage": float(covered[mask].mean()),
        "n_superpixels": int(mask.sum()),
        "n_spots": int(section.n_spots),
        "n_genes": len(genes),
    })
    return out


def run_section(section, make_method, encoder: str, cache_dir: Path | None, seed: int = 0,
                progress: bool = True) -> dict:
    """Fit on a pseudo-spot section with truth, predict its tissue superpixels, score."""
    t = Timer().__enter__()
    method, fm, genes = fit_truth(section, make_method, encoder, cache_dir, progress)

    def score(calibrate: bool | None = None) -> dict:
        pred = method.predict(section, fm, at="superpixels", calibrate=calibrate)
        return score_superpixels(pred, section, seed=seed, genes=genes)

    scores = score()
    scores.update(nocal_scores(method, score))
    scores["seconds"] = round(t.elapsed, 1)
    return scores


def _synthetic(s):
    from ..simulate import synthetic_visium

    if not isinstance(s, (str, int, np.integer)):
        return s  # a Section with truth
    txt = str(s)
    digits = txt[len("synthetic"):] if txt.startswith("synthetic") else txt
    try:
        sd = int(digits)
    except ValueError:
        raise InputError(
            f"P4 section {s!r}: expected 'synthetic<seed>' or an integer seed (or a Section "
            "with an 8 um truth from the Python API)"
        ) from None
    return synthetic_visium(seed=sd)


def p4(method, sections=None, encoder: str = "handcrafted", epochs=None, n_states=None,
       seed: int = 0, consistency=None, out=None, cache_dir=None, n_sections: int = 2,
       progress: bool = True, data=None) -> dict:
    """Run P4 and return the results dict (and write ``out/results.json`` with ``out``).

    ``sections``: names ``synthetic<k>`` / integer seeds, or Sections with a truth;
    default ``n_sections`` synthetic sections with seeds ``seed, seed + 1, ...``.
    ``data``: a folder written by ``histosr simulate`` (or one holding several such folders;
    ``sections`` then picks folder names): its simulated sections are scored instead.
    """
    t = Timer().__enter__()
    make, params, mname = method_factory(method, epochs=epochs, n_states=n_states, seed=seed,
                                         progress=progress, consistency=consistency)
    params = {**params, "seed": int(seed), "scoring": SCORING}
    cache_dir = protocol_cache(cache_dir, out)
    if data is not None:  # folders written by `histosr simulate` (truth.zarr + section.json)
        from ..simulate import simulated_sections

        sections = simulated_sections(data, names=sections)
    if sections is None:
        sections = [f"synthetic{seed + i}" for i in range(n_sections)]
    def score_one(s):
        sec = _synthetic(s)
        if sec.truth is None:
            raise InputError(f"P4 needs sections with an 8 um truth; {sec.name!r} has none")
        log(progress, f"{sec.name}: {sec.n_spots} pseudo-spots, "
                      f"{int(np.asarray(sec.truth['mask']).sum())} tissue superpixels")
        return sec.name, run_section(sec, make, encoder, cache_dir, seed, progress)

    return score_sections(PROTOCOL, sections, score_one, method_name=mname, encoder=encoder,
                          params=params, timer=t, out=out, progress=progress,
                          skip_log=("seconds", "coverage"))
