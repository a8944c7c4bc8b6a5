"""Spot-crop features: one feature vector per crop of a given physical size around any point.

The spot-level methods (HisHRST, TriHRGE, HESpotEx, ``ridge``) describe a spot by an encoder
embedding of the square image crop centred on it, not by the 8 um superpixel grid. Crops are
read at the encoder's resolution (0.5 um/px, :func:`histosr.geometry.read_calibrated`), so a
size is physical: ``size_um=56`` is HisHRST's 112 px crop, TriHRGE's 224 and 672 px crops are
112 and 336 um. Outside the image the crop is white (background).

* Encoders with a crop head (``embed_crops``: UNI, UNI2, timm, HIPT, QuiltNet) give their global
  embedding (CLS / pooled token) of the crop resized to their input size.
* Token encoders without one (``handcrafted``) are run on the crop as a tile and pooled: the
  mean and the standard deviation of the crop's tokens (``2 * dim`` values).

``grid=3`` splits each crop into 3 x 3 sub-patches (row-major) embedded separately: TriHRGE's
nine sub-patches of the 672 px neighbourhood. Results are cached on disk (``cache_dir``) keyed by
the image, pixel size, centres, size, grid and encoder parameters; a cached file is reused.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..geometry import TARGET_UM_PER_PX, read_calibrated
from ..keys import digest
from .cache import image_identity

CROP_FORMAT_VERSION = 1


def _encoder(encoder):
    from .registry import get_encoder

    return get_encoder(encoder) if isinstance(encoder, str) else encoder


def _encoder_params(enc) -> dict:
    params = getattr(enc, "params", None)
    params = params() if callable(params) else params
    return {"name": getattr(enc, "name", type(enc).__name__), "params": params or {}}


def crop_dim(encoder) -> int:
    """Length of one crop's feature vector for ``encoder`` (name or instance)."""
    enc = _encoder(encoder)
    if hasattr(enc, "embed_crops"):
        return int(getattr(enc, "dim_crop", enc.dim))
    return 2 * int(enc.dim)


def _embed(enc, crops: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) -> float32 (B, d)."""
    if hasattr(enc, "embed_crops"):
        return np.asarray(enc.embed_crops(crops), dtype=np.float32)
    s = crops.shape[1]
    t = max(16, (s // 16) * 16)
    if t != s:  # token encoders need a multiple of 16 px: centre-crop (or pad) to it
        from PIL import Image

        crops = np.stack([np.asarray(Image.fromarray(c).resize((t, t), Image.BILINEAR))
                          for c in crops])
    tok = np.asarray(enc.embed_tiles(crops), dtype=np.float32)
    tok = tok.reshape(tok.shape[0], -1, tok.shape[-1])
    return np.concatenate([tok.mean(axis=1), tok.std(axis=1)], axis=1)


def read_crop(section, center_xy, size_px: int) -> np.ndarray:
    """uint8 (size_px, size_px, 3) crop at 0.5 um/px centred on the full-res point
    ``center_xy`` = (x = column, y = row)."""
    scale = section.um_per_px / TARGET_UM_PER_PX  # calibrated px per full-res px
    cx, cy = float(center_xy[0]) * scale, float(center_xy[1]) * scale
    y0 = int(round(cy - size_px / 2))
    x0 = int(round(cx - size_px / 2))
    return read_calibrated(section.image, section.um_per_px, y0, x0, size_px, size_px)


def _split(crops: np.ndarray, grid: int) -> np.ndarray:
    b, s = crops.shape[:2]
    k = s // grid
    c = crops[:, : k * grid, : k * grid].reshape(b, grid, k, grid, k, 3)
    return c.transpose(0, 1, 3, 2, 4, 5).reshape(b * grid * grid, k, k, 3)


def _key(section, centers: np.ndarray, size_px: int, grid: int, enc) -> str:
    return digest({"version": CROP_FORMAT_VERSION, "image": image_identity(section.image),
                   "um_per_px": round(float(section.um_per_px), 9), "size_px": size_px,
                   "grid": grid, "encoder": _encoder_params(enc)}, np.asarray(centers))


def crop_features(section, encoder="handcrafted", size_um: float = 56.0, centers=None,
                  grid: int = 1, cache_dir: str | os.PathLike | None = None,
                  batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """Encoder features of square crops of ``size_um`` um centred on ``centers``.

    ``centers``: (n, 2) full-res px (x = column, y = row); default the section's spots
    (``counts.obsm["spatial"]``). Returns float32 (n, d) for ``grid=1`` and
    (n, grid * grid, d) otherwise, d = :func:`crop_dim`.
    """
    from .ssl import resolve

    encoder = resolve(encoder, section, cache_dir, progress=progress)[0]  # "ssl": trained on this section
    enc = _encoder(encoder)
    if centers is None:
        centers = section.counts.obsm["spatial"]
    centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(centers).all():
        raise InputError("crop centres must be finite (x, y) full-res pixel coordinates")
    if size_um <= 0 or grid < 1:
        raise InputError(f"expected size_um > 0 and grid >= 1, got {size_um} and {grid}")
    size_px = int(round(size_um / TARGET_UM_PER_PX))
    size_px = max(grid, size_px - size_px % grid)
    path = None
    if cache_dir is not None:
        name = "".join(ch if ch.isalnum() or ch in "-_." else "_"
                       for ch in f"{section.name}-{_encoder_params(enc)['name']}")
        key = _key(section, centers, size_px, grid, enc)
        path = Path(cache_dir) / f"crops-{name}-{size_px}px-g{grid}-{key[:20]}.npy"
        if path.exists():
            return np.load(path)
    from tqdm.auto import tqdm

    out = []
    starts = range(0, len(centers), batch_size)
    for i in tqdm(starts, desc=f"crops {size_px}px", disable=not progress, leave=False):
        crops = np.stack([read_crop(section, c, size_px) for c in centers[i:i + batch_size]])
        if grid > 1:
            crops = _split(crops, grid)
        f = _embed(enc, crops)
        out.append(f.reshape(-1, grid * grid, f.shape[-1]) if grid > 1 else f)
    feats = (np.concatenate(out) if out else
             np.zeros((0, grid * grid, crop_dim(enc)) if grid > 1 else (0, crop_dim(enc)),
                      np.float32)).astype(np.float32)
    if path is not None:  # atomic: a killed run never leaves a half-written cache file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, feats)
        os.replace(tmp, path)
    return feats
