"""Pieces shared by the chunked spot-set methods (HisHRST, TriHRGE; METHODS.md 4.2, 5).

* **Positions** come from the measured spot lattice of each section
  (:func:`histosr.lattice.infer_lattice`: ``obs["array_col"]``/``["array_row"]`` when present,
  else the coordinates). A point's position is its *fractional* lattice index ``(a, b)``
  (a = column index, b = row index), obtained by inverting the lattice's affine map, so a
  half-step generated position is ``a + 0.5`` exactly (no ``.long()`` truncation, no
  hard-coded pixel offsets).
* :class:`LerpEmbedding`: a learned embedding table over integer indices read at fractional
  indices by linear interpolation between the two neighbouring rows (an integer index reads
  its own row; ``a + 0.5`` the mean of rows ``a`` and ``a + 1``).
* :func:`chunks`: spots split in order into chunks of about 50 (``np.array_split``).
* :func:`published_lr`: the HisHRST/TriHRGE schedule (Adam 1e-3; 5-epoch linear warm-up from
  x1e-5; constant to epoch 50; cosine to 1e-8 with T_max = epochs - 5, stepped per iteration).
* :func:`train_chunks`: the training loop with that schedule (shared seeding lives in
  :mod:`histosr.train`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..errors import InputError
from ..lattice import Lattice, infer_lattice


def section_lattice(section) -> tuple[Lattice, np.ndarray]:
    """The section's spot lattice and each spot's integer index ``(a, b)`` (n, 2)."""
    obs = section.counts.obs
    ab = None
    if "array_row" in obs and "array_col" in obs:
        ab = np.stack([obs["array_col"].to_numpy(), obs["array_row"].to_numpy()], axis=1)
        ab = ab.astype(np.float64)
        if not np.all(np.isfinite(ab)) or np.any(ab != np.round(ab)):
            ab = None  # pooled or malformed: infer from the coordinates
    return infer_lattice(section.xy, ab)


def lattice_index(lat: Lattice, xy: np.ndarray) -> np.ndarray:
    """Fractional lattice index ``(a, b)`` (n, 2) of full-res (x, y) px points (inverse of
    :meth:`Lattice.xy`). Values within 1e-6 of a multiple of 1/2 are snapped onto it, so
    half-step positions are exact."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    M = np.array([lat.step_a, lat.step_b], dtype=np.float64)
    ab = np.linalg.solve(M.T, (xy - np.asarray(lat.origin)).T).T
    half = np.round(ab * 2.0) / 2.0
    return np.where(np.abs(ab - half) < 1e-6, half, ab)


def chunks(n: int, size: int = 50) -> list[np.ndarray]:
    """Indices ``0..n-1`` in order, split into ``max(1, round(n / size))`` near-equal chunks."""
    if n <= 0:
        return []
    return np.array_split(np.arange(n), max(1, int(round(n / size))))


def spatial_order(ab: np.ndarray) -> np.ndarray:
    """Row-major order of lattice positions (by row index b, then column index a)."""
    ab = np.asarray(ab, dtype=np.float64)
    return np.lexsort((ab[:, 0], ab[:, 1]))


def published_lr(step: int, steps_per_epoch: int, epochs: int, warmup: int = 5,
                 constant_until: int = 50, start_factor: float = 1e-5,
                 lr: float = 1e-3, eta_min: float = 1e-8) -> float:
    """Learning rate at iteration ``step`` (0-based) of the released schedule.

    Epochs ``0..constant_until``: ``LinearLR(start_factor, total_iters = warmup epochs)``
    (warm-up, then constant); afterwards ``CosineAnnealingLR(T_max = (epochs - warmup)
    epochs of iterations, eta_min)``, started at 0 (the released code steps it only after
    epoch 50, so it does not reach ``eta_min`` by the last epoch). With fewer than 1000
    epochs the phase lengths scale with ``epochs / 1000`` (at least one warm-up epoch).
    """
    spe = max(1, int(steps_per_epoch))
    if epochs < 1000:
        warmup = max(1, int(round(warmup * epochs / 1000)))
        constant_until = int(round(constant_until * epochs / 1000))
    epoch = step // spe
    if epoch <= constant_until:
        w = warmup * spe
        f = start_factor + (1.0 - start_factor) * min(step, w) / w
        return lr * f
    k = step - (constant_until + 1) * spe
    T = max(1, (epochs - warmup) * spe)
    return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * k / T)) / 2.0


