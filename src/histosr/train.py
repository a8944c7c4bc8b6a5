"""The shared training harness: seeds, devices, a generic loop, ``n_states`` ensembling.

Every learned method trains through this module so that seeding, ensembling (median over
independently trained states, as iStar/HISTEX/DeepHEx do) and resumable checkpoints behave
the same everywhere.

A method's training of ONE ensemble member is a function ``fit_one(seed) -> state``;
:func:`fit_states` derives one seed per member from the method's seed, seeds every RNG
with it, runs the members one after the other and (optionally) stores each finished
member on disk, so that a killed run resumes with the members it has not finished yet.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = [
    "seed_everything",
    "state_seeds",
    "resolve_device",
    "fit_states",
    "median_over_states", "median_inplace",
    "make_optimizer",
    "train_loop",
    "fit_members",
    "train_members_batched",
    "autocast",
    "distributed_env",
    "init_distributed",
    "is_main_process",
    "main_process_first",
    "all_agree",
]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (CPU and CUDA) and ask PyTorch for deterministic
    kernels (``warn_only``: an op without a deterministic variant warns, not fails)."""
    import torch

    seed = int(seed)
    # cuBLAS needs this set before its first use to be deterministic; harmless on CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also NaN-fills every new uninitialised tensor, which only matters
    # to code that reads memory it never wrote and costs ~5-10% of a small model's step.
    try:
        torch.utils.deterministic.fill_uninitialized_memory = False
    except AttributeError:  # older PyTorch
        pass


def state_seeds(seed: int, n_states: int) -> list[int]:
    """Independent per-member seeds derived from ``seed`` (NumPy ``SeedSequence.spawn``).

    Prefix-stable: the first k seeds of ``state_seeds(s, n)`` do not depend on ``n``, so
    adding members keeps the existing ones."""
    if n_states < 1:
        raise InputError(f"n_states must be >= 1, got {n_states}")
    children = np.random.SeedSequence(int(seed)).spawn(int(n_states))
    return [int(c.generate_state(1, dtype=np.uint32)[0]) for c in children]


