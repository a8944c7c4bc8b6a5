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


def band_rows(width_sp: int, n_genes: int) -> int:
    """Superpixel rows per streamed band: :data:`MAP_ROWS`, fewer where a band of the slide's
    width would exceed :data:`BAND_BYTES` (at least one row)."""
    fit = BAND_BYTES // max(1, int(width_sp) * int(n_genes) * 4)
    return int(min(MAP_ROWS, max(1, fit)))
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
    uns: dict
    grid: object  # histosr.grid.Grid

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
                               self.grid, list(self.var.index), self.uns)
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
    uns = method.superpixel_uns(section, features, use_cons, post.calibrate)
    v = pd.DataFrame(index=pd.Index(genes))
    if var is not None:
        v = v.join(var.reindex(v.index))
    rel = method.reliability()
    if rel is not None:
        for col in rel.columns:
            v[col] = rel[col].reindex(v.index).to_numpy()
    keep = [g for g in dict.fromkeys(keep or ()) if g in genes]
    kidx = np.array([genes.index(g) for g in keep], dtype=np.int64)
    kept_vals = np.zeros((n, len(keep)), np.float32)
    kept_r, kept_c = np.zeros(n, np.int32), np.zeros(n, np.int32)
    mgenes = list(maps_genes or genes)
    midx = np.array([genes.index(g) for g in mgenes], dtype=np.int64)
    total, top = np.zeros(G), np.zeros(G)

    f = tmp_h5 = tmp_maps = zmaps = None
    if h5ad is not None:
        h5ad = Path(h5ad)
        h5ad.parent.mkdir(parents=True, exist_ok=True)
        tmp_h5 = h5ad.with_name(h5ad.name + ".tmp.h5ad")
        f = _h5ad_skeleton(tmp_h5, n, v, uns, grid, section, images)
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
        i = 0
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
            j = i + len(rr)
            if len(rr):
                total += band.sum(axis=0, dtype=np.float64)
                np.maximum(top, band.max(axis=0), out=top)
                kept_vals[i:j] = band[:, kidx]
                kept_r[i:j], kept_c[i:j] = rr, cc
                if f is not None:
                    f["X"][i:j] = band
                    f["obs/row"][i:j] = rr
                    f["obs/col"][i:j] = cc
                    f["obs/_index"][i:j] = np.array([f"{a}_{b}" for a, b in zip(rr, cc)],
                                                    dtype=object)
                    f["obsm/spatial"][i:j] = grid.xy_of_cells(rr, cc)
            if zmaps is not None:
                for g0 in range(0, len(mgenes), 16):
                    gi = midx[g0 : g0 + 16]
                    slab = np.zeros((len(gi), r1 - r0, w), np.float32)
                    slab[:, rr - r0, cc] = band[:, gi].T
                    zmaps[g0 : g0 + len(gi), r0:r1, :] = slab
                    if with_unc:
                        slab[:, rr - r0, cc] = uband[:, gi].T
                        zunc[g0 : g0 + len(gi), r0:r1, :] = slab
            i = j
        v[PRED_MEAN] = (total / max(n, 1)).astype(np.float32)
        v[PRED_MAX] = top.astype(np.float32)
        if f is not None:
            from anndata.io import write_elem

            del f["var"]
            write_elem(f, "var", v)
            f.close()
            f = None
            os.replace(tmp_h5, h5ad)
        if zmaps is not None:
            root.attrs["histosr"] = json.dumps(
                {"genes": mgenes, "method": method.name, "units": "counts per 8 um superpixel",
                 "consistency": bool(use_cons), "calibrate": bool(post.calibrate),
                 **({"uncertainty_units": method.uncertainty_units} if with_unc else {})})
            shutil.rmtree(maps, ignore_errors=True)
            tmp_maps.rename(maps)
    finally:
        if f is not None:
            f.close()
    kept = None
    if keep:
        kept = KeptMaps(kept_vals, pd.DataFrame({"row": kept_r, "col": kept_c}),
                        v.loc[keep].copy(), {**uns, "grid_shape": list(grid.shape)}, grid)
    return StreamedPrediction(h5ad, maps, n, v, kept, bool(use_cons))


def _h5ad_skeleton(path: Path, n: int, var: pd.DataFrame, uns: dict, grid, section, images):
    """An open (r+) h5ad whose ``X`` (n, G), ``obs`` (index, row, col) and
    ``obsm["spatial"]`` are full-length datasets to fill: anndata writes a one-row
    AnnData (its own encoding of every element), then each per-observation dataset is
    recreated at full length with the same dtype and encoding attributes."""
    import h5py

    one = superpixel_anndata(np.zeros((1, len(var)), np.float32), np.zeros(1, np.int64),
                             np.zeros(1, np.int64), grid, list(var.index), uns)
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
