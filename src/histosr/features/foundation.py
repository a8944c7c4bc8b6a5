"""Pathology foundation-model encoders: ``uni``, ``uni2``, ``timm:<model>``, ``quiltnet``, ``hipt``.

All of them follow the :class:`~histosr.features.registry.Encoder` protocol: calibrated
(0.5 um/px) uint8 tiles in, one float32 vector per 16 px (8 um) superpixel out, with
``context_sp = 0``. Inside ``embed_tiles`` a tile is cut into *windows* of ``window_sp``
superpixels (the input the network was trained on), white-padded at the far edges; the
windows of a call are embedded in mini-batches of ``batch_size``. Tokens are therefore
those of non-overlapping windows laid from the tile origin: use a ``tile_sp`` that is a
multiple of ``window_sp`` (``encoder.tile_sp`` is a good one) and the grid is identical to
cutting the whole image into windows, whatever the tile size.

==========  ==========================================  ===========  =====  ==============
name        network                                     window       dim    one token
==========  ==========================================  ===========  =====  ==============
uni         ViT-L/16 (timm), patch tokens after norm    224 px/14sp  1024   16 px = 1 sp
uni2        ViT-H/14 + 8 registers, SwiGLU (UNI2-h)     256 px/16sp  1536   14 px of the
                                                        -> 224 px           resized window
                                                                            = 1 sp
timm:<m>    any timm ViT (patch_embed); like uni2 the   img_size/p   model  1 sp
            window is resized so one patch = 1 sp       *16 px
quiltnet    open_clip ViT-B-32-quickgelu image tower    224 px/14sp  512    see below
hipt        iStar's HIPT: ViT-256 (ViT-S/16) patch      4096 px      576    cls4k || sub
            tokens 384-d || ViT-4K (ViT-XS) region      (256 sp)
            tokens 192-d, repeated over 16x16 sp
==========  ==========================================  ===========  =====  ==============

* ``uni2``: UNI2-h's patches are 14 px. Each 256 px (16 sp) window is resized (bilinear,
  anti-aliased) to the model's native 224 px, so one 14 px patch covers exactly one 16 px
  superpixel (the network sees 0.571 um/px instead of 0.5) and no position embedding is
  interpolated. The same rule makes any ``timm:<model>`` ViT land on the 8 um grid.
* ``quiltnet``: ``mode="crop"`` (default, HESpotEx's use) gives the L2-normalised 512-d
  image embedding of each 224 px window, broadcast to its 14 x 14 superpixels;
  ``mode="tokens"`` gives the 7 x 7 patch tokens (32 px, after ``ln_post``, through the
  image projection, L2-normalised), each repeated over its 2 x 2 superpixels.
  ``normalize="clip"`` (default) uses CLIP's mean/std; ``"raw"`` feeds 0-255 values, as
  HESpotEx's released code does.
* ``hipt``: as iStar (METHODS 1.2), without the shift ensembling, box smoothing and RGB
  channels, which belong to the iStar method. A tile smaller than a region is white-padded
  to a full 4096 px region; ``region_sp`` makes it smaller (a 2 x 2 grid of 256 px patches
  for tests). The 256 px ViT's 14 x 14 position embedding (DINO, 224 px) is resampled to
  16 x 16 (timm, bicubic).

Every encoder also has ``embed_crops(crops)``: uint8 (B, S, S, 3) crops (spot-centred, any
size) -> (B, dim_crop) float32 - the CLS token (UNI, UNI2, timm, HIPT's ViT-256) or the
image embedding (QuiltNet), each crop resized to the network's input size first.

Weights are never downloaded silently. In this order: ``weights=PATH`` (a file; for
``hipt`` a folder holding both files or a pair of paths), ``$HISTOSR_WEIGHTS_DIR/<name>/
<file>`` (default folder ``~/.cache/histosr/weights``), ``hub=True`` (Hugging Face; gated
repos need a token in ``HF_TOKEN``), ``random_init=True`` (deterministic random weights of
the same architecture, for tests). Otherwise :class:`WeightsNotFoundError` says exactly
what to fetch and where to put it; a checkpoint that does not fit the architecture raises
:class:`WeightsMismatchError`. ``encoder.meta`` records the weights file and the first 16
hex digits of its sha256, which are part of ``encoder.params`` (so of the feature cache key).

``device="auto"`` picks CUDA when present; ``precision="auto"`` is bf16 autocast on a GPU
that supports it (fp16 otherwise) and fp32 on CPU.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..params import Interval, Options
from .registry import TORCH_PARAMS, WEIGHTS_PARAMS, register_encoder

WEIGHTS_ENV = "HISTOSR_WEIGHTS_DIR"
SP = 16  # calibrated px per superpixel
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class WeightsNotFoundError(InputError, FileNotFoundError):
    """No weights for an encoder: the message says what to fetch and where to put it."""


class WeightsMismatchError(InputError):
    """A checkpoint that does not fit the encoder's architecture."""


