"""Stain normalisation in front of every encoder: Macenko and Reinhard, on numpy/scikit-image.

A model fitted on some sections and applied to another (P3, ``histosr predict --image``, a
cohort) sees the new section's stain through every feature: a lighter, pinker slide shifts
them all. :func:`normalize_section` returns the section with its image wrapped in a
:class:`NormalizedImage`, which maps every region it reads to a reference stain, tile by
tile (bounded memory); every reader downstream (feature tiles, spot crops, nuclei, tissue
masks) then sees normalised pixels, and the feature caches key on the normaliser
(``cache_token``), so normalised and raw features never mix.

* ``"macenko"`` (Macenko et al. 2009): optical densities (OD = -ln(I / Io), Io = 240) of
  tissue pixels (OD > 0.15 in every channel) are projected on the plane of their two main
  directions; the 1st and 99th percentiles of the angle give the hematoxylin and eosin
  vectors; the concentrations of each pixel (least squares on the two vectors) are scaled
  so that their 99th percentiles match the reference's and re-rendered with the
  reference's vectors.
* ``"reinhard"`` (Reinhard et al. 2001): per-channel mean and standard deviation of tissue
  pixels in the paper's l-alpha-beta space (log cone responses, decorrelated axes) are
  matched to the reference's (a 3 x 3 matrix, a log and an exp per pixel: ~10x cheaper
  than CIELAB through scikit-image); background pixels (glass, fat: OD below 0.15) keep
  their colour, blended over 0..0.15 OD.

The source statistics are fitted once per section on up to 24 patches of 64 x 64 um read at
0.5 um/px at tissue positions (chosen on the thumbnail, seeded), never per tile, so a tile
of pure stroma is not "normalised" into tumour colours. Reference (``ref``): ``"builtin"``
(the H&E reference of the Macenko paper's reference implementations, HE = [[0.5626, 0.2159],
[0.7201, 0.8012], [0.4062, 0.5581]], 99th percentile concentrations [1.9705, 1.0308]; for
Reinhard the l-alpha-beta statistics of pixels rendered from it), a
Section (fitted the same way) or an image file (all its tissue pixels).

Why no library: torchstain is not installable offline here and pulls a framework for four
matrix operations; StainTools is unmaintained; HistomicsTK is heavy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .errors import InputError
from .image import ImageSource

METHODS = ("none", "macenko", "reinhard")
IO = 240.0
BETA = 0.15  # OD below which a pixel is background (Macenko's beta)
ALPHA = 1.0  # percentile of the angle for the extreme stain vectors
HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MAXC_REF = np.array([1.9705, 1.0308])
_LUT_OD = -np.log((np.arange(256, dtype=np.float64) + 1.0) / IO)


def _od(rgb: np.ndarray) -> np.ndarray:
    """float64 (n, 3) optical densities of uint8 RGB pixels (n, 3) (>= 0 below Io)."""
    return _LUT_OD[np.asarray(rgb, np.uint8)]


def _tissue(od: np.ndarray) -> np.ndarray:
    return (od > BETA).all(axis=1)


def macenko_fit(rgb: np.ndarray) -> dict:
    """``{"he": (3, 2) unit H and E OD vectors, "maxc": (2,) 99th percentile
    concentrations}`` of the tissue pixels of ``rgb`` (any shape (..., 3), uint8)."""
    od = _od(rgb.reshape(-1, 3))
    od = od[_tissue(od)]
    if len(od) < 100:
        raise InputError(f"stain normalisation needs tissue: only {len(od)} pixels have an "
                         f"optical density above {BETA} in every channel (blank image?)")
    _, vec = np.linalg.eigh(np.cov(od.T))
    plane = vec[:, [1, 2]]  # the two largest eigenvalues (eigh sorts ascending)
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ALPHA, 100 - ALPHA])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1, v2 = (v1 if v1.sum() > 0 else -v1), (v2 if v2.sum() > 0 else -v2)
    # hematoxylin absorbs red more than eosin does: it has the larger first component
    he = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    he /= np.linalg.norm(he, axis=0, keepdims=True)
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    maxc = np.percentile(conc, 99, axis=1)
    return {"he": he, "maxc": np.maximum(maxc, 1e-6)}


# Reinhard et al. (2001): RGB -> LMS cone space, log10, decorrelating l-alpha-beta axes
_LMS_FROM_RGB = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782],
                          [0.0241, 0.1288, 0.8444]])
_LAB_FROM_LOGLMS = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]])
_LOGLMS_FROM_LAB = np.linalg.inv(_LAB_FROM_LOGLMS)
_RGB_FROM_LMS = np.linalg.inv(_LMS_FROM_RGB)


def rgb_to_lalphabeta(px: np.ndarray) -> np.ndarray:
    """float32 (n, 3) Reinhard l-alpha-beta of uint8 RGB pixels (n, 3)."""
    rgb = (np.asarray(px, np.float32) + 1.0) * np.float32(1.0 / 256.0)  # > 0: log defined
    lms = rgb @ _LMS_FROM_RGB.T.astype(np.float32)
    return np.log10(lms) @ _LAB_FROM_LOGLMS.T.astype(np.float32)


def lalphabeta_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float32 (n, 3) RGB in 0..255 (unclipped) of l-alpha-beta values."""
    lms = np.power(np.float32(10.0), lab @ _LOGLMS_FROM_LAB.T.astype(np.float32))
    return (lms @ _RGB_FROM_LMS.T.astype(np.float32)) * np.float32(256.0) - np.float32(1.0)


