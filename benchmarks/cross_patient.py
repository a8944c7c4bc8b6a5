"""Cross-patient check: an H&E-only model fitted on her2st C2..C6 (patient C) applied to a
section of another patient (A1: a display image, about 3.4 um/px, lighter and pinker, mostly
stroma and fat), with and without stain normalisation. Beside P3, which stays within one
patient.

    python benchmarks/cross_patient.py --methods ridge,knn_features,hespotex \\
        --stain-norm none,macenko,reinhard --out /tmp/cross_patient.json

Each (method, stain normalisation) pair is one P3 fold (:func:`histosr.benchmark.p3.run_fold`:
genes by the HEST rule on the training spots, the applied section seen as an image-only view,
scores against its measured counts). Features are computed from the image at the encoder's
0.5 um/px, upsampled from the display image: at 3.4 um/px nuclei span 2-3 px, so the nuclear
and texture groups carry little there; colour and stain groups do. Prints one JSON line per
pair and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="ridge")
    ap.add_argument("--encoder", default="handcrafted")
    ap.add_argument("--stain-norm", default="none,macenko")
    ap.add_argument("--stain-ref", default="builtin")
    ap.add_argument("--train", default="C2,C3,C4,C5,C6")
    ap.add_argument("--apply-to", default="A1")
    ap.add_argument("--data", default=None)
    ap.add_argument("--cache", default=os.environ.get("HISTOSR_CACHE_DIR"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    import dataclasses

    from histosr.benchmark.p3 import METHOD_MAP, run_fold
    from histosr.methods.base import method_class

    rows = []
    for mname in a.methods.split(","):
        cls = method_class(METHOD_MAP.get(mname, mname))
        method = dataclasses.replace(cls(seed=a.seed), encoder=a.encoder,
                                     cache_dir=a.cache)
        for sn in a.stain_norm.split(","):
            r = run_fold(a.apply_to, a.train.split(","), method, a.data, progress=False,
                         seed=a.seed, stain_norm=sn, stain_ref=a.stain_ref)
            row = {"method": cls.name if hasattr(cls, "name") else mname,
                   "encoder": a.encoder, "stain_norm": sn, "train": a.train,
                   "applied_to": r["name"], **r["scores"]}
            print(json.dumps(row), flush=True)
            rows.append(row)
            if a.out:  # rewritten after every pair: a killed run keeps what it finished
                tmp = Path(a.out).with_suffix(".tmp")
                tmp.write_text(json.dumps(rows, indent=1))
                os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
