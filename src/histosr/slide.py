"""Whole-slide images (.svs, .ndpi, .mrxs, .scn, .bif, OME-TIFF, pyramidal TIFF).

:class:`SlideImage` is an :class:`~histosr.image.ImageSource` over a slide file: ``shape`` and
``read`` are in full-resolution (level 0) px, like every other source, so spot coordinates
and ``obsm["spatial"]`` keep their meaning; ``read_level`` reads a pyramid level, and the
shared readers pick the level nearest their working resolution
(:meth:`~histosr.image.ImageSource.best_level`: features and crops at 0.5 um/px, tissue
detection on the 8 um grid, thumbnails). ``um_per_px`` comes from the slide's metadata.

Backends (both maintained, neither downloads anything at run time):

* `tiffslide <https://github.com/Bayer-Group/tiffslide>`_ (pure Python over tifffile; JPEG /
  JPEG 2000 tiles through imagecodecs) for TIFF-based slides: Aperio .svs, Hamamatsu .ndpi,
  Leica .scn, Ventana .bif, OME-TIFF and generic pyramidal TIFF;
* `openslide-python <https://openslide.org/api/python/>`_ with the ``openslide-bin`` wheel for
  MIRAX .mrxs (not TIFF) and any file tiffslide cannot open.

Install both with ``pip install 'histosr[slides]'``.

Microns per pixel, first found wins: ``tiffslide.mpp-x`` / ``openslide.mpp-x`` (Aperio
``MPP =`` in the description, NDPI / TIFF resolution tags), then the OME-XML
``PhysicalSizeX`` (with its unit). :func:`slide_um_per_px` turns a missing value into an
error that names both the metadata and ``--um-per-px``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from .errors import InputError
from .image import ImageSource

#: file suffixes that are always whole-slide images
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
#: suffixes only openslide reads
OPENSLIDE_ONLY = (".mrxs", ".vms", ".vmu", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")

MPP_SOURCES = ("the slide's MPP metadata (Aperio 'MPP =', openslide.mpp-x / tiffslide.mpp-x, "
               "TIFF resolution tags, OME PhysicalSizeX)")

_UNIT_UM = {"µm": 1.0, "um": 1.0, "micron": 1.0, "micrometer": 1.0, "nm": 1e-3,
            "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}


def is_slide(path: str | os.PathLike) -> bool:
    """True for whole-slide files: known slide suffixes, OME-TIFF, and TIFFs with more than
    one pyramid level (a flat TIFF stays a plain :class:`~histosr.image.FileImage`)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(SLIDE_SUFFIXES):
        return True
    if not name.endswith(TIFF_SUFFIXES) or not p.is_file():
        return False
    if name.endswith((".ome.tif", ".ome.tiff", ".ome.btf")):
        return True
    try:
        import tifffile

        with tifffile.TiffFile(p) as tf:
            return bool(tf.series) and len(tf.series[0].levels) > 1
    except Exception:  # noqa: BLE001 - not readable as TIFF: let FileImage report it
        return False


