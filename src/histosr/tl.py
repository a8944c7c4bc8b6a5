"""Tools on predictions (scanpy's ``tl``): tissue domains, marker scores, spatially variable
genes.

Every function takes an AnnData as :meth:`Method.predict` writes it: one observation per
tissue superpixel (``obs`` ``row``/``col`` grid indices, 8 um apart) or one per spot
(``obsm["spatial"]`` in full-resolution px; micrometres via ``uns["histosr"]["um_per_px"]``
or the ``um_per_px`` argument). ``X`` holds counts (per superpixel or per spot).

Representation (:func:`representation`): an ``obsm`` key when given (``"X_latent"``-style,
e.g. a method's latent embedding), otherwise ``"latent"`` = PCA of the log1p expression
(per observation normalised to 1e4 over the AnnData's genes, genes z-scored and clipped at
10: the scanpy default pipeline), or ``"expression"`` = that scaled log1p expression itself.
iStar stores no latent per superpixel yet, so ``"latent"`` falls back to the PCA unless
``obsm["X_latent"]`` exists.

Leiden: ``leidenalg``/``igraph`` are used when installed. Without them (the project does not
depend on them) a built-in fallback runs: Louvain-style fast local moving of modularity
(RB configuration model with a resolution), then each community is split into its
connected components (the guarantee Leiden's refinement gives: no disconnected community;
its randomised merging inside communities is not reproduced), the graph is aggregated by
the refined partition and moving continues on it. Above ``max_nodes`` observations the
graph is built on a random sketch of ``max_nodes`` of them and the others take the majority
domain of their 15 nearest sketch neighbours in the representation.
"""

from __future__ import annotations

import warnings
from collections import deque

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError

SP_UM = 8.0  # superpixel pitch (um)


# -- inputs ---------------------------------------------------------------------------------
def _dense(x) -> np.ndarray:
    from .arrays import dense

    return dense(x, None)


def _is_grid(adata) -> bool:
    return "row" in adata.obs and "col" in adata.obs


def _gene_index(adata, genes) -> list[int]:
    names = list(map(str, adata.var_names))
    pos = {g: i for i, g in enumerate(names)}
    return [pos[g] for g in genes]


def log_expression(adata, normalize: bool = True, genes=None) -> np.ndarray:
    """float32 log1p expression (n_obs, n_genes); ``normalize`` first scales every
    observation to a total of 1e4 over the AnnData's (or ``genes``') columns."""
    X = adata.X if genes is None else adata.X[:, _gene_index(adata, genes)]
    X = np.array(_dense(X), dtype=np.float32, copy=True)
    np.clip(X, 0, None, out=X)
    if normalize:
        lib = X.sum(axis=1, keepdims=True)
        X *= np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    np.log1p(X, out=X)
    return X


def _zscore_(X: np.ndarray, clip: float = 10.0) -> np.ndarray:
    mu = X.mean(axis=0, dtype=np.float64).astype(np.float32)
    sd = X.std(axis=0, dtype=np.float64).astype(np.float32)
    X -= mu
    X /= np.where(sd > 0, sd, 1.0)
    np.clip(X, -clip, clip, out=X)
    return X


