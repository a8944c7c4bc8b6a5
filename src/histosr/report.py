"""The short run report: what ran, how long, peak memory, metrics, pictures."""

from __future__ import annotations

import html
import json
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0  # Linux reports KiB


@dataclass
class RunReport:
    title: str
    out_dir: Path
    params: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    images: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, name: str):
        """Time a pipeline stage: ``with report.stage("features"): ...``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t, 2)

    def write(self) -> Path:
        """Write ``report.html`` and ``report.json`` into the run folder (atomically)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        total = round(time.perf_counter() - self._t0, 2)
        data = {"title": self.title, "params": self.params, "timings_s": self.timings,
                "total_s": total, "peak_rss_mb": round(peak_rss_mb(), 1),
                "metrics": self.metrics, "outputs": self.outputs, "notes": self.notes,
                "images": [str(Path(p).relative_to(self.out_dir)) for p in self.images]}
        _atomic_write(self.out_dir / "report.json", json.dumps(data, indent=1, default=str))
        _atomic_write(self.out_dir / "report.html", _html(data))
        return self.out_dir / "report.html"


def _table(d: dict) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
        for k, v in d.items()
    )
    return f"<table>{rows}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def _html(d: dict) -> str:
    imgs = "".join(
        f'<figure><img src="{html.escape(p)}" width="480"><figcaption>{html.escape(p)}'
        "</figcaption></figure>" for p in d["images"]
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in d["notes"])
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(d['title'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
table{{border-collapse:collapse;margin-bottom:1em}}th,td{{border:1px solid #ccc;padding:3px 8px;
text-align:left}}figure{{display:inline-block;margin:4px}}</style></head><body>
<h1>{html.escape(d['title'])}</h1>
<p>Total {d['total_s']} s, peak memory {d['peak_rss_mb']} MB.</p>
<h2>Metrics</h2>{_table(d['metrics']) if d['metrics'] else '<p>none computed</p>'}
<h2>Timings (s)</h2>{_table(d['timings_s'])}
<h2>Parameters</h2>{_table(d['params'])}
<h2>Outputs</h2>{_table(d['outputs'])}
{'<h2>Notes</h2><ul>' + notes + '</ul>' if notes else ''}
<h2>Gene maps</h2>{imgs}
</body></html>"""


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
