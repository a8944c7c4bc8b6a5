"""Readers: one module per platform, each returning a validated :class:`~histosr.Section`.

Coordinates are full-resolution image pixels of the image the Section carries, x = column,
y = row (``counts.obsm["spatial"]``); counts are raw. Bad inputs raise
:class:`~histosr.section.SectionError` with a message that says what was expected.

Heavy optional dependencies (h5py, pyarrow, anndata I/O) are imported only when a reader
needs them, so ``import histosr.io`` is cheap.
"""

from __future__ import annotations

from pathlib import Path

from ..section import Section, SectionError
from ._common import MissingFileError
from .h5ad import read_h5ad
from .hest import read_hest
from .istar import read_istar, write_istar
from .st import read_her2st, read_st
from .visium import read_visium, read_visium_hd
from .xenium import read_xenium

__all__ = [
    "MissingFileError",
    "detect_platform",
    "read",
    "read_h5ad",
    "read_hest",
    "read_her2st",
    "read_istar",
    "read_st",
    "read_visium",
    "read_visium_hd",
    "read_xenium",
    "read_spatialdata",
    "read_simulated",
    "write_istar",
    "write_spatialdata",
]


def read_spatialdata(path, *args, **kw) -> Section:
    """A SpatialData zarr store as a Section (see :mod:`histosr.io.spatialdata`; needs the
    optional ``spatialdata`` package, imported only here because it is slow to import)."""
    from .spatialdata import read_spatialdata as _read

    return _read(path, *args, **kw)


def write_spatialdata(path, section, prediction=None, **kw):
    """Write a SpatialData zarr store (see :func:`histosr.io.spatialdata.write_spatialdata`)."""
    from .spatialdata import write_spatialdata as _write

    return _write(path, section, prediction, **kw)


def read_simulated(path, **kw) -> Section:
    """A simulated section with its 8 um truth (see :func:`histosr.truth.read_simulated`)."""
    from ..simulate import read_simulated as _read

    return _read(path, **kw)

READERS = {
    "her2st": read_her2st,
    "st": read_st,
    "visium": read_visium,
    "visium_hd": read_visium_hd,
    "istar": read_istar,
    "h5ad": read_h5ad,
    "xenium": read_xenium,
    "hest": read_hest,
    "spatialdata": read_spatialdata,
    "simulated": read_simulated,
}


def _has_hd_bins(p: Path) -> bool:
    for base in (p, p / "binned_outputs", p / "outs" / "binned_outputs"):
        if any((b / "spatial").is_dir() for b in base.glob("square_*um")):
            return True
    return False


def _is_spatialdata(p: Path) -> bool:
    has_meta = (p / "zarr.json").is_file() or (p / ".zgroup").is_file()
    return has_meta and any((p / d).is_dir() for d in ("images", "tables", "shapes"))


def _is_flat_hest(p: Path) -> bool:
    """One ``<id>.h5ad`` with ``<id>.json`` and an ``<id>`` image beside it."""
    h5 = list(p.glob("*.h5ad"))
    if len(h5) != 1 or not (p / f"{h5[0].stem}.json").is_file():
        return False
    return any((p / f"{h5[0].stem}{s}").is_file() for s in (".tif", ".tiff", ".jpg", ".png"))


def detect_platform(path) -> str:
    """The reader name (a key of :data:`READERS`) for a folder or file layout."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".h5ad":
            return "h5ad"
        if p.suffix == ".h5":
            p = p.parent
        else:
            raise SectionError(
                f"cannot tell the layout of {p}: expected a folder (Space Ranger outs, ST, "
                "her2st, iStar) or an .h5ad file"
            )
    if not p.is_dir():
        raise MissingFileError(f"input not found: {p}")
    if all((p / d).is_dir() for d in ("counts", "spots", "images")):
        return "her2st"
    if _is_spatialdata(p):
        return "spatialdata"
    if (p / "experiment.xenium").is_file() or (p / "outs" / "experiment.xenium").is_file():
        return "xenium"
    if ((p / "st").is_dir() and (p / "wsis").is_dir()) or _is_flat_hest(p):
        return "hest"
    if (p / "truth.zarr").is_dir() and (p / "section.json").is_file():
        return "simulated"
    if (p / "cnts.tsv").is_file() and (p / "locs-raw.tsv").is_file():
        return "istar"
    if (p / "counts.tsv").is_file() and (p / "spots.tsv").is_file():
        return "st"
    if (p / "spatial" / "tissue_positions.parquet").is_file() or _has_hd_bins(p):
        return "visium_hd"
    for base in (p, p / "outs"):
        sp_dir = base / "spatial"
        if (sp_dir / "tissue_positions.csv").is_file() or (
            sp_dir / "tissue_positions_list.csv"
        ).is_file():
            return "visium"
    raise SectionError(
        f"cannot tell the layout of {p}: expected one of a Space Ranger outs folder "
        "(spatial/tissue_positions*.csv), a Xenium output folder (experiment.xenium), a HEST "
        "sample (st/ wsis/ metadata/), a SpatialData zarr store, a Visium HD bin folder (spatial/"
        "tissue_positions.parquet), an ST folder (counts.tsv + spots.tsv), a her2st root "
        "(counts/ spots/ images/), an iStar folder (cnts.tsv + locs-raw.tsv) or an .h5ad "
        f"file. Pass reader= one of {sorted(READERS)} to choose the reader."
    )


def read(path, reader: str | None = None, **kw) -> Section:
    """Read any supported layout; ``reader`` (a key of :data:`READERS`) skips detection.

    her2st needs the section: ``read(root, section="C2")``. Other keywords go to the reader
    (``platform=`` is the HEST / h5ad / iStar readers' label of the assay, not the reader).
    """
    platform = reader or detect_platform(path)
    if platform not in READERS:
        raise SectionError(f"unknown reader {platform!r}: expected one of {sorted(READERS)}")
    if platform == "her2st":
        section, alt = kw.pop("section", None), kw.pop("name", None)
        section = section if section is not None else alt
        if section is None:
            counts = Path(path) / "counts"
            names = sorted(q.name.split(".")[0] for q in counts.glob("*.tsv.gz"))
            raise SectionError(
                f"{path} is a her2st root holding several sections: pass section= one of "
                f"{names}, e.g. read(root, section={names[0] if names else 'C2'!r})"
            )
        return read_her2st(path, section, **kw)
    return READERS[platform](path, **kw)
