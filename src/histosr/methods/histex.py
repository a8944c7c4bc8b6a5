"""HISTEX (MICCAI 2025) and DeepHEx: superpixel tokens fused with the expression of nearby
high-density pseudo-spots by bidirectional cross-attention, trained by iStar's weak
supervision.

Clean-room implementation from METHODS.md sections 2 and 3 (both released codes are
unlicensed). The two methods share everything but the fusion depth, the widths and the
non-linearity, so one class implements both (:class:`CrossAttentionSR`) and the registered
``histex`` / ``deephex`` classes only change its defaults.

A training sample is one measured (pseudo-)spot:

* **tokens**: the square window of ``2 * floor(r_sp) + 1`` superpixels (7 x 7 for a 55 um
  Visium spot) centred on the spot, one token per superpixel: encoder features (plus, for
  HISTEX, the RGB means and the normalised row/column position, the scstGCN channels of
  HISTEX's 1029-d map);
* **gene context**: the min-max normalised expression of the ``k`` high-density pseudo-spots
  (:func:`histosr.lattice.hr_pseudospots`) nearest to the spot centre;
* **fusion**: ``n_blocks`` bidirectional cross-attention blocks, each ``C = CA(q=tokens,
  kv=genes)``, ``D = CA(q=genes, kv=tokens)``, ``out = CA(q=C, kv=D)`` followed by a residual
  ``x = l(x) + x``; the fused tokens are concatenated with the raw tokens and a per-token MLP
  maps them to expression (``ELU(alpha=0.01) + 0.01``, non-negative);
* **loss**: MSE between the mean of the per-superpixel predictions over the spot's footprint
  superpixels and the spot's min-max normalised counts per superpixel (as :mod:`.istar`).

Prediction tiles the tissue superpixels into windows aligned to the grid (blocks of the
training window size, as HISTEX/DeepHEx), gives each block the ``k`` pseudo-spots nearest to
its centre, and takes the median over the ensemble members.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from scipy.spatial import cKDTree

from .. import train
from ..errors import InputError
from ..geometry import section_footprints
from ..params import DEVICE, Interval, MultipleOf, Options
from .base import SuperpixelMethod, register_method
from .scaling import FootprintSampler, feature_stats, minmax

# Upper bound on the float32 activations of one prediction chunk (tokens x embedding).
_PREDICT_BUDGET_BYTES = 2**27
_RGB_NAMES = ("r_mean", "g_mean", "b_mean")
#: gene context: ``"hr"`` the published one; ``"off"`` (zeros) and ``"shuffled"`` (HR
#: pseudo-spot values permuted over positions, seeded) are ablations of what it adds
CONTEXTS = ("hr", "off", "shuffled")


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
def build_model(d_in: int, n_genes: int, embed_dim: int, heads: int, n_blocks: int,
                act: str, hidden: tuple[int, ...]):
    """The HISTEX / DeepHEx network (METHODS 2.2, 3.2).

    ``act``: ``"identity"`` (HISTEX: its custom ``Linear`` with ``func=False`` is affine, so
    the residual layers and the 4-layer "FNN" are affine maps) or ``"leaky"`` (DeepHEx:
    LeakyReLU(0.1)). Every such layer is HISTEX's ``Linear``: weight (in, out), no bias,
    uniform(+-1/sqrt(out)) initialisation, output ``act(x W) + 0.01``.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class HistexLinear(nn.Module):
        def __init__(self, d_i, d_o, kind):
            super().__init__()
            b = 1.0 / math.sqrt(d_o)
            self.weight = nn.Parameter(torch.empty(d_i, d_o).uniform_(-b, b))
            self.kind = kind

        def forward(self, x):
            y = x @ self.weight
            if self.kind == "leaky":
                y = F.leaky_relu(y, 0.1)
            elif self.kind == "elu":
                y = F.elu(y, alpha=0.01)
            return y + 0.01

    class CrossAttention(nn.Module):
        """Multi-head cross-attention, Q from ``q``, K and V from ``kv``, all projected to
        ``embed_dim``; scale 1/sqrt(head_dim)."""

        def __init__(self, q_dim, kv_dim):
            super().__init__()
            self.q = nn.Linear(q_dim, embed_dim)
            self.k = nn.Linear(kv_dim, embed_dim)
            self.v = nn.Linear(kv_dim, embed_dim)
            self.out = nn.Linear(embed_dim, embed_dim)

        def project_kv(self, kv):
            """Keys and values (n, heads, tk, head_dim) of ``kv`` (n, tk, kv_dim)."""
            n, tk, _ = kv.shape
            hd = embed_dim // heads
            K = self.k(kv).view(n, tk, heads, hd).transpose(1, 2)
            V = self.v(kv).view(n, tk, heads, hd).transpose(1, 2)
            return K, V

        def attend(self, q, K, V):
            n, tq, _ = q.shape
            hd, tk = embed_dim // heads, K.shape[2]
            Q = self.q(q).view(n, tq, heads, hd).transpose(1, 2)
            # softmax(QK^T / sqrt(hd)) V written out: with 5-6 keys (or queries) and
            # head_dim 16 the fused CPU kernel is several times slower than two batched
            # matmuls, and it has no vmap rule (ensemble members train batched). The
            # scale goes on the side with fewer rows.
            if tq <= tk:
                A = torch.softmax((Q * (1.0 / math.sqrt(hd))) @ K.transpose(-2, -1), dim=-1)
            else:
                A = torch.softmax(Q @ (K * (1.0 / math.sqrt(hd))).transpose(-2, -1), dim=-1)
            # few keys (5-6 gene-context rows) and many queries per row: out = sum_h A_h
            # (V_h Wo_h) + b, each head's values pushed through its slice of the output
            # layer once per row (heads * tk * hd * E), then heads * tk instead of E
            # multiply-adds per query and output. With one query per row (the selected
            # footprint tokens, keys gathered per token) that product would be built per
            # token: (n, heads, tk, E), 1 GB for 21k DeepHEx tokens; then the plain path.
            if heads * tk >= embed_dim or tq * (embed_dim - heads * tk) <= heads * tk * hd:
                o = (A @ V).transpose(1, 2).reshape(n, tq, embed_dim)
                return self.out(o)
            Wo = self.out.weight.t().reshape(heads, hd, embed_dim)
            VW = (V @ Wo).reshape(n, heads * tk, embed_dim)  # (n, heads * tk, E)
            return A.transpose(1, 2).reshape(n, tq, heads * tk) @ VW + self.out.bias

        def forward(self, q, kv):
            return self.attend(q, *self.project_kv(kv))

    class Bidirectional(nn.Module):
        """C = CA(q=A, kv=B); D = CA(q=B, kv=A); out = CA(q=C, kv=D)."""

        def __init__(self, a_dim, b_dim):
            super().__init__()
            self.ab = CrossAttention(a_dim, b_dim)
            self.ba = CrossAttention(b_dim, a_dim)
            self.cd = CrossAttention(embed_dim, embed_dim)

        def forward(self, a, b):
            return self.cd(self.ab(a, b), self.ba(b, a))

    class CrossAttentionNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(
                [Bidirectional(d_in if i == 0 else embed_dim, n_genes) for i in range(n_blocks)])
            self.res = nn.ModuleList(
                [HistexLinear(embed_dim, embed_dim, act) for _ in range(n_blocks)])
            widths = (embed_dim + d_in,) + tuple(hidden)
            self.mlp = nn.Sequential(*[HistexLinear(a, b, act)
                                       for a, b in zip(widths[:-1], widths[1:])])
            self.out = HistexLinear(widths[-1], n_genes, "elu")

        def fuse(self, tokens, genes, select=None):
            """(n, T, d_in) tokens, (n, k, G) gene context -> fused tokens (n, T, E), or,
            with ``select`` (flat indices into the n * T tokens), only those (n_sel, E).

            Queries are per token, so in the last block only the selected tokens need
            C = CA(q=tokens, kv=genes) and out = CA(q=C, kv=D); D = CA(q=genes,
            kv=tokens) still attends to every token of the window. Exact, and several
            times cheaper when the loss uses a few footprint superpixels per window."""
            x = tokens
            n, T = tokens.shape[:2]
            last = len(self.blocks) - 1
            for i, (blk, res) in enumerate(zip(self.blocks, self.res)):
                if select is None or i < last:
                    x = blk(x, genes)
                    x = res(x) + x
                    continue
                D = blk.ba(genes, x)
                win = torch.div(select, T, rounding_mode="floor")
                xs = x.reshape(n * T, -1)[select].unsqueeze(1)
                Kg, Vg = blk.ab.project_kv(genes)
                C = blk.ab.attend(xs, Kg[win], Vg[win])
                Kd, Vd = blk.cd.project_kv(D)
                o = blk.cd.attend(C, Kd[win], Vd[win]).squeeze(1)
                return res(o) + o
            return x if select is None else x.reshape(n * T, -1)[select]

        def head(self, fused, tokens):
            """Per-token expression from fused and raw tokens (..., E), (..., d_in)."""
            return self.out(self.mlp(torch.cat([fused, tokens], dim=-1)))

        def forward(self, tokens, genes):
            return self.head(self.fuse(tokens, genes), tokens)

    return CrossAttentionNet()


