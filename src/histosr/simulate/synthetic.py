"""Synthetic sections with known 8 um expression, and pseudo-Visium spots made from any
section that carries an 8 um truth (METHODS 2.1 steps 6-7, BENCHMARKS P4).

``synthetic_section`` draws an H&E-like image at 0.5 um/px with four tissue classes whose
colour and texture differ (tumour: dense large purple nuclei; stroma: pink eosin with sparse
elongated nuclei; immune: small dense dark nuclei; fat: white adipocytes with thin pink
walls) on a white background, and a truth cube of counts per 8 um superpixel with four kinds
of genes:

* ``VIS_<class>_<i>``: driven by the cell class of the superpixel (visible in the image);
* ``GRAD_<i>``: smooth spatial fields unrelated to the image (invisible: only spots tell);
* ``MIX_<i>``: a class effect times a smooth field;
* ``NOISE_<i>``: a constant rate over the tissue (pure Poisson noise).

Every truth count is Poisson around its rate, so the truth itself is noisy at 8 um.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import ndimage

from ..geometry import SP_PX, TARGET_UM_PER_PX, footprint_matrix, grid_for
from ..image import ArrayImage
from ..section import Section, SectionError, make_counts, validate

CLASSES = ("tumour", "stroma", "immune", "fat")
_SUB = 4  # the class map is drawn on a 2 um grid (4 px), 4x4 cells per superpixel

# RGB of each class's background and nuclei (uint8-ish), nucleus radii (um) and density
# (nuclei per 1000 um^2), elongation (axis ratio)
_STYLE = {
    "tumour": dict(bg=(214, 160, 204), nuc=(86, 44, 138), r=(3.6, 5.0), dens=9.0, elong=1.3),
    "stroma": dict(bg=(236, 150, 186), nuc=(112, 62, 150), r=(1.6, 2.2), dens=1.5, elong=3.5),
    "immune": dict(bg=(200, 150, 200), nuc=(48, 26, 96), r=(2.0, 2.8), dens=22.0, elong=1.05),
    "fat": dict(bg=(248, 244, 248), nuc=(120, 70, 150), r=(1.5, 2.0), dens=0.2, elong=2.5),
}
_BACKGROUND = (243, 243, 245)


def gene_kind_counts(n_genes: int) -> tuple[int, int, int, int]:
    """How many of ``n_genes`` are visible, gradient, mixed and noise genes (at least one
    visible and one gradient gene); shared by the synthetic and cell-truth sections."""
    n_vis = max(1, int(round(n_genes * 0.4)))
    n_grad = max(1, int(round(n_genes * 0.3)))
    n_mix = max(0, int(round(n_genes * 0.15)))
    return n_vis, n_grad, n_mix, max(0, n_genes - n_vis - n_grad - n_mix)


def visible_profile(rng, i: int) -> tuple[str, np.ndarray]:
    """The ``i``-th image-visible gene: its name and its rate per tissue class (high in
    class ``i % 4``, low elsewhere)."""
    k = i % len(CLASSES)
    prof = np.full(len(CLASSES), 0.15) * rng.uniform(0.5, 1.5, len(CLASSES))
    prof[k] = rng.uniform(2.0, 4.0)
    return f"VIS_{CLASSES[k].upper()}_{i // len(CLASSES)}", prof


def _smooth_field(rng, shape, sigma) -> np.ndarray:
    """Gaussian-smoothed white noise, standardised to mean 0, sd 1. Large ``sigma`` is
    drawn on a coarser grid and upsampled bilinearly (same look, far cheaper)."""
    f_ = max(1, int(sigma // 4))
    small = tuple(-(-n // f_) + 1 for n in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(small), sigma / f_, mode="reflect")
    if f_ > 1:
        f = ndimage.zoom(f, f_, order=1)[: shape[0], : shape[1]]
    return (f - f.mean()) / (f.std() + 1e-12)


def _class_map(rng, n: int, tissue_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """On an n x n grid of 2 um cells: tissue (bool) and class index (0..3)."""
    yy, xx = (np.mgrid[0:n, 0:n] + 0.5) / n - 0.5
    # a blob: an ellipse-like distance, roughened with a smooth random field
    a, b = rng.uniform(0.36, 0.46, size=2)
    d = np.sqrt((xx / a) ** 2 + (yy / b) ** 2)
    d += 0.12 * _smooth_field(rng, (n, n), n / 12)
    tissue = d < np.quantile(d, tissue_frac)
    tissue = ndimage.binary_opening(tissue, iterations=2)
    # classes: argmax of smooth fields with class-specific offsets (immune and fat rarer)
    sig = n / 14
    offs = np.array([0.3, 0.2, -0.1, -0.45])
    fields = np.stack([_smooth_field(rng, (n, n), sig) + o for o in offs])
    cls = fields.argmax(axis=0).astype(np.int8)
    return tissue, cls


def _draw_nuclei(img, rng, cls_px_lookup, k: int, style: dict, um_per_px: float) -> None:
    """Stamp ellipses of class ``k``'s nucleus colour where the class map says ``k``."""
    H, W = img.shape[:2]
    area_um2 = H * W * um_per_px**2
    n = rng.poisson(style["dens"] / 1000.0 * area_um2)
    cx = rng.uniform(0, W, n)
    cy = rng.uniform(0, H, n)
    ok = cls_px_lookup(cy, cx) == k
    cx, cy = cx[ok], cy[ok]
    nuc = np.asarray(style["nuc"], dtype=np.float64)
    for x, y in zip(cx, cy):
        r_um = rng.uniform(*style["r"])
        e = style["elong"] * rng.uniform(0.85, 1.15)
        ra, rb = r_um * np.sqrt(e) / um_per_px, r_um / np.sqrt(e) / um_per_px
        th = rng.uniform(0, np.pi)
        R = int(np.ceil(ra)) + 1
        y0, y1 = max(int(y) - R, 0), min(int(y) + R + 1, H)
        x0, x1 = max(int(x) - R, 0), min(int(x) + R + 1, W)
        if y1 <= y0 or x1 <= x0:
            continue
        gy, gx = np.mgrid[y0:y1, x0:x1]
        dx, dy = gx + 0.5 - x, gy + 0.5 - y
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        inside = (u / ra) ** 2 + (v / rb) ** 2 <= 1.0
        col = nuc * rng.uniform(0.85, 1.12)
        patch = img[y0:y1, x0:x1]
        patch[inside] = 0.15 * patch[inside] + 0.85 * col


