"""What the report and scanpy's images add to a finished run (issue 16), measured again on
the run's own outputs, in one process:

* ``spatial_images``: scanpy's ``hires`` / ``lowres`` images made from the slide (once per
  run; a fresh ImageSource, so nothing is cached);
* ``uns_spatial_write``: writing ``prediction_spots.h5ad`` with ``uns["spatial"]`` minus
  writing it without (the reference), times the number of AnnData files the run wrote;
* ``qc_figure``: the input picture (slide, spots, tissue mask, UMI histogram);
* ``render_html``: the self-contained page from the run's ``report.json`` (pictures
  embedded).

    python benchmarks/report_cost.py RUN_DIR CONFIG.yaml

prints one JSON line: each cost in seconds, their sum, the reference write and the run's
total (``report.json``), and the sum as a fraction of that total.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a `histosr run` output folder")
    ap.add_argument("config", type=Path, help="the run's config (to read the section again)")
    a = ap.parse_args()

    import anndata as ad
    import numpy as np

    from histosr.config import load, validate
    from histosr.geometry import grid_for
    from histosr.outputs import spatial_images, write_h5ad
    from histosr.pipeline import read_section
    from histosr.report import qc_figure, render_html

    rc = validate(load(a.config))
    rep = json.loads((a.run / "report.json").read_text())
    section = read_section(rc.section.model_dump())
    t = {}
    t0 = time.perf_counter()
    images = spatial_images(section.image)
    t["spatial_images"] = time.perf_counter() - t0

    spots = ad.read_h5ad(a.run / "prediction_spots.h5ad")
    spots.uns.pop("spatial", None)
    n_files = sum((a.run / f).is_file() for f in ("prediction.h5ad", "prediction_spots.h5ad"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_h5ad(spots, Path(tmp) / "plain.h5ad")
        ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_h5ad(spots, Path(tmp) / "scanpy.h5ad", section=section, images=images)
        t["uns_spatial_write"] = max(0.0, time.perf_counter() - t0 - ref) * n_files

        pred = ad.read_h5ad(a.run / "prediction.h5ad", backed="r")
        mask = np.zeros(grid_for(section).shape, bool)
        mask[pred.obs["row"].to_numpy(), pred.obs["col"].to_numpy()] = True
        pred.file.close()
        t0 = time.perf_counter()
        qc_figure(section, mask, Path(tmp) / "input_qc.png")
        t["qc_figure"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        page = render_html(rep, a.run)
        t["render_html"] = time.perf_counter() - t0

    added = sum(t.values())
    print(json.dumps({**{k: round(v, 2) for k, v in t.items()}, "added_s": round(added, 2),
                      "reference_plain_write_s": round(ref, 2),
                      "run_total_s": rep.get("total_s"),
                      "added_fraction_of_run": round(added / float(rep["total_s"]), 4),
                      "report_html_mb": round(len(page.encode()) / 1e6, 2)}))


if __name__ == "__main__":
    main()