def resolve_device(device: str = "auto"):
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"``/``"cuda"``/``"cuda:1"`` as given
    (a CUDA request on a machine without CUDA is an error that says so)."""
    import torch

    env = distributed_env()
    if device is None or device == "auto":
        if torch.cuda.is_available() and env is not None:
            return torch.device("cuda", env[2])  # torchrun: one GPU per local rank
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and env is not None and \
            torch.cuda.is_available():
        dev = torch.device("cuda", env[2])
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {device!r} requested but PyTorch sees no CUDA GPU: use device='cpu' or "
            "'auto', or install a CUDA build of PyTorch"
        )
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    return dev


def _save_member(obj: Any, path: Path) -> None:
    """Write a checkpoint atomically with ``torch.save`` (read back with
    ``weights_only=True``: tensors, numbers, text, lists and mappings only, never code)."""
    import torch

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_member(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged or foreign file is retrained, not fatal
        return None


def fit_states(
    fit_one: Callable[[int], Any],
    n_states: int,
    seed: int,
    checkpoint_dir: str | os.PathLike | None = None,
    key: str | None = None,
    progress: bool = False,
    fit_together: Callable[[list[int]], list[Any]] | None = None,
) -> list[Any]:
    """Train ``n_states`` ensemble members one after the other (or, with
    ``fit_together(seeds) -> states``, all members still to train in one call, e.g. as one
    batched model: :func:`train_members_batched`; not under DDP).

    ``fit_one(state_seed)`` trains one member and returns its state (tensors, numbers,
    text, lists, mappings); before it is called every RNG is seeded with that member's seed
    (:func:`state_seeds`). With ``checkpoint_dir`` each finished member is written atomically
    to ``state-<i>.pt`` and, on a later call with the same seed (and ``key``, a
    :func:`histosr.keys.digest` of the data and hyper-parameters), read back instead of
    trained again: a killed run resumes. A file written under another seed or key (or a
    damaged one) is retrained and overwritten.
    """
    seeds = state_seeds(seed, n_states)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
    states: list[Any] = [None] * len(seeds)
    paths = [ckpt / f"state-{i:03d}.pt" if ckpt is not None else None
             for i in range(len(seeds))]
    todo = []
    for i, s in enumerate(seeds):
        path = paths[i]
        saved = _load_member(path) if path is not None and path.exists() else None
        ok = isinstance(saved, dict) and saved.get("seed") == s and saved.get("key") == key
        # under DDP every rank must take the same branch (training is collective)
        if all_agree(ok):
            states[i] = saved["state"]
        else:
            todo.append(i)

    def keep(i, state):
        if paths[i] is not None and is_main_process():  # only rank 0 writes
            _save_member({"seed": seeds[i], "key": key, "index": i, "state": state}, paths[i])
        states[i] = state

    if fit_together is not None and len(todo) > 1 and distributed_env() is None:
        if progress:
            print(f"states {[i + 1 for i in todo]}/{n_states} trained together", flush=True)
        for i, state in zip(todo, fit_together([seeds[i] for i in todo])):
            keep(i, state)
        return states
    for i in todo:
        if progress and is_main_process():
            print(f"state {i + 1}/{n_states} (seed {seeds[i]})", flush=True)
        seed_everything(seeds[i])
        keep(i, fit_one(seeds[i]))
    return states


def median_over_states(arrays: Iterable[Any]) -> np.ndarray:
    """Element-wise median over ensemble members (NumPy arrays or tensors of equal shape);
    with one member its values, as float32."""
    arrs = [a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a) for a in arrays]
    if not arrs:
        raise InputError("median_over_states needs at least one array")
    return median_inplace(np.stack(arrs, axis=0))


def median_inplace(stacked: np.ndarray) -> np.ndarray:
    """Median over axis 0 (the members) of a stacked (members, ...) array, as float32;
    ``stacked`` is partitioned in place (no working copy: predictions of a block of
    superpixels x genes x members are the largest arrays of a streamed prediction)."""
    if len(stacked) == 1:
        return np.array(stacked[0], dtype=np.float32, copy=True)
    return np.median(stacked, axis=0, overwrite_input=True).astype(np.float32, copy=False)


def make_optimizer(params, optimizer: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0):
    """Adam / AdamW / SGD by name; the fused single-kernel variants where PyTorch has them
    (several times cheaper per step for the small models of this package)."""
    import torch

    params = list(params)
    name = optimizer.lower()
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in classes:
        raise InputError(f"optimizer must be one of {sorted(classes)}, got {optimizer!r}")
    cls = classes[name]
    if name in ("adam", "adamw"):
        try:
            return cls(params, lr=lr, weight_decay=weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return cls(params, lr=lr, weight_decay=weight_decay)


def train_loop(
    model,
    batches_fn: Callable[[int], Iterable[Any]],
    loss_fn: Callable[[Any, Any], Any],
    epochs: int,
    lr: float,
    optimizer: str = "adam",
    progress: bool | str = True,
    weight_decay: float = 0.0,
    lr_factor: Callable[[int], float] | None = None,
    clip_grad_norm: float | None = None,
    on_epoch_end: Callable[[int, Any], None] | None = None,
) -> list[float]:
    """Minimise ``loss_fn(model, batch)`` over ``batches_fn(epoch)`` for ``epochs`` epochs.

    ``batches_fn`` receives the epoch number so it can draw that epoch's shuffle from its
    own seeded generator (the loop itself draws no random numbers, so a seeded caller is
    deterministic). ``progress``: a tqdm bar (True, or a string used as its label).
    Returns the mean loss of each epoch. ``lr_factor(step)``: a learning-rate multiplier
    per optimiser step (``LambdaLR``, stepped after every step), e.g. warm-up + cosine.
    ``clip_grad_norm``: clip the gradients' total norm before each step.
    ``on_epoch_end(epoch, model)``: called after each epoch with the model in eval mode
    (validation, model selection, per-epoch outputs); training resumes afterwards.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this is data-parallel (PyTorch DDP): every rank
    draws the same batches (same seed), takes every ``world_size``-th one (rank r the r-th of
    each group of ``world_size`` consecutive batches; a last short group is padded by
    repetition, as ``DistributedSampler`` pads), and gradients are averaged across ranks, so
    the ranks hold identical weights after every step. A step then sees ``world_size``
    batches; the learning rate is not rescaled. The history is the mean over ranks.
    """
    import torch
    from tqdm.auto import tqdm

    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    sched = None if lr_factor is None else torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    step = _ddp_step(model, loss_fn)
    history: list[float] = []
    desc = progress if isinstance(progress, str) else "train"
    bar = tqdm(range(int(epochs)), desc=desc, disable=not progress or not is_main_process(),
               leave=False)
    for epoch in bar:
        total, n = None, 0
        for batch in _rank_batches(batches_fn(epoch)):
            loss = step(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
            d = loss.detach()
            total = d if total is None else total + d
            n += 1
        # one host sync per epoch, not per step
        history.append(_mean_over_ranks(total, n))
        if progress:
            bar.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)
        if on_epoch_end is not None:
            model.eval()
            on_epoch_end(epoch, model)
            model.train()
    model.eval()
    return history


def cpu_state(model) -> dict:
    """A detached CPU copy of ``model.state_dict()``."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_member(model, batches_fn, loss_fn, epochs: int, lr: float, label: str | bool,
                 **loop_kw):
    """Train one ensemble member; returns ``{"model": CPU state_dict, "loss": history}``
    (what :func:`fit_states` checkpoints). ``loop_kw`` go to :func:`train_loop`
    (optimizer, weight_decay, lr_factor, clip_grad_norm, on_epoch_end)."""
    hist = train_loop(model, batches_fn, loss_fn, epochs, lr, progress=label, **loop_kw)
    return {"model": cpu_state(model), "loss": hist}


