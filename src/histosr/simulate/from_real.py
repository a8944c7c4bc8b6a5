"""8 um ground truth from high-resolution data, and simulated sections on disk.

METHODS 2.1 / 7.5 (the HISTEX / DeepHEx simulations): Visium HD 8 um bins or Xenium cells are
rasterised onto the section's 8 um superpixel grid (16 calibrated px at 0.5 um/px, see
:mod:`histosr.geometry`) -> truth cube (H_sp, W_sp, G) counts; :func:`histosr.simulate.
pseudo_visium` then pools it into pseudo-Visium spots (55 um disks, 100 um pitch). The result
carries ``truth`` in the format of :func:`histosr.simulate.synthetic_section`, so
:func:`histosr.benchmark.p4` scores it. :func:`write_simulated` / :func:`read_simulated` store
such a section (iStar layout + ``truth.zarr`` + ``section.json``).

Assignment to superpixels: ``"nearest"`` puts a whole bin in the superpixel containing its
centre (the released HISTEX code; exact when bins and superpixels coincide); ``"area"`` splits
counts in proportion to the area of the bin square / cell polygon (or, without polygons, a
disk of the cell's area) inside each superpixel (the released Xenium code; no holes or
double counts when the bin lattice is offset or rotated against the image).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from ..cells import disk_polygon, polygon_weights
from ..errors import InputError
from ..geometry import SP_UM, grid_for
from ..keys import jsonable
from ..section import Section, SectionError

TRUTH_DIR = "truth.zarr"
SECTION_JSON = "section.json"


def _select(section: Section, n_genes: int | None) -> tuple[sp.csr_matrix, list[str]]:
    """Raw counts (sparse) of the selected genes: all when ``n_genes`` is None or the panel
    is smaller, else the HEST rule of :func:`histosr.pp.select_genes`."""
    from ..pp import select_genes

    X = section.counts.X
    X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else sp.csr_matrix(
        np.asarray(X, dtype=np.float64))
    genes = list(section.genes)
    if n_genes is None or len(genes) <= n_genes:
        return X, genes
    chosen = select_genes(section, n_genes)
    if not chosen:
        raise SectionError(f"no gene of {section.name!r} is detected in >= 10% of its bins/cells")
    idx = [genes.index(g) for g in chosen]
    return X[:, idx], chosen


def _cube(W: sp.csr_matrix, X: sp.csr_matrix, shape: tuple[int, int]) -> np.ndarray:
    """Dense (H, W, G) cube = W.T @ X, computed only on touched superpixels."""
    H, Wd = shape
    Wc = W.tocsc()
    used = np.flatnonzero(np.diff(Wc.indptr))
    vals = np.asarray((Wc[:, used].T @ X).todense(), dtype=np.float32)
    cube = np.zeros((H * Wd, X.shape[1]), dtype=np.float32)
    cube[used] = vals
    return cube.reshape(H, Wd, X.shape[1])


def _with_truth(section: Section, cube, genes, mask, source: str, extra: dict) -> Section:
    truth = {"cube": cube, "genes": list(genes), "mask": mask, "source": source}
    meta = {**section.meta, "truth_source": source, **extra}
    return dataclasses.replace(section, truth=truth, meta=meta)


def truth_from_bins(section: Section, n_genes: int | None = 1000, assign: str = "nearest",
                    min_coverage: float = 0.5) -> Section:
    """The section of Visium HD bins (e.g. ``read_visium_hd(path, bin_size=8)``) with an 8 um
    truth cube. ``assign``: ``"nearest"`` or ``"area"`` (bins as squares of ``bin_size_um``,
    axis-aligned in the image). Mask: superpixels that received a bin (``nearest``) or are
    covered to at least ``min_coverage`` by bins (``area``)."""
    grid = grid_for(section)
    X, genes = _select(section, n_genes)
    bin_um = float(section.meta.get("bin_size_um", section.spot_diameter_um))
    if abs(bin_um - SP_UM) > 0.5:
        import warnings

        warnings.warn(f"bins are {bin_um:g} um, not 8 um: the truth sums them per 8 um "
                      "superpixel (use the square_008um level for the published protocol)",
                      stacklevel=2)
    H, W = grid.shape
    if assign == "nearest":
        r, c = grid.cell_of_xy(section.xy)
        flat = grid.flat(r, c)
        Wm = sp.csr_matrix((np.ones(len(flat)), (np.arange(len(flat)), flat)),
                           shape=(len(flat), H * W))
        mask = np.zeros(H * W, bool)
        mask[flat] = True
        mask = mask.reshape(H, W)
    elif assign == "area":
        half = bin_um / 2.0 / SP_UM  # in superpixels
        rc = grid.sp_of_xy(section.xy) + 0.5  # continuous (row, col), superpixel units
        sq = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * half
        polys = [np.array([p[1], p[0]]) + sq for p in rc]
        Wm = polygon_weights(polys, (H, W))
        mask = (np.asarray(Wm.sum(axis=0)).ravel() >= min_coverage).reshape(H, W)
        Wm = _row_normalise(Wm)
    else:
        raise InputError(f"assign must be 'nearest' or 'area', got {assign!r}")
    cube = _cube(Wm, X, (H, W))
    return _with_truth(section, cube, genes, mask, f"visium_hd bins ({assign})",
                       {"truth_assign": assign})


def _row_normalise(Wm: sp.csr_matrix) -> sp.csr_matrix:
    s = np.asarray(Wm.sum(axis=1)).ravel()
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    return sp.diags(inv) @ Wm


def truth_from_cells(section: Section, polygons: dict | list | None = None,
                     n_genes: int | None = 1000, min_coverage: float = 0.5,
                     closing: bool = True) -> Section:
    """The section of Xenium cells (``read_xenium``) with an 8 um truth cube: each cell's
    counts are split over superpixels in proportion to the area of its polygon inside them.

    ``polygons``: per cell (dict keyed by cell id, or a list in the section's cell order)
    (k, 2) vertices in full-res px; default the section's ``cell_boundaries`` file
    (:func:`histosr.io.xenium.read_cell_boundaries`), else disks of ``obs["cell_area_um2"]``
    (or of the section's spot diameter) at the cell centroids. Mask: superpixels covered to at
    least ``min_coverage`` by cells, then (``closing``) a 3x3 binary closing that fills the
    gaps between cells (their truth is what the cells there hold, often 0).
    """
    grid = grid_for(section)
    H, W = grid.shape
    X, genes = _select(section, n_genes)
    s = grid.sp_per_px
    ids = list(section.counts.obs_names)
    if polygons is None and section.meta.get("boundaries_path"):
        from ..io.xenium import read_cell_boundaries

        polygons = read_cell_boundaries(section)
    source = "cell polygons"
    if polygons is None:
        if "cell_area_um2" in section.counts.obs:
            r_um = np.sqrt(section.counts.obs["cell_area_um2"].to_numpy(np.float64) / np.pi)
        else:
            r_um = np.full(len(ids), section.spot_diameter_um / 2.0)
        polys = [disk_polygon(p * s, r / SP_UM) for p, r in zip(section.xy, r_um)]
        source = "cell disks of equal area"
    else:
        if isinstance(polygons, dict):
            missing = [i for i in ids if i not in polygons]
            if missing:
                raise SectionError(f"{len(missing)} cells have no polygon (e.g. {missing[:3]}): "
                                   "expected one polygon per cell id")
            plist = [polygons[i] for i in ids]
        else:
            plist = list(polygons)
            if len(plist) != len(ids):
                raise SectionError(f"{len(plist)} polygons for {len(ids)} cells: expected one "
                                   "per cell, in the section's order")
        polys = [np.asarray(p, dtype=np.float64) * s for p in plist]
    Wm = polygon_weights(polys, (H, W))
    cover = np.asarray(Wm.sum(axis=0)).ravel().reshape(H, W)
    mask = cover >= min_coverage
    if closing:
        mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool)) | mask
    cube = _cube(_row_normalise(Wm), X, (H, W))
    out = _with_truth(section, cube, genes, mask, f"xenium {source} (area)",
                      {"truth_assign": "area"})
    # the cells themselves, for cell-level scores (histosr benchmark cells)
    out.truth["cells"] = {"counts": X.tocsr().astype(np.float32), "ids": ids,
                          "xy": np.asarray(section.xy, np.float64),
                          "area_um2": np.asarray(Wm.sum(axis=1)).ravel() * SP_UM**2,
                          "polygons": [p / s for p in polys]}
    return out


def detect_hd_format(path) -> str:
    """``"visium_hd"`` or ``"xenium"`` for a folder (or a file inside it)."""
    p = Path(path)
    p = p.parent if p.is_file() else p
    if (p / "experiment.xenium").is_file() or (p / "outs" / "experiment.xenium").is_file():
        return "xenium"
    from ..io import detect_platform

    try:
        if detect_platform(p) == "visium_hd":
            return "visium_hd"
    except SectionError:
        pass
    raise SectionError(f"cannot tell the format of {p}: expected a Visium HD run (binned_"
                       "outputs/square_008um or a square_008um folder) or a Xenium output "
                       "folder (experiment.xenium); pass format='visium_hd' or 'xenium'")


def simulate_from(path, format: str | None = None, n_genes: int | None = 1000,
                  assign: str | None = None, min_tissue: float = 0.5, name: str | None = None,
                  **read_kw) -> Section:
    """Read Visium HD 8 um bins or Xenium cells, build the 8 um truth and pool it into
    pseudo-Visium spots (:func:`histosr.simulate.pseudo_visium`). Returns the pseudo-Visium
    Section with ``truth`` (cube, genes, mask), ready for :func:`histosr.benchmark.p4`.

    ``format``: ``"visium_hd"`` or ``"xenium"`` (default: detected). ``assign``: see
    :func:`truth_from_bins` (Xenium always splits by area). Other keywords go to the reader
    (e.g. ``image=``, ``um_per_px=``, ``alignment=``).
    """
    from ..io import read_visium_hd, read_xenium
    from .synthetic import pseudo_visium

    fmt = format or detect_hd_format(path)
    if fmt == "visium_hd":
        read_kw.setdefault("bin_size", 8)
        hd = read_visium_hd(path, **read_kw)
        sec = truth_from_bins(hd, n_genes=n_genes, assign=assign or "nearest")
    elif fmt == "xenium":
        hd = read_xenium(path, **read_kw)
        if assign not in (None, "area"):
            raise InputError("Xenium cells are always split over superpixels by area")
        sec = truth_from_cells(hd, n_genes=n_genes)
    else:
        raise InputError(f"format must be 'visium_hd' or 'xenium', got {fmt!r}")
    out = pseudo_visium(sec, min_tissue=min_tissue, name=name or hd.name)
    out.meta.update(simulated_from=str(path), simulated_format=fmt,
                    n_source_units=int(hd.n_spots))
    return out


# ------------------------------------------------------------------------------ storage
def write_simulated(section: Section, folder, *, jpeg_quality: int = 95) -> Path:
    """Write a section with truth: iStar layout (:func:`histosr.io.write_istar`) plus
    ``truth.zarr`` (``cube`` (H_sp, W_sp, G) float32, ``mask``; attrs ``genes``) and
    ``section.json`` (name, platform, spot diameter, array coordinates, meta). Read back with
    :func:`read_simulated`; ``histosr benchmark p4 --data FOLDER`` scores it."""
    import zarr

    from ..features.featuremap import create_zarr_array
    from ..io import write_istar

    if section.truth is None:
        raise SectionError(f"section {section.name!r} has no truth to write")
    folder = Path(folder)
    write_istar(section, folder, jpeg_quality=jpeg_quality)
    cube = np.asarray(section.truth["cube"], dtype=np.float32)
    tmp = folder / (TRUTH_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    root = zarr.open_group(str(tmp), mode="w")
    h, w, g = cube.shape
    arr = create_zarr_array(root, "cube", cube.shape, (min(h, 256), min(w, 256), min(g, 64)),
                            "f4")
    arr[:] = cube
    m = create_zarr_array(root, "mask", (h, w), (min(h, 1024), min(w, 1024)), "u1")
    m[:] = np.asarray(section.truth["mask"], dtype=np.uint8)
    if section.truth.get("cells") is not None:
        _write_cells(root.create_group("cells"), section.truth["cells"])
    root.attrs["genes"] = [str(x) for x in section.truth["genes"]]
    root.attrs["source"] = str(section.truth.get("source", "synthetic"))
    shutil.rmtree(folder / TRUTH_DIR, ignore_errors=True)
    tmp.rename(folder / TRUTH_DIR)
    obs = section.counts.obs
    info = {"name": section.name, "platform": section.platform,
            "spot_diameter_um": float(section.spot_diameter_um),
            "um_per_px": float(section.um_per_px), "meta": jsonable(section.meta)}
    if {"array_row", "array_col"} <= set(obs.columns):
        info["array"] = {s: [int(r), int(c)] for s, r, c in
                         zip(obs.index, obs["array_row"], obs["array_col"])}
    tmpj = folder / (SECTION_JSON + ".tmp")
    tmpj.write_text(json.dumps(info))
    tmpj.replace(folder / SECTION_JSON)
    return folder


def _write_cells(g, cells: dict) -> None:
    """The truth's cells in a zarr group: counts (CSR arrays), ids, centroids, areas and,
    when present, polygons (flat vertices + offsets) and label images."""
    from ..features.featuremap import create_zarr_array

    def put(name, a, dtype):
        a = np.asarray(a, dtype=dtype)
        arr = create_zarr_array(g, name, a.shape, tuple(max(1, min(n, 1 << 20)) if i == 0
                                                        else max(n, 1)
                                                        for i, n in enumerate(a.shape)),
                                dtype)
        if a.size:
            arr[:] = a

    X = sp.csr_matrix(cells["counts"], dtype=np.float32)
    put("data", X.data, "f4")
    put("indices", X.indices, "i4")
    put("indptr", X.indptr, "i8")
    g.attrs["shape"] = [int(v) for v in X.shape]
    g.attrs["ids"] = [str(i) for i in cells["ids"]]
    put("xy", np.asarray(cells["xy"], np.float64).reshape(-1, 2), "f8")
    put("area_um2", cells["area_um2"], "f8")
    if cells.get("polygons") is not None:
        polys = [np.asarray(p, np.float64).reshape(-1, 2) for p in cells["polygons"]]
        put("poly_xy", np.concatenate(polys) if polys else np.zeros((0, 2)), "f8")
        put("poly_offsets", np.cumsum([0] + [len(p) for p in polys]), "i8")
    for key in ("nuclei", "labels"):
        if cells.get(key) is not None:
            put(key, cells[key], "i4")
    if cells.get("label_um_per_px") is not None:
        g.attrs["label_um_per_px"] = float(cells["label_um_per_px"])


def _read_cells(g) -> dict:
    X = sp.csr_matrix((np.asarray(g["data"][:]), np.asarray(g["indices"][:]),
                       np.asarray(g["indptr"][:])), shape=tuple(g.attrs["shape"]))
    ids = list(g.attrs["ids"])
    if all(i.lstrip("-").isdigit() for i in ids):
        ids = np.array([int(i) for i in ids], np.int64)
    out = {"counts": X, "ids": ids, "xy": np.asarray(g["xy"][:]),
           "area_um2": np.asarray(g["area_um2"][:])}
    if "poly_xy" in g:
        v, o = np.asarray(g["poly_xy"][:]), np.asarray(g["poly_offsets"][:])
        out["polygons"] = [v[a:b] for a, b in zip(o[:-1], o[1:])]
    for key in ("nuclei", "labels"):
        if key in g:
            out[key] = np.asarray(g[key][:])
    if "label_um_per_px" in g.attrs:
        out["label_um_per_px"] = float(g.attrs["label_um_per_px"])
    return out


def is_simulated(folder) -> bool:
    return (Path(folder) / TRUTH_DIR).is_dir() and (Path(folder) / SECTION_JSON).is_file()


def read_simulated(folder) -> Section:
    """A section written by :func:`write_simulated` (or ``histosr simulate``), with truth."""
    import zarr

    from ..io import read_istar

    folder = Path(folder)
    if not is_simulated(folder):
        raise SectionError(f"{folder} is not a simulated section: expected {TRUTH_DIR}/ and "
                           f"{SECTION_JSON} (written by `histosr simulate`)")
    info = json.loads((folder / SECTION_JSON).read_text())
    sec = read_istar(folder, platform=info.get("platform", "visium"), name=info["name"])
    root = zarr.open_group(str(folder / TRUTH_DIR), mode="r")
    truth = {"cube": np.asarray(root["cube"][:]), "mask": np.asarray(root["mask"][:], bool),
             "genes": list(root.attrs["genes"]), "source": root.attrs.get("source")}
    if "cells" in root:
        truth["cells"] = _read_cells(root["cells"])
    grid = grid_for(sec)
    if truth["cube"].shape[:2] != grid.shape:
        raise SectionError(f"{folder}: truth cube {truth['cube'].shape[:2]} does not match the "
                           f"superpixel grid {grid.shape} of he-raw.jpg")
    arr = info.get("array")
    if arr:
        rc = np.array([arr.get(s, [-1, -1]) for s in sec.counts.obs_names])
        sec.counts.obs["array_row"], sec.counts.obs["array_col"] = rc[:, 0], rc[:, 1]
    meta = {**info.get("meta", {}), **sec.meta}
    return dataclasses.replace(sec, truth=truth, spot_diameter_um=info["spot_diameter_um"],
                               meta=meta)


def simulated_sections(data, names=None) -> list[Section]:
    """Simulated sections under ``data``: the folder itself, or its sub-folders (filtered by
    ``names``: folder or section names)."""
    data = Path(data)
    if is_simulated(data):
        return [read_simulated(data)]
    subs = sorted(p for p in data.iterdir() if p.is_dir() and is_simulated(p)) \
        if data.is_dir() else []
    if names:
        want = {str(n) for n in names}
        subs = [p for p in subs if p.name in want]
    secs = [read_simulated(p) for p in subs]
    if not secs:
        raise SectionError(f"no simulated section in {data}: expected a folder written by "
                           "`histosr simulate` (truth.zarr + section.json) or sub-folders of them")
    return secs


__all__ = ["truth_from_bins", "truth_from_cells", "simulate_from", "write_simulated",
           "read_simulated", "simulated_sections", "is_simulated", "detect_hd_format"]
