"""Synthetic sections made of known cells: planted nuclei, cells and per-cell counts.

:func:`synthetic_cells_section` draws the four tissue classes of
:func:`histosr.simulate.synthetic_section` (same class map and colours), plants
non-overlapping elliptic nuclei of each class's size and density, grows them into cells
(``expand_um``, without overlap, inside the tissue) and gives every cell Poisson counts:

* ``VIS_<class>_<i>``: high in the cells of one class (visible: the nuclei show the class);
* ``GRAD_<i>``: smooth fields over the section (invisible in the image);
* ``MIX_<class>_<i>``: a class effect times a smooth field;
* ``NOISE_<i>``: the same rate everywhere.

Each cell's rate is proportional to its area, times a per-cell size factor (log-normal), so
cells of one class still differ. The 8 um truth cube is the cells' counts split over the
superpixels in proportion to the cell area inside each (as Xenium cells are in
:func:`histosr.simulate.truth_from_cells`); :func:`synthetic_cells_visium` pools it into
pseudo-Visium spots. ``truth["cells"]`` keeps what a cell-level score needs: the nucleus and
cell label images (0.5 um/px, the image's own pixels), the cell ids (= labels), their counts,
centroids, classes and areas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from ..geometry import SP_PX, SP_UM, TARGET_UM_PER_PX
from ..image import ArrayImage
from ..section import Section, make_counts, validate
from .synthetic import (
    _BACKGROUND,
    _STYLE,
    CLASSES,
    _class_map,
    _smooth_field,
    gene_kind_counts,
    pseudo_visium,
    visible_profile,
)

_SUB = 4  # the class map's 2 um cells: 4 px each


def _plant(rng, tissue_cls: np.ndarray, n_px: int, um: float, gap_um: float = 1.0):
    """Non-overlapping nuclei: (cy, cx, ra, rb, theta, class) arrays in px. Candidates of
    each class at its density are accepted in random order when their circumscribed circle
    keeps ``gap_um`` from every accepted one (a grid hash keeps this linear)."""
    area_um2 = (n_px * um) ** 2
    cand = []
    for k, name in enumerate(CLASSES):
        st = _STYLE[name]
        n = rng.poisson(st["dens"] / 1000.0 * area_um2)
        cy, cx = rng.uniform(0, n_px, n), rng.uniform(0, n_px, n)
        r_um = rng.uniform(*st["r"], n)
        e = st["elong"] * rng.uniform(0.85, 1.15, n)
        th = rng.uniform(0, np.pi, n)
        ok = tissue_cls[(cy // _SUB).astype(int), (cx // _SUB).astype(int)] == k
        cand.append(np.stack([cy, cx, r_um * np.sqrt(e) / um, r_um / np.sqrt(e) / um, th,
                              np.full(n, k)], 1)[ok])
    cand = np.concatenate(cand)
    cand = cand[rng.permutation(len(cand))]
    cell = 12.0 / um  # hash cell side (px): more than the widest nucleus plus the gap
    gap = gap_um / um
    grid: dict[tuple[int, int], list[int]] = {}
    keep = []
    for i, (cy, cx, ra, _, _, _) in enumerate(cand):
        gy, gx = int(cy // cell), int(cx // cell)
        ok = True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                for j in grid.get((gy + dy, gx + dx), ()):
                    if np.hypot(cand[j, 0] - cy, cand[j, 1] - cx) < ra + cand[j, 2] + gap:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            grid.setdefault((gy, gx), []).append(i)
            keep.append(i)
    return cand[np.array(keep, dtype=np.int64)]


def _stamp(nuc: np.ndarray, n_px: int) -> np.ndarray:
    """int32 (n_px, n_px) labels 1..n of the ellipses (px units)."""
    lab = np.zeros((n_px, n_px), np.int32)
    for i, (y, x, ra, rb, th, _) in enumerate(nuc):
        R = int(np.ceil(ra)) + 1
        y0, y1 = max(int(y) - R, 0), min(int(y) + R + 1, n_px)
        x0, x1 = max(int(x) - R, 0), min(int(x) + R + 1, n_px)
        gy, gx = np.mgrid[y0:y1, x0:x1]
        dx, dy = gx + 0.5 - x, gy + 0.5 - y
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        inside = (u / ra) ** 2 + (v / rb) ** 2 <= 1.0
        lab[y0:y1, x0:x1][inside] = i + 1
    return lab


def _render(rng, lab_px: np.ndarray, nuclei: np.ndarray, nuc_cls: np.ndarray) -> np.ndarray:
    """H&E-like RGB uint8: class backgrounds with a mottled texture, nuclei in their class's
    hematoxylin colour (per-nucleus intensity, a little chromatin texture), blur and noise."""
    n_px = lab_px.shape[0]
    table = np.array([_BACKGROUND] + [_STYLE[c]["bg"] for c in CLASSES], dtype=np.float32)
    mott = ndimage.gaussian_filter(rng.standard_normal((n_px // 4, n_px // 4), np.float32), 2.0)
    mott = np.repeat(np.repeat(mott * (6.0 / (mott.std() + 1e-9)), 4, axis=0), 4, axis=1)
    mott[lab_px < 0] = 0.0
    img = table[lab_px + 1] + mott[..., None] * np.array([0.6, 1.0, 0.7], np.float32)
    if len(nuc_cls):
        cols = np.array([_STYLE[c]["nuc"] for c in CLASSES], np.float32)[nuc_cls]
        cols *= rng.uniform(0.85, 1.12, (len(nuc_cls), 1)).astype(np.float32)
        inside = nuclei > 0
        chrom = 1.0 + 0.08 * rng.standard_normal(int(inside.sum())).astype(np.float32)
        img[inside] = 0.15 * img[inside] + 0.85 * cols[nuclei[inside] - 1] * chrom[:, None]
    img = ndimage.gaussian_filter(img, (0.8, 0.8, 0))
    img += rng.standard_normal(img.shape, np.float32) * np.float32(4.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_cells_section(seed: int = 0, size_um: float = 800.0, n_genes: int = 40, *,
                            tissue_frac: float = 0.72, mean_count: float = 1.5,
                            expand_um: float = 15.0, size_sd: float = 0.3,
                            name: str | None = None) -> Section:
    """A synthetic section of known cells (see the module docstring), 0.5 um/px.

    Its spots are its tissue superpixels with the truth counts (an 8 um "bin" section, like
    :func:`histosr.simulate.synthetic_section`); ``truth`` holds ``cube``, ``genes``,
    ``mask`` and ``cells``: ``nuclei`` / ``labels`` (int32 label images, 0.5 um/px, cell
    label = nucleus label), ``label_um_per_px``, ``ids`` (int labels 1..n), ``counts``
    (n, G) float32, ``xy`` (cell centroids, full-res px, x = column), ``nucleus_xy``,
    ``area_um2``, ``class`` (index into :data:`CLASSES`). ``mean_count``: average expected
    count per gene and tissue superpixel; ``expand_um``: nuclei grown into cells by this
    much (inside the tissue); ``size_sd``: sd of the per-cell log size factor.
    """
    from skimage.segmentation import expand_labels

    from ..cells import label_weights
    from .from_real import _cube, _row_normalise

    rng = np.random.default_rng(seed)
    um = TARGET_UM_PER_PX
    n_sp = max(int(round(size_um / SP_UM)), 8)
    n_px = n_sp * SP_PX
    tissue, cls = _class_map(rng, n_sp * _SUB, tissue_frac)
    tissue_cls = np.where(tissue, cls, -1).astype(np.int8)
    nuc = _plant(rng, tissue_cls, n_px, um)
    nuclei = _stamp(nuc, n_px)
    lab_px = np.repeat(np.repeat(tissue_cls, _SUB, axis=0), _SUB, axis=1)
    cells = expand_labels(nuclei, int(round(expand_um / um)))
    cells[lab_px < 0] = 0
    cells[nuclei > 0] = nuclei[nuclei > 0]
    n = len(nuc)
    nuc_cls = nuc[:, 5].astype(np.int64)
    image = _render(rng, lab_px, nuclei, nuc_cls)

    # per-cell geometry
    ids = np.arange(1, n + 1)
    area_px = np.bincount(cells.ravel(), minlength=n + 1)[1:].astype(np.float64)
    cy = ndimage.mean(np.mgrid[0:n_px, 0:n_px][0] + 0.5, cells, ids) if n else np.zeros(0)
    cx = ndimage.mean(np.mgrid[0:n_px, 0:n_px][1] + 0.5, cells, ids) if n else np.zeros(0)
    xy = np.stack([cx, cy], 1) if n else np.zeros((0, 2))
    area_um2 = area_px * um**2

    # genes: per-cell rates (per um^2 of cell), by kind
    n_vis, n_grad, n_mix, n_noise = gene_kind_counts(n_genes)
    onehot = np.eye(len(CLASSES))[nuc_cls] if n else np.zeros((0, len(CLASSES)))
    rc = np.clip((xy[:, ::-1] / SP_PX).astype(int), 0, n_sp - 1) if n else np.zeros((0, 2), int)
    genes, kind, rates = [], {}, []
    for i in range(n_vis):
        g, prof = visible_profile(rng, i)
        rates.append(onehot @ prof)
        genes.append(g)
        kind[g] = "visible"
    yy, xx = (np.mgrid[0:n_sp, 0:n_sp] + 0.5) / n_sp - 0.5
    for i in range(n_grad):
        th = rng.uniform(0, 2 * np.pi)
        f = np.cos(th) * xx + np.sin(th) * yy
        f = f / (f.std() + 1e-12) + 0.8 * _smooth_field(rng, (n_sp, n_sp), 300.0 / SP_UM / 2)
        f = np.exp(0.6 * f / (f.std() + 1e-12))
        rates.append(f[rc[:, 0], rc[:, 1]])
        g = f"GRAD_{i}"
        genes.append(g)
        kind[g] = "gradient"
    for i in range(n_mix):
        k = int(rng.integers(len(CLASSES)))
        prof = np.full(len(CLASSES), 0.3)
        prof[k] = 2.5
        f = np.exp(0.5 * _smooth_field(rng, (n_sp, n_sp), 250.0 / SP_UM / 2))
        rates.append((onehot @ prof) * f[rc[:, 0], rc[:, 1]])
        g = f"MIX_{CLASSES[k].upper()}_{i}"
        genes.append(g)
        kind[g] = "mixed"
    for i in range(n_noise):
        rates.append(np.ones(n))
        g = f"NOISE_{i}"
        genes.append(g)
        kind[g] = "noise"
    rate = np.stack(rates, axis=1) if n else np.zeros((0, len(genes)))
    size = np.exp(size_sd * rng.standard_normal(n) - size_sd**2 / 2)
    rate = rate * (area_um2 * size)[:, None]
    # scale: mean_count per gene per tissue superpixel (64 um^2 of cells)
    per_um2 = rate.sum(axis=0) / max(float(area_um2.sum()), 1e-9)
    rate = rate * (mean_count / SP_UM**2 / np.maximum(per_um2, 1e-12))
    rate = rate * rng.uniform(0.5, 2.0, len(genes))
    counts = rng.poisson(rate).astype(np.float32)

    # 8 um truth: each cell's counts split by the area of the cell in each superpixel
    shape = (n_sp, n_sp)
    if n:
        Wm, wid, _ = label_weights(cells, 1.0 / SP_PX, shape)  # rows: labels wid (sorted)
        cube = _cube(_row_normalise(Wm), _csr(counts[wid - 1]), shape)
        cover = np.asarray(Wm.sum(axis=0)).ravel().reshape(shape)
    else:
        cube = np.zeros((*shape, len(genes)), np.float32)
        cover = np.zeros(shape)
    mask = cover >= 0.5
    rows, cols_ = np.nonzero(mask)
    grid_xy = np.stack([(cols_ + 0.5) * SP_PX, (rows + 0.5) * SP_PX], axis=1).astype(np.float64)
    obs = pd.DataFrame({"sp_row": rows, "sp_col": cols_})
    spot_counts = make_counts(cube[rows, cols_], [f"sp{r}_{c}" for r, c in zip(rows, cols_)],
                              genes, grid_xy, obs=obs)
    nuc_xy = np.stack([nuc[:, 1], nuc[:, 0]], 1) if n else np.zeros((0, 2))
    truth = {"cube": cube, "genes": list(genes), "mask": mask,
             "source": "synthetic cells (area split)",
             "cells": {"nuclei": nuclei, "labels": cells, "label_um_per_px": um, "ids": ids,
                       "counts": counts, "xy": xy, "nucleus_xy": nuc_xy,
                       "area_um2": area_um2, "class": nuc_cls}}
    sec = Section(name=name or f"cells{seed}", image=ArrayImage(image), um_per_px=um,
                  counts=spot_counts, spot_diameter_um=SP_UM, platform="synthetic",
                  truth=truth,
                  meta={"seed": int(seed), "size_um": n_sp * SP_UM, "gene_kind": kind,
                        "classes": list(CLASSES), "n_cells": int(n), "expand_um": expand_um})
    return validate(sec)


def _csr(X: np.ndarray):
    import scipy.sparse as sp

    return sp.csr_matrix(np.asarray(X, dtype=np.float64))


def synthetic_cells_visium(seed: int = 0, **kwargs) -> Section:
    """:func:`synthetic_cells_section` pooled into pseudo-Visium spots
    (:func:`histosr.simulate.pseudo_visium`); ``truth["cells"]`` is kept."""
    sec = synthetic_cells_section(seed=seed, **kwargs)
    return pseudo_visium(sec, name=sec.name)


__all__ = ["synthetic_cells_section", "synthetic_cells_visium"]
