"""Helpers shared by the readers: file checks, table reading, spot joins, scaled images.

Every problem with the input surfaces as a :class:`~histosr.section.SectionError` whose
message names the file, what was expected and how to fix it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ..image import ImageSource, open_image
from ..section import SectionError


class MissingFileError(SectionError, FileNotFoundError):
    """A required input file is absent (both a SectionError and a FileNotFoundError)."""


PathLike = str | os.PathLike


def require_file(path: PathLike, what: str, hint: str = "") -> Path:
    """``path`` as a Path; a :class:`MissingFileError` naming ``what`` when it is absent."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(
            f"{what} not found: expected the file {p}." + (f" {hint}" if hint else "")
        )
    return p


def require_dir(path: PathLike, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise MissingFileError(f"{what} not found: expected a folder at {p}")
    return p


def outs_folder(path: PathLike, marker: str, what: str, expected: str) -> Path:
    """The instrument's output folder holding ``marker`` (a file or folder name): ``path``
    itself, the folder of a file inside it, or its ``outs/`` subfolder."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    p = require_dir(p, what)
    if not (p / marker).exists() and (p / "outs" / marker).exists():
        p = p / "outs"
    if not (p / marker).exists():
        raise MissingFileError(f"{p} is not a {what}: expected {expected}")
    return p


def first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    for n in names:
        if (folder / n).exists():
            return folder / n
    return None


def is_gzip(path: Path) -> bool:
    """True when the file starts with the gzip magic bytes (some ``.gz`` files are plain)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def read_table(path: Path, what: str, **kw) -> pd.DataFrame:
    """``pd.read_csv`` with errors turned into SectionErrors that name the file."""
    kw.setdefault("compression", "gzip" if is_gzip(path) else None)
    try:
        return pd.read_csv(path, **kw)
    except FileNotFoundError as e:
        raise MissingFileError(f"{what} not found: expected the file {path}") from e
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError,
            OSError) as e:
        raise SectionError(f"could not parse {what} {path}: {e}") from e


