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
from pathlib import Path

import numpy as np

from .features.featuremap import create_zarr_array

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


def predict_maps(method, section, features, path: str | Path, genes: list[str] | None = None,
                 block_rows: int = 64, consistency: bool | None = None,
                 progress: bool = True) -> Path:
    """Stream super-resolved gene maps into a zarr group ``maps`` (G, H_sp, W_sp) float32
    (counts per 8 um superpixel, 0 outside tissue), block of superpixel rows by block:
    memory stays bounded by the block, whatever the slide size. Methods with a
    per-superpixel uncertainty (``tags()["uncertainty"]``) also get ``uncertainty``, the
    same shape (spread on the log1p CP10k scale, 0 outside tissue)."""
    import zarr
    from tqdm.auto import tqdm

    method.check_fitted()
    genes = list(genes or method.genes_)
    gidx = np.array([method.genes_.index(g) for g in genes])
    use_cons = method.consistency if consistency is None else consistency
    post = method.post_steps(section, features, consistency=use_cons)
    with_unc = bool(method.tags().get("uncertainty"))
    h, w = features.shape
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w")
    maps = create_zarr_array(root, "maps", (len(genes), h, w),
                             (min(len(genes), 16), min(h, 256), min(w, 256)), "f4")
    unc = create_zarr_array(root, "uncertainty", maps.shape, maps.chunks, "f4") \
        if with_unc else None
    mask = features.mask
    for r0 in tqdm(range(0, h, block_rows), desc="predict", disable=not progress):
        r1 = min(r0 + block_rows, h)
        rr, cc = np.nonzero(mask[r0:r1])
        block = np.zeros((len(genes), r1 - r0, w), dtype=np.float32)
        ublock = np.zeros_like(block) if unc is not None else None
        if len(rr):
            cells = features.grid.flat(rr + r0, cc)
            vals = post(np.asarray(method._predict_cells(section, features, cells),
                                   np.float32), cells)
            block[:, rr, cc] = vals[:, gidx].T
            if ublock is not None:
                u = method.uncertainty_cells(section, features, cells)
                ublock[:, rr, cc] = u[:, gidx].T
        maps[:, r0:r1, :] = block
        if unc is not None:
            unc[:, r0:r1, :] = ublock
    root.attrs["histosr"] = json.dumps({"genes": genes, "method": method.name,
                                        "units": "counts per 8 um superpixel",
                                        "consistency": bool(use_cons),
                                        "calibrate": bool(method.calibrate),
                                        **({"uncertainty_units": method.uncertainty_units}
                                           if unc is not None else {})})
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


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
