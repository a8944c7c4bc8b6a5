"""Dense and sparse expression matrices, one way: every public function that reads ``X``
goes through these helpers, so CSR/CSC/COO matrices, ``np.matrix``, AnnData views and
backed datasets are all accepted.

Space Ranger and most h5ad files hold sparse counts; ``np.asarray`` on a scipy sparse
matrix silently builds a 0-d object array, which is why nothing here calls it directly.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: rows (spots) of an expression matrix handled at once by the blockwise helpers here and
#: their callers: a float64 block of 2048 spots x 1000 genes is 16 MB
ROW_BLOCK = 2048


def dense(x, dtype=np.float64) -> np.ndarray:
    """``x`` as a dense ndarray of ``dtype`` (a copy only where a conversion needs one)."""
    if sp.issparse(x):
        x = x.toarray()
    elif hasattr(x, "to_memory"):  # anndata backed / lazy arrays
        return dense(x.to_memory(), dtype)
    elif hasattr(x, "toarray"):  # anndata's sparse datasets and other array-likes
        x = x.toarray()
    return np.asarray(x, dtype=dtype)


def row_sums(x) -> np.ndarray:
    """float64 (n_rows,) sums of each row (a spot's library size when ``x`` holds counts)."""
    if sp.issparse(x):
        return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    if isinstance(x, np.ndarray):  # no float64 copy of a float32 matrix
        return x.sum(axis=1, dtype=np.float64).reshape(len(x))
    return dense(x).sum(axis=1)


def gene_values(adata, gene: str, dtype=np.float64) -> np.ndarray:
    """(n_obs,) values of one gene (column) of an AnnData, dense or sparse."""
    j = adata.var_names.get_loc(gene)
    return dense(adata.X[:, j], dtype).reshape(-1)


def columns(adata, genes, dtype=np.float64, layer: str | None = None,
            block: int = ROW_BLOCK) -> np.ndarray:
    """(n_obs, len(genes)) dense values of ``genes`` in the order given (of ``layer``, else
    of X). Filled in blocks of ``block`` rows: no second (n_obs x genes) copy in the stored
    dtype next to the result (a whole slide's 21,540 spots x 1000 genes: 86 MB)."""
    idx = adata.var_names.get_indexer(list(genes))
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx) if i < 0][:5]
        raise KeyError(f"genes not in the AnnData: {missing}")
    x = adata.X if layer is None else adata.layers[layer]
    n = x.shape[0]
    if n <= block:
        return dense(x[:, idx], dtype)
    out = np.empty((n, len(idx)), dtype=dtype)
    for a in range(0, n, block):
        out[a : a + block] = dense(x[a : a + block][:, idx], dtype)
    return out


def column_stats(x, block: int = ROW_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float64 (n_cols,) mean and fraction of rows > 0 of every column, over blocks of
    ``block`` rows (no dense float64 copy of ``x``)."""
    n = x.shape[0]
    total, det = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    if sp.issparse(x):
        x = x.tocsr()
    for a in range(0, n, block):
        b = x[a : a + block]
        if sp.issparse(b):
            total += np.asarray(b.sum(axis=0), dtype=np.float64).ravel()
            det += np.asarray((b > 0).sum(axis=0), dtype=np.float64).ravel()
        else:
            b = dense(b, np.float64) if not isinstance(b, np.ndarray) else b
            total += b.sum(axis=0, dtype=np.float64)
            det += (b > 0).sum(axis=0)
    return total / max(n, 1), det / max(n, 1)


def add_sparse_product(out: np.ndarray, A, B: np.ndarray) -> np.ndarray:
    """``out += A @ B`` for a sparse ``A`` (rows x k) and dense ``B`` (k x cols), touching
    only the rows of ``A`` with an entry: a block of superpixels covers few footprints,
    and ``A @ B`` alone would be a dense (all footprints x genes) temporary per block
    (172 MB float64 for 21,540 spots x 1000 genes). Same values as ``out += A @ B``."""
    A = sp.csr_matrix(A) if not sp.isspmatrix_csr(A) else A
    rows = np.flatnonzero(np.diff(A.indptr))
    if len(rows):
        out[rows] += A[rows] @ B
    return out


__all__ = ["ROW_BLOCK", "dense", "row_sums", "gene_values", "columns", "column_stats",
           "add_sparse_product"]
