"""Nuclear morphometrics per 8 um superpixel, for the ``handcrafted`` encoder's ``nuclei``
group (no weights: hematoxylin channel, threshold, marker watershed).

Segmentation runs on the smoothed hematoxylin optical density at 1 um/px (the encoder's
2 x 2 block mean of the 0.5 um/px H channel, Gaussian sigma 1 um), which a 6-12 um nucleus
spans by 6-12 px; that is 4x fewer pixels than 0.5 um/px and keeps the default encoder
under a minute per her2st section on 2 cores. The mask is smoothed H above
``mask_od`` and (smoothed and unsmoothed) above its 21 um local mean by 0.08 OD; markers
are maxima of the distance to the mask's edge (5 um apart) and the watershed floods the
distance from them; objects whose strongest H stays below ``peak_od`` (the texture group's
``nuclei_thr``) are dropped.
Every step is local (no per-tile threshold; the distance transform runs within nucleus-
sized mask components), so the segmentation of a nucleus does not depend on where the tile
is cut (tiles carry a 24 um halo); objects outside [``min_area``, ``max_area``] um^2 are
dropped (debris, merged clumps).

Per nucleus, vectorised with ``np.bincount`` over labels (no Python loop over objects):
area (um^2), eccentricity of the second-moment ellipse, an ellipse solidity
(area / area of the moment ellipse, clipped to 1: a convex blob ~ 1, a ragged or
concave one lower - the convex hull itself would need a loop over objects), mean H
(darkness) and the standard deviation of unsmoothed H inside it (chromatin texture). A soft
membership over three morphological classes (logistic in area and eccentricity, fixed
a priori from typical sizes, never fitted to data):

* ``lymph``: small (< ~30 um^2) and round (eccentricity < ~0.8): lymphocytes;
* ``tumour``: large (> ~50 um^2) and not elongated: large pleomorphic epithelial nuclei;
* ``stroma``: elongated (eccentricity > ~0.85 as measured at 1 um/px): fibroblasts, endothelium, smooth muscle.

Each nucleus is assigned to the superpixel holding its centroid; a superpixel stores raw
sums (:data:`RAW`: count, sums and sums of squares of the per-nucleus values, class
memberships), so that the encoder's context windows (box means of sums) give exact
nucleus-weighted means and spreads over 32 and 128 um; :func:`finalise` turns sums into
the features (:data:`FEATURES`): density (nuclei per 100 um^2), nuclear area fraction,
mean and standard deviation of area, eccentricity, solidity, H and chromatin texture, and
the class fractions.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: per-nucleus values whose mean and spread are kept
VALUES = ("area", "ecc", "solidity", "h", "chrom")
CLASSES = ("lymph", "tumour", "stroma")
RAW = (["count"] + [f"sum_{v}" for v in VALUES] + [f"sq_{v}" for v in VALUES]
       + [f"n_{c}" for c in CLASSES])
FEATURES = (["nuc_density", "nuc_area_frac"]
            + [f"nuc_{v}_{s}" for v in VALUES for s in ("mean", "std")]
            + [f"nuc_frac_{c}" for c in CLASSES])


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


#: side (px at 1 um/px) of the local background window and the contrast over it
BG_WINDOW = 21
CONTRAST = 0.08


def segment(hs: np.ndarray, mask_od: float, peak_od: float, min_area: float,
            max_area: float, h_raw: np.ndarray | None = None) -> np.ndarray:
    """int32 labels (0 = background) of nuclei in smoothed H ``hs`` (and unsmoothed
    ``h_raw``, default ``hs``) at 1 um/px: pixels above ``mask_od`` AND (smoothed and
    unsmoothed) ``CONTRAST`` above their 21 um box mean (a nucleus is darker than its
    surroundings: an absolute threshold alone merges whole tumour nests on dark slides);
    touching nuclei are split by a watershed of the distance to the mask's edge from its
    maxima (one per nucleus: maxima of H itself split large, flat nuclei); objects whose
    strongest smoothed H stays below ``peak_od`` are dropped (faint, not a nucleus)."""
    from skimage.segmentation import watershed

    h_raw = hs if h_raw is None else h_raw
    thr = ndi.uniform_filter(hs, BG_WINDOW) + CONTRAST
    # the unsmoothed H must pass too: smoothing spreads a nucleus by ~1 um all round
    mask = (hs > mask_od) & (hs > thr) & (h_raw > thr)
    if not mask.any():
        return np.zeros(hs.shape, np.int32)
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    # near-maxima (within 0.75 px of the 5 um maximum) joined: the ridge of an elongated
    # nucleus is one marker, two round nuclei joined by a neck are two
    peaks = (dist >= ndi.maximum_filter(dist, size=5) - 0.75) & (dist >= 1.5)
    markers, n = ndi.label(peaks, np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(hs.shape, np.int32)
    lab = watershed(-dist, markers, mask=mask).astype(np.int32, copy=False)
    area = np.bincount(lab.ravel(), minlength=n + 1)
    hmax = np.zeros(n + 1, np.float32)
    np.maximum.at(hmax, lab.ravel(), hs.ravel())
    keep = (area >= min_area) & (area <= max_area) & (hmax >= peak_od)
    keep[0] = False
    return np.where(keep[lab], lab, 0).astype(np.int32, copy=False)


def nucleus_table(lab: np.ndarray, h_raw: np.ndarray, hs: np.ndarray) -> dict:
    """Per-nucleus values (1 um/px labels): ``y``, ``x`` centroids (px) and :data:`VALUES`
    plus the class memberships; arrays of length n_labels (absent labels have area 0)."""
    n = int(lab.max())
    flat = lab.ravel()
    sel = flat > 0
    idx = flat[sel]
    yy, xx = np.indices(lab.shape, dtype=np.float64)
    yy, xx = yy.ravel()[sel], xx.ravel()[sel]

    def s(w=None):
        return np.bincount(idx, weights=w, minlength=n + 1)[1:]

    area = s()
    ok = area > 0
    a = np.maximum(area, 1)
    cy, cx = s(yy) / a, s(xx) / a
    # second central moments (+1/12: a pixel is a unit square, not a point)
    vyy = s(yy * yy) / a - cy * cy + 1 / 12
    vxx = s(xx * xx) / a - cx * cx + 1 / 12
    vxy = s(yy * xx) / a - cy * cx
    tr, det = vyy + vxx, np.maximum(vyy * vxx - vxy * vxy, 1e-12)
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    l1, l2 = tr / 2 + disc, np.maximum(tr / 2 - disc, 1e-12)
    ecc = np.sqrt(np.clip(1 - l2 / l1, 0, 1))
    # area of the ellipse with the same second moments: 4 pi sqrt(l1 l2)
    solidity = np.clip(area / (4 * np.pi * np.sqrt(l1 * l2)), 0, 1)
    hv = h_raw.ravel()[sel].astype(np.float64)
    hm = s(hv) / a
    chrom = np.sqrt(np.maximum(s(hv * hv) / a - hm * hm, 0))
    stroma = _sig((ecc - 0.85) / 0.04)
    lymph = (1 - stroma) * _sig((30.0 - area) / 6.0) * _sig((0.8 - ecc) / 0.06)
    tumour = (1 - stroma) * _sig((area - 50.0) / 8.0)
    return {"ok": ok, "y": cy, "x": cx, "area": area, "ecc": ecc, "solidity": solidity,
            "h": hm, "chrom": chrom, "lymph": lymph, "tumour": tumour, "stroma": stroma}


def raw_sums(h_raw: np.ndarray, hs: np.ndarray, cell: int, mask_od: float, peak_od: float,
             min_area: float = 9.0, max_area: float = 400.0) -> np.ndarray:
    """float32 (H / cell, W / cell, len(RAW)) per-superpixel sums of nucleus values, from
    the unsmoothed ``h_raw`` and smoothed ``hs`` H at 1 um/px; ``cell``: px per superpixel
    side (8 at 1 um/px)."""
    H, W = hs.shape
    gh, gw = H // cell, W // cell
    out = np.zeros((gh * gw, len(RAW)), np.float64)
    lab = segment(hs, mask_od, peak_od, min_area, max_area, h_raw)
    if lab.max() == 0:
        return out.reshape(gh, gw, len(RAW)).astype(np.float32)
    t = nucleus_table(lab, h_raw, hs)
    ok = t["ok"]
    sp = (np.clip(t["y"][ok] // cell, 0, gh - 1).astype(np.int64) * gw
          + np.clip(t["x"][ok] // cell, 0, gw - 1).astype(np.int64))
    cols = [np.ones(int(ok.sum()))]
    cols += [t[v][ok] for v in VALUES]
    cols += [t[v][ok] ** 2 for v in VALUES]
    cols += [t[c][ok] for c in CLASSES]
    for j, c in enumerate(cols):
        out[:, j] = np.bincount(sp, weights=c, minlength=gh * gw)
    return out.reshape(gh, gw, len(RAW)).astype(np.float32)


def finalise(raw: np.ndarray, sp_area_um2: float) -> np.ndarray:
    """(.., len(RAW)) sums (of one superpixel or box means over a window) -> (..,
    len(FEATURES)) features; means and spreads are 0 where there is no nucleus."""
    raw = np.asarray(raw, np.float64)
    cnt = raw[..., 0]
    has = cnt > 1e-6
    inv = np.where(has, 1.0 / np.where(has, cnt, 1.0), 0.0)
    nv = len(VALUES)
    out = [cnt * (100.0 / sp_area_um2), raw[..., 1] / sp_area_um2]
    for i in range(nv):
        m = raw[..., 1 + i] * inv
        sq = raw[..., 1 + nv + i] * inv
        out += [m, np.sqrt(np.maximum(sq - m * m, 0))]
    for j in range(len(CLASSES)):
        out.append(raw[..., 1 + 2 * nv + j] * inv)
    return np.stack(out, axis=-1).astype(np.float32)


__all__ = ["segment", "nucleus_table", "raw_sums", "finalise", "RAW", "FEATURES", "VALUES",
           "CLASSES"]
