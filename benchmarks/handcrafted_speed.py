"""Time of the default ``handcrafted`` encoder (with the nuclei group) on a whole her2st
section against ``handcrafted:v1`` (the 63-dim encoder without it) in the same run.

    OMP_NUM_THREADS=1 python benchmarks/handcrafted_speed.py --section C2 --n-jobs 2

Prints one JSON line: wall and CPU seconds of each (features.compute, tissue tiles, no
cache: ``$HISTOSR_CACHE_DIR`` is ignored), their wall ratio, the dims and the tissue
superpixels. CPU seconds / 2 bounds the wall time on 2 idle cores from below. Goal: the default under 60 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", default="C2")
    ap.add_argument("--data", default=None)
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--encoders", default="handcrafted:v1,handcrafted:v2")
    a = ap.parse_args(argv)

    import os
    import resource

    # "no cache": a shared $HISTOSR_CACHE_DIR would turn an encoder's second run into a read
    os.environ.pop("HISTOSR_CACHE_DIR", None)
    from histosr import features

    def cpu() -> float:
        return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF,
                   resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
    from histosr.benchmark.common import read_section

    s = read_section(a.data, a.section)
    row: dict = {"section": s.name, "image_px": list(s.image.shape[:2]),
                 "um_per_px": round(s.um_per_px, 4), "n_jobs": a.n_jobs}
    secs = []
    for enc in a.encoders.split(","):
        t, c = time.perf_counter(), cpu()
        fm = features.compute(s, encoder=enc, progress=False, n_jobs=a.n_jobs)
        secs.append(time.perf_counter() - t)
        row[enc] = {"seconds": round(secs[-1], 1), "cpu_seconds": round(cpu() - c, 1),
                    "dim": fm.dim,
                    "tissue_superpixels": int(fm.mask.sum())}
    if len(secs) == 2:
        row["ratio"] = round(secs[1] / secs[0], 2)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
