"""The ``histosr`` command line. User mistakes print one clear line, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _section_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("section", nargs="?", help="data folder or file (Visium/ST/iStar folder, "
                   "h5ad, her2st root with --name)")
    p.add_argument("--reader", help="reader name (her2st, st, visium, visium_hd, istar, h5ad); "
                   "default: detect from the layout")
    p.add_argument("--name", help="section name inside a her2st-style root (e.g. C2)")
    p.add_argument("--image", help="full-resolution image (overrides the one in the folder)")
    p.add_argument("--um-per-px", type=float, help="microns per full-resolution pixel")


def _read(args):
    from .pipeline import read_section

    if args.section is None:
        raise ValueError("expected a data folder or file (the SECTION argument); `predict` "
                         "also accepts --image SLIDE --um-per-px X alone (H&E-only models)")
    spec = {"path": args.section}
    if args.reader:
        spec["reader"] = args.reader
    if args.name:
        spec["name"] = args.name
    if args.image:
        spec["image"] = args.image
    if args.um_per_px:
        spec["um_per_px"] = args.um_per_px
    return read_section(spec)


def cmd_run(args) -> int:
    from .pipeline import ConfigError, load_config, run, run_many

    configs = args.config if isinstance(args.config, list) else [args.config]
    if len(configs) == 1 and not args.scheduler:
        from .train import is_main_process

        cfg = load_config(configs[0])
        rep = run(cfg, out=args.out, progress=not args.quiet)
        if is_main_process():  # under torchrun only rank 0 writes the report
            print(f"report: {rep.out_dir / 'report.html'}")
        return 0
    if args.out:
        if len(configs) > 1:
            raise ConfigError("--out names one run folder: with several configs, set 'out' "
                              "in each config")
        cfg = load_config(configs[0])
        cfg["out"] = args.out
        configs = [cfg]
    reps = run_many(configs, scheduler=args.scheduler, progress=False)
    for rep in reps:
        print(f"report: {rep.out_dir / 'report.html'}")
    return 0


def cmd_demo(args) -> int:
    from .demo import demo

    path = demo(out=args.out, seed=args.seed, progress=not args.quiet)
    print(f"report: {path}")
    return 0


def cmd_features(args) -> int:
    from . import features

    section = _read(args)
    fm = features.compute(section, encoder=args.encoder, out=args.out,
                          progress=not args.quiet,
                          **({"scheduler": args.scheduler} if args.scheduler else {}))
    print(json.dumps({"features": fm.path, "shape": list(fm.features.shape),
                      "tissue_superpixels": int(fm.mask.sum()), "encoder": fm.encoder}))
    return 0


def _load_features(args, section):
    from . import features
    from .features import FeatureMap

    if getattr(args, "features", None):
        return FeatureMap.load(args.features)
    return features.compute(section, encoder=args.encoder,
                            cache_dir=Path(args.out) / "cache", progress=not args.quiet)


def _is_spot_method(name: str) -> bool:
    from .methods.base import _REGISTRY, available_methods

    available_methods()
    return getattr(_REGISTRY.get(name), "kind", "") == "spot"


def _fit_spot(args) -> int:
    """Spot-level methods (ridge, knn_features, hespotex, ...) read their own crop features
    (no feature map) and fit on one or more sections: ``--name C2,C3,C4`` in a her2st-style
    root and/or ``--add-section PATH`` (repeatable). Genes: the HEST rule (``--n-genes``) on
    the pooled spots."""
    from .benchmark.p3 import select_genes_pooled
    from .methods.base import get_method
    from .pipeline import read_section

    sections = []
    for name in (args.name.split(",") if args.name else [None]):
        sections.append(_read(argparse.Namespace(**{**vars(args), "name": name})))
    for path in args.add_section or []:
        spec = {"path": path, **({"reader": args.reader} if args.reader else {})}
        sections.append(read_section(spec))
    params = json.loads(args.params) if args.params else {}
    params.setdefault("seed", args.seed)
    params.setdefault("encoder", args.encoder)
    params.setdefault("cache_dir", str((Path(args.out) / "cache").resolve()))
    method = get_method(args.method, **params)
    method.fit(sections, genes=select_genes_pooled(sections, args.n_genes))
    method.save(Path(args.out) / "model")
    print(f"model: {Path(args.out) / 'model'} ({method.name} on "
          f"{', '.join(s.name for s in sections)}, {len(method.genes_)} genes)")
    return 0


def cmd_fit(args) -> int:
    from .methods.base import get_method
    from .pipeline import choose_genes

    if _is_spot_method(args.method):
        return _fit_spot(args)
    section = _read(args)
    fm = _load_features(args, section)
    params = json.loads(args.params) if args.params else {}
    params["seed"] = args.seed
    params["consistency"] = args.consistency
    method = get_method(args.method, **params)
    genes = choose_genes(section, args.n_genes)
    method.fit([section], [fm], genes=genes)
    method.save(Path(args.out) / "model")
    print(f"model: {Path(args.out) / 'model'}")
    return 0


def _predict_image(args) -> int:
    """H&E-only prediction: a section built from ``--image`` alone (tissue mask, then a hex
    spot lattice or the 8 um superpixels), predicted by a saved spot-level model."""
    from .image_only import section_from_image
    from .methods.base import Method
    from .outputs import write_h5ad
    from .pl import previews

    if not args.image:
        raise ValueError("predict needs a SECTION (data folder), or --image SLIDE (with "
                         "--um-per-px X unless the slide's metadata has it) for an H&E-only "
                         "prediction")
    from .image import open_image
    from .slide import is_slide, slide_um_per_px

    if args.um_per_px is None and not is_slide(args.image):
        raise ValueError(f"--image {args.image} needs --um-per-px X (microns per pixel); only "
                         "whole-slide files (.svs, .ndpi, .mrxs, OME-TIFF) carry it in metadata")
    image = open_image(args.image)  # whole slides (.svs, .ndpi, OME-TIFF...) read lazily
    um_per_px = slide_um_per_px(image, args.um_per_px)  # before loading the model
    method = Method.load(args.model)
    if getattr(method, "kind", "") != "spot":
        raise ValueError(f"model {method.name!r} needs measured spots; prediction from an image "
                         "alone needs a spot-level model (ridge, knn_features, hespotex): fit "
                         "one with `histosr fit --method ridge ...`")
    grid = args.grid or "spots"
    diameter = args.spot_diameter_um or getattr(method, "train_diameter_um_", None) or 55.0
    section = section_from_image(image, um_per_px, grid=grid,
                                 spot_diameter_um=diameter, pitch_um=args.pitch_um or 100.0,
                                 name=Path(args.image).stem)
    pred = method.predict(section, at="spots")
    info = dict(pred.uns["histosr"])
    info.update({"image": str(args.image), "um_per_px": float(um_per_px), "grid": grid,
                 "spot_diameter_um": float(diameter)})
    if grid == "superpixels":  # drawn as an 8 um map by pl.gene_map
        pred.obs["row"] = section.counts.obs["row"].to_numpy()
        pred.obs["col"] = section.counts.obs["col"].to_numpy()
        info["grid_shape"] = list(section.meta["grid_shape"])
    else:
        info["pitch_um"] = float(args.pitch_um or 100.0)
    pred.uns["histosr"] = info
    out = Path(args.out)
    p = write_h5ad(pred, out / "prediction.h5ad")
    if args.genes:
        previews(pred, [g for g in args.genes.split(",") if g in pred.var_names],
                 out / "previews", section=section)
    print(f"prediction: {p} ({pred.n_obs} {grid}, {pred.n_vars} genes)")
    return 0


def cmd_predict(args) -> int:
    from .methods.base import Method
    from .outputs import write_h5ad, write_maps_from_anndata
    from .pl import previews

    if args.section is None:
        return _predict_image(args)
    section = _read(args)
    fm = _load_features(args, section)
    method = Method.load(args.model)
    pred = method.predict(section, fm, at=args.at)
    out = Path(args.out)
    p = write_h5ad(pred, out / "prediction.h5ad")
    if args.at == "superpixels":
        write_maps_from_anndata(pred, out / "maps.zarr")
    if args.genes:
        previews(pred, [g for g in args.genes.split(",") if g in pred.var_names],
                 out / "previews", section=section)
    print(f"prediction: {p}")
    return 0


def cmd_evaluate(args) -> int:
    import anndata as ad
    import numpy as np

    from .metrics import log_cp10k, pcc_per_gene

    pred = ad.read_h5ad(args.prediction)
    section = _read(args)
    common = [s for s in pred.obs_names if s in section.counts.obs_names]
    if not common:
        raise ValueError("the prediction's observations share no spot id with the section: "
                         "predict with --at spots first")
    genes = [g for g in pred.var_names if g in section.counts.var_names]
    lib = section.dense_counts()[section.counts.obs_names.get_indexer(common)].sum(1, keepdims=True)
    truth = log_cp10k(section.counts[common, genes].X.toarray()
                      if hasattr(section.counts.X, "toarray") else
                      np.asarray(section.counts[common, genes].X), lib)
    est = log_cp10k(np.asarray(pred[common, genes].X, dtype=np.float64), lib)
    r = pcc_per_gene(est, truth)
    print(json.dumps({"n_spots": len(common), "n_genes": len(genes),
                      "pcc_mean": float(np.mean(r)), "pcc_median": float(np.median(r))}))
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
    if args.set:  # method hyper-parameters (ablations): a configured instance is the template
        from .methods import get_method

        method = get_method(args.method, seed=args.seed, **_key_values(args.set))
    res = benchmark.run(
        args.protocol, method=method, encoder=args.encoder, data=args.data,
        sections=args.sections.split(",") if args.sections else None, epochs=args.epochs,
        n_states=args.n_states, seed=args.seed, out=args.out,
        consistency=args.consistency, progress=not args.quiet,
        **({"scheduler": args.scheduler} if args.scheduler else {}),
    )
    print(json.dumps({"protocol": res["protocol"], "method": res["method"], "mean": res["mean"]}))
    print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _key_values(items: list[str]) -> dict:
    """``["context=off", "epochs=10"]`` -> ``{"context": "off", "epochs": 10}``: JSON values
    (numbers, true/false, null, lists), anything else a string (so ``off`` stays ``"off"``,
    which YAML would turn into False)."""
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(val)
        except ValueError:
            value = val
        out[key.strip().replace("-", "_")] = value
    return out


def cmd_densify(args) -> int:
    from .generate import densify_section, write_densified

    section = _read(args)
    genes = [g for g in (args.genes or "").split(",") if g]
    params = json.loads(args.params) if args.params else {}
    dense, _ = densify_section(section, args.method, args.factor, genes=genes,
                               n_genes=args.n_genes, seed=args.seed, params=params)
    paths = write_densified(dense, section, args.out, genes)
    print(json.dumps({"n_measured": int(dense.obs["measured"].sum()),
                      "n_generated": int((~dense.obs["measured"]).sum()),
                      **{k: str(v) for k, v in paths.items()}}))
    return 0


def cmd_simulate(args) -> int:
    from .simulate import synthetic_visium
    from .truth import simulate_from, write_simulated

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


def cmd_doctor(args) -> int:
    import platform

    import torch

    from . import __version__
    from .features import available_encoders
    from .methods.base import available_methods

    info = {
        "histosr": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(), "encoders": available_encoders(),
        "methods": available_methods(),
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="histosr", description=__doc__)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("run", help="whole pipeline from a YAML config (several: a cohort)")
    s.add_argument("config", nargs="+", help="YAML config(s); one run per config")
    s.add_argument("--out", help="run folder (default: the config's 'out')")
    s.add_argument("--scheduler", help="Dask: 'local' (LocalCluster) or a scheduler address; "
                   "each config's run is one task")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("demo", help="complete run on a synthetic section, with a report")
    s.add_argument("--out", default="demo_out")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("features", help="compute a feature map (zarr)")
    _section_args(s)
    s.add_argument("--encoder", default="handcrafted")
    s.add_argument("--out", required=True, help="output zarr folder")
    s.add_argument("--scheduler", help="Dask: 'local' (LocalCluster) or a scheduler address; "
                   "bands of tiles are encoded on the workers")
    s.set_defaults(fn=cmd_features)

    for name, fn, hlp in (("fit", cmd_fit, "fit a method on a section"),
                          ("predict", cmd_predict, "predict with a fitted model")):
        s = sub.add_parser(name, help=hlp)
        _section_args(s)
        s.add_argument("--encoder", default="handcrafted")
        s.add_argument("--features", help="feature map zarr (default: compute and cache)")
        s.add_argument("--out", required=True)
        s.set_defaults(fn=fn)
    fit = sub.choices["fit"]
    fit.add_argument("--method", default="istar")
    fit.add_argument("--params", help='JSON hyper-parameters, e.g. \'{"epochs": 100}\'')
    fit.add_argument("--n-genes", type=int, default=1000)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--consistency", action=argparse.BooleanOptionalAction, default=True)
    fit.add_argument("--add-section", action="append", metavar="PATH",
                     help="another training section (spot-level methods; repeatable)")
    pr = sub.choices["predict"]
    pr.add_argument("--model", required=True, help="model folder written by `histosr fit`")
    pr.add_argument("--at", default="superpixels", choices=["superpixels", "spots"])
    pr.add_argument("--genes", help="comma-separated genes for PNG previews")
    pr.add_argument("--grid", choices=["spots", "superpixels"],
                    help="with --image and no SECTION: predict at a hex spot lattice over the "
                    "tissue (default) or at every 8 um tissue superpixel")
    pr.add_argument("--spot-diameter-um", type=float,
                    help="with --image alone: spot diameter (default: the model's training spots)")
    pr.add_argument("--pitch-um", type=float,
                    help="with --image alone: spot lattice pitch in um (default 100)")

    s = sub.add_parser("evaluate", help="score a spot-level prediction against a section")
    _section_args(s)
    s.add_argument("--prediction", required=True)
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("benchmark", help="accuracy protocols of BENCHMARKS.md")
    s.add_argument("protocol", choices=["p1", "p2", "p3", "p4", "domains"])
    s.add_argument("--method", required=True)
    s.add_argument("--encoder", default="handcrafted")
    s.add_argument("--data", help="data folder (default: $HISTOSR_DATA or ../shared/data)")
    s.add_argument("--sections", help="comma-separated sections, e.g. C2,C3")
    s.add_argument("--epochs", type=int)
    s.add_argument("--n-states", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--consistency", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="method hyper-parameter, repeatable (e.g. --set context=off)")
    s.add_argument("--scheduler", help="Dask: 'local' (LocalCluster) or a scheduler address; "
                   "protocols with independent folds (p3) run them in parallel")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_benchmark)

    s = sub.add_parser("densify", help="fit a spot method on all spots and predict a denser "
                       "grid (HisHRST 4x / TriHRGE 8x positions of the measured lattice)")
    _section_args(s)
    s.add_argument("--method", default="hishrst")
    s.add_argument("--factor", type=int, default=4, choices=[4, 8])
    s.add_argument("--genes", help="comma-separated genes to draw (densified.png)")
    s.add_argument("--n-genes", type=int, default=1000, help="most variable genes fitted")
    s.add_argument("--params", help='JSON hyper-parameters, e.g. \'{"epochs": 200}\'')
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

    s = sub.add_parser("doctor", help="check the install, devices, encoders and data")
    s.set_defaults(fn=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    from .pipeline import ConfigError
    from .section import SectionError

    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return int(args.fn(args) or 0)
    except (SectionError, ConfigError, FileNotFoundError, ValueError, KeyError) as e:
        if os.environ.get("HISTOSR_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"histosr: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