def fit_method_states(method, fit_one, *data, fit_together=None) -> None:
    """Train ``method.n_states`` members with :func:`fit_states` (checkpointed under
    ``method.checkpoint_dir``, keyed by the hyper-parameters, genes and training ``data``)
    and store ``method.states_`` / ``method.loss_history_``."""
    from .keys import digest

    # what a member learns from: consistency is a post-step, runtime fields change nothing
    params = {k: v for k, v in method.learned_params().items() if k != "consistency"}
    key = digest(params, method.name, method.genes_, *data)
    states = fit_states(fit_one, method.n_states, method.seed, method.checkpoint_dir,
                        key=key, progress=method.progress, fit_together=fit_together)
    method.states_ = [s["model"] for s in states]
    method.loss_history_ = [s["loss"] for s in states]
    infos = [s["info"] for s in states if "info" in s]
    if infos:  # what each member reports about its fit (validation curve, chosen epoch...)
        method.fit_info_ = infos[0] if len(infos) == 1 else {"members": infos}


def fit_members(method, make_member, loss_fn, *data, label: str | bool = False,
                **loop_kw) -> None:
    """Train ``method.n_states`` members (:func:`fit_method_states`), each built by
    ``make_member(seed) -> (model, batches_fn)`` (called with every RNG seeded by that
    member's seed) and trained on ``loss_fn(model, batch)`` for ``method.epochs`` epochs at
    ``method.lr``. With ``method.batch_states`` (default) the members still to train are
    trained together as one batched model (:func:`train_members_batched`): same
    initialisations, same batches, same updates as one after the other, up to float
    rounding, and several times less per-step overhead for small models."""

    def fit_one(seed):
        model, batches = make_member(seed)
        return train_member(model, batches, loss_fn, method.epochs, method.lr, label,
                            **loop_kw)

    def fit_together(seeds):
        members = []
        for s in seeds:
            seed_everything(s)
            members.append(make_member(s))
        return train_members_batched([m for m, _ in members], [b for _, b in members],
                                     loss_fn, method.epochs, method.lr, label, **loop_kw)

    batched = getattr(method, "batch_states", False)
    fit_method_states(method, fit_one, *data, fit_together=fit_together if batched else None)


def train_members_batched(models, batch_fns, loss_fn, epochs: int, lr: float,
                          label: str | bool = False, **loop_kw) -> list[dict]:
    """Train independent ensemble members as one batched model.

    ``models``: S modules of one architecture (each initialised as it would be alone),
    ``batch_fns[i](epoch)``: member i's batches (every member yields as many batches, of
    equal shapes). Their parameters are stacked into (S, ...) tensors and
    ``loss_fn(model, batch)`` runs once per step for all members through
    ``torch.func.vmap`` + ``functional_call`` (matmuls become batched matmuls); the loss
    minimised is the sum of the members' losses, so each member's gradient is its own and
    the element-wise optimisers (Adam, AdamW, SGD) take each member's own step.
    ``clip_grad_norm`` (a norm over all parameters) is not allowed. Returns what
    :func:`train_member` returns, per member."""
    import torch
    from torch.func import functional_call, vmap

    if loop_kw.get("clip_grad_norm") is not None:
        raise InputError("train_members_batched: clip_grad_norm couples the members; "
                         "train them one after the other")
    if loop_kw.get("on_epoch_end") is not None:
        raise InputError("train_members_batched: on_epoch_end is per member; train them "
                         "one after the other")
    S = len(models)
    names = [n for n, _ in models[0].named_parameters()]
    bnames = [n for n, _ in models[0].named_buffers()]

    class _Loss(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return loss_fn(self.model, batch)

    class _Stacked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stacked = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.stack([dict(m.named_parameters())[n].detach()
                                                 for m in models])) for n in names])
            for j, n in enumerate(bnames):
                self.register_buffer(f"b{j}", torch.stack(
                    [dict(m.named_buffers())[n] for m in models]))
            self._wrap = (_Loss(models[0]),)  # a tuple: not a submodule of this one
            self.acc, self.n = None, 0

        def _one(self, params, buffers, batch):
            full = {"model." + n: p for n, p in zip(names, params)}
            full.update({"model." + n: b for n, b in zip(bnames, buffers)})
            return functional_call(self._wrap[0], full, (batch,))

        def forward(self, batch):
            bufs = [getattr(self, f"b{j}") for j in range(len(bnames))]
            losses = vmap(self._one)(list(self.stacked), bufs, batch)
            d = losses.detach()
            self.acc = d if self.acc is None else self.acc + d
            self.n += 1
            return losses.sum()

    net = _Stacked()
    history: list[list[float]] = [[] for _ in range(S)]

    def flush():
        if net.n:
            mean = (net.acc / net.n).cpu().tolist()
            for i in range(S):
                history[i].append(float(mean[i]))
        net.acc, net.n = None, 0

    def batches(epoch):
        flush()
        for parts in zip(*[fn(epoch) for fn in batch_fns]):
            yield tuple(torch.stack(f) for f in zip(*parts))

    train_loop(net, batches, lambda m, b: m(b), epochs, lr, progress=label, **loop_kw)
    flush()
    out = []
    for i in range(S):
        st = {n: p[i].detach().cpu().clone() for n, p in zip(names, net.stacked)}
        st.update({n: getattr(net, f"b{j}")[i].detach().cpu().clone()
                   for j, n in enumerate(bnames)})
        out.append({"model": {k: st[k] for k in models[0].state_dict()}, "loss": history[i]})
    return out