# -- where weights come from ----------------------------------------------------------------
@dataclass(frozen=True)
class WeightsSpec:
    name: str  # folder under $HISTOSR_WEIGHTS_DIR
    filename: str
    label: str  # how people call the model
    how: str  # how to obtain the file
    hub_repo: str | None = None
    gated: bool = False


SPECS = {
    "uni": WeightsSpec(
        "uni", "pytorch_model.bin", "UNI",
        "request access at huggingface.co/MahmoodLab/UNI, download pytorch_model.bin",
        "MahmoodLab/UNI", gated=True),
    "uni2": WeightsSpec(
        "uni2", "pytorch_model.bin", "UNI2-h",
        "request access at huggingface.co/MahmoodLab/UNI2-h, download pytorch_model.bin",
        "MahmoodLab/UNI2-h", gated=True),
    "quiltnet": WeightsSpec(
        "quiltnet", "open_clip_pytorch_model.bin", "QuiltNet-B-32",
        "download open_clip_pytorch_model.bin from huggingface.co/wisdomik/QuiltNet-B-32",
        "wisdomik/QuiltNet-B-32"),
    "hipt256": WeightsSpec(
        "hipt", "vit256_small_dino.pth", "HIPT ViT-256",
        "download vit256_small_dino.pth from github.com/mahmoodlab/HIPT "
        "(HIPT_4K/Checkpoints; iStar's download_checkpoints.sh fetches it too)"),
    "hipt4k": WeightsSpec(
        "hipt", "vit4k_xs_dino.pth", "HIPT ViT-4K",
        "download vit4k_xs_dino.pth from github.com/mahmoodlab/HIPT "
        "(HIPT_4K/Checkpoints; iStar's download_checkpoints.sh fetches it too)"),
}


def _timm_spec(model_name: str) -> WeightsSpec:
    safe = model_name.replace("/", "_").replace(":", "_")
    return WeightsSpec(
        f"timm-{safe}", "pytorch_model.bin", f"timm model {model_name!r}",
        f"save the state_dict of timm.create_model({model_name!r}) (pytorch_model.bin or "
        f"model.safetensors from its Hugging Face page)", None)


def weights_dir() -> Path:
    d = os.environ.get(WEIGHTS_ENV)
    return Path(d).expanduser() if d else Path.home() / ".cache" / "histosr" / "weights"


def default_weights_path(spec: WeightsSpec) -> Path:
    return weights_dir() / spec.name / spec.filename


def _find_default(spec: WeightsSpec) -> Path | None:
    p = default_weights_path(spec)
    if p.is_file():
        return p
    alt = p.with_name("model.safetensors")
    return alt if alt.is_file() else None


def _where_msg(spec: WeightsSpec) -> str:
    env = os.environ.get(WEIGHTS_ENV)
    where = f"${WEIGHTS_ENV}/{spec.name}/{spec.filename}"
    if not env:
        where += f" (${WEIGHTS_ENV} is unset: {default_weights_path(spec)})"
    return where


