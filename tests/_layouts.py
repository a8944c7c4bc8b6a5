"""Input folders in the real layouts of Space Ranger (Visium HD), Xenium Onboard Analysis and
the other readers, written from synthetic sections (shared by the reader tests and the
end-to-end matrix)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import scipy.sparse as sp

XEN_PX = 0.2125


def write_10x_h5(path, X, barcodes, genes, types=None):
    """10x v3 feature-barcode HDF5 (features x barcodes CSC)."""
    import h5py

    csc = sp.csc_matrix(sp.csr_matrix(X).T.astype(np.int32))
    types = types or ["Gene Expression"] * len(genes)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = csc.data, csc.indices, csc.indptr
        g["shape"] = np.array(csc.shape)
        g["barcodes"] = np.array([b.encode() for b in barcodes])
        ft = g.create_group("features")
        ft["name"] = np.array([x.encode() for x in genes])
        ft["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(genes))])
        ft["feature_type"] = np.array([t.encode() for t in types])


def write_visium_hd_layout(sec, root):
    """A Space Ranger HD run: outs/binned_outputs/square_008um + microscope image beside
    outs. Bins are the synthetic section's superpixels (8 um, at 0.5 um/px)."""
    import tifffile

    b = root / "outs" / "binned_outputs" / "square_008um"
    (b / "spatial").mkdir(parents=True)
    obs = sec.counts.obs
    bc = [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(obs["sp_row"], obs["sp_col"])]
    write_10x_h5(b / "filtered_feature_bc_matrix.h5", sec.counts.X, bc, sec.genes)
    # positions list every bin of the slide; only tissue bins are in the matrix
    pos = pd.DataFrame({"barcode": bc, "in_tissue": 1, "array_row": obs["sp_row"].to_numpy(),
                        "array_col": obs["sp_col"].to_numpy(),
                        "pxl_row_in_fullres": sec.xy[:, 1], "pxl_col_in_fullres": sec.xy[:, 0]})
    extra = pd.DataFrame({"barcode": ["s_008um_09999_09999-1"], "in_tissue": [0],
                          "array_row": [9999], "array_col": [9999],
                          "pxl_row_in_fullres": [1.0], "pxl_col_in_fullres": [1.0]})
    pd.concat([pos, extra]).to_parquet(b / "spatial" / "tissue_positions.parquet")
    (b / "spatial" / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": 8.0 / sec.um_per_px, "bin_size_um": 8.0,
        "microns_per_pixel": sec.um_per_px, "tissue_hires_scalef": 0.25,
        "tissue_lowres_scalef": 0.025, "regist_target_img_scalef": 0.25}))
    tifffile.imwrite(root / "sample_tissue_image.tif", sec.image.array)
    return b


def _alignment(theta_deg=20.0, t_um=(150.0, -40.0), he_um=0.5):
    """H&E px -> morphology px: rotate, scale by he_um / 0.2125, translate."""
    t = np.deg2rad(theta_deg)
    s = he_um / XEN_PX
    return np.array([[s * np.cos(t), -s * np.sin(t), t_um[0] / XEN_PX],
                     [s * np.sin(t), s * np.cos(t), t_um[1] / XEN_PX], [0, 0, 1.0]])


def write_xenium_layout(sec, root, boundaries=True):
    """A Xenium outs folder (+ H&E and its alignment CSV beside it). One square cell per
    tissue superpixel: its polygon is the superpixel square, so the area split gives the
    superpixel's counts back exactly."""
    import tifffile

    outs = root / "outs"
    outs.mkdir(parents=True)
    A = _alignment()
    (outs / "experiment.xenium").write_text(json.dumps({"pixel_size": XEN_PX,
                                                        "region_name": "synx"}))
    obs = sec.counts.obs
    ids = [f"cell{r:03d}{c:03d}-1" for r, c in zip(obs["sp_row"], obs["sp_col"])]

    def to_um(xy_px):
        return (xy_px @ A[:2, :2].T + A[:2, 2]) * XEN_PX

    cen = to_um(sec.xy)
    pd.DataFrame({"cell_id": ids, "x_centroid": cen[:, 0], "y_centroid": cen[:, 1],
                  "transcript_counts": np.asarray(sec.counts.X.sum(1)).ravel(),
                  "cell_area": 64.0}).to_parquet(outs / "cells.parquet")
    if boundaries:
        r0, c0 = obs["sp_row"].to_numpy() * 16.0, obs["sp_col"].to_numpy() * 16.0
        corners = np.array([[0, 0], [16, 0], [16, 16], [0, 16], [0, 0]], np.float64)
        verts = np.concatenate([np.stack([c0[i] + corners[:, 0], r0[i] + corners[:, 1]], 1)
                                for i in range(len(ids))])
        vum = to_um(verts)
        pd.DataFrame({"cell_id": np.repeat(ids, 5), "vertex_x": vum[:, 0],
                      "vertex_y": vum[:, 1]}).to_parquet(outs / "cell_boundaries.parquet")
    X = sp.hstack([sp.csr_matrix(sec.counts.X), sp.csr_matrix((sec.n_spots, 2))]).tocsr()
    write_10x_h5(outs / "cell_feature_matrix.h5", X, ids, sec.genes + ["NegPrb1", "NegPrb2"],
                 ["Gene Expression"] * len(sec.genes) + ["Negative Control Probe"] * 2)
    tifffile.imwrite(root / "synx_he_image.ome.tif", sec.image.array)
    pd.DataFrame(A).to_csv(root / "synx_he_imagealignment.csv", header=False, index=False)
    return outs