def train_chunks(model, batches_fn: Callable[[int], Iterable[Any]],
                 loss_fn: Callable[[Any, Any], Any], epochs: int, steps_per_epoch: int,
                 lr: float = 1e-3, progress: bool | str = False) -> list[float]:
    """:func:`histosr.train.train_loop` with Adam and :func:`published_lr` per iteration;
    returns the mean loss per epoch. ``batches_fn(epoch)`` yields that epoch's batches
    (seeded by the caller)."""
    from .. import train

    return train.train_loop(
        model, batches_fn, loss_fn, epochs, lr, optimizer="adam", progress=progress,
        lr_factor=lambda s: published_lr(s, steps_per_epoch, epochs, lr=lr) / lr)


def lerp_embedding_class():
    """:class:`LerpEmbedding` (built lazily so importing this module does not import torch)."""
    from torch import nn

    class LerpEmbedding(nn.Module):
        """Learned ``(n, dim)`` table read at fractional indices by linear interpolation;
        indices are clamped to ``[0, n - 1]``."""

        def __init__(self, n: int, dim: int):
            super().__init__()
            self.n = int(n)
            self.table = nn.Embedding(self.n, dim)

        def forward(self, idx):
            idx = idx.clamp(0, self.n - 1)
            lo = idx.floor()
            w = (idx - lo).unsqueeze(-1)
            lo = lo.long()
            hi = (lo + 1).clamp(max=self.n - 1)
            return self.table(lo) * (1 - w) + self.table(hi) * w

    return LerpEmbedding


def positions_in_range(ab: np.ndarray, n_pos: int, name: str) -> None:
    """Error when lattice indices fall outside the position tables (``0..n_pos - 1``, with half a
    step of slack on either side for generated positions)."""
    if len(ab) and (ab.min() < -1 or ab.max() > n_pos):
        raise InputError(f"{name}: lattice indices span {ab.min():g}..{ab.max():g} but the "
                         f"position embeddings cover 0..{n_pos - 1}: raise n_positions")


def ordered_training_sets(sections, targets, n_positions: int, name: str) -> list[tuple]:
    """Per training section, in row-major lattice order: ``(section, order, ab, y)`` with
    ``order`` the permutation of its spots, ``ab`` their lattice indices and ``y`` their
    targets (both permuted); indices must fit the position tables."""
    out = []
    for sec, y in zip(sections, targets):
        _, ab = section_lattice(sec)
        ab = ab.astype(np.float64)
        positions_in_range(ab, n_positions, name)
        o = spatial_order(ab)
        out.append((sec, o, ab[o], np.asarray(y)[o]))
    return out


def prediction_points(section, xy: np.ndarray, n_positions: int, name: str,
                      measured: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points a spot-set model predicts over for queries ``xy``: the section's measured
    spots (``measured``), then the queries that are not on a measured site. Returns
    ``(ab, new, row)``: lattice indices of every point, the queries appended as new points,
    and for each query the index of its point."""
    from scipy.spatial import cKDTree

    lat, ab_meas = section_lattice(section)
    q_ab = lattice_index(lat, xy)
    positions_in_range(q_ab, n_positions, name)
    ab_meas = ab_meas.astype(np.float64) if measured else np.zeros((0, 2))
    row = np.empty(len(q_ab), dtype=np.int64)
    same = np.zeros(len(q_ab), bool)
    if len(ab_meas):
        dist, nn = cKDTree(ab_meas).query(q_ab)
        same = dist < 1e-6
        row[same] = nn[same]
    new = np.flatnonzero(~same)
    row[new] = len(ab_meas) + np.arange(len(new))
    return np.concatenate([ab_meas, q_ab[new]]), new, row


__all__ = ["ordered_training_sets", "prediction_points", "section_lattice", "lattice_index", "chunks", "spatial_order", "published_lr",
           "train_chunks", "lerp_embedding_class", "positions_in_range"]
