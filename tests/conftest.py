import os

import numpy as np
import pytest

from histosr.datasets import data_dir as _data_dir


@pytest.fixture(scope="session")
def data_dir():
    """Real data folder; skips when absent, but fails in CI (CI=true)."""
    d = _data_dir()
    if d is None:
        msg = "real data not found: set HISTOSR_DATA or place it at ../shared/data"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    """One feature / crop cache for the whole session (``$HISTOSR_CACHE_DIR``, inherited by
    the CLI subprocesses): a section's features are computed once, whichever tests use it.
    Entries are keyed by their inputs, so sharing cannot mix results up."""
    old = os.environ.get("HISTOSR_CACHE_DIR")
    os.environ["HISTOSR_CACHE_DIR"] = str(tmp_path_factory.mktemp("histosr-cache"))
    yield os.environ["HISTOSR_CACHE_DIR"]
    if old is None:
        os.environ.pop("HISTOSR_CACHE_DIR", None)
    else:
        os.environ["HISTOSR_CACHE_DIR"] = old


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small models train much faster on one thread than on several on a shared CPU; the
    thread count is restored after the module."""
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def held_out_halves():
    """A small synthetic Visium section and its P1 halves: (section, training, held out)."""
    from histosr.benchmark.p1 import split, subset
    from histosr.simulate import synthetic_visium

    sec = synthetic_visium(seed=0, size_um=1000, n_genes=12)
    tr, ho = split(sec.counts.obs_names)
    return sec, subset(sec, tr), subset(sec, ho, "_held")
