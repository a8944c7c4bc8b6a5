"""Gene sets in, pathway maps and enrichment out.

* Gene sets (:func:`read_gene_sets`): a GMT file (one set per line: name, description, genes,
  tab separated; as MSigDB distributes them) or a ``{name: [genes]}`` dict.
  :func:`gene_set_report` says, per set, how many of its genes the data measured, which
  symbols are unknown (with a hint when only the letter case differs) and which were listed
  twice. Nothing is downloaded: MSigDB hallmark (``h.all.v*.symbols.gmt``) and GO
  (``c5.go.*.symbols.gmt``) files come from https://www.gsea-msigdb.org/gsea/msigdb (free
  registration; licence terms there), Enrichr libraries from
  https://maayanlab.cloud/Enrichr/#libraries; save the GMT and pass its path.
* Activity scores (:func:`score_gene_sets`): one score per observation (spot or 8 um
  superpixel) and gene set, with decoupler (``"ulm"``: t-value of a univariate linear model of
  the observation's expression on set membership, decoupler's default; ``"aucell"``;
  ``"zscore"``), scanpy's ``score_genes`` (``"score_genes"``), or ``"mean"`` (mean over the
  set's genes of the z-scored expression, :func:`histosr.tl.marker_score`). Expression is
  log1p CP10k (counts are normalised per observation first; spot-level predictions already
  are). ``ulm``, ``aucell`` and ``zscore`` score each observation on its own, so whole slides
  stream: :func:`score_maps` reads ``maps.zarr`` tile by tile and writes the pathway maps.
* Enrichment (:func:`enrich`): over-representation (one-sided hypergeometric test,
  Benjamini-Hochberg within each query list) of each domain's marker genes
  (:func:`domain_markers` on ``obs["domain"]`` from :func:`histosr.tl.domains`) and of the
  spatially variable genes (:func:`histosr.tl.spatially_variable_genes`) against the gene
  sets, with the measured genes (detected in at least one observation) as the universe.

Units: scores have the method's own units (ULM: t-values; mean: z-scores). Maps are on the
8 um superpixel grid (rows, cols), NaN outside tissue.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

METHODS = ("ulm", "aucell", "zscore", "score_genes", "mean")
#: methods whose score of one observation depends on that observation alone (streamable)
PER_OBSERVATION = ("ulm", "aucell", "zscore")


# -- gene sets ------------------------------------------------------------------------------
@dataclass
class GeneSets:
    """Named gene sets (genes unique within a set, file order kept)."""

    sets: dict[str, list[str]]
    descriptions: dict[str, str] = field(default_factory=dict)
    duplicated: dict[str, list[str]] = field(default_factory=dict)
    source: str = "dict"

    def __len__(self) -> int:
        return len(self.sets)

    def __iter__(self):
        return iter(self.sets)

    @property
    def genes(self) -> list[str]:
        """Every gene of every set (first occurrence order)."""
        return list(dict.fromkeys(g for gs in self.sets.values() for g in gs))

    def restrict(self, genes, min_size: int = 1) -> dict[str, list[str]]:
        """Each set's genes among ``genes``; sets with fewer than ``min_size`` dropped."""
        have = set(map(str, genes))
        out = {k: [g for g in v if g in have] for k, v in self.sets.items()}
        return {k: v for k, v in out.items() if len(v) >= min_size}


def _dedupe(name: str, genes, dup: dict) -> list[str]:
    seen: dict[str, None] = {}
    twice = []
    for g in genes:
        g = str(g).strip()
        if not g:
            continue
        if g in seen:
            twice.append(g)
        seen[g] = None
    if twice:
        dup[name] = sorted(set(twice))
    return list(seen)


