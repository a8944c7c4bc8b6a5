"""The ``ssl`` encoder: a small CNN trained self-supervised on the user's own section(s).

No pretrained weights: the network learns what distinguishes the tiles of the given H&E
section(s) (SimCLR contrastive learning, NT-Xent loss) and its tokens become the features.

* Network: calibrated 0.5 um/px RGB averaged to 1 um/px, three 4 x 4 convolutions with
  stride 2 (32, 64, 128 channels, batch norm, ReLU) and a 3 x 3 convolution to ``dim``
  channels: one token per 16 px (8 um) superpixel, centred on it (receptive field 76 px,
  38 um; ``base_halo_sp`` = 3 superpixels of tile halo make every kept token exact).
* Training: ``n_tiles`` 96 px (48 um) tiles centred on tissue superpixels drawn at random
  (one seeded generator) from the section(s), two augmented 64 px views of each per batch
  (random crop, flips and 90 degree rotations, hematoxylin/eosin optical-density jitter,
  brightness, blur: the stain and orientation changes that carry no biology), pooled tokens
  through a 2-layer projection head, NT-Xent with temperature ``temperature``; Adam, cosine
  learning rate, ``steps`` steps of ``batch_size`` tile pairs. ``steps`` (not a time limit)
  ends training, so one seed gives the same weights on every machine speed.
* Features: the network's tokens (``dim``), optionally with the ``handcrafted`` encoder's
  21 base features (``handcrafted=True``), then box means of that base over ``context_um``
  (the handcrafted encoder's context rule): dim = base x (1 + len(context_um)).
* Binding: ``get_encoder("ssl")`` is untrained; :func:`resolve` (called by
  :func:`histosr.features.compute` and :func:`histosr.features.crop_features`) trains it on
  the section being encoded, or loads the weights cached for that image and those
  parameters, and returns ``"ssl:<weights file>"``: the encoder family that loads a trained
  file (``get_encoder("ssl:/path/ssl-abc.pt")``), which is what Dask workers build.
  :func:`train` trains one network on several sections (a shared feature space, what
  ``histosr benchmark p3 --encoder ssl`` uses).
* Cache: ``<cache_dir>/ssl-<key>.pt`` (``cache_dir`` argument, else ``$HISTOSR_CACHE_DIR``,
  else a per-process temporary folder), key = digest of the images' identities, pixel
  sizes, training parameters and seed; a torch state dict with a plain header, read back
  with ``torch.load(weights_only=True)`` (no code is unpickled). A cached file is reused:
  no retraining, identical features.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..params import DEVICE, Interval
from .registry import register_encoder

SP = 16
SSL_VERSION = 1
POOL_PX = 96  # side of a stored training tile (48 um)
VIEW_PX = 64  # side of an augmented view (32 um)
#: training parameters (part of the weights cache key) and their defaults
TRAIN_DEFAULTS = {"dim": 64, "steps": 300, "batch_size": 128, "lr": 2e-3,
                  "temperature": 0.2, "n_tiles": 4096, "seed": 0}
#: feature parameters (part of the feature cache key, not of the weights key)
FEATURE_DEFAULTS = {"context_um": (32.0, 128.0), "handcrafted": False}
_CHANNELS = (32, 64, 128)
INFER_TILES = 4  # tiles per forward pass: bounds activation memory on 600 px crops
_MEMO: dict[str, Path] = {}  # weights files trained in this process (no cache folder)


def _build_net(dim: int):
    import torch.nn as nn

    # 2 x 2 average first (1 um/px: nuclei stay ~6-10 px wide, a quarter of the work), then
    # k4 s2 p1 convolutions: token j of the last layer is centred on px 16 j + 7.5
    layers, c_in = [nn.AvgPool2d(2)], 3
    for c in _CHANNELS:
        layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c),
                   nn.ReLU(inplace=True)]
        c_in = c
    layers += [nn.Conv2d(c_in, dim, 3, padding=1)]
    return nn.Sequential(*layers)


def _build_head(dim: int):
    import torch.nn as nn

    return nn.Sequential(nn.Linear(dim, 128), nn.ReLU(inplace=True), nn.Linear(128, 64))


def _to_input(x):
    """uint8 NHWC tensor -> float NCHW (x / 255 - 0.5) / 0.25: fixed constants, no
    statistics of the image."""
    return x.permute(0, 3, 1, 2).float().mul(4.0 / 255.0).sub_(2.0)


# -- training data --------------------------------------------------------------------
def _sample_tiles(sections, n_tiles: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, POOL_PX, POOL_PX, 3) calibrated tiles centred on random tissue superpixels,
    about equally many per section."""
    from ..geometry import read_calibrated
    from ..tissue import section_tissue_mask

    out = []
    per = np.diff(np.linspace(0, n_tiles, len(sections) + 1).round().astype(int))
    for s, k in zip(sections, per):
        r, c = np.nonzero(section_tissue_mask(s))
        if len(r) == 0:
            raise InputError(f"section {s.name!r}: no tissue found to train the ssl encoder on "
                             "(check the image and its pixel size)")
        pick = rng.choice(len(r), size=int(k), replace=len(r) < k)
        for i in pick:
            y0 = int(r[i]) * SP + SP // 2 - POOL_PX // 2
            x0 = int(c[i]) * SP + SP // 2 - POOL_PX // 2
            out.append(read_calibrated(s.image, s.um_per_px, y0, x0, POOL_PX, POOL_PX))
    return np.stack(out)


