"""The whole pipeline from a config: read → features → fit → predict → outputs → report.

Each stage caches its result in the run folder keyed by a hash of its inputs and
parameters, so a killed run resumes and a changed parameter recomputes only what
depends on it. Config example (YAML)::

    section: {reader: her2st, path: ../shared/data/her2st, name: C2}
    features: {encoder: handcrafted}
    method: {name: istar, params: {epochs: 400, n_states: 5}, consistency: true}
    genes: {n_top: 1000}
    predict: {previews: [ERBB2, COL1A1]}
    outputs: {spatialdata: true}   # optional: also write spatialdata.zarr
    analysis: {gene_sets: sets.gmt} # optional: pathway maps + enrichment (histosr.pathways)
    seed: 0
    out: runs/C2
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .report import RunReport


class ConfigError(ValueError):
    """The run config is invalid; the message says what was expected."""


DEFAULTS: dict[str, Any] = {
    "features": {"encoder": "handcrafted"},
    "method": {"name": "istar", "params": {}, "consistency": True},
    "genes": {"n_top": 1000, "min_frac": 0.1},
    "predict": {"previews": None, "n_previews": 4},
    # outputs.spatialdata: also write a SpatialData zarr store (needs histosr[spatialdata])
    "outputs": {"spatialdata": False},
    # analysis.gene_sets: pathway maps + enrichment table (histosr.pathways.PipelineAnalysis)
    "analysis": {},
    "seed": 0,
}


def load_config(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    base = path.parent
    sec = cfg.get("section")
    if isinstance(sec, dict) and "path" in sec and not Path(sec["path"]).is_absolute():
        cand = (base / sec["path"]).resolve()
        sec["path"] = str(cand if cand.exists() else Path(sec["path"]).resolve())
    return cfg


def _merge(cfg: dict) -> dict:
    out = json.loads(json.dumps(DEFAULTS))
    for k, v in cfg.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    known = {"section", "features", "method", "genes", "predict", "seed", "out", "cache",
             "outputs", "analysis"}
    extra = sorted(set(out) - known)
    if extra:
        raise ConfigError(f"unknown config keys {extra}: expected some of {sorted(known)}")
    if "section" not in out or not isinstance(out["section"], dict):
        raise ConfigError("config needs a 'section' mapping, e.g. "
                          "{reader: her2st, path: DIR, name: C2}")
    return out


def read_section(spec: dict):
    """Build a Section from a config mapping ``{reader: NAME, path: P, ...}``."""
    from . import io

    spec = dict(spec)
    reader = spec.pop("reader", None)
    path = spec.pop("path", None)
    if path is None:
        raise ConfigError("section.path is required")
    if reader is None:
        return io.read(path, **spec)
    fn = getattr(io, f"read_{reader}", None)
    if fn is None:
        names = sorted(n[5:] for n in dir(io) if n.startswith("read_"))
        raise ConfigError(f"unknown reader {reader!r}: expected one of {names}")
    return fn(path, **spec)


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def choose_genes(section, n_top: int, min_frac: float = 0.1) -> list[str]:
    from .metrics import select_genes

    return list(select_genes(section.dense_counts(), section.genes, n_top, min_frac=min_frac))


def run(cfg: dict, out: str | Path | None = None, progress: bool = True) -> RunReport:
    """Run the pipeline; returns the written report."""
    from . import features as feat
    from . import train
    from .methods.base import Method, get_method
    from .metrics import log_cp10k, pcc_per_gene
    from .outputs import write_h5ad, write_maps_from_anndata
    from .pl import previews

    cfg = _merge(cfg)
    from .pathways import PipelineAnalysis

    analysis = PipelineAnalysis(cfg["analysis"])  # checks the block, reads the GMT: early
    out = Path(out or cfg.get("out") or "histosr_run")
    out.mkdir(parents=True, exist_ok=True)
    rep = RunReport(f"histosr run: {cfg['method']['name']}", out, params=cfg)
    cache = Path(cfg.get("cache") or out / "cache")

    with rep.stage("read"):
        section = read_section(cfg["section"])
    rep.notes.append(repr(section))
    train.init_distributed()  # under torchrun: rank 0 writes, all ranks train (DDP)
    with rep.stage("features"), train.main_process_first():  # ranks > 0: from the cache
        fm = feat.compute(section, encoder=cfg["features"]["encoder"], cache_dir=cache,
                          progress=progress,
                          **{k: v for k, v in cfg["features"].items() if k != "encoder"})
    gcfg = cfg["genes"]
    genes = gcfg.get("list") or choose_genes(section, int(gcfg["n_top"]),
                                             float(gcfg.get("min_frac", 0.1)))
    # genes asked for in previews are always fitted (when measured)
    show = cfg["predict"].get("previews") or []
    genes = list(genes) + [g for g in show if g in section.counts.var_names and g not in genes]
    genes = analysis.add_genes(genes, section)  # gene-set genes are fitted too (maps)
    mcfg = cfg["method"]
    params = dict(mcfg.get("params") or {})
    params.setdefault("seed", int(cfg["seed"]))
    params["consistency"] = bool(mcfg.get("consistency", True))
    key = _hash(mcfg["name"], params, genes, fm.meta, fm.encoder, repr(section),
                float(section.dense_counts(genes).sum()))
    model_dir = out / "model"
    with rep.stage("fit"):
        stamp = model_dir / "key.txt"
        if train.all_agree(stamp.is_file() and stamp.read_text() == key):
            method = Method.load(model_dir)
            rep.notes.append("fitted model reused from the run cache")
        else:
            method = get_method(mcfg["name"], **params)
            if hasattr(method, "progress"):
                method.progress = progress
            if hasattr(method, "checkpoint_dir"):
                method.checkpoint_dir = str(cache / f"ckpt-{key}")
            method.fit([section], [fm], genes=genes)
            if train.is_main_process():
                method.save(model_dir)
                stamp.write_text(key)
    if not train.is_main_process():
        return rep  # torchrun ranks > 0 only help training; rank 0 writes the outputs
    with rep.stage("predict"):
        pred = method.predict(section, fm, at="superpixels")
        spots_pred = method.predict(section, fm, at="spots")
    with rep.stage("write"):
        rep.outputs["prediction"] = str(write_h5ad(pred, out / "prediction.h5ad"))
        rep.outputs["spots"] = str(write_h5ad(spots_pred, out / "prediction_spots.h5ad"))
        rep.outputs["maps"] = str(write_maps_from_anndata(pred, out / "maps.zarr"))
        if cfg["outputs"].get("spatialdata"):
            from .io import write_spatialdata

            rep.outputs["spatialdata"] = str(write_spatialdata(out / "spatialdata.zarr",
                                                               section, pred))
        rep.outputs["model"] = str(model_dir)
        rep.outputs["n_superpixels"] = int(pred.n_obs)
        rep.outputs["n_genes"] = int(pred.n_vars)
    # In-sample agreement with the measured spots, BEFORE the consistency step (which makes
    # footprint sums equal the measurements by construction). Training spots: not held out.
    raw = method.predict(section, fm, at="spots", consistency=False)
    # both sides log1p CP10k over the fitted genes, each with its own library: composition,
    # not library size (which the image model would otherwise get credit for)
    truth = log_cp10k(section.dense_counts(method.genes_))
    est = log_cp10k(np.asarray(raw.X, dtype=np.float64))
    r = pcc_per_gene(est, truth)
    rep.metrics["in_sample_spot_pcc_mean"] = float(np.mean(r))
    rep.metrics["in_sample_spot_pcc_median"] = float(np.median(r))
    rep.notes.append("in-sample metrics compare the image model's footprint sums (before "
                     "consistency) with the spots it was fitted on; use `histosr benchmark` for "
                     "held-out scores")
    with rep.stage("previews"):
        show = cfg["predict"].get("previews") or _top_var(pred, int(cfg["predict"]["n_previews"]))
        show = [g for g in show if g in pred.var_names]
        spots = section.counts[:, show].copy() if show else None
        rep.images += previews(pred, show, out / "previews", section=section, spots=spots)
    analysis.run(pred, spots_pred, section, out, rep)  # pathway maps, enrichment (if asked)
    rep.write()
    return rep


def _top_var(adata, n: int) -> list[str]:
    X = np.log1p(np.asarray(adata.X, dtype=np.float64))
    return [adata.var_names[i] for i in np.argsort(-X.var(axis=0))[:n]]


# -- cohorts: one pipeline run per section, on Dask -------------------------------------------
_RUN_LOCK = threading.Lock()


def _run_task(cfg: dict, progress: bool, threads: int | None) -> RunReport:
    from .cluster import torch_threads

    # One run at a time per worker process, whatever its thread count: torch's RNG and
    # thread pool are process-wide, so concurrent runs in one process would not be
    # reproducible. Parallelism comes from worker processes.
    with _RUN_LOCK, torch_threads(threads):
        return run(cfg, progress=progress)


def run_many(cfgs: list, scheduler=None, progress: bool = False,
             threads: int | None = None) -> list[RunReport]:
    """Run the pipeline for each config (a dict or a YAML path), each in its own run folder
    (the configs' ``out`` must differ); with ``scheduler`` (``"local"``, a Dask address or a
    ``distributed.Client``, see :mod:`histosr.cluster`) each run is one Dask task. Returns
    the reports in config order.

    Results equal running the configs one by one in this process: torch's CPU results depend
    on its intra-op thread count, so each task runs with ``threads`` torch threads (default:
    this process's count). Lower it (and the number of workers) so that workers x threads
    does not exceed the cores; results then equal one-by-one runs after
    ``torch.set_num_threads(threads)``."""
    cfgs = [load_config(c) if isinstance(c, (str, Path)) else dict(c) for c in cfgs]
    outs = [str(Path(c.get("out") or "histosr_run").resolve()) for c in cfgs]
    dup = sorted({o for o in outs if outs.count(o) > 1})
    if dup:
        raise ConfigError(f"several configs write to the same run folder {dup}: give each "
                          "config its own 'out'")
    if scheduler is None:
        return [run(c, progress=progress) for c in cfgs]
    from .cluster import caller_torch_threads, dask_client

    threads = threads or caller_torch_threads()
    with dask_client(scheduler) as client:
        futs = [client.submit(_run_task, c, progress, threads, pure=False) for c in cfgs]
        return client.gather(futs)
