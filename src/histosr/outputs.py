"""Writing predictions: AnnData (atomic) in scanpy's spatial layout, zarr gene maps streamed
block by block.

Every AnnData histosr writes carries scanpy's / squidpy's spatial convention
(:func:`add_spatial`), so ``sc.pl.spatial(adata, color=GENE)`` draws it over the H&E:
``obsm["spatial"]`` (x = column, y = row, full-resolution px) and
``uns["spatial"][library_id]`` with ``images`` (``hires``: longest side <= 2000 px,
``lowres``: <= 600 px, made from the slide's thumbnail: low pyramid levels or a
reduced-size JPEG decode, never the whole slide in memory) and ``scalefactors``
(``tissue_hires_scalef``, ``tissue_lowres_scalef``: image px per full-resolution px;
``spot_diameter_fullres``: the diameter of one observation in full-resolution px, the 8 um
pitch for superpixels).

Per-gene self-validation lives in ``var`` (:data:`HELDOUT_PCC`, :data:`HELDOUT_PCC_INTERP`):
previews and the report read these columns when present and say "not validated" otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .errors import InputError
from .features.featuremap import create_zarr_array
from .methods.base import superpixel_anndata

#: ``var`` column: per-gene Pearson r of the method at held-out measured spots (self-validation)
HELDOUT_PCC = "heldout_pcc"
#: ``var`` column: the same for interpolation of the measured spots (the baseline to beat)
HELDOUT_PCC_INTERP = "heldout_pcc_interpolation"
#: ``var`` column: per-gene Pearson r with the spots the model was fitted on (in sample)
IN_SAMPLE_PCC = "in_sample_spot_pcc"
HIRES_PX = 2000
LOWRES_PX = 600


def spatial_images(image, hires: int = HIRES_PX, lowres: int = LOWRES_PX) -> dict:
    """``{"hires": RGB uint8, "lowres": RGB uint8, "tissue_hires_scalef": s,
    "tissue_lowres_scalef": s}`` for an :class:`~histosr.image.ImageSource`: thumbnails whose
    longest side is at most ``hires`` / ``lowres`` px (never upsampled), and the factor
    from full-resolution px to each (``1 / f`` of :func:`histosr.image.thumbnail_factor`)."""
    from .image import thumbnail_factor

    out = {}
    for key, side in (("hires", hires), ("lowres", lowres)):
        out[key] = np.ascontiguousarray(image.thumbnail(side), dtype=np.uint8)
        out[f"tissue_{key}_scalef"] = 1.0 / thumbnail_factor(image.shape, side)
    return out


def is_superpixel(adata) -> bool:
    """Whether ``adata`` holds 8 um superpixels (``obs`` row/col on ``uns["histosr"]``'s
    ``grid_shape``) rather than spots."""
    return ("row" in adata.obs and "col" in adata.obs
            and "grid_shape" in adata.uns.get("histosr", {}))


def observation_diameter_px(adata, section) -> float:
    """Diameter of one observation in full-resolution px: the 8 um superpixel pitch for a
    superpixel AnnData (``obs`` row/col), else ``uns["histosr"]["spot_diameter_um"]`` or
    the section's spot diameter."""
    info = adata.uns.get("histosr", {})
    if is_superpixel(adata):
        return float(info.get("superpixel_um", 8.0)) / float(section.um_per_px)
    d = info.get("spot_diameter_um") or section.spot_diameter_um
    return float(d) / float(section.um_per_px)


