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
             spots=None, prefix: str = "", zoom: bool = True, dpi: int = 80,
             truth=None) -> list[Path]:
    """One PNG per gene that can be compared by eye (:func:`preview`): the H&E cropped to
    the tissue, the measured ``spots`` and the prediction (and a simulation's ``truth``) on
    the same quantity and colour range, and for 8 um maps a zoom at full superpixel
    resolution. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = PreviewContext(adata, section, spots)  # the H&E crop is read once for all genes
    paths = []
    for g in genes:
        fig = preview(adata, g, section=section, spots=spots, zoom=zoom, context=ctx,
                      truth=truth)
        paths.append(save_figure(fig, out_dir / f"{prefix}{g}.png", dpi=dpi, palette=True))
    return paths


#: side of the zoomed window of a preview, in 8 um superpixels (512 um)
ZOOM_SP = 64


class PreviewContext:
    """What every gene's preview of one prediction shares: the crop (full-res px, the
    tissue's bounding box plus a margin), the H&E crop, the measured spots' library sizes
    and footprint areas. Built once per :func:`previews` call."""

    def __init__(self, adata, section=None, spots=None, max_side: int = 600):
        from .outputs import is_superpixel, observation_diameter_px

        self.superpixel = is_superpixel(adata)
        info = adata.uns.get("histosr", {})
        self.scale = str(info.get("scale", "counts"))
        self.log = self.scale.startswith("log1p")
        xy = [np.asarray(adata.obsm["spatial"], dtype=np.float64)]
        self.spots = spots if spots is not None and spots.n_obs else None
        if self.spots is not None:
            xy.append(np.asarray(self.spots.obsm["spatial"], dtype=np.float64))
        xy = np.concatenate(xy)
        self.section = section
        self.um_per_px = float(section.um_per_px) if section is not None else None
        if section is not None:
            self.obs_d = observation_diameter_px(adata, section)
            self.spot_d = float(section.spot_diameter_um) / float(section.um_per_px)
            H, W = section.image.shape[:2]
        else:
            self.obs_d = self.spot_d = float(_sp_size_px(xy, *_rc(adata))) \
                if self.superpixel else _pitch(xy)
            H, W = (xy[:, 1].max() + self.obs_d, xy[:, 0].max() + self.obs_d)
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        pad = max(self.spot_d, 0.04 * float(max(hi - lo)), self.obs_d)
        x0, y0 = max(0.0, lo[0] - pad), max(0.0, lo[1] - pad)
        x1, y1 = min(float(W), hi[0] + pad), min(float(H), hi[1] + pad)
        self.box = (int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1)))  # x0, y0, x1, y1
        self.he = None if section is None else _he_crop(section.image, self.box, max_side)
        # measured spots on the prediction's quantity (see preview)
        self.spot_norm = None
        if self.spots is not None:
            self.spot_norm = self._spot_normaliser(section)

    def _spot_normaliser(self, section):
        """Per measured spot, what its counts are divided by (superpixels in its footprint:
        UMI per 8 um superpixel) or its library size (log1p CP10k)."""
        from .arrays import row_sums

        ids = self.spots.obs_names
        known = section is not None and bool(ids.isin(section.counts.obs_names).all())
        if self.log:  # the library is every gene of the spot, not only those shown
            lib = row_sums(section.counts[ids].X) if known else row_sums(self.spots.X)
            return np.asarray(lib, dtype=np.float64).ravel()
        if self.superpixel and section is not None:
            from .geometry import footprint_matrix, grid_for

            fps = [p[None, :] for p in np.asarray(self.spots.obsm["spatial"], np.float64)]
            if section.footprints is not None and known:
                where = section.counts.obs_names.get_indexer(ids)
                fps = [section.footprints[i] for i in where]
            F = footprint_matrix(grid_for(section), fps, section.spot_diameter_um)
            return np.maximum(np.asarray(F.sum(axis=1), dtype=np.float64).ravel(), 1.0)
        return np.ones(self.spots.n_obs)

    def unit(self) -> str:
        if self.log:
            return "log1p CP10k"
        if self.superpixel:
            return "UMI per 8 um superpixel"
        return "UMI per spot" if self.scale.startswith("counts") else self.scale

    def measured(self, gene: str) -> np.ndarray | None:
        from .arrays import gene_values

        if self.spots is None or gene not in self.spots.var_names:
            return None
        v = gene_values(self.spots, gene)
        if self.log:
            scale = np.divide(1e4, self.spot_norm, out=np.zeros_like(self.spot_norm),
                              where=self.spot_norm > 0)
            return np.log1p(v * scale)
        return v / self.spot_norm


def _rc(adata) -> tuple[np.ndarray, np.ndarray]:
    return adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy()


def _pitch(xy: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(xy) < 2:
        return 16.0
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def _he_crop(image, box, max_side: int) -> np.ndarray:
    """The H&E inside ``box`` (x0, y0, x1, y1 full-res px), longest side about ``max_side``
    px: from the 2000 px thumbnail when that is fine enough (no new read), else a reduced
    read of the region."""
    from .image import thumbnail_factor
    from .outputs import HIRES_PX

    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    f = thumbnail_factor(image.shape, HIRES_PX)
    if max(w, h) / f >= 0.6 * max_side:
        a = image.thumbnail(HIRES_PX)[y0 // f : -(-y1 // f), x0 // f : -(-x1 // f)]
    else:
        a = image.read_scaled(y0, x0, h, w, max(1, int(max(w, h) // max_side)))
    k = max(a.shape[:2]) / max_side
    if k > 1:  # no more pixels than the panel shows (drawing and PNG size)
        from .image import _resize

        a = _resize(a, max(1, int(a.shape[0] / k)), max(1, int(a.shape[1] / k)))
    return a


def _faded(he: np.ndarray, keep: float = 0.35) -> np.ndarray:
    """The H&E blended with white: a background that leaves the colour map readable."""
    return (255.0 - (255.0 - he.astype(np.float32)) * keep).astype(np.uint8)


def _grid_image(adata, v: np.ndarray) -> tuple[np.ndarray, float]:
    gh, gw = adata.uns["histosr"]["grid_shape"]
    r, c = _rc(adata)
    img = np.full((gh, gw), np.nan, dtype=np.float32)
    img[r, c] = v
    return img, _sp_size_px(np.asarray(adata.obsm["spatial"]), r, c)


def _circles(ax, xy, values, diameter, cmap, norm, edge=None):
    from matplotlib.collections import EllipseCollection

    xy = np.asarray(xy, dtype=np.float64)
    ec = EllipseCollection(np.full(len(xy), diameter), np.full(len(xy), diameter),
                           np.zeros(len(xy)), units="xy", offsets=xy,
                           offset_transform=ax.transData, cmap=cmap, norm=norm,
                           linewidths=0.0 if edge is None else 0.8)
    if values is None:
        ec.set_facecolor("none")
        ec.set_edgecolor(edge or "white")
    else:
        ec.set_array(np.asarray(values, dtype=np.float64))
        if edge is not None:
            ec.set_edgecolor(edge)
    ax.add_collection(ec)
    return ec


def _validated(adata) -> bool:
    from .outputs import HELDOUT_PCC

    return HELDOUT_PCC in adata.var


def _validation_text(adata, gene: str) -> str:
    """The gene's self-validation (``var`` columns of :mod:`histosr.outputs`), or 'not
    validated'."""
    from .outputs import HELDOUT_PCC, HELDOUT_PCC_INTERP, IN_SAMPLE_PCC

    var = adata.var
    parts = []
    h = var[HELDOUT_PCC].get(gene) if HELDOUT_PCC in var else None
    if h is not None and np.isfinite(h):
        txt = f"held-out PCC {h:.2f}"
        i = var[HELDOUT_PCC_INTERP].get(gene) if HELDOUT_PCC_INTERP in var else None
        if i is not None and np.isfinite(i):
            txt += f" (interpolation {i:.2f}{'; not better' if h <= i else ''})"
        parts.append(txt)
    else:
        parts.append("not validated (no held-out score)")
    ins = var[IN_SAMPLE_PCC].get(gene) if IN_SAMPLE_PCC in var else None
    if ins is not None and np.isfinite(ins):
        parts.append(f"in-sample spot PCC {ins:.2f}")
    return "; ".join(parts)


