"""Pieces shared by the protocols: building the method, its features, timing, memory."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from pathlib import Path

import numpy as np

# Hyper-parameters whose published defaults a benchmark run may lower (BENCHMARKS.md:
# "a benchmark run that lowers them says so in the JSON").
REDUCIBLE = ("epochs", "n_states")


def log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[histosr benchmark] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0, 1)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def method_factory(method, *, epochs=None, n_states=None, seed=0, consistency=None,
                   progress: bool = True):
    """A function making a fresh (unfitted) method per section, and the ``params`` record.

    ``method``: a registered name, or a :class:`~histosr.methods.base.Method` instance (used
    as a template: copied with its own parameters). ``epochs``/``n_states`` override the
    published defaults (the dataclass defaults) when the method has them; ``consistency``
    ``None`` keeps the method's own setting.
    """
    from ..keys import jsonable
    from ..methods.base import method_class

    if isinstance(method, str):
        cls = method_class(method)
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
        kwargs: dict = {"seed": int(seed)}
    else:
        cls = type(method)
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.init}
        kwargs = dict(method.params())
    ignored = []
    for key, val in (("epochs", epochs), ("n_states", n_states)):
        if val is None:
            continue
        if key in defaults:
            kwargs[key] = int(val)
        else:
            ignored.append(key)
    if consistency is not None and "consistency" in defaults:
        kwargs["consistency"] = bool(consistency)

    def make():
        m = cls(**kwargs)
        m.progress = bool(progress)  # training bars follow the run's --quiet
        return m

    m = make()
    used = m.params()
    published = {k: defaults[k] for k in REDUCIBLE if k in defaults
                 and not isinstance(defaults[k], dataclasses._MISSING_TYPE)}
    reduced = {k: used[k] for k in published if used[k] < published[k]}
    params = {
        **jsonable(used),
        "consistency": bool(used.get("consistency", False)),
        "published_defaults": published,
        "reduced_from_published": bool(reduced),
    }
    if reduced:
        params["reduced"] = {k: f"{v} (published {published[k]})" for k, v in reduced.items()}
    if ignored:
        params["ignored"] = {k: f"method {m.name!r} has no {k!r} parameter" for k in ignored}
    return make, params, m.name


def needs_features(method) -> bool:
    """Whether the method reads image features (baselines that only spread spot values
    set ``needs_features = False`` and then get a grid-only FeatureMap)."""
    return bool(method.needs_features)


def section_features(section, method, encoder: str, cache_dir: Path | None,
                     progress: bool, mask: np.ndarray | None = None):
    """The FeatureMap a method needs for ``section`` (cached under ``cache_dir``)."""
    if not needs_features(method):
        from ..features.featuremap import grid_only

        return grid_only(section, mask)
    from .. import features

    kw = {} if mask is None else {"mask": np.asarray(mask, dtype=bool)}
    return features.compute(section, encoder=encoder, cache_dir=cache_dir, progress=progress,
                            **kw)


def fit_truth(section, make_method, encoder: str, cache_dir: Path | None,
              progress: bool = True):
    """Fit a fresh method on a pseudo-spot section that carries an 8 um truth (its
    features restricted to the truth's tissue mask, the HEST rule's top 1000 genes):
    returns (fitted method, FeatureMap, genes)."""
    from ..pp import select_genes

    mask = np.asarray(section.truth["mask"], dtype=bool)
    genes = select_genes(section, 1000)
    method = make_method()
    fm = section_features(section, method, encoder, cache_dir, progress, mask=mask)
    log(progress, f"{section.name}: fit {method.name} on {section.n_spots} spots, "
                  f"{len(genes)} genes")
    method.fit([section], [fm], genes=genes)
    return method, fm, genes


def fit_predict_truth(section, make_method, encoder: str, cache_dir: Path | None,
                      progress: bool = True):
    """:func:`fit_truth`, then predict the section's tissue superpixels: returns
    (prediction, genes)."""
    method, fm, genes = fit_truth(section, make_method, encoder, cache_dir, progress)
    return method.predict(section, fm, at="superpixels"), genes


#: scores also reported for the same fit without calibrated detail (``nocal_*``) when a
#: run turns it on (``--set calibrate=true``)
NOCAL_KEYS = ("top50_pcc", "hvg1000_pcc", "top50_within_pcc", "pcc", "ssim", "rmse")


def nocal_scores(method, score) -> dict:
    """``nocal_<key>`` scores of ``score(calibrate=False)`` when ``method`` calibrates its
    detail (superpixel methods with ``calibrate=True``), else nothing."""
    from ..methods.base import SUPERPIXEL

    if method.kind != SUPERPIXEL or not method.calibrate:
        return {}
    raw = score(False)
    return {f"nocal_{k}": raw[k] for k in NOCAL_KEYS if k in raw}


def gene_scores(pred: np.ndarray, truth: np.ndarray, n_top: int = 50) -> dict:
    """The per-gene scores every spot protocol reports, on the log1p CP10k scale (spots x
    genes, genes ranked so that top50 = the first ``n_top``): mean and median Pearson r
    over the top genes, mean r over all (``hvg1000``), MAE over the top genes."""
    from .. import metrics

    r = metrics.pcc_per_gene(pred, truth)
    top = slice(0, min(n_top, np.shape(truth)[1]))
    return {
        "top50_pcc": float(np.mean(r[top])),
        "top50_pcc_median": float(np.median(r[top])),
        "hvg1000_pcc": float(np.mean(r)),
        "mae": metrics.mae(np.asarray(pred)[:, top], np.asarray(truth)[:, top]),
    }


DEPTH_SCORING = ("the fitted counts are binomially thinned to a median of {n:g} UMI per spot "
                 "(histosr.pp.downsample_depth, seed {seed}); scores are against the "
                 "full-depth counts of the scored spots")


def thin(section, depth: float | None, seed: int = 0):
    """``section`` with its counts thinned to a median of ``depth`` UMI per spot (seeded),
    or unchanged for ``None``: what a method is fitted on under ``--downsample-depth``."""
    if depth is None:
        return section
    from ..pp import downsample_depth

    return downsample_depth(section, float(depth), seed)


def depth_params(params: dict, depth: float | None, seed: int) -> dict:
    """``params`` with the thinning recorded (``downsample_depth`` and a scoring note)."""
    if depth is None:
        return params
    from ..errors import InputError

    if not float(depth) > 0:
        raise InputError(f"--downsample-depth expects a median UMI per spot > 0, got {depth!r}")
    return {**params, "downsample_depth": {"median_umi": float(depth), "seed": int(seed)},
            "scoring": {**params.get("scoring", {}),
                        "depth": DEPTH_SCORING.format(n=float(depth), seed=int(seed))}}


def read_section(data, name: str):
    """A native her2st section from ``data`` (the folder holding ``her2st/``, or
    ``her2st/`` itself; default :func:`histosr.datasets.data_dir`)."""
    from ..datasets import data_dir
    from ..io import read_her2st

    root = Path(data) if data is not None else data_dir()
    if root is None:
        raise FileNotFoundError(
            "her2st data not found: pass --data DIR (the folder holding her2st/) or set "
            "HISTOSR_DATA"
        )
    if (root / "her2st").is_dir():
        root = root / "her2st"
    return read_her2st(root, name)


def protocol_cache(cache_dir, out):
    """Where a protocol caches features: ``cache_dir``, else the run cache of ``out``
    (``$HISTOSR_CACHE_DIR`` when set), else none."""
    if cache_dir is None and out is not None:
        from ..features.cache import cache_dir_for

        return cache_dir_for(out)
    return cache_dir


def score_her2st(protocol: str, sections, data, score_section, *, what: str = "spots",
                 **kwargs) -> dict:
    """:func:`score_sections` over her2st sections (names, default C2..C6, or Sections):
    each is read, logged and scored by ``score_section(section) -> scores``."""
    from ..datasets import HER2ST_SECTIONS

    progress = kwargs.get("progress", True)

    def score_one(s):
        native = read_section(data, s) if isinstance(s, str) else s
        log(progress, f"{native.name}: {native.n_spots} {what}")
        return native.name, score_section(native)

    return score_sections(protocol, list(sections or HER2ST_SECTIONS), score_one, **kwargs)


def score_sections(protocol: str, sections, score_one, *, method_name: str, encoder: str,
                   params: dict, timer: Timer, out=None, progress: bool = True,
                   skip_log=("seconds",)) -> dict:
    """The loop every protocol shares: ``score_one(section_spec) -> (name, scores)`` per
    section, a progress line each, and the results dict rewritten to ``out/results.json``
    after every section (a killed run keeps what it finished)."""
    from . import results as report

    scored: dict[str, dict] = {}
    res = None
    for s in sections:
        name, scores = score_one(s)
        scored[name] = scores
        log(progress, f"{name}: " + ", ".join(
            f"{k}={v:.3f}" for k, v in scores.items()
            if isinstance(v, float) and k not in skip_log))
        res = report.results(protocol, method_name, encoder, params, scored, timer.elapsed,
                             peak_rss_mb())
        if out is not None:
            report.write_results(res, out)
    return res
