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
             title: str | None = None, alpha: float = 0.85, log: bool = True):
    """Show one gene of a superpixel prediction (or of spots) over the section's H&E.

    Superpixel AnnData (``obs`` row/col) are drawn as an image on the 8 um grid; spot
    AnnData as dots at ``obsm["spatial"]``. Values are log1p-transformed for display
    (``log=False``: as stored, e.g. gene-set scores)."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    v = np.asarray(adata[:, gene].X).ravel().astype(np.float64)
    v = np.log1p(v) if log else v
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
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="log1p" if log else "score")
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


# -- tissue domains -------------------------------------------------------------------------
def _palette(categories) -> dict:
    """A fixed colour per category (tab10, then tab20 beyond ten)."""
    plt = _plt()
    cats = [str(c) for c in categories]
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    return {c: cmap(i % cmap.N) for i, c in enumerate(cats)}


def _legend(ax, colors: dict, title: str | None = None) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=v, edgecolor="none", label=k) for k, v in colors.items()]
    ax.legend(handles=handles, title=title, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize=7, title_fontsize=8, frameon=False)


def _background(ax, section) -> None:
    if section is not None:
        thumb = section.image.thumbnail(1024)
        h, w = section.image.shape[:2]
        ax.imshow(thumb, extent=(0, w, h, 0))


def domains(adata, section=None, ax=None, key: str = "domain", title: str | None = None,
            alpha: float = 0.7, legend: bool = True, palette: dict | None = None,
            spot_size: float = 18.0, edgecolor=None):
    """Domains (``obs[key]``, categorical) over the section's H&E: superpixel AnnData as an
    image on the 8 um grid, spot AnnData as dots at ``obsm["spatial"]``."""
    import pandas as pd
    from matplotlib.colors import to_rgba

    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    lab = adata.obs[key]
    if not isinstance(lab.dtype, pd.CategoricalDtype):
        lab = lab.astype(str).astype("category")
    cats = [str(c) for c in lab.cat.categories]
    colors = palette or _palette(cats)
    codes = lab.cat.codes.to_numpy()
    rgba = np.array([to_rgba(colors.get(c, "grey")) for c in cats] + [(0, 0, 0, 0)])
    _background(ax, section)
    if "row" in adata.obs and "grid_shape" in adata.uns.get("histosr", {}):
        gh, gw = adata.uns["histosr"]["grid_shape"]
        r, c = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
        img = np.zeros((gh, gw, 4))
        img[r, c] = rgba[np.where(codes >= 0, codes, len(cats))]
        img[r, c, 3] = np.where(codes >= 0, alpha, 0.0)
        px = _sp_size_px(adata.obsm["spatial"], r, c)
        ax.imshow(img, extent=(0, gw * px, gh * px, 0), interpolation="nearest")
    else:
        xy = np.asarray(adata.obsm["spatial"])
        ok = codes >= 0
        ax.scatter(xy[ok, 0], xy[ok, 1], c=rgba[codes[ok]], s=spot_size, alpha=alpha,
                   linewidths=0 if edgecolor is None else 0.6, edgecolors=edgecolor)
        if section is None:
            ax.set_aspect("equal")
            ax.invert_yaxis()
    ax.set_title(title or key)
    ax.set_axis_off()
    if legend:
        _legend(ax, {c: colors[c] for c in cats}, key)
    return ax


def domains_vs_labels(adata, section, labels=None, key: str = "domain", spot_domains=None,
                      title: str | None = None, exclude=("undetermined",)):
    """Figure: super-resolved domains over the H&E | (``spot_domains``: an AnnData of spots
    with ``obs[key]``, e.g. the measured spots clustered) | pathologist ``labels``
    (pd.Series per spot, default ``section.annotations``) at the spot centres. Labels in
    ``exclude`` are drawn in grey. Returns the matplotlib Figure."""
    import anndata as ad
    import pandas as pd

    plt = _plt()
    labels = section.annotations if labels is None else labels
    if labels is None:
        raise ValueError("no pathologist labels: pass labels= or a section with annotations")
    n = 3 if spot_domains is not None else 2
    fig, axes = plt.subplots(1, n, figsize=(5.6 * n, 5))
    domains(adata, section=section, ax=axes[0], key=key, title="super-resolved domains")
    if spot_domains is not None:
        domains(spot_domains, section=section, ax=axes[1], key=key,
                title="measured spots, clustered")
    lab = pd.Series(labels).reindex(section.counts.obs_names).astype(object)
    lab = lab.where(lab.notna(), "unlabelled").astype(str)
    cats = sorted(c for c in lab.unique() if c not in exclude and c != "unlabelled")
    colors = {c: v for c, v in zip(cats, _palette(cats).values())}
    for c in lab.unique():
        colors.setdefault(c, (0.6, 0.6, 0.6, 1.0))
    la = ad.AnnData(obs=pd.DataFrame({"label": pd.Categorical(lab.to_numpy(),
                                                              categories=list(colors))},
                                     index=section.counts.obs_names.copy()))
    la.obsm["spatial"] = section.xy
    domains(la, section=section, ax=axes[-1], key="label", title="pathologist labels",
            palette=colors, alpha=0.95, spot_size=24.0, edgecolor="white")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# -- gene-set enrichment --------------------------------------------------------------------
def enrichment(table, max_sets: int = 20, alpha: float = 0.05, title: str | None = None):
    """Dot plot of an enrichment table (:func:`histosr.tl.enrich`): one row per query
    (domain, spatially variable genes), one column per gene set (the ``max_sets`` with the
    smallest adjusted p-value anywhere); dot area = overlap, colour = -log10 adjusted
    p-value, black edge where ``padj <= alpha``. Returns the matplotlib Figure."""
    plt = _plt()
    best = table.groupby("set")["padj"].min().sort_values(kind="stable")
    sets = list(best.index[:max_sets])
    queries = list(dict.fromkeys(table["query"]))
    t = table[table["set"].isin(sets)]
    xi = {s: i for i, s in enumerate(sets)}
    yi = {q: i for i, q in enumerate(queries)}
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(sets) + 2.0, 1.2 + 0.42 * len(queries)))
    x = t["set"].map(xi).to_numpy()
    y = t["query"].map(yi).to_numpy()
    score = -np.log10(np.clip(t["padj"].to_numpy(dtype=float), 1e-300, 1.0))
    size = 30 + 40 * t["overlap"].to_numpy(dtype=float)
    sig = t["padj"].to_numpy(dtype=float) <= alpha
    sc = ax.scatter(x, y, s=size, c=score, cmap="viridis", vmin=0,
                    edgecolors=np.where(sig, "black", "none"), linewidths=1.0)
    ax.set_xticks(range(len(sets)), sets, rotation=45, ha="right")
    ax.set_yticks(range(len(queries)), queries)
    ax.set_xlim(-0.6, len(sets) - 0.4)
    ax.set_ylim(len(queries) - 0.5, -0.5)
    plt.colorbar(sc, ax=ax, label="-log10 adjusted p", fraction=0.05, pad=0.02)
    ax.set_title(title or f"over-representation (dot area = overlap; edge: padj <= {alpha})",
                 fontsize=9)
    fig.tight_layout()
    return fig