def read_gmt(path: str | Path) -> GeneSets:
    """Read a GMT file: ``name<TAB>description<TAB>gene1<TAB>gene2...`` per line (blank lines
    and ``#`` comments skipped). A set defined twice or a line without genes is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gene set file not found: {path} (expected a GMT file: "
                                "name<TAB>description<TAB>genes..., one set per line)")
    sets, desc, dup, where = {}, {}, {}, {}
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) < 3:
                raise InputError(f"{path}:{i}: expected name<TAB>description<TAB>gene... "
                                 f"(tab separated, at least one gene), got {line[:80]!r}")
            name = parts[0].strip()
            if not name:
                raise InputError(f"{path}:{i}: the gene set has no name")
            if name in sets:
                raise InputError(f"{path}:{i}: gene set {name!r} is already defined on line "
                                 f"{where[name]}: give each set a unique name")
            genes = _dedupe(name, parts[2:], dup)
            if not genes:
                raise InputError(f"{path}:{i}: gene set {name!r} lists no genes")
            sets[name], desc[name], where[name] = genes, parts[1].strip(), i
    if not sets:
        raise InputError(f"{path}: no gene set found (expected GMT lines "
                         "name<TAB>description<TAB>genes...)")
    return GeneSets(sets, desc, dup, str(path))


def read_gene_sets(gene_sets) -> GeneSets:
    """:class:`GeneSets` from a GMT path, a ``{name: [genes]}`` dict or a GeneSets."""
    if isinstance(gene_sets, GeneSets):
        return gene_sets
    if isinstance(gene_sets, (str, Path)):
        return read_gmt(gene_sets)
    if isinstance(gene_sets, dict):
        if not gene_sets:
            raise InputError("no gene sets given (an empty dict)")
        sets, dup = {}, {}
        for name, genes in gene_sets.items():
            genes = [genes] if isinstance(genes, str) else list(genes)
            sets[str(name)] = _dedupe(str(name), genes, dup)
            if not sets[str(name)]:
                raise InputError(f"gene set {name!r} lists no genes")
        return GeneSets(sets, {}, dup, "dict")
    raise InputError(f"gene sets must be a GMT file path or a {{name: [genes]}} dict, got "
                     f"{type(gene_sets).__name__}")


def gene_set_report(gene_sets, measured) -> pd.DataFrame:
    """Per set: ``n_genes``, ``n_measured`` (genes found in ``measured``), ``frac_measured``,
    ``unknown`` (symbols not measured; ``SYMBOL(->Measured)`` when only the letter case
    differs) and ``duplicated`` (listed twice in the set). Index: set names."""
    gs = read_gene_sets(gene_sets)
    measured = list(map(str, measured))
    have = set(measured)
    upper = {g.upper(): g for g in measured}
    rows = []
    for name, genes in gs.sets.items():
        unknown = [g for g in genes if g not in have]
        hint = [f"{g}(->{upper[g.upper()]})" if g.upper() in upper else g for g in unknown]
        rows.append({"set": name, "n_genes": len(genes), "n_measured": len(genes) - len(unknown),
                     "frac_measured": (len(genes) - len(unknown)) / len(genes),
                     "unknown": ",".join(hint),
                     "duplicated": ",".join(gs.duplicated.get(name, []))})
    return pd.DataFrame(rows).set_index("set")


# -- expression -----------------------------------------------------------------------------
def _is_log_scale(adata) -> bool:
    return str(adata.uns.get("histosr", {}).get("scale", "")) == "log1p_cp10k"


def expression(adata) -> np.ndarray:
    """float32 (n_obs, n_genes) log1p CP10k: as stored for spot-level predictions
    (``uns["histosr"]["scale"] == "log1p_cp10k"``), else normalised from counts."""
    from .tl import log_expression

    if _is_log_scale(adata):
        from .tl import _dense

        return np.asarray(_dense(adata.X), dtype=np.float32)
    return log_expression(adata, normalize=True)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")


def _decoupler():
    try:
        import decoupler
    except ImportError as e:
        raise ImportError("gene-set scoring with decoupler (ulm, aucell, zscore) needs "
                          "pip install 'histosr[pathways]' (or use method='mean')") from e
    return decoupler


def _score_matrix(X: np.ndarray, genes: list[str], sets: dict[str, list[str]], method: str,
                  seed: int = 0) -> np.ndarray:
    """float32 (n_obs, n_sets) scores of log1p expression ``X`` (n_obs, n_genes)."""
    names = list(sets)
    if len(X) == 0:
        return np.zeros((0, len(names)), np.float32)
    if method in PER_OBSERVATION:
        dc = _decoupler()
        net = pd.DataFrame([(k, g) for k in names for g in sets[k]], columns=["source", "target"])
        df = pd.DataFrame(X, columns=pd.Index(genes))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # empty=False: an all-zero gene or observation is kept, so a tile of a slide
            # scores exactly as it would inside the whole slide
            es, _ = getattr(dc.mt, method)(df, net, tmin=1, empty=False, verbose=False)
        return es.reindex(columns=names).to_numpy(dtype=np.float32)
    pos = {g: i for i, g in enumerate(genes)}
    if method == "mean":
        mu = X.mean(axis=0, dtype=np.float64)
        sd = X.std(axis=0, dtype=np.float64)
        out = np.empty((len(X), len(names)), np.float32)
        for j, k in enumerate(names):
            idx = [pos[g] for g in sets[k]]
            z = (X[:, idx] - mu[idx]) / np.where(sd[idx] > 0, sd[idx], 1.0)
            out[:, j] = z.mean(axis=1)
        return out
    try:
        import anndata as ad
        import scanpy as sc
    except ImportError as e:
        raise ImportError("method='score_genes' needs scanpy (pip install scanpy)") from e
    a = ad.AnnData(X=np.asarray(X, np.float32), var=pd.DataFrame(index=pd.Index(genes)))
    out = np.empty((len(X), len(names)), np.float32)
    for j, k in enumerate(names):
        sc.tl.score_genes(a, sets[k], score_name="_s", random_state=seed)
        out[:, j] = a.obs["_s"].to_numpy()
    return out


def score_gene_sets(adata, gene_sets, method: str = "ulm", key_added: str = "pathways",
                    min_size: int = 3, seed: int = 0, copy: bool = False):
    """Score every observation (spot or superpixel) for every gene set.

    Writes ``obsm[key_added]`` (DataFrame, observations x sets) and ``uns[key_added]``
    (method, genes measured per set, sets dropped for having fewer than ``min_size``
    measured genes). ``method``: see the module docstring. Returns the AnnData (a copy with
    ``copy=True``)."""
    _check_method(method)
    if copy:
        adata = adata.copy()
    gs = read_gene_sets(gene_sets)
    genes = list(map(str, adata.var_names))
    sets = gs.restrict(genes, min_size)
    dropped = [k for k in gs.sets if k not in sets]
    if not sets:
        rep = gene_set_report(gs, genes)
        raise InputError(f"no gene set has {min_size} or more measured genes (measured per set: "
                         f"{rep['n_measured'].to_dict()}); check the gene symbols against "
                         "var_names or lower min_size")
    if dropped:
        warnings.warn(f"gene sets with fewer than {min_size} measured genes were skipped: "
                      f"{dropped}", stacklevel=2)
    S = _score_matrix(expression(adata), genes, sets, method, seed)
    adata.obsm[key_added] = pd.DataFrame(S, index=adata.obs_names.copy(), columns=list(sets))
    adata.uns[key_added] = {"method": method, "min_size": int(min_size),
                            "n_measured": {k: len(v) for k, v in sets.items()},
                            "dropped": dropped, "source": gs.source}
    return adata


def scores_anndata(adata, key: str = "pathways"):
    """AnnData whose X is ``obsm[key]`` (observations x sets), with the observation layout
    (``obs`` row/col, ``obsm["spatial"]``, ``uns["histosr"]``) of ``adata``: pathway maps
    draw with :func:`histosr.pl.gene_map` (``log=False``) and write as h5ad."""
    import anndata as ad

    df = adata.obsm[key]
    keep = [c for c in ("row", "col") if c in adata.obs]
    out = ad.AnnData(X=df.to_numpy(dtype=np.float32), obs=adata.obs[keep].copy(),
                     var=pd.DataFrame(index=pd.Index(list(map(str, df.columns)))))
    if "spatial" in adata.obsm:
        out.obsm["spatial"] = np.asarray(adata.obsm["spatial"])
    info = dict(adata.uns.get("histosr", {}))
    info["scale"] = f"gene-set score ({adata.uns.get(key, {}).get('method', '?')})"
    out.uns["histosr"] = info
    if key in adata.uns:
        out.uns[key] = json.loads(json.dumps(adata.uns[key], default=str))
    return out


# -- whole slides: maps.zarr in, pathway maps out ---------------------------------------------
def score_maps(maps: str | Path, gene_sets, out: str | Path, method: str = "ulm",
               min_size: int = 3, tile: int = 128, progress: bool = False) -> Path:
    """Stream gene-set scores onto the 8 um grid of a ``maps.zarr`` written by
    :func:`histosr.outputs.predict_maps` (``maps``: genes x rows x cols, counts per
    superpixel, 0 outside tissue): tile x tile superpixels at a time (all genes of a tile
    in memory, so memory is bounded whatever the slide size). Writes a zarr group at
    ``out`` with ``scores`` (sets x rows x cols, float32, NaN outside tissue) and
    ``attrs["histosr"]`` (sets, method, genes measured per set). Only per-observation
    methods stream: ``ulm``, ``aucell``, ``zscore``."""
    import zarr
    from tqdm.auto import tqdm

    from .features.featuremap import create_zarr_array

    if method not in PER_OBSERVATION:
        raise InputError(f"streamed maps need a per-observation method {PER_OBSERVATION} "
                         f"(method={method!r} needs statistics over the whole slide)")
    root = zarr.open_group(str(maps), mode="r")
    arr = root["maps"]
    genes = json.loads(root.attrs["histosr"])["genes"]
    sets = read_gene_sets(gene_sets).restrict(genes, min_size)
    if not sets:
        raise InputError(f"no gene set has {min_size} or more genes among the {len(genes)} "
                         f"genes of {maps}")
    G, H, W = arr.shape
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dst = zarr.open_group(str(tmp), mode="w")
    scores = create_zarr_array(dst, "scores", (len(sets), H, W),
                               (len(sets), min(H, 256), min(W, 256)), "f4")
    tiles = [(r, c) for r in range(0, H, tile) for c in range(0, W, tile)]
    for r0, c0 in tqdm(tiles, desc="pathway maps", disable=not progress):
        r1, c1 = min(r0 + tile, H), min(c0 + tile, W)
        block = np.asarray(arr[:, r0:r1, c0:c1], dtype=np.float32)  # (G, h, w)
        lib = block.sum(axis=0)
        rr, cc = np.nonzero(lib > 0)
        res = np.full((len(sets), r1 - r0, c1 - c0), np.nan, np.float32)
        if len(rr):
            X = block[:, rr, cc].T
            X *= (1e4 / lib[rr, cc])[:, None]
            np.log1p(X, out=X)
            res[:, rr, cc] = _score_matrix(X, genes, sets, method).T
        scores[:, r0:r1, c0:c1] = res
    dst.attrs["histosr"] = json.dumps({"sets": list(sets), "method": method,
                                       "n_measured": {k: len(v) for k, v in sets.items()},
                                       "units": f"{method} score per 8 um superpixel",
                                       "maps": str(maps)})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def map_previews(scores: str | Path, out_dir: str | Path, max_side: int = 1024) -> list[Path]:
    """One PNG per set from a ``score_maps`` zarr, read strided (a thumbnail, never the
    whole map)."""
    import zarr

    from .pl import _plt, save_figure

    plt = _plt()
    root = zarr.open_group(str(scores), mode="r")
    arr = root["scores"]
    info = json.loads(root.attrs["histosr"])
    _, H, W = arr.shape
    f = max(1, int(np.ceil(max(H, W) / max_side)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(info["sets"]):
        img = np.asarray(arr[i, ::f, ::f])
        fig, ax = plt.subplots(figsize=(5.5, 5))
        im = ax.imshow(img, cmap="magma", interpolation="nearest")
        ax.set_title(f"{name} ({info['method']})")
        ax.set_axis_off()
        plt.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="score")
        paths.append(save_figure(fig, out_dir / f"pathway_{name}.png"))
    return paths


# -- markers and over-representation --------------------------------------------------------
def detected_genes(adata) -> list[str]:
    """Genes with a non-zero value in at least one observation (the ORA universe)."""
    import scipy.sparse as sp

    X = adata.X
    nz = (X != 0).sum(axis=0) if sp.issparse(X) else np.count_nonzero(np.asarray(X), axis=0)
    nz = np.asarray(nz).ravel()
    return [g for g, n in zip(map(str, adata.var_names), nz) if n > 0]


def domain_markers(adata, groupby: str = "domain", n_markers: int = 100,
                   method: str = "t-test", min_logfc: float = 0.25,
                   max_padj: float = 0.05) -> pd.DataFrame:
    """Marker genes of each group in ``obs[groupby]`` against the rest, on log1p CP10k:
    Welch's t-test (``"t-test"``) or the Mann-Whitney U test (``"wilcoxon"``), both from
    scipy and vectorised over genes, BH-adjusted within each group. A marker has
    ``logfc`` (difference of mean log1p, natural log) >= ``min_logfc`` and ``padj`` <=
    ``max_padj``; the ``n_markers`` with the largest statistic are kept per group.
    Returns a long table (group, gene, statistic, logfc, pvalue, padj), best first."""
    from scipy import stats

    if groupby not in adata.obs:
        raise InputError(f"obs[{groupby!r}] is missing: run histosr.tl.domains(adata) first "
                         f"(present: {list(adata.obs.columns)})")
    if method not in ("t-test", "wilcoxon"):
        raise InputError(f"method must be 't-test' or 'wilcoxon', got {method!r}")
    X = expression(adata)
    genes = np.asarray(list(map(str, adata.var_names)))
    lab = adata.obs[groupby].astype(str).to_numpy()
    rows = []
    for grp in sorted(pd.unique(lab), key=lambda s: (len(s), s)):
        m = lab == grp
        if m.sum() < 2 or (~m).sum() < 2:
            continue
        a, b = X[m], X[~m]
        with np.errstate(invalid="ignore", divide="ignore"):
            if method == "t-test":
                st, p = stats.ttest_ind(a, b, axis=0, equal_var=False)
            else:
                st, p = stats.mannwhitneyu(a, b, axis=0, alternative="two-sided")
                st = st / (len(a) * len(b)) - 0.5  # AUC - 0.5: comparable across groups
        st, p = np.nan_to_num(st, nan=0.0), np.nan_to_num(p, nan=1.0)
        padj = stats.false_discovery_control(p, method="bh")
        lfc = a.mean(axis=0) - b.mean(axis=0)
        ok = np.flatnonzero((lfc >= min_logfc) & (padj <= max_padj) & (st > 0))
        ok = ok[np.argsort(-st[ok], kind="stable")][: int(n_markers)]
        for i in ok:
            rows.append((grp, genes[i], float(st[i]), float(lfc[i]), float(p[i]),
                         float(padj[i])))
    return pd.DataFrame(rows, columns=["group", "gene", "statistic", "logfc", "pvalue", "padj"])


def ora(query, gene_sets, universe, min_size: int = 1) -> pd.DataFrame:
    """Over-representation of ``query`` genes in each gene set (one-sided hypergeometric
    test, scipy), within ``universe``: M = universe size, n = set genes in the universe,
    N = query genes in the universe, k = overlap, p = P(X >= k). BH-adjusted over the sets
    tested. Columns: set, n_set, n_query, overlap, expected, fold, pvalue, padj, genes;
    sorted by p-value."""
    from scipy import stats

    uni = list(dict.fromkeys(map(str, universe)))
    uset = set(uni)
    q = [g for g in dict.fromkeys(map(str, query)) if g in uset]
    sets = read_gene_sets(gene_sets).restrict(uni, min_size)
    M, N = len(uni), len(q)
    qs = set(q)
    rows = []
    for name, genes in sets.items():
        hit = [g for g in genes if g in qs]
        n, k = len(genes), len(hit)
        p = float(stats.hypergeom.sf(k - 1, M, n, N)) if N and k else 1.0
        exp = n * N / M if M else 0.0
        rows.append({"set": name, "n_set": n, "n_query": N, "overlap": k, "expected": exp,
                     "fold": k / exp if exp > 0 else np.nan, "pvalue": p, "genes": ",".join(hit)})
    df = pd.DataFrame(rows, columns=["set", "n_set", "n_query", "overlap", "expected", "fold",
                                     "pvalue", "genes"])
    df["padj"] = stats.false_discovery_control(df["pvalue"].to_numpy(), method="bh") \
        if len(df) else []
    cols = ["set", "n_set", "n_query", "overlap", "expected", "fold", "pvalue", "padj", "genes"]
    return df[cols].sort_values(["pvalue", "set"], kind="stable").reset_index(drop=True)


def enrich(adata, gene_sets, groupby: str | None = "domain", svg: bool = True,
           n_markers: int = 100, n_svg: int = 100, marker_method: str = "t-test",
           universe=None, min_size: int = 3, key_added: str = "enrichment",
           **svg_kwargs) -> pd.DataFrame:
    """Over-representation of each domain's markers (``obs[groupby]``, e.g. from
    :func:`histosr.tl.domains`; :func:`domain_markers`) and of the top ``n_svg``
    spatially variable genes (``var["spatially_variable"]`` when present, else
    :func:`histosr.tl.spatially_variable_genes`) in the gene sets.

    ``universe``: default the genes detected in ``adata`` (:func:`detected_genes`). Sets with
    fewer than ``min_size`` genes in the universe are not tested. Returns one table ranked
    by adjusted p-value within each query (column ``query``: ``"domain <k>"`` or
    ``"spatially variable"``; BH within each query), also stored in ``uns[key_added]``."""
    gs = read_gene_sets(gene_sets)
    uni = detected_genes(adata) if universe is None else list(map(str, universe))
    queries: dict[str, list[str]] = {}
    if groupby is not None:
        mk = domain_markers(adata, groupby, n_markers, marker_method)
        for grp in sorted(adata.obs[groupby].astype(str).unique(), key=lambda s: (len(s), s)):
            queries[f"{groupby} {grp}"] = mk.loc[mk["group"] == grp, "gene"].tolist()
    if svg:
        if "spatially_variable" not in adata.var and "spatial" not in adata.obsm and not (
                "row" in adata.obs and "col" in adata.obs):
            raise InputError("spatially variable genes need obs row/col (superpixels) or "
                             "obsm['spatial'] (spots); pass svg=False to test domains only")
        if "spatially_variable" not in adata.var:
            from .tl import spatially_variable_genes

            spatially_variable_genes(adata, n=n_svg, **svg_kwargs)
        sv = adata.var_names[adata.var["spatially_variable"].to_numpy(bool)]
        queries["spatially variable"] = list(map(str, sv))
    if not queries:
        raise InputError("nothing to test: give groupby= (domains) and/or svg=True")
    parts = []
    for name, genes in queries.items():
        t = ora(genes, gs, uni, min_size)
        t.insert(0, "query", name)
        parts.append(t.sort_values(["padj", "pvalue", "set"], kind="stable"))
    table = pd.concat(parts, ignore_index=True)
    table["universe"] = len(uni)
    adata.uns[key_added] = table
    return table


def summarize(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per query: the most significant set with ``padj <= alpha`` (``"none"`` if none),
    its adjusted p-value, overlap and genes."""
    rows = []
    for q, t in table.groupby("query", sort=False):
        t = t.sort_values(["padj", "pvalue"], kind="stable")
        best = t.iloc[0] if len(t) and t.iloc[0]["padj"] <= alpha else None
        rows.append({"query": q, "enriched_for": best["set"] if best is not None else "none",
                     "padj": float(best["padj"]) if best is not None else np.nan,
                     "overlap": int(best["overlap"]) if best is not None else 0,
                     "genes": best["genes"] if best is not None else "",
                     "all_significant": ",".join(t.loc[t["padj"] <= alpha, "set"])})
    return pd.DataFrame(rows)