def require_columns(df: pd.DataFrame, cols: Iterable[str], what: str, path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SectionError(
            f"{what} {path} lacks the column(s) {missing}: expected columns {list(cols)}, "
            f"found {list(df.columns)[:12]}"
        )


def numeric_columns(df: pd.DataFrame, cols: Iterable[str], what: str, path: Path) -> None:
    """Raise when a column that must hold numbers does not."""
    for c in cols:
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any():
            i = int(np.flatnonzero(v.isna().to_numpy())[0])
            raise SectionError(
                f"{what} {path}: column {c!r} must be numeric, but row {i + 1} holds "
                f"{df[c].iloc[i]!r}"
            )
        df[c] = v


def check_unique(ids: pd.Index | Iterable[str], what: str) -> None:
    idx = pd.Index(ids)
    if not idx.is_unique:
        dup = idx[idx.duplicated()].unique()[:5].tolist()
        raise SectionError(
            f"duplicated spot ids in {what}: {dup}. Each spot id must appear once; remove "
            "or merge the repeated rows."
        )


def match_spots(count_ids: pd.Index, pos_ids: pd.Index, counts_what: str,
                pos_what: str) -> np.ndarray:
    """Positions (row numbers in ``pos_ids``) of every spot of the counts table.

    Spots with counts but no position are an error ("unmatched spot ids"); positions
    without counts are simply not used (background spots).
    """
    check_unique(count_ids, counts_what)
    check_unique(pos_ids, pos_what)
    where = pd.Index(pos_ids).get_indexer(pd.Index(count_ids))
    if (where < 0).any():
        miss = pd.Index(count_ids)[where < 0]
        raise SectionError(
            f"unmatched spot ids: {len(miss)} spot(s) of {counts_what} have no position in "
            f"{pos_what} (e.g. {miss[:5].tolist()}). Both files must come from the same "
            "section; spot ids must match exactly."
        )
    return where


def counts_frame_to_matrix(df: pd.DataFrame, path: Path) -> np.ndarray:
    """A spots x genes count table as float32; non-numeric or empty cells are an error."""
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    x = None if bad else df.to_numpy(dtype=np.float32)
    if x is not None and np.isnan(x).any():
        bad = [c for c, n in zip(df.columns, np.isnan(x).any(axis=0)) if n]
    if bad:
        raise SectionError(
            f"count table {path} must hold numbers only (spots x genes, first column the "
            f"spot id); gene column(s) with empty or non-numeric cells: {bad[:5]}"
        )
    return x


def make_unique(names: Iterable[str]) -> tuple[list[str], int]:
    """anndata-style ``var_names_make_unique``: repeats get ``-1``, ``-2``, ...

    Returns the new names and how many were renamed.
    """
    names = [str(n) for n in names]
    taken = set(names)
    seen: dict[str, int] = {}
    out, n_renamed = [], 0
    for n in names:
        k = seen.get(n)
        if k is None:
            seen[n] = 0
            out.append(n)
            continue
        while True:
            k += 1
            cand = f"{n}-{k}"
            if cand not in taken:
                break
        seen[n] = k
        taken.add(cand)
        out.append(cand)
        n_renamed += 1
    return out, n_renamed


def open_image_checked(path: PathLike, what: str = "H&E image") -> ImageSource:
    """Open an image lazily (header only); absent or unreadable files give SectionErrors."""
    if isinstance(path, (ImageSource, np.ndarray)):
        return open_image(path)
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{what} not found: expected the file {p}")
    try:
        return open_image(p)
    except FileNotFoundError as e:
        raise MissingFileError(f"{what} not found: {e}") from e
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise SectionError(f"could not open {what} {p}: {e}. Expected a JPEG, PNG, TIFF or "
                           "whole-slide file (.svs, .ndpi, .mrxs, OME-TIFF).") from e


class UpsampledImage(ImageSource):
    """A lazy integer nearest-neighbour upsampling of another image.

    Used when the only image available is a low-resolution preview whose pixel size
    exceeds the plausible range of :func:`~histosr.section.validate` (10 um/px):
    coordinates are multiplied by the same ``factor`` so spots stay put.
    """

    def __init__(self, base: ImageSource, factor: int):
        self.base = base
        self.factor = int(factor)
        self.path = base.path

    @property
    def shape(self):
        h, w = self.base.shape[:2]
        return (h * self.factor, w * self.factor, 3)

    def _read(self, y0, x0, y1, x1):
        f = self.factor
        sy0, sx0 = y0 // f, x0 // f
        sy1, sx1 = -(-y1 // f), -(-x1 // f)
        a = self.base._read(sy0, sx0, sy1, sx1)
        a = np.repeat(np.repeat(a, f, axis=0), f, axis=1)
        return a[y0 - sy0 * f : y1 - sy0 * f, x0 - sx0 * f : x1 - sx0 * f]


MAX_UM_PER_PX = 10.0


def upsample_if_coarse(image: ImageSource, xy: np.ndarray, um_per_px: float, what: str,
                       meta: dict) -> tuple[ImageSource, np.ndarray, float]:
    """Upsample a preview coarser than 10 um/px by the smallest integer that fixes it."""
    if um_per_px <= MAX_UM_PER_PX:
        return image, xy, um_per_px
    k = int(math.ceil(um_per_px / MAX_UM_PER_PX))
    warnings.warn(
        f"only a low-resolution image is available ({what}, {um_per_px:.1f} um/px); it is "
        f"upsampled x{k} (nearest neighbour) to {um_per_px / k:.2f} um/px. For histology "
        "features pass image= with the full-resolution H&E.",
        stacklevel=3,
    )
    meta["image_upsample_factor"] = k
    return UpsampledImage(image, k), xy * k, um_per_px / k