def _missing_msg(spec: WeightsSpec, extra: str = "") -> str:
    hub = (f", or pass hub=True{' with HF_TOKEN set' if spec.gated else ''}"
           if spec.hub_repo else "")
    return (f"{spec.label} weights: {spec.how}, pass weights=PATH or put it at "
            f"{_where_msg(spec)}{hub}; random_init=True gives random weights for tests"
            + (f" ({extra})" if extra else ""))


def weights_status() -> dict[str, str]:
    """Per weighted encoder: the file found by the ``$HISTOSR_WEIGHTS_DIR`` convention or
    what is missing (for ``histosr doctor``)."""
    out = {}
    for key, spec in SPECS.items():
        p = _find_default(spec)
        out[key] = str(p) if p else f"not found ({default_weights_path(spec)})"
    return out


def _hf_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def resolve_weights(spec: WeightsSpec, weights=None, hub: bool = False,
                    random_init: bool = False) -> Path | None:
    """The checkpoint file to load, or None for ``random_init``; see the module docstring."""
    if random_init:
        if weights is not None or hub:
            raise InputError("random_init=True excludes weights=... and hub=True")
        return None
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_dir():
            p = p / spec.filename
        if not p.is_file():
            raise WeightsNotFoundError(_missing_msg(spec, f"{p} does not exist"))
        return p
    found = _find_default(spec)
    if found is not None:
        return found
    if hub and spec.hub_repo:
        token = _hf_token()
        if spec.gated and not token:
            raise WeightsNotFoundError(_missing_msg(
                spec, f"hub=True needs access to huggingface.co/{spec.hub_repo} and a token "
                      "in HF_TOKEN"))
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(spec.hub_repo, spec.filename, token=token))
        except Exception as e:  # noqa: BLE001 - offline, no access, ...
            raise WeightsNotFoundError(_missing_msg(
                spec, f"download from huggingface.co/{spec.hub_repo} failed: {e}")) from e
    raise WeightsNotFoundError(_missing_msg(spec))


@lru_cache(maxsize=32)
def _sha16_cached(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()[:16]


def file_sha16(path) -> str:
    """First 16 hex digits of the sha256 of a file."""
    st = Path(path).stat()
    return _sha16_cached(str(Path(path).resolve()), st.st_size, st.st_mtime)


def load_checkpoint(path) -> dict:
    """A state_dict from .bin/.pth/.pt (``torch.load(weights_only=True)``) or .safetensors,
    unwrapped from common containers (``state_dict``, ``model``, DINO ``teacher``) and with
    ``module.``/``backbone.`` prefixes removed."""
    import argparse

    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unreadable / not a checkpoint
            raise WeightsMismatchError(f"{path} is not a readable PyTorch checkpoint: {e}") from e
    for key in ("teacher", "state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise WeightsMismatchError(f"{path} holds a {type(sd).__name__}, not a state_dict")
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "shape"):
            continue
        for pre in ("module.", "backbone."):
            if k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def load_into(module, sd: dict, spec: WeightsSpec, path, ignore_prefixes=()) -> None:
    """Load ``sd`` strictly into ``module`` (built on the meta device or not); any missing,
    unexpected (outside ``ignore_prefixes``) or mis-shaped tensor raises
    :class:`WeightsMismatchError` naming them and what the file should have been."""
    want = module.state_dict(keep_vars=True)
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(ignore_prefixes))}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
              for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", shapes)):
            if items:
                more = f" ... (+{len(items) - 5})" if len(items) > 5 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
        raise WeightsMismatchError(
            f"{path} does not fit the {spec.label} architecture ({'; '.join(parts)}). "
            f"Expected: {spec.how}; pass weights=PATH or put it at {_where_msg(spec)}")
    module.load_state_dict({k: sd[k].to(want[k].dtype) for k in want}, strict=True,
                           assign=True)


