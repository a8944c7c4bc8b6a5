"""HisHRST (formerly HisToSGE; METHODS.md 5): spot-crop image features plus learned x/y
position embeddings, a one-layer transformer over chunks of ~50 spots, and a gene head.

Clean-room implementation from the specification (the released code is not copied).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import train
from ..errors import InputError
from ..features.crops import crop_features
from ..params import DEVICE, Interval, Options
from .base import register_method
from .scaling import feature_stats
from .spot import SpotMethod
from .spotnet import (
    chunks,
    lerp_embedding_class,
    ordered_training_sets,
    prediction_points,
    spatial_order,
    train_chunks,
)


def build_model(dim: int, n_genes: int, n_positions: int = 512, depth: int = 1,
                heads: int = 4, dim_head: int = 64, hidden: int = 2048,
                use_positions: bool = True):
    """The HisHRST network (METHODS 5.2). Input: features ``(B, n, dim)`` and fractional
    lattice indices ``(B, n, 2)`` (column a, row b); output ``(h, ReLU(genes))``."""
    import torch
    from torch import nn

    Lerp = lerp_embedding_class()

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
            self.out = nn.Linear(heads * dim_head, dim)

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = self.qkv(self.norm(x)).view(b, n, 3, heads, dim_head).permute(2, 0, 3, 1, 4)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # scale dim_head^-0.5
            return self.out(o.transpose(1, 2).reshape(b, n, heads * dim_head))

    class FeedForward(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(),
                                     nn.Linear(dim, dim))

        def forward(self, x):
            return self.net(x)

    class HisHRSTNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.use_positions = use_positions
            self.pos_x = Lerp(n_positions, dim)
            self.pos_y = Lerp(n_positions, dim)
            self.layers = nn.ModuleList(
                [nn.ModuleList([Attention(), FeedForward()]) for _ in range(depth)])
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.LayerNorm(hidden),
                                      nn.Linear(hidden, n_genes))

        def forward(self, feat, ab):
            x = feat
            if self.use_positions:
                x = x + self.pos_x(ab[..., 0]) + self.pos_y(ab[..., 1])
            for attn, ff in self.layers:
                x = attn(x) + x
                x = ff(x) + x
            return x, torch.relu(self.head(x))

    return HisHRSTNet()


@register_method("hishrst")
@dataclass
class HisHRST(SpotMethod):
    """HisHRST (METHODS.md 5): per spot, the encoder embedding of a 56 um square crop (the
    released 112 px at 0.5 um/px); x = features + E_x(column) + E_y(row) (learned tables of
    ``n_positions`` rows); a depth-1 PreNorm transformer (4 heads x 64, FF dim -> dim, GELU)
    over chunks of ~50 spots; gene head Linear(dim, 2048) -> ReLU -> LayerNorm -> Linear ->
    ReLU; MSE on log1p CP10k. The width is the encoder's crop dimension (126 for
    ``handcrafted``, 1024 for UNI). Published defaults: Adam lr 1e-3, 1000 epochs, 5-epoch
    linear warm-up from x1e-5, constant to epoch 50, cosine to 1e-8, chunks of 50, batch one
    chunk, chunks shuffled each epoch, 1 state.

    Prediction (recovery, as the released code): every point - the section's measured spots
    plus the query points - is predicted in chunks of ~50 with the features of all of them,
    and the query points are returned.

    Where histosr deliberately differs from the released code (METHODS 9.6):

    (a) Positions are fractional lattice indices of the section's measured lattice
        (:func:`~histosr.methods.spotnet.section_lattice`), read from the embedding tables by
        linear interpolation: half-step positions are represented exactly (the released
        ``.long()`` truncates them onto an integer neighbour) and no pixel offsets are
        hard-coded. Indices are clamped to the table (a point half a step outside index 0
        reads row 0).
    (b) Chunks follow the row-major lattice order of the points (the released code uses the
        AnnData order, spatially arbitrary for Visium barcodes), at training (training spots)
        and at prediction (all points), so chunk composition is the same rule in both.
    (c) Features are standardised with the training spots' mean and standard deviation
        (``standardize``; the released code feeds raw UNI CLS vectors); crops are read RGB at
        0.5 um/px (the released code reads the full-resolution image with cv2, BGR).
    (d) Scoring/evaluation is not part of the method (the released test.py ``F[it]`` bug and
        all-spot scoring are replaced by the P1 protocol).
    Ablations: ``use_positions=False`` (features only), ``chunk_size=1`` (no attention
    context between spots), ``context="queries"`` (chunks hold only the query points, not
    the measured spots; ``"all"`` is the released rule).
    """

    constraints: ClassVar[dict] = {
        "epochs": Interval(int, 1), "lr": Interval(float, 0, closed="neither"),
        "chunk_size": Interval(int, 1), "crop_um": Interval(float, 0, closed="neither"),
        "n_positions": Interval(int, 1), "depth": Interval(int, 1), "heads": Interval(int, 1),
        "dim_head": Interval(int, 1), "hidden": Interval(int, 1),
        "context": Options("all", "queries"), "n_states": Interval(int, 1), "device": DEVICE}

    epochs: int = 1000
    lr: float = 1e-3
    chunk_size: int = 50
    crop_um: float = 56.0
    n_positions: int = 512
    depth: int = 1
    heads: int = 4
    dim_head: int = 64
    hidden: int = 2048
    use_positions: bool = True
    context: str = "all"
    standardize: bool = True
    n_states: int = 1
    device: str = "auto"
    checkpoint_dir: str | None = None

    # -- data ----------------------------------------------------------------------------
    def _features(self, section, xy: np.ndarray) -> np.ndarray:
        return crop_features(section, self.encoder, self.crop_um, centers=xy,
                             cache_dir=self.cache_dir)

    def _arch(self, dim: int) -> dict:
        return dict(dim=dim, n_genes=len(self.genes_), n_positions=self.n_positions,
                    depth=self.depth, heads=self.heads, dim_head=self.dim_head,
                    hidden=self.hidden, use_positions=self.use_positions)

    def _fit_spots(self, sections, targets) -> None:
        import torch

        F, AB, Y, groups = [], [], [], []
        for sec, o, ab, y in ordered_training_sets(sections, targets, self.n_positions,
                                                   self.name):
            groups += [c + sum(len(f) for f in F) for c in chunks(len(o), self.chunk_size)]
            F.append(self._features(sec, sec.xy[o]))
            AB.append(ab)
            Y.append(y)
        X = np.concatenate(F).astype(np.float32)
        self.feat_mean_, self.feat_std_ = feature_stats(X, self.standardize)
        X = (X - self.feat_mean_) / self.feat_std_
        self.in_dim_ = int(X.shape[1])
        AB = np.concatenate(AB).astype(np.float32)
        Y = np.concatenate(Y).astype(np.float32)
        dev = train.resolve_device(self.device)
        Xd, ABd, Yd = (torch.from_numpy(a).to(dev) for a in (X, AB, Y))
        idx = [torch.from_numpy(g).to(dev) for g in groups]
        arch = self._arch(self.in_dim_)

        def fit_one(seed: int):
            gen = torch.Generator().manual_seed(seed)
            model = build_model(**arch).to(dev)

            def batches(epoch):
                for i in torch.randperm(len(idx), generator=gen).tolist():
                    yield idx[i]

            def loss_fn(model, sel):
                _, out = model(Xd[sel][None], ABd[sel][None])
                return ((out[0] - Yd[sel]) ** 2).mean()

            hist = train_chunks(model, batches, loss_fn, self.epochs, len(idx), self.lr,
                                self.name if self.progress else False)
            return {"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                    "loss": hist}

        train.fit_method_states(self, fit_one, X, AB, Y)

    # -- prediction ------------------------------------------------------------------------
    def _predict_spots(self, section, xy: np.ndarray) -> np.ndarray:
        import torch

        measured = self.context == "all"  # "queries": chunks of the query points alone
        all_ab, new, row = prediction_points(section, xy, self.n_positions, self.name,
                                             measured)
        feats = [self._features(section, section.xy)] if measured else []
        if len(new):
            feats.append(self._features(section, xy[new]))
        X = np.concatenate(feats).astype(np.float32)
        if X.shape[1] != self.in_dim_:
            raise InputError(f"{self.name} was fitted on {self.in_dim_}-d crop features but "
                             f"encoder {self.encoder!r} gives {X.shape[1]}-d: use the same encoder")
        X = (X - self.feat_mean_) / self.feat_std_
        order = spatial_order(all_ab)
        dev = train.resolve_device(self.device)
        models = train.load_members(self.states_, lambda: build_model(**self._arch(self.in_dim_)),
                                    dev)
        pred = np.empty((len(X), len(self.genes_)), dtype=np.float32)
        Xd = torch.from_numpy(X).to(dev)
        ABd = torch.from_numpy(all_ab.astype(np.float32)).to(dev)
        with torch.inference_mode():
            for c in chunks(len(order), self.chunk_size):
                sel = torch.from_numpy(order[c]).to(dev)
                outs = [m(Xd[sel][None], ABd[sel][None])[1][0] for m in models]
                pred[order[c]] = train.median_over_states(outs)
        return pred[row]


__all__ = ["HisHRST", "build_model"]
