"""Scale-out: Dask tile encoding, cohort runs on Dask, DDP training (issue #6)."""

import numpy as np
import pytest

import histosr.features.tiling as tiling
from histosr.features import compute, register_encoder
from histosr.image import ArrayImage, ZarrImage
from histosr.section import Section, make_counts

distributed = pytest.importorskip("distributed")


def _section(h=640, w=768, seed=0, image=None) -> Section:
    """White glass with a textured pink tissue blob (h x w px at 0.5 um/px)."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(243, 3, (h, w, 3)), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((yy - h / 2) / (0.35 * h)) ** 2 + ((xx - w / 2) / (0.3 * w)) ** 2 < 1
    tex = np.array([215, 150, 195]) + 15 * np.sin(yy / 3.0 + xx / 7.0)[..., None]
    img[blob] = np.clip(tex[blob] + rng.normal(0, 8, (int(blob.sum()), 3)), 0, 255)
    xy = np.array([[w / 2, h / 2], [w / 3, h / 2]])
    counts = make_counts(np.ones((2, 1)), ["a", "b"], ["g"], xy)
    src = image if image is not None else ArrayImage(img.astype(np.uint8))
    return Section("syn", src, 0.5, counts, 55.0, "synthetic")


class _MeanEncoder:
    """A one-stage encoder (plain ``embed_tiles`` with a 1-superpixel halo)."""

    name, dim, patch_um, context_sp = "test-mean", 3, 8.0, 1

    def embed_tiles(self, batch):
        b, t, u, _ = batch.shape
        m = batch.reshape(b, t // 16, 16, u // 16, 16, 3).mean(axis=(2, 4))
        return (m + np.roll(m, 1, axis=1)).astype(np.float32) / 255.0


register_encoder("test-mean")(lambda: _MeanEncoder())


@pytest.fixture(scope="module")
def client():
    # threads in this process: quick to start, and the test encoder registry is shared
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                       dashboard_address=None)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def _arr(fm):
    return np.asarray(fm.features[:])


@pytest.mark.parametrize("encoder", ["handcrafted", "test-mean"])
def test_dask_features_equal_single_process(tmp_path, client, encoder):
    sec = _section()
    one = compute(sec, encoder, out=tmp_path / "one.zarr", tile_sp=8, progress=False)
    dsk = compute(sec, encoder, out=tmp_path / "dask.zarr", tile_sp=8, progress=False,
                  scheduler=client)
    a, b = _arr(one), _arr(dsk)
    assert a.dtype == b.dtype == np.float16 and a.shape == b.shape
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16))  # bit for bit
    assert np.array_equal(one.mask, dsk.mask) and one.meta == dsk.meta
    assert np.abs(a.astype(np.float32)).sum() > 0


def test_dask_features_resume_and_cache(tmp_path, client, monkeypatch):
    img = _section().image.array
    import zarr

    z = zarr.open(str(tmp_path / "img.zarr"), mode="w", shape=img.shape, chunks=(128, 128, 3),
                  dtype="u1")
    z[:] = img
    sec = _section(image=ZarrImage(tmp_path / "img.zarr"))  # travels to workers by path
    ref = compute(sec, out=tmp_path / "ref.zarr", tile_sp=8, progress=False)

    # a single-process run killed after a few tiles, resumed on Dask
    calls = {"n": 0}
    real = tiling.read_calibrated

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "f.zarr"
    monkeypatch.setattr(tiling, "read_calibrated", dying)
    with pytest.raises(KeyboardInterrupt):
        compute(sec, out=out, tile_sp=8, progress=False, n_jobs=1)
    monkeypatch.setattr(tiling, "read_calibrated", real)
    done = {p.name for p in (tmp_path / "f.zarr.partial" / "_done").iterdir()}
    assert done and all(d.startswith("p1_") for d in done)
    fm = compute(sec, out=out, tile_sp=8, progress=False, scheduler=client)
    assert np.array_equal(_arr(fm).view(np.uint16), _arr(ref).view(np.uint16))
    # cached: a second call reuses the result without any task
    monkeypatch.setattr(tiling, "_task_pass1", None)
    again = compute(sec, out=out, tile_sp=8, progress=False, scheduler=client)
    assert again.path == fm.path


def test_dask_features_need_encoder_name(client):
    from histosr.features import get_encoder

    with pytest.raises(ValueError, match="registry name"):
        compute(_section(), get_encoder("handcrafted"), scheduler=client, progress=False)


def _cohort_configs(tmp_path, tag):
    import yaml

    from histosr.io import write_istar
    from histosr.simulate import synthetic_visium

    paths = []
    for seed in (3, 4):
        sec = tmp_path / f"sec{seed}"
        if not sec.exists():
            write_istar(synthetic_visium(seed=seed, size_um=600), sec)
        cfg = {"section": {"reader": "istar", "path": str(sec)},
               "method": {"name": "istar", "params": {"epochs": 5, "n_states": 1}},
               "genes": {"n_top": 10}, "predict": {"n_previews": 0}, "seed": seed,
               "out": str(tmp_path / f"{tag}{seed}")}
        p = tmp_path / f"{tag}{seed}.yaml"
        p.write_text(yaml.safe_dump(cfg))
        paths.append(str(p))
    return paths


@pytest.fixture
def one_torch_thread():
    # torch's CPU results depend on its thread count (run_many passes the caller's to the
    # tasks); one thread also keeps this test fast on a shared, oversubscribed machine
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cohort_on_dask_equals_one_by_one(tmp_path, client, one_torch_thread):
    import anndata as ad

    from histosr.cli import main
    from histosr.pipeline import run_many

    one = _cohort_configs(tmp_path, "one")
    assert main(["--quiet", "run", *one]) == 0  # several configs, one after the other
    reps = run_many(_cohort_configs(tmp_path, "dask"), scheduler=client)
    assert [r.out_dir.name for r in reps] == ["dask3", "dask4"]
    for seed in (3, 4):
        a = ad.read_h5ad(tmp_path / f"one{seed}" / "prediction.h5ad")
        b = ad.read_h5ad(tmp_path / f"dask{seed}" / "prediction.h5ad")
        assert list(a.var_names) == list(b.var_names)
        assert np.array_equal(np.asarray(a.X), np.asarray(b.X))
    with pytest.raises(ValueError, match="same run folder"):
        run_many([one[0], one[0]])
