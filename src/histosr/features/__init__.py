"""Encoders and feature maps. ``histosr.features.compute(section, encoder=...)``."""

from .crops import crop_dim, crop_features
from .featuremap import FeatureMap
from .registry import available_encoders, get_encoder, register_encoder

__all__ = ["FeatureMap", "available_encoders", "get_encoder", "register_encoder", "compute",
           "crop_features", "crop_dim"]


def compute(section, encoder: str = "handcrafted", **kwargs) -> FeatureMap:
    """Per-superpixel features of a section (see :func:`histosr.features.tiling.compute`)."""
    from .tiling import compute as _compute

    return _compute(section, encoder=encoder, **kwargs)


class _CallableModule(__import__("types").ModuleType):
    """``histosr.features(section, encoder=...)`` is :func:`compute` (scanpy-style verb)
    while ``histosr.features`` stays the subpackage."""

    def __call__(self, section, encoder: str = "handcrafted", **kwargs) -> FeatureMap:
        return compute(section, encoder=encoder, **kwargs)


__import__("sys").modules[__name__].__class__ = _CallableModule
