"""Plots: gene maps over the H&E (PNG previews for people)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def gene_map(adata, gene: str, section=None, ax=None, cmap: str = "magma",
             title: str | None = None, alpha: float = 0.85, log: bool = True):
    """Show one gene of a superpixel prediction (or of spots) over the section's H&E.

    Superpixel AnnData (``obs`` row/col) are drawn as an image on the 8 um grid; spot
    AnnData as dots at ``obsm["spatial"]``. Counts are log1p-transformed for display;
    values already on a log1p scale (``uns["histosr"]["scale"]``) are shown as they are;
    ``log=False`` shows any values as stored (e.g. gene-set scores)."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    from .arrays import gene_values

    scale = str(adata.uns.get("histosr", {}).get("scale", "counts"))
    v = gene_values(adata, gene)
    if log and not scale.startswith("log1p"):
        v = np.log1p(v)
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
    label = ("log1p CP10k" if scale.startswith("log1p") else "log1p counts") if log \
        else "score"
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label=label)
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
        paths.append(save_figure(fig, out_dir / f"{prefix}{g}.png"))
    return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def save_figure(fig, path: str | Path, dpi: int = 90, **kwargs) -> Path:
    """Write a figure as PNG atomically (temp file + rename; the file name made safe) and
    close it."""
    import os

    plt = _plt()
    path = Path(path)
    path = path.with_name(_safe(path.stem) + (path.suffix or ".png"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=dpi, **kwargs)
    plt.close(fig)
    os.replace(tmp, path)
    return path


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
        raise InputError("no pathologist labels: pass labels= or a section with annotations")
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


# -- ligand-receptor interactions -------------------------------------------------------------
def interaction_map(adata, pair: str, section=None, ax=None, key: str = "interactions",
                    hotspots: bool = True, cmap: str = "viridis", title: str | None = None,
                    alpha: float = 0.85, spot_size: float = 18.0, thumbnail=None):
    """Local co-localisation of one ``ligand^receptor`` pair over the section's H&E: the
    local bivariate Moran's R in ``obsm[key]`` (written by :func:`histosr.tl.interactions`),
    with ``hotspots`` only where ligand and receptor are both above average around the
    observation (``obsm[key + "_cats"] == 1``; elsewhere transparent, spots hollow).
    Superpixel AnnData are drawn as an image on the 8 um grid, spots as dots at
    ``obsm["spatial"]`` (full-resolution px). ``thumbnail``: the section's
    ``image.thumbnail()``, when already read (several panels of one slide)."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 5))
    if key not in adata.obsm or pair not in adata.obsm[key]:
        have = list(adata.obsm[key].columns) if key in adata.obsm else []
        raise ValueError(f"no local score for {pair!r} in obsm[{key!r}] (pairs: {have[:10]}): "
                         "run histosr.tl.interactions first, with that pair among the top ones")
    v = np.asarray(adata.obsm[key][pair], dtype=np.float64)
    cats_key = f"{key}_cats"
    if hotspots and cats_key in adata.obsm:
        v = np.where(np.asarray(adata.obsm[cats_key][pair]) == 1, np.clip(v, 0, None), np.nan)
    fin = v[np.isfinite(v)]
    vmax = float(np.percentile(fin, 99)) if len(fin) else 1.0
    vmin = 0.0 if hotspots else float(np.percentile(fin, 1)) if len(fin) else 0.0
    vmax = vmax if vmax > vmin else vmin + 1.0
    if section is not None:
        h, w = section.image.shape[:2]
        ax.imshow(section.image.thumbnail(1024) if thumbnail is None else thumbnail,
                  extent=(0, w, h, 0))
    xy = np.asarray(adata.obsm["spatial"])
    if "row" in adata.obs and "grid_shape" in adata.uns.get("histosr", {}):
        gh, gw = adata.uns["histosr"]["grid_shape"]
        r, c = adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()
        img = np.full((gh, gw), np.nan)
        img[r, c] = v
        px = _sp_size_px(xy, r, c)
        im = ax.imshow(img, cmap=cmap, extent=(0, gw * px, gh * px, 0), alpha=alpha,
                       interpolation="nearest", vmin=vmin, vmax=vmax)
    else:
        ok = np.isfinite(v)
        ax.scatter(xy[~ok, 0], xy[~ok, 1], s=spot_size, facecolors="none",
                   edgecolors=(0.5, 0.5, 0.5, 0.6), linewidths=0.5)
        im = ax.scatter(xy[ok, 0], xy[ok, 1], c=v[ok], cmap=cmap, s=spot_size, alpha=alpha,
                        vmin=vmin, vmax=vmax)
        ax.set_aspect("equal")
    # zoom on the observations (the H&E around the tissue is mostly glass)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    pad = 0.05 * float(max(hi - lo)) + 1.0
    ax.set_xlim(lo[0] - pad, hi[0] + pad)
    ax.set_ylim(hi[1] + pad, lo[1] - pad)
    ax.set_title(title or pair, fontsize=9)
    ax.set_axis_off()
    plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="local R")
    return ax


def interaction_maps(spots, superpixels, pairs: list[str], section=None,
                     key: str = "interactions", title: str | None = None):
    """Figure: one row per pair, measured spots | super-resolved map
    (:func:`interaction_map`). Returns the matplotlib Figure."""
    plt = _plt()
    fig, axes = plt.subplots(len(pairs), 2, figsize=(10.4, 4.6 * len(pairs)), squeeze=False)
    thumb = None if section is None else section.image.thumbnail(1024)  # read once
    for i, pair in enumerate(pairs):
        interaction_map(spots, pair, section=section, ax=axes[i, 0], key=key,
                        title=f"{pair}: measured spots", thumbnail=thumb)
        interaction_map(superpixels, pair, section=section, ax=axes[i, 1], key=key,
                        title=f"{pair}: super-resolved", thumbnail=thumb)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def interactions_top(tables: dict, n: int = 20, title: str | None = None):
    """Figure: for each ``{label: global table}`` (:func:`histosr.tl.interactions`), the
    ``n`` first pairs as bars of Moran's R, each labelled with its BH q-value."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(tables), figsize=(5.6 * len(tables), 0.32 * n + 1.4),
                             squeeze=False)
    for ax, (label, t) in zip(axes[0], tables.items()):
        t = t.head(n)
        y = np.arange(len(t))[::-1]
        ax.barh(y, t["morans_r"].to_numpy(), color=np.where(t["qval"] < 0.05, "#3b6fb6",
                                                              "#b0b0b0"))
        ax.set_yticks(y)
        ax.set_yticklabels([f"{i}  q={q:.2g}" for i, q in zip(t.index, t["qval"])], fontsize=7)
        ax.set_xlabel("global bivariate Moran's R")
        ax.set_title(label, fontsize=10)
        ax.axvline(0, color="k", lw=0.5)
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