def reinhard_fit(rgb: np.ndarray) -> dict:
    """``{"mean": (3,), "std": (3,)}`` l-alpha-beta statistics of the tissue pixels of
    ``rgb``."""
    px = np.asarray(rgb, np.uint8).reshape(-1, 3)
    px = px[_tissue(_od(px))]
    if len(px) < 100:
        raise InputError(f"stain normalisation needs tissue: only {len(px)} tissue pixels")
    lab = rgb_to_lalphabeta(px).astype(np.float64)
    return {"mean": lab.mean(axis=0), "std": np.maximum(lab.std(axis=0), 1e-6)}


def _builtin_lab() -> dict:
    """Reinhard target: l-alpha-beta statistics of pixels rendered from the Macenko reference
    (H and E concentrations spread uniformly up to the reference maxima, seeded)."""
    rng = np.random.default_rng(0)
    c = rng.random((20000, 2)) * MAXC_REF
    rgb = np.clip(IO * np.exp(-(c @ HE_REF.T)), 0, 255).astype(np.uint8)
    return reinhard_fit(rgb)


@dataclasses.dataclass
class StainNormalizer:
    """A fitted source -> reference stain map (``method`` in :data:`METHODS`)."""

    method: str
    source: dict
    target: dict
    ref: str = "builtin"

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (..., 3) -> uint8 (..., 3) in the reference stain. Background (OD below
        0.15 in some channel) is mapped too, which keeps glass and fat near white."""
        rgb = np.asarray(rgb)
        if self.method == "none" or rgb.size == 0:
            return rgb
        shape = rgb.shape
        px = np.ascontiguousarray(rgb[..., :3]).reshape(-1, 3)
        if self.method == "macenko":
            # out = Io exp(-OD M), M = pinv(HE_src)^T diag(maxc_tgt / maxc_src) HE_tgt^T (3 x 3),
            # is a product over input channels of exp(-OD_j M_j.), each a function of one
            # uint8 value: three 256-entry tables (Io folded in), no exp per pixel; with
            # np.take and in-place rounding ~8x faster than the matrix form
            lut = self._macenko_tables()
            out = np.take(lut[0], px[:, 0], axis=0)
            out *= np.take(lut[1], px[:, 1], axis=0)
            out *= np.take(lut[2], px[:, 2], axis=0)
            np.minimum(out, np.float32(255.0), out=out)  # > 0: +0.5 and truncate rounds
            out += np.float32(0.5)
            return out.astype(np.uint8).reshape(shape[:-1] + (3,))
        else:
            gain = (self.target["std"] / self.source["std"]).astype(np.float32)
            shift = (self.target["mean"] - self.source["mean"] * gain).astype(np.float32)
            out = lalphabeta_to_rgb(rgb_to_lalphabeta(px) * gain + shift)
            # statistics are of tissue: glass and fat (OD below beta) keep their colour,
            # with a soft transition so that tissue edges do not show a seam
            w = np.clip(_LUT_OD.astype(np.float32)[px].min(axis=1, keepdims=True) / BETA,
                        0, 1)
            out = w * out + (1 - w) * px
        return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(shape[:-1] + (3,))

    def _macenko_tables(self) -> np.ndarray:
        """float32 (3, 256, 3): Io^(1/3) exp(-OD(v) M[j]) for input channel j, value v."""
        lut = getattr(self, "_lut", None)
        if lut is None:
            m = (np.linalg.pinv(np.asarray(self.source["he"])).T
                 * (np.asarray(self.target["maxc"]) / np.asarray(self.source["maxc"]))
                 @ np.asarray(self.target["he"]).T)
            lut = (np.exp(-_LUT_OD[None, :, None] * m[:, None, :])
                   * IO ** (1 / 3)).astype(np.float32)
            self._lut = lut
        return lut

    @property
    def record(self) -> dict:
        """The reference alone (``{"method", "ref", "target"}``, JSON-able): what a model
        folder keeps so that ``predict`` maps a new section to the stain it was fitted on
        (pass it back as ``ref``)."""
        t = {k: np.asarray(v, np.float64).tolist() for k, v in self.target.items()}
        return {"method": self.method, "ref": self.ref, "target": t}

    @property
    def params(self) -> dict:
        """What the normalised pixels depend on (for cache keys and outputs)."""
        r = {k: np.round(np.asarray(v, np.float64), 6).tolist() for k, v in self.source.items()}
        t = {k: np.round(np.asarray(v, np.float64), 6).tolist() for k, v in self.target.items()}
        return {"method": self.method, "ref": self.ref, "source": r, "target": t, "v": 1}


class NormalizedImage(ImageSource):
    """An :class:`~histosr.image.ImageSource` whose every read is stain-normalised."""

    path = None  # not the file's pixels: caches key on ``cache_token``

    def __init__(self, source: ImageSource, normalizer: StainNormalizer):
        from .features.cache import image_identity
        from .keys import digest

        self.source = source
        self.normalizer = normalizer
        self.um_per_px = getattr(source, "um_per_px", None)
        self.cache_token = digest({"image": image_identity(source),
                                   "stain": normalizer.params})

    @property
    def shape(self):
        return self.source.shape

    def release(self) -> None:
        self.source.release()

    @property
    def level_downsamples(self):
        return self.source.level_downsamples

    def level_shape(self, level: int):
        return self.source.level_shape(level)

    def _read(self, y0, x0, y1, x1):
        return self.normalizer.transform(self.source._read(y0, x0, y1, x1))

    def _read_level(self, level, y0, x0, y1, x1):
        return self.normalizer.transform(self.source._read_level(level, y0, x0, y1, x1))


def sample_tissue(section, n: int = 24, size_um: float = 64.0, seed: int = 0) -> np.ndarray:
    """uint8 (n, s, s, 3) patches of ``size_um`` read at 0.5 um/px at tissue positions of
    ``section`` (non-white thumbnail pixels, chosen with ``seed``)."""
    from .geometry import TARGET_UM_PER_PX, read_calibrated
    from .image import thumbnail_factor

    image = section.image
    thumb = image.thumbnail(1024)
    f = thumbnail_factor(image.shape, 1024)
    mn, mx = thumb.min(axis=2).astype(int), thumb.max(axis=2).astype(int)
    ys, xs = np.nonzero(((mn < 200) | (mx - mn > 25)) & (mx > 30))
    if len(ys) == 0:
        raise InputError(f"section {section.name!r}: no tissue found for stain normalisation "
                         "(the image looks blank)")
    pick = np.random.default_rng(seed).choice(len(ys), size=min(n, len(ys)), replace=False)
    side = int(round(size_um / TARGET_UM_PER_PX))
    scale = section.um_per_px / TARGET_UM_PER_PX
    out = []
    for i in np.sort(pick):
        cy, cx = (ys[i] + 0.5) * f * scale, (xs[i] + 0.5) * f * scale
        out.append(read_calibrated(image, section.um_per_px, int(cy) - side // 2,
                                   int(cx) - side // 2, side, side))
    return np.stack(out)


def _fit(method: str, pixels: np.ndarray) -> dict:
    return macenko_fit(pixels) if method == "macenko" else reinhard_fit(pixels)


def check_stain(method: str | None, ref=None) -> None:
    """Fail early (:class:`InputError`) on a stain method not in :data:`METHODS` or a ``ref``
    that is neither ``"builtin"``, a Section, a recorded target nor an existing file."""
    if method is not None and method not in METHODS:
        raise InputError(f"stain normalisation must be one of {', '.join(METHODS)}, got "
                         f"{method!r}")
    if ref is None or isinstance(ref, dict) or hasattr(ref, "image") or ref == "builtin":
        return
    if not Path(str(ref)).is_file():
        raise InputError(f"stain reference {ref!r}: expected 'builtin', a section or an "
                         "existing RGB image file (.png/.jpg/.tif)")


def target_stats(method: str, ref="builtin") -> tuple[dict, str]:
    """Reference statistics and a label for ``ref``: ``"builtin"``, a Section, an image
    file path, or a recorded target (:attr:`StainNormalizer.record`, e.g. from a model
    folder) of the same method."""
    if isinstance(ref, dict):
        if ref.get("method") != method or not isinstance(ref.get("target"), dict):
            raise InputError(f"the recorded stain target is for {ref.get('method')!r}, not "
                             f"{method!r}: give --stain-ref builtin or a file")
        return ({k: np.asarray(v, np.float64) for k, v in ref["target"].items()},
                str(ref.get("ref", "recorded")))
    if isinstance(ref, str) and ref == "builtin":
        stats = {"he": HE_REF, "maxc": MAXC_REF} if method == "macenko" else _builtin_lab()
        return stats, "builtin"
    if hasattr(ref, "image") and hasattr(ref, "um_per_px"):
        return _fit(method, sample_tissue(ref)), f"section:{ref.name}"
    p = Path(str(ref))
    if not p.is_file():
        raise InputError(f"stain reference {ref!r}: expected 'builtin', a section or an "
                         "existing RGB image file (.png/.jpg/.tif)")
    from PIL import Image

    with Image.open(p) as im:
        im.thumbnail((2048, 2048))
        arr = np.asarray(im.convert("RGB"))
    return _fit(method, arr), f"file:{p.name}"


def record_target(method: str, ref="builtin") -> dict:
    """``{"method", "ref", "target"}`` (JSON-able) of ``ref``'s statistics: fitted once, then
    passed as ``ref`` to every section so that all map to the very same target."""
    check_stain(method, ref)
    target, label = target_stats(method, ref)
    t = {k: np.asarray(v, np.float64).tolist() for k, v in target.items()}
    return {"method": method, "ref": label, "target": t}


def normalizer_for(section, method: str = "macenko", ref="builtin",
                   seed: int = 0) -> StainNormalizer:
    """A :class:`StainNormalizer` from ``section``'s stain to the reference ``ref``."""
    check_stain(method)
    if method == "none":
        return StainNormalizer("none", {}, {}, "none")
    target, label = target_stats(method, ref)
    return StainNormalizer(method, _fit(method, sample_tissue(section, seed=seed)), target,
                           label)


def applied(section) -> dict:
    """What stain normalisation ``section``'s pixels went through (for outputs):
    ``{"method": "none"}`` or the normaliser's method, reference, source and target."""
    image = getattr(section, "image", None)
    if isinstance(image, NormalizedImage):
        return image.normalizer.params
    return {"method": "none"}


def normalize_section(section, method: str = "macenko", ref="builtin", seed: int = 0):
    """``section`` with its image stain-normalised to ``ref`` (``"builtin"``, a Section, an
    image file or a recorded target, :func:`record_target`; unchanged for ``"none"``; never
    normalised twice). The input section is not modified."""
    check_stain(method)
    if method == "none" or isinstance(section.image, NormalizedImage):
        return section
    norm = normalizer_for(section, method, ref, seed)
    return dataclasses.replace(section, image=NormalizedImage(section.image, norm))


__all__ = ["METHODS", "StainNormalizer", "NormalizedImage", "normalize_section", "applied",
           "check_stain", "target_stats", "record_target",
           "normalizer_for", "macenko_fit", "reinhard_fit", "sample_tissue", "HE_REF",
           "MAXC_REF"]