# -- measured reference and spot aggregation --------------------------------------------------
def measured_set_scores(section, sets: dict[str, list[str]]) -> pd.DataFrame:
    """Per measured spot: mean over each set's genes of the z-scored log1p CP10k (library =
    all measured genes): what the spots themselves say about each programme."""
    from .metrics import log_cp10k

    lib = np.asarray(section.counts.X.sum(axis=1)).ravel().astype(np.float64)
    out = {}
    for k, genes in sets.items():
        g = [x for x in genes if x in section.counts.var_names]
        if not g:
            continue
        X = log_cp10k(section.dense_counts(g), lib)
        sd = X.std(axis=0)
        out[k] = ((X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)).mean(axis=1)
    return pd.DataFrame(out, index=section.counts.obs_names.copy())


def spot_means(pred, section, values: np.ndarray) -> np.ndarray:
    """Mean of per-superpixel ``values`` (n_superpixels, k) over each measured spot's
    footprint (superpixels whose centre lies in the spot disk): (n_spots, k), NaN for a
    spot with no tissue superpixel."""
    import scipy.sparse as sp

    from .geometry import grid_for, section_footprints

    grid = grid_for(section)
    F = section_footprints(section, grid)  # (n_spots, H*W)
    flat = grid.flat(pred.obs["row"].to_numpy(), pred.obs["col"].to_numpy())
    A = sp.csr_matrix(F[:, flat])
    n = np.asarray(A.sum(axis=1)).ravel()
    v = np.nan_to_num(np.asarray(values, np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(A @ v) / n[:, None]


# -- pipeline and CLI ----------------------------------------------------------------------------
ANALYSIS_KEYS = {"gene_sets": None, "method": "ulm", "min_size": 3, "enrich": True,
                 "n_domains": 6, "n_markers": 100, "n_svg": 100, "marker_method": "t-test"}


class PipelineAnalysis:
    """The ``analysis`` block of a run config: ``{gene_sets: FILE.gmt | {name: [genes]},
    method: ulm, min_size: 3, enrich: true, n_domains: 6, n_markers: 100, n_svg: 100}``.
    Built (and checked, reading the GMT) before any heavy work; a no-op without
    ``gene_sets``."""

    def __init__(self, cfg: dict | None):
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(ANALYSIS_KEYS))
        if unknown:
            raise InputError(f"unknown keys in analysis: {unknown}; expected some of "
                             f"{sorted(ANALYSIS_KEYS)}")
        self.cfg = {**ANALYSIS_KEYS, **cfg}
        _check_method(self.cfg["method"])
        gs = self.cfg["gene_sets"]
        self.gene_sets = read_gene_sets(gs) if gs else None

    def __bool__(self) -> bool:
        return self.gene_sets is not None

    def add_genes(self, genes: list[str], section) -> list[str]:
        """``genes`` plus the sets' genes the section measured (so the maps can show them)."""
        if not self:
            return list(genes)
        have = set(map(str, section.counts.var_names))
        extra = [g for g in self.gene_sets.genes if g in have and g not in set(genes)]
        return list(genes) + extra

    def run(self, pred, spots_pred, section, out: str | Path, rep) -> None:
        """Pathway maps (``pathways.h5ad``, previews, spot-level PCC against the measured
        spots) and the enrichment table (``enrichment.tsv``, dot plot) into the run."""
        if not self:
            return
        from .outputs import write_h5ad

        out = Path(out)
        c = self.cfg
        with rep.stage("pathways"):
            rpt = gene_set_report(self.gene_sets, pred.var_names)
            rep.outputs["gene_sets_report"] = str(_write_tsv(rpt, out / "gene_sets_report.tsv"))
            score_gene_sets(pred, self.gene_sets, c["method"], min_size=int(c["min_size"]))
            sets = self.gene_sets.restrict(pred.var_names, int(c["min_size"]))
            scores = scores_anndata(pred)
            rep.outputs["pathways"] = str(write_h5ad(scores, out / "pathways.h5ad",
                                                     section=section))
            ref = measured_set_scores(section, sets)
            if "row" in pred.obs:
                at_spots = spot_means(pred, section, scores.X)
            else:  # spot-level prediction: its observations are the spots
                at_spots = scores.to_df().reindex(section.counts.obs_names).to_numpy()
            from .metrics import pcc_per_gene

            for j, name in enumerate(scores.var_names):
                if name in ref:
                    ok = np.isfinite(at_spots[:, j])
                    r = pcc_per_gene(at_spots[ok, j:j + 1], ref[name].to_numpy()[ok, None])
                    rep.metrics[f"pathway_spot_pcc[{name}]"] = float(r[0])
            rep.images += pathway_previews(scores, ref, section, out / "previews")
            rep.notes.append(f"pathway maps: {c['method']} scores of {list(sets)} per "
                             "superpixel; pathway_spot_pcc = Pearson r between each map's "
                             "mean over a spot's footprint and the mean z-scored measured "
                             "expression of the set's genes at that spot (in-sample)")
        if not c["enrich"]:
            return
        with rep.stage("enrich"):
            table, summary, dot = run_enrichment(pred, self.gene_sets, out, c)
            rep.outputs["enrichment"] = str(out / "enrichment.tsv")
            rep.images.append(dot)
            for _, row in summary.iterrows():
                rep.metrics[f"enriched[{row['query']}]"] = (
                    f"{row['enriched_for']} (padj {row['padj']:.2g}, {row['genes']})"
                    if row["enriched_for"] != "none" else "none")


def _write_tsv(df: pd.DataFrame, path: Path) -> Path:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    df.to_csv(tmp, sep="\t")
    os.replace(tmp, path)
    return path


def pathway_previews(scores, ref: pd.DataFrame | None, section, out_dir: str | Path,
                     prefix: str = "pathway_") -> list[Path]:
    """One PNG per set: the measured spots' score (when ``ref`` has it) next to the map."""
    import anndata as ad

    from .pl import _plt, gene_map, save_figure

    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in map(str, scores.var_names):
        n = 2 if ref is not None and name in ref else 1
        fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 5))
        axes = np.atleast_1d(axes)
        if n == 2:
            sp = ad.AnnData(X=ref[[name]].to_numpy(np.float32),
                            var=pd.DataFrame(index=[name]))
            sp.obsm["spatial"] = section.xy
            gene_map(sp, name, section=section, ax=axes[0], log=False,
                     title=f"{name}: measured spots (mean z)")
        gene_map(scores, name, section=section, ax=axes[-1], log=False,
                 title=f"{name}: map ({scores.uns['histosr'].get('scale', 'score')})")
        fig.tight_layout()
        paths.append(save_figure(fig, out_dir / f"{prefix}{name}.png"))
    return paths


