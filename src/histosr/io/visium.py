"""10x Visium and Visium HD readers (Space Ranger ``outs`` folders).

Pixel size. Space Ranger's ``spot_diameter_fullres`` is, per 10x, the number of full-resolution
pixels spanned by a *theoretical 65 um* spot (the 55 um capture spot plus margin); on real data
it equals 65-70 um at the pitch-derived pixel size. So the metadata value used for the
cross-check is ``65 / spot_diameter_fullres``; because the 100 um lattice is the precise ruler,
the pixel size then used is the one measured from the spot pitch. A value given by the user
(or ``microns_per_pixel`` in the scalefactors) is used as given, after the same cross-check.
"""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..section import (
    PLATFORM_DIAMETER_UM,
    PLATFORM_PITCH_UM,
    Section,
    SectionError,
    check_pixel_size,
    make_counts,
    validate,
)
from ._common import (
    MissingFileError,
    PathLike,
    check_unique,
    is_gzip,
    make_unique,
    match_spots,
    numeric_columns,
    open_image_checked,
    outs_folder,
    read_table,
    require_columns,
    require_dir,
    require_file,
    upsample_if_coarse,
)

SPOT_DIAMETER_FULLRES_UM = 65.0  # what spot_diameter_fullres spans, per 10x
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                    "pxl_col_in_fullres"]


# --------------------------------------------------------------------------- matrices
def _text(a) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in np.asarray(a).tolist()]


