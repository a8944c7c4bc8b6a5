"""Model folders: JSON + arrays + tensors, versioned and checksummed, never a pickle.

A fitted method is saved as a folder::

    model.json    format, versions, method name, parameters, the fitted state as JSON with
                  references to the arrays and tensors below, and their SHA-256
    arrays.npz    NumPy arrays of the state (read with ``allow_pickle=False``)
    weights.pt    PyTorch tensors of the state, e.g. network state dicts (read with
                  ``torch.load(weights_only=True)``)

Loading executes nothing from the folder: a tampered or truncated file fails its checksum
with a message that says so. Runtime settings (cache and checkpoint folders, device,
progress bars) are not part of a model, so a folder is portable between machines.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

FORMAT = "histosr-model"
FORMAT_VERSION = 2  # 1 was a pickle (state.pkl), no longer loaded
_ARRAY, _TENSOR, _TUPLE = "__array__", "__tensor__", "__tuple__"


class ModelFileError(InputError):
    """A model folder that cannot be loaded; the message says why and what to do."""


def _is_tensor(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _encode(obj, key: str, arrays: dict, tensors: dict):
    if _is_tensor(obj):
        tensors[key] = obj.detach().cpu()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind == "O":
            raise TypeError(f"cannot save an object array at {key!r}: store numbers or text")
        arrays[key] = obj
        return {_ARRAY: key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"cannot save a mapping with non-text keys at {key!r}: {bad[:3]}")
        return {k: _encode(v, f"{key}/{k}", arrays, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{key}/{i}", arrays, tensors) for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    raise TypeError(f"cannot save a {type(obj).__name__} at {key!r}: store arrays, tensors, "
                    "numbers, text, lists or mappings")


def _decode(obj, arrays, tensors):
    if isinstance(obj, dict):
        if _ARRAY in obj:
            return arrays[obj[_ARRAY]]
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(v, arrays, tensors) for v in obj[_TUPLE])
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _decode(v, arrays, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, arrays, tensors) for v in obj]
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_folder(path: str | os.PathLike, header: dict, state: dict) -> Path:
    """Write ``header`` (JSON-able) and ``state`` (arrays, tensors, JSON values) to the
    folder ``path``, replacing it atomically."""
    path = Path(path)
    arrays: dict = {}
    tensors: dict = {}
    tree = _encode(state, "state", arrays, tensors)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    if arrays:
        with open(tmp / "arrays.npz", "wb") as f:
            np.savez(f, **arrays)
        files["arrays.npz"] = _sha256(tmp / "arrays.npz")
    if tensors:
        import torch

        torch.save(tensors, tmp / "weights.pt")
        files["weights.pt"] = _sha256(tmp / "weights.pt")
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **header, "state": tree,
           "files": files}
    (tmp / "model.json").write_text(json.dumps(doc, indent=1, sort_keys=False))
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_folder(path: str | os.PathLike) -> tuple[dict, dict]:
    """(header, state) of a folder written by :func:`save_folder`, checked against its
    checksums; :class:`ModelFileError` when it is missing, old, damaged or modified."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFileError(f"model folder not found: {path} (expected the 'model' folder "
                             "that `histosr fit` or `histosr run` wrote)")
    meta = path / "model.json"
    if not meta.is_file():
        if (path / "state.pkl").is_file():
            raise ModelFileError(f"{path} is a model in the old pickle format, which histosr "
                                 "no longer loads (a pickle can run arbitrary code): fit it "
                                 "again with this version")
        raise ModelFileError(f"{path} holds no model.json: expected a model folder written by "
                             "`histosr fit` (model.json, arrays.npz, weights.pt)")
    try:
        doc = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{meta} is not valid JSON ({e}): the model folder is damaged; "
                             "copy it again or re-fit") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelFileError(f"{meta} is not a histosr model file (format "
                             f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(f"{path} was written by a newer histosr (model format "
                             f"{doc.get('format_version')}, this version reads {FORMAT_VERSION}):"
                             " upgrade histosr")
    files = doc.get("files", {})
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise ModelFileError(f"{path} is incomplete: {name} is missing; copy the whole "
                                 "folder again or re-fit")
        if _sha256(f) != digest:
            raise ModelFileError(f"{path}/{name} does not match the checksum recorded in "
                                 "model.json: the file was truncated or modified; copy the "
                                 "folder again or re-fit")
    arrays: dict[str, Any] = {}
    if "arrays.npz" in files:
        with np.load(path / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    tensors: dict[str, Any] = {}
    if "weights.pt" in files:
        import torch

        tensors = torch.load(path / "weights.pt", map_location="cpu", weights_only=True)
    try:
        state = _decode(doc.get("state", {}), arrays, tensors)
    except KeyError as e:
        raise ModelFileError(f"{meta} refers to {e} which the arrays/weights files do not hold: "
                             "the folder is inconsistent; re-fit") from e
    header = {k: v for k, v in doc.items() if k not in ("state", "files")}
    return header, state


__all__ = ["save_folder", "load_folder", "ModelFileError", "FORMAT_VERSION"]