def _augment(pool, idx, gen):
    """Two-view batch: float NCHW (len(idx), 3, VIEW_PX, VIEW_PX) of augmented views."""
    import torch
    import torch.nn.functional as F

    from .handcrafted import HED_FROM_RGB

    n = len(idx)
    span = POOL_PX - VIEW_PX
    oy = torch.randint(0, span + 1, (n,), generator=gen)
    ox = torch.randint(0, span + 1, (n,), generator=gen)
    rot = torch.randint(0, 4, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    ar = torch.arange(VIEW_PX)
    x = pool[idx[:, None, None], (oy[:, None] + ar)[:, :, None], (ox[:, None] + ar)[:, None, :]]
    for k in range(1, 4):  # the dihedral group, one batched op per element
        sel = rot == k
        if bool(sel.any()):
            x[sel] = torch.rot90(x[sel], k, (1, 2))
    if bool(flip.any()):
        x[flip] = torch.flip(x[flip], (2,))
    x = x.float()  # (n, H, W, 3) in 0..255
    # stain jitter in optical density: scale and shift hematoxylin, eosin, residual
    hed = torch.as_tensor(HED_FROM_RGB)
    rgb = torch.linalg.inv(hed)
    # per-view scale and shift of each stain, folded into one 3 x 3 map and offset on OD
    scale = 1 + 0.1 * (2 * torch.rand(n, 3, generator=gen) - 1)
    shift = 0.02 * (2 * torch.rand(n, 3, generator=gen) - 1)
    mix = hed[None] * scale[:, None, :] @ rgb  # (n, 3, 3): od -> jittered od
    off = (shift @ rgb)[:, None, :]  # (n, 1, 3)
    od = x.add_(1.0).div_(256.0).log10_().neg_().reshape(n, -1, 3)
    od = torch.baddbmm(off, od, mix)
    light = 256.0 * (1 + 0.1 * (2 * torch.rand(n, 1, 1, generator=gen) - 1))  # brightness
    x = torch.pow(10.0, od.neg_())
    x = x.mul_(light).sub_(1.0).clamp_(0, 255).reshape(n, VIEW_PX, VIEW_PX, 3)
    x = _to_input(x)
    blur = torch.rand(n, generator=gen) < 0.3  # out-of-focus scans
    if bool(blur.any()):
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    return x


def _nt_xent(z1, z2, temperature: float):
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _train_state(sections, p: dict, device: str, progress: bool) -> dict:
    """Train the network on ``sections`` with training parameters ``p``: the checkpoint."""
    import torch
    from tqdm.auto import tqdm

    from ..train import resolve_device, seed_everything

    seed_everything(p["seed"])
    dev = resolve_device(device)
    t0 = time.perf_counter()
    rng = np.random.default_rng(p["seed"])
    pool = torch.from_numpy(_sample_tiles(sections, p["n_tiles"], rng))
    t_sample = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(int(p["seed"]))
    net, head = _build_net(p["dim"]).to(dev), _build_head(p["dim"]).to(dev)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=p["lr"], weight_decay=1e-5)
    steps = int(p["steps"])
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    bs = min(int(p["batch_size"]), len(pool))
    losses = []
    net.train()
    head.train()
    for _ in tqdm(range(steps), desc="ssl encoder training", disable=not progress,
                  unit="step"):
        idx = torch.randperm(len(pool), generator=gen)[:bs]
        x = torch.cat([_augment(pool, idx, gen), _augment(pool, idx, gen)]).to(dev)
        z = head(net(x).mean(dim=(2, 3)))
        loss = _nt_xent(z[:bs], z[bs:], p["temperature"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    q = max(1, steps // 10)
    return {"format": "histosr-ssl", "version": SSL_VERSION, "train_params": dict(p),
            "sections": [s.name for s in sections], "state": state,
            "record": {"seconds": round(time.perf_counter() - t0, 1),
                       "sample_seconds": round(t_sample, 1), "device": str(dev),
                       "loss_first": float(np.mean(losses[:q])),
                       "loss_last": float(np.mean(losses[-q:]))}}


def _train_params(kwargs: dict) -> dict:
    p = {k: kwargs.get(k, v) for k, v in TRAIN_DEFAULTS.items()}
    p["lr"], p["temperature"] = float(p["lr"]), float(p["temperature"])
    for k in ("dim", "steps", "batch_size", "n_tiles", "seed"):
        p[k] = int(p[k])
    if p["batch_size"] < 2 or p["n_tiles"] < 2:
        raise InputError("ssl encoder: batch_size and n_tiles must be >= 2 (contrastive "
                         f"learning needs pairs of tiles), got {p['batch_size']}, "
                         f"{p['n_tiles']}")
    return p


def weights_key(sections, p: dict) -> str:
    """Digest of what the trained weights depend on: images, pixel sizes, parameters."""
    from ..keys import digest
    from .cache import image_identity

    return digest({"version": SSL_VERSION, "params": p,
                   "images": [[image_identity(s.image), round(float(s.um_per_px), 9)]
                              for s in sections]})


def _cache_folder(cache_dir) -> Path:
    from .cache import CACHE_ENV

    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV)
    if cache_dir is None:  # no cache: one temporary folder per process
        cache_dir = _MEMO.setdefault("__tmp__", Path(tempfile.mkdtemp(prefix="histosr-ssl-")))
    return Path(cache_dir)


def train(sections, cache_dir=None, device: str = "auto", progress: bool = True,
          **train_kwargs) -> Path:
    """Train one ``ssl`` network on the images of ``sections`` (a Section or a list; no
    counts are read) or reuse the cached one: returns the weights file; build the encoder
    with ``get_encoder(f"ssl:{path}")``. ``train_kwargs``: see :data:`TRAIN_DEFAULTS`."""
    from ..train import _load_member, _save_member

    sections = list(sections) if isinstance(sections, (list, tuple)) else [sections]
    if not sections:
        raise InputError("ssl encoder: expected at least one section to train on")
    p = _train_params(train_kwargs)
    key = weights_key(sections, p)
    path = _cache_folder(cache_dir) / f"ssl-{key[:20]}.pt"
    if path.exists() and _checkpoint_ok(_load_member(path)):
        return path
    ck = _train_state(sections, p, device, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_member(ck, path)
    return path


def _checkpoint_ok(ck) -> bool:
    return isinstance(ck, dict) and ck.get("format") == "histosr-ssl" and \
        ck.get("version") == SSL_VERSION


def resolve(encoder, section, cache_dir=None, kwargs: dict | None = None,
            progress: bool = True):
    """``(encoder, kwargs)`` ready to build for ``section``: an untrained ``"ssl"`` (name
    with its parameters, or an untrained :class:`SSLEncoder`) is trained on the section (or
    its cached weights loaded) and becomes ``"ssl:<weights>"`` with the feature parameters
    (or a trained SSLEncoder). Anything else is returned unchanged."""
    kwargs = dict(kwargs or {})
    if isinstance(encoder, SSLEncoder) and encoder.weights is None:
        path = train([section], cache_dir, encoder.device, encoder.progress and progress,
                     **encoder.train)
        return SSLEncoder(weights=str(path), device=encoder.device,
                          **encoder.feature_params), kwargs
    if not (isinstance(encoder, str) and encoder in UNTRAINED):
        return encoder, kwargs
    from .registry import check_encoder

    kw = check_encoder(encoder, **kwargs)
    tk = {k: kw.pop(k) for k in list(kw) if k in TRAIN_DEFAULTS}
    progress = kw.pop("progress", progress)
    path = train([section], cache_dir, kw.get("device", "auto"), progress, **tk)
    return f"{encoder}:{path}", kw


def shared_encoder(encoder, sections, cache_dir=None, progress: bool = True):
    """``(encoder, note)`` where sections are compared (a model fitted on some and applied to
    others, P3): an untrained ``"ssl"`` is trained ONCE on the images of all ``sections``
    (no counts read) so that every section is encoded by the same network; returns
    ``("ssl:<weights>", note)``. Other encoders are returned unchanged with ``note=None``."""
    if not (isinstance(encoder, str) and encoder in UNTRAINED):
        return encoder, None
    path = train(list(sections), cache_dir, progress=progress)
    names = ", ".join(s.name for s in sections)
    return f"{encoder}:{path}", (f"one {encoder} network (default parameters) trained on the "
                                 f"H&E of {names} (images only, no counts); weights "
                                 f"{path.name}")


class SSLEncoder:
    """Slide-trained CNN tokens (+ optional handcrafted base) with context; see the module
    docstring. Untrained (``weights=None``) it only knows its dimensions."""

    patch_um = 8.0
    base_halo_sp = 3  # receptive field 76 px: 3 superpixels (48 px) of halo cover it

    def __init__(self, weights: str | None = None, device: str = "auto",
                 context_um: tuple[float, ...] = (32.0, 128.0), handcrafted: bool = False,
                 progress: bool = True, **train_kwargs):
        from .handcrafted import BASE_FEATURES

        self.weights = None if weights is None else str(weights)
        self.device, self.progress = device, bool(progress)
        self.feature_params = {"context_um": tuple(float(c) for c in context_um),
                               "handcrafted": bool(handcrafted)}
        self.name = "ssl+handcrafted" if handcrafted else "ssl"
        self.context_um = self.feature_params["context_um"]
        self.context_sizes = tuple(2 * int(round(c / 16.0)) + 1 for c in self.context_um)
        self.context_sp = max([s // 2 for s in self.context_sizes], default=0)
        self.train = _train_params(train_kwargs)
        self._net = None
        self.meta: dict = {}
        if self.weights is not None:
            self._load()
        dim = self.train["dim"]
        names = [f"ssl{i}" for i in range(dim)]
        if handcrafted:
            names += list(BASE_FEATURES)
        self.base_dim = len(names)
        self.dim = self.base_dim * (1 + len(self.context_sizes))
        self.feature_names = names + [f"{n}@{int(round(c))}um" for c in self.context_um
                                      for n in names]
        self._hand = None
        if handcrafted:
            from .handcrafted import HandcraftedEncoder

            self._hand = HandcraftedEncoder(context_um=())

    def _load(self) -> None:
        import hashlib

        from ..train import _load_member

        p = Path(self.weights)
        if not p.is_file():
            raise InputError(f"ssl encoder weights {str(p)!r} not found: train them with "
                             "histosr.features.ssl.train(sections) or use encoder 'ssl'")
        ck = _load_member(p)
        if not _checkpoint_ok(ck):
            raise InputError(f"{str(p)!r} is not an ssl encoder checkpoint (format "
                             f"'histosr-ssl' version {SSL_VERSION}); retrain it")
        self.train = dict(ck["train_params"])
        # digest of the weights themselves, not of the file (which records the run's timing)
        h = hashlib.sha256()
        for k in sorted(ck["state"]):
            h.update(k.encode())
            h.update(ck["state"][k].detach().cpu().contiguous().numpy().tobytes())
        self.meta = {"weights": str(p), "sha256": h.hexdigest()[:16],
                     "sections": ck.get("sections"), "record": ck.get("record")}
        self._state = ck["state"]

    @property
    def params(self) -> dict:
        fp = {"context_um": list(self.context_um), "handcrafted": self.feature_params[
            "handcrafted"], "version": SSL_VERSION, "train": self.train}
        if self.weights is not None:
            fp["weights_sha256"] = self.meta["sha256"]
        return fp

    def _network(self):
        if self.weights is None:
            raise InputError("the ssl encoder is trained on the section it encodes: use "
                             "histosr.features.compute(section, 'ssl') / crop_features, or "
                             "pass weights= (histosr.features.ssl.train)")
        if self._net is None:
            from ..train import resolve_device

            self._dev = resolve_device(self.device)
            net = _build_net(self.train["dim"])
            net.load_state_dict(self._state)
            self._net = net.to(self._dev).eval()
        return self._net

    def embed_base(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (B, T, T, 3) -> float32 (B, T/16, T/16, base_dim)."""
        import torch

        batch = np.asarray(batch)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.shape[1] % SP or batch.shape[2] % SP:
            raise InputError(f"tile sides must be multiples of {SP} px, got {batch.shape[1:3]}")
        net = self._network()
        out = []
        with torch.inference_mode():
            for i in range(0, len(batch), INFER_TILES):
                x = _to_input(torch.from_numpy(np.ascontiguousarray(
                    batch[i: i + INFER_TILES, ..., :3])).to(self._dev))
                out.append(net(x).permute(0, 2, 3, 1).float().cpu().numpy())
        f = np.concatenate(out).astype(np.float32)
        if self._hand is not None:
            f = np.concatenate([f, self._hand.embed_base(batch)], axis=3)
        return f

    def add_context(self, base: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """base || box means over each context scale (the handcrafted encoder's rule)."""
        from .handcrafted import context_means

        parts = context_means(base, self.context_sizes, valid)
        return np.concatenate(parts, axis=2).astype(np.float32)

    def embed_tiles(self, batch: np.ndarray) -> np.ndarray:
        base = self.embed_base(batch)
        return np.stack([self.add_context(b) for b in base])


_TRAIN_SPEC = {"dim": (int, Interval(int, 1)), "steps": (int, Interval(int, 1)),
               "batch_size": (int, Interval(int, 2)),
               "lr": (float, Interval(float, 0, closed="neither")),
               "temperature": (float, Interval(float, 0, closed="neither")),
               "n_tiles": (int, Interval(int, 2)), "seed": (int, Interval(int, 0))}
_FEATURE_SPEC = {"device": (str, DEVICE), "context_um": (tuple[float, ...], None),
                 "handcrafted": (bool, None), "progress": (bool, None)}


#: the untrained names (trained on the section they meet) and their fixed feature options
UNTRAINED = {"ssl": {}, "ssl+handcrafted": {"handcrafted": True}}


def _register(name: str, fixed: dict) -> None:
    spec = {k: v for k, v in _FEATURE_SPEC.items() if k not in fixed}

    @register_encoder(name, params={**_TRAIN_SPEC, **spec})
    def _untrained(**kwargs) -> SSLEncoder:
        return SSLEncoder(**kwargs, **fixed)

    @register_encoder(f"{name}:", params=spec)
    def _trained(weights: str, **kwargs) -> SSLEncoder:
        return SSLEncoder(weights=weights, **kwargs, **fixed)


for _name, _fixed in UNTRAINED.items():
    _register(_name, _fixed)


__all__ = ["SSLEncoder", "train", "resolve", "shared_encoder", "weights_key",
           "TRAIN_DEFAULTS"]
