"""Synthetic sections shared by the H&E-only tests (built once per test session)."""

from functools import cache


@cache
def synthetic(seed: int, size_um: float = 1000.0):
    """A pseudo-Visium synthetic section whose expression follows its image."""
    from histosr.simulate import synthetic_visium

    return synthetic_visium(seed=seed, size_um=size_um)


def sections(seeds=(0, 1, 2, 3), size_um: float = 1000.0) -> list:
    return [synthetic(s, size_um) for s in seeds]
