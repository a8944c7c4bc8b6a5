"""Dask distributed for the data-parallel stages (tile encoding, per-section runs).

``scheduler`` everywhere in histosr is one of:

* ``None``: no Dask, run in this process;
* ``"local"``: a :class:`distributed.LocalCluster` started for the call and closed after it
  (worker processes, one thread each; ``$HISTOSR_DASK_WORKERS`` sets how many, default
  ``min(4, CPU cores)``);
* an address such as ``"tcp://10.0.0.5:8786"``: an existing cluster (e.g. SLURM workers
  started by dask-jobqueue or ``dask worker ADDRESS``); workers need histosr installed and
  the same view of the file system (image files, output folders);
* a :class:`distributed.Client` or a cluster object: used as is, left open.

Work is sent as (function, plain arguments): encoders travel by registry name and
parameters, images by path, never as live torch models.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .errors import InputError


def _require_distributed():
    try:
        import distributed
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "scheduler= needs Dask distributed: pip install 'histosr[dask]'"
        ) from e
    return distributed


def local_workers() -> int:
    """Worker processes of ``scheduler="local"``."""
    env = os.environ.get("HISTOSR_DASK_WORKERS")
    if env:
        n = int(env)
        if n < 1:
            raise InputError(f"$HISTOSR_DASK_WORKERS must be >= 1, got {env!r}")
        return n
    return max(1, min(4, os.cpu_count() or 1))


@contextlib.contextmanager
def dask_client(scheduler) -> Iterator:
    """A :class:`distributed.Client` for ``scheduler`` (see the module docstring); a
    cluster started here is closed on exit."""
    distributed = _require_distributed()
    if isinstance(scheduler, distributed.Client):
        yield scheduler
        return
    if hasattr(scheduler, "scheduler_address"):  # a cluster object (LocalCluster, SLURM...)
        client = distributed.Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    if not isinstance(scheduler, str) or not scheduler:
        raise InputError(
            f"scheduler must be 'local', a scheduler address ('tcp://HOST:8786'), a "
            f"distributed.Client or None, got {scheduler!r}"
        )
    if scheduler == "local":
        cluster = distributed.LocalCluster(
            n_workers=local_workers(), threads_per_worker=1, processes=True,
            dashboard_address=None,
        )
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    client = distributed.Client(scheduler)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with PyTorch's CPU intra-op thread count set to ``n`` (restored after; nothing
    when ``n`` is None). CPU results of torch depend on this count (reduction order), so a
    Dask task uses the submitting process's count to reproduce its results bit for bit."""
    if not n:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def caller_torch_threads() -> int | None:
    """This process's PyTorch intra-op thread count, or None when torch is not installed."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return int(torch.get_num_threads())
