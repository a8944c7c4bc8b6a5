"""Time to train the slide-trained ``ssl`` encoder on one her2st section, against the
``handcrafted`` feature map of the same section computed in the same run (the reference:
what every run pays anyway), and the ssl feature map itself.

    OMP_NUM_THREADS=2 python benchmarks/ssl_train_time.py --section C2 [--steps 300]

Prints one JSON line: seconds for ssl training (tile sampling included), the ssl feature map
and the handcrafted feature map, the torch thread count, and the ratio training / handcrafted.
Nothing is cached between runs (a fresh temporary cache folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--section", default="C2")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: ssl's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=None)
    a = ap.parse_args()

    import torch

    from histosr.benchmark.common import read_section
    from histosr.features import compute, ssl

    sec = read_section(a.data, a.section)
    kw = {} if a.steps is None else {"steps": a.steps}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        compute(sec, "handcrafted", cache_dir=f"{tmp}/h", progress=False)
        t_hand = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = ssl.train(sec, f"{tmp}/s", device=a.device, progress=False, **kw)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        compute(sec, f"ssl:{path}", cache_dir=f"{tmp}/s", progress=False, device=a.device)
        t_feat = time.perf_counter() - t0
    print(json.dumps({
        "section": a.section, "steps": kw.get("steps", ssl.TRAIN_DEFAULTS["steps"]),
        "device": a.device, "torch_threads": torch.get_num_threads(),
        "ssl_train_s": round(t_train, 1), "ssl_features_s": round(t_feat, 1),
        "handcrafted_features_s": round(t_hand, 1),
        "train_over_handcrafted": round(t_train / t_hand, 2)}))


if __name__ == "__main__":
    main()