def _ome_um_per_px(path: Path) -> float | None:
    """PhysicalSizeX of the first OME Pixels element, in um (None if absent)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            xml = tf.ome_metadata if tf.is_ome else None
    except Exception:  # noqa: BLE001
        return None
    if not xml:
        return None
    m = re.search(r"<Pixels\b[^>]*>", xml)
    if not m:
        return None
    tag = m.group(0)
    size = re.search(r'PhysicalSizeX="([^"]+)"', tag)
    if not size:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tag)
    factor = _UNIT_UM.get(unit.group(1) if unit else "µm")
    try:
        value = float(size.group(1)) * (factor if factor is not None else float("nan"))
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _level0_coord(v: int, ds: float) -> int:
    """Level-0 coordinate ``b`` that the readers map back to level coordinate ``v``
    (``int(b / ds) == v``): exact for any downsample, integer or not."""
    b = max(0, int(math.floor(v * ds)))
    while int(b / ds) < v:
        b += 1
    while b > 0 and int(b / ds) > v:
        b -= 1
    return b


class SlideImage(ImageSource):
    """A whole-slide file read lazily, tile by tile, through tiffslide or openslide (see
    the module docstring). ``backend``: ``"tiffslide"``, ``"openslide"`` or ``None`` (auto)."""

    def __init__(self, path: str | os.PathLike, backend: str | None = None):
        self.path = str(path)
        p = Path(self.path)
        if not p.exists():
            raise FileNotFoundError(f"slide file not found: {self.path}")
        self.backend = backend
        self._open()

    # -- opening -------------------------------------------------------------------------
    def _open(self) -> None:
        p = Path(self.path)
        errors = []
        order = [self.backend] if self.backend else (
            ["openslide"] if p.name.lower().endswith(OPENSLIDE_ONLY) else
            ["tiffslide", "openslide"])
        for name in order:
            try:
                self._slide = self._open_with(name)
                self.backend = name
                break
            except ImportError as e:
                errors.append(f"{name} is not installed ({e})")
            except Exception as e:  # noqa: BLE001 - each library raises its own types
                errors.append(f"{name}: {type(e).__name__}: {e}")
        else:
            raise InputError(f"could not open the slide {self.path}: " + "; ".join(errors)
                             + ". Whole-slide images need pip install 'histosr[slides]' "
                             "(tiffslide for .svs/.ndpi/.scn/.bif/OME-TIFF, openslide-python "
                             "+ openslide-bin for .mrxs)")
        props = self._slide.properties
        key = "tiffslide.mpp-x" if self.backend == "tiffslide" else "openslide.mpp-x"
        mpp = props.get(key)
        try:
            mpp = float(mpp) if mpp not in (None, "") else None
        except (TypeError, ValueError):
            mpp = None
        if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
            mpp = None
        self.mpp_source = key if mpp is not None else None
        if mpp is None:
            mpp = _ome_um_per_px(p)
            self.mpp_source = "OME PhysicalSizeX" if mpp is not None else None
        self.um_per_px = mpp
        self.vendor = str(props.get(f"{self.backend}.vendor") or "")
        dims = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
        self._level_shapes = [(h, w) for w, h in dims]
        W0, H0 = dims[0]
        # downsample per level from the sizes (the libraries' own values round the same way)
        self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self._shape = (H0, W0, 3)
        self._thumbs: dict[int, np.ndarray] = {}

    def _open_with(self, name: str):
        if name == "tiffslide":
            import tiffslide

            return tiffslide.TiffSlide(self.path)
        if name == "openslide":
            import openslide

            return openslide.OpenSlide(self.path)
        raise InputError(f"unknown slide backend {name!r}: expected 'tiffslide' or 'openslide'")

    def __getstate__(self):
        # by path (Dask workers reopen the file; no pixels or handles travel)
        return {"path": self.path, "backend": self.backend}

    def __setstate__(self, state):
        self.__init__(state["path"], state.get("backend"))

    def __repr__(self) -> str:
        levels = ", ".join(f"{d:g}" for d in self._downsamples)
        mpp = f"{self.um_per_px:.4g} um/px" if self.um_per_px else "no MPP metadata"
        return (f"SlideImage({self.path!r}, {self._shape[1]}x{self._shape[0]} px, {mpp}, "
                f"levels x[{levels}], {self.backend})")

    # -- ImageSource ---------------------------------------------------------------------
    @property
    def shape(self):
        return self._shape

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    def level_shape(self, level: int) -> tuple[int, int]:
        return self._level_shapes[level]

    def _read(self, y0, x0, y1, x1):
        return self._read_level(0, y0, x0, y1, x1)

    def _read_level(self, level, y0, x0, y1, x1):
        ds = self._downsamples[level]
        loc = (_level0_coord(x0, ds), _level0_coord(y0, ds))
        size = (x1 - x0, y1 - y0)
        if self.backend == "tiffslide":
            a = np.asarray(self._slide.read_region(loc, level, size, as_array=True))
            if a.ndim == 2:
                a = a[..., None]
            if a.shape[2] == 1:
                a = np.repeat(a, 3, axis=2)
            if a.dtype != np.uint8:
                a = np.clip(a, 0, 255).astype(np.uint8)
            return a[..., :3]
        rgba = np.asarray(self._slide.read_region(loc, level, size), dtype=np.uint8)
        # openslide: transparent where the scanner captured nothing; composite on white
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """Downsampled RGB image from the coarsest sufficient level (cached per size)."""
        if max_side not in self._thumbs:
            self._thumbs[max_side] = super().thumbnail(max_side)
        return self._thumbs[max_side]

    def level_for_um_per_px(self, target_um_per_px: float, um_per_px: float | None = None) -> int:
        """The pyramid level nearest a working resolution without being coarser than it
        (e.g. 0.5 um/px on a 0.25 um/px slide with levels x1, x4, x16: level 0)."""
        um = float(um_per_px or self.um_per_px or 0)
        if um <= 0:
            raise InputError("the level for a resolution needs the pixel size (um_per_px)")
        return self.best_level(float(target_um_per_px) / um)

    def close(self) -> None:
        self._slide.close()


def slide_um_per_px(image, um_per_px: float | None = None, what: str = "the image") -> float:
    """Microns per full-resolution px: ``um_per_px`` when given, else the image's metadata
    (slides); an error naming both when neither is available."""
    if um_per_px is not None:
        return float(um_per_px)
    meta = getattr(image, "um_per_px", None) if isinstance(image, ImageSource) else None
    if meta:
        return float(meta)
    path = getattr(image, "path", None) or what
    from .section import SectionError

    raise SectionError(f"the pixel size of {path} is unknown: {MPP_SOURCES} has no value "
                       "(or this is not a whole-slide file); pass --um-per-px X (um_per_px= "
                       "in Python) with the microns per full-resolution pixel")


# -- writing pyramids --------------------------------------------------------------------
def _box(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f x f blocks (rounded), uint8 (H//f, W//f, 3); the remainder is dropped."""
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    if f == 1:
        return a[:h, :w]
    b = a[:h, :w].reshape(h // f, f, w // f, f, -1).mean(axis=(1, 3), dtype=np.float32)
    return np.clip(np.rint(b), 0, 255).astype(np.uint8)


class _LevelFile:
    """A temporary raw (H, W, 3) uint8 file, mapped band by band: only the band being
    written or read is mapped, so the writer's resident memory stays bounded."""

    def __init__(self, path: Path, h: int, w: int):
        self.path, self.shape = path, (int(h), int(w), 3)
        with open(path, "wb") as f:
            f.truncate(self.shape[0] * self.shape[1] * 3)

    def band(self, y0: int, y1: int) -> np.ndarray:
        h, w, _ = self.shape
        y0, y1 = max(0, y0), min(h, y1)
        if y1 <= y0:
            return np.zeros((0, w, 3), np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r+", offset=y0 * w * 3,
                         shape=(y1 - y0, w, 3))

    def tiles(self, tile: int):
        """Tiles in row-major order, white-padded at the edges."""
        h, w, _ = self.shape
        for y in range(0, h, tile):
            band = self.band(y, y + tile)
            for x in range(0, w, tile):
                t = np.asarray(band[:, x:x + tile])
                if t.shape[:2] != (tile, tile):
                    pad = np.full((tile, tile, 3), 255, np.uint8)
                    pad[:t.shape[0], :t.shape[1]] = t
                    t = pad
                yield t
            del band

    def strided(self, f: int) -> np.ndarray:
        """Every f-th row and column (a small preview), read band by band."""
        h = self.shape[0]
        step = f * max(1, 2048 // f)
        return np.concatenate([np.array(self.band(y, y + step)[::f, ::f])
                               for y in range(0, h, step)], axis=0)


def write_pyramidal_tiff(source, path: str | os.PathLike, um_per_px: float | None = None,
                         kind: str = "svs", downsamples=(1, 4, 16, 64), tile: int = 256,
                         compression: str | None = "jpeg", quality: int = 90,
                         tmp_dir: str | os.PathLike | None = None,
                         progress: bool = False) -> Path:
    """Write any :class:`~histosr.image.ImageSource` (or array) as a tiled pyramidal TIFF,
    tile by tile: neither the full-resolution image nor a level below it is ever in memory
    (each reduced level is accumulated in a temporary file, mapped one band at a time).

    ``kind="svs"``: Aperio-style (baseline, thumbnail, reduced levels; ``MPP = um_per_px`` in
    the description when given). ``kind="ome"``: OME-TIFF with the levels as SubIFDs and
    ``PhysicalSizeX/Y`` (um) when given. ``downsamples``: 1 then increasing integers, each
    a multiple of the previous; level k is the box-average (rounded) of level k-1.
    ``compression``: ``"jpeg"`` (needs imagecodecs), ``"zlib"`` (lossless) or None."""
    import tempfile

    import tifffile
    from tqdm.auto import tqdm

    from .image import open_image

    src = open_image(source)
    ds = [int(d) for d in downsamples]
    if ds[0] != 1 or any(b <= a or b % a for a, b in zip(ds, ds[1:])):
        raise InputError(f"downsamples must start at 1 and increase by integer factors, got "
                         f"{tuple(downsamples)}")
    if kind not in ("svs", "ome"):
        raise InputError(f"kind must be 'svs' or 'ome', got {kind!r}")
    if tile % 16 or tile < 16 or (len(ds) > 1 and tile % ds[1]):
        raise InputError(f"tile must be a multiple of 16 and of the first downsample, got {tile}")
    H, W = src.shape[:2]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    common = {"dtype": np.uint8, "tile": (tile, tile), "photometric": "rgb",
              "compression": compression, "metadata": None}
    if compression == "jpeg":
        common["compressionargs"] = {"level": int(quality)}
    with tempfile.TemporaryDirectory(dir=tmp_dir) as td:
        levels = [_LevelFile(Path(td) / f"level{k}.raw", H // ds[k], W // ds[k])
                  for k in range(1, len(ds))]

        def level0():
            n = (-(-H // tile)) * (-(-W // tile))
            bar = tqdm(total=n, desc="slide level 0", disable=not progress)
            f = ds[1] if levels else 1
            for y in range(0, H, tile):
                band = levels[0].band(y // f, (y + tile) // f) if levels else None
                for x in range(0, W, tile):
                    t = src.read(y, x, tile, tile)
                    if band is not None and len(band):
                        b = _box(t, f)
                        x1 = x // f
                        ww = min(b.shape[1], band.shape[1] - x1)
                        if ww > 0:
                            band[:, x1:x1 + ww] = b[:len(band), :ww]
                    bar.update(1)
                    yield t
                del band
            bar.close()

        with tifffile.TiffWriter(tmp, bigtiff=True, ome=(kind == "ome")) as tw:
            if kind == "svs":
                desc = (f"Aperio Image Library v12.0.15 \n{W}x{H} [0,0 {W}x{H}] ({tile}x{tile}) "
                        f"{(compression or 'raw').upper()}/RGB Q={quality}")
                if um_per_px:
                    mag = 20.0 * 0.5 / float(um_per_px)
                    desc += f"|AppMag = {mag:g}|MPP = {float(um_per_px):.6f}"
                tw.write(level0(), shape=(H, W, 3), description=desc, **common)
            else:
                meta = {"axes": "YXS"}
                if um_per_px:
                    meta.update({"PhysicalSizeX": float(um_per_px), "PhysicalSizeXUnit": "µm",
                                 "PhysicalSizeY": float(um_per_px), "PhysicalSizeYUnit": "µm"})
                tw.write(level0(), shape=(H, W, 3), subifds=len(ds) - 1,
                         **{**common, "metadata": meta})
            for k in range(2, len(ds)):  # level k from level k-1, band by band
                f = ds[k] // ds[k - 1]
                prev, cur = levels[k - 2], levels[k - 1]
                step = f * max(1, 2048 // f)
                for y in range(0, cur.shape[0] * f, step):
                    b = _box(np.asarray(prev.band(y, y + step)), f)
                    out = cur.band(y // f, y // f + len(b))
                    out[:] = b[:len(out), :cur.shape[1]]
                    del out
            if kind == "svs" and levels:
                from PIL import Image

                low = levels[-1]
                th = low.strided(max(1, int(np.ceil(max(low.shape[:2]) / 2048))))
                s = 1024 / max(th.shape[:2])
                th = np.asarray(Image.fromarray(th).resize(
                    (max(1, int(th.shape[1] * s)), max(1, int(th.shape[0] * s))), Image.BOX))
                tw.write(th, photometric="rgb", metadata=None,
                         description=f"Aperio Image Library v12.0.15 \n{W}x{H} -> "
                                     f"{th.shape[1]}x{th.shape[0]} - |")
            for lvl in levels:
                h, w = lvl.shape[:2]
                extra = ({"description": f"Aperio Image Library v12.0.15 \n{W}x{H} -> {w}x{h} - "
                                         f"({tile}x{tile})"} if kind == "svs"
                         else {"subfiletype": 1})
                tw.write(lvl.tiles(tile), shape=(h, w, 3), **common, **extra)
    os.replace(tmp, path)
    return path


__all__ = ["SlideImage", "is_slide", "slide_um_per_px", "write_pyramidal_tiff",
           "SLIDE_SUFFIXES"]
