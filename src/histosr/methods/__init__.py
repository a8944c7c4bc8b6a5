"""Methods: scikit-learn-like estimators registered by name.

``get_method("istar", epochs=400)``, ``available_methods()``; built-ins: ``istar``,
``histex``, ``deephex`` and the
baselines ``nearest``, ``bilinear``, ``knn`` (loaded on first use of the registry).
"""

from .base import (
    Method,
    available_methods,
    get_method,
    load_method,
    register_method,
    superpixel_anndata,
)

__all__ = ["Method", "available_methods", "get_method", "load_method", "register_method",
           "superpixel_anndata"]
