"""Plots: gene maps over the H&E (PNG previews for people)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gene_map(adata, gene: str, section=None, ax=None, cmap: str = "magma",
             title: str | None = None, alpha: float = 0.85):
    """Show one gene of a superpixel prediction (or of spots) over the section's H&E.

    Superpixel AnnData (``obs`` row/col) are drawn as an image on the 8 um grid; spot
    AnnData as dots at ``obsm["spatial"]``. Values are log1p-transformed for display."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    v = np.log1p(np.asarray(adata[:, gene].X).ravel().astype(np.float64))
    if section is not None:
        thumb = section.image.thumbnail(1024)
        h, w = section.image.shape[:2]
        ax.imshow(thumb, extent=(0, w, h, 0))
    if "row" in adata.obs and "grid_shape" in adata.uns.get("histosr", {}):
        gh, gw = adata.uns["histosr"]["grid_shape"]
        img = np.full((gh, gw), np.nan)
        img[adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()] = v
        xy = adata.obsm["spatial"]
        r, c = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
        # extent from superpixel centres: one superpixel = (x1 - x0) / (c1 - c0) px
        px = _sp_size_px(xy, r, c)
        ext = (-0.0, gw * px, gh * px, 0)
        im = ax.imshow(img, cmap=cmap, extent=ext, alpha=alpha, interpolation="nearest")
    else:
        xy = adata.obsm["spatial"]
        im = ax.scatter(xy[:, 0], xy[:, 1], c=v, cmap=cmap, s=12, alpha=alpha)
        if section is None:
            ax.invert_yaxis()
    ax.set_title(title or gene)
    ax.set_axis_off()
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="log1p")
    return ax


def _sp_size_px(xy: np.ndarray, r: np.ndarray, c: np.ndarray) -> float:
    """Full-res px per superpixel, from two cells' centres."""
    if len(r) < 2 or (c.max() == c.min() and r.max() == r.min()):
        return 16.0
    if c.max() != c.min():
        i, j = np.argmin(c), np.argmax(c)
        return float((xy[j, 0] - xy[i, 0]) / (c[j] - c[i]))
    i, j = np.argmin(r), np.argmax(r)
    return float((xy[j, 1] - xy[i, 1]) / (r[j] - r[i]))


def previews(adata, genes: list[str], out_dir: str | Path, section=None,
             spots=None, prefix: str = "") -> list[Path]:
    """One PNG per gene (prediction over the H&E, next to the measured spots when given)."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for g in genes:
        n = 2 if spots is not None and g in spots.var_names else 1
        fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 5))
        axes = np.atleast_1d(axes)
        if n == 2:
            gene_map(spots, g, section=section, ax=axes[0], title=f"{g} measured spots")
        gene_map(adata, g, section=section, ax=axes[-1], title=f"{g} predicted")
        fig.tight_layout()
        p = out_dir / f"{prefix}{_safe(g)}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
