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


@pytest.fixture
def rng():
    return np.random.default_rng(0)