def run_enrichment(adata, gene_sets, out: str | Path, cfg: dict | None = None):
    """Domains (when ``obs["domain"]`` is absent: :func:`histosr.tl.domains` with
    ``n_domains``), markers, spatially variable genes, ORA; writes ``enrichment.tsv``,
    ``enrichment_summary.tsv`` and ``enrichment.png`` into ``out``. Returns (table,
    summary, dot plot path)."""
    from .pl import enrichment as dotplot
    from .tl import domains

    c = {**ANALYSIS_KEYS, **(cfg or {})}
    out = Path(out)
    if "domain" not in adata.obs:
        domains(adata, n_domains=int(c["n_domains"]))
    table = enrich(adata, gene_sets, "domain", n_markers=int(c["n_markers"]),
                   n_svg=int(c["n_svg"]), marker_method=c["marker_method"],
                   min_size=int(c["min_size"]))
    _write_tsv(table, out / "enrichment.tsv")
    summary = summarize(table)
    _write_tsv(summary, out / "enrichment_summary.tsv")
    fig = dotplot(table)
    dot = out / "enrichment.png"
    fig.savefig(dot, dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return table, summary, dot


def enrich_run(run_dir: str | Path, gene_sets, out: str | Path | None = None,
               prediction: str | Path | None = None, method: str = "ulm",
               **cfg) -> dict:
    """``histosr enrich RUN_DIR``: pathway scores and the enrichment table of a finished
    run's prediction (``prediction.h5ad``), written into ``out`` (default
    ``RUN_DIR/enrich``). The run folder is only read."""
    import anndata as ad

    from .outputs import write_h5ad

    run_dir = Path(run_dir)
    path = Path(prediction) if prediction else run_dir / "prediction.h5ad"
    if not path.is_file():
        raise FileNotFoundError(f"no prediction to enrich: expected {path} (a run folder "
                                "written by `histosr run` / `histosr predict`, or pass "
                                "--prediction FILE.h5ad)")
    gs = read_gene_sets(gene_sets)
    _check_method(method)
    out = Path(out) if out else run_dir / "enrich"
    out.mkdir(parents=True, exist_ok=True)
    pred = ad.read_h5ad(path)
    rpt = gene_set_report(gs, pred.var_names)
    _write_tsv(rpt, out / "gene_sets_report.tsv")
    min_size = int(cfg.get("min_size", ANALYSIS_KEYS["min_size"]))
    score_gene_sets(pred, gs, method, min_size=min_size)
    scores = scores_anndata(pred)
    write_h5ad(scores, out / "pathways.h5ad")
    previews = pathway_previews(scores, None, None, out / "previews")
    table, summary, dot = run_enrichment(pred, gs, out, cfg)
    return {"report": rpt, "table": table, "summary": summary, "dotplot": dot,
            "pathways": out / "pathways.h5ad", "previews": previews, "out": out}


__all__ = ["GeneSets", "read_gmt", "read_gene_sets", "gene_set_report", "score_gene_sets",
           "score_maps", "map_previews", "domain_markers", "ora", "enrich", "summarize",
           "detected_genes", "measured_set_scores", "spot_means", "scores_anndata",
           "PipelineAnalysis", "enrich_run", "METHODS"]