def random_init_(module, seed: int = 0, layer_scale: float = 0.1) -> None:
    """Deterministic random weights, independent of timm/open_clip's own initialisers:
    LayerNorm weight 1 / bias 0, other biases 0, LayerScale ``gamma`` = ``layer_scale``
    (large enough that every block changes the output), everything else N(0, 0.02)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(int(seed))
    norm_ids = {}
    for m in module.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
            if m.weight is not None:
                norm_ids[id(m.weight)] = 1.0
            if m.bias is not None:
                norm_ids[id(m.bias)] = 0.0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if id(p) in norm_ids:
                p.fill_(norm_ids[id(p)])
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("gamma"):
                p.fill_(layer_scale)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for _, b in module.named_buffers():
            if b.is_floating_point():
                b.zero_()


def _materialise(module) -> None:
    """Give a meta-device module real (uninitialised) CPU storage."""
    if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
        module.to_empty(device="cpu")


def _import_timm():
    from .._compat import patch_torchvision

    patch_torchvision()
    try:
        import timm
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("this encoder needs timm: pip install 'histosr[foundation]'") from e
    return timm


def _import_open_clip():
    from .._compat import patch_torchvision

    patch_torchvision()
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover
        raise ImportError(
            "quiltnet needs open_clip: pip install 'histosr[foundation]'") from e
    return open_clip


def resolve_precision(precision: str, device: str) -> str:
    import torch

    if precision in (None, "auto"):
        if device.startswith("cuda"):
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise InputError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


# -- the shared machinery: windows, batches, devices -----------------------------------------
class TorchEncoder:
    """Base of the network encoders. Subclasses set ``name``, ``dim``, ``window_sp``,
    ``input_px``, ``mean``/``std`` and implement ``_forward`` ((n, 3, input_px, input_px)
    normalised float -> (n, g, g, dim) with g = ``window_sp`` or a divisor of it, tokens
    repeated to ``window_sp``) and ``_forward_crops``."""

    patch_um = 8.0
    context_sp = 0
    pad_value = 255

    def __init__(self, device: str = "auto", precision: str = "auto", batch_size: int = 16,
                 channels_last: bool = True):
        from ..train import resolve_device  # one resolver for training and encoders

        self.device = str(resolve_device(device))
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = int(batch_size)
        self.channels_last = bool(channels_last)
        self.meta: dict = {}

    # subclasses fill these
    name: str
    dim: int
    window_sp: int
    input_px: int
    mean: tuple | None = IMAGENET_MEAN
    std: tuple | None = IMAGENET_STD

    @property
    def tile_sp(self) -> int:
        """A tile size (superpixels) that is a whole number of windows, about 1000 px."""
        return self.window_sp * max(1, 64 // self.window_sp)

    @property
    def params(self) -> dict:
        p = {"window_sp": self.window_sp, "input_px": self.input_px,
             "precision": self.precision, "weights": self.meta.get("weights_sha256")
             or f"random:{self.meta.get('seed')}"}
        p.update(self._extra_params())
        return p

    def _extra_params(self) -> dict:
        return {}

    def _setup(self, module) -> None:
        import torch

        module.eval().requires_grad_(False)
        module.to(self.device)
        if self.channels_last and self.device == "cpu":
            module.to(memory_format=torch.channels_last)
        self._modules_ = [module]

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.split(":")[0], dtype=dtype)

    def _to_input(self, win: np.ndarray, size: int):
        """uint8 (n, h, w, 3) -> normalised float (n, 3, size, size) on the device."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.ascontiguousarray(win[..., :3])).to(self.device)
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.mean is not None:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1) * 255.0
            x = (x - mean) / std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _run(self, win: np.ndarray, fn, size: int) -> np.ndarray:
        import torch

        outs, bs = [], self._window_batch
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(win), bs):
                y = fn(self._to_input(win[i: i + bs], size))
                outs.append(y.float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)

    @property
    def _window_batch(self) -> int:
        return self.batch_size

    def embed_tiles(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) tiles, H and W multiples of 16 -> float32 (B, H/16, W/16, dim)."""
        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        B, H, W = batch.shape[:3]
        if H % SP or W % SP:
            raise InputError(f"tile sides must be multiples of {SP} px, got {batch.shape}")
        hs, ws = H // SP, W // SP
        k, kp = self.window_sp, self.window_sp * SP
        nr, nc = -(-hs // k), -(-ws // k)
        if (nr * kp, nc * kp) != (H, W):
            pad = np.full((B, nr * kp, nc * kp, 3), self.pad_value, np.uint8)
            pad[:, :H, :W] = batch[..., :3]
        else:
            pad = batch[..., :3]
        win = pad.reshape(B, nr, kp, nc, kp, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, kp, kp, 3)
        tok = self._run(win, self._forward, self.input_px)  # (N, g, g, D)
        g = tok.shape[1]
        if g != k:  # coarser tokens (QuiltNet): repeat each over its superpixels
            r = k // g
            tok = np.repeat(np.repeat(tok, r, axis=1), r, axis=2)
        D = tok.shape[-1]
        out = tok.reshape(B, nr, nc, k, k, D).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(B, nr * k, nc * k, D)[:, :hs, :ws]
        return np.ascontiguousarray(out, dtype=np.float32)

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) crops -> float32 (B, dim_crop), each resized to ``input_px``."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        return self._run(crops, self._forward_crops, self.crop_px).astype(np.float32)

    @property
    def crop_px(self) -> int:
        return self.input_px

    def _forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_crops(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        w = self.meta.get("weights_sha256") or "random"
        return (f"<{type(self).__name__} {self.name!r} dim={self.dim} window={self.window_sp}sp "
                f"device={self.device} {self.precision} weights={w}>")


def _build_module(factory, spec: WeightsSpec, weights, hub, random_init, seed,
                  ignore_prefixes=(), key_filter=None):
    """Build with ``factory()`` on the meta device, then load weights or random-init.
    Returns (module, meta)."""
    import torch

    path = resolve_weights(spec, weights, hub, random_init)
    if path is not None:  # read the file first: a bad file fails before any allocation
        sd = load_checkpoint(path)
        if key_filter is not None:
            sd = key_filter(sd)
    try:  # no time spent initialising weights that are overwritten next
        with torch.device("meta"):
            module = factory()
    except Exception:  # noqa: BLE001 - a model whose constructor needs real tensors
        module = factory()
    if path is None:
        _materialise(module)
        random_init_(module, seed)
        meta = {"weights": None, "weights_sha256": None, "seed": int(seed),
                "weights_source": "random"}
    else:
        load_into(module, sd, spec, path, ignore_prefixes)
        _materialise(module)  # non-persistent buffers, if any
        meta = {"weights": str(path), "weights_sha256": file_sha16(path), "seed": None,
                "weights_source": "file"}
    return module, meta


# -- UNI, UNI2-h, any timm ViT -----------------------------------------------------------------
UNI_KWARGS = dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0,
                  dynamic_img_size=True)


def uni2_kwargs() -> dict:
    import torch

    timm = _import_timm()
    return dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU, reg_tokens=8,
                dynamic_img_size=True)


class TimmViTEncoder(TorchEncoder):
    """A timm VisionTransformer: patch tokens after the final norm (prefix tokens dropped).
    The window is the model's native token grid in superpixels, resized to ``img_size``
    so that one patch covers one superpixel."""

    def __init__(self, name: str, model_name: str, spec: WeightsSpec, model_kwargs=None,
                 weights=None, hub: bool = False, random_init: bool = False, seed: int = 0,
                 mean=None, std=None, window_sp: int | None = None, **kw):
        super().__init__(**kw)
        timm = _import_timm()
        self.name, self.model_name = name, model_name
        self.model_kwargs = dict(model_kwargs or {})
        self.model_kwargs.setdefault("num_classes", 0)

        def factory():
            return timm.create_model(model_name, pretrained=False, **self.model_kwargs)

        if hub and spec.hub_repo is None and weights is None and _find_default(spec) is None:
            # a public timm model: let timm fetch it, explicitly requested by the user
            model = timm.create_model(model_name, pretrained=True, **self.model_kwargs)
            meta = {"weights": f"timm-hub:{model_name}", "seed": None, "weights_source": "hub",
                    "weights_sha256": _state_sha16(model)}
        else:
            model, meta = _build_module(factory, spec, weights, hub, random_init, seed)
        if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
            raise InputError(f"timm model {model_name!r} is not a ViT (no patch_embed); "
                             "only ViT-style timm models give patch tokens")
        self.model = model
        self.meta = {"encoder": name, "architecture": model_name, **meta}
        patch = model.patch_embed.patch_size
        grid = model.patch_embed.grid_size
        if patch[0] != patch[1] or grid[0] != grid[1]:
            raise InputError(f"{model_name}: only square patches/images are supported")
        # native: the model's own token grid; smaller/larger windows resample the position
        # embedding (dynamic_img_size) - for tests, or for more context per window
        self.window_sp = int(window_sp or grid[0])
        if window_sp and not getattr(model, "dynamic_img_size", False):
            raise InputError(f"window_sp={window_sp} needs a timm model built with "
                             "dynamic_img_size=True")
        self.input_px = int(self.window_sp * patch[0])
        self.dim = int(model.num_features)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(mean or cfg.get("mean") or IMAGENET_MEAN)
        self.std = tuple(std or cfg.get("std") or IMAGENET_STD)
        self._setup(model)

    def _extra_params(self) -> dict:
        return {"model": self.model_name,
                "model_kwargs": {k: (v if isinstance(v, (int, float, str, bool)) else
                                     getattr(v, "__name__", str(v)))
                                 for k, v in sorted(self.model_kwargs.items())}}

    def _forward(self, x):
        t = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]
        g = self.window_sp
        return t.reshape(t.shape[0], g, g, t.shape[-1])

    def _forward_crops(self, x):
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def _state_sha16(module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


_VIT_PARAMS = {**TORCH_PARAMS, **WEIGHTS_PARAMS, "window_sp": (int | None, Interval(int, 1))}


@register_encoder("uni", params=_VIT_PARAMS)
def uni(weights=None, hub: bool = False, random_init: bool = False, seed: int = 0,
        **kw) -> TimmViTEncoder:
    """UNI (ViT-L/16, MahmoodLab/UNI): 1024-d patch tokens, one per superpixel."""
    return TimmViTEncoder("uni", "vit_large_patch16_224", SPECS["uni"], UNI_KWARGS,
                          weights=weights, hub=hub, random_init=random_init, seed=seed,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw)


@register_encoder("uni2", params=_VIT_PARAMS)
def uni2(weights=None, hub: bool = False, random_init: bool = False, seed: int = 0,
         **kw) -> TimmViTEncoder:
    """UNI2-h (ViT-H/14, 8 registers, SwiGLU): 1536-d tokens, a 256 px window -> 224 px."""
    return TimmViTEncoder("uni2", "vit_giant_patch14_224", SPECS["uni2"], uni2_kwargs(),
                          weights=weights, hub=hub, random_init=random_init, seed=seed,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, **kw)


@register_encoder("timm:", params={**_VIT_PARAMS, "model_kwargs": (dict | None, None),
                                     "mean": (tuple[float, ...] | None, None),
                                     "std": (tuple[float, ...] | None, None)})
def timm_encoder(model_name: str, weights=None, hub: bool = False, random_init: bool = False,
                 seed: int = 0, model_kwargs: dict | None = None, **kw) -> TimmViTEncoder:
    """Any timm ViT by name; weights from a user checkpoint (``weights=`` or
    ``$HISTOSR_WEIGHTS_DIR/timm-<name>/pytorch_model.bin``) or, with ``hub=True``, timm's
    own pretrained weights."""
    kwargs = {"dynamic_img_size": True, **(model_kwargs or {})}
    return TimmViTEncoder(f"timm:{model_name}", model_name, _timm_spec(model_name), kwargs,
                          weights=weights, hub=hub, random_init=random_init, seed=seed, **kw)


# -- QuiltNet (open_clip ViT-B-32-quickgelu image tower) -----------------------------------------
class QuiltNetEncoder(TorchEncoder):
    window_sp = 14
    input_px = 224

    def __init__(self, weights=None, hub: bool = False, random_init: bool = False,
                 seed: int = 0, mode: str = "crop", normalize: str = "clip", **kw):
        super().__init__(**kw)
        if mode not in ("crop", "tokens"):
            raise InputError(f"quiltnet mode must be 'crop' or 'tokens', got {mode!r}")
        if normalize not in ("clip", "raw"):
            raise InputError(f"quiltnet normalize must be 'clip' or 'raw', got {normalize!r}")
        open_clip = _import_open_clip()
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
        self.name, self.mode, self.normalize = "quiltnet", mode, normalize

        def factory():
            return _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]),
                                       quick_gelu=cfg.get("quick_gelu", False))

        def visual_only(sd):  # a full CLIP checkpoint or the image tower alone
            if any(k.startswith("visual.") for k in sd):
                return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
            return sd

        model, meta = _build_module(factory, SPECS["quiltnet"], weights, hub, random_init,
                                    seed, key_filter=visual_only)
        model.output_tokens = True
        self.model = model
        self.meta = {"encoder": "quiltnet", "architecture": "open_clip ViT-B-32-quickgelu",
                     **meta}
        self.dim = int(cfg["embed_dim"])
        if normalize == "raw":
            self.mean = self.std = None
        else:
            self.mean, self.std = CLIP_MEAN, CLIP_STD
        self._setup(model)

    def _extra_params(self) -> dict:
        return {"mode": self.mode, "normalize": self.normalize}

    def _forward(self, x):
        import torch.nn.functional as F

        pooled, tokens = self.model(x)
        if self.mode == "crop":
            return F.normalize(pooled.float(), dim=-1)[:, None, None, :]
        t = tokens @ self.model.proj
        g = int(round(math.sqrt(t.shape[1])))
        return F.normalize(t.float(), dim=-1).reshape(t.shape[0], g, g, -1)

    def _forward_crops(self, x):
        import torch.nn.functional as F

        return F.normalize(self.model(x)[0].float(), dim=-1)


@register_encoder("quiltnet", params={
    **TORCH_PARAMS, **WEIGHTS_PARAMS, "mode": (str, Options("crop", "tokens")),
    "normalize": (str, Options("clip", "raw"))})
def quiltnet(**kw) -> QuiltNetEncoder:
    """QuiltNet-B-32 image embedding (HESpotEx), per 224 px window or per 32 px token."""
    return QuiltNetEncoder(**kw)


# -- HIPT (iStar): ViT-256 + ViT-4K ----------------------------------------------------------
HIPT256_KWARGS = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                      mlp_ratio=4.0, qkv_bias=True, num_classes=0, dynamic_img_size=True)


def _vit4k_module(in_dim: int = 384, dim: int = 192, depth: int = 6, heads: int = 6,
                  grid: int = 14):
    """HIPT's ``vit4k_xs``: phi (Linear 384->192, GELU) on the 256-px CLS tokens, a CLS
    token, 14x14 (+1) position embeddings resampled to the region's grid, 6 DINO/timm
    blocks, LayerNorm. State-dict keys are those of HIPT's VisionTransformer4K."""
    import torch
    from torch import nn

    timm = _import_timm()
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import Block

    class ViT4K(nn.Module):
        def __init__(self):
            super().__init__()
            self.phi = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(0.0))
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
            norm = partial(nn.LayerNorm, eps=1e-6)
            self.blocks = nn.ModuleList(
                Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                for _ in range(depth))
            self.norm = norm(dim)

        def forward(self, x):  # (B, h, w, in_dim) -> (B, h, w, dim) region tokens
            B, h, w, _ = x.shape
            t = self.phi(x.reshape(B, h * w, -1))
            pos = resample_abs_pos_embed(self.pos_embed, (h, w), num_prefix_tokens=1)
            t = torch.cat([self.cls_token.expand(B, -1, -1).to(t.dtype), t], 1) + pos
            for blk in self.blocks:
                t = blk(t)
            return self.norm(t)[:, 1:].reshape(B, h, w, -1)

    del timm
    return ViT4K()


