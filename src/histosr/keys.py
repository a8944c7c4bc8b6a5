"""JSON values and cache keys, one way.

* :func:`jsonable`: a value made JSON-safe (NumPy scalars and arrays, tuples, paths).
* :func:`digest`: a short stable hash of JSON-able values, NumPy arrays and sparse matrices;
  every cache key and checkpoint key of histosr (feature maps, crops, nuclei counts, fitted
  models of a run, ensemble members) is one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import scipy.sparse as sp


def jsonable(x: Any) -> Any:
    """``x`` with NumPy scalars/arrays as numbers/lists, tuples as lists, paths and other
    objects as text (mapping keys as text)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if x is None or isinstance(x, (str, bool, int, float)):
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)


def dumps(x: Any, **kw) -> str:
    """``json.dumps`` of :func:`jsonable` ``x`` (sorted keys unless told otherwise)."""
    kw.setdefault("sort_keys", True)
    return json.dumps(jsonable(x), **kw)


def _update(h, p) -> None:
    if sp.issparse(p):
        p = p.tocsr()
        h.update(f"csr{p.shape}{p.dtype.str}".encode())
        for a in (p.data, p.indices, p.indptr):
            h.update(np.ascontiguousarray(a).tobytes())
    elif isinstance(p, np.ndarray):
        a = np.ascontiguousarray(p)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(memoryview(a.reshape(-1)).cast("B") if a.size else b"")
    else:
        h.update(dumps(p).encode())
    h.update(b"\x00")


def digest(*parts: Any, size: int = 16) -> str:
    """Hex digest (``2 * size`` characters) of ``parts``: JSON-able values, arrays, sparse
    matrices, in order."""
    h = hashlib.blake2b(digest_size=size)
    for p in parts:
        _update(h, p)
    return h.hexdigest()


__all__ = ["jsonable", "dumps", "digest"]
