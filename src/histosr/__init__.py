"""histosr: histology-guided super-resolution of spatial transcriptomics.

scanpy-style verbs over one data object (:class:`Section` in, AnnData out)::

    import histosr as hs
    s = hs.read_her2st("../shared/data/her2st", "C2")
    fm = hs.features(s)                       # handcrafted encoder, 8 um grid
    m = hs.fit(s, fm, method="istar")         # genes: the HEST rule's top 1000
    adata = hs.predict(m, s, fm)              # one observation per tissue superpixel
    hs.pl.gene_map(adata, "ERBB2", section=s)

Readers ``hs.read_*`` (and ``hs.read`` to detect the layout), ``hs.pp`` (gene selection),
``hs.tl`` (domains, spatial statistics), ``hs.pl`` (plots), ``hs.fit`` / ``hs.predict`` (any
registered method: ``hs.available_methods()``), ``hs.features`` (encoders).
"""

from __future__ import annotations

__version__ = "0.2.0"

from . import pl, pp  # noqa: E402
from .errors import InputError  # noqa: E402
from .section import Section, SectionError  # noqa: E402

READERS = ["read", "read_her2st", "read_st", "read_visium", "read_visium_hd", "read_xenium",
           "read_hest", "read_istar", "read_h5ad", "read_spatialdata", "read_simulated"]
_LAZY = {
    **{name: ("io", name) for name in READERS + ["write_istar", "write_spatialdata"]},
    "aggregate_cells": ("cells", "aggregate_cells"),  # per-cell sums of a prediction
    "simulate_from": ("simulate", "simulate_from"),  # pseudo-Visium + 8 um truth from HD / Xenium
    "get_method": ("methods.base", "get_method"),
    "load_method": ("methods.base", "load_method"),
    "available_methods": ("methods.base", "available_methods"),
}


def __getattr__(name):
    # readers and heavy modules import lazily so `import histosr` stays fast
    import importlib

    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    if name in ("features", "tl", "io", "methods", "benchmark"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'histosr' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


def fit(sections, features=None, method: str = "istar", genes=None, **params):
    """Build ``method`` (a registered name) with hyper-parameters ``params`` and fit it on
    one or more sections (and, for super-resolution methods that read image features, their
    FeatureMaps). ``genes``: default the HEST rule's top 1000 (:func:`histosr.pp.select_genes`),
    a list, or ``"all"``. Returns the fitted method."""
    from .methods.base import get_method

    return get_method(method, **params).fit(sections, features, genes=genes)


def predict(method, section, features=None, at=None, **kwargs):
    """``method.predict(section, features, at=...)``: an AnnData at the method's natural
    target (``at=None``: 8 um superpixels for super-resolution methods, spots for spot-level
    methods), at ``"spots"``, or at an (n, 2) array of full-resolution (x, y) px."""
    return method.predict(section, features, at=at, **kwargs)


__all__ = ["Section", "SectionError", "InputError", "fit", "predict", "features", "pp", "tl",
           "pl", "io", "methods", "benchmark", "__version__", *_LAZY]
