"""The whole pipeline from a config: read -> features -> fit -> predict -> outputs -> report.

The config schema (every key, its default and its check) is :mod:`histosr.config`; it is
validated as a whole - including the reader's options, the encoder's and the method's
parameters - before any data is read. Each stage caches its result in the run folder keyed
by a digest of its inputs and parameters, so a killed run resumes and a changed parameter
recomputes only what depends on it.

Every registered method runs: super-resolution methods write the 8 um prediction
(``prediction.h5ad``, ``maps.zarr``) and its sums at the measured spots
(``prediction_spots.h5ad``); spot-level methods predict whole spots, so they write
``prediction_spots.h5ad`` only, and the report says so.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from .config import ConfigError, RunConfig, validate
from .config import load as load_config
from .errors import InputError
from .report import RunReport

#: fewer measured spots than this cannot be fitted meaningfully (nor interpolated)
MIN_SPOTS = 3


def read_section(spec: dict):
    """Build a Section from a config mapping ``{reader: NAME, path: P, ...}``."""
    from . import io

    spec = {k: v for k, v in dict(spec).items() if v is not None or k == "path"}
    reader = spec.pop("reader", None)
    path = spec.pop("path", None)
    if path is None:
        raise ConfigError("section.path is required")
    reader = reader or io.detect_platform(path)
    if reader not in io.READERS:
        from .params import suggest

        raise ConfigError(f"unknown reader {reader!r}{suggest(reader, io.READERS)}: expected "
                          f"one of {', '.join(sorted(io.READERS))}")
    from .config import reader_options, required_options
    from .params import check_names

    check_names(f"reader {reader!r}", spec, reader_options(reader) + ["section"], "option")
    missing = [k for k in required_options(reader) if k not in spec
               and not (reader == "her2st" and k == "name")]
    if missing:
        raise ConfigError(f"the {reader!r} reader needs more: " + "; ".join(
            f"pass {k}=..." for k in missing))
    return io.read(path, reader=reader, **spec)


def check_trainable(section) -> None:
    """Stop before any heavy work when a section has nothing to learn from, naming what
    was found and what would make it run."""
    from .arrays import row_sums

    n, g = section.n_spots, section.counts.n_vars
    lib = row_sums(section.counts.X)
    what = f"section {section.name!r} ({section.platform}) has {n} spots x {g} genes"
    if n < MIN_SPOTS:
        raise InputError(f"{what}: at least {MIN_SPOTS} measured spots are needed to fit a "
                         "method; check that the reader found the in-tissue spots")
    if not (lib > 0).any():
        raise InputError(f"{what} and no counts at all (every spot's total is 0): nothing to "
                         "learn from. Check that the matrix holds raw UMI counts of in-tissue "
                         "spots (for Visium HD, a bin folder with data, e.g. square_008um)")


def fit_genes_for(section, gcfg, include=()) -> list[str]:
    """The genes a run fits: ``genes.list`` or the HEST rule's ``n_top``, plus ``include``
    (measured ones; a warning names the others)."""
    from .pp import select_genes

    want = list(dict.fromkeys(list(gcfg.include) + list(include or [])))
    if gcfg.list:
        chosen = select_genes(section, None, 0.0, include=list(gcfg.list) + want)
    else:
        chosen = select_genes(section, gcfg.n_top, gcfg.min_frac, include=want)
    if not chosen:
        from .arrays import dense

        det = (dense(section.counts.X) > 0).mean(axis=0) if section.n_spots else np.zeros(1)
        raise InputError(
            f"no gene of section {section.name!r} is detected in at least "
            f"{gcfg.min_frac:.0%} of its {section.n_spots} spots (the most often detected gene "
            f"is in {float(det.max()):.0%}): lower genes.min_frac (e.g. --set "
            "genes.min_frac=0.01) or name the genes with genes.list")
    return chosen


def run(cfg: dict | RunConfig, out: str | Path | None = None,
        progress: bool = True, section=None) -> RunReport:
    """Run the pipeline for a config (dict or :class:`~histosr.config.RunConfig`); returns
    the written report. ``section``: a :class:`~histosr.section.Section` already built in
    Python (a simulation, a procedural whole slide), used instead of reading the config's
    ``section`` block, which then only needs a ``path`` naming it."""
    from .methods.base import SUPERPIXEL, get_method

    rc = cfg if isinstance(cfg, RunConfig) else validate(cfg)
    out = Path(out or rc.out or "histosr_run")
    out.mkdir(parents=True, exist_ok=True)
    mcfg = rc.method
    rep = RunReport(f"histosr run: {mcfg.name}", out, params=rc.model_dump(mode="json"))
    from .features.cache import cache_dir_for

    cache = Path(rc.cache) if rc.cache else cache_dir_for(out)
    params = dict(mcfg.params)
    params.setdefault("seed", int(rc.seed))
    method = get_method(mcfg.name, **params)
    if method.kind == SUPERPIXEL:
        method.set_params(consistency=bool(mcfg.consistency))
    method.progress = bool(progress)
    with rep.capture_warnings():  # every warning of the run goes into the report too
        if not _stages(rep, rc, method, out, cache, progress, section):
            return rep  # torchrun ranks > 0 only help training; rank 0 writes the outputs
    rep.write()
    return rep


def _stages(rep: RunReport, rc: RunConfig, method, out: Path, cache: Path,
            progress: bool, section=None) -> bool:
    """The run's stages, recorded in ``rep``; False on torchrun ranks > 0 (they write
    nothing)."""
    from . import train
    from .keys import digest
    from .methods.base import SUPERPIXEL, Method, section_record

    mcfg = rc.method
    with rep.stage("read"):
        if section is None:
            section = read_section(rc.section.model_dump())
    rep.notes.append(repr(section))
    check_trainable(section)
    pathways = rc.analysis.pathways()  # gene sets read (and checked) before any heavy work
    sets = list(pathways.gene_sets.genes) if pathways else []
    genes = fit_genes_for(section, rc.genes, include=list(rc.predict.previews or []) + sets)
    train.init_distributed()  # under torchrun: rank 0 writes, all ranks train (DDP)
    fm = None
    if method.kind == SUPERPIXEL:
        with rep.stage("features"), train.main_process_first():  # ranks > 0: from the cache
            fm = _features(section, method, rc, cache, progress)
        # a decoded JPEG (3 bytes per px: 276 MB for her2st C2) is not needed by the
        # stages that read features; a method reading crops decodes it again on demand
        section.image.release()
    key = digest(mcfg.name, method.learned_params(), genes, section_record(section)["key"],
                 None if fm is None else [fm.encoder, fm.meta, int(fm.mask.sum())])
    model_dir = out / "model"
    with rep.stage("fit"):
        stamp = model_dir / "key.txt"
        if train.all_agree(stamp.is_file() and stamp.read_text() == key):
            method = Method.load(model_dir, progress=bool(progress))
            rep.notes.append("fitted model reused from the run cache")
        else:
            if hasattr(method, "checkpoint_dir"):
                method.checkpoint_dir = str(cache / f"ckpt-{key}")
            if hasattr(method, "cache_dir") and method.cache_dir is None:
                method.cache_dir = str(cache)
            method.fit([section], None if fm is None else [fm], genes=genes)
            if train.is_main_process():
                method.save(model_dir)
                (model_dir / "key.txt").write_text(key)
    if not train.is_main_process():
        return False
    rep.outputs["model"] = str(model_dir)
    rep.describe_method(method, encoder=rc.features.encoder if fm is not None and
                        method.needs_features else None, genes=method.genes_)
    rep.describe_section(section, mask=None if fm is None else fm.mask,
                         n_fitted_genes=len(method.genes_))
    if method.kind == SUPERPIXEL:
        _superpixel_outputs(rep, method, section, fm, rc, out)
    else:
        _spot_outputs(rep, method, section, rc, out)
    return True


def _features(section, method, rc: RunConfig, cache: Path, progress: bool):
    """The section's FeatureMap (cached), or only its grid + tissue mask for methods that
    read no image features."""
    from . import features as feat

    if not method.needs_features:
        from .features.featuremap import grid_only
        from .tissue import section_tissue_mask

        return grid_only(section, section_tissue_mask(section))
    fcfg = rc.features
    kw = dict(fcfg.encoder_params())
    if fcfg.scheduler:
        kw["scheduler"] = fcfg.scheduler
    return feat.compute(section, encoder=fcfg.encoder, cache_dir=cache, progress=progress,
                        tile_sp=fcfg.tile_sp, **kw)


def _preview_genes(rc: RunConfig, genes: list[str]) -> list[str]:
    # fitted genes are in HEST rank order: the first ones are the most variable measured
    show = rc.predict.previews or genes[: rc.predict.n_previews]
    return [g for g in show if g in genes]


def _superpixel_outputs(rep, method, section, fm, rc: RunConfig, out: Path) -> None:
    """Spots first (consistency factors, in-sample agreement), then every tissue superpixel
    streamed to ``prediction.h5ad`` and ``maps.zarr`` (:func:`histosr.outputs.
    stream_prediction`): the tissue x genes prediction is never held in memory. Optional
    analyses (cells, pathways, interactions, SpatialData) read the written file."""
    import pandas as pd

    from .metrics import pcc_log_cp10k
    from .outputs import (
        IN_SAMPLE_PCC,
        PRED_MAX,
        PRED_MEAN,
        spatial_images,
        stream_prediction,
        write_h5ad,
    )
    from .pl import previews

    with rep.stage("score"):
        # In-sample agreement with the measured spots, BEFORE the consistency step (which
        # makes footprint sums equal the measurements by construction). Training spots:
        # not held out. Both sides log1p CP10k over the fitted genes, each with its own
        # library: composition, not library size (which the image model would otherwise
        # get credit for).
        post = method.post_steps(section, fm)  # calibrated detail, consistency: fitted once
        spots_pred = method.predict(section, fm, at="spots", post=post)
        raw = method.predict(section, fm, at="spots", consistency=False)
        r = pcc_log_cp10k(raw.X, section.counts[:, method.genes_].X).astype(np.float32)
        del raw
        spots_pred.var[IN_SAMPLE_PCC] = r
    rep.metrics["in_sample_spot_pcc_mean"] = float(np.mean(r))
    rep.metrics["in_sample_spot_pcc_median"] = float(np.median(r))
    rep.notes.append("in-sample metrics compare the image model's footprint sums (before "
                     "consistency) with the spots it was fitted on; use `histosr benchmark` for "
                     "held-out scores")
    show = _preview_genes(rc, method.genes_)
    images = spatial_images(section.image)  # scanpy's uns["spatial"], shared by both files
    with rep.stage("predict"):  # streamed to disk, a band of superpixel rows at a time
        sp = stream_prediction(method, section, fm, out / "prediction.h5ad", out / "maps.zarr",
                               var=pd.DataFrame({IN_SAMPLE_PCC: r}, index=method.genes_),
                               images=images, keep=show, post=post,
                               progress=method.progress)
    rep.outputs["prediction"] = str(sp.h5ad)
    rep.outputs["maps"] = str(sp.maps)
    rep.outputs["n_superpixels"] = int(sp.n_obs)
    rep.outputs["n_genes"] = len(method.genes_)
    with rep.stage("write"):
        rep.outputs["spots"] = str(write_h5ad(spots_pred, out / "prediction_spots.h5ad",
                                              section=section, images=images))
    _self_validation(rep, method, out)
    with rep.stage("previews"):
        spots = section.counts[:, show].copy() if show else None
        rep.images += previews(sp.kept, show, out / "previews", section=section, spots=spots) \
            if show else []
    extra = {"mean per superpixel": dict(zip(sp.var.index, sp.var[PRED_MEAN])),
             "max per superpixel": dict(zip(sp.var.index, sp.var[PRED_MAX]))}
    _describe_results(rep, method, section, sp.var, sp.n_obs, out, show, superpixels=True,
                      extra=extra)
    pathways = rc.analysis.pathways()
    if not (rc.outputs.spatialdata or rc.outputs.cells or rc.analysis.interactions
            or bool(pathways)):
        return
    import anndata

    # the optional analyses read the written prediction (backed: X stays on disk where
    # they read it by columns or rows)
    pred = anndata.read_h5ad(sp.h5ad, backed="r")
    try:
        if rc.outputs.spatialdata:
            from .io import write_spatialdata

            with rep.stage("spatialdata"):
                rep.outputs["spatialdata"] = str(write_spatialdata(out / "spatialdata.zarr",
                                                                   section, pred))
        if rc.outputs.cells:  # cells x genes: segmentation of the H&E + the prediction per cell
            from .singlecell import run_in_pipeline

            run_in_pipeline(rc.outputs.cells, pred, section, out, rep, genes=show,
                            progress=method.progress)
        from . import interactions

        pathways.run(pred, spots_pred, section, out, rep)  # pathway maps, ORA
        interactions.run_in_pipeline(rc.analysis.model_dump(), pred, spots_pred, section, out,
                                     rep)
    finally:
        pred.file.close()


def _self_validation(rep, method, out: Path) -> None:
    """A method's own held-out per-gene estimates (:meth:`Method.reliability`) into the
    report metrics and ``reliability.tsv``."""
    rel = method.reliability()
    if rel is None:
        return
    from .report import _atomic_write

    _atomic_write(out / "reliability.tsv", rel.to_csv(sep="\t", float_format="%.4f"))
    rep.outputs["reliability"] = str(out / "reliability.tsv")
    from .outputs import HELDOUT_PCC, HELDOUT_PCC_INTERP

    rep.metrics["heldout_pcc_mean"] = float(rel[HELDOUT_PCC].mean())
    if HELDOUT_PCC_INTERP in rel:
        better = rel[HELDOUT_PCC] > rel[HELDOUT_PCC_INTERP]
        rep.metrics["heldout_pcc_interpolation_mean"] = float(rel[HELDOUT_PCC_INTERP].mean())
        rep.metrics["genes_better_than_interpolation"] = int(better.sum())
        rep.notes.append(
            f"self-validation (spatially blocked folds of the measured spots): "
            f"{int(better.sum())} of {len(rel)} genes predicted better than interpolating the "
            "spots (heldout_pcc > heldout_pcc_interpolation; genes with image weight 0 equal "
            "it); per gene in reliability.tsv and in var of the predictions")


def _spot_outputs(rep, method, section, rc: RunConfig, out: Path) -> None:
    from .methods.spot import spot_targets
    from .metrics import pcc_per_gene
    from .outputs import IN_SAMPLE_PCC, write_h5ad
    from .pl import previews

    with rep.stage("predict"):
        spots_pred = method.predict(section)
    r = pcc_per_gene(spots_pred.X, spot_targets(section, method.genes_))
    spots_pred.var[IN_SAMPLE_PCC] = np.asarray(r, dtype=np.float32)
    with rep.stage("write"):
        rep.outputs["spots"] = str(write_h5ad(spots_pred, out / "prediction_spots.h5ad",
                                              section=section))
        rep.outputs["n_spots"] = int(spots_pred.n_obs)
        rep.outputs["n_genes"] = int(spots_pred.n_vars)
    rep.metrics["in_sample_spot_pcc_mean"] = float(np.mean(r))
    rep.metrics["in_sample_spot_pcc_median"] = float(np.median(r))
    rep.notes.append(
        f"{method.name} is a spot-level method: it predicts whole spots (log1p CP10k), so this "
        "run wrote prediction_spots.h5ad (the measured spots, in-sample) and no 8 um maps. "
        "For a denser grid use `histosr densify`; for sections that were never sequenced, "
        "`histosr predict --model MODEL --image SLIDE`; for held-out scores `histosr benchmark`.")
    with rep.stage("previews"):
        show = _preview_genes(rc, method.genes_)
        rep.images += previews(spots_pred, show, out / "previews", section=section,
                               spots=section.counts[:, show].copy() if show else None)
    if rc.outputs.cells:
        rep.notes.append("outputs.cells aggregates a super-resolved 8 um map over segmented "
                         "cells: not run for a spot-level method")
    _describe_results(rep, method, section, spots_pred.var, spots_pred.n_obs, out, show,
                      superpixels=False)
    if rc.analysis.interactions:
        rep.notes.append("analysis.interactions compares the measured spots with a "
                         "super-resolved map: not run for a spot-level method")


def _describe_results(rep, method, section, var, n_obs: int, out: Path, shown: list[str],
                      superpixels: bool, extra: dict | None = None) -> None:
    """The report's summary, per-gene table and next steps for a finished prediction
    (``var``, ``n_obs``: the prediction's)."""
    from .report import gene_table, next_steps

    rows, validated = gene_table(var, section, shown, extra=extra)
    rep.genes = rows
    what = (f"{n_obs:,} tissue superpixels of 8 um" if superpixels
            else f"its {n_obs:,} spots (log1p CP10k per spot)")
    cons = ", consistency on" if getattr(method, "consistency", False) else ""
    rep.summary.append(
        f"{method.name} ({method.kind}) predicted {len(method.genes_):,} genes of section "
        f"{section.name!r} ({section.platform}, {section.n_spots:,} spots of "
        f"{section.spot_diameter_um:g} um, {section.um_per_px:.3f} um/px) at {what}{cons}.")
    ins = rep.metrics.get("in_sample_spot_pcc_mean")
    if validated:
        rep.summary.append(validated)
    else:
        rep.gene_note = (
            "Not validated: this run has no held-out per-gene score (var['heldout_pcc'] is "
            "absent), so nothing here says which maps are accurate. The in-sample PCC compares "
            "the prediction with the very spots it was fitted on"
            + (" (before consistency)" if superpixels else "") + ".")
        rep.summary.append(
            "Accuracy: not validated on held-out spots in this run. In-sample agreement with "
            f"the fitted spots (not a measure of accuracy): mean PCC {ins:.2f} over "
            f"{len(rows):,} genes. Held-out scores: `histosr benchmark "
            f"{'p2' if superpixels else 'p1'} --method {method.name}`.")
    gene = shown[0] if shown else (method.genes_[0] if method.genes_ else "GENE")
    files = {"prediction": out / ("prediction.h5ad" if superpixels else
                                  "prediction_spots.h5ad"),
             "model": out / "model", "spatialdata": rep.outputs.get("spatialdata")}
    rep.next_steps = next_steps(files, gene, method.name, superpixels)


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
    the reports in config order. Every config is validated before any run starts.

    Results equal running the configs one by one in this process: torch's CPU results depend
    on its intra-op thread count, so each task runs with ``threads`` torch threads (default:
    this process's count). Lower it (and the number of workers) so that workers x threads
    does not exceed the cores; results then equal one-by-one runs after
    ``torch.set_num_threads(threads)``."""
    cfgs = [load_config(c) if isinstance(c, (str, Path)) else dict(c) for c in cfgs]
    for c in cfgs:
        validate(c)
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


__all__ = ["run", "run_many", "read_section", "load_config", "check_trainable", "ConfigError"]
