"""Peak memory and time of ``histosr.tl.interactions`` on a whole-slide superpixel output.

A synthetic super-resolved prediction of a Visium-sized slide (``--size`` px square at
0.5 um/px, one observation per 8 um tissue superpixel, ``--genes`` genes, dense float32
``X``) is streamed into an h5ad file chunk by chunk, so no whole matrix ever exists in this
process. ``--lr-genes`` of the genes carry the names of genes of LIANA's consensus resource
(seeded choice), the rest are fillers; every gene follows a smooth field with its own
loading plus noise. Then, each in its own process:

- reference: ``anndata.read_h5ad(path)`` (the whole prediction in memory), peak RSS;
- analysis: ``histosr.tl.interactions`` on ``anndata.read_h5ad(path, backed="r")`` with
  ``--n-perms`` permutations, peak RSS and time.

    OMP_NUM_THREADS=1 python benchmarks/interactions_memory.py --size 13000 --out /tmp/iam

prints one JSON line (MB, s), with ``rss_ratio`` = analysis peak / reference peak.
Goal: ``analysis_peak_rss_mb`` < 3072 at 13000 px and 1000 genes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def write_prediction(path: Path, size: int, n_genes: int, n_lr: int, seed: int = 0) -> dict:
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    from histosr.interactions import measured_pairs, resource_table

    rng = np.random.default_rng(seed)
    n = size // 16  # superpixels per side
    r, c = np.mgrid[0:n, 0:n]
    # an irregular blob of tissue (~65 % of the slide)
    yy, xx = (r + 0.5) / n - 0.5, (c + 0.5) / n - 0.5
    wob = 0.04 * np.sin(9 * np.arctan2(yy, xx))
    tissue = (xx / 0.46) ** 2 + (yy / 0.44) ** 2 < (1 + wob) ** 2
    r, c = r[tissue].astype(np.int32), c[tissue].astype(np.int32)
    res = resource_table("consensus")
    pool = sorted({g for n_ in pd.concat([res["ligand"], res["receptor"]]) for g in n_.split("_")})
    lr = list(rng.choice(pool, size=min(n_lr, len(pool)), replace=False))
    genes = lr + [f"FILLER{i}" for i in range(n_genes - len(lr))]
    xy = np.stack([(c + 0.5) * 16.0, (r + 0.5) * 16.0], axis=1)
    n_obs = len(r)
    base = rng.gamma(2.0, 0.05, n_genes).astype(np.float32)  # counts per superpixel per gene
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        X = f.create_dataset("X", shape=(n_obs, n_genes), dtype="f4",
                             chunks=(min(4096, n_obs), n_genes))
        X.attrs["encoding-type"] = "array"
        X.attrs["encoding-version"] = "0.2.0"
        step = 8192
        for a in range(0, n_obs, step):
            b = min(a + step, n_obs)
            # a smooth low-rank field plus noise: every gene has some spatial structure
            f1 = np.sin(xy[a:b, 0:1] / 900.0) * np.cos(xy[a:b, 1:2] / 700.0)
            rate = base[None, :] * np.exp(0.5 * f1 * rng.normal(0, 1, (1, n_genes))
                                          .astype(np.float32))
            X[a:b] = rng.gamma(4.0, rate / 4.0).astype(np.float32)
        obs = pd.DataFrame({"row": r, "col": c},
                           index=pd.Index([f"{i}_{j}" for i, j in zip(r, c)]))
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=pd.Index(genes)))
        write_elem(f, "obsm", {"spatial": xy})
        write_elem(f, "uns", {"histosr": {"um_per_px": 0.5, "superpixel_um": 8.0,
                                          "grid_shape": [n, n], "method": "synthetic"}})
        for k in ("varm", "obsp", "varp", "layers"):
            write_elem(f, k, {})
    ad.read_h5ad(path, backed="r").file.close()  # readable as an AnnData
    return {"n_superpixels": int(n_obs), "genes": n_genes, "lr_genes": len(lr),
            "pairs_measured": int(len(measured_pairs(res, genes))),
            "h5ad_mb": round(path.stat().st_size / 2**20, 1)}


def _child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# VmHWM (this process image's peak RSS; ru_maxrss would include the parent's from before exec)
_PEAK = """
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""

_REFERENCE = _PEAK + """
import json, time, anndata as ad
t = time.perf_counter(); a = ad.read_h5ad({path!r})
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_mb": peak_mb()}}))
"""

_ANALYSIS = _PEAK + """
import json, time, anndata as ad
import histosr.tl as tl
a = ad.read_h5ad({path!r}, backed="r")
t = time.perf_counter()
g = tl.interactions(a, n_perms={n_perms}, seed=0)
p = a.uns["interactions"]["params"]
print(json.dumps({{"seconds": time.perf_counter() - t,
                  "peak_rss_mb": peak_mb(), "pairs_tested": len(g), "top_pair": g.index[0], "top_q": float(g["qval"].iloc[0]),
                  "n_units": p["n_units"], "bin_um": p["bin_um"]}}))
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=13000, help="slide side in px (0.5 um/px)")
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--lr-genes", type=int, default=200)
    ap.add_argument("--n-perms", type=int, default=1000)
    ap.add_argument("--out", default="interactions_memory_out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prediction.h5ad"
    t0 = time.perf_counter()
    res = {"size_px": args.size, **write_prediction(path, args.size, args.genes, args.lr_genes),
           "seconds_write": round(time.perf_counter() - t0, 1)}
    ref = _child(_REFERENCE.format(path=str(path)))
    ana = _child(_ANALYSIS.format(path=str(path), n_perms=args.n_perms))
    res.update({"reference_read_peak_rss_mb": round(ref["peak_rss_mb"], 1),
                "analysis_peak_rss_mb": round(ana["peak_rss_mb"], 1),
                "analysis_seconds": round(ana["seconds"], 1),
                "rss_ratio": round(ana["peak_rss_mb"] / ref["peak_rss_mb"], 3),
                "n_perms": args.n_perms,
                **{k: ana[k] for k in ("pairs_tested", "top_pair", "top_q", "n_units", "bin_um")},
                "goal_peak_rss_mb": 3072})
    res["ok"] = res["analysis_peak_rss_mb"] < 3072
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