def _panel_grid(plt, widths: list[float], colorbars: list[bool], heights: list[float],
                top: float = 0.75, title: float = 0.3, cbar: float = 0.95):
    """A figure of ``len(heights)`` rows x ``len(widths)`` image panels (inches), each with
    room for a title and, where ``colorbars``, a colour bar on its right. Fixed positions:
    far cheaper than constrained layout for image-heavy figures. Returns (fig, rows of
    (ax, colorbar ax or None))."""
    pad = 0.12
    cell = [w + (cbar if c else 0.0) + pad for w, c in zip(widths, colorbars)]
    W = sum(cell) + pad
    H = top + sum(h + title for h in heights) + pad
    fig = plt.figure(figsize=(W, H))
    rows = []
    y = H - top
    for h in heights:
        y -= title + h
        x = pad
        row = []
        for w, c, cw in zip(widths, colorbars, cell):
            ax = fig.add_axes((x / W, y / H, w / W, h / H))
            cax = fig.add_axes(((x + w + 0.08) / W, (y + 0.1 * h) / H, 0.12 / W, 0.8 * h / H)) \
                if c else None
            row.append((ax, cax))
            x += cw
        rows.append(row)
    return fig, rows


def _grid_window(shape, box, sp_px: float) -> tuple[int, int, int, int]:
    """Rows and columns (r0, r1, c0, c1) of the superpixel grid inside ``box`` (x0, y0, x1,
    y1 full-res px): only that part is handed to imshow."""
    x0, y0, x1, y1 = box
    r0, c0 = max(0, int(y0 // sp_px)), max(0, int(x0 // sp_px))
    r1 = min(shape[0], int(np.ceil(y1 / sp_px)) + 1)
    c1 = min(shape[1], int(np.ceil(x1 / sp_px)) + 1)
    return r0, max(r1, r0 + 1), c0, max(c1, c0 + 1)


def _block_sums(img: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per k x k block of superpixels: the number on tissue (finite), the sum of the values
    and of their squares (float64), a strip of k rows at a time (no full-size float64
    temporaries: 5,000 x 5,000 on a 40,000 px slide)."""
    gh, gw = img.shape
    H, W = -(-gh // k), -(-gw // k)
    t, s1, s2 = np.zeros((H, W)), np.zeros((H, W)), np.zeros((H, W))
    for i in range(H):
        strip = np.full((k, W * k), np.nan, dtype=np.float64)
        part = img[i * k : (i + 1) * k]
        strip[: len(part), :gw] = part
        fin = np.isfinite(strip)
        v = np.where(fin, strip, 0.0)
        t[i] = fin.reshape(k, W, k).sum(axis=(0, 2))
        s1[i] = v.reshape(k, W, k).sum(axis=(0, 2))
        s2[i] = (v * v).reshape(k, W, k).sum(axis=(0, 2))
    return t, s1, s2


#: longest side, in map pixels, of an 8 um map handed to matplotlib (block means beyond)
DISPLAY_SP = 1024


def _display_grid(img: np.ndarray) -> tuple[np.ndarray, int]:
    """(``img`` or the NaN-aware means of its k x k blocks, k): at most :data:`DISPLAY_SP`
    pixels a side (k = 1, ``img`` itself, below)."""
    k = max(1, -(-max(img.shape) // DISPLAY_SP))
    if k == 1:
        return img, 1
    t, s1, _ = _block_sums(img, k)
    return np.where(t > 0, s1 / np.maximum(t, 1), np.nan).astype(np.float32), k


#: longest side of the grid the zoom window is searched on (coarser blocks beyond it)
ZOOM_SEARCH_SP = 1024


def _zoom_window(img: np.ndarray, n: int) -> tuple[int, int, int]:
    """(row0, col0, side) of the ``n`` x ``n`` window (in superpixels) where ``img`` (NaN
    off tissue) varies most over tissue, among windows at least 80 % tissue (else the most
    tissue): where 8 um detail is there to see. Searched on blocks of k x k superpixels
    when the grid is larger than :data:`ZOOM_SEARCH_SP` (k = 1 below: every window)."""
    from scipy import ndimage

    gh, gw = img.shape
    n = int(min(n, gh, gw))
    k = max(1, -(-max(gh, gw) // ZOOM_SEARCH_SP))
    t, s1, s2 = _block_sums(img, k)
    nk = max(1, int(round(n / k)))
    cnt = ndimage.uniform_filter(t, nk, mode="constant")
    w = np.maximum(cnt, 1e-9 * k * k)
    m1 = ndimage.uniform_filter(s1, nk, mode="constant") / w
    m2 = ndimage.uniform_filter(s2, nk, mode="constant") / w
    score = np.where(cnt >= 0.8 * cnt.max(), m2 - m1 * m1, -np.inf)
    r, c = np.unravel_index(int(np.argmax(score)), score.shape)
    r, c = r * k + k // 2, c * k + k // 2  # the block's centre superpixel
    r0 = int(np.clip(r - n // 2, 0, gh - n))
    c0 = int(np.clip(c - n // 2, 0, gw - n))
    return r0, c0, n


def preview(adata, gene: str, section=None, spots=None, zoom: bool = True,
            context: PreviewContext | None = None, truth=None, cmap: str = "magma"):
    """Figure comparing one gene's measured spots with its prediction, cropped to the tissue.

    Panels: the H&E crop | the measured ``spots`` | the prediction (| the ``truth``: a
    superpixel AnnData on the same grid, for simulations), all but the H&E on the same
    quantity and colour range (0, or for log1p CP10k the smallest 1st percentile, to the
    largest 99th percentile of measured and predicted values): an 8 um map
    (superpixel AnnData, counts) shows UMI per 8 um superpixel and each measured spot its
    counts divided by the number of superpixels in its footprint (what a consistent map
    averages to there); a log1p CP10k prediction is compared with the spots' log1p CP10k
    (each spot's own library). For an 8 um map with ``zoom``, a second row shows a 512 um
    window at full superpixel resolution (where the map varies most), measured spots
    outlined on the maps. The title gives the gene's self-validation from ``adata.var``
    (:data:`histosr.outputs.HELDOUT_PCC`), or says "not validated"."""
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    from .arrays import gene_values

    plt = _plt()
    ctx = context or PreviewContext(adata, section, spots)
    pv = gene_values(adata, gene)
    meas = ctx.measured(gene)
    maps = {}  # panel -> (grid image, superpixel px) for 8 um maps
    if ctx.superpixel:
        maps["predicted"] = _grid_image(adata, pv)
    extra = ""
    if truth is not None and gene in truth.var_names and ctx.superpixel:
        tv = gene_values(truth, gene)
        maps["truth"] = _grid_image(truth, tv)
        common = adata.obs_names.intersection(truth.obs_names)
        if len(common) > 2:
            a = pv[adata.obs_names.get_indexer(common)]
            b = tv[truth.obs_names.get_indexer(common)]
            if a.std() > 0 and b.std() > 0:
                extra = f"; PCC with the 8 um truth {np.corrcoef(a, b)[0, 1]:.2f}"
    # the range comes from what is compared (a simulated truth is Poisson-noisy at 8 um:
    # its peaks would wash out both)
    tops = [v for v in ([pv] + ([meas] if meas is not None else [])) if np.isfinite(v).any()]
    vmax = max([float(np.nanpercentile(v, 99)) for v in tops] + [0.0])
    # counts start at 0; log1p CP10k of expressed genes sits far above it (ERBB2 ~3-5)
    vmin = min(float(np.nanpercentile(v, 1)) for v in tops) if ctx.log and tops else 0.0
    norm = Normalize(vmin, vmax if vmax > vmin else vmin + 1.0)
    unit = ctx.unit()
    x0, y0, x1, y1 = ctx.box
    show_zoom = bool(zoom and ctx.superpixel and ctx.he is not None)
    panels = [p for p in ("he", "measured", "predicted", "truth")
              if not (p == "he" and ctx.he is None) and not (p == "measured" and meas is None)
              and not (p == "truth" and "truth" not in maps)]
    aspect = (y1 - y0) / max(1.0, (x1 - x0))
    pw = 3.6
    ph = float(np.clip(pw * aspect, 2.0, 5.0))
    heights = [ph, pw] if show_zoom else [ph]
    fig, axes = _panel_grid(plt, [pw] * len(panels), [p != "he" for p in panels], heights)
    boxes = [(ctx.box, ctx.he, False)]
    win = None
    if show_zoom:
        img, sp_px = maps["predicted"]
        r0, c0, n = _zoom_window(img, ZOOM_SP)
        win = (int(c0 * sp_px), int(r0 * sp_px), int(np.ceil((c0 + n) * sp_px)),
               int(np.ceil((r0 + n) * sp_px)))
        f = max(1, int((win[2] - win[0]) // 420))
        zhe = ctx.section.image.read_scaled(win[1], win[0], win[3] - win[1], win[2] - win[0], f)
        boxes.append((win, zhe, True))
    titles = {"measured": f"measured ({0 if meas is None else len(meas)} spots)",
              "predicted": (f"predicted, 8 um ({adata.n_obs:,} superpixels)" if ctx.superpixel
                            else f"predicted ({adata.n_obs:,} spots)"),
              "truth": "truth, 8 um (simulated)"}
    for i, (box, he, zoomed) in enumerate(boxes):
        bx0, by0, bx1, by1 = box
        ext = (bx0, bx1, by1, by0)
        faded = None if he is None else _faded(he)
        size = f"{(bx1 - bx0) * ctx.um_per_px / 1000:.1f} mm" if ctx.um_per_px else ""
        for j, panel in enumerate(panels):
            ax, cax = axes[i][j]
            ax.set_axis_off()
            if panel == "he":
                ax.imshow(he, extent=ext, interpolation="nearest")
                ax.set_title(f"H&E zoom ({size})" if zoomed else f"H&E ({size} wide)",
                             fontsize=9)
            elif panel in maps:  # the map covers the tissue: no H&E under it
                img, sp_px = maps[panel]
                r_a, r_b, c_a, c_b = _grid_window(img.shape, box, sp_px)
                # a panel is ~300 px wide: a 40,000 px slide's 5,000 x 5,000 window goes
                # to matplotlib as means of k x k superpixels (its resampling copies the
                # array several times in float64)
                shown, k = _display_grid(img[r_a:r_b, c_a:c_b])
                r_b, c_b = r_a + shown.shape[0] * k, c_a + shown.shape[1] * k
                im = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest",
                               extent=(c_a * sp_px, c_b * sp_px, r_b * sp_px, r_a * sp_px))
                if zoomed and ctx.spots is not None:
                    _circles(ax, ctx.spots.obsm["spatial"], None, ctx.spot_d, cmap, norm,
                             edge="white")
                ax.set_title(f"{panel} zoom: 1 px = 8 um, circles = spots" if zoomed
                             else titles[panel], fontsize=9)
            else:
                if faded is not None:
                    ax.imshow(faded, extent=ext, interpolation="nearest")
                if panel == "measured":
                    im = _circles(ax, ctx.spots.obsm["spatial"], meas, ctx.spot_d, cmap, norm)
                else:
                    im = _circles(ax, adata.obsm["spatial"], pv, ctx.obs_d, cmap, norm)
                ax.set_title(f"{panel} spots, zoom" if zoomed else titles[panel], fontsize=9)
            if win is not None and not zoomed:
                ax.add_patch(Rectangle(win[:2], win[2] - win[0], win[3] - win[1], fill=False,
                                       ec="black" if panel == "he" else "cyan", lw=1))
            if panel != "he":
                cb = fig.colorbar(im, cax=cax)
                cb.set_label(unit, fontsize=8)
                cb.ax.tick_params(labelsize=7)
            ax.set_xlim(bx0, bx1)
            ax.set_ylim(by1, by0)
    method = adata.uns.get("histosr", {}).get("method", "")
    # a simulation's truth says more than "not validated"
    score = extra[2:] if extra and not _validated(adata) else \
        _validation_text(adata, gene) + extra
    fig.suptitle(f"{gene}" + (f" - {method}" if method else "") +
                 f"\n{score}; colour: {unit}, same range in every panel", fontsize=10)
    return fig


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def save_figure(fig, path: str | Path, dpi: int = 90, palette: bool = False,
                **kwargs) -> Path:
    """Write a figure as PNG atomically (temp file + rename; the file name made safe) and
    close it. ``palette``: 256 colours (PIL's fast octree): H&E texture makes full-colour
    PNGs 4-5x larger, and previews travel inside the report."""
    import os

    plt = _plt()
    path = Path(path)
    path = path.with_name(_safe(path.stem) + (path.suffix or ".png"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if palette:
        from PIL import Image

        fig.set_dpi(dpi)
        fig.canvas.draw()
        rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
        q = rgb.quantize(256, method=Image.Quantize.FASTOCTREE)
        pal = np.asarray(q.getpalette()[: 3 * 256], dtype=np.int32).reshape(-1, 3)
        pal[pal.min(axis=1) >= 248] = 255  # the octree's near-white back to the page's white
        q.putpalette(pal.astype(np.uint8).ravel().tolist())
        q.save(tmp, format="PNG")
    else:
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