def read_10x_h5(path: PathLike) -> tuple[sp.csr_matrix, list[str], pd.DataFrame]:
    """A 10x feature-barcode HDF5 file: (barcodes x features CSR, barcodes, features).

    Supports the v3+ layout (``matrix/`` with ``features/``) and the older v2 layout
    (``<genome>/`` with ``gene_names``/``genes``). ``features`` has columns ``name``, ``id``,
    ``feature_type``.
    """
    import h5py

    path = require_file(path, "10x count matrix (HDF5)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SectionError(f"could not open {path} as HDF5: {e}") from e
    with f:
        if "matrix" in f:
            g = f["matrix"]
            layout = "v3"
        else:
            groups = [k for k in f.keys() if isinstance(f[k], h5py.Group)]
            if len(groups) != 1:
                raise SectionError(
                    f"{path} is not a 10x feature-barcode matrix: expected a 'matrix' group "
                    f"(or one genome group), found {list(f.keys())}"
                )
            g = f[groups[0]]
            layout = "v2"
        need = ["data", "indices", "indptr", "shape", "barcodes"]
        need += ["features"] if layout == "v3" else ["gene_names", "genes"]
        missing = [k for k in need if k not in g]
        if missing:
            raise SectionError(
                f"{path} ({layout} 10x layout) lacks {missing}: expected datasets {need}"
            )
        shape = tuple(int(v) for v in g["shape"][()])
        barcodes = _text(g["barcodes"][()])
        if layout == "v3":
            ft = g["features"]
            if "name" not in ft:
                raise SectionError(f"{path}: matrix/features lacks 'name'")
            names = _text(ft["name"][()])
            ids = _text(ft["id"][()]) if "id" in ft else names
            types = (_text(ft["feature_type"][()]) if "feature_type" in ft
                     else ["Gene Expression"] * len(names))
        else:
            names = _text(g["gene_names"][()])
            ids = _text(g["genes"][()])
            types = ["Gene Expression"] * len(names)
        data = g["data"][()]
        indices = g["indices"][()].astype(np.int64)
        indptr = g["indptr"][()].astype(np.int64)
    n_feat, n_bc = shape
    if len(barcodes) != n_bc or len(names) != n_feat or len(indptr) != n_bc + 1:
        raise SectionError(
            f"{path}: inconsistent 10x matrix (shape {shape}, {len(barcodes)} barcodes, "
            f"{len(names)} features, indptr of length {len(indptr)})"
        )
    m = sp.csc_matrix((data.astype(np.float32), indices, indptr), shape=(n_feat, n_bc))
    features = pd.DataFrame({"name": names, "id": ids, "feature_type": types})
    return m.T.tocsr(), barcodes, features


def _open_text(path: Path):
    return gzip.open(path, "rt") if is_gzip(path) else open(path)


def read_10x_mtx(folder: PathLike) -> tuple[sp.csr_matrix, list[str], pd.DataFrame]:
    """A 10x matrix folder (``matrix.mtx[.gz]``, ``barcodes.tsv[.gz]``, ``features.tsv[.gz]``
    or the older ``genes.tsv``): (barcodes x features CSR, barcodes, features)."""
    folder = require_dir(folder, "10x matrix folder")

    def pick(*names):
        for n in names:
            for suf in ("", ".gz"):
                if (folder / (n + suf)).is_file():
                    return folder / (n + suf)
        raise MissingFileError(
            f"{names[0]} not found in {folder}: expected {names[0]} or {names[0]}.gz"
        )

    mtx, bc_path = pick("matrix.mtx"), pick("barcodes.tsv")
    ft_path = pick("features.tsv", "genes.tsv")
    bc = read_table(bc_path, "barcode list", sep="\t", header=None, dtype=str)
    ft = read_table(ft_path, "feature list", sep="\t", header=None, dtype=str)
    barcodes = bc.iloc[:, 0].tolist()
    ids = ft.iloc[:, 0].tolist()
    names = ft.iloc[:, 1].tolist() if ft.shape[1] > 1 else ids
    types = ft.iloc[:, 2].tolist() if ft.shape[1] > 2 else ["Gene Expression"] * len(ids)
    features = pd.DataFrame({"name": names, "id": ids, "feature_type": types})
    m = _read_mtx(mtx)
    if m.shape != (len(ids), len(barcodes)):
        raise SectionError(
            f"{mtx} is {m.shape[0]} x {m.shape[1]} but {ft_path.name} lists {len(ids)} "
            f"features and {bc_path.name} {len(barcodes)} barcodes"
        )
    return m.T.tocsr(), barcodes, features


def _read_mtx(path: Path) -> sp.csc_matrix:
    """MatrixMarket coordinate file; pandas' C parser for the common 10x case (fast)."""
    with _open_text(path) as fh:
        header = fh.readline()
        n_skip = 1
        line = fh.readline()
        while line.startswith("%"):
            n_skip += 1
            line = fh.readline()
        n_skip += 1
        try:
            nr, nc, nnz = (int(v) for v in line.split())
        except ValueError as e:
            raise SectionError(f"{path}: not a MatrixMarket coordinate file") from e
    h = header.lower().split()
    if len(h) < 5 or h[0] != "%%matrixmarket" or h[2] != "coordinate" or h[4] != "general":
        import scipy.io

        try:
            with _open_text(path) as fh:
                return sp.csc_matrix(scipy.io.mmread(fh))
        except Exception as e:  # noqa: BLE001
            raise SectionError(f"could not read {path} as MatrixMarket: {e}") from e
    if nnz == 0:
        return sp.csc_matrix((nr, nc), dtype=np.float32)
    t = read_table(path, "MatrixMarket matrix", sep=" ", header=None, skiprows=n_skip,
                   usecols=[0, 1, 2], dtype={0: np.int64, 1: np.int64, 2: np.float32})
    if len(t) != nnz:
        raise SectionError(f"{path}: header promises {nnz} entries, found {len(t)}")
    return sp.csc_matrix(
        (t[2].to_numpy(), (t[0].to_numpy() - 1, t[1].to_numpy() - 1)), shape=(nr, nc)
    )


def _read_matrix(folder: Path, counts_file: str | None):
    if counts_file is not None:
        p = Path(counts_file)
        p = p if p.is_absolute() else folder / p
        if p.is_dir():
            return read_10x_mtx(p), p
        return read_10x_h5(p), p
    h5 = folder / "filtered_feature_bc_matrix.h5"
    mtx = folder / "filtered_feature_bc_matrix"
    if h5.is_file():
        return read_10x_h5(h5), h5
    if mtx.is_dir():
        return read_10x_mtx(mtx), mtx
    raise MissingFileError(
        f"count matrix not found in {folder}: expected filtered_feature_bc_matrix.h5 or a "
        "filtered_feature_bc_matrix/ folder (Space Ranger 'outs'), or pass counts_file="
    )


def _gene_expression(m, features: pd.DataFrame, meta: dict):
    keep = (features["feature_type"] == "Gene Expression").to_numpy()
    if not keep.any():
        raise SectionError(
            "the count matrix has no 'Gene Expression' features (found types "
            f"{sorted(features['feature_type'].unique())[:5]})"
        )
    if not keep.all():
        meta["dropped_feature_types"] = sorted(features.loc[~keep, "feature_type"].unique())
    m = m[:, np.flatnonzero(keep)]
    features = features[keep].reset_index(drop=True)
    names, n_renamed = make_unique(features["name"])
    if n_renamed:
        meta["var_names_made_unique"] = n_renamed
        meta["note_var_names"] = (
            f"{n_renamed} repeated gene name(s) were made unique by appending -1, -2, ... "
            "(as anndata's var_names_make_unique); var['gene_ids'] holds the feature ids"
        )
    return m, names, features


# --------------------------------------------------------------------------- positions
def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    p_csv = spatial / "tissue_positions.csv"
    p_list = spatial / "tissue_positions_list.csv"
    p_parq = spatial / "tissue_positions.parquet"
    if p_csv.is_file() or p_list.is_file():
        path = p_csv if p_csv.is_file() else p_list
        raw = read_table(path, "spot positions", header=None, dtype=str)
        if raw.shape[1] != 6:
            raise SectionError(
                f"spot positions {path} have {raw.shape[1]} columns: expected 6 "
                f"({', '.join(POSITION_COLUMNS)})"
            )
        if str(raw.iloc[0, 0]).strip() == "barcode":
            hdr = [str(v).strip() for v in raw.iloc[0]]
            raw = raw.iloc[1:]
            raw.columns = hdr
            require_columns(raw, POSITION_COLUMNS, "spot positions", path)
            raw = raw[POSITION_COLUMNS]
        else:
            raw.columns = POSITION_COLUMNS
        df = raw.reset_index(drop=True)
    elif p_parq.is_file():
        path = p_parq
        try:
            df = pd.read_parquet(path)
        except ImportError as e:
            raise SectionError(
                f"reading {path} needs pyarrow (pip install pyarrow): {e}"
            ) from e
        except Exception as e:  # noqa: BLE001
            raise SectionError(f"could not read {path} as parquet: {e}") from e
        require_columns(df, POSITION_COLUMNS, "spot positions", path)
        df = df[POSITION_COLUMNS].copy()
    else:
        raise MissingFileError(
            f"spot positions not found in {spatial}: expected tissue_positions.csv (Space "
            "Ranger 2+), tissue_positions_list.csv (v1) or tissue_positions.parquet (HD)"
        )
    df["barcode"] = df["barcode"].astype(str)
    numeric_columns(df, POSITION_COLUMNS[1:], "spot positions", path)
    check_unique(df["barcode"], f"spot positions {path}")
    return df, path


def _read_scalefactors(spatial: Path) -> dict:
    p = require_file(spatial / "scalefactors_json.json", "Space Ranger scale factors",
                     "It is written by Space Ranger next to the tissue images.")
    try:
        sf = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SectionError(f"could not parse {p} as JSON: {e}") from e
    if not isinstance(sf, dict):
        raise SectionError(f"{p}: expected a JSON object of scale factors")
    return sf


def _scalefactor(sf: dict, key: str, path: Path) -> float:
    v = sf.get(key)
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise SectionError(f"{path}/scalefactors_json.json lacks a numeric {key!r}") from None
    if not (v > 0 and np.isfinite(v)):
        raise SectionError(f"{path}/scalefactors_json.json: {key} must be > 0, got {v}")
    return v


def _is_constant_image(path: Path) -> bool:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            ext = im.convert("RGB").getextrema()
    except Exception:  # noqa: BLE001 - unreadable: treat as unusable
        return True
    return all(lo == hi for lo, hi in ext)


def _choose_image(spatial: Path, image, sf: dict, meta: dict):
    """(ImageSource, scale from full-res px to image px)."""
    if image is not None:
        meta["image_source"] = "user"
        meta["image_path"] = None if hasattr(image, "shape") else str(image)
        return open_image_checked(image, "full-resolution H&E image"), 1.0
    hires, lowres = spatial / "tissue_hires_image.png", spatial / "tissue_lowres_image.png"
    if hires.is_file():
        if _is_constant_image(hires):
            warnings.warn(
                f"{hires} is a constant (e.g. all-black placeholder) image; using "
                "tissue_lowres_image.png instead",
                stacklevel=3,
            )
            meta["hires_placeholder"] = True
        else:
            s = _scalefactor(sf, "tissue_hires_scalef", spatial)
            meta.update(image_source="hires", image_path=str(hires))
            return open_image_checked(hires), s
    if lowres.is_file():
        s = _scalefactor(sf, "tissue_lowres_scalef", spatial)
        meta.update(image_source="lowres", image_path=str(lowres))
        return open_image_checked(lowres), s
    raise MissingFileError(
        f"no usable image in {spatial}: expected tissue_hires_image.png or "
        "tissue_lowres_image.png, or pass image= with the full-resolution H&E (the "
        "CytAssist detected_tissue_image.jpg is not used by default)"
    )


def _outs_folder(path: PathLike) -> Path:
    return outs_folder(path, "spatial", "Space Ranger output folder",
                       "a Space Ranger 'outs' folder holding spatial/ and "
                       "filtered_feature_bc_matrix(.h5)")


def _counts(m, bc, genes, features, rows: pd.DataFrame, xy: np.ndarray):
    """Counts AnnData of a Space Ranger reader: lattice indices in obs, feature ids/types in
    var."""
    obs = pd.DataFrame({"array_row": rows["array_row"].astype(int).to_numpy(),
                        "array_col": rows["array_col"].astype(int).to_numpy()})
    counts = make_counts(m, bc, genes, xy, obs=obs)
    counts.var["gene_ids"] = features["id"].to_numpy()
    counts.var["feature_types"] = features["feature_type"].to_numpy()
    return counts


def _in_tissue_spots(folder, spatial, counts_file, meta: dict, unit: str):
    """Matrix (gene-expression features only) joined to the positions file, restricted to
    in-tissue spots (or bins): shared by the Visium and Visium HD readers."""
    (m, barcodes, features), mpath = _read_matrix(folder, counts_file)
    meta["counts_path"] = str(mpath)
    m, genes, features = _gene_expression(m, features, meta)
    pos, pos_path = _read_positions(spatial)
    sf = _read_scalefactors(spatial)
    meta["scalefactors"] = sf
    where = match_spots(pd.Index(barcodes), pd.Index(pos["barcode"]),
                        f"count matrix {mpath}", f"spot positions {pos_path}")
    in_tissue = pos["in_tissue"].to_numpy()[where] == 1
    if not in_tissue.any():
        raise SectionError(
            f"empty tissue: none of the {len(barcodes)} {unit} of {mpath} is marked "
            f"in_tissue=1 in {pos_path}; expected at least one in-tissue {unit[:-1]}"
        )
    if not in_tissue.all():
        meta["dropped_out_of_tissue"] = int((~in_tissue).sum())
    rows = pos.iloc[where[in_tissue]]
    return (m[np.flatnonzero(in_tissue)], np.asarray(barcodes)[in_tissue], genes, features,
            pos, rows, sf, spatial)

def read_visium(
    path: PathLike,
    image: PathLike | None = None,
    um_per_px: float | None = None,
    *,
    counts_file: str | None = None,
    name: str | None = None,
) -> Section:
    """Read a Space Ranger (Visium v1/v2/v3, CytAssist) ``outs`` folder.

    Parameters
    ----------
    path: the ``outs`` folder (or its parent, or a file inside it).
    image: full-resolution H&E used for the run. Its pixels are the ``pxl_*_in_fullres``
        coordinates, which are then used as they are. Without it, ``tissue_hires_image.png``
        (coordinates x ``tissue_hires_scalef``) is used, else ``tissue_lowres_image.png``. A
        constant (placeholder) hires image is skipped with a warning. Previews coarser than
        10 um/px are upsampled by an integer factor (with a warning); see
        ``section.meta["image_upsample_factor"]``.
    um_per_px: microns per FULL-RESOLUTION pixel; default ``microns_per_pixel`` from the
        scalefactors, else the 100 um spot pitch (cross-checked against
        ``spot_diameter_fullres``, which spans 65 um). Always cross-checked against the pitch.
    counts_file: matrix to read instead of ``filtered_feature_bc_matrix.h5`` / ``filtered_
        feature_bc_matrix/`` (an .h5 file or an mtx folder, relative to ``path``).

    Keeps in-tissue spots that are in the matrix and "Gene Expression" features; repeated
    gene names are made unique (``section.meta["var_names_made_unique"]``).
    """
    outs = _outs_folder(path)
    spatial = outs / "spatial"
    meta: dict = {"reader": "visium", "path": str(outs)}
    m, bc, genes, features, pos, rows, sf, spatial = _in_tissue_spots(
        outs, spatial, counts_file, meta, "spots")
    xy_full = rows[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    lattice_full = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    um_full = _fullres_pixel_size(um_per_px, sf, lattice_full, spatial, meta)
    img, s = _choose_image(spatial, image, sf, meta)
    meta["coord_scale"] = s
    xy, um = xy_full * s, um_full / s
    img, xy, um = upsample_if_coarse(img, xy, um, meta.get("image_source", "image"), meta)
    meta["um_per_px_fullres"] = um_full

    counts = _counts(m, bc, genes, features, rows, xy)
    section = Section(
        name=name or (outs.parent.name if outs.name == "outs" else outs.name),
        image=img,
        um_per_px=um,
        counts=counts,
        spot_diameter_um=PLATFORM_DIAMETER_UM["visium"],
        platform="visium",
        meta=meta,
    )
    return validate(section)


def _fullres_pixel_size(um_per_px, sf, lattice_xy, spatial: Path, meta: dict) -> float:
    if um_per_px is not None:
        src, val = "the um_per_px argument", float(um_per_px)
    elif sf.get("microns_per_pixel") is not None:
        src = "scalefactors_json.json microns_per_pixel"
        val = _scalefactor(sf, "microns_per_pixel", spatial)
    elif sf.get("spot_diameter_fullres") is not None:
        sdf = _scalefactor(sf, "spot_diameter_fullres", spatial)
        src = (f"scalefactors_json.json spot_diameter_fullres ({sdf:g} px, taken to span "
               f"{SPOT_DIAMETER_FULLRES_UM:g} um)")
        val = SPOT_DIAMETER_FULLRES_UM / sdf
    else:
        src, val = "spot pitch", None
    um = check_pixel_size(val, lattice_xy, "visium", source=src)
    if val is not None and "spot_diameter_fullres" in src and len(lattice_xy) >= 2:
        um = check_pixel_size(None, lattice_xy, "visium")
        src = f"spot pitch ({PLATFORM_PITCH_UM['visium']:g} um), cross-checked with " + src
    meta["um_per_px_source"] = src
    return um


# --------------------------------------------------------------------------- Visium HD
def _bin_folder(path: Path, bin_size) -> Path:
    if (path / "spatial").is_dir() and (
        (path / "filtered_feature_bc_matrix.h5").is_file()
        or (path / "filtered_feature_bc_matrix").is_dir()
    ):
        return path
    for sub in ("binned_outputs", "outs/binned_outputs"):
        if (path / sub).is_dir():
            path = path / sub
            break
    bins = sorted(p.name for p in path.glob("square_*um") if p.is_dir())
    if bin_size is None:
        want = "square_008um" if "square_008um" in bins else (bins[0] if len(bins) == 1 else None)
    elif isinstance(bin_size, (int, float)):
        want = f"square_{int(bin_size):03d}um"
    else:
        want = str(bin_size)
    if want is None or not (path / want).is_dir():
        raise MissingFileError(
            f"Visium HD bin folder {want or 'square_008um'} not found in {path}: available "
            f"{bins or 'none'}. Pass bin_size= (e.g. 'square_008um' or 8) or the bin folder."
        )
    return path / want


MICROSCOPE_PATTERNS = ("*tissue_image.btf", "*tissue_image.tif", "*tissue_image.tiff",
                       "*tissue_image.ome.tif", "*_image.btf")


def _microscope_image(folder: Path) -> Path | None:
    """The full-resolution microscope image of a Visium HD run, when it sits in the bin
    folder or up to three levels above it (10x public datasets ship
    ``<sample>_tissue_image.btf``/``.tif`` next to ``outs``); CytAssist captures are skipped."""
    for base in [folder, *list(folder.parents)[:3]]:
        for pat in MICROSCOPE_PATTERNS:
            hits = sorted(p for p in base.glob(pat)
                          if p.is_file() and "cytassist" not in p.name.lower())
            if hits:
                return hits[0]
    return None


def _check_bin_pitch(xy_full: np.ndarray, um_full: float, bin_um: float, src: str) -> None:
    """Cross-check the pixel size against the bin lattice (bins are ``bin_um`` apart) when
    enough neighbouring bins are present to measure their pitch."""
    from scipy.spatial import cKDTree

    if len(xy_full) < 50:
        return
    d = cKDTree(xy_full).query(xy_full, k=2)[0][:, 1]
    med = float(np.median(d))
    if np.mean(np.abs(d - med) <= 0.05 * med) < 0.8:  # not a dense lattice: cannot measure
        return
    pitch_um = med * um_full
    if abs(pitch_um - bin_um) / bin_um > 0.15:
        raise SectionError(
            f"pixel size {um_full:.4f} um/px from {src} disagrees with the bin lattice: "
            f"neighbouring {bin_um:g} um bins are {pitch_um / um_full:.2f} px apart, i.e. "
            f"{pitch_um:.2f} um at that pixel size (expected {bin_um:g} um). Check "
            "microns_per_pixel (or pass um_per_px=) and that tissue_positions.parquet belongs "
            "to this bin level."
        )


def read_visium_hd(
    path: PathLike,
    bin_size: str | int | None = None,
    image: PathLike | None = None,
    um_per_px: float | None = None,
    *,
    name: str | None = None,
) -> Section:
    """Read one Visium HD bin level (``binned_outputs/square_XXXum``).

    ``path`` is the bin folder itself, or a folder holding ``square_*um`` folders (or
    ``binned_outputs/``). ``bin_size`` (``"square_008um"`` or 8) picks the level; default
    ``square_008um`` when present, else the only one present. Each bin is one "spot" of
    diameter ``bin_size_um`` (square bins treated as disks of that width: an approximation).
    Pixel size: ``um_per_px`` or ``microns_per_pixel`` from the scalefactors (full resolution);
    only its plausibility is checked. Images are chosen as in :func:`read_visium`.
    """
    folder = _bin_folder(require_dir(path, "Visium HD folder"), bin_size)
    spatial = require_dir(folder / "spatial", "Visium HD spatial folder")
    meta: dict = {"reader": "visium_hd", "path": str(folder)}
    m, bc, genes, features, pos, rows, sf, spatial = _in_tissue_spots(
        folder, spatial, None, meta, "bins")
    xy_full = rows[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    if um_per_px is not None:
        src, val = "the um_per_px argument", float(um_per_px)
    elif sf.get("microns_per_pixel") is not None:
        src, val = "scalefactors_json.json microns_per_pixel", _scalefactor(
            sf, "microns_per_pixel", spatial)
    else:
        raise SectionError(
            f"pixel size unknown: {spatial}/scalefactors_json.json has no microns_per_pixel; "
            "pass um_per_px (microns per full-resolution pixel)"
        )
    um_full = check_pixel_size(val, xy_full, "visium_hd", source=src)
    meta["um_per_px_source"] = src
    if sf.get("bin_size_um") is not None:
        bin_um = _scalefactor(sf, "bin_size_um", spatial)
    else:
        try:
            bin_um = float(folder.name.split("_")[1].rstrip("um"))
        except (IndexError, ValueError):
            raise SectionError(
                f"bin size unknown: no bin_size_um in {spatial}/scalefactors_json.json and "
                f"the folder name {folder.name!r} is not square_XXXum"
            ) from None
    sdf = sf.get("spot_diameter_fullres")
    if sdf is not None and abs(float(sdf) * um_full - bin_um) / bin_um > 0.15:
        warnings.warn(
            f"spot_diameter_fullres ({float(sdf):g} px = {float(sdf) * um_full:.2f} um) "
            f"disagrees with bin_size_um ({bin_um:g})",
            stacklevel=2,
        )
    _check_bin_pitch(xy_full, um_full, bin_um, src)
    if image is None:
        image = _microscope_image(folder)
        if image is not None:
            meta["microscope_image_found"] = str(image)
    img, s = _choose_image(spatial, image, sf, meta)
    meta["coord_scale"] = s
    xy, um = xy_full * s, um_full / s
    img, xy, um = upsample_if_coarse(img, xy, um, meta.get("image_source", "image"), meta)
    meta["um_per_px_fullres"] = um_full
    meta["bin_size_um"] = bin_um
    counts = _counts(m, bc, genes, features, rows, xy)
    section = Section(
        name=name or f"{folder.parent.name}/{folder.name}",
        image=img,
        um_per_px=um,
        counts=counts,
        spot_diameter_um=bin_um,
        platform="visium_hd",
        meta=meta,
    )
    return validate(section)
