"""Generation: densified spot grids predicted by a spot method (HisHRST 4x, TriHRGE 8x).

:func:`densify_section` fits a spot-level method (``hishrst``, ``trihrge``, ...) on ALL
measured spots of a section and predicts it at :func:`histosr.lattice.generation_positions`
(the measured sites plus half-step offsets of the measured lattice). The result is an
AnnData (one observation per position, X = log1p CP10k) with ``obsm["spatial"]`` (x =
column, y = row full-res px), ``obs`` ``array_col``/``array_row`` (float lattice indices,
half steps exact), ``half_a``/``half_b`` (the doubled integer indices), ``measured`` and
``spot`` (id of the measured spot or ""). :func:`plot_densified` draws measured and
generated spots side by side on one colour scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import arrays
from .arrays import gene_values
from .errors import InputError


def densify_section(section, method: str = "hishrst", factor: int = 4,
                    genes: list[str] | None = None, n_genes: int = 1000, seed: int = 0,
                    params: dict | None = None):
    """Fit ``method`` on every measured spot of ``section`` and predict the densified grid.

    Genes: the ``n_genes`` most variable (HEST rule, :func:`histosr.pp.select_genes`)
    plus ``genes`` (those must be measured). Positions outside the image are dropped.
    Returns ``(adata, fitted_method)``."""
    import anndata as ad
    import pandas as pd

    from .lattice import generation_positions
    from .methods import get_method
    from .methods.base import SPOT
    from .methods.spotnet import section_lattice
    from .pp import select_genes

    m = get_method(method, seed=seed, **(params or {})) if isinstance(method, str) else method
    if m.kind != SPOT:
        raise InputError(f"densify needs a spot-level method (hishrst, trihrge, ridge, ...): "
                         f"{m.name!r} predicts superpixels")
    want = list(genes or [])
    missing = [g for g in want if g not in section.counts.var_names]
    if missing:
        raise InputError(f"genes not measured in section {section.name!r}: {missing}")
    m.fit([section], genes=select_genes(section, n_genes, include=want))
    lat, ab = section_lattice(section)
    q, measured = generation_positions(lat, ab, factor)
    xy = lat.xy(q / 2.0)
    # measured sites keep their measured position (first spot of the site)
    site_of = {tuple(2 * s): i for i, s in reversed(list(enumerate(ab)))}
    spot_idx = np.array([site_of.get(tuple(s), -1) for s in q])
    xy[measured] = section.xy[spot_idx[measured]]
    h, w = section.image.shape[:2]
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    q, measured, xy, spot_idx = q[inside], measured[inside], xy[inside], spot_idx[inside]
    pred = m.predict(section, at=xy)
    ids = np.asarray(section.counts.obs_names).astype(str)
    obs = pd.DataFrame({
        "array_col": q[:, 0] / 2.0, "array_row": q[:, 1] / 2.0,
        "half_a": q[:, 0], "half_b": q[:, 1], "measured": measured,
        "spot": np.where(spot_idx >= 0, ids[np.maximum(spot_idx, 0)], ""),
    }, index=pd.Index([f"g{a}_{b}" for a, b in q]))
    out = ad.AnnData(X=arrays.dense(pred.X, np.float32), obs=obs, var=pred.var.copy())
    out.obsm["spatial"] = xy
    out.uns["histosr"] = dict(pred.uns["histosr"])
    out.uns["densify"] = {**lat.as_dict(), "section": section.name, "factor": int(factor),
                          "n_measured": int(measured.sum()), "n_generated": int((~measured).sum())}
    return out, m


def plot_densified(dense, section, genes: list[str], path: str | Path) -> Path:
    """PNG: per gene (rows), measured spots (log1p CP10k) and the densified prediction side
    by side over the H&E, one colour scale per gene, markers sized to the spacing."""
    from .metrics import log_cp10k
    from .pl import _plt

    plt = _plt()
    genes = [g for g in genes if g in dense.var_names]
    if not genes:
        raise InputError("none of the requested genes is in the densified output")
    lib = np.asarray(section.counts.X.sum(axis=1), dtype=np.float64).ravel()
    meas = log_cp10k(section.dense_counts(genes), lib)
    xy_m, xy_d = section.xy, np.asarray(dense.obsm["spatial"])
    allxy = np.concatenate([xy_m, xy_d])
    lo, hi = allxy.min(axis=0), allxy.max(axis=0)
    pad = 0.08 * float((hi - lo).max())
    x0, x1, y0, y1 = lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad
    from .geometry import lattice_pitch

    pitch = lattice_pitch(xy_m)
    fig, axes = plt.subplots(len(genes), 2, figsize=(10, 4.8 * len(genes)), squeeze=False)
    thumb = section.image.thumbnail(1024)
    H, W = section.image.shape[:2]
    for r, g in enumerate(genes):
        pv = gene_values(dense, g)
        vmin, vmax = np.percentile(np.concatenate([meas[:, r], pv]), [1, 99])
        for c, (xy, v, d, title) in enumerate((
                (xy_m, meas[:, r], pitch, f"{g}: measured spots ({len(xy_m)})"),
                (xy_d, pv, pitch / 2.0, f"{g}: {dense.uns['histosr']['method']} "
                 f"densified x{dense.uns['densify']['factor']} ({len(xy_d)})"))):
            ax = axes[r, c]
            ax.imshow(thumb, extent=(0, W, H, 0))
            ax.set_xlim(x0, x1)
            ax.set_ylim(y1, y0)
            fig.canvas.draw()
            # marker diameter ~ 0.95 x the spacing, in points
            bbox = ax.get_window_extent()
            pts = 0.95 * d * bbox.width / (x1 - x0) * 72.0 / fig.dpi
            im = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=pts ** 2, marker="o", cmap="magma",
                            vmin=vmin, vmax=vmax, linewidths=0)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
            plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="log1p CP10k")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_densified(dense, section, out_dir: str | Path, genes: list[str] | None = None) -> dict:
    """Write ``out_dir/densified.h5ad`` (with scanpy's ``uns["spatial"]``, spots drawn at the
    section's spot diameter) and, with ``genes``, ``out_dir/densified.png``."""
    from .outputs import write_h5ad

    out_dir = Path(out_dir)
    paths = {"h5ad": write_h5ad(dense, out_dir / "densified.h5ad", section=section)}
    if genes:
        paths["png"] = plot_densified(dense, section, genes, out_dir / "densified.png")
    return paths


__all__ = ["densify_section", "plot_densified", "write_densified"]
