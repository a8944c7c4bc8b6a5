"""The ``histosr`` command line.

Error contract: a mistake in the input (data, files, options, config, model folder) prints
one line ``histosr: error: ...`` naming command-line flags, and exits with status 2; any
other exception is a bug in histosr, printed as such with how to get the traceback
(``HISTOSR_DEBUG=1``), status 1. Warnings print as one line, ``--quiet`` silences progress.
Method hyper-parameters and config keys are set one way on every verb: ``--set KEY=VALUE``
(``--params JSON`` is kept as an alias).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path

from .errors import InputError

#: the flags that say on the command line what a reader / encoder keyword says in Python
CLI_WORDS = {"section": "--name", "sample_id": "--name", "name": "--name",
             "um_per_px": "--um-per-px", "image": "--image", "bin_size": "--bin-size",
             "platform": "--reader", "weights": "--weights", "hub": "--hub",
             "format": "--format", "genes": "--genes"}


def cli_words(msg: str) -> str:
    """A message phrased for the command line: ``pass um_per_px=`` -> ``pass
    --um-per-px``; a reader option without its own flag -> ``--reader-option KEY=VALUE``."""
    def flag(m):
        word, key, value = m.group(1), m.group(2), m.group(3) or ""
        if key == "hub" and value.startswith("True"):
            return f"{word} --hub"
        if key in CLI_WORDS:
            return f"{word} {CLI_WORDS[key]} {value}".rstrip()
        return f"{word} --reader-option {key}={value}".rstrip()

    return re.sub(r"\b([Pp]ass) ([a-z_]+)=(\S*)", flag, msg)


# -- sections ------------------------------------------------------------------------------
def _section_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("section", nargs=None if required else "?",
                   help="data folder or file (Space Ranger outs, Visium HD bin folder, Xenium, "
                   "ST, iStar, HEST, SpatialData, h5ad, or a her2st root with --name)")
    p.add_argument("--reader", help="reader name (her2st, st, visium, visium_hd, xenium, istar, "
                   "hest, h5ad, spatialdata, simulated); default: detect from the layout")
    p.add_argument("--name", help="section inside a multi-section folder (her2st: C2; HEST: the "
                   "sample id)")
    p.add_argument("--image", help="full-resolution image (overrides the one in the folder)")
    p.add_argument("--um-per-px", type=float, help="microns per full-resolution pixel")
    p.add_argument("--bin-size", help="Visium HD bin size: 2, 8 or 16 (um)")
    p.add_argument("--reader-option", action="append", metavar="KEY=VALUE", default=[],
                   help="any other reader option, repeatable (e.g. counts_file=raw.h5)")


def _section_spec(args, name: str | None = None) -> dict:
    from .config import parse_assignments
    from .io import detect_platform

    if args.section is None:
        raise InputError("expected a data folder or file (the SECTION argument); `predict` "
                         "also accepts --image SLIDE --um-per-px X alone (H&E-only models)")
    spec: dict = {"path": args.section, **parse_assignments(args.reader_option)}
    reader = args.reader or detect_platform(args.section)
    spec["reader"] = reader
    name = name if name is not None else args.name
    if name:
        spec["sample_id" if reader == "hest" else "name"] = name
    for key, val in (("image", args.image), ("um_per_px", args.um_per_px),
                     ("bin_size", args.bin_size)):
        if val is not None:
            spec[key] = val
    return spec


def _read(args, name: str | None = None):
    from .pipeline import read_section

    return read_section(_section_spec(args, name))


def _read_all(args) -> list:
    """Every section named: ``--name C2,C3,C4`` in a multi-section folder and/or
    ``--add-section PATH`` (repeatable)."""
    from .pipeline import read_section

    names = args.name.split(",") if args.name else [None]
    sections = [_read(args, n) for n in names]
    for path in getattr(args, "add_section", None) or []:
        spec = {"path": path, **({"reader": args.reader} if args.reader else {})}
        sections.append(read_section(spec))
    return sections


def _method_params(args) -> dict:
    """Hyper-parameters from ``--params JSON`` (alias) and ``--set KEY=VALUE``."""
    from .config import parse_assignments

    params = {}
    if getattr(args, "params", None):
        try:
            params = json.loads(args.params)
        except ValueError as e:
            raise InputError(f"--params expects a JSON mapping, e.g. '{{\"epochs\": 100}}': {e}"
                             ) from None
        if not isinstance(params, dict):
            raise InputError("--params expects a JSON mapping, e.g. '{\"epochs\": 100}'")
    params.update(parse_assignments(getattr(args, "set", None)))
    return params


def _encoder_params(args) -> dict:
    from .config import parse_assignments

    kw = parse_assignments(getattr(args, "encoder_option", None))
    if getattr(args, "weights", None):
        kw["weights"] = args.weights
    if getattr(args, "hub", False):
        kw["hub"] = True
    return kw


def _features_for(args, section, out: Path):
    """The FeatureMap of a section: ``--features F.zarr`` or computed (cached in out)."""
    from . import features
    from .features import FeatureMap

    if getattr(args, "features", None):
        return FeatureMap.load(args.features)
    from .features.cache import cache_dir_for

    return features.compute(section, encoder=args.encoder, cache_dir=cache_dir_for(out),
                            progress=not args.quiet, **_encoder_params(args))


def _genes_arg(args) -> list[str]:
    return [g for g in (getattr(args, "genes", None) or "").split(",") if g]


def _fit_stain(args):
    """The stain target of ``fit --stain-norm/--stain-ref`` (a recorded target, see
    :attr:`histosr.stain.StainNormalizer.record`), or None (no normalisation, the default)."""
    from .stain import check_stain, record_target

    method = _stain_method(args)
    check_stain(method, args.stain_ref)
    return None if method == "none" else record_target(method, args.stain_ref or "builtin")


def _stain_method(args, recorded: dict | None = None) -> str:
    """``--stain-norm``, else the model's recorded method, else macenko when only
    ``--stain-ref`` is given, else "none" (a reference without a method is an error)."""
    method = args.stain_norm or (recorded["method"] if recorded else
                                 "macenko" if args.stain_ref else "none")
    if method == "none" and args.stain_ref:
        raise InputError("--stain-ref needs a stain normalisation: give --stain-norm "
                         "macenko or reinhard (or drop --stain-ref)")
    return method


def _predict_stain(args, model):
    """``(method, ref)`` of ``predict``: ``--stain-norm``/``--stain-ref`` when given, else the
    stain target recorded in the model folder at fit time (``model.stain_norm_``), else
    none. Checked before any pixel is read."""
    from .stain import check_stain

    check_stain(args.stain_norm, args.stain_ref)
    recorded = getattr(model, "stain_norm_", None)
    method = _stain_method(args, recorded)
    if method == "none":
        return "none", None
    if args.stain_ref:
        return method, args.stain_ref
    if recorded and recorded["method"] == method:
        return method, recorded  # the very target the model was fitted on
    return method, "builtin"


# -- verbs -------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .config import apply_overrides, load, parse_assignments, validate
    from .pipeline import run, run_many
    from .train import is_main_process

    sets = parse_assignments(args.set)
    cfgs = [apply_overrides(load(c), sets) for c in args.config]
    if args.out:
        if len(cfgs) > 1:
            raise InputError("--out names one run folder: with several configs, set 'out' "
                             "in each config")
        cfgs[0]["out"] = args.out
    for c in cfgs:  # every config is checked before anything runs
        validate(c)
    if len(cfgs) == 1 and not args.scheduler:
        rep = run(cfgs[0], progress=not args.quiet)
        if is_main_process():  # under torchrun only rank 0 writes the report
            print(f"report: {rep.out_dir / 'report.html'}")
        return 0
    for rep in run_many(cfgs, scheduler=args.scheduler, progress=False):
        print(f"report: {rep.out_dir / 'report.html'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    path = demo(out=args.out, seed=args.seed, progress=not args.quiet)
    print(f"report: {path}")
    return 0


def cmd_features(args) -> int:
    from . import features
    from .features.registry import check_encoder

    kw = check_encoder(args.encoder, **_encoder_params(args))  # before reading anything
    section = _read(args)
    fm = features.compute(section, encoder=args.encoder, out=args.out, progress=not args.quiet,
                          **({"scheduler": args.scheduler} if args.scheduler else {}), **kw)
    print(json.dumps({"features": fm.path, "shape": list(fm.features.shape),
                      "tissue_superpixels": int(fm.mask.sum()), "encoder": fm.encoder}))
    return 0


def cmd_fit(args) -> int:
    from .methods.base import SPOT, get_method
    from .pp import select_genes

    params = {"seed": args.seed, **_method_params(args)}
    method = get_method(args.method, **params)  # a bad name or value fails here, first
    if method.kind == SPOT:
        if "encoder" not in params:
            method.set_params(encoder=args.encoder)
        if method.cache_dir is None:
            from .features.cache import cache_dir_for

            method.cache_dir = str(cache_dir_for(args.out).resolve())
    else:
        method.set_params(consistency=args.consistency)
        from .features.registry import check_encoder

        check_encoder(args.encoder, **_encoder_params(args))
    method.progress = not args.quiet
    stain = _fit_stain(args)  # a bad method or reference fails before any section is read
    sections = _read_all(args)
    if stain is not None:  # every training section mapped to one target, kept in the model
        from .stain import normalize_section

        sections = [normalize_section(s, stain["method"], stain, args.seed) for s in sections]
    method.stain_norm_ = stain
    from .pipeline import check_trainable

    for s in sections:
        check_trainable(s)
    genes = select_genes(sections, args.n_genes, include=_genes_arg(args))
    if not genes:
        raise InputError("no gene is detected in at least 10% of the spots: name genes with "
                         "--genes or check the counts")
    features = None
    if method.kind != SPOT:
        features = [_features_for(args, s, Path(args.out)) for s in sections]
    method.fit(sections, features, genes=genes)
    path = method.save(Path(args.out) / "model")
    print(f"model: {path} ({method.name} on {', '.join(s.name for s in sections)}, "
          f"{len(method.genes_)} genes)")
    return 0


def _warn_unfitted(method, wanted: list[str]) -> list[str]:
    have = [g for g in wanted if g in method.genes_]
    missing = [g for g in wanted if g not in method.genes_]
    if missing:
        warnings.warn(f"the model was not fitted on {', '.join(missing)}: no preview for them "
                      f"(fit with --genes {','.join(missing)} to include them)", stacklevel=2)
    return have


def _predict_image(args, method, stain: tuple) -> int:
    """H&E-only prediction: a section built from ``--image`` alone (tissue mask, then a hex
    spot lattice or the 8 um superpixels), predicted by a saved image-only model. At
    superpixels a blockwise model streams to disk (:func:`histosr.outputs.
    stream_spot_prediction`); any other prediction is held in memory, after a size check.
    ``stain``: ``(method, ref)`` from :func:`_predict_stain`."""
    from .image import open_image
    from .image_only import section_from_image
    from .methods.base import check_prediction_size
    from .outputs import stream_spot_prediction, write_h5ad
    from .pl import previews
    from .slide import slide_um_per_px

    image = open_image(args.image)  # whole slides (.svs, .ndpi, OME-TIFF...) read lazily
    um_per_px = slide_um_per_px(image, args.um_per_px)
    if not method.tags()["image_only"] or method.kind != "spot":
        raise InputError(f"model {method.name!r} needs measured spots (or superpixel "
                         "features) of the section it predicts; prediction from an image "
                         "file alone needs a spot-level image-only model "
                         "(ridge, knn_features, hespotex): fit one with "
                         "`histosr fit --method ridge ...`")
    grid = args.grid or "spots"
    diameter = args.spot_diameter_um or getattr(method, "train_diameter_um_", None) or 55.0
    section = section_from_image(image, um_per_px, grid=grid,
                                 spot_diameter_um=diameter, pitch_um=args.pitch_um or 100.0,
                                 name=Path(args.image).stem)
    info = {"image": str(args.image), "um_per_px": float(um_per_px), "grid": grid,
            "spot_diameter_um": float(diameter)}
    if grid == "superpixels":  # drawn as an 8 um map by pl.gene_map
        info["grid_shape"] = list(section.meta["grid_shape"])
    else:
        info["pitch_um"] = float(args.pitch_um or 100.0)
    stream = grid == "superpixels" and method.blockwise
    if not stream:  # before any crop is read: would it fit?
        fewer = "a model fitted on fewer genes (fit --n-genes N)"
        check_prediction_size(
            section.counts.n_obs, len(method.genes_), method.predict_copies, grid,
            f"{method.name} predicts all its points at once, in memory; use --grid spots "
            f"(a hex spot lattice, --pitch-um P) or {fewer} (ridge, knn_features and mean "
            "stream --grid superpixels to disk)" if grid == "superpixels" else
            f"use a larger --pitch-um or {fewer}")
    from .stain import normalize_section

    # the tissue mask is found on the raw pixels; every crop the model reads is normalised
    section = normalize_section(section, *stain, seed=0)
    out = Path(args.out)
    show = _warn_unfitted(method, _genes_arg(args))
    if stream:  # written block by block: the superpixels x genes never sit in memory
        sp = stream_spot_prediction(method, section, out / "prediction.h5ad", info,
                                    keep=show, progress=not args.quiet)
        p, pred, n_obs, n_vars = sp.h5ad, sp.kept, sp.n_obs, len(sp.var)
    else:
        pred = method.predict(section)
        pred.uns["histosr"] = {**pred.uns["histosr"], **info}
        if grid == "superpixels":
            pred.obs["row"] = section.counts.obs["row"].to_numpy()
            pred.obs["col"] = section.counts.obs["col"].to_numpy()
        p = write_h5ad(pred, out / "prediction.h5ad", section=section)  # + uns["spatial"]
        n_obs, n_vars = pred.n_obs, pred.n_vars
    if show:
        previews(pred, show, out / "previews", section=section)
    print(f"prediction: {p} ({n_obs} {grid}, {n_vars} genes)")
    return 0


def cmd_predict(args) -> int:
    from .methods.base import SUPERPIXEL, load_method
    from .outputs import stream_prediction, write_h5ad
    from .pl import previews

    if args.section is None:
        from .slide import is_slide

        if not args.image:
            raise InputError("predict needs a SECTION (data folder), or --image SLIDE (with "
                             "--um-per-px X unless the slide's metadata has it) for an H&E-only "
                             "prediction")
        if args.um_per_px is None and not is_slide(args.image):
            raise InputError(f"--image {args.image} needs --um-per-px X (microns per pixel); "
                             "only whole-slide files (.svs, .ndpi, .mrxs, OME-TIFF) carry it in "
                             "their metadata")
    method = load_method(args.model, progress=not args.quiet)  # a bad folder fails first
    stain = _predict_stain(args, method)  # a bad --stain-norm/--stain-ref fails here
    if args.section is None:
        return _predict_image(args, method, stain)
    from .stain import normalize_section

    section = normalize_section(_read(args), *stain, seed=0)
    at = args.at or method.target
    fm = _features_for(args, section, Path(args.out)) if method.kind == SUPERPIXEL else None
    if method.fitted_on(section):
        warnings.warn(f"section {section.name!r} is one the model was fitted on: this prediction "
                      "is in-sample (use `histosr benchmark` for held-out scores)", stacklevel=2)
    out = Path(args.out)
    show = _warn_unfitted(method, _genes_arg(args))
    if at == "superpixels":  # streamed to disk: the tissue x genes never sits in memory
        sp = stream_prediction(method, section, fm, out / "prediction.h5ad", out / "maps.zarr",
                               keep=show, progress=not args.quiet)
        p, pred = sp.h5ad, sp.kept
    else:
        pred = method.predict(section, fm, at=at)
        p = write_h5ad(pred, out / "prediction.h5ad", section=section)  # + uns["spatial"]
    if show:
        spots = section.counts[:, [g for g in show if g in section.counts.var_names]].copy()
        previews(pred, show, out / "previews", section=section, spots=spots)
    print(f"prediction: {p}")
    return 0


def evaluate_prediction(pred, section) -> dict:
    """Per-gene PCC of a spot-level prediction against the section's measured spots, on the
    BENCHMARKS scale: log1p CP10k with each spot's measured library (all genes). A
    log1p CP10k prediction (spot methods) is compared as it is; a counts prediction
    (footprint sums of a super-resolution method) is first scaled by the measured library."""
    import numpy as np

    from .arrays import columns, row_sums
    from .metrics import log_cp10k, pcc_per_gene

    info = dict(pred.uns.get("histosr", {}))
    if "row" in pred.obs and "col" in pred.obs:
        raise InputError("evaluate scores spot-level predictions: predict with --at spots (or "
                         "take prediction_spots.h5ad of a run), not the 8 um superpixels")
    ids = [s for s in pred.obs_names if s in section.counts.obs_names]
    if not ids:
        raise InputError("the prediction's observations share no spot id with the section: "
                         "predict this section with --at spots first")
    genes = [g for g in pred.var_names if g in section.counts.var_names]
    if not genes:
        raise InputError("the prediction shares no gene with the section")
    rows = section.counts.obs_names.get_indexer(ids)
    lib = row_sums(section.counts.X)[rows]
    truth = log_cp10k(columns(section.counts[rows], genes), lib)
    est = columns(pred[ids], genes)
    scale = str(info.get("scale", ""))
    if not scale.startswith("log1p"):
        est = log_cp10k(est, lib)
    r = pcc_per_gene(est, truth)
    res = {"n_spots": len(ids), "n_genes": len(genes), "prediction_scale": scale or "counts",
           "pcc_mean": float(np.mean(r)), "pcc_median": float(np.median(r)),
           "in_sample": bool(info.get("in_sample", False))}
    if res["in_sample"]:
        res["note"] = ("in-sample: these spots were used to fit the model"
                       + (", and consistency forces its footprint sums to equal the measured "
                          "counts, so this score says nothing about accuracy"
                          if info.get("consistency") else "")
                       + "; use `histosr benchmark` for held-out scores")
    return res


def cmd_evaluate(args) -> int:
    import anndata as ad

    p = Path(args.prediction)
    if not p.is_file():
        raise InputError(f"prediction file not found: {p}")
    res = evaluate_prediction(ad.read_h5ad(p), _read(args))
    if res.get("note"):
        warnings.warn(res["note"], stacklevel=2)
    print(json.dumps(res))
    return 0


def cmd_enrich(args) -> int:
    """Pathway scores and over-representation of domain markers / spatially variable genes
    of a finished run (histosr.pathways.enrich_run); the run folder is only read."""
    from .pathways import enrich_run

    res = enrich_run(args.run_dir, args.gene_sets, out=args.out, prediction=args.prediction,
                     method=args.method, n_domains=args.n_domains, n_markers=args.n_markers,
                     n_svg=args.n_svg, min_size=args.min_size)
    for _, row in res["summary"].iterrows():
        padj = "" if row["enriched_for"] == "none" else f" (padj {row['padj']:.2g}: {row['genes']})"
        print(f"{row['query']}: {row['enriched_for']}{padj}")
    print(f"enrichment: {res['out'] / 'enrichment.tsv'}  dot plot: {res['dotplot']}")
    return 0


def cmd_benchmark(args) -> int:
    from . import benchmark

    method = args.method
    params = _method_params(args)
    if params:  # hyper-parameters (ablations): a configured instance is the template
        from .methods import get_method

        method = get_method(args.method, seed=args.seed, **params)
    extra = {"scheduler": args.scheduler} if args.scheduler else {}
    if args.downsample_depth is not None:
        extra["downsample_depth"] = args.downsample_depth
    if args.stain_norm is not None or args.stain_ref is not None:
        if args.protocol != "p3":
            raise InputError("--stain-norm/--stain-ref apply to p3 (a model applied to "
                             "sections it was not fitted on)")
        extra["stain_norm"] = args.stain_norm or "macenko"  # --stain-ref alone: macenko
        extra["stain_ref"] = args.stain_ref or "builtin"
    if args.protocol == "cells":
        from .config import parse_assignments

        extra.update(segmenter=args.segmenter,
                     segmenter_params=parse_assignments(args.segmenter_option))
    elif args.segmenter != "classical" or args.segmenter_option:
        raise InputError("--segmenter and --segmenter-option apply to the cells protocol only")
    res = benchmark.run(
        args.protocol, method=method, encoder=args.encoder, data=args.data,
        sections=args.sections.split(",") if args.sections else None, epochs=args.epochs,
        n_states=args.n_states, seed=args.seed, out=args.out,
        consistency=args.consistency, progress=not args.quiet, **extra,
    )
    print(json.dumps({"protocol": res["protocol"], "method": res["method"], "mean": res["mean"]}))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def cmd_cells(args) -> int:
    from .config import parse_assignments
    from .singlecell import cells_for_run

    res = cells_for_run(args.run_dir, out=args.out, segmenter=args.segmenter,
                        params=parse_assignments(args.segmenter_option),
                        expand_um=args.expand_um, scale_to_spots=args.scale_to_spots,
                        genes=_genes_arg(args) or None, n_jobs=args.jobs,
                        progress=not args.quiet)
    keep = ("n_cells", "n_genes", "segmentation_seconds", "seconds", "peak_rss_mb",
            "median_cell_area_um2", "nuclei_per_spot_vs_classical_r", "cells", "previews")
    print(json.dumps({k: res[k] for k in keep if k in res}))
    print(f"report: {res['report']}")
    return 0


def _segmenter_args(p) -> None:
    from .segment import SEGMENTERS

    p.add_argument("--segmenter", default="classical", choices=SEGMENTERS,
                   help="nuclei: classical (no weights), or cellpose / stardist / instanseg "
                   "with their weights on disk (never downloaded)")
    p.add_argument("--segmenter-option", action="append", metavar="KEY=VALUE", default=[],
                   help="segmenter parameter, repeatable (e.g. model=/path/instanseg.pt, "
                   "max_area_um2=250)")


def cmd_densify(args) -> int:
    from .densify import densify_section, write_densified
    from .methods import get_method

    method = get_method(args.method, seed=args.seed, **_method_params(args))
    method.progress = not args.quiet
    section = _read(args)
    genes = _genes_arg(args)
    dense, _ = densify_section(section, method, args.factor, genes=genes, n_genes=args.n_genes)
    paths = write_densified(dense, section, args.out, genes)
    print(json.dumps({"n_measured": int(dense.obs["measured"].sum()),
                      "n_generated": int((~dense.obs["measured"]).sum()),
                      **{k: str(v) for k, v in paths.items()}}))
    return 0


def cmd_simulate(args) -> int:
    from .simulate import simulate_from, synthetic_visium, write_simulated

    if args.source:
        kw = {k: v for k, v in (("image", args.image), ("um_per_px", args.um_per_px)) if v}
        s = simulate_from(args.source, format=args.format, n_genes=args.n_genes or None,
                          assign=args.assign, **kw)
        what = f"pseudo-Visium section simulated from {args.source}"
    else:
        s = synthetic_visium(seed=args.seed)
        what = "synthetic section"
    write_simulated(s, args.out)
    print(f"{what} written (iStar layout + truth.zarr): {args.out} ({s.n_spots} spots, "
          f"{len(s.truth['genes'])} genes, {int(s.truth['mask'].sum())} tissue superpixels); "
          f"score it with: histosr benchmark p4 --method NAME --data {args.out} --out DIR")
    return 0


def cmd_interactions(args) -> int:
    from .interactions import run_on_folder

    opts = {k: v for k, v in (("resource", args.resource), ("bandwidth_um", args.bandwidth_um),
                              ("n_perms", args.n_perms), ("n_top", args.n_top),
                              ("seed", args.seed), ("max_obs", args.max_obs))
            if v is not None}
    rep = run_on_folder(args.run_dir, out=args.out, **opts)
    print(f"report: {rep.out_dir / 'report.html'}")
    return 0


def cmd_report(args) -> int:
    from .report import report_for_results

    paths = [Path(r) for r in args.results]
    for p in paths:
        if not (p / "results.json" if p.is_dir() else p).is_file():
            raise InputError(f"no results.json at {p}: pass the --out folder of a `histosr "
                             "benchmark` run or its results.json")
    print(f"report: {report_for_results(paths, args.out, title=args.title)}")
    return 0


def cmd_doctor(args) -> int:
    import platform

    import torch

    from . import __version__
    from .features import available_encoders
    from .methods.base import available_methods, method_class

    info = {
        "histosr": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(), "encoders": available_encoders(),
        "methods": [f"{m} ({method_class(m).kind})" for m in available_methods()],
    }
    if torch.cuda.is_available():
        info["cuda_bf16"] = torch.cuda.is_bf16_supported()
    info["encoder_device"] = "cuda (bf16/fp16 autocast)" if torch.cuda.is_available() \
        else "cpu (fp32)"
    from importlib.metadata import PackageNotFoundError, version

    for pkg, dist in (("timm", "timm"), ("open_clip", "open_clip_torch"),
                      ("torchvision", "torchvision")):
        try:
            info[pkg] = version(dist)
        except PackageNotFoundError:
            info[pkg] = "not installed (pip install 'histosr[foundation]')"
    from .features.foundation import weights_dir, weights_status

    info["weights_dir"] = f"{weights_dir()} ($HISTOSR_WEIGHTS_DIR)"
    for key, where in weights_status().items():
        info[f"weights {key}"] = where
    from .datasets import data_dir

    d = data_dir()
    info["real_data"] = str(d) if d else "not found (set HISTOSR_DATA)"
    for k, v in info.items():
        print(f"{k:>16}: {v}")
    return 0


# -- parser --------------------------------------------------------------------------------
def _set_arg(p, what: str) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help=f"{what}, repeatable; values are JSON (numbers, true/false, lists) or "
                   "text")


def _encoder_args(p) -> None:
    p.add_argument("--encoder", default="handcrafted", help="encoder registry name")
    p.add_argument("--weights", help="encoder weights file or folder (never downloaded)")
    p.add_argument("--hub", action="store_true",
                   help="let the encoder fetch its weights from the model hub (HF_TOKEN)")
    p.add_argument("--encoder-option", action="append", metavar="KEY=VALUE", default=[],
                   help="other encoder parameter, repeatable (e.g. batch_size=32)")


def _stain_args(p, default: str) -> None:
    p.add_argument("--stain-norm", choices=["none", "macenko", "reinhard"],
                   help="stain normalisation of every section's image before the encoder "
                   f"({default}); measured on her2st it lowered H&E-only scores (README)")
    p.add_argument("--stain-ref", help="stain reference: 'builtin' (the Macenko H&E "
                   "reference) or an RGB image file; alone it means --stain-norm macenko")


def _model_verb_args(p) -> None:
    """What `fit` and `predict` share: the section, the encoder, a feature map, the output."""
    _section_args(p)
    _encoder_args(p)
    p.add_argument("--features", help="feature map zarr (default: compute and cache)")
    p.add_argument("--out", required=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histosr", description=__doc__.split("\n\n")[0])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("run", help="whole pipeline from a YAML config (several: a cohort)")
    s.add_argument("config", nargs="+", help="YAML config(s); one run per config")
    s.add_argument("--out", help="run folder (default: the config's 'out')")
    s.add_argument("--scheduler", help="Dask: 'local' (LocalCluster) or a scheduler address; "
                   "each config's run is one task")
    _set_arg(s, "config key, dotted (e.g. method.params.epochs=20, genes.n_top=200)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("demo", help="complete run on a synthetic section, with a report")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("features", help="compute a feature map (zarr)")
    _section_args(s)
    _encoder_args(s)
    s.add_argument("--out", required=True, help="output zarr folder")
    s.add_argument("--scheduler", help="Dask: 'local' (LocalCluster) or a scheduler address; "
                   "bands of tiles are encoded on the workers")
    s.set_defaults(fn=cmd_features)

    s = sub.add_parser("fit", help="fit a method on one or more sections")
    _model_verb_args(s)
    s.add_argument("--method", default="istar")
    _set_arg(s, "method hyper-parameter (e.g. epochs=100)")
    s.add_argument("--params", help='JSON hyper-parameters (alias of --set), e.g. '
                   '\'{"epochs": 100}\'')
    s.add_argument("--n-genes", type=int, default=1000,
                   help="the N most variable genes (HEST rule) are fitted")
    s.add_argument("--genes", help="comma-separated genes that are always fitted (when measured)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--consistency", action=argparse.BooleanOptionalAction, default=True,
                   help="mass-preserving consistency (super-resolution methods)")
    s.add_argument("--add-section", action="append", metavar="PATH",
                   help="another training section (repeatable)")
    _stain_args(s, "default none; the target is kept in the model and predict applies it")
    s.set_defaults(fn=cmd_fit)

    s = sub.add_parser("predict", help="predict with a fitted model")
    _model_verb_args(s)
    s.add_argument("--model", required=True, help="model folder written by `histosr fit`")
    s.add_argument("--at", choices=["superpixels", "spots"],
                   help="where to predict (default: the method's natural target)")
    s.add_argument("--genes", help="comma-separated genes for PNG previews")
    s.add_argument("--grid", choices=["spots", "superpixels"],
                   help="with --image and no SECTION: predict at a hex spot lattice over the "
                   "tissue (default) or at every 8 um tissue superpixel")
    s.add_argument("--spot-diameter-um", type=float,
                   help="with --image alone: spot diameter (default: the model's training spots)")
    s.add_argument("--pitch-um", type=float,
                   help="with --image alone: spot lattice pitch in um (default 100)")
    _stain_args(s, "default: what the model was fitted with, recorded in its folder; "
                "'none' turns it off")
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("evaluate", help="score a spot-level prediction against a section")
    _section_args(s)
    s.add_argument("--prediction", required=True)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("benchmark", help="accuracy protocols of BENCHMARKS.md")
    s.add_argument("protocol", choices=["p1", "p2", "p3", "p4", "domains", "cells"])
    s.add_argument("--method", required=True)
    s.add_argument("--encoder", default="handcrafted")
    s.add_argument("--data", help="data folder (default: $HISTOSR_DATA or ../shared/data)")
    s.add_argument("--sections", help="comma-separated sections, e.g. C2,C3")
    s.add_argument("--epochs", type=int)
    s.add_argument("--n-states", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--consistency", action=argparse.BooleanOptionalAction, default=True)
    _set_arg(s, "method hyper-parameter (e.g. context=off)")
    s.add_argument("--params", help="JSON hyper-parameters (alias of --set)")
    s.add_argument("--downsample-depth", type=float, metavar="N",
                   help="p1/p2/p3: fit on counts binomially thinned to a median of N UMI per "
                   "spot (seeded by --seed); scores stay against the full-depth counts")
    s.add_argument("--scheduler", help="Dask: 'local' (LocalCluster) or a scheduler address; "
                   "protocols with independent folds (p3) run them in parallel")
    s.add_argument("--stain-norm", choices=["none", "macenko", "reinhard"],
                   help="p3: stain normalisation of every section before the encoder "
                   "(default none; macenko when only --stain-ref is given)")
    s.add_argument("--stain-ref", help="p3: stain reference: 'builtin' (default) or an RGB "
                   "image file")
    _segmenter_args(s)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_benchmark)

    s = sub.add_parser("cells", help="cells x genes of a run: nuclei segmented on the H&E, "
                       "grown into cells, the 8 um prediction summed over each cell")
    s.add_argument("run_dir", help="folder written by `histosr run` (prediction.h5ad)")
    _segmenter_args(s)
    s.add_argument("--expand-um", type=float, default=15.0,
                   help="cells = nuclei grown by this distance without overlap (default 15, "
                   "Xenium's cap; 0: nuclei only)")
    s.add_argument("--scale-to-spots", action=argparse.BooleanOptionalAction, default=True,
                   help="scale the cells of each measured spot to its measured counts")
    s.add_argument("--genes", help="comma-separated genes drawn (default: the run's previews)")
    s.add_argument("--jobs", type=int, default=1,
                   help="tiles segmented at once, on threads (classical segmenter)")
    s.add_argument("--out", help="output folder (default RUN_DIR/cells)")
    s.set_defaults(fn=cmd_cells)

    s = sub.add_parser("densify", help="fit a spot method on all spots and predict a denser "
                       "grid (HisHRST 4x / TriHRGE 8x positions of the measured lattice)")
    _section_args(s)
    s.add_argument("--method", default="hishrst")
    s.add_argument("--factor", type=int, default=4, choices=[4, 8])
    s.add_argument("--genes", help="comma-separated genes to draw (densified.png); always fitted")
    s.add_argument("--n-genes", type=int, default=1000, help="most variable genes fitted")
    _set_arg(s, "method hyper-parameter (e.g. epochs=200)")
    s.add_argument("--params", help="JSON hyper-parameters (alias of --set)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_densify)

    s = sub.add_parser("simulate", help="write a section with known 8 um truth (synthetic, "
                       "or pseudo-Visium spots pooled from Visium HD / Xenium)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--from", dest="source", metavar="DIR_OR_FILE",
                   help="Visium HD run (square_008um bins) or Xenium output folder to pool")
    s.add_argument("--format", choices=["visium_hd", "xenium"],
                   help="format of --from (default: detected)")
    s.add_argument("--n-genes", type=int, default=1000,
                   help="keep the N most variable genes (0: all)")
    s.add_argument("--assign", choices=["nearest", "area"],
                   help="Visium HD bins to superpixels: nearest (default, HISTEX) or by area")
    s.add_argument("--image", help="full-resolution H&E (overrides the one found)")
    s.add_argument("--um-per-px", type=float, help="microns per full-resolution pixel")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_simulate)

    s = sub.add_parser("interactions", help="ligand-receptor co-localisation on a run folder: "
                       "measured spots vs the super-resolved map (LIANA+)")
    s.add_argument("run_dir", help="folder written by `histosr run` (prediction.h5ad)")
    s.add_argument("--resource", help="liana resource name (default consensus) or a CSV/TSV "
                   "with columns ligand, receptor")
    s.add_argument("--bandwidth-um", type=float, help="Gaussian kernel sigma in um (default 100)")
    s.add_argument("--n-perms", type=int, help="permutations (default 1000)")
    s.add_argument("--n-top", type=int, help="top pairs with local scores (default 20)")
    s.add_argument("--max-obs", type=int, help="most superpixel bins analysed (default 20000)")
    s.add_argument("--seed", type=int, help="default: the run's seed")
    s.add_argument("--out", help="report folder (default RUN_DIR/interactions)")
    s.set_defaults(fn=cmd_interactions)

    s = sub.add_parser("enrich", help="pathway scores + gene-set over-representation of "
                       "a run's domain markers and spatially variable genes")
    s.add_argument("run_dir", help="run folder with prediction.h5ad (histosr run / predict)")
    s.add_argument("--gene-sets", required=True, metavar="FILE.gmt",
                   help="gene sets, GMT (name<TAB>description<TAB>genes...)")
    s.add_argument("--prediction", help="AnnData to use (default RUN_DIR/prediction.h5ad)")
    s.add_argument("--method", default="ulm",
                   choices=["ulm", "aucell", "zscore", "score_genes", "mean"])
    s.add_argument("--n-domains", type=int, default=6, help="k-means domains (if none stored)")
    s.add_argument("--n-markers", type=int, default=100, help="marker genes per domain")
    s.add_argument("--n-svg", type=int, default=100, help="top spatially variable genes")
    s.add_argument("--min-size", type=int, default=3, help="fewest measured genes per set")
    s.add_argument("--out", help="output folder (default RUN_DIR/enrich)")
    s.set_defaults(fn=cmd_enrich)

    s = sub.add_parser("report", help="one HTML page for benchmark results: a method x "
                       "metric table per protocol, the best of each column highlighted")
    s.add_argument("results", nargs="+", help="results.json files or the folders holding them")
    s.add_argument("--out", required=True, help="folder for report.html / report.json")
    s.add_argument("--title", help="page title")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("doctor", help="check the install, devices, encoders and data")
    s.set_defaults(fn=cmd_doctor)
    return p


# -- errors and warnings -------------------------------------------------------------------
_USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # histosr's own warnings, one line each; the libraries' notices are for developers
    # (HISTOSR_DEBUG=1 shows them)
    if "histosr" not in str(filename) and not os.environ.get("HISTOSR_DEBUG"):
        return
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    print(f"histosr: warning: {cli_words(text)}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    with warnings.catch_warnings():  # each call shows its own warnings, once
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        return _main(args)


def _main(args) -> int:
    try:
        return int(args.fn(args) or 0)
    except (InputError, *_USER_OS_ERRORS) as e:
        if os.environ.get("HISTOSR_DEBUG"):
            raise
        msg = str(e) if not isinstance(e, OSError) or not e.filename else \
            f"{e.strerror or e}: {e.filename}"
        print(f"histosr: error: {cli_words(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("histosr: interrupted (a re-run resumes from the cache)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - anything else is a bug, said so
        if os.environ.get("HISTOSR_DEBUG"):
            raise
        print(f"histosr: internal error (a bug in histosr, not in your input): "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
              "Run again with HISTOSR_DEBUG=1 to see the traceback, and report it.",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
