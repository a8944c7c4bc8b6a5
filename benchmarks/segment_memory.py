"""Peak memory and time of nucleus + cell segmentation on a synthetic whole slide.

The slide is procedural (:class:`NucleiSlide`: rendered region by region from its
coordinates, no whole-slide array ever exists): tissue where a smooth value-noise field is
positive, and round nuclei (3-4 um radius) on a jittered 12 um lattice, present with a
probability that follows a second smooth field, so the planted count is known exactly.

Each size runs :func:`histosr.segment.segment` (classical segmenter, labels to a zarr
folder) in its own process, so peak RSS is per size. In the same run, as references:

* the same segmentation of a ``--ref-size`` slide (default 10,000 px): memory must not grow
  with the slide (``rss_ratio_vs_ref`` ~ 1) and time per tissue megapixel should not either;
* a pass that only reads the same tiles (``read_only_seconds``): what the image I/O and the
  0.5 um/px resampling cost, so ``seconds / read_only_seconds`` is the segmentation's own
  cost on this machine.

    nice python benchmarks/segment_memory.py --size 40000 --out /tmp/segmem

prints one JSON line per size, then a summary line. Goal: peak_rss_mb < 3072 at 40,000 px.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wholeslide_memory import _hash01, value_noise  # noqa: E402

from histosr.image import ImageSource  # noqa: E402


class NucleiSlide(ImageSource):
    """Synthetic H&E: pink tissue with purple round nuclei on a jittered lattice, grey-white
    background. ``um_per_px`` sets the physical size of the nuclei (3-4 um radius) and of the
    12 um lattice. Levels 1 and 2 (x4, x16) sample the same picture at their pixel centres."""

    PITCH_UM = 12.0

    def __init__(self, size: int, um_per_px: float = 0.5, seed: int = 0):
        self.size, self.um, self.seed = int(size), float(um_per_px), int(seed)
        self.cache_token = f"nuclei-slide-v2-{self.size}-{self.um}-{self.seed}"
        self.pitch = self.PITCH_UM / self.um

    @property
    def shape(self):
        return (self.size, self.size, 3)

    def _fields(self, ys, xs):
        s = self.size
        r2 = ((ys[:, None] - s / 2) ** 2 + (xs[None, :] - s / 2) ** 2) / (0.47 * s) ** 2
        tissue = 0.8 * value_noise(ys, xs, s / 5.0, self.seed) - 0.5 * r2.astype(np.float32) \
            + 0.05
        dens = value_noise(ys, xs, 2000.0 / self.um, self.seed + 1)
        return tissue, dens

    def _lattice(self, iy, ix):
        """(present, cy, cx, radius) of lattice cells (broadcast integer arrays), px."""
        p = self.pitch
        jy = (_hash01(iy, ix, self.seed + 2) - 0.5) * 0.25 * p
        jx = (_hash01(iy, ix, self.seed + 3) - 0.5) * 0.25 * p
        cy, cx = (iy + 0.5) * p + jy, (ix + 0.5) * p + jx
        rad = (3.0 + _hash01(iy, ix, self.seed + 4)) / self.um
        tis, dens = self._fields(np.atleast_1d((iy[:, 0] + 0.5) * p),
                                 np.atleast_1d((ix[0, :] + 0.5) * p))
        present = (tis > 0) & (_hash01(iy, ix, self.seed + 5) < 0.3 + 0.6 * dens)
        return present, cy, cx, rad

    def planted(self, band: int = 256) -> int:
        """Number of nuclei on the slide (lattice cells with a nucleus)."""
        n = int(np.ceil(self.size / self.pitch))
        total = 0
        ix = np.arange(n)[None, :]
        for r0 in range(0, n, band):
            iy = np.arange(r0, min(r0 + band, n))[:, None]
            present, cy, cx, rad = self._lattice(iy + 0 * ix, ix + 0 * iy)
            # a nucleus counts when its centre lies inside the slide
            total += int((present & (cy < self.size) & (cx < self.size)).sum())
        return total

    # a pyramid (x1, x4, x16), as real slides have: tissue detection reads a coarse level
    @property
    def level_downsamples(self):
        return (1.0, 4.0, 16.0)

    def level_shape(self, level):
        n = int(np.ceil(self.size / self.level_downsamples[level]))
        return (n, n)

    def _read_level(self, level, y0, x0, y1, x1):
        ds = self.level_downsamples[level]
        return self._render((np.arange(y0, y1) + 0.5) * ds, (np.arange(x0, x1) + 0.5) * ds)

    def _read(self, y0, x0, y1, x1):
        return self._render(np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5)

    def _render(self, ys, xs):
        """RGB uint8 at level-0 pixel centres ``ys`` x ``xs`` (sorted): the tissue field per
        16 px block, nuclei from their lattice cells, pixel noise."""
        def blocks(v):
            b = np.floor(v / 16).astype(np.int64)
            u, inv = np.unique(b, return_inverse=True)
            return (u + 0.5) * 16, inv

        by, iby = blocks(ys)
        bx, ibx = blocks(xs)
        tis, _ = self._fields(by, bx)
        inside = (tis > 0)[iby][:, ibx]
        noise = _hash01(np.floor(ys).astype(np.int64)[:, None],
                        np.floor(xs).astype(np.int64)[None, :], self.seed + 6)
        img = np.empty((len(ys), len(xs), 3), np.float32)
        img[...] = (236, 160, 196)
        img[~inside] = (243, 243, 245)
        iy = np.floor(ys / self.pitch).astype(np.int64)
        ix = np.floor(xs / self.pitch).astype(np.int64)
        uy, inv_y = np.unique(iy, return_inverse=True)
        ux, inv_x = np.unique(ix, return_inverse=True)
        present, cy, cx, rad = self._lattice(uy[:, None] + 0 * ux[None, :],
                                             ux[None, :] + 0 * uy[:, None])
        P, CY, CX, R = (a[inv_y][:, inv_x] for a in (present, cy, cx, rad))
        nuc = P & ((ys[:, None] - CY) ** 2 + (xs[None, :] - CX) ** 2 <= R * R)
        img[nuc] = (78, 44, 130)
        img += (noise[..., None] - 0.5) * 16.0
        return np.clip(img, 0, 255).astype(np.uint8)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one(size: int, um: float, out: Path, read_only: bool) -> dict:
    """Segment one slide (this process); with ``read_only`` also time reading its tiles."""
    from histosr.geometry import Grid, read_calibrated
    from histosr.segment import _on_tissue, _tissue_mask, segment

    slide = NucleiSlide(size, um)
    res = {"size_px": size, "um_per_px": um}
    t0 = time.perf_counter()
    res["planted_nuclei"] = slide.planted()
    res["planted_seconds"] = round(time.perf_counter() - t0, 1)
    path = out / f"seg{size}.zarr"
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    seg = segment(slide, um, out=path, progress=False)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    res["found_nuclei"] = seg.n_nuclei
    res["found_over_planted"] = round(seg.n_nuclei / max(res["planted_nuclei"], 1), 4)
    grid = Grid(um, (size, size))
    H, W = grid.calibrated_shape
    tile = int(round(seg.info["tile_um"] / 0.5))
    margin = int(np.ceil(seg.info["margin_um"] / 0.5))
    mask = _tissue_mask(slide, slide, um)
    tiles = [(y, x) for y in range(0, H, tile) for x in range(0, W, tile)
             if _on_tissue(mask, y, x, tile, margin)]
    res["tiles"] = len(tiles)
    res["tissue_mpx"] = round(len(tiles) * tile * tile / 1e6, 1)
    res["seconds_per_tissue_mpx"] = round(res["seconds"] / res["tissue_mpx"], 4)
    res["labels_mb_on_disk"] = round(sum(f.stat().st_size for f in path.rglob("*")
                                         if f.is_file()) / 2**20, 1)
    if read_only:
        t0 = time.perf_counter()
        for y, x in tiles:
            read_calibrated(slide, um, y - margin, x - margin, tile + 2 * margin,
                            tile + 2 * margin)
        res["read_only_seconds"] = round(time.perf_counter() - t0, 1)
        res["seconds_over_read_only"] = round(res["seconds"] / max(res["read_only_seconds"],
                                                                    1e-9), 2)
    shutil.rmtree(path, ignore_errors=True)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40000, help="slide side in px")
    ap.add_argument("--ref-size", type=int, default=10000, help="reference slide side in px")
    ap.add_argument("--um-per-px", type=float, default=0.5)
    ap.add_argument("--out", default="segment_memory_out")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        res = one(args.one, args.um_per_px, out, read_only=True)
        print(json.dumps(res), flush=True)
        return res
    rows = []
    for size in (args.ref_size, args.size):
        r = subprocess.run([sys.executable, __file__, "--one", str(size), "--um-per-px",
                            str(args.um_per_px), "--out", str(out)], capture_output=True,
                           text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    ref, big = rows
    summary = {"size_px": big["size_px"], "ref_size_px": ref["size_px"],
               "peak_rss_mb": big["peak_rss_mb"], "ref_peak_rss_mb": ref["peak_rss_mb"],
               "rss_ratio_vs_ref": round(big["peak_rss_mb"] / ref["peak_rss_mb"], 3),
               "seconds": big["seconds"],
               "time_per_mpx_ratio_vs_ref": round(big["seconds_per_tissue_mpx"]
                                                  / ref["seconds_per_tissue_mpx"], 3),
               "seconds_over_read_only": big["seconds_over_read_only"],
               "found_over_planted": big["found_over_planted"],
               "goal_peak_rss_mb": 3072, "ok": big["peak_rss_mb"] < 3072}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)
