"""Cache keys for feature maps: a stable hash of what the features depend on."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..keys import digest

FORMAT_VERSION = 1


def image_identity(image) -> dict:
    """What identifies an image's pixels: path + size + mtime for files and zarr folders, a
    checksum for in-memory arrays, ``image.cache_token`` for procedural sources, else a
    checksum of a sparse sample of regions (best effort)."""
    shape = [int(s) for s in image.shape[:2]]
    token = getattr(image, "cache_token", None)
    if token is not None:
        return {"kind": type(image).__name__, "token": str(token), "shape": shape}
    path = getattr(image, "path", None)
    if path:
        p = Path(path)
        st = p.stat()
        ident = {"kind": "path", "path": str(p.resolve()), "size": st.st_size,
                 "mtime_ns": st.st_mtime_ns, "shape": shape}
        if p.is_dir():  # zarr: the metadata file changes when the array is rewritten
            for meta in ("zarr.json", ".zarray"):
                if (p / meta).exists():
                    ident["meta_mtime_ns"] = (p / meta).stat().st_mtime_ns
        return ident
    arr = getattr(image, "array", None)
    if isinstance(arr, np.ndarray):
        return {"kind": "array", "blake2b": digest(arr), "shape": list(arr.shape)}
    H, W = shape
    regions = [image.read(int(y), int(x), 64, 64)
               for y in np.linspace(0, max(H - 64, 0), 8).astype(int)
               for x in np.linspace(0, max(W - 64, 0), 8).astype(int)]
    return {"kind": type(image).__qualname__, "sample_blake2b": digest(*regions),
            "shape": shape}


def feature_key(image, um_per_px: float, encoder: str, params: dict, tile_sp: int,
                extra: dict | None = None) -> str:
    """Hex digest keying a feature map by its inputs and parameters."""
    payload = {
        "version": FORMAT_VERSION,
        "image": image_identity(image),
        "um_per_px": round(float(um_per_px), 9),
        "encoder": encoder,
        "params": params,
        "tile_sp": int(tile_sp),
        "extra": extra or {},
    }
    return digest(payload)


CACHE_ENV = "HISTOSR_CACHE_DIR"


def cache_dir_for(run_dir) -> Path:
    """Where a run keeps features, crops and checkpoints: ``$HISTOSR_CACHE_DIR`` when set (one
    cache shared by every run: a section's features are computed once), else
    ``run_dir/cache``. Entries are keyed by their inputs, so sharing is safe."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path(run_dir) / "cache"


def cache_path(cache_dir: str | os.PathLike, name: str, encoder: str, key: str) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{name}-{encoder}")
    return Path(cache_dir) / f"{safe}-{key[:20]}.zarr"
