"""Peak memory and time of ``histosr predict --model M --image SLIDE.svs`` on a synthetic
pyramidal whole slide (100,000 x 80,000 px by default), against a small slide of the same
kind predicted the same way in the same run (the reference).

1. The slide is written tile by tile with tifffile (:func:`histosr.slide.write_pyramidal_tiff`:
   Aperio SVS layout, JPEG tiles, levels x1/x4/x16/x64, ``MPP = 0.25`` in the description)
   from a procedural H&E-like source (``wholeslide_memory.ProceduralSlide``'s texture bank,
   an elliptical tissue field), so neither the writer nor the reader ever holds the slide.
2. A spot-level model: ``--model DIR`` or, if absent, ``histosr fit <her2st> --name C2,C3,C4
   --method ridge --n-genes 1000`` (real data from ``$HISTOSR_DATA`` / ``../shared/data``).
3. Each slide write and each ``histosr predict`` runs in its own process (no
   ``--um-per-px``: the pixel size comes from the slide's metadata); the child reports its
   own peak RSS (``VmHWM``; ``ru_maxrss`` would include the parent's RSS at fork time).
   An existing slide file is reused (delete it to time the writer again).

    OMP_NUM_THREADS=1 python benchmarks/wholeslide_predict.py --out /tmp/wsp

prints one JSON line: sizes, spots, seconds, peak RSS (MB) of the big and the reference
slide, and their ratios (peak RSS ratio ~1 means memory does not grow with the slide).
Goal: big-slide peak RSS < 3072 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wholeslide_memory import ProceduralSlide  # noqa: E402


class RectSlide(ProceduralSlide):
    """:class:`ProceduralSlide` on an H x W px canvas with an elliptical tissue field."""

    def __init__(self, height: int, width: int, seed: int = 0):
        super().__init__(max(height, width), seed)
        self.h, self.w = int(height), int(width)
        self.cache_token = f"rect-v1-{self.h}x{self.w}-{self.seed}"

    def __getstate__(self):
        return {**super().__getstate__(), "h": self.h, "w": self.w}

    @property
    def shape(self):
        return (self.h, self.w, 3)

    def fields(self, ys, xs):
        from wholeslide_memory import value_noise

        r2 = (((ys[:, None] - self.h / 2) / (0.45 * self.h)) ** 2
              + ((xs[None, :] - self.w / 2) / (0.45 * self.w)) ** 2)
        s = max(self.h, self.w)
        big = value_noise(ys, xs, s / 6.0, self.seed)
        small = value_noise(ys, xs, 700.0, self.seed + 1)
        tissue = 0.7 * big + 0.3 * small - 0.45 * r2.astype(np.float32) - 0.15
        tumour = value_noise(ys, xs, 1500.0, self.seed + 2)
        return tissue, tumour


def write_slide(path: Path, height: int, width: int, um_per_px: float, progress: bool) -> None:
    from histosr.slide import write_pyramidal_tiff

    write_pyramidal_tiff(RectSlide(height, width), path, um_per_px=um_per_px, kind="svs",
                         downsamples=(1, 4, 16, 64), tile=256, compression="jpeg",
                         quality=85, tmp_dir=path.parent, progress=progress)


def peak_rss_mb() -> float:
    """This process's own peak RSS: ``VmHWM`` of /proc/self/status. (``ru_maxrss`` is kept
    across fork + exec, so a child would report its parent's RSS at fork time when that is
    larger: after writing a slide, the parent's memory-mapped level buffers.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(argv: list[str]) -> None:
    """Run one CLI command (or ``write-slide``) in this process; print its peak RSS and
    wall time."""
    t0 = time.perf_counter()
    if argv[0] == "write-slide":
        path, h, w, um = argv[1], int(argv[2]), int(argv[3]), float(argv[4])
        rc = 0
        write_slide(Path(path), h, w, um, progress=False)
    else:
        from histosr.cli import main

        rc = main(argv)
    print("CHILD " + json.dumps({"rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                                 "peak_rss_mb": round(peak_rss_mb(), 1)}), flush=True)


def run_child(argv: list[str]) -> dict:
    p = subprocess.run([sys.executable, __file__, "--_child", *argv], capture_output=True,
                       text=True, env=os.environ.copy())
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("CHILD ")]
    if p.returncode or not lines:
        raise SystemExit(f"child failed ({p.returncode}): {' '.join(argv)}\n{p.stdout}\n"
                         f"{p.stderr[-3000:]}")
    res = json.loads(lines[-1][6:])
    res["stdout"] = [ln for ln in p.stdout.splitlines() if not ln.startswith("CHILD ")][-1:]
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=100_000)
    ap.add_argument("--height", type=int, default=80_000)
    ap.add_argument("--ref-scale", type=float, default=0.1,
                    help="reference slide side = this fraction of the big one's")
    ap.add_argument("--um-per-px", type=float, default=0.25)
    ap.add_argument("--pitch-um", type=float, default=200.0,
                    help="spot lattice pitch (her2st's legacy ST lattice: 200 um)")
    ap.add_argument("--model", help="spot-level model folder (default: fit ridge on her2st)")
    ap.add_argument("--genes", default="ERBB2,GRB7,IGKC,COL1A1")
    ap.add_argument("--out", default="wholeslide_predict_out")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"width": args.width, "height": args.height, "um_per_px": args.um_per_px,
                 "pitch_um": args.pitch_um}
    model = args.model
    if not model:
        from histosr.datasets import data_dir

        d = data_dir()
        if d is None:
            raise SystemExit("no real data: pass --model or set HISTOSR_DATA")
        model = str(out / "fit" / "model")
        if not Path(model).exists():
            r = run_child(["--quiet", "fit", str(d / "her2st"), "--reader", "her2st",
                           "--name", "C2,C3,C4", "--method", "ridge", "--n-genes", "1000",
                           "--out", str(out / "fit")])
            res["fit"] = {k: r[k] for k in ("seconds", "peak_rss_mb")}
    res["model"] = model
    runs = {"ref": (int(args.height * args.ref_scale), int(args.width * args.ref_scale)),
            "big": (args.height, args.width)}
    for name, (h, w) in runs.items():
        slide = out / f"slide_{w}x{h}.svs"
        info = {}
        if not slide.exists():  # written in a child too: its own peak RSS and time
            r = run_child(["write-slide", str(slide), str(h), str(w), str(args.um_per_px)])
            info = {"seconds_write": r["seconds"], "peak_rss_mb_write": r["peak_rss_mb"]}
        info["mb_on_disk"] = round(slide.stat().st_size / 2**20, 1)
        pred = out / f"pred_{name}"
        r = run_child(["--quiet", "predict", "--model", model, "--image", str(slide),
                       "--pitch-um", str(args.pitch_um), "--genes", args.genes,
                       "--out", str(pred)])
        import anndata as ad

        a = ad.read_h5ad(pred / "prediction.h5ad", backed="r")
        res[name] = {"size_px": [w, h], **info, "n_spots": int(a.n_obs),
                     "n_genes": int(a.n_vars), "seconds_predict": r["seconds"],
                     "peak_rss_mb": r["peak_rss_mb"],
                     "previews": sorted(p.name for p in (pred / "previews").glob("*.png"))}
        a.file.close()
    big, ref = res["big"], res["ref"]
    res["ratio_peak_rss_big_over_ref"] = round(big["peak_rss_mb"] / ref["peak_rss_mb"], 3)
    res["ratio_pixels_big_over_ref"] = round((args.width * args.height) / (
        ref["size_px"][0] * ref["size_px"][1]), 1)
    res["ratio_seconds_per_spot_big_over_ref"] = round(
        (big["seconds_predict"] / big["n_spots"]) / (ref["seconds_predict"] / ref["n_spots"]), 3)
    res["goal_peak_rss_mb"] = 3072
    res["ok"] = big["peak_rss_mb"] < 3072
    print(json.dumps(res), flush=True)
    return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        child(sys.argv[2:])
        sys.exit(0)
    sys.exit(0 if main()["ok"] else 1)
