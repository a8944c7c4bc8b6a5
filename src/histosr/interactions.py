"""Ligand-receptor co-localisation on measured spots and on super-resolved maps.

The statistics are LIANA+'s bivariate spatial metrics (``liana.mt.bivariate``; Dimitrov et
al., Nat Cell Biol 2024; the Moran's R of SpatialDM, Li et al. 2023), and the pairs come
from a ligand-receptor resource that ships inside the ``liana`` package (default
``"consensus"``; nothing is downloaded) or from the user's own table.

- Expression: log1p CP10k per observation; the library is the total count over the
  AnnData's genes (or ``genes=``). A multi-subunit complex (``ITGA1_ITGB1`` in the
  resource) takes the minimum of its subunits (LIANA's rule).
- Spatial weights: Gaussian kernel of the physical distance, ``w = exp(-d^2 / (2 h^2))``
  with ``h = bandwidth_um`` (default 100 um); weights below 0.1 are dropped (support
  2.15 h: every neighbour inside it is kept) and an observation's own weight is 1, so a
  ligand and a receptor in the same spot or bin count. Distances are
  ``obsm["spatial"]`` (full-resolution px, x = column, y = row) times ``um_per_px``.
- Global score per pair: bivariate Moran's R (ligand and receptor centred and scaled to
  unit norm, weights scaled to sum to the number of observations; with self weights only it
  is the Pearson correlation). p-value: one-sided permutation test for positive
  co-localisation; the observations' locations are shuffled ``n_perms`` times (ligand and
  receptor of an observation move together: LIANA's null), ``p = (1 + #{R_perm >= R}) /
  (n_perms + 1)``; ``q`` = Benjamini-Hochberg over the pairs tested. Pairs are ranked by p,
  then by R (highest first).
- Local score for the top pairs: local bivariate Moran's R, ``r_i = x_i (W y)_i + y_i
  (W x)_i`` of the scaled expression; category 1 where the neighbourhood means of both the
  ligand and the receptor are above average, -1 where both are below, 0 otherwise. Maps
  (:func:`histosr.pl.interaction_map`) show r where the category is 1 (hot spots).

Bounded memory: a superpixel AnnData (``obs`` ``row``/``col``) is aggregated before the
analysis. Counts are summed over square bins of k x k superpixels, k the smallest integer
with a bin of at least ``bandwidth_um / 3`` (so the kernel spans at most ~130 bins, which
bounds the cost of each permutation) and at most ``max_obs`` bins (default 20,000). ``X`` is
read in row chunks (a backed ``anndata.read_h5ad(path, backed="r")`` works) and only the
genes of the resource's pairs are kept, so memory grows with bins x resource genes, not with
superpixels x genes. Local scores computed per bin are copied to every superpixel of the
bin. Spot AnnData with more than ``max_obs`` spots are binned the same way on a square
lattice in um; smaller ones are analysed spot by spot.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError

BANDWIDTH_UM = 100.0
KERNEL = "gaussian"
CUTOFF = 0.1  # kernel weights below this are dropped (LIANA's default)
BINS_PER_BANDWIDTH = 3.0  # superpixel bins are at least bandwidth / 3 wide
SEP = "^"  # LIANA's ligand^receptor separator
COMPLEX_SEP = "_"


# -- the ligand-receptor resource -----------------------------------------------------------
def resources() -> list[str]:
    """Names of the ligand-receptor resources shipped inside ``liana``."""
    import liana as li

    return [str(r) for r in li.rs.show_resources()]


def resource_table(resource: str | pd.DataFrame | os.PathLike = "consensus") -> pd.DataFrame:
    """Ligand-receptor pairs as a DataFrame with columns ``ligand``, ``receptor`` (gene
    symbols; a complex joins its subunits with ``_``, e.g. ``ITGA1_ITGB1``).

    ``resource``: the name of a resource shipped with ``liana`` (:func:`resources`), a
    DataFrame, or a CSV/TSV file with columns ``ligand`` and ``receptor`` (other columns are
    ignored)."""
    if isinstance(resource, pd.DataFrame):
        df = resource
        where = "the resource DataFrame"
    elif isinstance(resource, (str, os.PathLike)) and Path(resource).suffix.lower() in (
            ".csv", ".tsv", ".txt"):
        p = Path(resource)
        if not p.is_file():
            raise FileNotFoundError(f"ligand-receptor table not found: {p}")
        df = pd.read_csv(p, sep="\t" if p.suffix.lower() != ".csv" else ",")
        where = str(p)
    elif isinstance(resource, str):
        names = resources()
        if resource.lower() not in names:
            raise InputError(f"unknown ligand-receptor resource {resource!r}: expected one of "
                             f"{names} (shipped with liana) or a table with columns "
                             "ligand, receptor")
        import liana as li

        df = li.rs.select_resource(resource.lower())
        where = f"resource {resource!r}"
    else:
        raise InputError(f"resource must be a name, a DataFrame or a CSV/TSV path, got "
                         f"{type(resource).__name__}")
    missing = [c for c in ("ligand", "receptor") if c not in df.columns]
    if missing:
        raise InputError(f"{where} lacks the column(s) {missing}: expected columns ligand, "
                         f"receptor (got {list(df.columns)[:6]})")
    df = df[["ligand", "receptor"]].dropna().astype(str).drop_duplicates()
    df = df[df["ligand"] != df["receptor"]].reset_index(drop=True)
    if df.empty:
        raise InputError(f"{where} has no ligand-receptor pair")
    return df


def _subunits(name: str) -> list[str]:
    return name.split(COMPLEX_SEP)


def measured_pairs(res: pd.DataFrame, genes) -> pd.DataFrame:
    """The pairs of ``res`` whose every subunit is in ``genes``."""
    have = set(map(str, genes))
    ok = [all(g in have for g in _subunits(lig) + _subunits(rec))
          for lig, rec in zip(res["ligand"], res["receptor"])]
    return res[np.asarray(ok, dtype=bool)].reset_index(drop=True)


def _check_measured(res: pd.DataFrame, genes, what: str) -> pd.DataFrame:
    pairs = measured_pairs(res, genes)
    if pairs.empty:
        genes = list(map(str, genes))
        raise InputError(
            f"none of the {len(res)} ligand-receptor pairs of {what} has all its genes among "
            f"the {len(genes)} genes of the data (e.g. {genes[:5]}): expected gene symbols "
            "that match the resource (human symbols such as CXCL12, CXCR4 for 'consensus'; "
            "'mouseconsensus' for mouse), or pass resource= a table of your own pairs")
    return pairs


# -- observations: spots, or superpixels aggregated into bins ------------------------------
@dataclass
class Units:
    """What the statistics run on: spots, or bins of superpixels (counts summed)."""

    X: np.ndarray  # (n_units, n_genes) float32 log1p CP10k
    genes: list[str]
    xy_px: np.ndarray  # (n_units, 2) mean full-res px (x, y) of the members
    of_obs: np.ndarray | None  # (n_obs,) unit of each observation; None: one unit per obs
    um_per_px: float
    bin_um: float  # 0: not aggregated

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def info(self, n_obs: int) -> dict:
        return {"n_observations": int(n_obs), "n_units": int(self.n),
                "aggregated": self.of_obs is not None, "bin_um": float(self.bin_um)}


def _um_per_px(adata, um_per_px: float | None) -> float:
    if um_per_px is not None:
        v = float(um_per_px)
    else:
        v = adata.uns.get("histosr", {}).get("um_per_px")
        if v is None:
            raise InputError("interactions need the pixel size to turn obsm['spatial'] (px) "
                             "into um: pass um_per_px= (uns['histosr']['um_per_px'] is absent)")
        v = float(v)
    if not (0.01 <= v <= 100) or not np.isfinite(v):
        raise InputError(f"um_per_px={v!r} is implausible: expected microns per full-resolution "
                         "pixel (0.1-10 for H&E)")
    return v


def _is_grid(adata) -> bool:
    return "row" in adata.obs and "col" in adata.obs


def _bin_keys(adata, um_per_px: float, bandwidth_um: float, max_obs: int,
              bin_um: float | None) -> tuple[np.ndarray | None, float]:
    """Per-observation bin key (None: no aggregation) and the bin side in um."""
    n = adata.n_obs
    if _is_grid(adata):
        sp_um = float(adata.uns.get("histosr", {}).get("superpixel_um", 8.0))
        r = adata.obs["row"].to_numpy().astype(np.int64)
        c = adata.obs["col"].to_numpy().astype(np.int64)
        r, c = r - r.min(), c - c.min()
        want = bin_um if bin_um is not None else bandwidth_um / BINS_PER_BANDWIDTH
        k = max(1, int(np.ceil(want / sp_um - 1e-9)))
        while True:
            key = (r // k) * (int(c.max()) // k + 1) + c // k
            if bin_um is not None or len(np.unique(key)) <= max_obs:
                break
            k += 1
        return (None, 0.0) if k == 1 else (key, k * sp_um)
    if bin_um is None and n <= max_obs:
        return None, 0.0
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64) * um_per_px
    xy = xy - xy.min(axis=0)
    if bin_um is None:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(xy).query(xy[: min(n, 5000)], k=2)
        b = max(float(np.median(d[:, 1])), 1e-3)
    else:
        b = float(bin_um)
    while True:
        ij = np.floor(xy / b).astype(np.int64)
        key = ij[:, 1] * (int(ij[:, 0].max()) + 1) + ij[:, 0]
        if bin_um is not None or len(np.unique(key)) <= max_obs:
            return key, b
        b *= 1.25


def _chunk_rows(n_vars: int) -> int:
    return max(256, int(2**24 // max(n_vars, 1)))  # ~64 MB of float32 per chunk


def _rows(X, a: int, b: int):
    x = X[a:b]
    return x.tocsr() if sp.issparse(x) else np.asarray(x)


def units(adata, genes: list[str], um_per_px: float, bandwidth_um: float = BANDWIDTH_UM,
          max_obs: int = 20000, bin_um: float | None = None,
          library_genes: list[str] | None = None) -> Units:
    """Log1p CP10k of ``genes`` per unit (spot or bin), reading ``X`` in row chunks (see the
    module docstring). The library is the total over ``library_genes`` (default: all genes
    of the AnnData)."""
    names = pd.Index(list(map(str, adata.var_names)))
    gidx = names.get_indexer(genes)
    lidx = None if library_genes is None else names.get_indexer(list(library_genes))
    n = adata.n_obs
    key, b_um = _bin_keys(adata, um_per_px, bandwidth_um, max_obs, bin_um)
    if key is None:
        of_obs, m = None, n
    else:
        _, of_obs = np.unique(key, return_inverse=True)
        of_obs = of_obs.ravel().astype(np.int64)
        m = int(of_obs.max()) + 1
    sums = np.zeros((m, len(genes)), dtype=np.float64)
    lib = np.zeros(m, dtype=np.float64)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    step = _chunk_rows(adata.n_vars)
    for a in range(0, n, step):
        b = min(a + step, n)
        x = _rows(adata.X, a, b)
        if sp.issparse(x):
            x = x.maximum(0) if x.min() < 0 else x
            lib_c = np.asarray((x if lidx is None else x[:, lidx]).sum(axis=1)).ravel()
            sel = x[:, gidx].toarray()
        else:
            x = np.clip(x, 0, None)
            lib_c = (x if lidx is None else x[:, lidx]).sum(axis=1, dtype=np.float64)
            sel = x[:, gidx]
        if of_obs is None:
            sums[a:b] = sel
            lib[a:b] = lib_c
        else:
            M = sp.csr_matrix((np.ones(b - a), (of_obs[a:b], np.arange(b - a))), shape=(m, b - a))
            sums += M @ sel.astype(np.float64)
            lib += M @ lib_c
    if of_obs is None:
        xy_u = xy
    else:
        cnt = np.bincount(of_obs, minlength=m).astype(np.float64)
        xy_u = np.stack([np.bincount(of_obs, xy[:, 0], m), np.bincount(of_obs, xy[:, 1], m)],
                        axis=1) / cnt[:, None]
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    L = np.log1p(sums * scale[:, None]).astype(np.float32)
    return Units(L, list(genes), xy_u, of_obs, um_per_px, b_um)


# -- LIANA+ ---------------------------------------------------------------------------------
def _support_um(bandwidth_um: float, kernel: str, cutoff: float) -> float:
    if kernel == "gaussian":
        return bandwidth_um * float(np.sqrt(2.0 * np.log(1.0 / cutoff)))
    if kernel == "exponential":
        return bandwidth_um * float(np.log(1.0 / cutoff))
    if kernel == "linear":
        return bandwidth_um * (1.0 - cutoff)
    if kernel == "misty_rbf":
        return bandwidth_um * float(np.sqrt(np.log(1.0 / cutoff)))
    raise InputError(f"kernel must be one of gaussian, exponential, linear, misty_rbf; "
                     f"got {kernel!r}")


def _liana_adata(u: Units, bandwidth_um: float, kernel: str, cutoff: float):
    """AnnData of the units for LIANA (X = log1p CP10k, coordinates in um) with the spatial
    weights in ``obsp["spatial_connectivities"]``: every neighbour inside the kernel's
    support, self weight 1."""
    import anndata as ad
    import liana as li
    from scipy.spatial import cKDTree

    xy = u.xy_px * u.um_per_px
    a = ad.AnnData(sp.csr_matrix(u.X), obs=pd.DataFrame(index=[str(i) for i in range(u.n)]),
                   var=pd.DataFrame(index=pd.Index(u.genes)))
    a.obsm["spatial"] = xy
    support = _support_um(bandwidth_um, kernel, cutoff)
    k = int(cKDTree(xy).query_ball_point(xy, support, return_length=True).max())
    W = li.ut.spatial_neighbors(a, bandwidth=float(bandwidth_um), cutoff=float(cutoff),
                                kernel=kernel, set_diag=True, max_neighbours=max(1, min(k, u.n - 1)),
                                inplace=False)
    W = sp.csr_matrix(W, dtype=np.float32)
    W.eliminate_zeros()
    a.obsp["spatial_connectivities"] = W
    return a


def global_scores(a, pairs: pd.DataFrame, n_perms: int, seed: int,
                  min_frac: float) -> pd.DataFrame:
    """Bivariate Moran's R per pair with permutation p-values and BH q-values, ranked."""
    import liana as li
    from scipy.stats import false_discovery_control

    try:
        with warnings.catch_warnings():  # LIANA's hints about raw counts / unused genes
            warnings.simplefilter("ignore")
            st = li.mt.bivariate(a, resource=pairs, local_name=None, global_name="morans",
                                 n_perms=int(n_perms), mask_negatives=True, seed=int(seed),
                                 nz_prop=float(min_frac), use_raw=False, verbose=False)
    except ValueError as e:
        if "non-zero" in str(e):
            raise InputError(f"no measured ligand-receptor pair has both partners detected in "
                             f">= {min_frac:.0%} of the observations: lower min_frac") from e
        raise
    st = pd.DataFrame(st)
    # LIANA's p is #{R_perm >= R} / n_perms; add the observed value to the null (never 0)
    p = (np.asarray(st["morans_pvals"], np.float64) * n_perms + 1.0) / (n_perms + 1.0)
    out = pd.DataFrame({
        "ligand": st["ligand"].astype(str).to_numpy(),
        "receptor": st["receptor"].astype(str).to_numpy(),
        "morans_r": np.asarray(st["morans"], np.float64),
        "pval": np.round(p, 12),
        "ligand_mean": np.asarray(st["ligand_means"], np.float64),
        "ligand_frac": np.asarray(st["ligand_props"], np.float64),
        "receptor_mean": np.asarray(st["receptor_means"], np.float64),
        "receptor_frac": np.asarray(st["receptor_props"], np.float64),
    }, index=pd.Index(st["interaction"].astype(str).to_numpy(), name="interaction"))
    out["qval"] = false_discovery_control(out["pval"].to_numpy(), method="bh")
    # ties (equal p and R) in name order, whatever order LIANA returned
    out = out.sort_index(kind="stable").sort_values(["pval", "morans_r"],
                                                    ascending=[True, False], kind="stable")
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out[["rank", "ligand", "receptor", "morans_r", "pval", "qval", "ligand_mean",
                "ligand_frac", "receptor_mean", "receptor_frac"]]


