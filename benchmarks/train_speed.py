"""Training speed and memory of the superpixel methods on one her2st section (BENCHMARKS.md).

The section is pooled as in P2 (2x2 blocks of native spots), the features are the
``handcrafted`` encoder's (cached under ``--cache-dir``), the genes the P2 ``hvg1000``. Each
method trains one state for ``--epochs`` epochs in its own subprocess (so peak RSS is its
own); seconds per epoch are timed epoch by epoch inside the shared training loop
(:func:`histosr.train.train_loop`), the first epoch (warm-up) excluded from the median, and
extrapolated to the published epochs x states. istar is the reference measured in the same
run.

    python benchmarks/train_speed.py --section C2 --epochs 5 --cache-dir /tmp/ts-cache

prints one JSON line per method: ``method``, ``device``, ``threads``, ``n_spots``,
``n_genes``, ``epochs_run``, ``s_per_epoch``, ``setup_s`` (fit time outside the training
loop: data, HR pseudo-spots), ``predict_s`` (native spots), ``published_epochs``,
``published_states``, ``extrapolated_fit_s`` and ``peak_rss_mb``.
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


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0, 1)


def measure(method: str, section: str, epochs: int, data, cache_dir, device: str,
            threads: int | None) -> dict:
    import numpy as np
    import torch

    from histosr import features, train
    from histosr.benchmark.common import read_section
    from histosr.geometry import pool_spots
    from histosr.methods.base import get_method, method_class
    from histosr.pp import select_genes

    if threads:
        torch.set_num_threads(threads)
    native = read_section(Path(data) if data else None, section)
    pooled, _ = pool_spots(native, 2)
    genes = select_genes(native, 1000)
    fm = features.compute(native, encoder="handcrafted", cache_dir=cache_dir, progress=False)

    stamps: list[float] = []
    loop = train.train_loop

    def timed_loop(model, batches_fn, loss_fn, n_epochs, lr, **kw):
        def batches(epoch):
            stamps.append(time.perf_counter())
            return batches_fn(epoch)

        hist = loop(model, batches, loss_fn, n_epochs, lr, **kw)
        stamps.append(time.perf_counter())
        return hist

    train.train_loop = timed_loop
    cls = method_class(method)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
    m = get_method(method, epochs=epochs, n_states=1, progress=False, device=device)
    t0 = time.perf_counter()
    m.fit([pooled], [fm], genes=genes)
    fit_s = time.perf_counter() - t0
    per = np.diff(stamps)
    train_s = stamps[-1] - stamps[0]
    t1 = time.perf_counter()
    m.predict(pooled, fm, at=native.xy, diameter_um=native.spot_diameter_um)
    predict_s = time.perf_counter() - t1
    s_epoch = float(np.median(per[1:] if len(per) > 1 else per))
    setup_s = fit_s - train_s
    ep, ns = int(defaults["epochs"]), int(defaults["n_states"])
    return {
        "benchmark": "train_speed", "method": method, "section": section,
        "device": str(train.resolve_device(device)), "threads": torch.get_num_threads(),
        "n_spots": int(pooled.n_spots), "n_genes": len(genes), "epochs_run": int(epochs),
        "s_per_epoch": round(s_epoch, 4), "first_epoch_s": round(float(per[0]), 4),
        "setup_s": round(setup_s, 2), "predict_s": round(predict_s, 2),
        "published_epochs": ep, "published_states": ns,
        "extrapolated_fit_s": round(setup_s + s_epoch * ep * ns, 1),
        "peak_rss_mb": _peak_rss_mb(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--section", default="C2")
    p.add_argument("--methods", default="istar,histex,deephex")
    p.add_argument("--epochs", type=int, default=5, help="epochs actually run per method")
    p.add_argument("--data", default=None, help="folder holding her2st/ (default: HISTOSR_DATA)")
    p.add_argument("--cache-dir", default=None, help="feature cache folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.methods, a.section, a.epochs, a.data, a.cache_dir,
                                 a.device, a.threads)), flush=True)
        return
    for method in a.methods.split(","):
        cmd = [sys.executable, __file__, "--one", "--methods", method, "--section", a.section,
               "--epochs", str(a.epochs), "--device", a.device]
        for opt, val in (("--data", a.data), ("--cache-dir", a.cache_dir),
                         ("--threads", a.threads)):
            if val is not None:
                cmd += [opt, str(val)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(json.dumps({"benchmark": "train_speed", "method": method,
                              "error": out.stderr.strip().splitlines()[-1:]}), flush=True)
            continue
        print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
