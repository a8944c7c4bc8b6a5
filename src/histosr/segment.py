"""Nucleus and cell segmentation of the H&E, streamed tile by tile over whole slides.

Frame: segmentation runs on the calibrated grid (0.5 um/px,
:func:`histosr.geometry.read_calibrated`; whole slides read the pyramid level nearest to it),
and the labels are stored there: label pixel (row i, col j) covers full-resolution
x in [j / s, (j + 1) / s), y in [i / s, (i + 1) / s) with ``s = um_per_px / 0.5``, and 16 x 16
label px make one 8 um superpixel of the prediction grid. Coordinates in tables are
full-resolution px, x = column, y = row.

Segmenters (:func:`make_segmenter`), each a function RGB tile (0.5 um/px) -> integer labels:

* ``"classical"`` (default, no weights): hematoxylin optical density (colour deconvolution,
  :func:`histosr.nuclei.hematoxylin_od`), Otsu threshold, distance-transform watershed and
  size filters (:func:`histosr.nuclei.nuclei_labels_classical`, the nuclei counter's rule);
* ``"cellpose"``, ``"stardist"``, ``"instanseg"``: the user's installed package and weights
  already on disk. Nothing is downloaded: a missing package or weights file is an
  :class:`~histosr.errors.InputError` that says what to install or where to put the file.

Seams: tiles of ``tile_um`` are read with a margin of ``margin_um`` on every side (more than
a nucleus is wide); each tile keeps only the nuclei whose centroid lies in its core, whole,
even where they reach into a neighbour's core. A nucleus is thus never cut by a tile border
nor found twice; a nucleus seen by two tiles with slightly different outlines (centroids on
both sides of the border) is kept once: a new nucleus that overlaps already written ones by
more than half its area is dropped. Labels are global, 1..n in tile order.

Cells are the nuclei grown by ``expand_um`` (default 15 um, Xenium's expansion cap) without
overlap: each pixel within that distance goes to the nearest nucleus
(``skimage.segmentation.expand_labels``, as bin2cell does for Visium HD). A second tiled pass
reads the nuclei of each tile with a margin of ``expand_um``, so a cell does not depend on
the tiling.

Output (:func:`segment` with ``out``): a zarr group with ``nuclei`` and ``cells`` (int32,
(H, W) at 0.5 um/px, chunked; tiles without tissue are never written and read as 0) and
``table/`` (one array per column of the nucleus table). Memory is bounded by a few tiles
plus the nucleus table, whatever the slide size.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .geometry import SP_PX, TARGET_UM_PER_PX, Grid, read_calibrated

#: the label images' pixel size
LABEL_UM_PER_PX = TARGET_UM_PER_PX
SEGMENTERS = ("classical", "cellpose", "stardist", "instanseg")
#: nucleus table columns (besides the label index), units in the names
TABLE_COLUMNS = ("x", "y", "area_um2", "eccentricity", "solidity", "major_axis_um",
                 "minor_axis_um", "hematoxylin_mean", "hematoxylin_std")
VERSION = 1


# -- segmenters ------------------------------------------------------------------------------
def _classical(min_od: float = 0.03, min_area_um2: float = 8.0, max_area_um2: float = 300.0,
               min_distance_um: float = 2.5, sigma_um: float = 1.0, min_solidity: float = 0.0):
    from .nuclei import nuclei_labels_classical

    def fn(rgb: np.ndarray) -> np.ndarray:
        return nuclei_labels_classical(rgb, LABEL_UM_PER_PX, min_od=min_od,
                                       min_area_um2=min_area_um2, max_area_um2=max_area_um2,
                                       min_distance_um=min_distance_um, sigma_um=sigma_um,
                                       min_solidity=min_solidity)

    return fn


def _missing(pkg: str, pip: str, what: str) -> InputError:
    return InputError(f"segmenter {pkg!r} needs the {pkg} package (pip install {pip}) and "
                      f"{what} on disk; histosr never downloads weights. The 'classical' "
                      "segmenter needs neither")


def _cellpose(model: str = "nuclei", diameter_um: float | None = None, gpu: bool = False,
              flow_threshold: float = 0.4, cellprob_threshold: float = 0.0):
    """Cellpose: ``model`` is a weights file, or a built-in model name whose weights are
    already in Cellpose's model folder ($CELLPOSE_LOCAL_MODELS_PATH, default
    ~/.cellpose/models). Cellpose < 4 gets the grey image inverted (nuclei bright)."""
    try:
        from cellpose import models
    except ImportError:
        raise _missing("cellpose", "cellpose", "its model weights") from None
    from .nuclei import _cellpose_models_dir

    p = Path(str(model)).expanduser()
    if not p.is_file():
        d = _cellpose_models_dir()
        if not any(d.glob(f"{model}*")):
            raise InputError(f"Cellpose weights for model {model!r} not found in {d}: histosr "
                             "never downloads weights. Fetch them once with Cellpose itself "
                             f"(python -c \"from cellpose import models; models.CellposeModel("
                             f"model_type='{model}')\"), set CELLPOSE_LOCAL_MODELS_PATH to the "
                             "folder holding them, or pass model=PATH_TO_WEIGHTS")
        p = None
    legacy = hasattr(models, "Cellpose")  # cellpose < 4: channels, invert, model_type
    if legacy:
        net = models.CellposeModel(gpu=gpu, pretrained_model=str(p)) if p else \
            models.CellposeModel(gpu=gpu, model_type=str(model))
    else:
        net = models.CellposeModel(gpu=gpu, pretrained_model=str(p) if p else str(model))
    diameter = None if diameter_um is None else float(diameter_um) / LABEL_UM_PER_PX

    def fn(rgb: np.ndarray) -> np.ndarray:
        kw = dict(diameter=diameter, flow_threshold=flow_threshold,
                  cellprob_threshold=cellprob_threshold)
        if legacy:
            kw.update(channels=[0, 0], invert=True)
        return np.asarray(net.eval(np.asarray(rgb), **kw)[0])

    return fn


def _stardist(model: str | None = None, prob_thresh: float | None = None,
              nms_thresh: float | None = None):
    """StarDist 2D: ``model`` is the folder of a StarDist2D model (``config.json`` and
    weights, e.g. the extracted ``2D_versatile_he`` release)."""
    try:
        from csbdeep.utils import normalize
        from stardist.models import StarDist2D
    except ImportError:
        raise _missing("stardist", "stardist tensorflow", "a model folder") from None
    p = Path(str(model)).expanduser() if model else None
    if p is None or not (p / "config.json").is_file():
        raise InputError(f"segmenter 'stardist' needs model=FOLDER, a StarDist2D model folder "
                         f"with config.json and weights (got {model!r}); histosr never "
                         "downloads weights (StarDist2D.from_pretrained does: run it once "
                         "yourself and pass the folder it extracted)")
    net = StarDist2D(None, name=p.name, basedir=str(p.parent))

    def fn(rgb: np.ndarray) -> np.ndarray:
        x = normalize(np.asarray(rgb, np.float32), 1, 99.8, axis=(0, 1, 2))
        return np.asarray(net.predict_instances(x, prob_thresh=prob_thresh,
                                                nms_thresh=nms_thresh)[0])

    return fn


def _instanseg(model: str | None = None, device: str = "cpu"):
    """InstanSeg: ``model`` is a TorchScript file (``instanseg.pt`` of the
    ``brightfield_nuclei`` release) or a folder holding one; default
    ``$INSTANSEG_MODEL``. The model sees each tile at 0.5 um/px, every channel scaled to its
    0.1-99.9 percentiles (as the release's pre-processing), and returns labels (channel 0:
    nuclei)."""
    import torch

    model = model or os.environ.get("INSTANSEG_MODEL")
    p = Path(str(model)).expanduser() if model else None
    if p is not None and p.is_dir():
        p = p / "instanseg.pt"
    if p is None or not p.is_file():
        raise InputError(f"segmenter 'instanseg' needs model=PATH, an InstanSeg TorchScript "
                         f"file (instanseg.pt of the brightfield_nuclei release) or its folder "
                         f"(got {model!r}; $INSTANSEG_MODEL sets a default); histosr never "
                         "downloads weights")
    try:
        net = torch.jit.load(str(p), map_location=device).eval()
    except Exception as e:  # noqa: BLE001 - torch raises several types for a bad file
        raise InputError(f"{p} is not a TorchScript model ({type(e).__name__}): expected "
                         "InstanSeg's instanseg.pt") from None

    def fn(rgb: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1).float()
        flat = x.reshape(3, -1)
        lo = torch.quantile(flat, 0.001, dim=1)[:, None, None]
        hi = torch.quantile(flat, 0.999, dim=1)[:, None, None]
        x = (x - lo) / torch.clamp(hi - lo, min=1e-3)
        with torch.no_grad():
            out = net(x[None].to(device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out[0, 0].to("cpu").numpy().astype(np.int32)

    return fn


_BACKENDS: dict[str, Callable] = {"classical": _classical, "cellpose": _cellpose,
                                  "stardist": _stardist, "instanseg": _instanseg}


def segmenter_params(name: str) -> dict:
    """The parameters a segmenter takes, with their defaults."""
    fn = _backend(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()}


def _backend(name: str) -> Callable:
    if name not in _BACKENDS:
        from .params import suggest

        raise InputError(f"unknown segmenter {name!r}{suggest(str(name), _BACKENDS)}: expected "
                         f"one of {', '.join(SEGMENTERS)}")
    return _BACKENDS[name]


def check_segmenter(name: str, params: dict | None = None) -> None:
    """Unknown segmenter names and parameters are errors naming the valid ones (no model
    is loaded)."""
    from .params import check_names

    check_names(f"segmenter {name!r}", dict(params or {}), list(segmenter_params(name)))


def make_segmenter(name: str = "classical", **params) -> Callable[[np.ndarray], np.ndarray]:
    """A function RGB uint8 (H, W, 3) at 0.5 um/px -> int32 nucleus labels (0 = background)
    (see the module docstring for ``name`` and its ``params``)."""
    check_segmenter(name, params)
    return _backend(name)(**params)


# -- per-tile measurements -------------------------------------------------------------------
def _solidities(rr: np.ndarray, cc: np.ndarray, inv: np.ndarray, n_obj: int,
                n_dir: int = 64) -> np.ndarray:
    """Per object: pixel area / area of the convex hull of its pixel squares. ``rr``, ``cc``
    in row-major order, ``inv`` the object index of each pixel.

    The hull is measured through its support function in ``n_dir`` directions (the max of
    x cos t + y sin t over each row's extreme pixel corners): the polygon of those support
    lines circumscribes the hull, so the solidity is at most ~1-2 % low for nuclei of a few
    hundred px (exact for rectangles), computed for all objects at once: a Qhull call per
    nucleus costs twice as much on a tile of 1000 nuclei."""
    order = np.argsort(inv, kind="stable")  # per object, still row-major
    o, r, c = inv[order], rr[order].astype(np.float64), cc[order].astype(np.float64)
    new_run = np.ones(len(o), bool)
    new_run[1:] = (o[1:] != o[:-1]) | (r[1:] != r[:-1])
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [len(o)]]) - 1
    ro, y, x0, x1 = o[starts], r[starts], c[starts], c[ends] + 1.0
    area = np.bincount(inv, minlength=n_obj).astype(np.float64)
    # each run's 4 pixel corners, relative to its object's centre (inside the hull)
    cy = np.bincount(inv, weights=rr + 0.5, minlength=n_obj) / area
    cx = np.bincount(inv, weights=cc + 0.5, minlength=n_obj) / area
    py = np.concatenate([y, y + 1, y, y + 1]) - np.tile(cy[ro], 4)
    px = np.concatenate([x0, x0, x1, x1]) - np.tile(cx[ro], 4)
    obj = np.tile(ro, 4)
    srt = np.argsort(obj, kind="stable")
    py, px, obj = py[srt], px[srt], obj[srt]
    first = np.searchsorted(obj, np.arange(n_obj))
    t = 2.0 * np.pi * np.arange(n_dir) / n_dir
    px, py = px.astype(np.float32), py.astype(np.float32)
    h = np.maximum.reduceat(px[:, None] * np.cos(t).astype(np.float32)
                            + py[:, None] * np.sin(t).astype(np.float32), first,
                            axis=0).astype(np.float64)
    d = 2.0 * np.pi / n_dir
    hull = 0.5 * np.sum(h * (np.roll(h, 1, axis=1) + np.roll(h, -1, axis=1)
                             - 2.0 * h * np.cos(d)), axis=1) / np.sin(d)
    return np.clip(area / np.maximum(hull, 1e-9), 0.0, 1.0)


def measure_nuclei(labels: np.ndarray, h: np.ndarray | None = None,
                   um_per_px: float = LABEL_UM_PER_PX) -> pd.DataFrame:
    """Per label of an integer image: ``cy``, ``cx`` (centroid, px, pixel centres at +0.5),
    ``area_um2``, ``eccentricity``, ``major_axis_um``, ``minor_axis_um`` (the ellipse with
    the same second moments, as ``skimage.measure.regionprops``), ``solidity`` (area /
    convex-hull area of the pixel squares) and, with the hematoxylin optical density ``h``,
    its mean and standard deviation. Moments are summed with ``bincount`` over all labels at
    once (regionprops loops over objects in Python: ~20x slower on a tile of 1000 nuclei)."""
    rr, cc = np.nonzero(labels)
    if not len(rr):
        return pd.DataFrame(columns=["cy", "cx", *TABLE_COLUMNS[2:]],
                            index=pd.Index([], name="label", dtype=np.int64))
    lab = labels[rr, cc].astype(np.int64)
    ids, inv = np.unique(lab, return_inverse=True)
    n = np.bincount(inv).astype(np.float64)

    def mean(v):
        return np.bincount(inv, weights=v) / n

    y, x = rr.astype(np.float64), cc.astype(np.float64)
    my, mx = mean(y), mean(x)
    dy, dx = y - my[inv], x - mx[inv]
    syy, sxx, sxy = mean(dy * dy), mean(dx * dx), mean(dy * dx)
    root = np.sqrt(((syy - sxx) / 2) ** 2 + sxy**2)
    l1 = np.maximum((syy + sxx) / 2 + root, 0.0)
    l2 = np.maximum((syy + sxx) / 2 - root, 0.0)
    ecc = np.sqrt(np.divide(l1 - l2, l1, out=np.zeros_like(l1), where=l1 > 0))
    sol = _solidities(rr, cc, inv, len(ids))
    out = pd.DataFrame({"cy": my + 0.5, "cx": mx + 0.5, "area_um2": n * um_per_px**2,
                        "eccentricity": ecc, "solidity": sol,
                        "major_axis_um": 4.0 * np.sqrt(l1) * um_per_px,
                        "minor_axis_um": 4.0 * np.sqrt(l2) * um_per_px},
                       index=pd.Index(ids, name="label"))
    if h is not None:
        hv = np.asarray(h, np.float64)[rr, cc]
        m = mean(hv)
        out["hematoxylin_mean"] = m
        out["hematoxylin_std"] = np.sqrt(np.maximum(mean(hv * hv) - m * m, 0.0))
    return out


# -- the segmentation ------------------------------------------------------------------------
@dataclass
class Segmentation:
    """Nuclei and cells of one image (see the module docstring).

    ``nuclei`` / ``cells``: int32 (H, W) label images at 0.5 um/px (zarr arrays, or numpy
    in memory); ``table``: one row per nucleus (index = its label), columns
    :data:`TABLE_COLUMNS` (``x``/``y`` centroid in full-resolution px); ``um_per_px``: the
    full-resolution pixel size of the image; ``info``: how it was made."""

    nuclei: object
    cells: object
    table: pd.DataFrame
    um_per_px: float
    image_shape: tuple[int, int]
    info: dict = field(default_factory=dict)
    path: str | None = None

    @property
    def scale(self) -> float:
        """Label px per full-resolution px."""
        return self.um_per_px / LABEL_UM_PER_PX

    @property
    def n_nuclei(self) -> int:
        return int(len(self.table))

    @property
    def grid(self) -> Grid:
        """The 8 um superpixel grid of the image (16 x 16 label px per superpixel)."""
        return Grid(float(self.um_per_px), tuple(self.image_shape))

    def __repr__(self) -> str:
        h, w = self.nuclei.shape
        return (f"Segmentation({self.n_nuclei} nuclei, labels {w}x{h} px at "
                f"{LABEL_UM_PER_PX} um/px, segmenter {self.info.get('segmenter')!r}, "
                f"cells = nuclei + {self.info.get('expand_um')} um)")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Segmentation:
        """A segmentation written by :func:`segment` (``out=path``)."""
        import zarr

        path = Path(path)
        try:
            root = zarr.open_group(str(path), mode="r")
            info = json.loads(root.attrs["histosr_segmentation"])
        except Exception:  # noqa: BLE001 - any unreadable folder is the same user error
            raise InputError(f"{path} is not a segmentation folder (written by "
                             "histosr.segment.segment / `histosr cells`)") from None
        tab = root["table"]
        table = pd.DataFrame({c: np.asarray(tab[c][:]) for c in TABLE_COLUMNS},
                             index=pd.Index(np.asarray(tab["label"][:], np.int64), name="label"))
        return cls(root["nuclei"], root["cells"], table, float(info["um_per_px"]),
                   tuple(info["image_shape"]), info, str(path))


def _tissue_mask(source, image, um: float) -> np.ndarray:
    """Tissue superpixels (dilated by one, so nuclei at the edge are kept)."""
    from scipy import ndimage as ndi

    from .tissue import section_tissue_mask, superpixel_stats, texture_score, tissue_mask

    if hasattr(source, "counts"):
        m = section_tissue_mask(source)
    else:
        rgb, var = superpixel_stats(image, um)
        m = tissue_mask(rgb, texture=texture_score(rgb.mean(axis=2), var))
    return ndi.binary_dilation(m, iterations=1)


def _open(source, um_per_px):
    """(image, um_per_px) of a Section, an ImageSource, a path or an array."""
    if hasattr(source, "image") and hasattr(source, "um_per_px"):
        return source.image, float(source.um_per_px)
    from .image import open_image
    from .slide import slide_um_per_px

    image = open_image(source)
    return image, slide_um_per_px(image, um_per_px)


def segmentation_key(image, um: float, info: dict) -> str:
    """Digest of what determines a segmentation: the image's pixels and the settings."""
    from .features.cache import image_identity
    from .keys import digest

    return digest({"image": image_identity(image), "um": round(float(um), 9),
                   **{k: info[k] for k in ("segmenter", "params", "expand_um", "tile_um",
                                           "margin_um", "tissue", "version")}}, size=16)


def segment(source, um_per_px: float | None = None, *, out: str | os.PathLike | None = None,
            segmenter: str = "classical", expand_um: float = 15.0, tile_um: float = 512.0,
            margin_um: float = 32.0, tissue: bool | np.ndarray = True, progress: bool = True,
            n_jobs: int = 1, **params) -> Segmentation:
    """Segment nuclei and cells on the H&E, tile by tile (see the module docstring).

    ``source``: a Section (its image, pixel size and tissue mask), an ImageSource, an image
    path or an array (then ``um_per_px``, unless a slide's metadata has it). ``out``: zarr
    folder for the labels (needed for whole slides; default in memory); an existing one made
    with the same image and settings is reused. ``segmenter`` and its ``params``: see
    :func:`make_segmenter`. ``expand_um``: cell = nucleus grown by this distance (0: cells
    are the nuclei). ``tile_um`` / ``margin_um``: tile core side and overlap (the margin must
    exceed the widest nucleus). ``tissue``: only tiles on tissue are segmented (``True``:
    the detected tissue; or a bool mask on the 8 um grid; ``False``: every tile).
    ``n_jobs``: tiles segmented at once on threads (classical segmenter; the result does
    not depend on it).
    """
    from .keys import digest, jsonable

    for name, v, lo in (("expand_um", expand_um, 0.0), ("tile_um", tile_um, 16.0),
                        ("margin_um", margin_um, 2.0)):
        if not (np.isfinite(v) and v >= lo):
            raise InputError(f"{name} must be a number >= {lo:g} um, got {v!r}")
    check_segmenter(segmenter, params)
    image, um = _open(source, um_per_px)
    grid = Grid(um, tuple(int(v) for v in image.shape[:2]))
    info = {"segmenter": segmenter, "params": jsonable(params), "expand_um": float(expand_um),
            "tile_um": float(tile_um), "margin_um": float(margin_um),
            "tissue": f"mask {digest(np.asarray(tissue, bool))}"
            if isinstance(tissue, np.ndarray) else bool(tissue),
            "version": VERSION, "um_per_px": um, "image_shape": list(grid.image_shape),
            "label_um_per_px": LABEL_UM_PER_PX}
    key = segmentation_key(image, um, info)
    info["key"] = key
    if out is not None and Path(out).exists():
        try:
            old = Segmentation.load(out)
        except InputError:
            raise InputError(f"{out} exists and is not a segmentation folder: histosr "
                             "overwrites only its own output; choose another out") from None
        if old.info.get("key") == key:
            return old
    fn = make_segmenter(segmenter, **params)
    if isinstance(tissue, np.ndarray):
        mask = np.asarray(tissue, bool)
        if mask.shape != grid.shape:
            raise InputError(f"tissue mask {mask.shape} does not match the 8 um grid "
                             f"{grid.shape} of the image")
    else:
        mask = _tissue_mask(source, image, um) if tissue else None

    H, W = grid.calibrated_shape
    tile = max(SP_PX, int(round(tile_um / LABEL_UM_PER_PX)))
    margin = int(np.ceil(margin_um / LABEL_UM_PER_PX))
    if out is None:
        nuclei = np.zeros((H, W), np.int32)
        cells = np.zeros((H, W), np.int32)
        tmp = root = None
    else:
        import zarr

        from .features.featuremap import create_zarr_array

        tmp = Path(str(out) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        root = zarr.open_group(str(tmp), mode="w")
        chunks = (min(H, tile), min(W, tile))
        nuclei = create_zarr_array(root, "nuclei", (H, W), chunks, "i4")
        cells = create_zarr_array(root, "cells", (H, W), chunks, "i4")

    tiles = [(y0, x0) for y0 in range(0, H, tile) for x0 in range(0, W, tile)
             if mask is None or _on_tissue(mask, y0, x0, tile, margin)]
    table = _pass_nuclei(fn, image, um, nuclei, tiles, tile, margin, grid.scale, progress,
                         n_jobs=int(n_jobs) if segmenter == "classical" else 1)
    _pass_cells(nuclei, cells, tiles, tile, float(expand_um), progress)
    info["n_nuclei"] = int(len(table))
    if root is None:
        return Segmentation(nuclei, cells, table, um, grid.image_shape, info)
    _write_table(root, table)
    root.attrs["histosr_segmentation"] = json.dumps(info)
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return Segmentation.load(out)


def _on_tissue(mask: np.ndarray, y0: int, x0: int, tile: int, margin: int) -> bool:
    r0, c0 = max(y0 - margin, 0) // SP_PX, max(x0 - margin, 0) // SP_PX
    r1, c1 = -(-(y0 + tile + margin) // SP_PX), -(-(x0 + tile + margin) // SP_PX)
    return bool(mask[r0:r1, c0:c1].any())


def _segment_tile(fn, image, um: float, y0: int, x0: int, tile: int, margin: int, H: int,
                  W: int):
    """Read one tile with its margin and segment it: (ya, xa, labels, table of the nuclei
    it owns, their centroids cy, cx in global label px), or None without any."""
    from .nuclei import hematoxylin_od

    ya, xa = y0 - margin, x0 - margin
    h = min(y0 + tile, H) - y0 + 2 * margin
    w = min(x0 + tile, W) - x0 + 2 * margin
    rgb = read_calibrated(image, um, ya, xa, h, w)
    lab = np.asarray(fn(rgb))
    if lab.shape != (h, w):
        raise InputError(f"the segmenter returned labels of shape {lab.shape} for a tile of "
                         f"{(h, w)} px")
    if not lab.any():
        return None
    m = measure_nuclei(lab, hematoxylin_od(rgb))
    cy, cx = m["cy"].to_numpy() + ya, m["cx"].to_numpy() + xa  # label px, global
    own = (cy >= y0) & (cy < min(y0 + tile, H)) & (cx >= x0) & (cx < min(x0 + tile, W))
    if not own.any():
        return None
    return ya, xa, lab, m[own], cy[own], cx[own]


def _tile_results(work, tiles, n_jobs: int):
    """``work(y0, x0)`` for every tile, in tile order; with ``n_jobs`` > 1 on a thread pool
    (the numpy / scipy steps release the GIL) with at most 2 x n_jobs tiles in flight, so
    memory stays bounded and the output does not depend on ``n_jobs``."""
    if n_jobs <= 1:
        for y0, x0 in tiles:
            yield work(y0, x0)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(n_jobs) as ex:
        pending: deque = deque()
        it = iter(tiles)
        for y0, x0 in it:
            pending.append(ex.submit(work, y0, x0))
            if len(pending) >= 2 * n_jobs:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _pass_nuclei(fn, image, um: float, nuclei, tiles, tile: int, margin: int, scale: float,
                 progress: bool, n_jobs: int = 1) -> pd.DataFrame:
    """Pass 1: segment each tile with its margin, keep the nuclei it owns, write them (in
    tile order, whatever ``n_jobs``)."""
    from tqdm.auto import tqdm

    H, W = nuclei.shape
    next_id = 0
    parts = []

    def work(y0, x0):
        return _segment_tile(fn, image, um, y0, x0, tile, margin, H, W)

    results = _tile_results(work, tiles, n_jobs)
    for res in tqdm(results, total=len(tiles), desc="nuclei", unit="tile",
                    disable=not progress):
        if res is None:
            continue
        ya, xa, lab, m, cy, cx = res
        h, w = lab.shape
        # the written region: this tile and its margin, inside the image
        ra, xa2 = max(ya, 0), max(xa, 0)
        rb, xb2 = min(ya + h, H), min(xa + w, W)
        region = np.asarray(nuclei[ra:rb, xa2:xb2])
        sub = lab[ra - ya: rb - ya, xa2 - xa: xb2 - xa]
        lut = np.zeros(int(lab.max()) + 1, np.int64)
        lut[m.index.to_numpy()] = np.arange(1, len(m) + 1)
        cand = lut[sub]  # 1..k for owned nuclei, 0 elsewhere
        n_all = np.bincount(cand.ravel(), minlength=len(m) + 1)
        n_taken = np.bincount(cand[(cand > 0) & (region > 0)], minlength=len(m) + 1)
        # a nucleus already written by a neighbour (seen again with a slightly different
        # outline) is kept once
        keep = (n_taken[1:] * 2 <= n_all[1:]) & (n_all[1:] > 0)
        if not keep.any():
            continue
        new = np.zeros(len(m) + 1, np.int64)
        new[1:][keep] = next_id + np.arange(1, int(keep.sum()) + 1)
        put = new[cand]
        put[region > 0] = 0
        region = np.where(put > 0, put, region).astype(np.int32)
        nuclei[ra:rb, xa2:xb2] = region
        part = m[keep].copy()
        part.index = pd.Index(new[1:][keep], name="label")
        part["x"] = cx[keep] / scale  # label px -> full-resolution px (continuous)
        part["y"] = cy[keep] / scale
        parts.append(part[list(TABLE_COLUMNS)])
        next_id += int(keep.sum())
    if not parts:
        return pd.DataFrame({c: np.zeros(0) for c in TABLE_COLUMNS},
                            index=pd.Index([], name="label", dtype=np.int64))
    return pd.concat(parts)


def _pass_cells(nuclei, cells, tiles, tile: int, expand_um: float, progress: bool) -> None:
    """Pass 2: cells = nuclei grown by ``expand_um`` without overlap, tile by tile."""
    from skimage.segmentation import expand_labels
    from tqdm.auto import tqdm

    H, W = nuclei.shape
    e = int(np.ceil(expand_um / LABEL_UM_PER_PX))
    for y0, x0 in tqdm(tiles, desc="cells", unit="tile", disable=not progress):
        y1, x1 = min(y0 + tile, H), min(x0 + tile, W)
        ya, xa, yb, xb = max(y0 - e, 0), max(x0 - e, 0), min(y1 + e, H), min(x1 + e, W)
        region = np.asarray(nuclei[ya:yb, xa:xb])
        if not region.any():
            continue
        grown = expand_labels(region, e) if e else region
        cells[y0:y1, x0:x1] = grown[y0 - ya: y1 - ya, x0 - xa: x1 - xa]


def _write_table(root, table: pd.DataFrame) -> None:
    from .features.featuremap import create_zarr_array

    g = root.create_group("table")
    n = len(table)
    ch = (max(1, min(n, 1 << 20)),)
    a = create_zarr_array(g, "label", (n,), ch, "i8")
    if n:
        a[:] = table.index.to_numpy(np.int64)
    for c in TABLE_COLUMNS:
        a = create_zarr_array(g, c, (n,), ch, "f8")
        if n:
            a[:] = table[c].to_numpy(np.float64)


def nuclei_per_spot(seg: Segmentation, section) -> np.ndarray:
    """int (n_spots,) number of nuclei whose centroid lies in each spot's disk."""
    from scipy.spatial import cKDTree

    if not seg.n_nuclei or not section.n_spots:
        return np.zeros(section.n_spots, np.int64)
    tree = cKDTree(seg.table[["x", "y"]].to_numpy())
    hits = tree.query_ball_point(section.xy, section.spot_radius_px)
    return np.array([len(h) for h in hits], np.int64)


def warn_empty(seg: Segmentation, what: str) -> None:
    warnings.warn(f"no nucleus was found on {what} (segmenter {seg.info.get('segmenter')!r}): "
                  "the cells output is empty", stacklevel=3)


__all__ = ["segment", "Segmentation", "make_segmenter", "measure_nuclei", "check_segmenter",
           "segmenter_params", "nuclei_per_spot", "SEGMENTERS", "LABEL_UM_PER_PX"]
