import numpy as np
import pytest

from histosr.nuclei import count_nuclei, count_nuclei_classical, nuclei_factor


def _disks(n: int, seed: int = 0, size: int = 240, radius: float = 6.0) -> np.ndarray:
    """Pale pink background with ``n`` separated hematoxylin-dark disks (0.5 um/px)."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), (236, 218, 228), np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    centres: list[np.ndarray] = []
    while len(centres) < n:
        c = rng.uniform(2 * radius, size - 2 * radius, 2)
        if all(np.hypot(*(c - d)) > 3 * radius for d in centres):
            centres.append(c)
    for c in centres:
        img[np.hypot(yy - c[0], xx - c[1]) < radius] = (75, 45, 125)
    return np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("n", [0, 7, 18])
def test_classical_counts_dark_disks(n):
    assert count_nuclei_classical(_disks(n, seed=n)) == n


def test_touching_disks_are_split():
    img = np.full((120, 120, 3), (236, 218, 228), np.uint8)
    yy, xx = np.mgrid[0:120, 0:120]
    for cx in (50, 61):  # two nuclei overlapping by ~1 um
        img[np.hypot(yy - 60, xx - cx) < 6.5] = (75, 45, 125)
    assert count_nuclei_classical(img) == 2


def test_count_per_spot_and_factor():
    from histosr.image import ArrayImage
    from histosr.image_only import empty_counts
    from histosr.section import Section

    img = np.concatenate([_disks(5, 1), _disks(12, 2)], axis=1)  # two 120 um fields
    sec = Section("disks", ArrayImage(img), 0.5, empty_counts(["a", "b"], [[120, 120],
                                                                         [360, 120]]), 110.0)
    c = count_nuclei(sec, size_um=110.0)
    assert c.tolist() == [5, 12]
    f = nuclei_factor(c)
    assert f.max() == pytest.approx(2.0) and 1.0 < f.min() < 2.0


def test_cellpose_missing_is_a_clear_error():
    pytest.importorskip("skimage")
    try:
        import cellpose  # noqa: F401
    except ImportError:
        from histosr.nuclei import cellpose_counter

        with pytest.raises(ImportError, match="cellpose<4"):
            cellpose_counter()
    else:  # pragma: no cover - only where cellpose is installed
        pytest.skip("cellpose installed")
