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

With ``scheduler`` (``"local"``, a Dask scheduler address or a ``distributed.Client``, see
:mod:`histosr.cluster`) the bands are encoded as Dask tasks, one band per task: each worker
builds the encoder from its registry name and parameters (cached per worker process),
reads its tiles from the image source itself (sources pickle by path) and writes its band of
the zarr store. A band is exactly one row of zarr chunks, so concurrent writers never share
a chunk; pass 2 starts when every band of pass 1 is written (its context reaches into the
neighbouring bands). Each band is computed by the same function as in the single-process
run, so the result is the same bit for bit, and the resume markers are shared.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError
from ..geometry import SP_PX, grid_for, read_calibrated
from ..keys import digest
from .cache import CACHE_ENV, cache_path, feature_key
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


# -- encoders on workers: built from (registry name, parameters), once per process ---------
_ENCODERS: dict = {}
_ENCODERS_LOCK = threading.Lock()


def _worker_encoder(name: str, kwargs: dict):
    """The encoder ``get_encoder(name, **kwargs)``, built once per process and reused."""
    k = (name, json.dumps(kwargs, sort_keys=True, default=str))
    with _ENCODERS_LOCK:
        if k not in _ENCODERS:
            _ENCODERS[k] = get_encoder(name, **kwargs)
        return _ENCODERS[k]


def _white_base(enc) -> np.ndarray:
    """Base features of an all-white superpixel (two-stage encoders)."""
    hb = int(enc.base_halo_sp)
    side = (2 * hb + 1) * SP_PX
    return enc.embed_base(np.full((1, side, side, 3), 255, np.uint8))[0, hb, hb]


def _encoder_info(name: str, kwargs: dict) -> dict:
    """What the tiler needs to know about an encoder (runs on a worker in Dask mode)."""
    enc = _worker_encoder(name, kwargs)
    two = _is_two_stage(enc)
    return {
        "name": getattr(enc, "name", name), "dim": int(enc.dim),
        "context_sp": int(getattr(enc, "context_sp", 0)), "params": _encoder_params(enc),
        "two_stage": two, "base_dim": int(enc.base_dim) if two else None,
        "base_halo_sp": int(enc.base_halo_sp) if two else None,
        "white": _white_base(enc) if two else None,
        "feature_names": list(getattr(enc, "feature_names", [])),
        # torch's CPU results depend on its thread count: tasks then use the caller's
        "uses_torch": "torch" in sys.modules,
    }


def _pass1_band(enc, image, um: float, r0: int, r1: int, cols, W: int, width: int, hb: int,
                white, two_stage: bool, map_fn=map, on_tile=None) -> np.ndarray:
    """float32 (r1 - r0, W, width) pass-1 output of one band: base features (two-stage) or
    final features of the tiles ``cols`` ((c0, c1) superpixel column ranges); superpixels
    of other tiles hold ``white`` (two-stage) or zeros."""

    def job(c):
        c0, c1 = c
        tile = read_calibrated(image, um, (r0 - hb) * SP_PX, (c0 - hb) * SP_PX,
                               (r1 - r0 + 2 * hb) * SP_PX, (c1 - c0 + 2 * hb) * SP_PX)
        f = enc.embed_base(tile[None]) if two_stage else enc.embed_tiles(tile[None])
        return np.asarray(f[0, hb: hb + r1 - r0, hb: hb + c1 - c0], dtype=np.float32)

    band = np.zeros((r1 - r0, W, width), np.float32)
    if white is not None:
        band[:] = white
    for (c0, c1), f in zip(cols, map_fn(job, cols)):
        band[:, c0:c1] = f
        if on_tile is not None:
            on_tile()
    return band


#: superpixel columns of one pass-2 block: with the band's rows, it bounds pass 2's working
#: set (the context stage holds several float64 copies of a block) whatever the slide width
PASS2_COLS = 512


