"""Before / after the smooth consistency factor field (issue #20, item 8).

Fits a super-resolution method on a her2st section WITHOUT consistency, then applies the
mass-preserving step two ways to the same raw map: the previous rule (every superpixel takes
the factor of the spot owning the nearest footprint disk: spot-pitch blocks) and the current
one (factors interpolated between footprints). Prints one JSON line: the roughness of each
factor field (mean absolute difference of log factors between 4-neighbouring tissue
superpixels) and its largest steps (99.9th percentile: block borders), their ratios new / old, the largest footprint-sum error of each (both must be
exact), and writes ``consistency_field.png`` (raw | previous | current, per gene).

    python benchmarks/consistency_field.py --section C2 --method istar --epochs 100 \
        --genes ERBB2,COL1A1 --out bench_out/consistency_field
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def steps(field: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape) -> np.ndarray:
    """|log f(a) - log f(b)| over 4-neighbouring tissue superpixel pairs (all genes)."""
    grid = np.full((*shape, field.shape[1]), np.nan, dtype=np.float64)
    grid[rows, cols] = np.log(np.maximum(field, 1e-12))
    d = [np.abs(grid[1:] - grid[:-1]), np.abs(grid[:, 1:] - grid[:, :-1])]
    return np.concatenate([x[np.isfinite(x)] for x in d])


def main(argv=None) -> dict:
    import histosr as hs
    from histosr.consistency import ConsistencyScaler
    from histosr.geometry import section_footprints
    from histosr.pl import _plt

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--section", default="C2")
    ap.add_argument("--method", default="istar")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--genes", default="ERBB2,COL1A1")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from histosr.datasets import data_dir

    root = Path(a.data) if a.data else data_dir() / "her2st"
    sec = hs.read_her2st(root, a.section)
    fm = hs.features(sec, progress=False)
    show = [g for g in a.genes.split(",") if g]
    params = {"epochs": a.epochs, "n_states": 1} if a.method in ("istar", "histex",
                                                                 "deephex") else {}
    m = hs.fit(sec, fm, method=a.method, genes=hs.pp.select_genes(sec, 200, include=show),
               progress=False, **params)
    r, c = fm.tissue_cells()
    cells = fm.grid.flat(r, c)
    raw = m.predict_cells(sec, fm, cells, consistency=False)
    new = ConsistencyScaler.from_method(m, sec, fm)
    old = ConsistencyScaler(new.grid, new.footprints, new.factors, new.floor)  # nearest owner
    F = section_footprints(sec, fm.grid)
    fp = np.unique(F.indices)
    measured = sec.dense_counts(m.genes_)
    out = {"section": a.section, "method": a.method, "genes": len(m.genes_),
           "tissue_superpixels": int(len(cells))}
    maps = {}
    for name, sc in (("previous", old), ("current", new)):
        d = steps(sc.field(cells), r, c, fm.grid.shape)
        out[f"roughness_{name}"] = round(float(d.mean()), 5)
        # a block border is a step: the largest neighbour-to-neighbour change of the field
        out[f"step_p999_{name}"] = round(float(np.quantile(d, 0.999)), 4)
        sums = np.asarray(F[:, fp] @ sc.apply(m._predict_cells(sec, fm, fp), fp))
        out[f"max_rel_sum_error_{name}"] = float(
            np.max(np.abs(sums - measured) / np.maximum(measured, 1.0)))
        maps[name] = sc.apply(raw, cells)
    for k in ("roughness", "step_p999"):
        out[f"{k}_ratio_current_over_previous"] = round(
            out[f"{k}_current"] / out[f"{k}_previous"], 4)
    plt = _plt()
    fig, axes = plt.subplots(len(show), 3, figsize=(13, 4.3 * len(show)), squeeze=False)
    H, W = fm.grid.shape
    for i, g in enumerate(show):
        j = m.genes_.index(g)
        for k, (title, vals) in enumerate((("raw (no consistency)", raw), ("previous: nearest "
                                           "spot's factor", maps["previous"]),
                                           ("current: interpolated factor", maps["current"]))):
            img = np.full((H, W), np.nan)
            img[r, c] = np.log1p(vals[:, j])
            ax = axes[i, k]
            ax.imshow(img, cmap="magma", interpolation="nearest")
            ax.set_ylim(r.max() + 2, r.min() - 2)
            ax.set_xlim(c.min() - 2, c.max() + 2)
            ax.set_title(f"{g}: {title}", fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    fig.savefig(outdir / "consistency_field.png", dpi=80)
    out["png"] = str(outdir / "consistency_field.png")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
