"""Writing predictions: AnnData (atomic), zarr gene maps streamed block by block."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .features.featuremap import create_zarr_array


def write_h5ad(adata, path: str | Path) -> Path:
    """Write an AnnData atomically (temp file + rename)."""
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
    memory stays bounded by the block, whatever the slide size."""
    import zarr
    from tqdm.auto import tqdm

    from .consistency import ConsistencyScaler

    method.check_fitted()
    genes = list(genes or method.genes_)
    gidx = np.array([method.genes_.index(g) for g in genes])
    use_cons = method.consistency if consistency is None else consistency
    scaler = ConsistencyScaler.from_method(method, section, features) if use_cons else None
    h, w = features.shape
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w")
    maps = create_zarr_array(root, "maps", (len(genes), h, w),
                             (min(len(genes), 16), min(h, 256), min(w, 256)), "f4")
    mask = features.mask
    for r0 in tqdm(range(0, h, block_rows), desc="predict", disable=not progress):
        r1 = min(r0 + block_rows, h)
        rr, cc = np.nonzero(mask[r0:r1])
        block = np.zeros((len(genes), r1 - r0, w), dtype=np.float32)
        if len(rr):
            cells = features.grid.flat(rr + r0, cc)
            vals = np.asarray(method._predict_cells(section, features, cells), np.float32)
            if scaler is not None:
                vals = scaler.apply(vals, cells)
            block[:, rr, cc] = vals[:, gidx].T
        maps[:, r0:r1, :] = block
    root.attrs["histosr"] = json.dumps({"genes": genes, "method": method.name,
                                        "units": "counts per 8 um superpixel",
                                        "consistency": bool(use_cons)})
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