def _pass2_band(enc, base, r0: int, r1: int, H: int, W: int, ctx: int,
                skip: np.ndarray | None, cols: int | None = None) -> np.ndarray:
    """float16 (r1 - r0, W, dim) features of one band: context over the base array ``base``
    (zarr, (H, W, base_dim)), block by block of ``cols`` superpixel columns, each read with
    a ``ctx`` superpixel halo on all sides (zeros and ``valid`` = 0 beyond the image), so
    the result does not depend on the block size; ``skip`` (W,) bool: columns set to zero
    (tiles away from tissue)."""
    cols = int(cols or PASS2_COLS)
    a0, a1 = max(r0 - ctx, 0), min(r1 + ctx, H)
    pad0 = ctx - (r0 - a0)
    rows = (r1 - r0) + 2 * ctx
    out = None
    for c0 in range(0, W, cols):
        c1 = min(c0 + cols, W)
        if skip is not None and skip[c0:c1].all():
            continue
        b0, b1 = max(c0 - ctx, 0), min(c1 + ctx, W)
        left = ctx - (c0 - b0)
        blk = np.zeros((rows, (c1 - c0) + 2 * ctx, enc.base_dim), np.float32)
        blk[pad0: pad0 + a1 - a0, left: left + b1 - b0] = base[a0:a1, b0:b1]
        valid = np.zeros(blk.shape[:2], np.float32)
        valid[pad0: pad0 + a1 - a0, left: left + b1 - b0] = 1.0
        f = enc.add_context(blk, valid)[ctx: ctx + r1 - r0, ctx: ctx + c1 - c0]
        if out is None:
            out = np.zeros((r1 - r0, W, f.shape[2]), np.float16)
        out[:, c0:c1] = f
    if out is None:  # nothing to encode in this band
        out = np.zeros((r1 - r0, W, int(enc.dim)), np.float16)
    if skip is not None:
        out[:, skip] = 0.0
    return out


def _band_rows(b: int, tile_sp: int, H: int) -> tuple[int, int]:
    return b * tile_sp, min((b + 1) * tile_sp, H)


def _check_params(enc, expected: dict) -> None:
    got = _encoder_params(enc)
    if json.dumps(got, sort_keys=True, default=str) != json.dumps(expected, sort_keys=True,
                                                                  default=str):
        raise RuntimeError(
            f"a Dask worker built encoder {getattr(enc, 'name', '?')!r} with parameters {got} "
            f"but the run expects {expected}: workers differ (device, precision or weights); "
            "pass device=/precision=/weights= explicitly or use identical workers"
        )


def _task_pass1(name, kwargs, params, image, um, work, b, tile_sp, H, W, cols, width, hb,
                white, two_stage, threads) -> int:
    """Dask task: pass 1 of band ``b`` written into ``work`` (its own chunk row)."""
    import zarr

    from ..cluster import torch_threads

    enc = _worker_encoder(name, kwargs)
    _check_params(enc, params)
    r0, r1 = _band_rows(b, tile_sp, H)
    with torch_threads(threads):
        band = _pass1_band(enc, image, um, r0, r1, cols, W, width, hb, white, two_stage)
    target = zarr.open_group(str(work), mode="r+")["base" if two_stage else "features"]
    target[r0:r1] = band.astype(target.dtype)
    (Path(work) / "_done" / f"p1_{b}").touch()
    return len(cols)


def _task_pass2(name, kwargs, params, work, b, tile_sp, H, W, ctx, skip) -> int:
    """Dask task: pass 2 (context) of band ``b`` written into ``work``."""
    import zarr

    enc = _worker_encoder(name, kwargs)
    _check_params(enc, params)
    root = zarr.open_group(str(work), mode="r+")
    r0, r1 = _band_rows(b, tile_sp, H)
    root["features"][r0:r1] = _pass2_band(enc, root["base"], r0, r1, H, W, ctx, skip)
    (Path(work) / "_done" / f"p2_{b}").touch()
    return 1


