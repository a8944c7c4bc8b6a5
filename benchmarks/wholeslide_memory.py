"""Peak memory of ``features`` + ``predict`` on a synthetic whole slide (BENCHMARKS.md).

The slide is procedural: :class:`ProceduralSlide` renders any requested region from its
coordinates (hashed value noise for the tissue and tumour fields, evaluated per 16 px cell;
a small bank of pre-rendered texture tiles for stroma and nuclei), so no whole-slide array
ever exists and peak RSS measures the pipeline, not the test data. A Visium-like spot
lattice (55 um spots, 100 um pitch) over the tissue gets synthetic counts.

    nice python benchmarks/wholeslide_memory.py --size 40000 --out /tmp/wsm40k

prints one JSON line (sizes in MB, times in s). Goal: peak_rss_mb < 3072 at 30000 and 40000 px,
and not growing with ``--size``.

``--pipeline`` measures the real path instead: the stages of ``histosr run``
(:func:`histosr.pipeline.run` on the procedural section: features, fit, predict, score,
write ``prediction.h5ad`` / ``prediction_spots.h5ad`` / ``maps.zarr``, previews, report) with
istar (``--epochs`` x 1 state) and ``--genes`` (default 1000) genes, each size of ``--sizes``
in its own process so every peak is that size's own::

    nice python benchmarks/wholeslide_memory.py --pipeline --sizes 13000 20000 40000

prints one JSON line per size (peak RSS, per-stage peak RSS and seconds, output sizes),
then the knn / 20-gene ``features`` + ``predict_maps`` line of the smallest size as the
reference, then a summary line. Goal: peak_rss_mb < 3072 at every size, not growing with it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from histosr.image import ImageSource
from histosr.section import Section, make_counts

_M32 = np.uint64(0xFFFFFFFF)


def _hash01(iy, ix, seed: int) -> np.ndarray:
    """Deterministic uniform [0, 1) from integer lattice coordinates (broadcasting)."""
    h = (np.asarray(iy, np.int64).astype(np.uint64) * np.uint64(0x9E3779B1)
         + np.asarray(ix, np.int64).astype(np.uint64) * np.uint64(0x85EBCA77)
         + np.uint64(seed * 0xC2B2AE3D + 0x27D4EB2F)) & _M32
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & _M32
    h ^= h >> np.uint64(12)
    h = (h * np.uint64(0x297A2D39)) & _M32
    h ^= h >> np.uint64(15)
    return (h.astype(np.float64) / 2.0**32).astype(np.float32)


def value_noise(ys: np.ndarray, xs: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Smooth noise in [0, 1) on the (len(ys), len(xs)) grid of pixel coordinates."""
    fy, fx = ys / cell, xs / cell
    iy, ix = np.floor(fy).astype(np.int64), np.floor(fx).astype(np.int64)
    ty, tx = fy - iy, fx - ix
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)  # smoothstep
    iy, ix, ty, tx = iy[:, None], ix[None, :], ty[:, None].astype(np.float32), tx[None, :].astype(np.float32)
    a = _hash01(iy, ix, seed)
    b = _hash01(iy, ix + 1, seed)
    c = _hash01(iy + 1, ix, seed)
    d = _hash01(iy + 1, ix + 1, seed)
    return (a * (1 - tx) + b * tx) * (1 - ty) + (c * (1 - tx) + d * tx) * ty