# --------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------
@dataclass
class CrossAttentionSR(SuperpixelMethod):
    """Shared implementation of HISTEX and DeepHEx (see the module docstring and the
    registered classes for the published defaults and the differences from the released
    code). ``context="off" | "shuffled"`` ablates the gene context (zeros, or the HR values
    permuted over the HR positions) at fit and predict alike; ``"hr"`` is the method.
    ``batch_states`` (runtime): train the members together as one batched model (same
    initialisations, batches and updates as one after the other, up to float rounding).
    ``precision="bf16"``: matmuls under bfloat16 autocast (weights, optimiser and loss stay
    float32); worthwhile only on CPUs with native bf16 (AVX512-BF16/AMX) or GPUs."""

    constraints: ClassVar[dict] = {
        "epochs": Interval(int, 1), "n_states": Interval(int, 1),
        "lr": Interval(float, 0, closed="neither"), "batch_size": Interval(int, 1),
        "embed_dim": MultipleOf("heads"), "heads": Interval(int, 1), "n_blocks": Interval(int, 1),
        "k_neighbors": Interval(int, 1), "activation": Options("identity", "leaky"),
        "max_cells_per_spot": Interval(int, 2), "context": Options(*CONTEXTS),
        "device": DEVICE, "precision": Options("fp32", "bf16")}
    runtime: ClassVar[tuple] = SuperpixelMethod.runtime + ("batch_states",)

    epochs: int = 500
    n_states: int = 5
    lr: float = 1e-4
    batch_size: int | None = None
    embed_dim: int = 128
    heads: int = 8
    n_blocks: int = 2
    k_neighbors: int = 5
    activation: str = "identity"
    hidden: tuple[int, ...] = (1024, 512, 512, 512)
    rgb_pos: bool = True
    standardize: bool = True
    max_cells_per_spot: int | None = 16
    shuffle: bool = False
    context: str = "hr"
    precision: str = "fp32"
    batch_states: bool = True
    device: str = "auto"
    checkpoint_dir: str | None = None

    # -- inputs shared by fit and predict ------------------------------------------------
    def _extra_channels(self, features) -> list[str]:
        if not self.rgb_pos:
            return []
        names = set((features.meta or {}).get("feature_names") or [])
        return (["pos"] if set(_RGB_NAMES) <= names else ["rgb", "pos"])

    def _token_source(self, section, features):
        """A function (rows, cols) -> raw token features (n, d_in), float32."""
        extra = self._extra_channels(features)
        rgb = None
        if "rgb" in extra:
            from ..tissue import mean_rgb_sp

            rgb = mean_rgb_sp(section.image, section.um_per_px) / np.float32(255.0)
            if rgb.shape[:2] != tuple(features.grid.shape):
                raise InputError(f"image grid {rgb.shape[:2]} does not match the FeatureMap "
                                 f"grid {features.grid.shape}")
        h, w = features.grid.shape

        def tokens(rows, cols):
            parts = [features.gather(rows, cols)]
            if rgb is not None:
                parts.append(rgb[rows, cols].astype(np.float32))
            if "pos" in extra:
                parts.append(np.stack([rows / max(h - 1, 1), cols / max(w - 1, 1)],
                                      axis=1).astype(np.float32))
            return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

        return tokens

    def _context(self, section):
        """(HR pseudo-spot xy, their per-gene min-max normalised values) of a section."""
        import warnings

        from ..lattice import hr_pseudospots

        try:
            hr = hr_pseudospots(section, self.genes_)
            xy, v = hr.obsm["spatial"], np.asarray(hr.X, dtype=np.float32)
        except ValueError as e:  # no 2-D lattice (a single row of spots, one spot)
            warnings.warn(f"{self.name}: no high-density pseudo-spots for section "
                          f"{section.name!r} ({e}); the measured spots are the gene context",
                          stacklevel=3)
            xy, v = section.xy, section.dense_counts(self.genes_).astype(np.float32)
        v = minmax(v)[0]
        if self.context == "off":  # ablation: no expression reaches the tokens
            v = np.zeros_like(v)
        elif self.context == "shuffled":  # ablation: right values, wrong places
            v = v[np.random.default_rng(self.seed).permutation(len(v))]
        return np.asarray(xy, dtype=np.float64), v.astype(np.float32)

    def _neighbours(self, hr_xy, xy) -> np.ndarray:
        """(n, k) indices of the k HR pseudo-spots nearest to each point (the nearest
        repeated when the section has fewer than k)."""
        k = self.k_neighbors
        kk = min(k, len(hr_xy))
        _, j = cKDTree(hr_xy).query(np.asarray(xy, dtype=np.float64), k=kk)
        j = np.asarray(j).reshape(len(xy), kk)
        if kk < k:
            j = np.concatenate([j, np.repeat(j[:, :1], k - kk, axis=1)], axis=1)
        return j.astype(np.int64)

    # -- training data ------------------------------------------------------------------
    def _training_data(self, sections, features):
        half = max(int(math.floor(fm.grid.radius_sp(s.spot_diameter_um)))
                   for s, fm in zip(sections, features))
        w = 2 * half + 1
        d = np.arange(-half, half + 1)
        dr, dc = [a.ravel() for a in np.meshgrid(d, d, indexing="ij")]
        tok_blocks, hr_blocks = [], []
        win_cells, win_ctx, spot_wins, spot_cells, dens = [], [], [], [], []
        tok_off = hr_off = n_win = 0
        for sec, fm in zip(sections, features):
            grid = fm.grid
            H, W = grid.shape
            fps = sec.spot_footprints()
            F = section_footprints(sec, grid)
            counts = sec.dense_counts(self.genes_)
            hr_xy, hr_v = self._context(sec)
            hr_blocks.append(hr_v)
            # windows: one per footprint disk centre
            centres = np.concatenate(fps)
            owner = np.concatenate([np.full(len(f), i) for i, f in enumerate(fps)])
            cr, cc = grid.cell_of_xy(centres)
            R, C = cr[:, None] + dr[None], cc[:, None] + dc[None]
            inside = (R >= 0) & (R < H) & (C >= 0) & (C < W)
            flat = np.where(inside, R * W + C, -1)
            uniq, inv = np.unique(flat[inside], return_inverse=True)
            rows, cols = grid.unflat(uniq)
            tok_blocks.append(self._token_source(sec, fm)(rows, cols))
            idx = np.full(flat.shape, -1, dtype=np.int64)
            idx[inside] = inv.ravel() + tok_off
            win_cells.append(idx)
            win_ctx.append(self._neighbours(hr_xy, centres) + hr_off)
            sp_rc = grid.sp_of_xy(centres)
            first = np.searchsorted(owner, np.arange(len(fps)))
            for i in range(len(fps)):
                cells = F.indices[F.indptr[i] : F.indptr[i + 1]]
                if len(cells) == 0:
                    continue
                mine = np.arange(first[i], first[i] + len(fps[i]))
                r, c = grid.unflat(cells)
                # each footprint superpixel belongs to the window of its nearest disk centre
                dist = (r[:, None] - sp_rc[mine, 0]) ** 2 + (c[:, None] - sp_rc[mine, 1]) ** 2
                m = dist.argmin(axis=1)
                orr, occ = r - cr[mine][m] + half, c - cc[mine][m] + half
                ok = (orr >= 0) & (orr < w) & (occ >= 0) & (occ < w)
                if not ok.any():
                    continue
                spot_wins.append(mine + n_win)
                spot_cells.append(np.stack([m[ok], orr[ok] * w + occ[ok]], axis=1))
                # target: counts per footprint superpixel (istar difference (a))
                dens.append(counts[i] / len(cells))
            tok_off += len(uniq)
            hr_off += len(hr_v)
            n_win += len(centres)
        if not spot_cells:
            raise InputError(f"{self.name}: no training spot has a footprint on the grid")
        X = np.concatenate(tok_blocks).astype(np.float32)
        win = np.concatenate(win_cells)
        win[win < 0] = len(X)  # padding token (a zero row after standardisation)
        return (X, win, np.concatenate(win_ctx), np.concatenate(hr_blocks), spot_wins,
                spot_cells, np.stack(dens), half)

    def _fit(self, sections, features) -> None:
        import torch

        X, win, ctx, HR, spot_wins, spot_cells, dens, half = self._training_data(
            sections, features)
        self.window_half_ = int(half)
        self.extra_channels_ = self._extra_channels(features[0])
        self.feat_mean_, self.feat_std_ = feature_stats(X, self.standardize)
        # z-scored features plus the padding token's zero row, written once (no copies)
        Xs = np.zeros((len(X) + 1, X.shape[1]), np.float32)
        np.subtract(X, self.feat_mean_, out=Xs[:-1])
        Xs[:-1] /= self.feat_std_
        X = Xs
        del Xs
        Y, self.target_min_, self.target_scale_ = minmax(dens, overwrite=True)

        n_spots, G, d_in = len(spot_cells), Y.shape[1], X.shape[1]
        self.in_dim_, self.n_train_spots_ = int(d_in), int(n_spots)
        T = win.shape[1]
        # padded spot -> windows (repeat the first) and spot -> (window slot, token) cells
        n_w = np.array([len(s) for s in spot_wins])
        Wm = int(n_w.max())
        SW = np.stack([np.concatenate([s, np.repeat(s[:1], Wm - len(s))]) for s in spot_wins])
        # a spot's cells as window slot * T + token
        sampler = FootprintSampler([c[:, 0] * T + c[:, 1] for c in spot_cells],
                                   self.max_cells_per_spot)
        m = sampler.m
        b = self.batch_size or max(1, min(32, n_spots // 16))
        dev = train.resolve_device(self.device)

        Xd = torch.from_numpy(X).to(dev)
        HRd = torch.from_numpy(HR).to(dev)
        WINd = torch.from_numpy(win).to(dev)
        CTXd = torch.from_numpy(ctx).to(dev)
        SWd = torch.from_numpy(SW).to(dev)
        Yd = torch.from_numpy(Y)
        arch = (self.embed_dim, self.heads, self.n_blocks, self.activation, tuple(self.hidden))
        shuffle, precision = self.shuffle, self.precision
        # gathers done once: each spot's window tokens and gene context
        TOKd = Xd[WINd[SWd]]  # (n_spots, Wm, T, d_in)
        GENd = HRd[CTXd[SWd]]  # (n_spots, Wm, k, G)
        offs = (torch.arange(b, device=dev) * (Wm * T))[:, None]

        def make_member(seed: int):
            gen = torch.Generator().manual_seed(seed)
            model = build_model(d_in, G, *arch).to(dev)

            def batches(epoch):
                order = (torch.randperm(n_spots, generator=gen) if shuffle
                         else torch.arange(n_spots))
                cells = sampler.draw(gen)
                cells, wts = cells[order].to(dev), sampler.weights[order].to(dev)
                y = Yd[order].to(dev)
                order = order.to(dev)
                for a in range(0, n_spots, b):
                    yield order[a : a + b], cells[a : a + b], wts[a : a + b], y[a : a + b]

            return model, batches

        def loss_fn(model, batch):
            spots, cells, wts, y = batch
            nb = spots.shape[0]
            tok = TOKd[spots].reshape(nb * Wm, T, d_in)
            flat = (cells + offs[:nb]).reshape(-1)
            with train.autocast(dev, precision):
                fused = model.fuse(tok, GENd[spots].reshape(nb * Wm, -1, G), flat)
                p = model.head(fused, tok.reshape(-1, d_in)[flat]).view(nb, m, G)
            mean = torch.bmm(wts.unsqueeze(1), p.float()).squeeze(1)
            return ((mean - y) ** 2).mean()

        train.fit_members(self, make_member, loss_fn, X, Y, win, ctx, HR, SW, sampler.padded,
                          label=self.name if self.progress else False)

    # -- prediction -------------------------------------------------------------------------
    def _models(self, dev):
        return train.load_members(
            self.states_,
            lambda: build_model(self.in_dim_, len(self.genes_), self.embed_dim, self.heads,
                                self.n_blocks, self.activation, tuple(self.hidden)), dev)

    def _predict_cells(self, section, features, flat_cells: np.ndarray) -> np.ndarray:
        flat_cells = np.asarray(flat_cells, dtype=np.int64)
        out = np.empty((len(flat_cells), len(self.genes_)), dtype=np.float32)
        for sel, block in self._stream(section, features, flat_cells, reduce=True):
            out[sel] = block
        return out

    def state_predictions(self, section, features, flat_cells: np.ndarray) -> np.ndarray:
        """(n_states, n_cells, G) counts per superpixel of each member (no median)."""
        flat_cells = np.asarray(flat_cells, dtype=np.int64)
        out = np.empty((len(self.states_), len(flat_cells), len(self.genes_)), np.float32)
        for sel, block in self._stream(section, features, flat_cells, reduce=False):
            out[:, sel] = block
        return out

    def _stream(self, section, features, flat_cells, reduce: bool):
        """Yield (positions in ``flat_cells``, predictions) block chunk by block chunk:
        grid-aligned windows, each with the k HR pseudo-spots nearest to its centre."""
        import torch

        extra = self._extra_channels(features)
        if extra != self.extra_channels_ or features.dim + _extra_dim(extra) != self.in_dim_:
            raise InputError(
                f"{self.name} was fitted on {self.in_dim_}-d tokens ({self.extra_channels_} "
                f"added) but got a {features.dim}-d FeatureMap (encoder {features.encoder!r}): "
                "use the encoder it was fitted with"
            )
        if len(flat_cells) == 0:
            return
        dev = train.resolve_device(self.device)
        models = self._models(dev)
        grid = features.grid
        H, W = grid.shape
        half = self.window_half_
        w = 2 * half + 1
        T = w * w
        hr_xy, hr_v = self._context(section)
        HRd = torch.from_numpy(hr_v).to(dev)
        tokens = self._token_source(section, features)
        r, c = grid.unflat(flat_cells)
        bid = (r // w) * (-(-W // w)) + c // w
        order = np.argsort(bid, kind="stable")
        blocks, starts = np.unique(bid[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        per = max(1, _PREDICT_BUDGET_BYTES // (4 * T * (self.embed_dim * 6 + self.in_dim_)))
        d = np.arange(w)
        dr, dc = [a.ravel() for a in np.meshgrid(d, d, indexing="ij")]
        nbw = -(-W // w)
        for a0 in range(0, len(blocks), per):
            bl = blocks[a0 : a0 + per]
            br, bc = bl // nbw, bl % nbw
            R, C = br[:, None] * w + dr[None], bc[:, None] * w + dc[None]
            inside = (R < H) & (C < W)
            tok = np.zeros((len(bl), T, self.in_dim_), dtype=np.float32)
            tok[inside] = (tokens(R[inside], C[inside]) - self.feat_mean_) / self.feat_std_
            centre = grid.xy_of_cells(br * w + half, bc * w + half)
            nb = self._neighbours(hr_xy, centre)
            sel = order[starts[a0] : ends[a0 + len(bl) - 1]]
            local = np.repeat(np.arange(len(bl)), ends[a0 : a0 + len(bl)]
                              - starts[a0 : a0 + len(bl)])
            pos = (r[sel] - br[local] * w) * w + (c[sel] - bc[local] * w)
            flat = torch.from_numpy(local * T + pos).to(dev)
            tok_t = torch.from_numpy(tok).to(dev)
            ctx = HRd[torch.from_numpy(nb).to(dev)]
            y = np.empty((len(models), len(sel), len(self.genes_)), dtype=np.float32)
            with torch.inference_mode():
                for i, mdl in enumerate(models):  # one member's output alive at a time
                    y[i] = mdl.head(mdl.fuse(tok_t, ctx, flat),
                                    tok_t.reshape(-1, self.in_dim_)[flat]).float().cpu().numpy()
            if reduce:
                y = train.median_inplace(y)
            yield sel, (y * self.target_scale_ + self.target_min_).astype(np.float32)


def _extra_dim(extra: list[str]) -> int:
    return 3 * ("rgb" in extra) + 2 * ("pos" in extra)


@register_method("histex")
@dataclass
class Histex(CrossAttentionSR):
    """HISTEX (MICCAI 2025; METHODS.md 2): two bidirectional cross-attention blocks
    (E = 128, 8 heads) fuse each spot's superpixel tokens (encoder features + RGB means +
    normalised row/column position) with the expression of its 5 nearest high-density
    pseudo-spots; affine residual layers and an affine 4-layer FNN (1024, 512, 512, 512)
    on [fused, raw] tokens; output ELU(alpha=0.01) + 0.01. Published defaults: 500 epochs,
    5 states (median), Adam lr 1e-4, batch min(32, n_spots // 16), no shuffling.

    Where histosr deliberately differs from the released HISTEX code (METHODS 9):

    (a) Gene context at training is the k nearest HR pseudo-spots to each training spot
        (the intended pairing, as at inference and in DeepHEx); the released
        ``SpotDataset`` pairs spot i with the neighbourhood of HR spot i (METHODS 9.1).
    (b) Attention scale 1/sqrt(head_dim) (= 1/4 for E = 128, 8 heads), not 1/sqrt(heads)
        (METHODS 9.2; DeepHEx's latest commit fixes it the same way). The affine FNN of
        the released code (identity activations) is kept.
    (c) Footprints and window: the window is ``2 * floor(r_sp) + 1`` superpixels (7 for
        55 um spots, 13 for 100 um ST spots) around each footprint disk centre; the loss
        averages the predictions over the spot's footprint superpixels
        (:func:`histosr.geometry.footprint_matrix`, centres within the disk; 37 for a
        centred 55 um spot as in HISTEX). A pooled pseudo-spot (union of member disks)
        contributes one window per member, each with its own HR context, and the loss
        averages over the union's superpixels (each in the window of its nearest member):
        one window over the whole union would be 39 x 39 superpixels for her2st blocks.
        Target = counts / footprint size, then per-gene min-max (istar difference (a)).
    (d) ``max_cells_per_spot`` (default 16; ``None`` = all, as HISTEX): the per-token MLP
        (the bulk of the cost) runs on a fresh random subset of footprint superpixels per
        spot each epoch, whose mean is an unbiased estimate of the footprint mean (as
        istar (c)); attention still sees every token of the window.
    (e) ``standardize=True``: tokens are z-scored with the training windows' statistics
        (HISTEX feeds raw UNI features); ``False`` reproduces the released behaviour.
    (f) RGB: when the encoder already provides r/g/b means (``feature_names`` ``r_mean``,
        ``g_mean``, ``b_mean``, e.g. ``handcrafted``) they are not duplicated; otherwise the
        superpixel colour means / 255 are appended (scstGCN). Position channels are the
        row/column index over the grid scaled to [0, 1], without scstGCN's 4x4 smoothing
        (a no-op on a linear ramp away from the border).
    (g) Prediction covers only the requested (tissue) superpixels, in grid-aligned blocks
        of the training window size (HISTEX predicts the whole padded image); block tokens
        outside the image are zero after standardisation (HISTEX pads raw zeros).
    (h) HR pseudo-spots: :func:`histosr.lattice.hr_pseudospots` (exact half-pitch, lattice
        inferred; see its differences). HR values are min-max normalised per gene over the
        HR set of the section being fitted or predicted. The latent embedding output is
        not reproduced. Runs on CPU or CUDA (``device="auto"``; the released loss moves its
        mask to 'cuda').
    """

    epochs: int = 500
    n_states: int = 5
    embed_dim: int = 128
    n_blocks: int = 2
    k_neighbors: int = 5
    activation: str = "identity"
    rgb_pos: bool = True


@register_method("deephex")
@dataclass
class DeepHEx(CrossAttentionSR):
    """DeepHEx (METHODS.md 3): HISTEX with one bidirectional cross-attention fusion block
    (BCAF, E = 256, 8 heads, attention scale 1/sqrt(head_dim) as its latest commit), 6
    nearest HR pseudo-spots, LeakyReLU(0.1) residual layer and MLP (each layer
    ``LeakyReLU(x W) + 0.01``, widths 1024, 512, 512, 512), encoder features only (no RGB /
    position channels). Published defaults (configs/config_demo.yaml): 400 epochs, 1 state,
    Adam lr 1e-4, batch min(32, n_spots // 16), no shuffling.

    Deliberate differences from the released code: HISTEX's (c)-(h) (footprint windows and
    pooled spots, cell subsampling, standardised tokens, tissue-only grid-aligned
    prediction, exact HR pseudo-spots with the lattice inferred as DeepHEx does but
    without its HRcnts111.csv file-name mismatch, CPU/CUDA).
    """

    epochs: int = 400
    n_states: int = 1
    embed_dim: int = 256
    n_blocks: int = 1
    k_neighbors: int = 6
    activation: str = "leaky"
    rgb_pos: bool = False


__all__ = ["CrossAttentionSR", "Histex", "DeepHEx", "build_model"]