class HIPTEncoder(TorchEncoder):
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    input_px = None  # set from region_sp

    def __init__(self, weights=None, hub: bool = False, random_init: bool = False,
                 seed: int = 0, region_sp: int = 256, **kw):
        super().__init__(**kw)
        timm = _import_timm()
        region_sp = int(region_sp)
        if region_sp < 16 or region_sp % 16:
            raise InputError(f"hipt region_sp must be a multiple of 16 (256 px), got {region_sp}")
        self.name, self.region_sp = "hipt", region_sp
        self.window_sp, self.input_px = region_sp, region_sp * SP
        w256, w4k = _hipt_paths(weights)
        self.vit256, m256 = _build_module(
            lambda: timm.create_model("vit_small_patch16_224", pretrained=False,
                                      **HIPT256_KWARGS),
            SPECS["hipt256"], w256, hub, random_init, seed, ignore_prefixes=("head.",))
        self.vit4k, m4k = _build_module(
            _vit4k_module, SPECS["hipt4k"], w4k, hub, random_init, seed + 1,
            ignore_prefixes=("head.",))
        self.meta = {
            "encoder": "hipt", "architecture": "HIPT ViT-256 (ViT-S/16) + ViT-4K (ViT-XS)",
            "weights": [m256["weights"], m4k["weights"]],
            "weights_sha256": (f"{m256['weights_sha256']}+{m4k['weights_sha256']}"
                               if m256["weights_sha256"] else None),
            "seed": m256["seed"], "weights_source": m256["weights_source"],
        }
        self.dim = 192 + 384
        self.feature_names = [f"cls4k_{i}" for i in range(192)] + [f"sub256_{i}"
                                                                 for i in range(384)]
        self._setup(self.vit256)
        self.vit4k.eval().requires_grad_(False).to(self.device)

    def _extra_params(self) -> dict:
        return {"region_sp": self.region_sp}

    @property
    def crop_px(self) -> int:
        return 256

    @property
    def _window_batch(self) -> int:  # a window is a whole region of (region_sp/16)^2 patches
        return max(1, self.batch_size // (self.region_sp // 16) ** 2)

    def _forward(self, x):
        import torch

        n, _, R, _ = x.shape
        g = R // 256
        p = x.reshape(n, 3, g, 256, g, 256).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, 256, 256)
        if self.channels_last:
            p = p.contiguous(memory_format=torch.channels_last)
        toks = [self.vit256.forward_features(p[i: i + self.batch_size])
                for i in range(0, len(p), self.batch_size)]
        t = torch.cat(toks)  # (n*g*g, 257, 384)
        cls = t[:, 0].reshape(n, g, g, -1)
        sub = t[:, 1:].reshape(n, g, g, 16, 16, -1).permute(0, 1, 3, 2, 4, 5)
        sub = sub.reshape(n, g * 16, g * 16, -1)
        reg = self.vit4k(cls.to(next(self.vit4k.parameters()).dtype))  # (n, g, g, 192)
        reg = reg.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
        return torch.cat([reg.to(sub.dtype), sub], dim=-1)

    def _forward_crops(self, x):
        return self.vit256.forward_features(x)[:, 0]


def _hipt_paths(weights):
    if weights is None:
        return None, None
    if isinstance(weights, (tuple, list)):
        if len(weights) != 2:
            raise InputError("hipt weights: a folder or (vit256 path, vit4k path)")
        return weights[0], weights[1]
    p = Path(weights).expanduser()
    if p.is_dir():
        return p / SPECS["hipt256"].filename, p / SPECS["hipt4k"].filename
    raise InputError(f"hipt weights: pass the folder holding {SPECS['hipt256'].filename} and "
                     f"{SPECS['hipt4k'].filename}, or a pair of paths; got {weights}")


@register_encoder("hipt", params={**TORCH_PARAMS, **WEIGHTS_PARAMS,
                                   "region_sp": (int, Interval(int, 16))})
def hipt(**kw) -> HIPTEncoder:
    """iStar's HIPT features: ViT-4K region tokens (192) || ViT-256 patch tokens (384)."""
    return HIPTEncoder(**kw)
