"""Tissue masks on the 8 um superpixel grid, from per-superpixel colour and texture.

Background is glass (bright and unsaturated), blacked out (dark, as in display images), or
a smear of stain or mounting medium on the glass: tinted, yet smooth. Stained tissue -
including pale stroma - has chroma (max - min of R, G, B) AND texture (nuclei, fibres,
membranes). ``method="texture"`` (default) scores each superpixel by its texture: the
standard deviation of grey levels inside it plus their variation between neighbouring
superpixels (so images coarser than 8 um still show tissue texture), among superpixels
with some chroma; ``method="chroma"`` scores the chroma of the mean colour alone (the
earlier rule, which takes smooth pink smears for tissue). Either way an Otsu threshold
(clamped to a plausible range so a slide that is all tissue or all glass is not split in
two) separates tissue from background, then a closing, hole filling (fat and lumens inside
the tissue are tissue), an opening and removal of small components clean it up.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .geometry import SP_PX, grid_for


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float(values.min()) if values.size else 0.0
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _disk(radius: int) -> np.ndarray:
    d = np.arange(-radius, radius + 1)
    return (d[:, None] ** 2 + d[None, :] ** 2) <= radius**2


def tissue_score(rgb_sp: np.ndarray) -> np.ndarray:
    """Chroma (0-255 scale) of each superpixel's mean colour; 0 where it is near-black."""
    rgb = np.asarray(rgb_sp, dtype=np.float32)[..., :3]
    if rgb.size and np.nanmax(rgb) <= 1.5:  # given in [0, 1]
        rgb = rgb * 255.0
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    bright = rgb.mean(axis=2)
    return np.where(bright < 30.0, 0.0, chroma).astype(np.float32)


#: version of the tissue rule, part of feature cache keys
TISSUE_VERSION = 2
METHODS = ("texture", "chroma")


def texture_score(grey_mean: np.ndarray, grey_var: np.ndarray) -> np.ndarray:
    """(H_sp, W_sp) texture (0-255 grey units): sqrt of the grey variance inside each
    superpixel plus the variance of superpixel means over its 3 x 3 neighbourhood."""
    m = np.asarray(grey_mean, dtype=np.float32)
    local = ndi.uniform_filter(m * m, 3, mode="nearest") - ndi.uniform_filter(m, 3,
                                                                            mode="nearest") ** 2
    return np.sqrt(np.maximum(np.asarray(grey_var, np.float32), 0) + np.maximum(local, 0))


def tissue_mask(
    rgb_sp: np.ndarray,
    *,
    texture: np.ndarray | None = None,
    threshold: float | None = None,
    min_threshold: float | None = None,
    max_threshold: float | None = None,
    min_chroma: float = 5.0,
    close_radius: int = 2,
    open_radius: int = 1,
    min_size_sp: int = 100,
    fill_holes: bool = True,
) -> np.ndarray:
    """bool (H_sp, W_sp) tissue mask from per-superpixel mean colour (H_sp, W_sp, 3), in
    0-255 or 0-1, and (``texture``, from :func:`texture_score`) texture. With ``texture``
    the score is the texture of superpixels whose chroma exceeds ``min_chroma``; without,
    the chroma. ``threshold`` overrides Otsu on the score; otherwise Otsu's threshold is
    clamped to [min_threshold, max_threshold] (defaults: 2-12 grey units for texture, 8-30
    chroma units). Components smaller than ``min_size_sp`` superpixels (and than 5% of the
    largest) are dropped."""
    rgb_sp = np.asarray(rgb_sp)
    if rgb_sp.ndim != 3 or rgb_sp.shape[2] < 3:
        raise InputError(f"expected per-superpixel colour (H_sp, W_sp, 3), got {rgb_sp.shape}")
    chroma = tissue_score(rgb_sp)
    if texture is None:
        score, lo, hi = chroma, 8.0, 30.0
    else:
        texture = np.asarray(texture, dtype=np.float32)
        if texture.shape != chroma.shape:
            raise InputError(f"texture {texture.shape} and colour {chroma.shape} differ in shape")
        score, lo, hi = np.where(chroma > min_chroma, texture, 0.0), 2.0, 12.0
    lo = lo if min_threshold is None else min_threshold
    hi = hi if max_threshold is None else max_threshold
    if threshold is None:
        threshold = float(np.clip(_otsu(score.ravel()), lo, hi))
    m = score > threshold
    if close_radius > 0:
        # pad so closing does not erode tissue touching the image border
        p = close_radius
        m = ndi.binary_closing(np.pad(m, p, mode="edge"), _disk(close_radius))[p:-p, p:-p]
    if fill_holes:
        m = ndi.binary_fill_holes(m)
    if open_radius > 0:
        m = ndi.binary_opening(m, _disk(open_radius))
    lab, n = ndi.label(m)
    if n:
        sizes = np.bincount(lab.ravel())[1:]
        keep_min = min(min_size_sp, 0.05 * sizes.max())
        keep = np.concatenate([[False], sizes >= keep_min])
        m = keep[lab]
    return m


