"""histosr: histology-guided super-resolution of spatial transcriptomics."""

__version__ = "0.1.0"

from .section import Section, SectionError  # noqa: E402

__all__ = ["Section", "SectionError", "__version__"]
