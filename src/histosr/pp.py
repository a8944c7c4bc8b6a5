"""Preprocessing (scanpy's ``pp``): the one gene-selection rule of histosr.

:func:`select_genes` is the HEST-Benchmark rule used everywhere - ``histosr run`` / ``fit``
defaults, the benchmark gene sets (``top50`` = the first 50 of ``hvg1000``), simulation
panels - pooled over sections the way scanpy's ``highly_variable_genes(batch_key=...)`` pools
batches: genes measured in every section, detected (count > 0) in at least ``min_frac`` of
the pooled spots, ranked by the variance over the pooled spots of log1p CP10k (each spot's
library = its total over ALL its measured genes, not only the candidates).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

from .arrays import ROW_BLOCK, dense, row_sums
from .errors import InputError


def _tables(data) -> list:
    """AnnData counts tables of a Section, an AnnData or a list of either."""
    items = data if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise InputError("select_genes needs at least one section")
    return [getattr(d, "counts", d) for d in items]


def shared_genes(data) -> list[str]:
    """Genes measured in every section, in the first section's order."""
    tabs = _tables(data)
    common = set(map(str, tabs[0].var_names))
    for t in tabs[1:]:
        common &= set(map(str, t.var_names))
    return [str(g) for g in tabs[0].var_names if str(g) in common]


#: spots per block of :func:`select_genes`
SPOT_BLOCK = ROW_BLOCK


def _gene_blocks(tabs, genes: list[str]):
    """Yield (float64 block of ``genes``' counts, its spots' libraries over ALL genes), a
    block of :data:`SPOT_BLOCK` spots at a time, over every table."""
    for t in tabs:
        X = t.X.tocsr() if sp.issparse(t.X) else t.X
        idx = t.var_names.get_indexer(genes)
        for a in range(0, t.n_obs, SPOT_BLOCK):
            block = X[a : a + SPOT_BLOCK]
            yield dense(block[:, idx]), row_sums(block)


def _pooled_log_cp10k_var(tabs, genes: list[str], n: int) -> np.ndarray:
    """Variance of log1p CP10k of ``genes`` over the pooled spots (two passes over spot
    blocks: the mean, then the squared deviations, as ``ndarray.var`` computes it)."""
    from .metrics import log_cp10k

    total = np.zeros(len(genes))
    for sub, lib in _gene_blocks(tabs, genes):
        total += log_cp10k(sub, lib).sum(axis=0)
    mean = total / n
    ss = np.zeros(len(genes))
    for sub, lib in _gene_blocks(tabs, genes):
        ss += ((log_cp10k(sub, lib) - mean) ** 2).sum(axis=0)
    return ss / n


def select_genes(data, n_top: int | None = 1000, min_frac: float = 0.10,
                 include=None) -> list[str]:
    """The HEST rule over the pooled spots of ``data`` (a Section, an AnnData of raw counts,
    or a list of them): genes measured in all of them, detected in >= ``min_frac`` of the
    pooled spots, the ``n_top`` with the highest variance of log1p CP10k (``None``: all that
    pass). Ties keep the first section's gene order, so a smaller ``n_top`` gives a prefix.

    ``include``: genes the user names (previews, markers); they are appended when measured
    in every section, and a warning names those that are not. Fewer than ``n_top`` genes are
    returned when fewer pass the filter."""
    if n_top is not None and int(n_top) < 1:
        raise InputError(f"n_top must be >= 1 (or None for every gene that passes), got {n_top}")
    if not 0.0 <= float(min_frac) <= 1.0:
        raise InputError(f"min_frac must be in [0, 1], got {min_frac}")
    tabs = _tables(data)
    genes = shared_genes(tabs)
    chosen: list[str] = []
    n_spots = sum(t.n_obs for t in tabs)
    if genes and n_spots:
        # blocks of spots: no (spots x genes) float64 copies (a Visium HD or 40,000 px
        # section's counts would be copied five times over)
        det = np.zeros(len(genes))
        for sub, _ in _gene_blocks(tabs, genes):
            det += (sub > 0).sum(axis=0)
        keep = np.flatnonzero(det / n_spots >= float(min_frac))
        if len(keep):
            var = _pooled_log_cp10k_var(tabs, [genes[i] for i in keep], n_spots)
            order = np.argsort(-var, kind="stable")
            if n_top is not None:
                order = order[: int(n_top)]
            chosen = [genes[keep[i]] for i in order]
    extra = [str(g) for g in (include or []) if str(g) not in chosen]
    missing = [g for g in extra if g not in genes]
    if missing:
        warnings.warn(f"{len(missing)} requested gene(s) not measured in every section, left "
                      f"out: {', '.join(missing[:10])}", stacklevel=2)
    return chosen + [g for g in extra if g in genes]


__all__ = ["select_genes", "shared_genes"]


def downsample_depth(section, median_umi: float, seed: int = 0):
    """A copy of ``section`` whose counts are binomially thinned so that the median total
    per spot is about ``median_umi`` (each count kept with probability ``p = median_umi /
    median library``, independently; nothing changes when the section is already that
    shallow). Seeded: the same seed gives the same counts. The thinning is recorded in
    ``meta["downsampled"]``. Models a shallower library of the same tissue, so a method can
    be scored on thinned counts against the full-depth truth."""
    import dataclasses

    from .errors import InputError
    from .section import make_counts

    if not median_umi > 0:
        raise InputError(f"median_umi must be > 0 UMI per spot, got {median_umi!r}")
    X = section.counts.X
    lib = row_sums(X)
    med = float(np.median(lib)) if len(lib) else 0.0
    p = min(1.0, float(median_umi) / med) if med > 0 else 1.0
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 20260650]))
    if sp.issparse(X):
        Y = sp.csr_matrix(X, dtype=np.float64, copy=True)
        Y.data = rng.binomial(np.rint(Y.data).astype(np.int64), p).astype(np.float64)
        Y.eliminate_zeros()
    else:
        Y = rng.binomial(np.rint(dense(X)).astype(np.int64), p).astype(np.float64)
    c = section.counts
    counts = make_counts(Y, c.obs_names, c.var_names, section.xy, obs=c.obs)
    meta = {**section.meta, "downsampled": {"median_umi": float(median_umi), "p": p,
                                            "median_before": med, "seed": int(seed),
                                            "median_after": float(np.median(row_sums(Y)))}}
    return dataclasses.replace(section, counts=counts, meta=meta)


__all__ += ["downsample_depth"]
