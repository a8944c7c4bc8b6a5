"""The ``"handcrafted"`` encoder: per-superpixel colour, stain and texture features with
multi-scale context, computed with numpy/scipy alone (no pretrained weights).

Each 8 um superpixel (16 x 16 calibrated px at 0.5 um/px) gets a *base* vector
(:data:`BASE_FEATURES`) describing what breast-cancer compartments look like on H&E:

* colour: RGB mean and std, chroma (unsaturated white = fat, lumen, glass);
* stain: Ruifrok-Johnston colour deconvolution into hematoxylin (H), eosin (E) and residual
  (D) optical densities - mean, std, the strongest smoothed H (a nucleus present?);
* composition: fraction of hematoxylin-rich (nuclear) pixels at two levels, of eosin-rich
  pixels (stroma, cytoplasm), of white pixels (adipocytes);
* texture: gradient magnitude of luminance and of H, high-frequency H energy (chromatin
  texture, nuclear edges) and a count of nuclear blobs (local maxima of smoothed H) - a
  proxy for nuclear density that separates tumour epithelium and immune infiltrate
  (many, small, dark nuclei) from stroma and fat.

The encoder's output concatenates the base vector with its box averages over about 32 um
and 128 um of neighbouring superpixels (5 x 5 and 17 x 17 superpixels, centred), so a
superpixel "knows" whether it sits in a tumour nest, in stroma or near fat: 3 x 21 values.
No standardisation happens here (methods standardise).

Feature groups (``groups=``, :data:`GROUPS`; each can be switched off for an ablation):
``colour`` (RGB means/stds, chroma, white fraction), ``stain`` (H/E/D optical densities and
the H-rich / eosin-rich fractions), ``texture`` (gradients, high-frequency H, strongest H,
the blob count) and ``nuclei``: nuclear morphometrics from a weight-free segmentation
(:mod:`histosr.features.nuclear`: density, nuclear area fraction, mean and spread of area,
eccentricity, solidity, H darkness and chromatin texture, soft lymphocyte / tumour /
stromal composition), nucleus-weighted at the superpixel and at both context scales:
3 x 15 values. The default stays colour, stain and texture (dim 63, also ``handcrafted:v1``):
every number of the README and BENCHMARKS was measured with it, and the nuclei group is not
measured on P2/P4 yet. ``handcrafted:v2`` is all four groups (dim 108);
``handcrafted:-nuclei``, ``handcrafted:-colour``... switch one group of v2 off and
``handcrafted:stain,nuclei`` lists the groups, so every protocol can run an ablation by
``--encoder`` alone.

The tiler uses the two-stage interface (:meth:`HandcraftedEncoder.embed_base` with a 1
superpixel pixel halo, then :meth:`HandcraftedEncoder.add_context` on the base grid with a
``context_sp`` halo); :meth:`embed_tiles` chains both for the plain encoder protocol.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError
from ..params import Interval
from . import nuclear
from .registry import register_encoder

SP = 16
SP_AREA_UM2 = 64.0  # one 8 um superpixel

# Ruifrok & Johnston (2001) stain vectors (rows: hematoxylin, eosin, DAB/residual), as in
# skimage.color.rgb2hed; rows normalised, then inverted: od (.., 3) @ HED_FROM_RGB -> H, E, D.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED).astype(np.float32)
# optical density of each uint8 intensity: OD = -log10((I + 1) / 256)
_OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)
_F_LUT = (np.arange(256, dtype=np.float32) / 255.0).astype(np.float32)

BASE_FEATURES = [
    "r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std", "chroma_mean",
    "h_mean", "e_mean", "d_mean", "h_std", "e_std", "h_max",
    "frac_h_lo", "frac_h_hi", "frac_eosin", "frac_white",
    "grad_lum", "grad_h", "hf_h", "nuclei_count",
]
#: feature groups (switch one off for an ablation); ``nuclei`` is the nuclear morphometrics
#: of :mod:`histosr.features.nuclear`, the others split :data:`BASE_FEATURES`
GROUPS = ("colour", "stain", "texture", "nuclei")
V1_GROUPS = ("colour", "stain", "texture")
GROUP_OF = {
    **dict.fromkeys(["r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std", "chroma_mean",
                     "frac_white"], "colour"),
    **dict.fromkeys(["h_mean", "e_mean", "d_mean", "h_std", "e_std", "frac_h_lo",
                     "frac_h_hi", "frac_eosin"], "stain"),
    **dict.fromkeys(["h_max", "grad_lum", "grad_h", "hf_h", "nuclei_count"], "texture"),
}


def _block_mean(a: np.ndarray, b: int) -> np.ndarray:
    """Mean over non-overlapping b x b blocks of a 2-D array (sides multiples of b)."""
    h, w = a.shape
    s = a.reshape(h // b, b, w).sum(axis=1, dtype=np.float32)
    return s.reshape(h // b, w // b, b).sum(axis=2) * np.float32(1.0 / (b * b))


def _block_max(a: np.ndarray, b: int) -> np.ndarray:
    h, w = a.shape
    s = a.reshape(h // b, b, w).max(axis=1)
    return s.reshape(h // b, w // b, b).max(axis=2)


def _grad(a: np.ndarray) -> np.ndarray:
    """|d/dy| + |d/dx| by central differences, halved (0 on the outer pixel ring)."""
    g = np.zeros_like(a)
    g[1:-1, :] = np.abs(a[2:, :] - a[:-2, :])
    g[:, 1:-1] += np.abs(a[:, 2:] - a[:, :-2])
    g *= np.float32(0.5)
    return g


class HandcraftedEncoder:
    """Colour / stain / texture / nuclear features with context; see the module docstring.

    ``groups``: the feature groups computed (:data:`GROUPS`; default colour, stain, texture:
    the 63-dim encoder, same values and cache entries as before the nuclei group, also
    ``handcrafted:v1``); ``handcrafted:v2`` adds ``nuclei``.
    """

    name = "handcrafted"
    patch_um = 8.0

    def __init__(
        self,
        context_um: tuple[float, ...] = (32.0, 128.0),
        h_lo: float = 0.35,
        h_hi: float = 0.7,
        eosin_thr: float = 0.05,
        nuclei_thr: float = 0.45,
        groups: tuple[str, ...] = V1_GROUPS,
        nuc_mask_od: float = 0.2,
        nuc_min_area_um2: float = 9.0,
        nuc_max_area_um2: float = 400.0,
    ):
        groups = tuple(str(g) for g in groups)
        bad = [g for g in groups if g not in GROUPS]
        if bad or not groups:
            raise InputError(f"handcrafted groups must be a non-empty subset of {GROUPS}, got "
                             f"{list(groups)}")
        self.groups = tuple(g for g in GROUPS if g in groups)  # canonical order
        self.context_um = tuple(float(c) for c in context_um)
        # odd box sizes so the window is centred on the superpixel: 32 um -> 5, 128 um -> 17
        self.context_sizes = tuple(2 * int(round(c / (2 * 8.0))) + 1 for c in self.context_um)
        self.context_sp = max([s // 2 for s in self.context_sizes], default=0)
        self.h_lo, self.h_hi = float(h_lo), float(h_hi)
        self.eosin_thr, self.nuclei_thr = float(eosin_thr), float(nuclei_thr)
        self.nuc_mask_od = float(nuc_mask_od)
        self.nuc_min_area, self.nuc_max_area = float(nuc_min_area_um2), float(nuc_max_area_um2)
        self.nuclei = "nuclei" in self.groups
        # pixel filters reach < 16 px; a nucleus (< 16 um) or a small clump of them needs
        # 3 superpixels (24 um) of halo so that one whose centroid is inside the tile is
        # segmented as it would be in one piece
        self.base_halo_sp = 3 if self.nuclei else 1
        self._sel = [i for i, n in enumerate(BASE_FEATURES) if GROUP_OF[n] in self.groups]
        names = [BASE_FEATURES[i] for i in self._sel]
        self._n_px = len(names)  # pixel-statistics base features (box-averaged context)
        self.base_dim = self._n_px + (len(nuclear.RAW) if self.nuclei else 0)
        scales = [""] + [f"@{int(round(c))}um" for c in self.context_um]
        self.feature_names = [n + sc for sc in scales for n in names]
        if self.nuclei:
            self.feature_names += [n + sc for sc in scales for n in nuclear.FEATURES]
        self.dim = len(self.feature_names)

    @property
    def params(self) -> dict:
        p = {
            "context_um": list(self.context_um), "h_lo": self.h_lo, "h_hi": self.h_hi,
            "eosin_thr": self.eosin_thr, "nuclei_thr": self.nuclei_thr, "version": 1,
        }
        if self.groups == V1_GROUPS:  # the original encoder: same key, same cache entries
            return p
        p.update(version=2, groups=list(self.groups))
        if self.nuclei:
            p.update(nuc_mask_od=self.nuc_mask_od, nuc_min_area_um2=self.nuc_min_area,
                     nuc_max_area_um2=self.nuc_max_area)
        return p

    # -- stage 1: per-superpixel base features -------------------------------------------
    def embed_base(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, T, T, 3) -> float32 (B, T/16, T/16, base_dim). Values of the outer
        ``base_halo_sp`` ring of superpixels are unreliable (filters see the tile edge)."""
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        return np.stack([self._base_one(t) for t in batch])

    def _base_one(self, tile: np.ndarray) -> np.ndarray:
        th, tw = tile.shape[:2]
        if th % SP or tw % SP:
            raise InputError(f"tile sides must be multiples of {SP} px, got {tile.shape}")
        # planar uint8 channels: every per-pixel step below is a contiguous 2-D pass
        r8, g8, b8 = np.ascontiguousarray(np.moveaxis(tile[..., :3], 2, 0), dtype=np.uint8)
        out = np.empty((th // SP, tw // SP, len(BASE_FEATURES)), dtype=np.float32)
        bm = _block_mean
        f = _F_LUT
        rf, gf, bf = f[r8], f[g8], f[b8]
        for i, c in enumerate((rf, gf, bf)):
            mu = bm(c, SP)
            out[..., i] = mu
            out[..., 3 + i] = np.sqrt(np.maximum(bm(c * c, SP) - mu * mu, 0))
        mx = np.maximum(np.maximum(r8, g8), b8)
        mn = np.minimum(np.minimum(r8, g8), b8)
        chroma8 = mx - mn
        out[..., 6] = bm(f[chroma8], SP)
        out[..., 16] = bm(((mn > 200) & (chroma8 < 25)).view(np.uint8), SP)  # white/fat
        lum = rf + gf
        lum += bf
        lum *= np.float32(1.0 / 3.0)
        out[..., 17] = bm(_grad(lum), SP)
        del rf, gf, bf, lum, mx, mn, chroma8

        # Ruifrok-Johnston colour deconvolution from per-channel optical densities
        od = [_OD_LUT[r8], _OD_LUT[g8], _OD_LUT[b8]]
        M = HED_FROM_RGB
        stains = []
        for k in range(3):
            s = od[0] * M[0, k]
            s += od[1] * M[1, k]
            s += od[2] * M[2, k]
            stains.append(s)
        h, e, d = stains
        del od
        for i, c in ((7, h), (8, e), (9, d)):
            out[..., i] = bm(c, SP)
        out[..., 10] = np.sqrt(np.maximum(bm(h * h, SP) - out[..., 7] ** 2, 0))
        out[..., 11] = np.sqrt(np.maximum(bm(e * e, SP) - out[..., 8] ** 2, 0))
        out[..., 13] = bm((h > self.h_lo).view(np.uint8), SP)
        out[..., 14] = bm((h > self.h_hi).view(np.uint8), SP)
        out[..., 15] = bm((e > self.eosin_thr).view(np.uint8), SP)

        # hematoxylin texture at 1 um/px: smoothed H, high-frequency energy, nuclear blobs
        h2 = bm(h, 2)
        del h, e, d, stains
        hs = ndi.gaussian_filter(h2, 1.0, truncate=3.0)
        half = SP // 2
        out[..., 12] = _block_max(hs, half)
        out[..., 18] = bm(_grad(hs), half)
        out[..., 19] = bm(np.abs(h2 - hs), half)
        peaks = (hs == ndi.maximum_filter(hs, size=5)) & (hs > self.nuclei_thr)
        out[..., 20] = bm(peaks.view(np.uint8), half) * np.float32(half * half)
        if len(self._sel) < len(BASE_FEATURES):
            out = out[..., self._sel]
        if not self.nuclei:
            return out
        # nuclear morphometrics on the same 1 um/px hematoxylin (see features.nuclear)
        nuc = nuclear.raw_sums(h2, hs, half, self.nuc_mask_od, self.nuclei_thr,
                               self.nuc_min_area, self.nuc_max_area)
        return np.concatenate([out, nuc], axis=2)

    # -- stage 2: context ----------------------------------------------------------------
    def add_context(self, base: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """(h, w, base_dim) base features -> (h, w, dim): base || box means at each context
        scale. ``valid`` (h, w) marks superpixels inside the image; the means are taken over
        valid superpixels only (normalised convolution), so image borders are not biased.
        The nuclear group's per-superpixel sums are box-averaged the same way and then
        turned into nucleus-weighted means, spreads and fractions (:func:`nuclear.finalise`)."""
        parts = context_means(base, self.context_sizes, valid)
        n = self._n_px
        out = [p[..., :n] for p in parts]
        if self.nuclei:
            out += [nuclear.finalise(p[..., n:], SP_AREA_UM2) for p in parts]
        return np.concatenate(out, axis=2).astype(np.float32)

    # -- plain encoder protocol ----------------------------------------------------------
    def embed_tiles(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, T, T, 3) -> float32 (B, T/16, T/16, dim); context is taken within each
        tile, so the caller reads tiles with a ``context_sp`` halo and crops it."""
        base = self.embed_base(batch)
        return np.stack([self.add_context(b) for b in base])


def context_means(base: np.ndarray, sizes, valid: np.ndarray | None = None) -> list:
    """``[base, box mean at sizes[0], ...]`` (each (h, w, d) float64) of per-superpixel
    features: means over the valid superpixels of odd ``s`` x ``s`` windows (normalised
    convolution, so image borders are not biased). Shared by the encoders' context stage."""
    base = np.asarray(base, dtype=np.float64)
    if valid is None:
        valid = np.ones(base.shape[:2], dtype=np.float64)
    valid = np.asarray(valid, dtype=np.float64)
    parts = [base]
    bv = base * valid[..., None]
    for s in sizes:
        num = ndi.uniform_filter(bv, size=(s, s, 1), mode="constant", cval=0.0)
        den = ndi.uniform_filter(valid, size=s, mode="constant", cval=0.0)
        parts.append(num / np.maximum(den, 1e-12)[..., None])
    return parts


_PARAMS = {
    "context_um": (tuple[float, ...], None), "h_lo": (float, Interval(float, 0)),
    "h_hi": (float, Interval(float, 0)), "eosin_thr": (float, Interval(float, 0)),
    "nuclei_thr": (float, Interval(float, 0)), "groups": (tuple[str, ...], None),
    "nuc_mask_od": (float, Interval(float, 0)),
    "nuc_min_area_um2": (float, Interval(float, 0)),
    "nuc_max_area_um2": (float, Interval(float, 0))}


@register_encoder("handcrafted", params=_PARAMS)
def _handcrafted(**kwargs) -> HandcraftedEncoder:
    return HandcraftedEncoder(**kwargs)


def groups_from_spec(spec: str) -> tuple[str, ...]:
    """Feature groups named by a ``handcrafted:<spec>`` encoder name: ``v1`` (the 63-dim
    colour + stain + texture encoder, the default), ``v2`` (all four groups), ``-nuclei`` /
    ``-colour,-stain`` (v2 with those groups off: ablations), or a list such as
    ``stain,nuclei``."""
    spec = spec.strip()
    if spec == "v1":
        return V1_GROUPS
    if spec == "v2":
        return GROUPS
    items = [t.strip() for t in spec.split(",") if t.strip()]
    drop = [t[1:] for t in items if t.startswith("-")]
    keep = [t for t in items if not t.startswith("-")]
    if drop and keep:
        raise InputError(f"handcrafted:{spec}: either list the groups to use or the ones to "
                         f"switch off (-group), not both; groups: {', '.join(GROUPS)}")
    bad = [g for g in drop + keep if g not in GROUPS]
    if bad or not items:
        raise InputError(f"handcrafted:{spec}: unknown feature group(s) {bad or [spec]}: "
                         f"expected v1, -GROUP or GROUP,... with groups {', '.join(GROUPS)}")
    groups = tuple(g for g in GROUPS if g not in drop) if drop else tuple(keep)
    if not groups:
        raise InputError(f"handcrafted:{spec} switches every feature group off")
    return groups


@register_encoder("handcrafted:", params={k: v for k, v in _PARAMS.items() if k != "groups"})
def _handcrafted_groups(spec: str, **kwargs) -> HandcraftedEncoder:
    return HandcraftedEncoder(groups=groups_from_spec(spec), **kwargs)
