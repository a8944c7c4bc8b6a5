"""Lazy image handles: the whole slide is never loaded unless it is small.

An :class:`ImageSource` exposes ``shape`` (H, W, 3) and ``read(y0, x0, h, w)`` returning an
RGB uint8 array of that region (rows y0..y0+h, columns x0..x0+w), padded with white where
the region leaves the image.

Pyramids: every source has ``level_downsamples`` (level 0 = full resolution, 1.0) and
``read_level(level, y0, x0, h, w)`` in that level's px; plain images have one level.
:meth:`ImageSource.best_level` picks the coarsest level that is still at least as fine as a
requested downsample, so readers at a coarser working resolution (0.5 um/px features,
tissue detection on the 8 um grid, thumbnails) read few pixels. Whole-slide files (.svs,
.ndpi, .mrxs, pyramidal and OME-TIFF) open as :class:`histosr.slide.SlideImage`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError

WHITE = 255


class ImageSource:
    """Base class; subclasses implement ``shape`` and ``_read`` (in-bounds region)."""

    path: str | None = None
    #: microns per full-resolution px from the file's metadata (slides), else None
    um_per_px: float | None = None

    @property
    def shape(self) -> tuple[int, int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- pyramid levels (one level unless a subclass has more) ------------------------------
    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of each level relative to full resolution (level 0 = 1.0)."""
        return (1.0,)

    def level_shape(self, level: int) -> tuple[int, int]:
        """(H, W) px of ``level``."""
        if level != 0:
            raise IndexError(f"level {level} out of range (this image has one level)")
        return tuple(self.shape[:2])  # type: ignore[return-value]

    def _read_level(self, level: int, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
        return self._read(y0, x0, y1, x1)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (so reading it
        never upsamples, up to 1 %: slide levels are often x4.0003); 0 for ``downsample <=
        1``."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= float(downsample) * 1.01 and d >= self.level_downsamples[best]:
                best = i
        return best

    def read_level(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Region of ``level`` (its own px: rows y0..y0+h, cols x0..x0+w), white-padded."""
        if level == 0:
            return self.read(y0, x0, h, w)
        H, W = self.level_shape(level)
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + h, H), min(x0 + w, W)
        if yb > ya and xb > xa:
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self._read_level(level, ya, xa, yb, xb)
        return out

    def _read(self, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def release(self) -> None:
        """Drop decoded full-resolution pixels held in memory, if any (read again on
        demand): a pipeline calls it after its feature pass."""

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Region of ``h`` rows x ``w`` columns at (row y0, column x0), white-padded."""
        H, W = self.shape[:2]
        out = np.full((h, w, 3), WHITE, dtype=np.uint8)
        ya, xa = max(y0, 0), max(x0, 0)
        yb, xb = min(y0 + h, H), min(x0 + w, W)
        if yb > ya and xb > xa:
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self._read(ya, xa, yb, xb)
        return out

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """Downsampled RGB image (for previews), reading in strips to bound memory; from the
        coarsest pyramid level that is fine enough when there are several. Its shape is
        ``(ceil(H / f), ceil(W / f))`` with ``f = thumbnail_factor(shape, max_side)``: full-res
        px ``x`` is thumbnail px ``x / f``."""
        from PIL import Image

        cache = self.__dict__.setdefault("_thumbs", {})  # previews, QC and outputs share it
        if max_side in cache:
            return cache[max_side]
        H, W = self.shape[:2]
        f = thumbnail_factor(self.shape, max_side)
        level = self.best_level(f)
        if level > 0:
            cache[max_side] = self._thumbnail_from_level(level, f)
            return cache[max_side]
        # strips of at most THUMB_STRIP_BYTES, a multiple of f rows (each keeps the same phase)
        strip = max(f, (THUMB_STRIP_BYTES // (3 * max(W, 1))) // f * f)
        rows = []
        for y in range(0, H, strip):
            h = min(strip, H - y)
            # a copy: the strided view would keep every full-resolution strip alive
            rows.append(np.ascontiguousarray(self.read(y, 0, h, W)[::f, ::f]))
        t = np.concatenate(rows, axis=0)
        th, tw = int(np.ceil(H / f)), int(np.ceil(W / f))
        if t.shape[:2] != (th, tw):
            t = np.asarray(Image.fromarray(t).resize((tw, th)))
        cache[max_side] = t
        return t

    def read_scaled(self, y0: int, x0: int, h: int, w: int, f: int) -> np.ndarray:
        """Region of ``h`` x ``w`` full-res px at (row y0, column x0), downsampled by the
        integer ``f`` (area average): shape ``(ceil(h / f), ceil(w / f))``, white-padded. Read
        from the coarsest pyramid level that is fine enough (e.g. a zoomed preview)."""
        f = max(1, int(f))
        th, tw = -(-int(h) // f), -(-int(w) // f)
        level = self.best_level(f)
        if level > 0:
            d = self.level_downsamples[level]
            a = self.read_level(level, int(np.floor(y0 / d)), int(np.floor(x0 / d)),
                                max(1, int(np.ceil(h / d))), max(1, int(np.ceil(w / d))))
        else:
            a = self.read(int(y0), int(x0), int(h), int(w))
        return _resize(a, th, tw)

    def _thumbnail_from_level(self, level: int, f: int) -> np.ndarray:
        from PIL import Image

        H, W = self.shape[:2]
        th, tw = int(np.ceil(H / f)), int(np.ceil(W / f))
        lh, lw = self.level_shape(level)
        rows = [self.read_level(level, y, 0, min(2048, lh - y), lw) for y in range(0, lh, 2048)]
        a = np.concatenate(rows, axis=0)
        if a.shape[:2] != (th, tw):
            a = np.asarray(Image.fromarray(a).resize((tw, th), Image.BOX))
        return a


#: full-resolution bytes read at once by :meth:`ImageSource.thumbnail`
THUMB_STRIP_BYTES = 16 << 20


def thumbnail_factor(shape, max_side: int) -> int:
    """The integer downsample of :meth:`ImageSource.thumbnail`: the smallest ``f`` with
    ``ceil(max(H, W) / f) <= max_side``."""
    return max(1, int(np.ceil(max(int(shape[0]), int(shape[1])) / max(1, int(max_side)))))


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """``a`` resized to (h, w): area average when shrinking (no aliasing of nuclei)."""
    from PIL import Image

    if a.shape[:2] == (h, w):
        return a
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).resize((w, h), Image.BOX))


class ArrayImage(ImageSource):
    """An image already in memory (small sections, synthetic data, tests)."""

    def __init__(self, array: np.ndarray):
        a = np.asarray(array)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] < 3:
            raise InputError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
        if a.dtype != np.uint8:
            a = np.clip(a, 0, 255).astype(np.uint8)
        self.array = a[..., :3]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def _read(self, y0, x0, y1, x1):
        return self.array[y0:y1, x0:x1]


class ZarrImage(ImageSource):
    """A chunked on-disk (H, W, 3) uint8 zarr array: whole slides in bounded memory."""

    def __init__(self, array_or_path):
        import zarr

        if isinstance(array_or_path, (str, os.PathLike)):
            self.path = str(array_or_path)
            array_or_path = zarr.open(self.path, mode="r")
        self.array = array_or_path

    @property
    def shape(self):
        return tuple(self.array.shape)

    def _read(self, y0, x0, y1, x1):
        return np.asarray(self.array[y0:y1, x0:x1, :3])

    def __getstate__(self):
        # by path when there is one (Dask workers reopen the store; pixels never travel)
        return {"path": self.path} if self.path else self.__dict__

    def __setstate__(self, state):
        if state.get("path") and "array" not in state:
            self.__init__(state["path"])
        else:
            self.__dict__.update(state)


class FileImage(ImageSource):
    """An image file (JPEG/PNG/TIFF). TIFFs are memory-mapped through tifffile when
    possible; other formats are decoded on first read (they cannot be read in parts)."""

    def __init__(self, path: str | os.PathLike):
        from PIL import Image

        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"image file not found: {self.path}")
        self._array: np.ndarray | None = None
        self._tiff = None
        self._thumbs: dict[int, np.ndarray] = {}
        self._draft_cache: tuple[np.ndarray, int] | None = None
        suffix = Path(self.path).suffix.lower()
        if suffix in (".tif", ".tiff", ".btf"):
            try:
                import tifffile
                import zarr

                store = tifffile.imread(self.path, aszarr=True, level=0)
                z = zarr.open(store, mode="r")
                self._tiff = z if hasattr(z, "shape") else z[0]
            except Exception:  # noqa: BLE001 - fall back to PIL below
                self._tiff = None
        if self._tiff is not None:
            shp = self._tiff.shape
            if shp[0] in (3, 4) and shp[-1] not in (3, 4):  # planar CYX
                raise InputError(f"planar (C, Y, X) TIFFs are not supported: {self.path}")
            self._shape = (shp[0], shp[1], 3)
        else:
            from PIL import UnidentifiedImageError

            Image.MAX_IMAGE_PIXELS = None  # slides are large on purpose
            try:
                with Image.open(self.path) as im:
                    self._shape = (im.height, im.width, 3)
            except (UnidentifiedImageError, OSError) as e:
                from .section import SectionError

                raise SectionError(f"cannot read {self.path} as an image ({e}): expected a "
                                   "JPEG, PNG or TIFF slide") from None

    @property
    def shape(self):
        return self._shape

    def __getstate__(self):
        # by path: neither the decoded pixels nor the open TIFF store travel (Dask workers)
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])

    # -- reduced-resolution reads without decoding the whole file --------------------------
    def _jpeg(self) -> bool:
        return self._tiff is None and Path(self.path).suffix.lower() in (".jpg", ".jpeg")

    def _draft(self, f: int) -> tuple[np.ndarray, int]:
        """The JPEG decoded at 1/s of its size (s in 1, 2, 4, 8: the largest not above
        ``f``) through PIL's DCT scaling (``Image.draft``): a 9,000 px JPEG at s = 8 decodes
        in a tenth of the time and a sixtieth of the memory of a full decode. The last
        decode is kept (previews of several genes read the same slide)."""
        from PIL import Image

        s = max(v for v in (1, 2, 4, 8) if v <= max(1, f))
        if self._draft_cache is not None and self._draft_cache[1] == s:
            return self._draft_cache
        with Image.open(self.path) as im:
            W, H = im.size
            # draft picks the largest 1/s whose result is at least the size asked for
            im.draft("RGB", (max(1, W // s), max(1, H // s)))
            a = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        s = max(1, int(round(W / a.shape[1])))  # the scale the decoder used
        self._draft_cache = (a, s)
        return self._draft_cache

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """As :meth:`ImageSource.thumbnail`; a JPEG that is not decoded yet is decoded at
        reduced size (:meth:`_draft`), and thumbnails are kept per size."""
        if max_side in self._thumbs:
            return self._thumbs[max_side]
        if self._array is None and self._jpeg():
            f = thumbnail_factor(self.shape, max_side)
            H, W = self.shape[:2]
            a, s = self._draft(f)
            t = _resize(a, -(-H // f), -(-W // f))
        else:
            t = super().thumbnail(max_side)
        self._thumbs[max_side] = t
        return t

    def read_scaled(self, y0: int, x0: int, h: int, w: int, f: int) -> np.ndarray:
        """As :meth:`ImageSource.read_scaled`; from a reduced-size decode for a JPEG that is
        not decoded yet."""
        f = max(1, int(f))
        if self._array is not None or not self._jpeg() or f == 1:
            return super().read_scaled(y0, x0, h, w, f)
        a, s = self._draft(f)
        th, tw = -(-int(h) // f), -(-int(w) // f)
        hs, ws = max(1, -(-int(h) // s)), max(1, -(-int(w) // s))
        out = np.full((hs, ws, 3), WHITE, dtype=np.uint8)
        ys, xs = int(y0) // s, int(x0) // s
        ya, xa = max(ys, 0), max(xs, 0)
        yb, xb = min(ys + hs, a.shape[0]), min(xs + ws, a.shape[1])
        if yb > ya and xb > xa:
            out[ya - ys : yb - ys, xa - xs : xb - xs] = a[ya:yb, xa:xb]
        return _resize(out, th, tw)

    def release(self) -> None:
        self._array = None  # reduced reads fall back to the JPEG's draft decodes

    def _load(self) -> np.ndarray:
        if self._array is None:
            self._array = _decode_rgb(self.path, self._jpeg())
            self._draft_cache = None  # reduced reads now come from the full decode
        return self._array

    def _read(self, y0, x0, y1, x1):
        if self._tiff is not None:
            a = np.asarray(self._tiff[y0:y1, x0:x1])
            if a.ndim == 2:
                a = np.repeat(a[..., None], 3, axis=2)
            return a[..., :3].astype(np.uint8, copy=False)
        return self._load()[y0:y1, x0:x1]


#: rows per strip when PIL's decoded image is copied into the array
_DECODE_ROWS = 512


def _decode_rgb(path, jpeg: bool) -> np.ndarray:
    """uint8 (H, W, 3) pixels of a JPEG / PNG / plain TIFF file, with one full-size buffer
    at a time where possible: a JPEG goes straight from libjpeg-turbo into the array
    (``imagecodecs``, from the ``slides`` extra: 3 bytes per pixel at the peak instead of
    ~14 through ``np.asarray(im.convert("RGB"))``, which holds PIL's 4-byte pixels, a
    converted copy and a bytes copy at once; pixel-identical to PIL's decode); other files,
    or without imagecodecs, are copied out of PIL's decode strip by strip."""
    from PIL import Image

    if jpeg:
        try:
            import imagecodecs
        except ImportError:
            imagecodecs = None
        if imagecodecs is not None:
            try:
                a = imagecodecs.jpeg8_decode(Path(path).read_bytes())
            except Exception:  # noqa: BLE001 - a JPEG libjpeg refuses: PIL says why below
                a = None
            if a is not None and a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3:
                return a
            if a is not None and a.dtype == np.uint8 and a.ndim == 2:  # greyscale
                return np.repeat(a[..., None], 3, axis=2)
    with Image.open(path) as im:
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
        w, h = im.size
        out = np.empty((h, w, 3), np.uint8)
        for y in range(0, h, _DECODE_ROWS):
            y1 = min(h, y + _DECODE_ROWS)
            out[y:y1] = np.asarray(im.crop((0, y, w, y1)))
    return out


def open_image(path_or_array) -> ImageSource:
    """An :class:`ImageSource` for a path (file or zarr folder) or an array. Whole-slide
    files (.svs, .ndpi, .mrxs, ..., OME-TIFF and other pyramidal TIFFs) open as
    :class:`histosr.slide.SlideImage` (pyramid levels, microns per pixel from metadata)."""
    if isinstance(path_or_array, ImageSource):
        return path_or_array
    if isinstance(path_or_array, np.ndarray):
        return ArrayImage(path_or_array)
    p = Path(path_or_array)
    if p.is_dir() and p.suffix.lower() != ".mrxs":
        return ZarrImage(p)
    from .slide import SLIDE_SUFFIXES, SlideImage, is_slide

    if is_slide(p):
        try:
            return SlideImage(p)
        except ValueError:
            if p.name.lower().endswith(SLIDE_SUFFIXES):
                raise
            # a pyramidal TIFF that no slide library opens (or none installed): level 0
            # through tifffile, as before slides were supported
            import warnings

            warnings.warn(f"{p.name}: read as a plain TIFF (level 0 only, no pixel size "
                          "from metadata): pip install 'histosr[slides]' for pyramid levels",
                          stacklevel=2)
    return FileImage(p)
