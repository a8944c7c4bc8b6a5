"""Nuclei counts per spot crop (HESpotEx's nuclei factor, METHODS 6.1).

Two counters behind :func:`count_nuclei`:

* ``"classical"`` (default, no weights): colour deconvolution (``skimage.color.rgb2hed``,
  Ruifrok & Johnston) to the hematoxylin optical density, Gaussian smoothing (sigma 1 um),
  a threshold (Otsu's over the crop, never below ``min_od``: a crop without nuclei stays
  empty), removal of objects smaller than ``min_area_um2``, and a distance-transform
  watershed that splits touching nuclei (markers = local maxima of the distance at least
  ``min_distance_um`` apart). Returns the number of nuclei.
* ``"cellpose"``: Cellpose 2.x/3.x (``cellpose<4``: ``models.Cellpose(model_type="nuclei")``,
  HESpotEx's settings: flow_threshold 0.8, automatic diameter, min_size 15, channels [1, 0],
  invert). Cellpose downloads its weights at first use; histosr refuses to let it do so
  silently: the nuclei weights must already be in Cellpose's model folder
  (``$CELLPOSE_LOCAL_MODELS_PATH``, default ``~/.cellpose/models``) unless
  ``allow_download=True``. HESpotEx runs Cellpose once on the whole slide and counts labels
  in each crop; histosr runs it per crop (same counts up to nuclei cut by the crop border,
  and no whole-slide mask in memory).

Crops are read at 0.5 um/px (:func:`histosr.features.crops.read_crop`), so sizes are
physical. Coordinates are full-resolution px, x = column, y = row.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import TARGET_UM_PER_PX

COUNTERS = ("classical", "cellpose")


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """float32 (H, W) hematoxylin optical density of an RGB uint8 image: channel 0 of
    ``skimage.color.rgb2hed`` (Ruifrok & Johnston), computed through one 256-entry lookup
    table per channel instead of float64 logs of every pixel (same values to float32
    precision, ~10x faster on whole slides)."""
    from skimage.color.colorconv import hed_from_rgb

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise InputError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        from skimage.color import rgb2hed

        return rgb2hed(rgb[..., :3])[..., 0].astype(np.float32)
    # rgb2hed: max(log(max(v / 255, 1e-6)) / log(1e-6) @ hed_from_rgb, 0)
    v = np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / np.log(1e-6)
    lut = (v[None, :] * hed_from_rgb[:, 0][:, None]).astype(np.float32)  # (3, 256)
    h = lut[0][rgb[..., 0]]
    h += lut[1][rgb[..., 1]]
    h += lut[2][rgb[..., 2]]
    return np.maximum(h, 0.0, out=h)


def nuclei_labels_classical(rgb: np.ndarray, um_per_px: float = TARGET_UM_PER_PX,
                            min_od: float = 0.03, min_area_um2: float = 8.0,
                            min_distance_um: float = 2.5, sigma_um: float = 1.0,
                            max_area_um2: float | None = None, min_solidity: float = 0.0,
                            return_h: bool = False):
    """int32 (H, W) nucleus labels (0 = background, 1..n) of an RGB uint8 (H, W, 3) image at
    ``um_per_px``: hematoxylin channel, threshold, distance-transform watershed (see the
    module docstring). ``max_area_um2`` drops objects larger than a nucleus (after the
    split) and pieces of the split smaller than ``min_area_um2``; ``min_solidity`` drops
    ragged objects (stroma fibres, folds). Both are off by default, which is
    :func:`count_nuclei_classical`'s counting rule. ``return_h``: also return the smoothed
    hematoxylin optical density (float, same shape)."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    h = ndi.gaussian_filter(hematoxylin_od(rgb), sigma_um / um_per_px)
    empty = np.zeros(h.shape, dtype=np.int32)

    def done(seg):
        return (seg, h) if return_h else seg

    if h.max() < min_od:
        return done(empty)
    try:
        thr = float(threshold_otsu(h))
    except ValueError:  # constant image
        return done(empty)
    mask = h > max(thr, min_od)
    mask = ndi.binary_opening(mask, iterations=1)
    lab, n = ndi.label(mask)
    if n == 0:
        return done(empty)
    min_px = min_area_um2 / um_per_px**2
    sizes = np.bincount(lab.ravel())
    mask = (sizes >= min_px)[lab] & (lab > 0)
    if not mask.any():
        return done(empty)
    dist = ndi.distance_transform_edt(mask)
    # one pass over the whole image (``labels=`` would loop over every object: 6x slower);
    # peaks lie inside the mask, where the distance is >= 1
    peaks = peak_local_max(dist, min_distance=max(1, int(round(min_distance_um / um_per_px))),
                           threshold_abs=0.5, exclude_border=False)
    markers = np.zeros(dist.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    seg = watershed(-dist, markers, mask=mask).astype(np.int32, copy=False)
    if max_area_um2 is not None or min_solidity > 0:
        seg = _filter_objects(seg, min_px, None if max_area_um2 is None else
                              max_area_um2 / um_per_px**2, min_solidity)
    return done(seg)


def _filter_objects(seg: np.ndarray, min_px: float, max_px: float | None,
                    min_solidity: float) -> np.ndarray:
    """Relabelled 1..k after dropping objects outside [min_px, max_px] px or below
    ``min_solidity`` (area / convex-hull area)."""
    from skimage.segmentation import relabel_sequential

    sizes = np.bincount(seg.ravel())
    keep = sizes >= min_px
    if max_px is not None:
        keep &= sizes <= max_px
    keep[0] = False
    if min_solidity > 0 and keep.any():
        from skimage.measure import regionprops

        for p in regionprops(np.where(keep[seg], seg, 0)):
            if p.solidity < min_solidity:
                keep[p.label] = False
    seg = np.where(keep[seg], seg, 0)
    return relabel_sequential(seg)[0].astype(np.int32, copy=False)


def count_nuclei_classical(rgb: np.ndarray, um_per_px: float = TARGET_UM_PER_PX,
                           min_od: float = 0.03, min_area_um2: float = 8.0,
                           min_distance_um: float = 2.5, sigma_um: float = 1.0) -> int:
    """Number of nuclei in an RGB uint8 (H, W, 3) image at ``um_per_px``: hematoxylin
    channel, threshold, distance-transform watershed (see the module docstring)."""
    seg = nuclei_labels_classical(rgb, um_per_px, min_od=min_od, min_area_um2=min_area_um2,
                                  min_distance_um=min_distance_um, sigma_um=sigma_um)
    return int(len(np.unique(seg[seg > 0])))


def _cellpose_models_dir() -> Path:
    return Path(os.environ.get("CELLPOSE_LOCAL_MODELS_PATH",
                               Path.home() / ".cellpose" / "models"))


def cellpose_counter(gpu: bool = False, allow_download: bool = False):
    """A function rgb (H, W, 3) uint8 -> nuclei count using Cellpose (``cellpose<4``)."""
    try:
        from cellpose import models
    except ImportError as e:
        raise ImportError(
            "the 'cellpose' nuclei counter needs Cellpose 2.x/3.x: pip install 'cellpose<4' "
            "(or use counter='classical', which needs no weights)") from e
    if not hasattr(models, "Cellpose"):
        raise ImportError("Cellpose >= 4 removed models.Cellpose (the 'nuclei' model that "
                          "HESpotEx uses): pip install 'cellpose<4'")
    d = _cellpose_models_dir()
    if not allow_download and not any(d.glob("nuclei*")):
        raise FileNotFoundError(
            f"Cellpose nuclei weights not found in {d} and histosr never downloads weights "
            "silently: run `python -c \"from cellpose import models; "
            "models.Cellpose(model_type='nuclei')\"` once to fetch them (or set "
            "CELLPOSE_LOCAL_MODELS_PATH to a folder holding them), or pass "
            "allow_download=True")
    model = models.Cellpose(model_type="nuclei", gpu=gpu)

    def count(rgb: np.ndarray) -> int:
        masks = model.eval(np.asarray(rgb), diameter=None, channels=[1, 0],
                           flow_threshold=0.8, min_size=15, invert=True)[0]
        return int(len(np.unique(masks[masks > 0])))

    return count


def count_nuclei(section, centers=None, size_um: float | None = None,
                 counter: str = "classical", cache_dir=None, **kwargs) -> np.ndarray:
    """int32 (n,) nuclei counts in square crops of ``size_um`` (default the spot diameter)
    centred on ``centers`` (n, 2) full-res px (x, y; default the section's spots).
    ``counter``: ``"classical"`` or ``"cellpose"``; ``kwargs`` go to the counter. Cached in
    ``cache_dir`` (keyed by the image, centres, size and counter settings)."""
    from .features.cache import image_identity
    from .features.crops import read_crop
    from .keys import digest

    if counter not in COUNTERS:
        raise InputError(f"counter must be one of {COUNTERS}, got {counter!r}")
    centers = section.xy if centers is None else np.asarray(centers, dtype=np.float64)
    centers = centers.reshape(-1, 2)
    size_um = float(size_um or section.spot_diameter_um)
    size_px = max(8, int(round(size_um / TARGET_UM_PER_PX)))
    path = None
    if cache_dir is not None:
        key = digest({"image": image_identity(section.image),
                      "um": round(float(section.um_per_px), 9), "size": size_px,
                      "counter": counter, "kw": kwargs, "v": 1}, centers, size=12)
        path = Path(cache_dir) / f"nuclei-{counter}-{key}.npy"
        if path.exists():
            return np.load(path)
    if counter == "cellpose":
        fn = cellpose_counter(**kwargs)
    else:
        def fn(rgb):
            return count_nuclei_classical(rgb, TARGET_UM_PER_PX, **kwargs)
    out = np.array([fn(read_crop(section, c, size_px)) for c in centers], dtype=np.int32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, out)
        os.replace(tmp, path)
    return out


def nuclei_factor(counts: np.ndarray, clip: tuple[int, int] = (1, 20)) -> np.ndarray:
    """HESpotEx's per-spot factor in (1, 2]: (number of labels incl. background = count + 1),
    clipped to ``clip``, divided by its maximum over the section, plus 1."""
    c = np.clip(np.asarray(counts, dtype=np.float64) + 1.0, clip[0], clip[1])
    if c.size == 0:
        return c.astype(np.float32)
    return (c / c.max() + 1.0).astype(np.float32)


__all__ = ["count_nuclei", "count_nuclei_classical", "nuclei_labels_classical", "hematoxylin_od",
           "cellpose_counter", "nuclei_factor", "COUNTERS"]