def _pca(X: np.ndarray, n_pcs: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    k = int(max(1, min(n_pcs, X.shape[1] - 1 if X.shape[1] > 1 else 1, X.shape[0] - 1)))
    solver = "full" if min(X.shape) <= 3 * k else "randomized"
    return PCA(n_components=k, svd_solver=solver, random_state=seed).fit_transform(X).astype(
        np.float32)


def representation(adata, use: str = "latent", n_pcs: int = 30, normalize: bool = True,
                   scale: bool = True, seed: int = 0) -> np.ndarray:
    """The (n_obs, d) matrix that :func:`domains` clusters (see the module docstring)."""
    if use in adata.obsm:
        return np.asarray(adata.obsm[use], dtype=np.float32)
    if use not in ("latent", "expression"):
        raise InputError(f"use must be 'latent', 'expression' or an obsm key "
                         f"(present: {sorted(adata.obsm)}), got {use!r}")
    if use == "latent" and "X_latent" in adata.obsm:
        return np.asarray(adata.obsm["X_latent"], dtype=np.float32)
    X = log_expression(adata, normalize)
    if scale:
        _zscore_(X)
    return X if use == "expression" else _pca(X, n_pcs, seed)


def _um_per_unit(adata, um_per_px: float | None) -> float:
    if um_per_px is not None:
        return float(um_per_px)
    v = adata.uns.get("histosr", {}).get("um_per_px")
    if v is None:
        raise InputError("spot-level smoothing/neighbours in micrometres need the pixel size: "
                         "pass um_per_px= (uns['histosr']['um_per_px'] is absent)")
    return float(v)


# -- spatial neighbourhoods -----------------------------------------------------------------
def _disk_offsets(radius: float, include_centre: bool) -> np.ndarray:
    r = int(np.floor(radius))
    dr, dc = np.mgrid[-r:r + 1, -r:r + 1]
    keep = dr**2 + dc**2 <= radius**2 + 1e-9
    if not include_centre:
        keep &= (dr != 0) | (dc != 0)
    return np.stack([dr[keep], dc[keep]], axis=1)


def grid_weights(rows, cols, radius: float = 1.5) -> sp.csr_matrix:
    """Binary (n, n) adjacency of grid cells within ``radius`` cells of each other (1.5: the
    8 neighbours), no self loops."""
    rows = np.asarray(rows, np.int64) - np.min(rows)
    cols = np.asarray(cols, np.int64) - np.min(cols)
    H, W = int(rows.max()) + 1, int(cols.max()) + 1
    lut = np.full((H, W), -1, dtype=np.int64)
    lut[rows, cols] = np.arange(len(rows))
    src, dst = [], []
    for dr, dc in _disk_offsets(radius, include_centre=False):
        r2, c2 = rows + dr, cols + dc
        ok = (r2 >= 0) & (r2 < H) & (c2 >= 0) & (c2 < W)
        j = np.full(len(rows), -1, dtype=np.int64)
        j[ok] = lut[r2[ok], c2[ok]]
        hit = j >= 0
        src.append(np.flatnonzero(hit))
        dst.append(j[hit])
    src = np.concatenate(src) if src else np.zeros(0, np.int64)
    dst = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    n = len(rows)
    return sp.csr_matrix((np.ones(len(src), np.float32), (src, dst)), shape=(n, n))


def _no_self_loops(A: sp.spmatrix) -> sp.csr_matrix:
    A = sp.csr_matrix(A - sp.diags(A.diagonal()))
    A.eliminate_zeros()
    return A


def knn_weights(xy: np.ndarray, n_neighbors: int = 6) -> sp.csr_matrix:
    """Binary symmetrised kNN adjacency of points ``xy`` (no self loops)."""
    from scipy.spatial import cKDTree

    n = len(xy)
    k = min(n_neighbors + 1, n)
    _, idx = cKDTree(xy).query(xy, k=k)
    idx = np.asarray(idx).reshape(n, k)
    src = np.repeat(np.arange(n), k)
    A = sp.csr_matrix((np.ones(n * k, np.float32), (src, idx.ravel())), shape=(n, n))
    return _no_self_loops(A.maximum(A.T))


def spatial_weights(adata, radius: float = 1.5, n_neighbors: int = 6) -> sp.csr_matrix:
    """Superpixels: :func:`grid_weights` within ``radius`` grid cells; spots: :func:`knn_weights`
    on ``obsm["spatial"]``."""
    if _is_grid(adata):
        return grid_weights(adata.obs["row"].to_numpy(), adata.obs["col"].to_numpy(), radius)
    return knn_weights(np.asarray(adata.obsm["spatial"], dtype=np.float64), n_neighbors)


def smooth_representation(Z: np.ndarray, adata, radius_um: float,
                          um_per_px: float | None = None) -> np.ndarray:
    """Mean of each observation's representation over the observations within ``radius_um``
    of it (itself included). Superpixels: a disk of grid cells (FFT convolution of the
    masked grid, divided by the number of tissue cells under the disk); spots: a ball
    around ``obsm["spatial"]``."""
    Z = np.asarray(Z, dtype=np.float32)
    if radius_um <= 0:
        return Z
    if _is_grid(adata):
        from scipy.signal import fftconvolve

        radius = radius_um / SP_UM
        rows = adata.obs["row"].to_numpy().astype(np.int64)
        cols = adata.obs["col"].to_numpy().astype(np.int64)
        rows, cols = rows - rows.min(), cols - cols.min()
        H, W = int(rows.max()) + 1, int(cols.max()) + 1
        off = _disk_offsets(radius, include_centre=True)
        r = int(np.abs(off).max()) if len(off) else 0
        kern = np.zeros((2 * r + 1, 2 * r + 1), dtype=np.float32)
        kern[off[:, 0] + r, off[:, 1] + r] = 1.0
        m = np.zeros((H, W), dtype=np.float32)
        m[rows, cols] = 1.0
        cnt = np.rint(fftconvolve(m, kern, mode="same"))[rows, cols]
        out = np.empty_like(Z)
        step = 8  # channels per FFT: bounds the complex buffers on large grids
        for a in range(0, Z.shape[1], step):
            g = np.zeros((H, W, min(step, Z.shape[1] - a)), dtype=np.float32)
            g[rows, cols] = Z[:, a:a + step]
            s = fftconvolve(g, kern[:, :, None], mode="same", axes=(0, 1))
            out[:, a:a + step] = s[rows, cols] / np.maximum(cnt, 1.0)[:, None]
        return out
    from scipy.spatial import cKDTree

    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64) * _um_per_unit(adata, um_per_px)
    nb = cKDTree(xy).query_ball_point(xy, r=radius_um)
    src = np.repeat(np.arange(len(nb)), [len(v) for v in nb])
    dst = np.concatenate([np.asarray(v, np.int64) for v in nb])
    A = sp.csr_matrix((np.ones(len(src), np.float32), (src, dst)), shape=(len(nb), len(nb)))
    deg = np.asarray(A.sum(axis=1)).ravel()
    return np.asarray(A @ Z) / deg[:, None]