def _local_info(enc, name) -> dict:
    two = _is_two_stage(enc)
    return {
        "name": getattr(enc, "name", str(name)), "dim": int(enc.dim),
        "context_sp": int(getattr(enc, "context_sp", 0)), "params": _encoder_params(enc),
        "two_stage": two, "base_dim": int(enc.base_dim) if two else None,
        "base_halo_sp": int(enc.base_halo_sp) if two else None, "white": None,
        "feature_names": list(getattr(enc, "feature_names", [])),
    }


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
    scheduler=None,
    **encoder_kwargs,
) -> FeatureMap:
    """Per-superpixel features of ``section`` as an on-disk :class:`FeatureMap`.

    ``encoder``: a registered name (parameters in ``encoder_kwargs``) or an encoder object.
    ``n_jobs``: threads for tile encoding (default: up to 2); results do not depend on it.
    ``scheduler``: encode the bands on Dask (``"local"``, an address or a Client, see
    :mod:`histosr.cluster`); the encoder must then be given by name. The result does not
    depend on it. See the module docstring for where the output goes, caching and resuming.
    """
    import contextlib

    tile_sp = int(tile_sp)
    if tile_sp < 1:
        raise InputError(f"tile_sp must be >= 1 superpixel, got {tile_sp}")
    if scheduler is not None and not isinstance(encoder, str):
        raise InputError(
            "with scheduler= the encoder must be given by its registry name (e.g. 'uni') and "
            "its parameters as keyword arguments, so that each Dask worker builds its own; "
            f"got an encoder object {type(encoder).__name__}"
        )
    from .ssl import resolve

    # a slide-trained encoder ("ssl") is trained on this section first (or its cached
    # weights loaded) and becomes "ssl:<weights file>", which Dask workers can build
    encoder, encoder_kwargs = resolve(encoder, section, cache_dir, encoder_kwargs, progress)
    with contextlib.ExitStack() as stack:
        client = None
        if scheduler is not None:
            from ..cluster import dask_client

            client = stack.enter_context(dask_client(scheduler))
            enc = None  # built on the workers only
            info = client.submit(_encoder_info, encoder, dict(encoder_kwargs),
                                 pure=False).result()
        else:
            enc = get_encoder(encoder, **encoder_kwargs) if isinstance(encoder, str) \
                else encoder
            info = _local_info(enc, encoder)
        return _compute(section, enc, info, encoder, encoder_kwargs, out, cache_dir, tile_sp,
                        progress, mask, tissue_only, n_jobs, client)


