"""The ``results.json`` of a benchmark run (layout: BENCHMARKS.md "Commands and output")."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np


def _clean(x):
    """JSON-ready copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    return x


def mean_over_sections(sections: dict[str, dict]) -> dict[str, float]:
    """Mean over sections of every numeric per-section score (not ``seconds`` or counts)."""
    skip = {"seconds"}
    keys: list[str] = []
    for s in sections.values():
        for k, v in s.items():
            if k in skip or k.startswith("n_") or k in keys:
                continue
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                keys.append(k)
    out = {}
    for k in keys:
        vals = [float(s[k]) for s in sections.values() if s.get(k) is not None]
        vals = [v for v in vals if math.isfinite(v)]
        if vals:
            out[k] = round(float(np.mean(vals)), 4)
    return out


def results(protocol: str, method: str, encoder: str, params: dict,
            sections: dict[str, dict], seconds: float, peak_rss_mb: float) -> dict:
    """The results dictionary in the documented layout."""
    return _clean({
        "protocol": protocol,
        "method": method,
        "encoder": encoder,
        "params": params,
        "sections": sections,
        "mean": mean_over_sections(sections),
        "seconds": round(float(seconds), 1),
        "peak_rss_mb": round(float(peak_rss_mb)),
    })


def write_results(res: dict, out: str | os.PathLike) -> Path:
    """Write ``out/results.json`` atomically (temp file in the same folder, then rename), so
    a reader never sees half a file and a killed run keeps the previous complete one."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".json.tmp", dir=out)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(res), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_results(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    return json.loads(p.read_text())
