"""Feature-group ablations of the ``handcrafted`` encoder for the spot-crop methods, from
the default encoder's cached crop features.

A group's columns of the crop features (mean and std over the crop's tokens of each
feature) do not depend on the other groups (each group is computed from the pixels on its
own; ``tests/test_stain_nuclei.py`` checks the nuclei columns), so the crop features of
``handcrafted:-G`` are v2's columns without G's. This script patches
:func:`histosr.features.crops.crop_features` to select them and runs P3 (or the
cross-patient fold of ``benchmarks/cross_patient.py``): the same numbers as
``histosr benchmark p3 --method ridge --encoder handcrafted:-G``, without encoding every
crop again.

    python benchmarks/group_ablation.py --drop nuclei --stain-norm macenko --out DIR
    python benchmarks/group_ablation.py --drop colour --apply-to A1 --out DIR
    python benchmarks/group_ablation.py --drop texture --protocol p1 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drop", required=True, help="comma-separated groups to switch off")
    ap.add_argument("--method", default="ridge")
    ap.add_argument("--stain-norm", default="macenko")
    ap.add_argument("--apply-to", default=None, help="e.g. A1: the cross-patient fold")
    ap.add_argument("--protocol", default="p3", choices=["p1", "p3"])
    ap.add_argument("--train", default="C2,C3,C4,C5,C6")
    ap.add_argument("--cache", default=os.environ.get("HISTOSR_CACHE_DIR"))
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import histosr.features.crops as crops
    from histosr.features import get_encoder
    from histosr.features.handcrafted import GROUP_OF

    drop = set(a.drop.split(","))
    full = get_encoder("handcrafted:v2")
    group = [GROUP_OF.get(n.split("@")[0], "nuclei") for n in full.feature_names]
    keep = np.array([g not in drop for g in group] * 2)  # crop features: mean || std
    real = crops.crop_features

    def selected(section, encoder="handcrafted:v2", *args, **kw):
        f = real(section, "handcrafted:v2", *args, **kw)
        return f[..., keep]

    crops.crop_features = selected
    enc = "handcrafted:" + ",".join(f"-{g}" for g in sorted(drop))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.apply_to:
        import dataclasses

        from histosr.benchmark.p3 import METHOD_MAP, run_fold
        from histosr.methods.base import method_class

        cls = method_class(METHOD_MAP.get(a.method, a.method))
        m = dataclasses.replace(cls(seed=0), encoder="handcrafted:v2", cache_dir=a.cache)
        r = run_fold(a.apply_to, a.train.split(","), m, progress=False,
                     stain_norm=a.stain_norm)
        res = {"method": a.method, "encoder": enc, "stain_norm": a.stain_norm,
               "applied_to": r["name"], **r["scores"]}
        (out / "cross_patient.json").write_text(json.dumps(res, indent=1))
    else:
        if a.protocol == "p1":
            from histosr.benchmark.p1 import p1

            res = p1(a.method, sections=a.train.split(","), encoder="handcrafted:v2", out=out,
                     progress=False, cache_dir=a.cache)
        else:
            from histosr.benchmark.p3 import p3

            res = p3(a.method, sections=a.train.split(","), encoder="handcrafted:v2", out=out,
                     progress=False, cache_dir=a.cache, stain_norm=a.stain_norm)
        res["encoder"] = enc  # results.json says which ablation it is
        res["params"]["ablation"] = (f"groups {sorted(drop)} off: columns of the default "
                                     "encoder's crop features (benchmarks/group_ablation.py)")
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out / "results.json")
        res = {"encoder": enc, "mean": res["mean"],
               "sections": {k: v["top50_pcc"] for k, v in res["sections"].items()}}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
