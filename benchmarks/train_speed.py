"""Training speed of the learned methods on one her2st section, against the hardware's
best kernel measured in the same process (BENCHMARKS.md).

Superpixel methods (istar, histex, deephex) train on the section pooled as in P2 (2x2
blocks of native spots), spot methods (hishrst, trihrge, hespotex) on its native spots; the
features are the ``handcrafted`` encoder's (cached under ``--cache-dir``), the genes the P2
``hvg1000``. Each method trains ``--states`` members for ``--epochs`` epochs in its own
subprocess (so peak RSS is its own). Inside the shared training loop
(:func:`histosr.train.train_loop`) the first epoch of every loop runs under
``FlopCounterMode`` (FLOPs of one epoch, forward + backward: matmuls, convolutions and
attention; not timed), the others are timed epoch by epoch. ``achieved_gflops`` = counted
FLOPs of the timed epochs / their seconds; ``flops_ratio`` = that / the fp32 matmul probe
(:func:`histosr.benchmark.speed.matmul_probe`, 2048 x 2048, same threads) run before and
after training in the same process, so other load on the machine affects both alike.

    python benchmarks/train_speed.py --section C2 --epochs 4 --threads 2 --cache-dir /tmp/ts

prints one JSON line per method: ``method``, ``device``, ``threads``, ``n_spots``,
``n_genes``, ``epochs_run``, ``states``, ``s_per_epoch`` (median, all states together),
``gflop_per_epoch``, ``achieved_gflops``, ``probe_gflops``, ``flops_ratio``, ``setup_s`` (fit
time outside the training loops: data, HR pseudo-spots), ``predict_s``,
``published_epochs``, ``published_states``, ``extrapolated_fit_s`` (setup + s_per_epoch x
published epochs x published states / states run) and ``peak_rss_mb``; then a table.
``--profile`` adds the top operators of one timed epoch (``torch.profiler``, self CPU time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SPOT_METHODS = ("hishrst", "trihrge", "hespotex")


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0, 1)


def measure(method: str, section: str, epochs: int, data, cache_dir, device: str,
            threads: int | None, states: int = 1, set_params: dict | None = None,
            profile: bool = False) -> dict:
    import numpy as np
    import torch

    from histosr import features, train
    from histosr.benchmark.common import read_section
    from histosr.benchmark.speed import count_flops, matmul_probe
    from histosr.geometry import pool_spots
    from histosr.methods.base import get_method, method_class
    from histosr.pp import select_genes

    if threads:
        torch.set_num_threads(threads)
    native = read_section(Path(data) if data else None, section)
    genes = select_genes(native, 1000)
    spot = method in SPOT_METHODS
    if spot:
        train_sec, fm = native, None
    else:
        train_sec, _ = pool_spots(native, 2)
        fm = features.compute(native, encoder="handcrafted", cache_dir=cache_dir,
                              progress=False)

    loops: list[dict] = []  # per train_loop call: FLOPs of one epoch, epoch start stamps
    prof_table: list[str] = []
    loop = train.train_loop

    def timed_loop(model, batches_fn, loss_fn, n_epochs, lr, **kw):
        rec = {"flops": 0, "stamps": []}
        loops.append(rec)
        ctx: list = []

        def close():
            if ctx:
                c, fc = ctx.pop()
                c.__exit__(None, None, None)
                if isinstance(fc, dict):
                    rec["flops"] = fc["total"]
                else:  # a profiler
                    prof_table.append(fc.key_averages().table(
                        sort_by="self_cpu_time_total", row_limit=15))

        def batches(epoch):
            close()
            if epoch == 0:  # counted, not timed
                c = count_flops()
                ctx.append((c, c.__enter__()))
            else:
                if epoch == 2 and profile and not prof_table:
                    from torch.profiler import ProfilerActivity
                    from torch.profiler import profile as tprofile

                    c = tprofile(activities=[ProfilerActivity.CPU])
                    ctx.append((c, c.__enter__()))
                rec["stamps"].append(time.perf_counter())
            return batches_fn(epoch)

        try:
            hist = loop(model, batches, loss_fn, n_epochs, lr, **kw)
        finally:
            close()
        rec["stamps"].append(time.perf_counter())
        return hist

    train.train_loop = timed_loop
    cls = method_class(method)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
    kw = dict(epochs=epochs, n_states=states, progress=False, device=device)
    if spot and method == "hespotex":
        kw["gate_epochs"] = epochs
    kw.update(set_params or {})
    m = get_method(method, **kw)
    probe0 = matmul_probe("cpu" if str(train.resolve_device(device)) == "cpu" else device)
    t0 = time.perf_counter()
    if spot:
        m.fit([train_sec], genes=genes)
    else:
        m.fit([train_sec], [fm], genes=genes)
    fit_s = time.perf_counter() - t0
    probe1 = matmul_probe("cpu" if str(train.resolve_device(device)) == "cpu" else device)
    per, flops, timed_s, loop_s = [], 0, 0.0, 0.0
    for rec in loops:
        st = np.asarray(rec["stamps"])
        loop_s += st[-1] - st[0] if len(st) else 0.0
        d = np.diff(st)
        if profile and len(d) > 1:
            d = np.delete(d, 1)  # the profiled epoch
        per.extend(d.tolist())
        flops += rec["flops"] * len(d)
        timed_s += float(d.sum())
    t1 = time.perf_counter()
    if spot:
        m.predict(native)
    else:
        m.predict(train_sec, fm, at=native.xy, diameter_um=native.spot_diameter_um)
    predict_s = time.perf_counter() - t1
    s_epoch = float(np.median(per)) if per else float("nan")
    setup_s = max(fit_s - loop_s, 0.0)
    probe = 0.5 * (probe0 + probe1)
    achieved = flops / timed_s if timed_s > 0 else float("nan")
    ep = int(defaults["epochs"])
    ns = int(defaults.get("n_states", 1))
    per_epoch_flops = flops / len(per) if per else 0
    rec = {
        "benchmark": "train_speed", "method": method, "section": section,
        "device": str(train.resolve_device(device)), "threads": torch.get_num_threads(),
        "n_spots": int(train_sec.n_spots), "n_genes": len(genes), "epochs_run": int(epochs),
        "states": int(states), "params": set_params or {},
        "s_per_epoch": round(s_epoch, 4), "gflop_per_epoch": round(per_epoch_flops / 1e9, 3),
        "achieved_gflops": round(achieved / 1e9, 2), "probe_gflops": round(probe / 1e9, 2),
        "probe_gflops_before_after": [round(probe0 / 1e9, 2), round(probe1 / 1e9, 2)],
        "flops_ratio": round(achieved / probe, 3),
        "setup_s": round(setup_s, 2), "predict_s": round(predict_s, 2),
        "published_epochs": ep, "published_states": ns,
        "extrapolated_fit_s": round(setup_s + s_epoch * ep * ns / states, 1),
        "peak_rss_mb": _peak_rss_mb(),
    }
    if prof_table:
        rec["profile"] = prof_table[0]
    return rec


def _table(recs: list[dict]) -> str:
    head = ("| method | states | s/epoch | GFLOP/epoch | achieved GFLOP/s | probe GFLOP/s | "
            "ratio | published fit (extrapolated) |")
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if "error" in r:
            rows.append(f"| {r['method']} | error: {r['error']} |||||||")
            continue
        rows.append(
            f"| {r['method']} | {r['states']} | {r['s_per_epoch']:.4g} | "
            f"{r['gflop_per_epoch']:.3g} | {r['achieved_gflops']:.3g} | "
            f"{r['probe_gflops']:.3g} | {r['flops_ratio']:.2f} | "
            f"{r['extrapolated_fit_s'] / 60:.1f} min ({r['published_epochs']} x "
            f"{r['published_states']}) |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--section", default="C2")
    p.add_argument("--methods", default="istar,histex,deephex",
                   help=f"comma-separated; spot methods: {','.join(SPOT_METHODS)}")
    p.add_argument("--epochs", type=int, default=5, help="epochs actually run per method")
    p.add_argument("--states", type=int, default=1, help="ensemble members trained")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter (JSON, or text), e.g. --set precision=bf16")
    p.add_argument("--data", default=None, help="folder holding her2st/ (default: HISTOSR_DATA)")
    p.add_argument("--cache-dir", default=None, help="feature cache folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--profile", action="store_true",
                   help="print the top operators of one timed epoch")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    params = {}
    for kv in a.set:
        k, _, v = kv.partition("=")
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    if a.one:
        print(json.dumps(measure(a.methods, a.section, a.epochs, a.data, a.cache_dir,
                                 a.device, a.threads, a.states, params, a.profile)),
              flush=True)
        return
    recs = []
    for method in a.methods.split(","):
        cmd = [sys.executable, __file__, "--one", "--methods", method, "--section", a.section,
               "--epochs", str(a.epochs), "--states", str(a.states), "--device", a.device]
        for opt, val in (("--data", a.data), ("--cache-dir", a.cache_dir),
                         ("--threads", a.threads)):
            if val is not None:
                cmd += [opt, str(val)]
        cmd += [f"--set={kv}" for kv in a.set] + (["--profile"] if a.profile else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rec = {"benchmark": "train_speed", "method": method,
                   "error": out.stderr.strip().splitlines()[-1:]}
        else:
            rec = json.loads(out.stdout.strip().splitlines()[-1])
        prof = rec.pop("profile", None)
        print(json.dumps(rec), flush=True)
        if prof:
            print(prof, flush=True)
        recs.append(rec)
    print(_table(recs), flush=True)


if __name__ == "__main__":
    main()
