"""What each part of ``hybrid`` adds on P1 (issue #12): one fit per her2st section on the P1
training half, then the held-out spots scored (top50 / hvg1000 mean per-gene Pearson r,
log1p CP10k) for the parts and weight rules, all from that same fit:

* ``field``: the kernel smoother of the training spots alone (at the spot centre);
* ``crop_ridge``: the spot-crop ridge alone (what ``ridge`` predicts);
* ``crop_w_evidence`` / ``crop_w_pooled`` / ``crop_w_ls`` / ``crop_w_1``: field + crop image
  part (regression kriging) with the per-gene weight by the chi2 evidence rule
  (``weights="evidence"``), by empirical Bayes across genes (``weights="pooled"``, the
  default), by plain least squares clipped to [0, 1], and 1 for every gene;
* ``map_w_evidence``: field + the 8 um map's image model (footprint-mean features), evidence
  rule; ``both_ls``: field + both image parts, free per-gene least squares in [0, 1.5].

Weights come from the hybrid's own out-of-fold predictions (spatially blocked folds of the
training half). Also prints ``noise_ceiling``: the Spearman-Brown reliability, across genes,
of the per-gene PCC measured on the held-out spots (from random half splits): roughly the
most a self-validation estimate computed on a training half of the same size can reach
against it. Prints one JSON line per section and one with the means.

    OMP_NUM_THREADS=1 python benchmarks/hybrid_ablation.py --sections C2,C3,C4,C5,C6
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    from scipy.stats import spearmanr

    import histosr as hs
    from histosr import metrics
    from histosr.benchmark.common import read_section
    from histosr.benchmark.p1 import split, subset
    from histosr.calibration import detail_weights, pooled_weights
    from histosr.methods.field import KernelField
    from histosr.methods.hybrid import spot_table
    from histosr.pp import select_genes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="C2,C3,C4,C5,C6")
    ap.add_argument("--encoder", default="handcrafted")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args()
    names = a.sections.split(",")
    res = {}
    for name in names:
        native = read_section(None, name)
        tr, ho = split(native.counts.obs_names)
        genes = select_genes(native, 1000)
        train, test = subset(native, tr), subset(native, ho, "_held_out")
        fm = hs.features(train, encoder=a.encoder, cache_dir=a.cache_dir, progress=False)
        lib = np.asarray(test.counts.X.sum(axis=1), dtype=np.float64).ravel()
        truth = metrics.log_cp10k(test.dense_counts(genes), lib)
        m = hs.get_method("hybrid", progress=False, spot_features="crops",
                          cache_dir=a.cache_dir).fit([train], [fm], genes=genes)
        o, folds = m._oof, m._oof_folds  # out-of-fold pieces of the fit (diagnostics)
        t = spot_table(train, fm, genes)
        tt = spot_table(test, fm, genes)
        h = m.spots_[next(iter(m.spots_))]["h"]
        xy = test.xy * float(fm.grid.um_per_px)

        def field(values, t=t, h=h, k=m.k, xy=xy):
            return KernelField(t["xy_um"], values, h, k)(xy)

        cm = m._crop_model()
        R = cm.predict_raw(cm._raw_features(test, test.xy))
        S = R - field(cm.predict_raw(cm._raw_features(train, train.xy[t["keep"]])))
        image = m._image(tt["X"]) - field(m._image(t["X"]))
        F = field(t["Y"])
        E = o["Y"] - o["F"]

        def score(P, truth=truth):
            r = metrics.pcc_per_gene(P, truth)
            return [round(float(np.nanmean(r[:50])), 4), round(float(np.nanmean(r)), 4)]

        ls = np.clip((E * o["S"]).sum(0) / np.maximum((o["S"] ** 2).sum(0), 1e-12), 0, 1)
        both = np.zeros((2, len(genes)))
        for g in range(len(genes)):
            A = np.stack([o["S"][:, g], o["I"][:, g]], 1)
            both[:, g] = np.clip(np.linalg.lstsq(A.T @ A + 1e-9 * np.eye(2), A.T @ E[:, g],
                                                 rcond=None)[0], 0, 1.5)
        out = {"field": score(F), "crop_ridge": score(R),
               "crop_w_evidence": score(F + detail_weights(E, o["S"]) * S),
               "crop_w_pooled": score(F + pooled_weights(E, o["S"], folds) * S),
               "crop_w_ls": score(F + ls * S), "crop_w_1": score(F + S),
               "map_w_evidence": score(F + detail_weights(E, o["I"]) * image),
               "both_ls": score(F + both[0] * S + both[1] * image)}
        P = F + pooled_weights(E, o["S"], folds) * S
        halves = []
        for rep in range(20):
            perm = np.random.default_rng(rep).permutation(len(truth))
            ia, ib = perm[: len(perm) // 2], perm[len(perm) // 2:]
            ra = metrics.pcc_per_gene(P[ia], truth[ia])
            rb = metrics.pcc_per_gene(P[ib], truth[ib])
            ok = np.isfinite(ra) & np.isfinite(rb)
            halves.append([spearmanr(ra[ok], rb[ok])[0], spearmanr(ra[ok][:50], rb[ok][:50])[0]])
        hm = np.mean(halves, axis=0)
        out["noise_ceiling"] = [round(float(x), 3) for x in 2 * hm / (1 + hm)]
        print(json.dumps({"section": name, **out}), flush=True)
        res[name] = out
    print(json.dumps({"mean": {k: [round(float(np.mean([res[n][k][i] for n in names])), 4)
                                   for i in range(2)] for k in res[names[0]]}}))


if __name__ == "__main__":
    main()