def _render(rng, tissue, cls, n_px: int, um_per_px: float) -> np.ndarray:
    """The H&E-like RGB image (uint8, n_px x n_px) from the 2 um class map."""
    rep = n_px // tissue.shape[0]
    lab = np.where(tissue, cls, -1).astype(np.int8)  # -1 = background
    lab_px = np.repeat(np.repeat(lab, rep, axis=0), rep, axis=1)
    # a fibrous texture for stroma and a mottled one for the other tissue backgrounds
    fib = ndimage.gaussian_filter(rng.standard_normal((n_px // 2, n_px // 2), np.float32),
                                  (0.6, 5.0))
    fib = np.repeat(np.repeat(fib * (14.0 / (fib.std() + 1e-9)), 2, axis=0), 2, axis=1)
    mott = ndimage.gaussian_filter(rng.standard_normal((n_px // 4, n_px // 4), np.float32), 2.0)
    mott = np.repeat(np.repeat(mott * (6.0 / (mott.std() + 1e-9)), 4, axis=0), 4, axis=1)
    table = np.array([_BACKGROUND] + [_STYLE[c]["bg"] for c in CLASSES], dtype=np.float32)
    tex = np.where(lab_px == CLASSES.index("stroma"), fib, mott)
    tex[lab_px < 0] = 0.0
    img = table[lab_px + 1] + tex[..., None] * np.array([0.6, 1.0, 0.7], dtype=np.float32)
    del tex, fib, mott
    # adipocytes: white cells with thin pink walls (Voronoi edges of ~45 um cells)
    fat = lab_px == CLASSES.index("fat")
    if fat.any():
        from scipy.spatial import cKDTree

        n_seeds = max(int((n_px * um_per_px) ** 2 / 45.0**2), 2)
        seeds = rng.uniform(0, n_px, (n_seeds, 2))
        pts = np.argwhere(fat) + 0.5
        d, _ = cKDTree(seeds).query(pts, k=2)
        wall = d[:, 1] - d[:, 0] < 3.0 / um_per_px
        img[pts[wall, 0].astype(int), pts[wall, 1].astype(int)] = (226, 150, 190)
    lookup = _make_lookup(lab, rep)
    for k, name in enumerate(CLASSES):
        _draw_nuclei(img, rng, lookup, k, _STYLE[name], um_per_px)
    img = ndimage.gaussian_filter(img, (0.8, 0.8, 0))
    img += rng.standard_normal(img.shape, np.float32) * np.float32(4.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_lookup(lab: np.ndarray, rep: int):
    def lookup(y, x):
        r = np.clip((y // rep).astype(int), 0, lab.shape[0] - 1)
        c = np.clip((x // rep).astype(int), 0, lab.shape[1] - 1)
        return lab[r, c]

    return lookup


def synthetic_section(
    seed: int = 0,
    size_um: float = 1600.0,
    n_genes: int = 40,
    *,
    tissue_frac: float = 0.72,
    mean_count: float = 1.5,
    name: str | None = None,
) -> Section:
    """A synthetic section with a known 8 um truth.

    The image is ``size_um`` square at 0.5 um/px (``size_um`` is rounded to whole
    superpixels). The section's spots are its tissue superpixels themselves (an 8 um
    "bin" section, platform ``"synthetic"``, like Visium HD 8 um bins) with the truth counts;
    ``truth`` holds ``cube`` (H_sp, W_sp, G) Poisson counts, ``genes``, ``mask`` (tissue
    superpixels), ``rate`` (the noiseless expected counts) and ``classes`` (per class, the
    fraction of each superpixel it covers, (H_sp, W_sp, 4)). ``meta["gene_kind"]`` maps
    each gene to ``visible``, ``gradient``, ``mixed`` or ``noise``. ``mean_count`` is the
    average expected count per gene and tissue superpixel.
    """
    rng = np.random.default_rng(seed)
    um_per_px = TARGET_UM_PER_PX
    n_sp = max(int(round(size_um / (SP_PX * um_per_px))), 8)
    n_px = n_sp * SP_PX
    n_sub = n_sp * _SUB
    tissue, cls = _class_map(rng, n_sub, tissue_frac)

    # truth geometry per superpixel: class fractions and tissue fraction
    def block_mean(a):
        return a.reshape(n_sp, _SUB, n_sp, _SUB).mean(axis=(1, 3))

    frac = np.stack([block_mean((tissue & (cls == k)).astype(np.float64))
                     for k in range(len(CLASSES))], axis=-1)
    tissue_sp = block_mean(tissue.astype(np.float64))
    mask = tissue_sp >= 0.5
    frac = np.where(mask[..., None], frac / np.maximum(tissue_sp, 1e-9)[..., None], 0.0)

    n_vis, n_grad, n_mix, n_noise = gene_kind_counts(n_genes)
    genes, kind, rates = [], {}, []
    for i in range(n_vis):
        g, prof = visible_profile(rng, i)
        rates.append(frac @ prof)
        genes.append(g)
        kind[g] = "visible"
    for i in range(n_grad):
        # large-scale fields (a tilted ramp plus ~300 um blobs): invisible in the image
        yy, xx = (np.mgrid[0:n_sp, 0:n_sp] + 0.5) / n_sp - 0.5
        th = rng.uniform(0, 2 * np.pi)
        f = np.cos(th) * xx + np.sin(th) * yy
        f = f / (f.std() + 1e-12) + 0.8 * _smooth_field(rng, (n_sp, n_sp), 300.0 / 8.0 / 2)
        rates.append(np.exp(0.6 * f / (f.std() + 1e-12)) * mask)
        g = f"GRAD_{i}"
        genes.append(g)
        kind[g] = "gradient"
    for i in range(n_mix):
        k = rng.integers(len(CLASSES))
        prof = np.full(len(CLASSES), 0.3)
        prof[k] = 2.5
        f = _smooth_field(rng, (n_sp, n_sp), 250.0 / 8.0 / 2)
        rates.append((frac @ prof) * np.exp(0.5 * f))
        g = f"MIX_{CLASSES[k].upper()}_{i}"
        genes.append(g)
        kind[g] = "mixed"
    for i in range(n_noise):
        rates.append(mask.astype(np.float64))
        g = f"NOISE_{i}"
        genes.append(g)
        kind[g] = "noise"
    rate = np.stack(rates, axis=-1) * mask[..., None]
    tissue_mean = rate[mask].mean(axis=0)
    rate = rate * (mean_count / np.maximum(tissue_mean, 1e-12)) * rng.uniform(0.5, 2.0, len(genes))
    cube = rng.poisson(rate).astype(np.float32)

    image = _render(rng, tissue, cls, n_px, um_per_px)

    rows, cols = np.nonzero(mask)
    grid_xy = np.stack([(cols + 0.5) * SP_PX, (rows + 0.5) * SP_PX], axis=1).astype(np.float64)
    ids = [f"sp{r}_{c}" for r, c in zip(rows, cols)]
    obs = pd.DataFrame({"sp_row": rows, "sp_col": cols})
    counts = make_counts(cube[rows, cols], ids, genes, grid_xy * 1.0, obs=obs)
    sec = Section(
        name=name or f"synthetic{seed}",
        image=ArrayImage(image),
        um_per_px=um_per_px,
        counts=counts,
        spot_diameter_um=SP_PX * um_per_px,
        platform="synthetic",
        truth={"cube": cube, "genes": list(genes), "mask": mask,
               "rate": rate.astype(np.float32), "classes": frac.astype(np.float32)},
        meta={"seed": int(seed), "size_um": n_sp * SP_PX * um_per_px, "gene_kind": kind,
              "classes": list(CLASSES)},
    )
    return validate(sec)


def pseudo_visium_centres(width_um: float, height_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-Visium lattice (METHODS 2.1 step 6): columns every 100 um from x = 27.5 um,
    spots every 100 um down each column from y = 27.5 um, odd columns shifted down 50 um.
    Only centres whose 55 um disk lies inside the image are returned. Returns (xy_um (n, 2),
    array (n, 2) of (array_row, array_col)) with array_col = column index and array_row =
    y in 50 um half-steps (even in even columns, odd in odd ones, as on Visium)."""
    xs, ys, ar, ac = [], [], [], []
    r = 27.5
    i = 0
    while 27.5 + 100.0 * i + r <= width_um:
        x = 27.5 + 100.0 * i
        off = 50.0 if i % 2 else 0.0
        j = 0
        while 27.5 + off + 100.0 * j + r <= height_um:
            xs.append(x)
            ys.append(27.5 + off + 100.0 * j)
            ar.append(2 * j + (i % 2))
            ac.append(i)
            j += 1
        i += 1
    return np.stack([xs, ys], axis=1), np.stack([ar, ac], axis=1)


def pseudo_visium(section: Section, min_tissue: float = 0.5, name: str | None = None) -> Section:
    """Pseudo-Visium spots from a section with an 8 um truth (METHODS 2.1 steps 6-7).

    Spot centres follow :func:`pseudo_visium_centres` (100 um pitch, alternate columns
    offset 50 um, 55 um diameter). A spot's counts are the sum of the truth cube over the
    superpixels of its 55 um disk (:func:`histosr.geometry.footprint_matrix`: superpixels
    whose centre lies in the disk; 37 for a centred disk). A spot is kept when at least
    ``min_tissue`` of its disk superpixels are tissue (``truth["mask"]``). The released
    HISTEX/DeepHEx code tests one superpixel at the window's corner (``mask[y//16 - 3,
    x//16 - 3]``), which keeps spots half off the tissue and drops others that are fully on
    it; histosr deliberately tests the footprint around the centre instead (METHODS 9.4).

    Returns a Section with platform ``"visium"``, ``spot_diameter_um=55``, obs
    ``array_row``/``array_col`` and the same image and truth as the input.
    """
    if section.truth is None:
        raise SectionError(
            f"section {section.name!r} has no 8 um truth: pseudo-Visium spots are sums of "
            "truth['cube'] over spot disks (build one with synthetic_section or a Visium HD "
            "/ Xenium reader)"
        )
    grid = grid_for(section)
    cube = np.asarray(section.truth["cube"])
    mask = np.asarray(section.truth["mask"], dtype=bool)
    if cube.shape[:2] != grid.shape or mask.shape != grid.shape:
        raise SectionError(
            f"truth cube {cube.shape[:2]} / mask {mask.shape} do not match the superpixel grid "
            f"{grid.shape} of the {section.image.shape[1]}x{section.image.shape[0]} px image"
        )
    h, w = section.image.shape[:2]
    xy_um, arr = pseudo_visium_centres(w * section.um_per_px, h * section.um_per_px)
    xy = xy_um / section.um_per_px
    diameter = 55.0
    F = footprint_matrix(grid, [p[None] for p in xy], diameter)
    n_cells = np.diff(F.indptr)
    in_tissue = np.asarray(F @ mask.ravel().astype(np.float32)).ravel()
    keep = in_tissue >= min_tissue * n_cells
    if not keep.any():
        raise SectionError(f"no pseudo-Visium spot falls on the tissue of {section.name!r}")
    F = F[keep]
    X = np.asarray(F @ cube.reshape(-1, cube.shape[2]).astype(np.float64), dtype=np.float32)
    arr = arr[keep]
    ids = [f"{c}x{r}" for r, c in arr]
    obs = pd.DataFrame({"array_row": arr[:, 0], "array_col": arr[:, 1],
                        "n_superpixels": n_cells[keep]})
    counts = make_counts(X, ids, section.truth["genes"], xy[keep], obs=obs)
    out = dataclasses.replace(
        section,
        name=name or f"{section.name}_visium",
        counts=counts,
        spot_diameter_um=diameter,
        platform="visium",
        footprints=None,
        annotations=None,
        meta={**section.meta, "pseudo_visium_of": section.name, "min_tissue": min_tissue},
    )
    return validate(out)


def synthetic_visium(seed: int = 0, **kwargs) -> Section:
    """:func:`synthetic_section` turned into pseudo-Visium spots (:func:`pseudo_visium`):
    what the P4 benchmark and the demo fit on."""
    sec = synthetic_section(seed=seed, **kwargs)
    return pseudo_visium(sec, name=sec.name)


__all__ = ["CLASSES", "synthetic_section", "pseudo_visium", "pseudo_visium_centres",
           "synthetic_visium"]
