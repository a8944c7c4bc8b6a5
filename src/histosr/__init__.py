"""histosr: histology-guided super-resolution of spatial transcriptomics.

scanpy-style verbs over one data object (:class:`Section` in, AnnData out)::

    import histosr as hs
    s = hs.read_her2st("../shared/data/her2st", "C2")
    fm = hs.features(s)                       # handcrafted encoder, 8 um grid
    m = hs.fit(s, fm, method="istar")
    adata = hs.predict(m, s, fm)              # one observation per tissue superpixel
    hs.pl.gene_map(adata, "ERBB2", section=s)
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import pl  # noqa: E402
from .section import Section, SectionError  # noqa: E402


def __getattr__(name):
    # readers (histosr.read_visium, ...) import lazily so `import histosr` stays fast
    if name.startswith("read") or name in ("write_istar", "write_spatialdata"):
        from . import io

        return getattr(io, name)
    if name == "aggregate_cells":  # per-cell sums of a super-resolved prediction
        from .cells import aggregate_cells

        return aggregate_cells
    if name == "simulate_from":  # pseudo-Visium + 8 um truth from Visium HD / Xenium
        from .truth import simulate_from

        return simulate_from
    if name in ("features", "tl"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'histosr' has no attribute {name!r}")


def fit(sections, features, method: str = "istar", genes: list[str] | None = None, **params):
    """Build method ``method`` with ``params`` and fit it on sections + feature maps."""
    from .methods.base import get_method

    return get_method(method, **params).fit(sections, features, genes=genes)


def predict(method, section, features, at="superpixels", **kwargs):
    """``method.predict(section, features, at=...)`` (AnnData)."""
    return method.predict(section, features, at=at, **kwargs)


__all__ = ["Section", "SectionError", "fit", "predict", "pl", "tl", "features", "__version__"]
