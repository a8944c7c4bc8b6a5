"""Encoder protocol and registry (timm style: build any encoder by name).

An encoder turns calibrated (0.5 um/px) RGB tiles into one feature vector per 16 px
superpixel: ``embed_tiles(batch)`` takes uint8 (B, T, T, 3) tiles, T a multiple of 16, and
returns float32 (B, T/16, T/16, dim) tokens. ``context_sp`` is how many superpixels of
context each side a tile needs (the tiler reads tiles with that halo and crops it off).

Each encoder declares its parameters where it registers (``params={name: (type,
constraint)}``, see :mod:`histosr.params`): :func:`check_encoder` validates a name and its
parameters without building anything, so a typo fails before any tile is read.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..params import DEVICE, Interval, Options, validate_kwargs
from ..registry import Registry


class Encoder(Protocol):
    name: str
    dim: int
    patch_um: float  # physical size of one token (8 um for the superpixel grid)
    context_sp: int

    def embed_tiles(self, batch: np.ndarray) -> np.ndarray: ...


def _load_builtin() -> None:
    # registering imports nothing heavy: torch/timm/open_clip load when an encoder is built
    from . import foundation, handcrafted, ssl  # noqa: F401 - uni, uni2, timm:, quiltnet, hipt


REGISTRY = Registry("encoder", _load_builtin)

#: parameters every network encoder takes (device, numerics, batching)
TORCH_PARAMS = {
    "device": (str, DEVICE), "precision": (str, Options("auto", "fp32", "bf16", "fp16")),
    "batch_size": (int, Interval(int, 1)), "channels_last": (bool, None),
}
#: parameters of encoders with weights (never downloaded unless hub=True)
WEIGHTS_PARAMS = {
    "weights": (str | None, None), "hub": (bool, None), "random_init": (bool, None),
    "seed": (int, Interval(int, 0)),
}


def register_encoder(name: str, params: dict | None = None):
    """Decorator: register an encoder factory under ``name`` (``"prefix:"`` for a family
    such as ``"timm:<model>"``). ``params``: its keyword parameters as ``{name: (type,
    constraint or None)}``; ``None`` accepts any keyword (third-party encoders)."""
    return REGISTRY.register(name, params=params)


def available_encoders() -> list[str]:
    return REGISTRY.names()


def check_encoder(name: str, **kwargs) -> dict:
    """Validate an encoder name and its parameters (normalised dict) without building it."""
    spec = REGISTRY.meta(name).get("params")
    if spec is None:
        return dict(kwargs)
    kwargs = {k: (str(v) if k == "weights" and v is not None and not isinstance(v, str) else v)
              for k, v in kwargs.items()}
    return validate_kwargs(f"encoder {name!r}", kwargs, spec)


def get_encoder(name: str, **kwargs) -> Encoder:
    """Build an encoder by name (``"handcrafted"``, ``"uni"``, ``"timm:<model>"``...)."""
    kwargs = check_encoder(name, **kwargs)
    factory = REGISTRY.get(name)
    if REGISTRY.key(name).endswith(":"):
        return factory(name.split(":", 1)[1], **kwargs)
    return factory(**kwargs)


__all__ = ["Encoder", "REGISTRY", "register_encoder", "available_encoders", "get_encoder",
           "check_encoder", "TORCH_PARAMS", "WEIGHTS_PARAMS"]
