"""Accuracy protocols of BENCHMARKS.md: the only code that computes their numbers.

``run("p2" | "p4" | "domains", method, ...)`` is what ``histosr benchmark`` calls; :func:`p2`,
:func:`p4` and :func:`domains` (tissue domains against pathologist labels) are the protocols
themselves. Each returns the results dict
(``{"protocol", "method", "encoder", "params", "sections", "mean", "seconds",
"peak_rss_mb"}``) and, given ``out``, writes it to ``out/results.json``.
"""

from __future__ import annotations

from .domains import domains
from .p2 import p2
from .p4 import p4, score_superpixels
from .report import read_results, write_results

PROTOCOLS = {"p2": p2, "p4": p4, "domains": domains}


def run(protocol: str, method, encoder: str = "handcrafted", data=None, sections=None,
        epochs: int | None = None, n_states: int | None = None, seed: int = 0, out=None,
        consistency: bool | None = None, progress: bool = True) -> dict:
    """Run a protocol by name. ``method``: registered name or Method instance;
    ``consistency``: True/False forces the shared mass-preserving step, ``None`` keeps the
    method's default (the setting used is recorded in ``params["consistency"]``);
    ``epochs``/``n_states``: below the published defaults they are recorded as such."""
    key = str(protocol).lower()
    if key not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: expected one of {sorted(PROTOCOLS)} "
                         "(p1 and p3 are not implemented yet)")
    return PROTOCOLS[key](method, sections=sections, encoder=encoder, data=data, epochs=epochs,
                          n_states=n_states, seed=seed, consistency=consistency, out=out,
                          progress=progress)


__all__ = ["run", "p2", "p4", "domains", "score_superpixels", "write_results", "read_results",
           "PROTOCOLS"]
