"""Make ``import torchvision`` (and so timm / open_clip) work next to a CPU-only torch.

The only torchvision wheel reachable on some machines is built against CUDA torch; next
to CPU torch its compiled ops fail to register and ``import torchvision`` dies with
``operator torchvision::nms does not exist``. Defining the two op schemas first lets
torchvision's Python side import (transforms, models, timm work); ``torchvision.ops``
kernels stay unavailable, so histosr never depends on them.
"""

from __future__ import annotations

import importlib.util

_done = False


def patch_torchvision() -> None:
    """Define ``torchvision::nms``/``qnms`` schemas when torchvision's C ops cannot load."""
    global _done
    if _done:
        return
    _done = True
    if importlib.util.find_spec("torchvision") is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - registered already
        return
    except (AttributeError, RuntimeError):
        pass
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define(
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        )
        globals()["_lib"] = lib  # keep the library alive
    except RuntimeError:
        pass
