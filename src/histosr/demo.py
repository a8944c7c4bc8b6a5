"""``histosr demo``: a complete run on a synthetic section the package makes itself.

Synthetic H&E + known 8 um expression → pseudo-Visium spots → handcrafted features →
iStar (and the nearest-spot baseline for reference) → super-resolved AnnData, zarr maps,
previews → P4 scores against the truth (with the shuffle control) → report.html.
"""

from __future__ import annotations

from pathlib import Path

DEMO_EPOCHS = 200
DEMO_STATES = 3


def demo(out: str | Path = "demo_out", seed: int = 0, progress: bool = True) -> Path:
    from . import features
    from .benchmark.p4 import score_superpixels
    from .methods.base import get_method
    from .outputs import write_h5ad, write_maps_from_anndata
    from .pl import previews
    from .report import RunReport
    from .simulate import synthetic_visium

    out = Path(out)
    rep = RunReport("histosr demo: synthetic section, iStar super-resolution", out)
    with rep.stage("simulate"):
        section = synthetic_visium(seed=seed)
    rep.notes.append(repr(section))
    with rep.stage("features"):
        fm = features.compute(section, encoder="handcrafted", cache_dir=out / "cache",
                              progress=progress)
    params = {"epochs": DEMO_EPOCHS, "n_states": DEMO_STATES, "seed": seed, "consistency": True}
    rep.params = {"method": "istar", **params, "encoder": "handcrafted",
                  "note": f"epochs/n_states reduced from 400/5 to {DEMO_EPOCHS}/{DEMO_STATES} "
                          "to keep the demo under a minute on 2 CPU cores"}
    with rep.stage("fit"):
        method = get_method("istar", **params).fit([section], [fm])
    with rep.stage("predict"):
        pred = method.predict(section, fm, at="superpixels")
    with rep.stage("score"):
        scores = score_superpixels(pred, section, seed=seed)
        base = get_method("nearest").fit([section], [fm])
        base_scores = score_superpixels(base.predict(section, fm, at="superpixels"), section,
                                        seed=seed)
    rep.metrics.update({f"istar_{k}": v for k, v in scores.items()})
    rep.metrics.update({f"nearest_{k}": v for k, v in base_scores.items()
                        if not k.startswith("shuffled")})
    with rep.stage("write"):
        rep.outputs["prediction"] = str(write_h5ad(pred, out / "prediction.h5ad"))
        rep.outputs["maps"] = str(write_maps_from_anndata(pred, out / "maps.zarr"))
        method.save(out / "model")
        rep.outputs["model"] = str(out / "model")
    with rep.stage("previews"):
        kinds = section.meta.get("gene_kind", {})
        show = [g for g in pred.var_names if kinds.get(g) == "visible"][:2]
        show += [g for g in pred.var_names if kinds.get(g) == "gradient"][:1]
        show = show or list(pred.var_names[:3])
        rep.images += previews(pred, show, out / "previews", section=section,
                               spots=section.counts[:, show].copy())
    return rep.write()
