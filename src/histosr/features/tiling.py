"""Stream a section through an encoder into a chunked on-disk :class:`FeatureMap`.

Calibrated (0.5 um/px) tiles of ``tile_sp`` x ``tile_sp`` superpixels plus a halo are read
with :func:`histosr.geometry.read_calibrated`, encoded and written band by band (one row
of tiles) to a zarr group, so memory is bounded by a band whatever the slide size.

Two paths:

* encoders with the two-stage interface (``embed_base``, ``base_dim``, ``base_halo_sp``,
  ``add_context`` - the handcrafted encoder) run pass 1 (per-superpixel base features,
  tiles with a small pixel halo, into a temporary float32 array) and pass 2 (context over
  neighbouring superpixels, bands of the base array with a ``context_sp`` halo); context
  is then exact whatever the tile size, and the pixel work is not repeated in halos;
* any other encoder: tiles are read with a ``context_sp`` superpixel halo, embedded with
  ``embed_tiles`` and the halo is cropped.

The tissue mask comes from a cheap pre-pass (area-averaged colour per superpixel, see
:mod:`histosr.tissue`) unless given. With ``tissue_only`` tiles that have no tissue within
``context_sp`` superpixels are not encoded: their features are zeros (for the two-stage
path, their base features are those of a white tile, so context near the tissue border is
unaffected). Every superpixel within ``context_sp`` of tissue therefore has exact features.

Output: a zarr group (``features`` (H_sp, W_sp, D) fp16, ``mask``, attrs as written by
:meth:`FeatureMap.save`) at ``out``; or in ``cache_dir`` under a name keyed by a hash of
the image identity, pixel size, encoder and its parameters, tile size and mask; or, when
neither is given, in a fresh temporary directory (the caller owns it). It is written in
``<path>.partial`` and renamed when complete; a complete result with the same key is
reused, and a killed run restarts from the last finished band.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..geometry import SP_PX, grid_for, read_calibrated
from .cache import array_digest, cache_path, feature_key
from .featuremap import FeatureMap, create_zarr_array
from .registry import get_encoder

_MAX_CHUNK_COLS = 256


def _is_two_stage(enc) -> bool:
    return all(hasattr(enc, a) for a in ("embed_base", "add_context", "base_dim", "base_halo_sp"))


def _encoder_params(enc) -> dict:
    p = getattr(enc, "params", None)
    if isinstance(p, dict):
        return p
    return {k: v for k, v in sorted(vars(enc).items())
            if isinstance(v, (int, float, str, bool, tuple, list)) and not k.startswith("_")}


def _read_attrs(path: Path) -> dict | None:
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
        return json.loads(root.attrs["histosr"])
    except Exception:  # noqa: BLE001 - missing or unreadable means "not there"
        return None


def _tiles_to_encode(mask: np.ndarray, tile_sp: int, reach: int) -> np.ndarray:
    """bool (n_bands, n_cols) tiles that have tissue within ``reach`` superpixels."""
    h, w = mask.shape
    near = ndi.binary_dilation(mask, np.ones((2 * reach + 1,) * 2, bool)) if reach else mask
    nb, nc = -(-h // tile_sp), -(-w // tile_sp)
    pad = np.zeros((nb * tile_sp, nc * tile_sp), bool)
    pad[:h, :w] = near
    return pad.reshape(nb, tile_sp, nc, tile_sp).any(axis=(1, 3))


def compute(
    section,
    encoder="handcrafted",
    out: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    tile_sp: int = 64,
    progress: bool = True,
    mask: np.ndarray | None = None,
    tissue_only: bool = True,
    n_jobs: int | None = None,
    **encoder_kwargs,
) -> FeatureMap:
    """Per-superpixel features of ``section`` as an on-disk :class:`FeatureMap`.

    ``encoder``: a registered name (parameters in ``encoder_kwargs``) or an encoder object.
    ``n_jobs``: threads for tile encoding (default: up to 2); results do not depend on it.
    See the module docstring for where the output goes, caching and resuming.
    """
    import zarr
    from tqdm.auto import tqdm

    from ..tissue import mean_rgb_sp, tissue_mask

    enc = get_encoder(encoder, **encoder_kwargs) if isinstance(encoder, str) else encoder
    enc_name = getattr(enc, "name", str(encoder))
    tile_sp = int(tile_sp)
    if tile_sp < 1:
        raise ValueError(f"tile_sp must be >= 1 superpixel, got {tile_sp}")
    grid = grid_for(section)
    H, W = grid.shape
    D = int(enc.dim)
    ctx = int(getattr(enc, "context_sp", 0))
    two_stage = _is_two_stage(enc)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (H, W):
            raise ValueError(f"mask shape {mask.shape} != superpixel grid shape {(H, W)}")
    params = _encoder_params(enc)
    key = feature_key(
        section.image, section.um_per_px, enc_name, params, tile_sp,
        extra={"tissue_only": bool(tissue_only),
               "mask": None if mask is None else array_digest(mask)},
    )

    # -- where the result goes; reuse a complete one ------------------------------------
    if out is not None:
        path = Path(out)
    elif cache_dir is not None:
        path = cache_path(cache_dir, section.name, enc_name, key)
    else:
        path = Path(tempfile.mkdtemp(prefix="histosr-features-")) / "features.zarr"
    attrs = _read_attrs(path) if path.exists() else None
    if attrs and attrs.get("meta", {}).get("cache_key") == key:
        return FeatureMap.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = path.with_name(path.name + ".partial")
    wattrs = _read_attrs(work) if work.exists() else None
    if not (wattrs and wattrs.get("meta", {}).get("cache_key") == key):
        shutil.rmtree(work, ignore_errors=True)
        wattrs = None
    done_dir = work / "_done"

    if mask is None:
        if wattrs is not None and "mask" in zarr.open_group(str(work), mode="r"):
            mask = np.asarray(zarr.open_group(str(work), mode="r")["mask"][:], dtype=bool)
        else:
            mask = tissue_mask(mean_rgb_sp(section.image, section.um_per_px))

    meta = {
        "cache_key": key, "encoder_params": params, "tile_sp": tile_sp,
        "tissue_only": bool(tissue_only), "section": section.name,
        "feature_names": list(getattr(enc, "feature_names", [])),
    }
    attrs = {"encoder": enc_name, "meta": meta, "um_per_px": grid.um_per_px,
             "image_shape": list(grid.image_shape)}
    if wattrs is None:
        root = zarr.open_group(str(work), mode="w")
        chunks = (min(H, tile_sp), min(W, _MAX_CHUNK_COLS))
        create_zarr_array(root, "features", (H, W, D), chunks + (D,), "f2")
        m = create_zarr_array(root, "mask", (H, W), (min(H, 1024), min(W, 1024)), "bool")
        m[:] = mask
        if two_stage:
            create_zarr_array(root, "base", (H, W, enc.base_dim), chunks + (enc.base_dim,), "f4")
        root.attrs["histosr"] = json.dumps(attrs)
        done_dir.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(work), mode="r+")

    n_bands, n_cols = -(-H // tile_sp), -(-W // tile_sp)
    encode = (_tiles_to_encode(mask, tile_sp, ctx) if tissue_only
              else np.ones((n_bands, n_cols), bool))
    n_jobs = n_jobs or min(2, os.cpu_count() or 1)
    um = section.um_per_px
    image = section.image

    def read_tile(r0, r1, c0, c1, halo):
        return read_calibrated(image, um, (r0 - halo) * SP_PX, (c0 - halo) * SP_PX,
                               (r1 - r0 + 2 * halo) * SP_PX, (c1 - c0 + 2 * halo) * SP_PX)

    def band_done(tag, b):
        return (done_dir / f"{tag}_{b}").exists()

    def mark_done(tag, b):
        (done_dir / f"{tag}_{b}").touch()

    todo = [b for b in range(n_bands) if not band_done("p1", b)]
    bar = tqdm(total=int(encode[todo].sum()) if todo else 0, disable=not progress,
               desc=f"features {section.name} ({enc_name})", unit="tile")
    pool = ThreadPoolExecutor(n_jobs) if n_jobs > 1 else None
    try:
        if two_stage:
            hb = int(enc.base_halo_sp)
            white = enc.embed_base(np.full((1, (2 * hb + 1) * SP_PX, (2 * hb + 1) * SP_PX, 3),
                                           255, np.uint8))[0, hb, hb]
            target, width = root["base"], enc.base_dim
        else:
            hb, white = ctx, None
            target, width = root["features"], D

        def job(args):
            r0, r1, c0, c1 = args
            tile = read_tile(r0, r1, c0, c1, hb)
            f = enc.embed_base(tile[None]) if two_stage else enc.embed_tiles(tile[None])
            return np.asarray(f[0, hb: hb + r1 - r0, hb: hb + c1 - c0], dtype=np.float32)

        # pass 1: tiles -> base features (two-stage) or final features
        for b in todo:
            r0, r1 = b * tile_sp, min((b + 1) * tile_sp, H)
            band = np.zeros((r1 - r0, W, width), np.float32)
            if white is not None:
                band[:] = white
            jobs = [(r0, r1, c * tile_sp, min((c + 1) * tile_sp, W))
                    for c in range(n_cols) if encode[b, c]]
            results = pool.map(job, jobs) if pool else map(job, jobs)
            for (_, _, c0, c1), f in zip(jobs, results):
                band[:, c0:c1] = f
                bar.update(1)
            target[r0:r1] = band.astype(target.dtype)
            mark_done("p1", b)
        bar.close()

        # pass 2 (two-stage): context over base features with a halo of superpixel rows
        if two_stage:
            base = root["base"]
            feats = root["features"]
            for b in tqdm(range(n_bands), disable=not progress, desc="context", unit="band"):
                if band_done("p2", b):
                    continue
                r0, r1 = b * tile_sp, min((b + 1) * tile_sp, H)
                a0, a1 = max(r0 - ctx, 0), min(r1 + ctx, H)
                pad0, pad1 = ctx - (r0 - a0), ctx - (a1 - r1)
                blk = np.zeros((pad0 + (a1 - a0) + pad1, W, enc.base_dim), np.float32)
                blk[pad0: pad0 + a1 - a0] = base[a0:a1]
                valid = np.zeros(blk.shape[:2], np.float32)
                valid[pad0: pad0 + a1 - a0] = 1.0
                f = enc.add_context(blk, valid)[ctx: ctx + r1 - r0]
                if tissue_only:
                    skip = ~np.repeat(encode[b], tile_sp)[:W]
                    f[:, skip] = 0.0
                feats[r0:r1] = f.astype(np.float16)
                mark_done("p2", b)
    finally:
        if pool:
            pool.shutdown()

    # finalise: drop scratch, mark complete, rename into place
    if two_stage and "base" in root:
        shutil.rmtree(work / "base", ignore_errors=True)
    shutil.rmtree(done_dir, ignore_errors=True)
    zarr.open_group(str(work), mode="r+").attrs["histosr"] = json.dumps(attrs)
    shutil.rmtree(path, ignore_errors=True)
    work.rename(path)
    return FeatureMap.load(path)
