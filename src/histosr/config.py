"""The run-config schema (``histosr run CONFIG.yaml``): every key checked, defaults in one place.

A config is YAML (or a dict)::

    section:  {reader: her2st, path: ../shared/data/her2st, name: C2}   # + reader options
    features: {encoder: handcrafted}                                    # + encoder options
    method:   {name: istar, params: {epochs: 400, n_states: 5}, consistency: true}
    genes:    {n_top: 1000, min_frac: 0.1}          # or list: [...]; include: [...]
    predict:  {previews: [ERBB2, COL1A1], n_previews: 4}
    outputs:  {spatialdata: false, cells: false}                       # cells: cells x genes
    analysis: {interactions: false, gene_sets: null}  # ligand-receptor pairs; pathway maps
    seed: 0
    out: runs/C2

:func:`validate` rejects an unknown key at any level with the nearest valid one ("did you
mean 'n_top'?"), checks types and ranges - including the reader's options, the encoder's
parameters and the method's hyper-parameters, against what each declares - and returns the
config with every default filled in, before any data is read. :func:`apply_overrides` is
the one override syntax of the command line: ``--set method.params.epochs=20``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError
from .params import ParameterError, check_names, suggest


class ConfigError(InputError):
    """The run config is invalid; the message says where and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def reader_options(reader: str) -> list[str]:
    """Keyword options a reader takes (besides the path)."""
    from . import io

    fn = {"spatialdata": "histosr.io.spatialdata:read_spatialdata",
          "simulated": "histosr.simulate.from_real:read_simulated"}.get(reader)
    if fn is not None:
        import importlib

        mod, attr = fn.split(":")
        fn = getattr(importlib.import_module(mod), attr)
    else:
        fn = io.READERS[reader]
    params = list(inspect.signature(fn).parameters.values())[1:]
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def required_options(reader: str) -> list[str]:
    """Options a reader cannot do without (besides the path)."""
    from . import io

    params = list(inspect.signature(io.READERS[reader]).parameters.values())[1:]
    return [p.name for p in params if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


class SectionConfig(BaseModel):
    """``reader`` (default: detected from the layout) and ``path``; any other key is an
    option of that reader (``name``, ``image``, ``um_per_px``, ``bin_size``...)."""

    model_config = ConfigDict(extra="allow")
    reader: str | None = None
    path: str

    @model_validator(mode="after")
    def _reader_options(self):
        from .io import READERS

        extra = dict(self.model_extra or {})
        if self.reader is not None:
            if self.reader not in READERS:
                raise InputError(f"unknown reader {self.reader!r}{suggest(self.reader, READERS)}:"
                                 f" expected one of {', '.join(sorted(READERS))}")
            check_names(f"reader {self.reader!r}", extra, reader_options(self.reader),
                        what="option")
        return self


class FeaturesConfig(BaseModel):
    """``encoder`` (registry name) and its parameters; ``tile_sp`` (tile side in
    superpixels) and ``scheduler`` (Dask) for the tiling."""

    model_config = ConfigDict(extra="allow")
    encoder: str = "handcrafted"
    tile_sp: int = Field(64, ge=1)
    scheduler: str | None = None

    @model_validator(mode="after")
    def _encoder_params(self):
        from .features.registry import check_encoder

        check_encoder(self.encoder, **dict(self.model_extra or {}))
        return self

    def encoder_params(self) -> dict:
        return dict(self.model_extra or {})


class MethodConfig(_Strict):
    """``name`` (registry name), ``params`` (its hyper-parameters), ``consistency`` (the
    mass-preserving post-step of super-resolution methods)."""

    name: str = "istar"
    params: dict[str, Any] = Field(default_factory=dict)
    consistency: bool = True

    @model_validator(mode="after")
    def _method_params(self):
        from .methods.base import get_method

        get_method(self.name, **self.params)  # validates names, types and ranges
        return self


GeneList = list[str]  # (a field below is called ``list``)


class GenesConfig(_Strict):
    """``n_top`` genes by the HEST rule (:func:`histosr.pp.select_genes`), detected in at
    least ``min_frac`` of spots; or an explicit ``list``; ``include`` genes are always fitted
    (when measured)."""

    n_top: int = Field(1000, ge=1)
    min_frac: float = Field(0.1, ge=0.0, le=1.0)
    list: GeneList | None = None
    include: GeneList = Field(default_factory=lambda: [])


class PredictConfig(_Strict):
    """``previews``: genes drawn as PNG previews (fitted even when not among the top genes);
    default the ``n_previews`` most variable fitted genes."""

    previews: list[str] | None = None
    n_previews: int = Field(4, ge=0)


class OutputsConfig(_Strict):
    """``spatialdata``: also write ``spatialdata.zarr`` (needs ``histosr[spatialdata]``).
    ``cells``: also write ``cells/cells.h5ad`` (nuclei segmented on the H&E, grown into
    cells, the prediction summed over each; ``true`` or a mapping of the options of
    :data:`histosr.singlecell.OPTIONS`: segmenter, params, expand_um, ...)."""

    spatialdata: bool = False
    cells: bool | dict[str, Any] = False

    @model_validator(mode="after")
    def _cells_options(self):
        from .singlecell import options

        options(self.cells)  # names an unknown option or segmenter before any work
        return self


class AnalysisConfig(_Strict):
    """Analyses of the prediction added to the run and its report:

    * ``interactions``: ligand-receptor co-localisation, measured spots vs the super-resolved
      map (``true`` or a mapping of options of
      :func:`histosr.interactions.compare_interactions`);
    * ``gene_sets`` (a GMT file, relative to the config, or ``{name: [genes]}``): pathway
      maps scored with ``method`` (ulm, aucell, zscore, score_genes, mean) on sets with at
      least ``min_size`` measured genes, and (``enrich``) over-representation of the markers
      of ``n_domains`` domains (``n_markers`` each, ``marker_method``) and of the ``n_svg``
      most spatially variable genes (:mod:`histosr.pathways`); the sets' genes are fitted.
    """

    interactions: bool | dict[str, Any] = False
    gene_sets: str | dict[str, list[str]] | None = None
    method: str = "ulm"
    min_size: int = Field(3, ge=1)
    enrich: bool = True
    n_domains: int = Field(6, ge=2)
    n_markers: int = Field(100, ge=1)
    n_svg: int = Field(100, ge=1)
    marker_method: str = "t-test"

    @model_validator(mode="after")
    def _analysis_options(self):
        from .interactions import options

        options(self.interactions)  # names the unknown options before any work
        self.pathways()  # checks the scoring method, reads the gene sets
        return self

    def pathways(self):
        """The gene-set analysis (:class:`histosr.pathways.PipelineAnalysis`; a no-op
        without ``gene_sets``)."""
        from .pathways import PipelineAnalysis

        return PipelineAnalysis(self.model_dump(exclude={"interactions"}))


class RunConfig(_Strict):
    section: SectionConfig
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    genes: GenesConfig = Field(default_factory=GenesConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    outputs: OutputsConfig = Field(default_factory=OutputsConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    seed: int = Field(0, ge=0)
    out: str | None = None
    cache: str | None = None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = RunConfig
    for part in loc:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        model = fields[part].annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _message(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = tuple(str(p) for p in e["loc"])
    where = ".".join(loc) or "the config"
    if e["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = list(parent.model_fields) if parent else []
        return (f"config: unknown key {where!r}{suggest(loc[-1], known)}: expected some of "
                f"{', '.join(known)}")
    if e["type"] == "missing":
        return f"config: {where} is required"
    msg = e["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    got = e.get("input")
    shown = "" if isinstance(got, dict) or e["type"].startswith("value_error") else \
        f", got {got!r}"
    return f"config: {where}: {msg}{shown}"


def validate(cfg: dict) -> RunConfig:
    """The validated config with defaults filled in (:class:`ConfigError` otherwise)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(cfg).__name__}")
    try:
        return RunConfig.model_validate(cfg)
    except ValidationError as e:
        raise ConfigError(_message(e)) from None
    except ParameterError as e:  # raised inside a validator, outside pydantic's wrapping
        raise ConfigError(f"config: {e}") from None


def load(path: str | Path) -> dict:
    """Read a YAML config; a relative ``section.path`` or ``analysis.gene_sets`` is taken
    relative to the config file (falling back to the current folder)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    for block, key in (("section", "path"), ("analysis", "gene_sets")):
        sec = cfg.get(block)
        if isinstance(sec, dict) and isinstance(sec.get(key), str) and \
                not Path(sec[key]).is_absolute():
            cand = (path.parent / sec[key]).resolve()
            sec[key] = str(cand if cand.exists() else Path(sec[key]).resolve())
    return cfg


def parse_value(text: str):
    """A ``--set`` value: JSON (numbers, true/false, null, lists, mappings), else the text
    itself (so ``off`` stays ``"off"``, which YAML would read as False)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(items: list[str] | None) -> dict:
    """``["a.b=1", "c=off"]`` -> ``{"a.b": 1, "c": "off"}`` (keys as given, ``-`` -> ``_``)."""
    out = {}
    for item in items or []:
        key, sep, val = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(val)
    return out


def apply_overrides(cfg: dict, assignments: dict) -> dict:
    """A copy of ``cfg`` with dotted keys set (``{"method.params.epochs": 20}``); the
    result is validated as a whole by :func:`validate`."""
    out = json.loads(json.dumps(cfg))
    for key, value in assignments.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p!r} is not a mapping in the config")
            node = nxt
        node[parts[-1]] = value
    return out


__all__ = ["RunConfig", "ConfigError", "validate", "load", "apply_overrides",
           "parse_assignments", "parse_value", "reader_options"]
