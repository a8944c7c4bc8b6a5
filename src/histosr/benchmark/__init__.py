"""Accuracy protocols of BENCHMARKS.md: the only code that computes their numbers.

``run("p1" | "p2" | "p3" | "p4" | "domains" | "cells", method, ...)`` is what
``histosr benchmark`` calls; :func:`p1` (spot hold-out), :func:`p2`, :func:`p3` (H&E only,
leave one section out), :func:`p4`, :func:`domains` (tissue domains against pathologist
labels) and ``cells`` (single-cell output against known cells,
:mod:`histosr.benchmark.cells`) are the protocols themselves. Each returns the results dict
(``{"protocol", "method", "encoder", "params", "sections", "mean", "seconds",
"peak_rss_mb"}``) and, given ``out``, writes it to ``out/results.json``.
"""

from __future__ import annotations

from ..errors import InputError
from .domains import domains
from .p2 import p2
from .p4 import p4, score_superpixels
from .results import read_results, write_results

PROTOCOLS = {"p2": p2, "p4": p4, "domains": domains}
# protocols in their own modules, imported on first use (p1: spot hold-out, p3: H&E only,
# cells: single-cell output against known cells)
_LAZY = {"p1": ("p1", "p1"), "p3": ("p3", "p3"), "cells": ("cells", "cells")}


def _protocol(key: str):
    if key in PROTOCOLS:
        return PROTOCOLS[key]
    import importlib

    mod, fn = _LAZY[key]
    PROTOCOLS[key] = getattr(importlib.import_module(f".{mod}", __name__), fn)
    return PROTOCOLS[key]


def run(protocol: str, method, encoder: str = "handcrafted", data=None, sections=None,
        epochs: int | None = None, n_states: int | None = None, seed: int = 0, out=None,
        consistency: bool | None = None, progress: bool = True, **kwargs) -> dict:
    """Run a protocol by name. ``method``: registered name or Method instance;
    ``consistency``: True/False forces the shared mass-preserving step, ``None`` keeps the
    method's default (the setting used is recorded in ``params["consistency"]``);
    ``epochs``/``n_states``: below the published defaults they are recorded as such;
    other keyword arguments (e.g. ``scheduler`` for p3) go to the protocol."""
    key = str(protocol).lower()
    if key not in PROTOCOLS and key not in _LAZY:
        raise InputError(f"unknown protocol {protocol!r}: expected one of "
                         f"{sorted(set(PROTOCOLS) | set(_LAZY))}")
    if kwargs.get("downsample_depth") is not None and key not in ("p1", "p2", "p3"):
        raise InputError(f"--downsample-depth applies to p1, p2 and p3 (measured her2st "
                         f"counts), not {key}")
    return _protocol(key)(method, sections=sections, encoder=encoder, data=data, epochs=epochs,
                          n_states=n_states, seed=seed, consistency=consistency, out=out,
                          progress=progress, **kwargs)


__all__ = ["run", "p2", "p4", "domains", "score_superpixels", "write_results", "read_results",
           "PROTOCOLS"]
