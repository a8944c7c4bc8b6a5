"""Encoder protocol and registry (timm style: build any encoder by name).

An encoder turns calibrated (0.5 um/px) RGB tiles into one feature vector per 16 px
superpixel: ``embed_tiles(batch)`` takes uint8 (B, T, T, 3) tiles, T a multiple of 16, and
returns float32 (B, T/16, T/16, dim) tokens. ``context_sp`` is how many superpixels of
context each side a tile needs (the tiler reads tiles with that halo and crops it off).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np


class Encoder(Protocol):
    name: str
    dim: int
    patch_um: float  # physical size of one token (8 um for the superpixel grid)
    context_sp: int

    def embed_tiles(self, batch: np.ndarray) -> np.ndarray: ...


_REGISTRY: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str):
    """Decorator: register an encoder factory under ``name``."""

    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def available_encoders() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_encoder(name: str, **kwargs) -> Encoder:
    """Build an encoder by name (``"handcrafted"``, ``"uni"``, ``"timm:<model>"``...)."""
    _load_builtin()
    key = name.split(":", 1)[0] + ":" if name.startswith("timm:") else name
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown encoder {name!r}: expected one of {', '.join(available_encoders())}"
        )
    if key.endswith(":"):
        return _REGISTRY[key](name.split(":", 1)[1], **kwargs)
    return _REGISTRY[key](**kwargs)


def _load_builtin() -> None:
    # registering imports nothing heavy: torch/timm/open_clip load when an encoder is built
    from . import foundation, handcrafted  # noqa: F401 - uni, uni2, timm:, quiltnet, hipt
