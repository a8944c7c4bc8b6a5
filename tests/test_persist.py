"""Model folders: JSON + arrays + tensors, versioned, checksummed, never unpickled."""

import json
import pickle

import numpy as np
import pytest

import histosr as hs
from histosr.methods.persist import ModelFileError, load_folder, save_folder


def test_round_trip_of_nested_state(tmp_path):
    torch = pytest.importorskip("torch")
    state = {"a_": np.arange(6, dtype=np.float32).reshape(2, 3), "genes_": ["x", "y"],
             "stats_": {"t": (np.ones(3), np.zeros(3))}, "states_": [{"w": torch.ones(2, 2)}],
             "alpha_": 0.5, "nan_": float("nan"), "none_": None}
    save_folder(tmp_path / "m", {"method": "x"}, state)
    header, got = load_folder(tmp_path / "m")
    assert header["method"] == "x" and header["format_version"] == 2
    np.testing.assert_array_equal(got["a_"], state["a_"])
    assert isinstance(got["stats_"]["t"], tuple) and got["genes_"] == ["x", "y"]
    assert torch.equal(got["states_"][0]["w"], torch.ones(2, 2)) and np.isnan(got["nan_"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from histosr.simulate import synthetic_visium

    sec = synthetic_visium(seed=0, size_um=600, n_genes=6)
    m = hs.get_method("istar", epochs=2, n_states=1, hidden=8, progress=False,
                      device="cpu", checkpoint_dir=str(tmp_path_factory.mktemp("ck")))
    m.fit(sec, hs.features(sec, progress=False))
    path = tmp_path_factory.mktemp("m") / "model"
    m.save(path)
    return path


def test_folder_is_portable_and_versioned(fitted):
    doc = json.loads((fitted / "model.json").read_text())
    assert doc["histosr_version"] == hs.__version__ and doc["method"] == "istar"
    assert "checkpoint_dir" not in doc["params"] and "device" not in doc["params"]
    assert str(fitted.parent) not in (fitted / "model.json").read_text()
    assert sorted(p.name for p in fitted.iterdir()) == ["arrays.npz", "model.json",
                                                         "weights.pt"]


@pytest.mark.parametrize("damage", ["truncate_weights", "edit_arrays", "drop_arrays",
                                    "bad_json", "bad_param", "newer_format"])
def test_damaged_or_tampered_folders_fail_clearly(fitted, tmp_path, damage):
    import shutil

    m = tmp_path / "m"
    shutil.copytree(fitted, m)
    doc = json.loads((m / "model.json").read_text())
    if damage == "truncate_weights":
        data = (m / "weights.pt").read_bytes()
        (m / "weights.pt").write_bytes(data[: len(data) // 2])
        match = "truncated or modified"
    elif damage == "edit_arrays":
        (m / "arrays.npz").write_bytes((m / "arrays.npz").read_bytes() + b"x")
        match = "truncated or modified"
    elif damage == "drop_arrays":
        (m / "arrays.npz").unlink()
        match = "incomplete: arrays.npz is missing"
    elif damage == "bad_json":
        (m / "model.json").write_text("{not json")
        match = "not valid JSON"
    elif damage == "bad_param":
        doc["params"]["epochs"] = -1
        (m / "model.json").write_text(json.dumps(doc))
        match = "invalid parameters.*'epochs' parameter of istar"
    else:
        doc["format_version"] = 99
        (m / "model.json").write_text(json.dumps(doc))
        match = "newer histosr"
    with pytest.raises(ModelFileError, match=match):
        hs.load_method(m)


def test_a_pickle_is_never_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle executed')",))

    (tmp_path / "state.pkl").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "params.json").write_text('{"method": "istar", "params": {}}')
    with pytest.raises(ModelFileError, match="old pickle format"):
        hs.load_method(tmp_path)


def test_another_version_warns(fitted, tmp_path):
    import shutil

    m = tmp_path / "m"
    shutil.copytree(fitted, m)
    doc = json.loads((m / "model.json").read_text())
    doc["histosr_version"] = "0.1.9"
    (m / "model.json").write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="written by histosr 0.1.9"):
        hs.load_method(m)
