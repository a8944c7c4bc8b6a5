"""SpatialData zarr stores: read one (image + table) as a Section; write predictions.

Needs the optional ``spatialdata`` package (``pip install 'histosr[spatialdata]'``).
Coordinates in a Section are pixels of its image (x = column, y = row); SpatialData
elements carry their own transformations, so reading maps every spot into the image's
pixels through the chosen coordinate system. Stores written by :func:`write_spatialdata`
use full-resolution image pixels as the ``"global"`` coordinate system and add ``"um"``
(a scale by the pixel size).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ..geometry import SP_UM
from ..image import ImageSource
from ..section import PLATFORM_DIAMETER_UM, Section, SectionError, make_counts, validate
from ._common import MissingFileError, PathLike

HINT = "install it with: pip install 'histosr[spatialdata]'"


def _sd():
    try:
        import spatialdata
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"SpatialData I/O needs the 'spatialdata' package: {HINT}") from e
    return spatialdata


class XarrayImage(ImageSource):
    """A lazy (c, y, x) xarray/dask image (a SpatialData image element, level 0)."""

    def __init__(self, data_array):
        if tuple(data_array.dims) != ("c", "y", "x"):
            data_array = data_array.transpose("c", "y", "x")
        self.array = data_array
        _, h, w = data_array.shape
        self._shape = (int(h), int(w), 3)

    @property
    def shape(self):
        return self._shape

    def _read(self, y0, x0, y1, x1):
        a = np.asarray(self.array[:3, y0:y1, x0:x1].values).transpose(1, 2, 0)
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        if a.dtype != np.uint8:
            hi = 65535.0 if a.dtype == np.uint16 else (1.0 if a.dtype.kind == "f" else 255.0)
            a = np.clip(a.astype(np.float64) * (255.0 / hi), 0, 255).astype(np.uint8)
        return a


def _level0(element):
    """The full-resolution DataArray of a (possibly multiscale) image element."""
    if hasattr(element, "children") and len(element.children):  # DataTree pyramid
        lvl = element["scale0"] if "scale0" in element.children else next(
            iter(element.children.values()))
        ds = lvl.ds if hasattr(lvl, "ds") else lvl.to_dataset()
        return next(iter(ds.data_vars.values()))
    return element


def _affine(element, cs: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")),
                      dtype=np.float64)


def _pick(names, key, what: str, path, prefer=()) -> str:
    names = list(names)
    if key is not None:
        if key not in names:
            raise SectionError(f"{path}: no {what} {key!r}; {what}s are {names}")
        return key
    if len(names) == 1:
        return names[0]
    for p in prefer:
        hits = [n for n in names if p in n.lower()]
        if len(hits) == 1:
            return hits[0]
    raise SectionError(f"{path} holds {len(names)} {what}s {names}: pass {what}_key= to choose"
                       if names else f"{path} holds no {what}: expected at least one")


def read_spatialdata(
    path: PathLike,
    image_key: str | None = None,
    table_key: str | None = None,
    um_per_px: float | None = None,
    *,
    coordinate_system: str | None = None,
    spot_diameter_um: float | None = None,
    platform: str | None = None,
    layer: str | None = None,
    name: str | None = None,
) -> Section:
    """Read a SpatialData zarr store (``spatialdata.read_zarr``) as a Section.

    The table (``table_key``; default the only one) gives the counts (``layers[layer]``, else
    ``layers["counts"]``, else ``X``: raw counts). Spot positions come from the shapes element
    the table annotates (circle centres or polygon centroids, through the elements'
    transformations into ``image_key``'s pixels), else from ``obsm["spatial"]`` taken as image
    pixels. Pixel size: ``um_per_px``, else the store's histosr attrs, else the image's
    transformation to a ``"um"`` coordinate system; otherwise an error asks for it. Spot
    diameter: ``spot_diameter_um``, else circle radii, else the platform default.
    """
    sd = _sd()
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"SpatialData store not found: {p}")
    try:
        sdata = sd.read_zarr(p)
    except Exception as e:  # noqa: BLE001 - zarr / spatialdata raise many types
        raise SectionError(f"could not read {p} as a SpatialData zarr store: {e}") from e
    attrs = dict(getattr(sdata, "attrs", {}) or {}).get("histosr", {}) or {}
    ikey = _pick(sdata.images.keys(), image_key or attrs.get("image_key"), "image", p,
                 prefer=("hires", "he", "full"))
    tkey = _pick(sdata.tables.keys(), table_key or attrs.get("table_key"), "table", p)
    img_el = sdata.images[ikey]
    table = sdata.tables[tkey]
    css = list(_sd().transformations.get_transformation(img_el, get_all=True).keys())
    cs = coordinate_system or ("global" if "global" in css else css[0])
    if cs not in css:
        raise SectionError(f"image {ikey!r} is not in coordinate system {cs!r} (it is in {css})")
    to_img = np.linalg.inv(_affine(img_el, cs))

    sattrs = table.uns.get("spatialdata_attrs", {})
    region, rkey, ikey_col = (sattrs.get("region"), sattrs.get("region_key"),
                              sattrs.get("instance_key"))
    regions = [region] if isinstance(region, str) else list(region or [])
    shapes_keys = [r for r in regions if r in sdata.shapes]
    radius_px = None
    if shapes_keys:
        skey = shapes_keys[0]
        if len(regions) > 1:
            table = table[table.obs[rkey].astype(str) == skey]
        shapes = sdata.shapes[skey]
        geom = shapes.geometry
        if (geom.geom_type == "Point").all():
            pts = np.stack([geom.x.to_numpy(), geom.y.to_numpy()], axis=1)
            if "radius" in shapes.columns:
                radius_px = shapes["radius"].to_numpy(np.float64)
        else:
            c = geom.centroid
            pts = np.stack([c.x.to_numpy(), c.y.to_numpy()], axis=1)
        pos = pd.Index(shapes.index).get_indexer(pd.Index(table.obs[ikey_col].to_numpy()))
        if (pos < 0).any():
            raise SectionError(f"{p}: {int((pos < 0).sum())} rows of table {tkey!r} have no "
                               f"shape in {skey!r} (instance key {ikey_col!r})")
        M = to_img @ _affine(shapes, cs)
        xy = pts[pos] @ M[:2, :2].T + M[:2, 2]
        lin = float(np.sqrt(abs(np.linalg.det(M[:2, :2]))))
        if radius_px is not None:
            radius_px = radius_px[pos] * lin
        src = f"shapes {skey!r}"
    elif "spatial" in table.obsm:
        xy = np.asarray(table.obsm["spatial"], dtype=np.float64)[:, :2]
        src = 'table obsm["spatial"] (taken as image pixels)'
    else:
        raise SectionError(f"{p}: table {tkey!r} annotates no shapes element and has no "
                           'obsm["spatial"]: expected spot positions in one of them')

    if um_per_px is None:
        um_per_px = attrs.get("um_per_px")
        if um_per_px is None and "um" in css:
            um_per_px = float(np.sqrt(abs(np.linalg.det(_affine(img_el, "um")[:2, :2]))))
        if um_per_px is None:
            raise SectionError(f"pixel size of image {ikey!r} unknown: pass um_per_px (microns "
                               "per pixel of that image)")
    platform = platform or attrs.get("platform", "unknown")
    if spot_diameter_um is None:
        spot_diameter_um = attrs.get("spot_diameter_um")
    if spot_diameter_um is None and radius_px is not None:
        spot_diameter_um = float(np.median(radius_px)) * 2.0 * float(um_per_px)
    if spot_diameter_um is None:
        spot_diameter_um = PLATFORM_DIAMETER_UM.get(platform)
    if spot_diameter_um is None:
        raise SectionError("spot diameter unknown: pass spot_diameter_um (um)")
    if layer is not None and layer not in table.layers:
        raise SectionError(f"table {tkey!r} has no layer {layer!r}; layers: {list(table.layers)}")
    layer = layer or ("counts" if "counts" in table.layers else None)
    X = table.layers[layer] if layer else table.X
    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    keep_cols = [c for c in table.obs.columns if c not in (rkey, ikey_col)]
    counts = make_counts(X, table.obs_names, table.var_names, xy, obs=table.obs[keep_cols])
    section = Section(
        name=name or p.stem, image=XarrayImage(_level0(img_el)), um_per_px=float(um_per_px),
        counts=counts, spot_diameter_um=float(spot_diameter_um), platform=platform,
        meta={"reader": "spatialdata", "path": str(p), "image_key": ikey, "table_key": tkey,
              "coordinate_system": cs, "coordinates": src, "layer": layer},
    )
    return validate(section)


# ------------------------------------------------------------------------------- writing
def _dask_image(image: ImageSource, chunk: int = 2048):
    """(c, y, x) dask array reading the image tile by tile (never whole in memory)."""
    import dask.array as da
    from dask import delayed

    arr = getattr(image, "array", None)
    if isinstance(arr, np.ndarray):
        return da.from_array(np.ascontiguousarray(arr[..., :3].transpose(2, 0, 1)),
                             chunks=(3, chunk, chunk))
    h, w = image.shape[:2]
    rows = []
    for y in range(0, h, chunk):
        row = []
        for x in range(0, w, chunk):
            hh, ww = min(chunk, h - y), min(chunk, w - x)
            row.append(da.from_delayed(delayed(image.read)(y, x, hh, ww), (hh, ww, 3), np.uint8))
        # explicit axes: da.block would join (h, w, 3) tiles along the LAST axes, which fails
        # (or mixes channels in) as soon as an edge tile is narrower than the chunk
        rows.append(da.concatenate(row, axis=1))
    return da.concatenate(rows, axis=0).transpose(2, 0, 1)


def _table(adata, region: str):
    from spatialdata.models import TableModel

    # SpatialData tables live in memory: a backed prediction (histosr run's) is read here
    t = adata.to_memory() if adata.isbacked else adata.copy()
    t.obs = t.obs.copy()
    t.obs["region"] = pd.Categorical([region] * t.n_obs)
    t.obs["instance_id"] = np.arange(t.n_obs)
    return TableModel.parse(t, region=region, region_key="region", instance_key="instance_id")


def _flat(chunks) -> tuple[int, ...]:
    return tuple(int(c[0]) if isinstance(c, (tuple, list)) else int(c) for c in chunks)


def _write_flat_chunks(sd, images: dict, shapes: dict, tables: dict, attrs: dict,
                       path: Path) -> None:
    """Fallback writer: everything but the images through ``SpatialData.write``, then each
    image through spatialdata's raster writer with flat per-level chunk shapes."""
    import zarr
    from spatialdata._io import write_image
    from spatialdata._io.io_zarr import _get_groups_for_element

    rest = sd.SpatialData(shapes=shapes, tables=tables)
    rest.attrs.update(attrs)
    rest.write(path)
    for name, el in images.items():
        _, _, group = _get_groups_for_element(zarr_path=path, element_type="images",
                                              element_name=name, use_consolidated=False)
        if hasattr(el, "children") and len(el.children):
            # the pyramid writer ignores storage_options: keep the full-resolution level
            from spatialdata.models import Image2DModel
            from spatialdata.transformations import get_transformation

            lvl = _level0(el)
            el = Image2DModel.parse(lvl.data, dims=lvl.dims, c_coords=list(lvl.coords["c"].values),
                                    transformations=get_transformation(el, get_all=True))
        write_image(image=el, group=group, name=name, storage_options={"chunks": _flat(el.chunks)})
    zarr.consolidate_metadata(str(path))


def write_spatialdata(
    path: PathLike,
    section: Section,
    prediction=None,
    *,
    image: bool = True,
    spots: bool = True,
    superpixels: bool = True,
    spot_table: bool = True,
    pyramid: bool | None = None,
) -> Path:
    """Write a SpatialData zarr store next to the AnnData outputs, atomically.

    Elements: ``image`` (the section's H&E, (c, y, x) uint8, a pyramid when larger than
    4096 px unless ``pyramid=False``), ``spots`` (circles of the spot diameter at the spot
    centres) with table ``spot_counts`` (the measured counts), ``superpixels`` (8 um squares of the
    predicted superpixels) with table ``prediction`` (counts per superpixel; a spot-level
    prediction annotates ``spots`` instead). Coordinate systems: ``"global"`` = full-res px,
    ``"um"`` = microns. Returns the path.
    """
    sd = _sd()
    import shapely
    from geopandas import GeoDataFrame
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Identity, Scale

    um = float(section.um_per_px)
    tf = {"global": Identity(), "um": Scale([um, um], axes=("x", "y"))}
    images, shapes, tables = {}, {}, {}
    if image:
        h, w = section.image.shape[:2]
        big = max(h, w) > 4096 if pyramid is None else pyramid
        n_lvl = int(np.floor(np.log2(max(h, w) / 1024))) if big else 0
        images["image"] = Image2DModel.parse(
            _dask_image(section.image), dims=("c", "y", "x"), c_coords=["r", "g", "b"],
            transformations=tf, scale_factors=[2] * n_lvl if n_lvl > 0 else None)
    spot_level = prediction is not None and "row" not in prediction.obs
    if spots or spot_table or spot_level:
        r = section.spot_radius_px
        shapes["spots"] = ShapesModel.parse(section.xy, geometry=0,
                                            radius=np.full(section.n_spots, r),
                                            index=np.arange(section.n_spots), transformations=tf)
        if spot_table:
            tables["spot_counts"] = _table(section.counts, "spots")
    if prediction is not None:
        if spot_level:
            missing = [s for s in prediction.obs_names if s not in section.counts.obs_names]
            if missing:
                raise InputError(f"spot-level prediction holds spots that are not the section's "
                                 f"own (e.g. {missing[:3]}): write superpixel predictions, or "
                                 "predictions at the section's spots")
            order = section.counts.obs_names.get_indexer(prediction.obs_names)
            t = _table(prediction, "spots")
            t.obs["instance_id"] = order
            tables["prediction"] = t
        else:
            size = SP_UM / float(prediction.uns.get("histosr", {}).get("um_per_px", um))
            rr = prediction.obs["row"].to_numpy(np.float64)
            cc = prediction.obs["col"].to_numpy(np.float64)
            if superpixels:
                boxes = shapely.box(cc * size, rr * size, (cc + 1) * size, (rr + 1) * size)
                shapes["superpixels"] = ShapesModel.parse(
                    GeoDataFrame(geometry=boxes, index=np.arange(prediction.n_obs)),
                    transformations=tf)
                tables["prediction"] = _table(prediction, "superpixels")
            else:
                t = prediction.copy()
                tables["prediction"] = t
    sdata = sd.SpatialData(images=images, shapes=shapes, tables=tables)
    sdata.attrs["histosr"] = {
        "um_per_px": um, "spot_diameter_um": float(section.spot_diameter_um),
        "platform": section.platform, "section": section.name, "image_key": "image",
        "table_key": "spot_counts" if "spot_counts" in tables else "prediction",
        "units": "global = full-resolution px (x = column, y = row); um = microns",
    }
    return save_spatialdata(sdata, path)


def save_spatialdata(sdata, path: PathLike) -> Path:
    """``sdata.write`` to ``path`` atomically (temp folder + rename, replacing ``path``).

    Works around spatialdata 0.7 with ome-zarr >= 0.14, which pass dask chunk grids where
    zarr wants flat chunk shapes (scverse/spatialdata#1090): on that error the images are
    written through spatialdata's raster writer with flat chunks."""
    sd = _sd()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        sdata.write(tmp)
    except TypeError as e:
        if "iterable of integers" not in str(e) or not len(sdata.images):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        _write_flat_chunks(sd, dict(sdata.images), dict(sdata.shapes), dict(sdata.tables),
                           dict(sdata.attrs), tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


__all__ = ["read_spatialdata", "write_spatialdata", "save_spatialdata", "XarrayImage"]
