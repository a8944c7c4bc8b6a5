"""Simulated sections with a known 8 um truth, in one place.

* :mod:`~histosr.simulate.synthetic`: a synthetic H&E with four tissue classes and genes
  driven by them (:func:`synthetic_section`, :func:`synthetic_visium`), and pseudo-Visium
  spots pooled from any section with a truth (:func:`pseudo_visium`).
* :mod:`~histosr.simulate.from_real`: the truth rasterised from real Visium HD 8 um bins or
  Xenium cells (:func:`simulate_from`), and simulated sections on disk
  (:func:`write_simulated`, :func:`read_simulated`, :func:`simulated_sections`).
"""

from .from_real import (
    detect_hd_format,
    is_simulated,
    read_simulated,
    simulate_from,
    simulated_sections,
    truth_from_bins,
    truth_from_cells,
    write_simulated,
)
from .synthetic import (
    CLASSES,
    pseudo_visium,
    pseudo_visium_centres,
    synthetic_section,
    synthetic_visium,
)

__all__ = ["CLASSES", "synthetic_section", "synthetic_visium", "pseudo_visium",
           "pseudo_visium_centres", "truth_from_bins", "truth_from_cells", "simulate_from",
           "write_simulated", "read_simulated", "simulated_sections", "is_simulated",
           "detect_hd_format"]