# -- clustering -----------------------------------------------------------------------------
def _by_size(labels: np.ndarray) -> np.ndarray:
    """Relabel 0..k-1 by decreasing size (ties: smaller old label first)."""
    u, inv, cnt = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.lexsort((u, -cnt))
    rank = np.empty(len(u), dtype=np.int64)
    rank[order] = np.arange(len(u))
    return rank[inv.ravel()]


def _kmeans(Z: np.ndarray, k: int, seed: int, max_fit: int | None = 20000) -> np.ndarray:
    """k-means (``n_init=10``); above ``max_fit`` observations the centres are fitted on a
    seeded random sample of ``max_fit`` and every observation takes its nearest centre."""
    from sklearn.cluster import KMeans

    k = int(min(k, len(Z)))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    if max_fit is None or len(Z) <= max_fit:
        return km.fit_predict(Z)
    sample = np.random.default_rng(seed).choice(len(Z), int(max_fit), replace=False)
    return km.fit(Z[np.sort(sample)]).predict(Z)


def knn_graph(Z: np.ndarray, n_neighbors: int = 15) -> sp.csr_matrix:
    """Binary symmetrised kNN graph in representation space (no self loops)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(Z)
    k = min(n_neighbors + 1, n)
    idx = NearestNeighbors(n_neighbors=k).fit(Z).kneighbors(Z, return_distance=False)
    src = np.repeat(np.arange(n), k)
    A = sp.csr_matrix((np.ones(n * k, np.float64), (src, idx.ravel())), shape=(n, n))
    return _no_self_loops(A.maximum(A.T))


def _have_leidenalg() -> bool:
    try:
        import igraph  # noqa: F401
        import leidenalg  # noqa: F401
    except ImportError:
        return False
    return True


def _leidenalg(A: sp.csr_matrix, resolution: float, seed: int) -> np.ndarray:
    import igraph
    import leidenalg

    U = sp.triu(A, k=1).tocoo()
    g = igraph.Graph(n=A.shape[0], edges=list(zip(U.row.tolist(), U.col.tolist())))
    g.es["weight"] = U.data.tolist()
    part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition,
                                    weights="weight", resolution_parameter=resolution,
                                    seed=int(seed), n_iterations=-1)
    return np.asarray(part.membership, dtype=np.int64)


def _move_nodes(G: sp.csr_matrix, part: np.ndarray, resolution: float, m2: float,
                rng) -> tuple[np.ndarray, bool]:
    """Fast local moving: visit nodes from a queue, move each to the neighbouring community
    with the best modularity gain, re-queue its neighbours outside that community."""
    n = G.shape[0]
    indptr, indices, data = G.indptr, G.indices.tolist(), G.data.tolist()
    k = np.asarray(G.sum(axis=1)).ravel()
    part = part.copy()
    tot = np.bincount(part, weights=k, minlength=n).tolist()
    p = part.tolist()
    kl = k.tolist()
    queue = deque(rng.permutation(n).tolist())
    inq = [True] * n
    moved = False
    while queue:
        i = queue.popleft()
        inq[i] = False
        ci, ki = p[i], kl[i]
        s, e = indptr[i], indptr[i + 1]
        wc: dict[int, float] = {}
        for j, w in zip(indices[s:e], data[s:e]):
            if j != i:
                c = p[j]
                wc[c] = wc.get(c, 0.0) + w
        tot[ci] -= ki
        best, best_gain = ci, wc.get(ci, 0.0) - resolution * ki * tot[ci] / m2
        for c, w in wc.items():
            gain = w - resolution * ki * tot[c] / m2
            if gain > best_gain + 1e-12:
                best, best_gain = c, gain
        tot[best] += ki
        if best != ci:
            p[i] = best
            moved = True
            for j in indices[s:e]:
                if j != i and p[j] != best and not inq[j]:
                    queue.append(j)
                    inq[j] = True
    return np.asarray(p, dtype=np.int64), moved


def _split_disconnected(G: sp.csr_matrix, part: np.ndarray) -> np.ndarray:
    """Refinement: each community split into its connected components."""
    from scipy.sparse.csgraph import connected_components

    C = G.tocoo()
    keep = part[C.row] == part[C.col]
    inner = sp.csr_matrix((np.ones(int(keep.sum())), (C.row[keep], C.col[keep])), shape=G.shape)
    return connected_components(inner, directed=False)[1]


def leiden_fallback(A: sp.csr_matrix, resolution: float = 1.0, seed: int = 0,
                    max_levels: int = 32) -> np.ndarray:
    """Modularity communities of a symmetric weighted graph without leidenalg (see the
    module docstring for how it relates to Leiden). Communities are connected."""
    rng = np.random.default_rng(seed)
    G = sp.csr_matrix(A, dtype=np.float64)
    G.sum_duplicates()
    n = G.shape[0]
    m2 = float(G.sum())
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if m2 <= 0:
        return np.arange(n)
    member = np.arange(n)  # original node -> aggregate node
    part = np.arange(n)  # aggregate node -> community
    for level in range(max_levels):
        part, moved = _move_nodes(G, part, resolution, m2, rng)
        refined = _split_disconnected(G, part)
        n_ref = int(refined.max()) + 1
        if (not moved and level > 0) or n_ref == G.shape[0]:
            break
        P = sp.csr_matrix((np.ones(G.shape[0]), (np.arange(G.shape[0]), refined)),
                          shape=(G.shape[0], n_ref))
        comm = np.zeros(n_ref, dtype=np.int64)
        comm[refined] = part
        G = (P.T @ G @ P).tocsr()
        member = refined[member]
        part = comm
    return _by_size(part[member])


def _communities(A, resolution: float, seed: int) -> np.ndarray:
    if _have_leidenalg():
        return _leidenalg(A, resolution, seed)
    return leiden_fallback(A, resolution, seed)


def _leiden(Z: np.ndarray, n_domains: int | None, resolution: float | None, n_neighbors: int,
            seed: int, max_nodes: int) -> tuple[np.ndarray, float]:
    n = len(Z)
    rng = np.random.default_rng(seed)
    sketch = np.sort(rng.choice(n, max_nodes, replace=False)) if n > max_nodes else None
    Zs = Z if sketch is None else Z[sketch]
    A = knn_graph(Zs, n_neighbors)
    if n_domains is None:
        res = 1.0 if resolution is None else float(resolution)
        lab = _communities(A, res, seed)
    else:
        # bisection on log(resolution) for n_domains communities (more with larger values)
        lo, hi = np.log(1e-3), np.log(50.0)
        best = None
        for _ in range(24):
            res = float(np.exp(0.5 * (lo + hi)))
            lab = _communities(A, res, seed)
            k = int(lab.max()) + 1
            if best is None or abs(k - n_domains) < abs(best[0] - n_domains):
                best = (k, res, lab)
            if k == n_domains:
                break
            if k < n_domains:
                lo = np.log(res)
            else:
                hi = np.log(res)
        k, res, lab = best
        if k != n_domains:
            warnings.warn(f"leiden: no resolution gave {n_domains} domains; using {k} "
                          f"(resolution {res:.3g})", stacklevel=3)
    if sketch is not None:
        from sklearn.neighbors import KNeighborsClassifier

        clf = KNeighborsClassifier(n_neighbors=min(15, len(sketch))).fit(Zs, lab)
        full = clf.predict(Z)
        full[sketch] = lab
        lab = full
    return lab, res


def domains(adata, n_domains: int | None = 8, use: str = "latent", method: str = "kmeans",
            smooth: float = 0.0, *, n_pcs: int = 30, normalize: bool = True,
            scale: bool = True, n_neighbors: int = 15, resolution: float | None = None,
            seed: int = 0, key_added: str = "domain", um_per_px: float | None = None,
            max_nodes: int = 10000, max_fit: int | None = 20000, copy: bool = False):
    """Cluster superpixels (or spots) into tissue domains; writes ``obs[key_added]``.

    ``n_domains``: clusters (k-means: required; Leiden: the resolution is bisected until
    that many communities form, ``None`` uses ``resolution``, default 1). ``use``: see
    :func:`representation`. ``method``: ``"kmeans"`` (scikit-learn, ``n_init=10``) or
    ``"leiden"`` (kNN graph with ``n_neighbors``; leidenalg or the built-in fallback).
    Large inputs: k-means centres are fitted on a seeded sample of ``max_fit`` observations
    (``None``: all), Leiden runs on a sketch of ``max_nodes``; every observation is then
    assigned (nearest centre / majority of 15 nearest sketch members).
    ``smooth``: radius in micrometres; each representation is averaged with its spatial
    neighbours within it before clustering (:func:`smooth_representation`; spot data need
    ``um_per_px`` or ``uns["histosr"]["um_per_px"]``). Domains are labelled ``"0"``,
    ``"1"``, ... by decreasing size; ``uns[key_added]`` records the settings. Returns the
    AnnData (a modified copy with ``copy=True``, else ``adata`` itself).
    """
    if copy:
        adata = adata.copy()
    if method not in ("kmeans", "leiden"):
        raise InputError(f"method must be 'kmeans' or 'leiden', got {method!r}")
    if method == "kmeans" and (n_domains is None or int(n_domains) < 1):
        raise InputError(f"k-means needs n_domains >= 1, got {n_domains!r}")
    if not _is_grid(adata) and "spatial" not in adata.obsm and smooth > 0:
        raise InputError("smoothing needs obs row/col (superpixels) or obsm['spatial'] (spots)")
    Z = representation(adata, use, n_pcs, normalize, scale, seed)
    Z = smooth_representation(Z, adata, float(smooth), um_per_px)
    info = {"use": use, "method": method, "smooth_um": float(smooth), "seed": int(seed),
            "n_dims": int(Z.shape[1])}
    if method == "kmeans":
        lab = _kmeans(Z, int(n_domains), seed, max_fit)
        if max_fit is not None and len(Z) > max_fit:
            info["fit_sample"] = int(max_fit)
    else:
        lab, res = _leiden(Z, None if n_domains is None else int(n_domains), resolution,
                           n_neighbors, seed, max_nodes)
        info.update({"resolution": float(res), "n_neighbors": int(n_neighbors),
                     "backend": "leidenalg" if _have_leidenalg() else "histosr fallback",
                     "sketch": int(min(max_nodes, len(Z)))})
    lab = _by_size(np.asarray(lab))
    cats = [str(i) for i in range(int(lab.max()) + 1)] if len(lab) else []
    adata.obs[key_added] = pd.Categorical.from_codes(lab, categories=cats)
    info["n_domains"] = len(cats)
    adata.uns[key_added] = info
    return adata


# -- genes ----------------------------------------------------------------------------------
def marker_score(adata, genes, key_added: str = "marker_score", normalize: bool = False,
                 copy: bool = False):
    """Mean over ``genes`` of the z-scored log1p expression (``normalize``: per-observation
    1e4 scaling first) into ``obs[key_added]``; genes not in ``var_names`` are skipped with a
    warning. Returns the AnnData (a copy with ``copy=True``)."""
    if copy:
        adata = adata.copy()
    genes = [genes] if isinstance(genes, str) else list(genes)
    have = set(map(str, adata.var_names))
    use = [g for g in genes if g in have]
    if not use:
        raise InputError(f"none of the marker genes {genes[:10]} is in var_names")
    if len(use) < len(genes):
        warnings.warn(f"marker genes not found, skipped: {[g for g in genes if g not in have]}",
                      stacklevel=2)
    X = log_expression(adata, normalize) if normalize else log_expression(adata, False, use)
    if normalize:
        X = X[:, _gene_index(adata, use)]
    sd = X.std(axis=0)
    Zs = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    adata.obs[key_added] = Zs.mean(axis=1).astype(np.float64)
    return adata


def morans_i(adata, genes=None, normalize: bool = False, radius: float = 1.5,
             n_neighbors: int = 6, weights: sp.spmatrix | None = None,
             chunk: int = 256) -> pd.Series:
    """Moran's I of log1p expression per gene (NaN for a constant gene). Weights: binary
    spatial adjacency (:func:`spatial_weights`: 8 grid neighbours for superpixels, 6 nearest
    spots) unless ``weights`` is given. Vectorised over genes in chunks of ``chunk``."""
    genes = list(map(str, adata.var_names)) if genes is None else list(genes)
    W = spatial_weights(adata, radius, n_neighbors) if weights is None else sp.csr_matrix(weights)
    n, s0 = W.shape[0], float(W.sum())
    if s0 <= 0:
        raise InputError("Moran's I: the spatial weights have no edges")
    idx = _gene_index(adata, genes)
    out = np.full(len(genes), np.nan)
    lib = None
    if normalize:
        lib = np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()
    for a in range(0, len(idx), chunk):
        cols = idx[a:a + chunk]
        X = np.array(_dense(adata.X[:, cols]), dtype=np.float64)
        np.clip(X, 0, None, out=X)
        if lib is not None:
            X *= np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)[:, None]
        np.log1p(X, out=X)
        X -= X.mean(axis=0)
        num = np.einsum("ij,ij->j", X, W @ X)
        den = np.einsum("ij,ij->j", X, X)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a:a + chunk] = np.where(den > 0, n / s0 * num / np.where(den > 0, den, 1), np.nan)
    return pd.Series(out, index=pd.Index(genes), name="moran_i")


def spatially_variable_genes(adata, n: int = 50, key_added: str = "moran_i",
                             **kwargs) -> pd.DataFrame:
    """Rank genes by Moran's I (:func:`morans_i`, ``kwargs`` passed on). Writes
    ``var[key_added]`` and ``var["spatially_variable"]`` (the top ``n``); returns the top
    ``n`` as a DataFrame (index genes, column ``moran_i``), highest first."""
    mi = morans_i(adata, **kwargs)
    adata.var[key_added] = mi.reindex(adata.var_names.astype(str)).to_numpy()
    top = mi.dropna().sort_values(ascending=False, kind="stable").head(int(n))
    adata.var["spatially_variable"] = adata.var_names.astype(str).isin(top.index)
    return top.to_frame("moran_i")


# ligand-receptor co-localisation lives in its own module (LIANA+ is imported lazily)
from .interactions import compare_interactions, interactions  # noqa: E402

# -- gene sets (histosr.pathways): scores per observation, over-representation ------------
from .pathways import (  # noqa: E402
    domain_markers,
    enrich,
    gene_set_report,
    ora,
    read_gene_sets,
    score_gene_sets,
    score_maps,
)

__all__ = ["interactions", "compare_interactions", "score_gene_sets", "enrich", "ora",
           "domain_markers", "read_gene_sets", "gene_set_report", "score_maps", "domains",
           "marker_score", "morans_i", "spatially_variable_genes", "representation",
           "log_expression", "smooth_representation", "spatial_weights", "grid_weights",
           "knn_weights", "knn_graph", "leiden_fallback"]