def local_scores(a, pairs: list[tuple[str, str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Local bivariate Moran's R and its categories (1: both high, -1: both low, 0: mixed)
    per unit, for ``pairs`` (columns ``ligand^receptor``, in the given order)."""
    import liana as li

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr = li.mt.bivariate(a, interactions=list(pairs), local_name="morans", global_name=None,
                             n_perms=None, mask_negatives=False, add_categories=True,
                             nz_prop=0.0, use_raw=False, verbose=False)
    names = [f"{lig}{SEP}{rec}" for lig, rec in pairs]
    score = pd.DataFrame(np.asarray(lr.X.toarray(), np.float32), columns=lr.var_names.astype(str))
    cats = pd.DataFrame(np.asarray(lr.layers["cats"].toarray(), np.int8),
                        columns=lr.var_names.astype(str))
    keep = [n for n in names if n in score.columns]
    return score[keep], cats[keep]


# -- the verbs ------------------------------------------------------------------------------
@dataclass
class _Side:
    adata: object
    units: Units
    a: object  # LIANA AnnData
    table: pd.DataFrame
    params: dict


def _check_args(bandwidth_um, kernel, cutoff, n_perms, min_frac, max_obs, bin_um) -> None:
    if not isinstance(n_perms, (int, np.integer)) or n_perms < 1:
        raise InputError(f"n_perms must be a positive integer (permutations), got {n_perms!r}")
    if not (bandwidth_um > 0):
        raise InputError(f"bandwidth_um must be > 0 um, got {bandwidth_um!r}")
    if not (0 < cutoff < 1):
        raise InputError(f"cutoff must be in (0, 1), got {cutoff!r}")
    _support_um(1.0, kernel, cutoff)
    if not (0 <= min_frac < 1):
        raise InputError(f"min_frac must be in [0, 1), got {min_frac!r}")
    if not (isinstance(max_obs, (int, np.integer)) and max_obs >= 10):
        raise InputError(f"max_obs must be an integer >= 10, got {max_obs!r}")
    if bin_um is not None and not (bin_um > 0):
        raise InputError(f"bin_um must be > 0 um (or None: automatic), got {bin_um!r}")


def _prepare(adata, resource, bandwidth_um, kernel, cutoff, n_perms, seed, min_frac, max_obs,
             bin_um, um_per_px, genes, what) -> _Side:
    _check_args(bandwidth_um, kernel, cutoff, n_perms, min_frac, max_obs, bin_um)
    res = resource_table(resource)
    names = list(map(str, adata.var_names))
    use = names if genes is None else [g for g in names if g in set(map(str, genes))]
    label = resource if isinstance(resource, str) else "the given resource"
    pairs = _check_measured(res, use, f"{label}")
    upp = _um_per_px(adata, um_per_px)
    need = sorted({g for n in pd.concat([pairs["ligand"], pairs["receptor"]]) for g in
                   _subunits(n)})
    u = units(adata, need, upp, bandwidth_um, int(max_obs), bin_um,
              None if genes is None or len(use) == len(names) else use)
    a = _liana_adata(u, bandwidth_um, kernel, cutoff)
    table = global_scores(a, pairs, n_perms, seed, min_frac)
    params = {"resource": label, "pairs_in_resource": int(len(res)),
              "pairs_measured": int(len(pairs)), "pairs_tested": int(len(table)),
              "bandwidth_um": float(bandwidth_um), "kernel": kernel, "cutoff": float(cutoff),
              "self_weight": 1.0, "n_perms": int(n_perms), "seed": int(seed),
              "min_frac": float(min_frac), "global": "bivariate Moran's R (LIANA+)",
              "local": "local bivariate Moran's R (LIANA+)", "what": what,
              **u.info(adata.n_obs)}
    return _Side(adata, u, a, table, params)


def _store(side: _Side, score: pd.DataFrame, cats: pd.DataFrame, key_added: str) -> None:
    """Local scores per unit -> ``obsm`` per observation (a bin's value to each of its
    superpixels); the global table and parameters -> ``uns``."""
    idx = side.units.of_obs
    if idx is not None:
        score, cats = score.iloc[idx], cats.iloc[idx]
    score.index = side.adata.obs_names
    cats.index = side.adata.obs_names
    side.adata.obsm[key_added] = score
    side.adata.obsm[f"{key_added}_cats"] = cats
    side.adata.uns[key_added] = {"global": side.table, "params": side.params,
                                 "local_pairs": list(score.columns)}


def _top_pairs(table: pd.DataFrame, n_top: int) -> list[tuple[str, str]]:
    t = table.head(int(n_top))
    return list(zip(t["ligand"], t["receptor"]))


def interactions(adata, resource: str | pd.DataFrame = "consensus", *,
                 bandwidth_um: float = BANDWIDTH_UM, kernel: str = KERNEL,
                 cutoff: float = CUTOFF, n_perms: int = 1000, seed: int = 0,
                 n_top: int = 20, min_frac: float = 0.05, max_obs: int = 20000,
                 bin_um: float | None = None, um_per_px: float | None = None,
                 genes: list[str] | None = None,
                 key_added: str = "interactions") -> pd.DataFrame:
    """Ligand-receptor co-localisation on a spot or superpixel AnnData (LIANA+ bivariate
    Moran's R; see the module docstring for the kernel, the null and the aggregation).

    ``adata``: counts in ``X`` (spots, or superpixels with ``obs`` ``row``/``col``; a backed
    AnnData is read in chunks), ``obsm["spatial"]`` in full-resolution px; the pixel size
    from ``um_per_px`` or ``uns["histosr"]["um_per_px"]``. ``resource``: a resource name
    shipped with liana, or a DataFrame / CSV / TSV with columns ``ligand``, ``receptor``.
    ``bandwidth_um``: Gaussian kernel sigma (um). ``min_frac``: both partners detected in at
    least this fraction of the units. ``genes``: restrict the analysis and the library to
    these genes.

    Writes ``uns[key_added]`` = {``global``: per-pair table (rank, ligand, receptor,
    ``morans_r``, ``pval``, ``qval`` (BH), expression mean and detected fraction of each
    partner), ``params``}, ``obsm[key_added]`` = local Moran's R of the ``n_top`` first pairs
    (one column per ``ligand^receptor``) and ``obsm[key_added + "_cats"]`` its categories.
    Returns the global table (ranked by p, then R)."""
    side = _prepare(adata, resource, bandwidth_um, kernel, cutoff, n_perms, seed, min_frac,
                    max_obs, bin_um, um_per_px, genes, "interactions")
    _store(side, *local_scores(side.a, _top_pairs(side.table, n_top)), key_added)
    return side.table


def _spot_means(units_xy_um: np.ndarray, values: np.ndarray, spots_xy_um: np.ndarray,
                radius_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of unit ``values`` (n_units, k) over the units whose centre lies within
    ``radius_um`` of each spot (the nearest unit when none does); returns the means
    (n_spots, k), the member units and their spot."""
    from scipy.spatial import cKDTree

    tree = cKDTree(units_xy_um)
    nb = tree.query_ball_point(spots_xy_um, radius_um)
    _, nearest = tree.query(spots_xy_um, k=1)
    members = [np.asarray(v if len(v) else [nearest[i]], np.int64) for i, v in enumerate(nb)]
    unit = np.concatenate(members)
    spot = np.repeat(np.arange(len(members)), [len(v) for v in members])
    M = sp.csr_matrix((np.ones(len(unit)), (spot, unit)), shape=(len(members), len(values)))
    cnt = np.asarray(M.sum(axis=1)).ravel()
    return np.asarray(M @ values) / cnt[:, None], unit, spot


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def compare_interactions(spots, superpixels, resource: str | pd.DataFrame = "consensus", *,
                         n_top: int = 20, spot_diameter_um: float | None = None,
                         um_per_px: float | None = None, key_added: str = "interactions",
                         **kwargs) -> pd.DataFrame:
    """The same analysis (:func:`interactions`, ``kwargs`` passed on) on measured ``spots``
    and on the ``superpixels`` of a super-resolved map of the same section, on the genes
    both share (the library too), side by side.

    For the union of both sides' ``n_top`` pairs, the super-resolved local Moran's R is
    averaged over each spot's footprint (units whose centre lies within
    ``spot_diameter_um / 2`` of the spot centre; default: half the median spacing of the
    spots) and correlated with the spots' own local score: ``local_pearson``; ``change`` =
    1 - local_pearson (the pairs whose local pattern changes most come first).
    ``within_spot_frac`` is the share of the super-resolved local-score variance (over units
    inside spots) that lies within spots: detail the spots cannot show.

    Both AnnData get ``uns``/``obsm`` as :func:`interactions` writes them;
    ``superpixels.uns[key_added]["comparison"]`` holds the returned table (one row per
    pair: global R, q and rank on each side, their difference, local_pearson,
    within_spot_frac, change)."""
    upp = _um_per_px(superpixels, um_per_px)
    common = [g for g in map(str, superpixels.var_names) if g in set(map(str, spots.var_names))]
    if not common:
        raise InputError("the spots and the super-resolved map share no gene: expected the same "
                         "gene symbols in both var_names")
    kw = dict(kwargs)
    unknown = set(kw) - {"bandwidth_um", "kernel", "cutoff", "n_perms", "seed", "min_frac",
                         "max_obs", "bin_um"}
    if unknown:
        raise InputError(f"unknown arguments {sorted(unknown)}: expected some of bandwidth_um, "
                         "kernel, cutoff, n_perms, seed, min_frac, max_obs, bin_um")
    sides = {}
    for what, ad_ in (("spots", spots), ("superpixels", superpixels)):
        sides[what] = _prepare(ad_, resource, kw.get("bandwidth_um", BANDWIDTH_UM),
                               kw.get("kernel", KERNEL), kw.get("cutoff", CUTOFF),
                               kw.get("n_perms", 1000), kw.get("seed", 0),
                               kw.get("min_frac", 0.05), kw.get("max_obs", 20000),
                               kw.get("bin_um") if what == "superpixels" else None, upp,
                               common, what)
    ts, tr = sides["spots"].table, sides["superpixels"].table
    union = list(dict.fromkeys(_top_pairs(tr, n_top) + _top_pairs(ts, n_top)))
    union = [p for p in union if f"{p[0]}{SEP}{p[1]}" in ts.index
             and f"{p[0]}{SEP}{p[1]}" in tr.index]
    loc = {}
    for what, side in sides.items():
        loc[what] = local_scores(side.a, union)
    names = [c for c in loc["superpixels"][0].columns if c in loc["spots"][0].columns]
    # the super-resolved local score at each measured spot
    su = sides["superpixels"].units
    spots_xy_u = sides["spots"].units.xy_px * upp  # spots (or bins of them: > max_obs spots)
    spot_vals = loc["spots"][0][names].to_numpy(np.float64)
    if spot_diameter_um is None:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(spots_xy_u).query(spots_xy_u, k=2)
        spot_diameter_um = float(np.median(d[:, 1]))
    sr_vals = loc["superpixels"][0][names].to_numpy(np.float64)
    at_spot, unit, spot = _spot_means(su.xy_px * upp, sr_vals, spots_xy_u,
                                      float(spot_diameter_um) / 2.0)
    rows = []
    for j, name in enumerate(names):
        v = sr_vals[unit, j]
        within = ((v - at_spot[spot, j]) ** 2).sum()
        total = ((v - v.mean()) ** 2).sum()
        rows.append({"interaction": name,
                     "local_pearson": _pearson(spot_vals[:, j], at_spot[:, j]),
                     "within_spot_frac": float(within / total) if total > 0 else float("nan")})
    cmp_ = pd.DataFrame(rows).set_index("interaction")
    for tag, t in (("spots", ts), ("sr", tr)):
        cmp_[f"morans_r_{tag}"] = t["morans_r"].reindex(cmp_.index)
        cmp_[f"qval_{tag}"] = t["qval"].reindex(cmp_.index)
        cmp_[f"rank_{tag}"] = t["rank"].reindex(cmp_.index)
    cmp_["delta_r"] = cmp_["morans_r_sr"] - cmp_["morans_r_spots"]
    cmp_["change"] = 1.0 - cmp_["local_pearson"]
    cmp_ = cmp_[["rank_spots", "rank_sr", "morans_r_spots", "morans_r_sr", "delta_r",
                 "qval_spots", "qval_sr", "local_pearson", "within_spot_frac", "change"]]
    cmp_ = cmp_.sort_index(kind="stable").sort_values("change", ascending=False,
                                                      kind="stable", na_position="last")
    for what, side in sides.items():
        score, cats = loc[what]
        _store(side, score[names], cats[names], key_added)
    superpixels.uns[key_added]["comparison"] = cmp_
    superpixels.uns[key_added]["params"]["spot_diameter_um"] = float(spot_diameter_um)
    return cmp_


# -- run folders and reports ----------------------------------------------------------------
OPTIONS = {"resource", "bandwidth_um", "kernel", "cutoff", "n_perms", "seed", "n_top",
           "min_frac", "max_obs", "bin_um", "all_genes", "n_maps"}


def options(setting) -> dict | None:
    """``analysis.interactions`` of a run config: ``false``/absent -> None (off), ``true`` ->
    defaults, or a mapping of :func:`compare_interactions` arguments (plus ``all_genes``:
    also analyse the measured spots on all their genes; ``n_maps``: pairs drawn)."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return {}
    if not isinstance(setting, dict):
        raise InputError(f"analysis.interactions must be true, false or a mapping of options "
                         f"{sorted(OPTIONS)}, got {setting!r}")
    extra = sorted(set(setting) - OPTIONS)
    if extra:
        raise InputError(f"unknown analysis.interactions options {extra}: expected some of "
                         f"{sorted(OPTIONS)}")
    return dict(setting)


def _write_tsv(df: pd.DataFrame, path: Path) -> Path:
    from .report import _atomic_write

    _atomic_write(path, df.to_csv(sep="\t", float_format="%.6g"))
    return path


def _save(fig, path: Path) -> Path:
    from .pl import save_figure

    return save_figure(fig, path)


def _brief(t: pd.DataFrame, name: str) -> str:
    r = t.loc[name]
    return f"{name} (R={r['morans_r']:.3f}, p={r['pval']:.2g}, q={r['qval']:.2g})"


def write_report(spots, superpixels, out_dir: str | Path, rep, section=None,
                 **opts) -> pd.DataFrame:
    """Compare spots and the super-resolved map (:func:`compare_interactions`) and add the
    results to a :class:`histosr.report.RunReport`: TSV tables in ``out_dir`` (listed in
    ``rep.outputs``), the top pairs and their maps over the H&E (``rep.images``), summary
    numbers (``rep.metrics``) and how it was computed (``rep.notes``)."""
    from . import pl

    opts = options(opts) or {}
    spots = spots.to_memory() if spots.isbacked else spots.copy()  # the caller's stays as is
    n_top = int(opts.pop("n_top", 20))
    n_maps = int(opts.pop("n_maps", 4))
    all_genes = bool(opts.pop("all_genes", True))
    resource = opts.pop("resource", "consensus")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    diam = None if section is None else float(section.spot_diameter_um)
    cmp_ = compare_interactions(spots, superpixels, resource, n_top=n_top,
                                spot_diameter_um=diam, **opts)
    ts = spots.uns["interactions"]["global"]
    tr = superpixels.uns["interactions"]["global"]
    prm = superpixels.uns["interactions"]["params"]
    rep.outputs["interactions_global_spots"] = str(_write_tsv(ts, out / "global_spots.tsv"))
    rep.outputs["interactions_global_superpixels"] = str(
        _write_tsv(tr, out / "global_superpixels.tsv"))
    rep.outputs["interactions_comparison"] = str(_write_tsv(cmp_, out / "comparison.tsv"))
    tables = {"measured spots": ts, "super-resolved map": tr}
    m = rep.metrics
    m["interactions_pairs_tested"] = int(len(tr))
    for tag, t in (("spots", ts), ("superpixels", tr)):
        m[f"interactions_significant_{tag}"] = int((t["qval"] < 0.05).sum())
        m[f"interactions_top_pair_{tag}"] = _brief(t, t.index[0])
        m[f"interactions_top{n_top}_{tag}"] = "; ".join(_brief(t, i) for i in t.index[:n_top])
    if len(cmp_):
        m["interactions_most_changed"] = ", ".join(
            f"{i} (local r={r:.2f})" for i, r in cmp_["local_pearson"].head(5).items())
        m["interactions_median_local_pearson"] = float(cmp_["local_pearson"].median())
        m["interactions_median_within_spot_frac"] = float(cmp_["within_spot_frac"].median())
    extra = section is not None and bool(set(map(str, section.counts.var_names))
                                         - set(map(str, superpixels.var_names)))
    if all_genes and extra:
        sa = section.counts.copy()
        sa.uns["histosr"] = {"um_per_px": float(section.um_per_px)}
        kw = {k: v for k, v in opts.items() if k != "bin_um"}
        ta = interactions(sa, resource, n_top=1, **kw)
        rep.outputs["interactions_global_spots_all_genes"] = str(
            _write_tsv(ta, out / "global_spots_all_genes.tsv"))
        m["interactions_pairs_tested_spots_all_genes"] = int(len(ta))
        m["interactions_significant_spots_all_genes"] = int((ta["qval"] < 0.05).sum())
        m[f"interactions_top{n_top}_spots_all_genes"] = "; ".join(
            _brief(ta, i) for i in ta.index[:n_top])
        tables["measured spots, all genes"] = ta
    rep.images.append(_save(pl.interactions_top(tables, n=n_top,
                                                title="top ligand-receptor pairs"),
                            out / "top_pairs.png"))
    top = list(tr.index[:n_maps])
    if top:
        rep.images.append(_save(pl.interaction_maps(spots, superpixels, top, section=section),
                                out / "maps_top_pairs.png"))
    changed = list(cmp_.index[:n_maps])
    if changed:
        rep.images.append(_save(pl.interaction_maps(spots, superpixels, changed,
                                                    section=section,
                                                    title="pairs whose local pattern changes most"),
                                out / "maps_most_changed.png"))
    agg = (f"superpixels summed into {prm['bin_um']:g} um bins ({prm['n_units']} bins)"
           if prm["aggregated"] else f"{prm['n_units']} superpixels")
    rep.notes.append(
        f"interactions: LIANA+ bivariate Moran's R of {prm['pairs_tested']} ligand-receptor "
        f"pairs ({prm['resource']}) on log1p CP10k of the genes shared by the spots and the "
        f"map; Gaussian kernel sigma={prm['bandwidth_um']:g} um (weights < {prm['cutoff']:g} "
        f"dropped, self weight 1); {agg}; {prm['n_perms']} permutations (one-sided), BH "
        f"q-values; local pattern change = 1 - Pearson r between the spots' local R and the "
        f"map's local R averaged over each spot. On a smooth super-resolved map nearly every "
        f"spatially patterned pair rejects the permutation null (neighbouring bins are not "
        f"independent): rank the map's pairs by R and read significance on the spots.")
    return cmp_


def run_in_pipeline(analysis, pred, spots_pred, section, out, rep) -> None:
    """The ``analysis: {interactions: ...}`` step of ``histosr run`` (after the previews):
    measured spots (``section.counts``; the footprint sums ``spots_pred`` when there is no
    section) against the super-resolved ``pred``, written under ``out/interactions``."""
    analysis = analysis or {}
    if not isinstance(analysis, dict):
        raise InputError(f"analysis must be a mapping, e.g. {{interactions: true}}, got "
                         f"{analysis!r}")
    opts = options(analysis.get("interactions"))
    if opts is None:
        return
    opts.setdefault("seed", int(rep.params.get("seed", 0)))
    spots = section.counts if section is not None else spots_pred
    with rep.stage("interactions"):
        write_report(spots, pred, Path(out) / "interactions", rep, section=section, **opts)


def run_on_folder(run_dir: str | Path, out: str | Path | None = None, **opts):
    """``histosr interactions RUN_DIR``: the analysis on an existing run folder
    (``prediction.h5ad`` read backed, in chunks; the measured spots and the H&E from the
    section in ``report.json``'s parameters when it can still be read, else
    ``prediction_spots.h5ad`` without a picture). Writes its own report into ``out``
    (default ``RUN_DIR/interactions``) and returns it."""
    import json

    import anndata as ad

    from .report import RunReport

    run_dir = Path(run_dir)
    pred_path = run_dir / "prediction.h5ad"
    if not pred_path.is_file():
        raise FileNotFoundError(f"{pred_path} not found: expected a run folder written by "
                                "`histosr run` (with prediction.h5ad)")
    opts = options(opts) or {}
    params = {}
    if (run_dir / "report.json").is_file():
        params = json.loads((run_dir / "report.json").read_text()).get("params", {}) or {}
    opts.setdefault("seed", int(params.get("seed", 0) or 0))
    rep = RunReport(f"histosr interactions: {run_dir}", Path(out or run_dir / "interactions"),
                    params={"run": str(run_dir), "interactions": dict(opts)})
    section = None
    if isinstance(params.get("section"), dict):
        from .pipeline import read_section

        try:
            with rep.stage("read"):
                section = read_section(dict(params["section"]))
        except (ValueError, FileNotFoundError, OSError) as e:
            rep.notes.append(f"section not read ({e}); measured spots taken from "
                             "prediction_spots.h5ad, maps without the H&E")
    if section is not None:
        spots = section.counts
    else:
        sp_path = run_dir / "prediction_spots.h5ad"
        if not sp_path.is_file():
            raise FileNotFoundError(f"neither the run's section nor {sp_path} can be read: "
                                    "the comparison needs the measured spots")
        spots = ad.read_h5ad(sp_path)
    pred = ad.read_h5ad(pred_path, backed="r")
    with rep.stage("interactions"):
        write_report(spots, pred, rep.out_dir, rep, section=section, **opts)
    rep.write()
    return rep