def autocast(device, precision: str = "fp32"):
    """A context that runs the matmuls in ``precision``: ``"fp32"`` (nothing changes) or
    ``"bf16"`` (``torch.autocast`` to bfloat16 on the model's device; parameters, optimiser
    state and losses stay float32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise InputError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def load_members(states, build, device) -> list:
    """Rebuild each ensemble member with ``build()`` and load its state, in eval mode."""
    models = []
    for st in states:
        m = build()
        m.load_state_dict(st)
        models.append(m.to(device).eval())
    return models


# -- data-parallel training under torchrun (PyTorch DDP) ---------------------------------------
def distributed_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when launched by ``torchrun`` with more than one
    process (``WORLD_SIZE`` > 1), else None (single-process training, the default)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed() -> bool:
    """Initialise the default process group once when under torchrun (gloo for CPU
    tensors, nccl for CUDA tensors when a GPU is present; rendezvous from torchrun's
    ``MASTER_ADDR``/``MASTER_PORT``); True when training is distributed."""
    env = distributed_env()
    if env is None:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed: "
                           "run without torchrun or install a build with distributed support")
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(env[2])
            backend = "cpu:gloo,cuda:nccl"  # collectives on CPU and GPU tensors
        dist.init_process_group(backend=backend, rank=env[0], world_size=env[1])
    return True


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs: the one process that writes files."""
    env = distributed_env()
    return env is None or env[0] == 0


def all_agree(flag: bool) -> bool:
    """``flag`` on every rank (logical AND over ranks; the flag itself when not
    distributed). Used where ranks must take the same branch, e.g. reuse a checkpoint."""
    if not init_distributed():
        return bool(flag)
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. computes a cached result), then the other ranks
    (which find it in the cache); a no-op when not distributed."""
    if not init_distributed():
        yield
        return
    import torch.distributed as dist

    if not is_main_process():
        dist.barrier()
    yield
    if is_main_process():
        dist.barrier()


def _ddp_step(model, loss_fn) -> Callable[[Any], Any]:
    """``batch -> loss``: ``loss_fn(model, batch)``, through DistributedDataParallel when
    distributed. The whole loss runs inside DDP's forward (a wrapper module), so loss
    functions may call any submodule or method of ``model`` and DDP still sees every use."""
    if not init_distributed():
        return lambda batch: loss_fn(model, batch)
    import torch
    from torch.nn.parallel import DistributedDataParallel

    class _Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, batch):
            return loss_fn(self.model, batch)

    dev = next(model.parameters()).device
    ddp = DistributedDataParallel(
        _Loss(), device_ids=[dev.index] if dev.type == "cuda" else None,
        find_unused_parameters=True,  # methods may skip branches (e.g. optional inputs)
    )
    return ddp


def _rank_batches(batches: Iterable[Any]) -> Iterable[Any]:
    """This rank's share of ``batches`` (all of them when not distributed)."""
    env = distributed_env()
    if env is None:
        yield from batches
        return
    rank, world, _ = env
    group: list = []
    for b in batches:
        group.append(b)
        if len(group) == world:
            yield group[rank]
            group = []
    if group:  # pad the last short group by repetition: every rank takes as many steps
        yield group[rank % len(group)]


def _mean_over_ranks(total, n: int) -> float:
    if distributed_env() is None or total is None:
        return float(total) / n if n else float("nan")
    import torch.distributed as dist

    t = (total / n).detach().reshape(1).float()
    dist.all_reduce(t)
    return float(t) / distributed_env()[1]