def _compute(section, enc, info, enc_spec, enc_kwargs, out, cache_dir, tile_sp, progress,
             mask, tissue_only, n_jobs, client) -> FeatureMap:
    import zarr
    from tqdm.auto import tqdm

    from ..tissue import TISSUE_VERSION, section_tissue_mask

    enc_name = info["name"]
    grid = grid_for(section)
    H, W = grid.shape
    D = info["dim"]
    ctx = info["context_sp"]
    two_stage = info["two_stage"]
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (H, W):
            raise InputError(f"mask shape {mask.shape} != superpixel grid shape {(H, W)}")
    params = info["params"]
    key = feature_key(
        section.image, section.um_per_px, enc_name, params, tile_sp,
        extra={"tissue_only": bool(tissue_only),
               "mask": f"tissue-v{TISSUE_VERSION}" if mask is None else digest(mask)},
    )

    # -- where the result goes; reuse a complete one ------------------------------------
    if cache_dir is None and os.environ.get(CACHE_ENV):  # one cache shared by every run
        cache_dir = os.environ[CACHE_ENV]
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
            mask = section_tissue_mask(section)

    meta = {
        "cache_key": key, "encoder_params": params, "tile_sp": tile_sp,
        "tissue_only": bool(tissue_only), "section": section.name,
        "feature_names": info["feature_names"],
    }
    attrs = {"encoder": enc_name, "meta": meta, "um_per_px": grid.um_per_px,
             "image_shape": list(grid.image_shape)}
    if wattrs is None:
        root = zarr.open_group(str(work), mode="w")
        # one chunk row per band of tiles: a band's writer never touches another's chunks
        chunks = (min(H, tile_sp), min(W, _MAX_CHUNK_COLS))
        create_zarr_array(root, "features", (H, W, D), chunks + (D,), "f2")
        m = create_zarr_array(root, "mask", (H, W), (min(H, 1024), min(W, 1024)), "bool")
        m[:] = mask
        if two_stage:
            bd = info["base_dim"]
            create_zarr_array(root, "base", (H, W, bd), chunks + (bd,), "f4")
        root.attrs["histosr"] = json.dumps(attrs)
        done_dir.mkdir(parents=True, exist_ok=True)
    root = zarr.open_group(str(work), mode="r+")

    n_bands, n_cols = -(-H // tile_sp), -(-W // tile_sp)
    encode = (_tiles_to_encode(mask, tile_sp, ctx) if tissue_only
              else np.ones((n_bands, n_cols), bool))
    um = section.um_per_px
    image = section.image

    def band_done(tag, b):
        return (done_dir / f"{tag}_{b}").exists()

    def band_cols(b):
        return [(c * tile_sp, min((c + 1) * tile_sp, W)) for c in range(n_cols) if encode[b, c]]

    def band_skip(b):
        return ~np.repeat(encode[b], tile_sp)[:W] if tissue_only else None

    if two_stage:
        hb, width = info["base_halo_sp"], info["base_dim"]
        white = info["white"] if info["white"] is not None else _white_base(enc)
    else:
        hb, width, white = ctx, D, None

    todo = [b for b in range(n_bands) if not band_done("p1", b)]
    bar = tqdm(total=int(encode[todo].sum()) if todo else 0, disable=not progress,
               desc=f"features {section.name} ({enc_name})", unit="tile")
    if client is not None:
        _run_dask(client, bar, progress, enc_spec, enc_kwargs, params, image, um, work,
                  todo, tile_sp, H, W, width, hb, white, two_stage, ctx, n_bands,
                  band_cols, band_skip, band_done, info.get("uses_torch", False))
    else:
        n_jobs = n_jobs or min(2, os.cpu_count() or 1)
        pool = ThreadPoolExecutor(n_jobs) if n_jobs > 1 else None
        try:
            target = root["base"] if two_stage else root["features"]
            # pass 1: tiles -> base features (two-stage) or final features
            for b in todo:
                r0, r1 = _band_rows(b, tile_sp, H)
                band = _pass1_band(enc, image, um, r0, r1, band_cols(b), W, width, hb, white,
                                   two_stage, pool.map if pool else map,
                                   lambda: bar.update(1))
                target[r0:r1] = band.astype(target.dtype)
                (done_dir / f"p1_{b}").touch()
            bar.close()
        finally:
            if pool:
                pool.shutdown()
        # pass 2 (two-stage): context over base features with a halo of superpixel rows
        if two_stage:
            base, feats = root["base"], root["features"]
            for b in tqdm(range(n_bands), disable=not progress, desc="context", unit="band"):
                if band_done("p2", b):
                    continue
                r0, r1 = _band_rows(b, tile_sp, H)
                feats[r0:r1] = _pass2_band(enc, base, r0, r1, H, W, ctx, band_skip(b))
                (done_dir / f"p2_{b}").touch()

    # finalise: drop scratch, mark complete, rename into place
    if two_stage and "base" in root:
        shutil.rmtree(work / "base", ignore_errors=True)
    shutil.rmtree(done_dir, ignore_errors=True)
    zarr.open_group(str(work), mode="r+").attrs["histosr"] = json.dumps(attrs)
    shutil.rmtree(path, ignore_errors=True)
    work.rename(path)
    return FeatureMap.load(path)


def _run_dask(client, bar, progress, name, kwargs, params, image, um, work, todo, tile_sp,
              H, W, width, hb, white, two_stage, ctx, n_bands, band_cols, band_skip,
              band_done, uses_torch) -> None:
    """Both passes as Dask tasks, one band per task; pass 2 after all of pass 1."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    from ..cluster import caller_torch_threads

    kwargs = dict(kwargs)
    threads = caller_torch_threads() if uses_torch else None
    [image_f] = client.scatter([image], broadcast=True) if _is_in_memory(image) else [image]
    futs = [client.submit(_task_pass1, name, kwargs, params, image_f, um, str(work), b,
                          tile_sp, H, W, band_cols(b), width, hb, white, two_stage,
                          threads, pure=False)
            for b in todo]
    for f in as_completed(futs):
        bar.update(f.result())
    bar.close()
    if not two_stage:
        return
    todo2 = [b for b in range(n_bands) if not band_done("p2", b)]
    futs = [client.submit(_task_pass2, name, kwargs, params, str(work), b, tile_sp, H, W, ctx,
                          band_skip(b), pure=False) for b in todo2]
    bar2 = tqdm(total=len(todo2), disable=not progress, desc="context", unit="band")
    for f in as_completed(futs):
        bar2.update(f.result())
    bar2.close()


def _is_in_memory(image) -> bool:
    """An image without a path (arrays): sent once to every worker rather than per task."""
    return getattr(image, "path", None) is None