class ProceduralSlide(ImageSource):
    """A synthetic H&E-like slide of ``size`` x ``size`` px rendered region by region.

    Fast by construction: the smooth fields (tissue and tumour scores, :meth:`fields`) are
    evaluated once per 16 x 16 px cell and repeated, and the pixel texture (stroma fibres,
    nuclei, pixel noise) is copied from a small bank of pre-rendered 256 x 256 px tiles
    chosen per 256 px block by the local tumour level (nuclear density) and a hashed
    variant. A read costs a few numpy copies per pixel, not ~20 hashes.
    """

    CELL = 16  # px: the fields are evaluated at the centre of each CELL x CELL cell
    BLOCK = 256  # px: texture tiles
    LEVELS = 6  # tumour levels (nuclear density) in the texture bank
    VARIANTS = 4  # texture tiles per level

    def __init__(self, size: int, seed: int = 0):
        self.size = int(size)
        self.seed = int(seed)
        self.cache_token = f"procedural-v2-{self.size}-{self.seed}"
        self._bank = None  # built lazily (and again after unpickling)

    def __getstate__(self):
        return {"size": self.size, "seed": self.seed, "cache_token": self.cache_token}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._bank = None

    @property
    def shape(self):
        return (self.size, self.size, 3)

    def fields(self, ys: np.ndarray, xs: np.ndarray):
        """(tissue score, tumour score) at pixel coordinates; tissue where score > 0."""
        s = self.size
        r2 = ((ys[:, None] - s / 2) ** 2 + (xs[None, :] - s / 2) ** 2) / (0.45 * s) ** 2
        big = value_noise(ys, xs, s / 6.0, self.seed)
        small = value_noise(ys, xs, 700.0, self.seed + 1)
        tissue = 0.7 * big + 0.3 * small - 0.45 * r2.astype(np.float32) - 0.15
        tumour = value_noise(ys, xs, 1500.0, self.seed + 2)
        return tissue, tumour

    def _texture(self, tumour: float, variant: int) -> np.ndarray:
        """One BLOCK x BLOCK uint8 tissue tile at a fixed tumour level (the v1 per-pixel
        recipe: stroma colour and fibres, nuclei one per 16 px cell, pixel noise)."""
        n = self.BLOCK
        off = 100_000 * (variant + 1)  # variants read different lattice coordinates
        ys = np.arange(off, off + n)
        xs = np.arange(off, off + n)
        pn = _hash01(ys[:, None], xs[None, :], self.seed + 3) - 0.5
        phase = 6.0 * tumour + variant
        fib = np.sin(ys[:, None] / 5.0 + xs[None, :] / 11.0 + phase).astype(np.float32)
        img = np.empty((n, n, 3), np.float32)
        stroma = np.array([226, 158, 190], np.float32)
        for k in range(3):
            img[..., k] = stroma[k] + 10 * fib - 25 * tumour * (k != 2)
        cy, cx = ys // 16, xs // 16
        keep = _hash01(cy[:, None], cx[None, :], self.seed + 4) < (0.15 + 0.6 * tumour)
        oy = 4 + 8 * _hash01(cy[:, None], cx[None, :], self.seed + 5)
        ox = 4 + 8 * _hash01(cy[:, None], cx[None, :], self.seed + 6)
        dy = (ys % 16)[:, None] - oy
        dx = (xs % 16)[None, :] - ox
        img[keep & (dy * dy + dx * dx < 16.0)] = np.array([80, 50, 140], np.float32)
        img += 12 * pn[..., None]
        return np.clip(img, 0, 255).astype(np.uint8)

    def bank(self) -> np.ndarray:
        """uint8 (LEVELS, VARIANTS, BLOCK, BLOCK, 3) texture tiles (~3.5 MB)."""
        if self._bank is None:
            lv = (np.arange(self.LEVELS) + 0.5) / self.LEVELS
            self._bank = np.stack([np.stack([self._texture(t, v) for v in range(self.VARIANTS)])
                                   for t in lv])
        return self._bank

    def _read(self, y0, x0, y1, x1):
        C, B = self.CELL, self.BLOCK
        bank = self.bank()
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        # texture: one bank tile per BLOCK, level from the tumour score at the block centre
        by = np.arange(y0 // B, (y1 - 1) // B + 1)
        bx = np.arange(x0 // B, (x1 - 1) // B + 1)
        _, tum = self.fields(by * B + B / 2.0, bx * B + B / 2.0)
        level = np.clip((tum * self.LEVELS).astype(int), 0, self.LEVELS - 1)
        var = (_hash01(by[:, None], bx[None, :], self.seed + 7) * self.VARIANTS).astype(int)
        for i, b_y in enumerate(by):
            ya, yb = max(y0, b_y * B), min(y1, (b_y + 1) * B)
            for j, b_x in enumerate(bx):
                xa, xb = max(x0, b_x * B), min(x1, (b_x + 1) * B)
                t = bank[level[i, j], var[i, j]]
                out[ya - y0: yb - y0, xa - x0: xb - x0] = \
                    t[ya - b_y * B: yb - b_y * B, xa - b_x * B: xb - b_x * B]
        # tissue mask: the tissue score per CELL, repeated to pixels
        cy = np.arange(y0 // C, (y1 - 1) // C + 1)
        cx = np.arange(x0 // C, (x1 - 1) // C + 1)
        tis, _ = self.fields(cy * C + C / 2.0, cx * C + C / 2.0)
        inside = np.repeat(np.repeat(tis > 0, C, axis=0), C, axis=1)
        inside = inside[y0 - cy[0] * C: y1 - cy[0] * C, x0 - cx[0] * C: x1 - cx[0] * C]
        out[~inside] = 243
        return out


def synthetic_section(size: int, um_per_px: float, n_genes: int, seed: int = 0) -> Section:
    img = ProceduralSlide(size, seed)
    pitch = 100.0 / um_per_px
    ys = np.arange(pitch / 2, size, pitch * np.sqrt(3) / 2)
    xy, rows, cols, tum = [], [], [], []
    for i, y in enumerate(ys):  # hexagonal Visium-like lattice over the tissue
        xs = np.arange(pitch / 2 + (pitch / 2) * (i % 2), size, pitch)
        t, u = img.fields(np.array([y]), xs)
        for j in np.flatnonzero(t[0] > 0):
            xy.append((xs[j], y))
            rows.append(i)
            cols.append(2 * int(round((xs[j] - pitch / 2) / pitch)) + i % 2)
            tum.append(u[0, j])
    xy, tum = np.asarray(xy, float), np.asarray(tum, float)
    rng = np.random.default_rng(seed)
    load = rng.normal(0, 1, n_genes)
    X = np.empty((len(xy), n_genes), np.float32)
    for a in range(0, len(xy), 2048):  # blocks of spots: no (spots x genes) float64 rates
        rate = np.exp(1.5 + np.outer(tum[a : a + 2048] - 0.5, 3 * load))
        X[a : a + 2048] = rng.poisson(rate)
    import pandas as pd

    obs = pd.DataFrame({"array_row": rows, "array_col": cols})
    counts = make_counts(X, [f"s{i}" for i in range(len(xy))], [f"g{k}" for k in range(n_genes)],
                         xy, obs=obs)
    return Section(f"synthetic{size}", img, um_per_px, counts, 55.0, "visium")


def _mb_on_disk(path: Path) -> float:
    if not path.exists():
        return 0.0
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux


def run_pipeline(args) -> dict:
    """One size through :func:`histosr.pipeline.run` (this process): peak RSS per stage."""
    from histosr.pipeline import run

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    section = synthetic_section(args.size, args.um_per_px, args.genes)
    t_sec = time.perf_counter() - t0
    rss_section = _peak_rss_mb()
    cfg = {"section": {"path": f"procedural:{args.size}"},
           "method": {"name": "istar", "params": {"epochs": args.epochs, "n_states": 1}},
           "genes": {"n_top": args.genes, "min_frac": 0.0},
           "predict": {"n_previews": 2}, "seed": 0}
    t0 = time.perf_counter()
    rep = run(cfg, out=out / "run", progress=args.progress, section=section)
    wall = time.perf_counter() - t0
    files = {k: round(_mb_on_disk(out / "run" / k), 1)
             for k in ("prediction.h5ad", "prediction_spots.h5ad", "maps.zarr", "model")}
    res = {"mode": "pipeline", "size_px": args.size, "um_per_px": args.um_per_px,
           "n_spots": section.n_spots, "genes": args.genes, "method": "istar",
           "epochs": args.epochs, "n_superpixels": rep.outputs.get("n_superpixels"),
           "seconds_section": round(t_sec, 2), "seconds_run": round(wall, 2),
           "peak_rss_mb_section": round(rss_section, 1),
           "stage_seconds": rep.timings, "stage_peak_rss_mb": rep.stage_rss_mb,
           "outputs_mb_on_disk": files, "peak_rss_mb": round(_peak_rss_mb(), 1),
           "goal_peak_rss_mb": 3072}
    res["ok"] = res["peak_rss_mb"] < 3072
    shutil.rmtree(out, ignore_errors=True)  # the outputs of a 40,000 px slide are GBs
    return res


def pipeline_sizes(args) -> bool:
    """Each size in its own process (peak RSS is per process), then the knn reference."""
    import subprocess

    lines = []
    base = [sys.executable, __file__, "--um-per-px", str(args.um_per_px),
            "--tile-sp", str(args.tile_sp)]
    for size in args.sizes:
        cmd = base + ["--pipeline", "--size", str(size), "--genes", str(args.genes),
                      "--epochs", str(args.epochs), "--out", f"{args.out}/p{size}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode not in (0, 1):
            raise RuntimeError(f"size {size} failed:\n{r.stderr[-3000:]}")
        lines.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(lines[-1]), flush=True)  # stage peaks and output sizes per size
    ref = subprocess.run(base + ["--size", str(min(args.sizes)), "--genes", "20",
                                 "--out", f"{args.out}/knn"], capture_output=True, text=True)
    if ref.returncode not in (0, 1):
        raise RuntimeError(f"knn reference failed:\n{ref.stderr[-3000:]}")
    print(ref.stdout.strip().splitlines()[-1], flush=True)
    peaks = [r["peak_rss_mb"] for r in lines]
    summary = {"summary": "pipeline", "sizes": list(args.sizes), "peak_rss_mb": peaks,
               "n_superpixels": [r["n_superpixels"] for r in lines],
               "growth_largest_vs_smallest": round(peaks[-1] / peaks[0], 3),
               "goal_peak_rss_mb": 3072, "ok": max(peaks) < 3072}
    print(json.dumps(summary), flush=True)
    return summary["ok"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=30000, help="slide side in px")
    ap.add_argument("--um-per-px", type=float, default=0.5)
    ap.add_argument("--genes", type=int, default=None,
                    help="genes (default 20; 1000 with --pipeline)")
    ap.add_argument("--out", default="wholeslide_memory_out")
    ap.add_argument("--tile-sp", type=int, default=64)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--pipeline", action="store_true",
                    help="measure the histosr run stages (istar, --genes genes) instead")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="with --pipeline: several sizes, each in its own process")
    ap.add_argument("--epochs", type=int, default=2, help="istar epochs with --pipeline")
    args = ap.parse_args(argv)
    if args.genes is None:
        args.genes = 1000 if args.pipeline else 20
    if args.pipeline and args.sizes:
        return {"ok": pipeline_sizes(args)}
    if args.pipeline:
        res = run_pipeline(args)
        print(json.dumps(res), flush=True)
        return res

    import psutil

    from histosr.features import compute

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    section = synthetic_section(args.size, args.um_per_px, args.genes)
    t_sec = time.perf_counter() - t0
    fpath = out / "features.zarr"
    shutil.rmtree(fpath, ignore_errors=True)
    t0 = time.perf_counter()
    fm = compute(section, out=fpath, tile_sp=args.tile_sp, progress=args.progress)
    t_feat = time.perf_counter() - t0
    rss_features = _peak_rss_mb()
    res = {
        "size_px": args.size, "um_per_px": args.um_per_px, "grid_sp": list(fm.shape),
        "n_spots": section.n_spots, "genes": args.genes, "encoder": fm.encoder,
        "dim": fm.dim, "tissue_fraction": round(float(fm.mask.mean()), 4),
        "seconds_section": round(t_sec, 2), "seconds_features": round(t_feat, 2),
        "features_mb_on_disk": round(_mb_on_disk(fpath), 2),
        "peak_rss_mb_after_features": round(rss_features, 1),
    }
    mpath = out / "maps.zarr"
    try:
        from histosr.methods import get_method
        from histosr.outputs import predict_maps

        shutil.rmtree(mpath, ignore_errors=True)
        t0 = time.perf_counter()
        method = get_method("knn")
        method.fit([section], [fm])
        predict_maps(method, section, fm, mpath)
        res["seconds_predict"] = round(time.perf_counter() - t0, 2)
        res["maps_mb_on_disk"] = round(_mb_on_disk(mpath), 2)
    except ImportError as e:
        res["seconds_predict"] = None
        res["maps_mb_on_disk"] = None
        res["predict_skipped"] = f"{type(e).__name__}: {e}"
    res["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    res["rss_now_mb_psutil"] = round(psutil.Process(os.getpid()).memory_info().rss / 2**20, 1)
    res["goal_peak_rss_mb"] = 3072
    res["ok"] = res["peak_rss_mb"] < 3072
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