def mean_rgb_sp(image, um_per_px: float, band_sp: int = 64) -> np.ndarray:
    """float32 (H_sp, W_sp, 3) mean colour (0-255) of each superpixel of the calibrated grid
    (see :func:`superpixel_stats`)."""
    return superpixel_stats(image, um_per_px, band_sp, grey=False)[0]


def superpixel_stats(image, um_per_px: float, band_sp: int = 64, grey: bool = True):
    """Per superpixel of the calibrated grid: float32 (H_sp, W_sp, 3) mean colour (0-255)
    and (``grey``) float32 (H_sp, W_sp) variance of the grey level inside it, by
    area-averaging (PIL box filter) the image and its square band by band: cheap (no
    0.5 um/px resampling) and bounded in memory. On a pyramid (slides) it reads the coarsest
    level with at least 2 px per superpixel: tissue is detected on a low level."""
    from PIL import Image

    from .geometry import Grid

    h, w = image.shape[:2]
    grid = Grid(float(um_per_px), (int(h), int(w)))
    hs, ws = grid.shape
    px_per_sp = SP_PX / grid.scale  # full-resolution px per superpixel
    level = image.best_level(px_per_sp / 2.0) if px_per_sp > 2.0 else 0
    if level:
        px_per_sp /= image.level_downsamples[level]  # px of that level per superpixel
    out = np.empty((hs, ws, 3), dtype=np.float32)
    var = np.empty((hs, ws), dtype=np.float32) if grey else None
    for r0 in range(0, hs, band_sp):
        r1 = min(r0 + band_sp, hs)
        fy0, fy1 = r0 * px_per_sp, r1 * px_per_sp
        y0, y1 = int(np.floor(fy0)), int(np.ceil(fy1))
        for c0 in range(0, ws, band_sp * 4):
            c1 = min(c0 + band_sp * 4, ws)
            fx0, fx1 = c0 * px_per_sp, c1 * px_per_sp
            x0, x1 = int(np.floor(fx0)), int(np.ceil(fx1))
            raw = image.read_level(level, y0, x0, y1 - y0, x1 - x0)
            box = (fx0 - x0, fy0 - y0, fx1 - x0, fy1 - y0)
            im = Image.fromarray(raw).resize((c1 - c0, r1 - r0), Image.BOX, box=box)
            out[r0:r1, c0:c1] = np.asarray(im, dtype=np.float32)
            if grey:
                g = raw.mean(axis=2, dtype=np.float32)  # no float32 RGB copy of the tile
                g2 = Image.fromarray(g * g).resize((c1 - c0, r1 - r0), Image.BOX, box=box)
                g1 = Image.fromarray(g).resize((c1 - c0, r1 - r0), Image.BOX, box=box)
                var[r0:r1, c0:c1] = np.asarray(g2) - np.asarray(g1) ** 2
    return out, var


#: with measured spots, the texture rule must cover this fraction of them (else: chroma)
MIN_SPOT_COVERAGE = 0.9


def _spot_coverage(section, mask: np.ndarray) -> float:
    r, c = grid_for(section).cell_of_xy(section.xy)
    r = np.clip(r, 0, mask.shape[0] - 1)
    c = np.clip(c, 0, mask.shape[1] - 1)
    return float(mask[r, c].mean())


def section_tissue_mask(section, method: str = "texture", **kwargs) -> np.ndarray:
    """bool (H_sp, W_sp) tissue mask of a section on its superpixel grid (``method``:
    ``"texture"`` or ``"chroma"``, see the module docstring). With measured spots, a texture
    mask that misses more than 10% of them gives way to the chroma mask."""
    if method not in METHODS:
        raise InputError(f"tissue method must be one of {METHODS}, got {method!r}")
    rgb, var = superpixel_stats(section.image, section.um_per_px, grey=method == "texture")
    if var is not None:
        kwargs["texture"] = texture_score(rgb.mean(axis=2), var)
    m = tissue_mask(rgb, **kwargs)
    if var is not None and section.n_spots and _spot_coverage(section, m) < MIN_SPOT_COVERAGE:
        # measured spots lie on tissue: an image whose tissue shows little texture (an eosin
        # capture, a blurred scan) falls back to the colour rule
        kwargs.pop("texture")
        chroma = tissue_mask(rgb, **kwargs)
        if _spot_coverage(section, chroma) > _spot_coverage(section, m):
            m = chroma
    assert m.shape == grid_for(section).shape
    return m
