"""End-to-end ``histosr run`` on a Visium-sized synthetic section: wall time and peak RSS per
stage, per method (issue: real-slide scale).

The section is :func:`wholeslide_memory.synthetic_section`: one procedural H&E slide of
``--size`` px at 0.5 um/px (13,000 px = 6.5 mm, one Visium capture area), spots on the Visium
lattice (55 um, 100 um pitch) over the tissue, ``--genes`` genes. Each method runs in its own
process (so each peak is its own) through :func:`histosr.pipeline.run` with its published
settings (``epochs`` x ``n_states`` defaults), or ``--epochs-fraction`` of its epochs on a CPU
that cannot afford them: the fit time is then also given scaled to the published epochs
(``fit_s_published_est``, linear in epochs; features and outputs do not depend on them).
The matrix-multiply probe of the same process is printed with each line, so times measured
on a busy machine can be compared::

    python benchmarks/visium_table.py --methods istar histex deephex --epochs-fraction 0.05
    python benchmarks/visium_table.py --device cuda --precision bf16        # on a GPU

prints one JSON line per method, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(args) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from wholeslide_memory import _mb_on_disk, _peak_rss_mb, synthetic_section

    from histosr.methods.base import method_class
    from histosr.pipeline import run

    cls = method_class(args.method)
    fields = {f: getattr(cls, f) for f in ("epochs", "n_states") if hasattr(cls, f)}
    params = {"device": args.device}
    if "epochs" in fields:
        params["epochs"] = max(1, round(fields["epochs"] * args.epochs_fraction))
    if args.precision and "precision" in cls.param_names():
        params["precision"] = args.precision
    from histosr.benchmark.speed import matmul_probe

    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available()
                                                     else "cpu")
    probe = matmul_probe(dev) / 1e9
    t0 = time.perf_counter()
    section = synthetic_section(args.size, 0.5, args.genes)
    t_sec = time.perf_counter() - t0
    out = Path(args.out) / args.method
    cfg = {"section": {"path": f"procedural:{args.size}"},
           "method": {"name": args.method, "params": params},
           "genes": {"n_top": args.genes, "min_frac": 0.0}, "predict": {"n_previews": 2},
           "seed": 0}
    if args.cache:
        cfg["cache"] = args.cache  # features computed once for all methods
    t0 = time.perf_counter()
    rep = run(cfg, out=out, progress=False, section=section)
    wall = time.perf_counter() - t0
    fit = float(rep.timings.get("fit", 0.0))
    frac = params.get("epochs", 1) / fields["epochs"] if "epochs" in fields else 1.0
    return {"method": args.method, "size_px": args.size, "n_spots": section.n_spots,
            "n_superpixels": rep.outputs.get("n_superpixels"), "genes": args.genes,
            "device": args.device, "precision": params.get("precision", "fp32"),
            "epochs": params.get("epochs"), "published_epochs": fields.get("epochs"),
            "n_states": fields.get("n_states"), "seconds_section": round(t_sec, 2),
            "stage_seconds": rep.timings, "stage_peak_rss_mb": rep.stage_rss_mb,
            "seconds_run": round(wall, 1),
            "fit_s_published_est": round(fit / frac, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "outputs_mb": {k: round(_mb_on_disk(out / k), 1)
                           for k in ("prediction.h5ad", "maps.zarr")},
            "matmul_probe_gflops": round(probe, 1)}


def table(rows: list[dict]) -> str:
    stages = ["features", "fit", "score", "predict", "write", "previews"]
    head = ("| method | device | epochs run (published) | " + " | ".join(stages)
            + " | total s | fit at published epochs, s | peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        st = r["stage_seconds"]
        lines.append(
            f"| {r['method']} | {r['device']} {r['precision']} | {r['epochs']} "
            f"({r['published_epochs']} x {r['n_states']}) | "
            + " | ".join(f"{st.get(s, 0):.1f}" for s in stages)
            + f" | {r['seconds_run']:.0f} | {r['fit_s_published_est']:.0f} | "
            f"{r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["istar", "histex", "deephex"])
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=13000, help="slide side in px (0.5 um/px)")
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--epochs-fraction", type=float, default=1.0,
                    help="run this fraction of each method's published epochs")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--precision", default=None, help="bf16 where the method has the switch")
    ap.add_argument("--cache", default="visium_table_out/cache")
    ap.add_argument("--out", default="visium_table_out")
    args = ap.parse_args(argv)
    if args.method:  # one method, this process
        print(json.dumps(one(args)), flush=True)
        return 0
    rows = []
    for m in args.methods:
        cmd = [sys.executable, __file__, "--method", m, "--size", str(args.size),
               "--genes", str(args.genes), "--epochs-fraction", str(args.epochs_fraction),
               "--device", args.device, "--cache", args.cache, "--out", args.out]
        if args.precision:
            cmd += ["--precision", args.precision]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(json.dumps({"method": m, "error": r.stderr[-2000:]}), flush=True)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows), flush=True)
    return 0 if len(rows) == len(args.methods) else 1


if __name__ == "__main__":
    sys.exit(main())