def add_spatial(adata, section, library_id: str | None = None, images: dict | None = None,
                spot_diameter_px: float | None = None):
    """Give ``adata`` (observations at ``obsm["spatial"]``, full-resolution px of
    ``section.image``) scanpy's ``uns["spatial"][library_id]`` (see the module docstring).
    ``library_id``: default the section's name; ``images``: :func:`spatial_images` when
    already made (several outputs of one section share them); ``spot_diameter_px``: default
    :func:`observation_diameter_px`. Modifies and returns ``adata``."""
    if "spatial" not in adata.obsm:
        raise ValueError('add_spatial needs obsm["spatial"] (x, y full-resolution px)')
    lib = str(library_id or section.name or "section")
    im = images or spatial_images(section.image)
    d = observation_diameter_px(adata, section) if spot_diameter_px is None else spot_diameter_px
    meta = {"source_image_path": str(getattr(section.image, "path", None) or ""),
            "um_per_px": float(section.um_per_px), "platform": str(section.platform)}
    adata.uns["spatial"] = {lib: {
        "images": {"hires": im["hires"], "lowres": im["lowres"]},
        "scalefactors": {"tissue_hires_scalef": float(im["tissue_hires_scalef"]),
                         "tissue_lowres_scalef": float(im["tissue_lowres_scalef"]),
                         "spot_diameter_fullres": float(d),
                         "microns_per_pixel": float(section.um_per_px)},
        "metadata": meta}}
    return adata


def write_h5ad(adata, path: str | Path, section=None, images: dict | None = None) -> Path:
    """Write an AnnData atomically (temp file + rename). With ``section`` (the section whose
    image ``obsm["spatial"]`` refers to) and no ``uns["spatial"]`` yet, :func:`add_spatial`
    is applied first (to ``adata`` itself), so scanpy draws the file over the H&E."""
    if section is not None and "spatial" not in adata.uns:
        add_spatial(adata, section, images=images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.h5ad")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
    return path


#: superpixel rows of one streamed band (and of one zarr map chunk)
MAP_ROWS = 32
#: most bytes of one band's float32 (superpixels x genes) prediction: wide slides get bands
#: of fewer rows (a 40,000 px slide is 2,500 superpixels wide), so memory does not grow
#: with the slide's width
BAND_BYTES = 64 * 2**20


def band_points(point_bytes: int) -> int:
    """Observations per streamed block when each takes ``point_bytes`` bytes (e.g. 4 x genes
    of float32): as many as fit in :data:`BAND_BYTES`, at least one."""
    return int(max(1, BAND_BYTES // max(1, int(point_bytes))))


def band_rows(width_sp: int, n_genes: int) -> int:
    """Superpixel rows per streamed band: :data:`MAP_ROWS`, fewer where a band of the slide's
    width would exceed :data:`BAND_BYTES` (at least one row)."""
    return int(min(MAP_ROWS, max(1, band_points(4 * int(n_genes)) // max(1, int(width_sp)))))


#: observations per chunk of the streamed ``X`` (x up to 64 genes: 1 MB float32 chunks)
X_CHUNK_ROWS = 4096
#: ``var`` columns the streamed prediction adds: per-gene statistics over the tissue
PRED_MEAN, PRED_MAX = "mean_per_superpixel", "max_per_superpixel"


@dataclass
class KeptMaps:
    """The ``keep`` genes of a streamed prediction at every tissue superpixel, in memory
    without an AnnData's per-observation names: on a whole slide the 3 million
    ``"row_col"`` strings cost ~500 MB, the values 12 MB per gene. It has what
    :func:`histosr.pl.previews` reads from an AnnData (``X``, ``obs`` row/col with a
    RangeIndex, ``obsm["spatial"]`` x = column, y = row in full-resolution px, ``var``,
    ``uns``); :meth:`to_anndata` gives the AnnData (the file's layout) when it fits."""

    X: np.ndarray  # (n_obs, n_genes) float32, counts per 8 um superpixel
    obs: pd.DataFrame  # row, col (int32) superpixel grid indices
    var: pd.DataFrame
    info: dict  # what the file's uns["histosr"] holds (method, scale, grid_shape, ...)
    grid: object  # histosr.grid.Grid

    @property
    def uns(self) -> dict:
        return {"histosr": self.info}

    @property
    def n_obs(self) -> int:
        return int(self.X.shape[0])

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @property
    def obsm(self) -> dict:
        r, c = self.obs["row"].to_numpy(), self.obs["col"].to_numpy()
        return {"spatial": self.grid.xy_of_cells(r, c)}

    def to_anndata(self) -> ad.AnnData:
        a = superpixel_anndata(self.X, self.obs["row"].to_numpy(), self.obs["col"].to_numpy(),
                               self.grid, list(self.var.index), self.info)
        a.var = self.var.copy()
        return a


@dataclass
class StreamedPrediction:
    """What :func:`stream_prediction` wrote. ``kept``: the ``keep`` genes in memory
    (:class:`KeptMaps`, e.g. for previews); ``var``: the file's ``var`` (with
    :data:`PRED_MEAN`, :data:`PRED_MAX`)."""

    h5ad: Path | None
    maps: Path | None
    n_obs: int
    var: pd.DataFrame
    kept: KeptMaps | None = None
    consistency: bool = False


def stream_prediction(method, section, features, h5ad: str | Path | None = None,
                      maps: str | Path | None = None, var: pd.DataFrame | None = None,
                      images: dict | None = None, keep=(), consistency: bool | None = None,
                      calibrate: bool | None = None, post=None,
                      maps_genes: list[str] | None = None,
                      progress: bool = True) -> StreamedPrediction:
    """Predict every tissue superpixel a band of superpixel rows at a time (:func:`band_rows`)
    and stream it to disk, never holding the tissue x genes prediction in memory:

    * ``h5ad``: the AnnData of :meth:`~histosr.methods.base.SuperpixelMethod.predict`
      (``at="superpixels"``; counts per 8 um superpixel, ``obs`` row/col, ``obsm["spatial"]``
      x = column, y = row in full-resolution px, scanpy's ``uns["spatial"]``) with ``X``
      a chunked dense HDF5 dataset, so ``anndata.read_h5ad(path)`` reads it whole and
      ``read_h5ad(path, backed="r")`` lazily; ``var`` columns are added to its ``var``.
    * ``maps``: zarr ``maps`` (G, H_sp, W_sp) float32 (0 outside tissue) of ``maps_genes``
      (default all); for a method with a per-superpixel uncertainty
      (``tags()["uncertainty"]``) also ``uncertainty``, the same shape (its spread, on the
      scale ``attrs["histosr"]["uncertainty_units"]`` says, 0 outside tissue).

    Memory is bounded by a band (its superpixels x genes) plus the ``keep`` genes' columns.
    ``post``: the method's post-steps already fitted (:meth:`~histosr.methods.base.
    SuperpixelMethod.post_steps`), else fitted here from ``consistency`` and ``calibrate``
    (default the method's settings). Both files appear atomically (temp + rename)."""
    import zarr
    from tqdm.auto import tqdm

    from .consistency import CELL_BLOCK

    method.check_fitted()
    genes = list(method.genes_)
    if post is None:
        post = method.post_steps(section, features, consistency, calibrate)
    use_cons = post.consistency
    with_unc = maps is not None and bool(method.tags().get("uncertainty"))
    grid, mask = features.grid, features.mask
    h, w = features.shape
    n = int(mask.sum())
    G = len(genes)
    rows = band_rows(w, G)
    info = method.superpixel_uns(section, features, use_cons, post.calibrate)
    v = pd.DataFrame(index=pd.Index(genes))
    if var is not None:
        v = v.join(var.reindex(v.index))
    rel = method.reliability()
    if rel is not None:
        for col in rel.columns:
            v[col] = rel[col].reindex(v.index).to_numpy()
    mgenes = list(maps_genes or genes)
    midx = np.array([genes.index(g) for g in mgenes], dtype=np.int64)

    sink = tmp_maps = zmaps = None
    if maps is not None:
        maps = Path(maps)
        tmp_maps = maps.with_name(maps.name + ".tmp")
        shutil.rmtree(tmp_maps, ignore_errors=True)
        root = zarr.open_group(str(tmp_maps), mode="w")
        chunks = (min(len(mgenes), 16), min(h, rows), min(w, 256))
        zmaps = create_zarr_array(root, "maps", (len(mgenes), h, w), chunks, "f4")
        zunc = create_zarr_array(root, "uncertainty", (len(mgenes), h, w), chunks, "f4") \
            if with_unc else None
    try:
        sink = PredictionSink(h5ad, n, v, info, grid, section, images, keep)
        for r0 in tqdm(range(0, h, rows), desc="predict", disable=not progress):
            r1 = min(r0 + rows, h)
            rr, cc = np.nonzero(mask[r0:r1])
            rr = rr + r0
            band = np.zeros((len(rr), G), np.float32)
            uband = np.zeros((len(rr), G), np.float32) if with_unc else None
            cells = grid.flat(rr, cc)
            for b in range(0, len(cells), CELL_BLOCK):
                blk = cells[b : b + CELL_BLOCK]
                band[b : b + CELL_BLOCK] = method.predict_cells(section, features, blk,
                                                                post=post)
                if with_unc:
                    uband[b : b + CELL_BLOCK] = method.uncertainty_cells(section, features, blk)
            sink.add(rr, cc, band)
            if zmaps is not None:
                for g0 in range(0, len(mgenes), 16):
                    gi = midx[g0 : g0 + 16]
                    slab = np.zeros((len(gi), r1 - r0, w), np.float32)
                    slab[:, rr - r0, cc] = band[:, gi].T
                    zmaps[g0 : g0 + len(gi), r0:r1, :] = slab
                    if with_unc:
                        slab[:, rr - r0, cc] = uband[:, gi].T
                        zunc[g0 : g0 + len(gi), r0:r1, :] = slab
        v, kept = sink.finish()
        if zmaps is not None:
            root.attrs["histosr"] = json.dumps(
                {"genes": mgenes, "method": method.name, "units": "counts per 8 um superpixel",
                 "consistency": bool(use_cons), "calibrate": bool(post.calibrate),
                 **({"uncertainty_units": method.uncertainty_units} if with_unc else {})})
            shutil.rmtree(maps, ignore_errors=True)
            tmp_maps.rename(maps)
    finally:
        if sink is not None:
            sink.close()
    return StreamedPrediction(sink.h5ad, maps, n, v, kept, bool(use_cons))


class PredictionSink:
    """Receives a streamed prediction block by block, observations in order: fills the
    h5ad of :func:`_h5ad_skeleton` (optional: ``h5ad=None`` writes no file), the per-gene
    sum and max over the observations and the ``keep`` genes' columns (in memory). The
    file appears atomically (temp + rename) at :meth:`finish`; :meth:`close` after a
    failure removes the temp file. ``info``: what ``uns["histosr"]`` holds (``grid_shape``
    added); ``grid``: the 8 um grid of the observations' ``row``/``col``."""

    def __init__(self, h5ad: str | Path | None, n: int, var: pd.DataFrame, info: dict, grid,
                 section=None, images: dict | None = None, keep=()):
        genes = list(var.index)
        self.n, self.var, self.info, self.grid = int(n), var.copy(), info, grid
        self.keep = [g for g in dict.fromkeys(keep or ()) if g in genes]
        self.kidx = np.array([genes.index(g) for g in self.keep], dtype=np.int64)
        self.kept_vals = np.zeros((self.n, len(self.keep)), np.float32)
        self.kept_r, self.kept_c = np.zeros(self.n, np.int32), np.zeros(self.n, np.int32)
        self.total, self.top = np.zeros(len(genes)), np.zeros(len(genes))
        self.i = 0
        self.f = self.tmp = None
        self.h5ad = None if h5ad is None else Path(h5ad)
        if self.h5ad is not None:
            self.h5ad.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = self.h5ad.with_name(self.h5ad.name + ".tmp.h5ad")
            self.f = _h5ad_skeleton(self.tmp, self.n, self.var, info, grid, section, images)

    def add(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, names=None,
            xy: np.ndarray | None = None) -> None:
        """The next observations: superpixel ``rows``/``cols``, ``vals`` (n, genes) float32;
        ``names`` (default ``"row_col"``) and ``xy`` (full-res px, x = column, y = row;
        default the superpixel centres)."""
        i, j = self.i, self.i + len(rows)
        if j > self.n or vals.shape != (len(rows), len(self.var)):
            raise RuntimeError(f"streamed block {vals.shape} at observation {i} does not fit "
                               f"{self.n} observations x {len(self.var)} genes")
        if not len(rows):
            return
        self.total += vals.sum(axis=0, dtype=np.float64)
        np.maximum(self.top, vals.max(axis=0), out=self.top)
        self.kept_vals[i:j] = vals[:, self.kidx]
        self.kept_r[i:j], self.kept_c[i:j] = rows, cols
        if self.f is not None:
            f = self.f
            f["X"][i:j] = vals
            f["obs/row"][i:j] = rows
            f["obs/col"][i:j] = cols
            if names is None:
                names = [f"{a}_{b}" for a, b in zip(rows, cols)]
            f["obs/_index"][i:j] = np.array([str(a) for a in names], dtype=object)
            f["obsm/spatial"][i:j] = self.grid.xy_of_cells(rows, cols) if xy is None else xy
        self.i = j

    def finish(self) -> tuple[pd.DataFrame, KeptMaps | None]:
        """Add :data:`PRED_MEAN` and :data:`PRED_MAX` to ``var``, write it and move the file
        into place. Returns (var, the kept genes or None)."""
        if self.i != self.n:
            raise RuntimeError(f"streamed {self.i} observations, expected {self.n}")
        v = self.var
        v[PRED_MEAN] = (self.total / max(self.n, 1)).astype(np.float32)
        v[PRED_MAX] = self.top.astype(np.float32)
        if self.f is not None:
            from anndata.io import write_elem

            del self.f["var"]
            write_elem(self.f, "var", v)
            self.f.close()
            self.f = None
            os.replace(self.tmp, self.h5ad)
            self.tmp = None
        kept = None
        if self.keep:
            kept = KeptMaps(self.kept_vals, pd.DataFrame({"row": self.kept_r,
                                                          "col": self.kept_c}),
                            v.loc[self.keep].copy(),
                            {**self.info, "grid_shape": list(self.grid.shape)}, self.grid)
        return v, kept

    def close(self) -> None:
        """Close the file; after a failure (no :meth:`finish`) remove the temp file."""
        if self.f is not None:
            self.f.close()
            self.f = None
        if self.tmp is not None:
            Path(self.tmp).unlink(missing_ok=True)
            self.tmp = None


def stream_spot_prediction(method, section, h5ad: str | Path, info: dict | None = None,
                           images: dict | None = None, keep=(),
                           progress: bool = True) -> StreamedPrediction:
    """``method.predict(section)`` of a spot-level method (:attr:`~histosr.methods.spot.
    SpotMethod.blockwise`) at a section whose points are 8 um superpixels (``counts.obs``
    ``row``/``col``, e.g. :func:`histosr.image_only.section_from_image` with
    ``grid="superpixels"``), streamed to ``h5ad`` a block of points at a time
    (:func:`band_points` of :meth:`~histosr.methods.spot.SpotMethod.point_bytes`), never
    holding the points x genes prediction in memory: X (log1p CP10k) a chunked dense HDF5
    dataset (``anndata.read_h5ad`` whole or ``backed="r"``), ``obs`` the section's ids and
    row/col, ``obsm["spatial"]`` the points (full-res px, x = column, y = row), scanpy's
    ``uns["spatial"]``; ``var`` gets :data:`PRED_MEAN` and :data:`PRED_MAX`. ``info``: added
    to ``uns["histosr"]``. Temporary files (section-wide crop features for
    ``standardize="section"``) go to ``<h5ad>.scratch`` beside it and are removed; the file
    appears atomically. ``keep``: genes returned in memory (:class:`KeptMaps`, previews)."""
    from tqdm.auto import tqdm

    from .geometry import grid_for

    method.check_fitted()
    if not getattr(method, "blockwise", False):
        raise InputError(f"{method.name} predicts all its points at once: it cannot stream")
    obs = section.counts.obs
    if "row" not in obs or "col" not in obs:
        raise InputError("stream_spot_prediction needs a section of 8 um superpixels (obs "
                         "row/col): section_from_image(..., grid='superpixels')")
    genes = list(method.genes_)
    grid = grid_for(section)
    rr = obs["row"].to_numpy()
    cc = obs["col"].to_numpy()
    ids = section.counts.obs_names
    xy = np.asarray(section.xy, dtype=np.float64)
    n = len(xy)
    block = band_points(method.point_bytes())
    h5ad = Path(h5ad)
    scratch = h5ad.with_name(h5ad.name + ".scratch")
    info = {**method.prediction_uns(section), **(info or {})}
    sink = None
    try:
        sink = PredictionSink(h5ad, n, pd.DataFrame(index=pd.Index(genes)), info, grid,
                              section, images, keep)
        i = 0
        with tqdm(total=n, desc="predict", disable=not progress) as bar:
            for vals in method.predict_blocks(section, xy, block, scratch):
                j = i + len(vals)
                sink.add(rr[i:j], cc[i:j], np.asarray(vals, dtype=np.float32), ids[i:j],
                         xy[i:j])
                bar.update(len(vals))
                i = j
        v, kept = sink.finish()
    finally:
        if sink is not None:
            sink.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return StreamedPrediction(h5ad, None, n, v, kept, False)


def _h5ad_skeleton(path: Path, n: int, var: pd.DataFrame, info: dict, grid, section, images):
    """An open (r+) h5ad whose ``X`` (n, G), ``obs`` (index, row, col) and
    ``obsm["spatial"]`` are full-length datasets to fill: anndata writes a one-row
    AnnData (its own encoding of every element), then each per-observation dataset is
    recreated at full length with the same dtype and encoding attributes."""
    import h5py

    one = superpixel_anndata(np.zeros((1, len(var)), np.float32), np.zeros(1, np.int64),
                             np.zeros(1, np.int64), grid, list(var.index), info)
    one.var = var.copy()
    if section is not None:
        add_spatial(one, section, images=images)
    one.write_h5ad(path)
    f = h5py.File(path, "r+", rdcc_nbytes=128 << 20, rdcc_nslots=100_003)
    G = len(var)
    for name, shape in (("X", (n, G)), ("obs/_index", (n,)), ("obs/row", (n,)),
                        ("obs/col", (n,)), ("obsm/spatial", (n, 2))):
        old = f[name]
        attrs, dtype = dict(old.attrs), old.dtype
        del f[name]
        rows = X_CHUNK_ROWS if name == "X" else 4 * X_CHUNK_ROWS
        chunks = None if n == 0 or G == 0 else \
            (min(n, rows),) + ((min(G, 64),) if name == "X" else tuple(shape[1:]))
        ds = f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks)
        for k, val in attrs.items():
            ds.attrs[k] = val
    return f


def predict_maps(method, section, features, path: str | Path, genes: list[str] | None = None,
                 consistency: bool | None = None, progress: bool = True) -> Path:
    """Stream super-resolved gene maps into a zarr group ``maps`` (G, H_sp, W_sp) float32
    (counts per 8 um superpixel, 0 outside tissue), a band of superpixel rows at a time:
    memory stays bounded by the band, whatever the slide size
    (:func:`stream_prediction` without the h5ad)."""
    return stream_prediction(method, section, features, maps=path, maps_genes=genes,
                             consistency=consistency, progress=progress).maps


def maps_from_anndata(adata, genes: list[str]) -> np.ndarray:
    """(G, H_sp, W_sp) dense maps from a superpixel AnnData (NaN outside tissue)."""
    h, w = adata.uns["histosr"]["grid_shape"]
    out = np.full((len(genes), h, w), np.nan, dtype=np.float32)
    r = adata.obs["row"].to_numpy()
    c = adata.obs["col"].to_numpy()
    from .arrays import gene_values

    for i, g in enumerate(genes):
        out[i, r, c] = gene_values(adata, g, np.float32)
    return out


def write_maps_from_anndata(adata, path: str | Path, genes: list[str] | None = None) -> Path:
    """Write a superpixel AnnData's genes as zarr maps (small sections)."""
    import zarr

    genes = list(genes or adata.var_names)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w")
    h, w = adata.uns["histosr"]["grid_shape"]
    maps = create_zarr_array(root, "maps", (len(genes), h, w),
                             (min(len(genes), 16), min(h, 256), min(w, 256)), "f4")
    for g0 in range(0, len(genes), 16):
        m = maps_from_anndata(adata, genes[g0 : g0 + 16])
        maps[g0 : g0 + 16] = np.nan_to_num(m, nan=0.0)
    root.attrs["histosr"] = json.dumps({"genes": genes, "method": adata.uns["histosr"]["method"],
                                        "units": "counts per 8 um superpixel"})
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path
