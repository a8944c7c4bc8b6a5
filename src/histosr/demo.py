"""``histosr demo``: a complete run on a synthetic section the package makes itself.

Synthetic H&E + known 8 um expression → pseudo-Visium spots → handcrafted features →
iStar, and two references that read no image (bilinear interpolation of the spots, and the
nearest spot) → super-resolved AnnData (scanpy's ``uns["spatial"]``), zarr maps, previews
with the truth beside the prediction → scores against the truth (with the shuffle control)
→ ``report.html``, which says what was done and how good it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEMO_EPOCHS = 200
DEMO_STATES = 3
#: the scores shown in the method table, in this order
COLUMNS = ("pcc", "top50_within_pcc", "ssim", "rmse", "pcc_visible", "pcc_gradient",
           "pcc_mixed", "pcc_noise")


def truth_anndata(section, genes: list[str] | None = None):
    """The section's 8 um truth as a superpixel AnnData (counts per superpixel over its
    tissue mask; same ``obs_names`` as a prediction on the section's grid)."""
    from .geometry import grid_for
    from .methods.base import superpixel_anndata

    t = section.truth
    tg = list(t["genes"])
    genes = [g for g in (genes or tg) if g in tg]
    r, c = np.nonzero(np.asarray(t["mask"], dtype=bool))
    cube = np.asarray(t["cube"])
    vals = cube[r, c][:, [tg.index(g) for g in genes]].astype(np.float32)
    return superpixel_anndata(vals, r, c, grid_for(section), genes,
                              {"method": "truth", "scale": "counts"})


def truth_pcc(pred, truth) -> dict[str, float]:
    """Per gene, Pearson r of a superpixel prediction with the truth over their common
    superpixels (prediction 0 where it has none, as P4 scores)."""
    from .arrays import columns
    from .metrics import pcc_per_gene

    genes = [g for g in pred.var_names if g in truth.var_names]
    idx = pred.obs_names.get_indexer(truth.obs_names)
    P = np.zeros((truth.n_obs, len(genes)))
    ok = idx >= 0
    P[ok] = columns(pred, genes)[idx[ok]]
    r = pcc_per_gene(P, columns(truth, genes))
    return {g: float(v) for g, v in zip(genes, r)}


def _by_kind(ist: dict, ref: dict) -> str:
    """A sentence comparing iStar with interpolation per gene kind (what the image adds)."""
    def cmp(a: float, b: float) -> str:
        return "about the same as" if abs(a - b) < 0.01 else "above" if a > b else "below"

    parts = []
    for kind, what in (("visible", "genes the image shows (VIS_*)"),
                       ("gradient", "smooth fields the image cannot see (GRAD_*)")):
        a, b = ist.get(f"pcc_{kind}"), ref.get(f"pcc_{kind}")
        if a is not None and b is not None:
            parts.append(f"{what}: PCC {a:.2f}, {cmp(a, b)} bilinear interpolation ({b:.2f})")
    return ("By gene kind, " + "; ".join(parts) + ".") if parts else ""


def demo(out: str | Path = "demo_out", seed: int = 0, progress: bool = True) -> Path:
    """Run the demo into ``out``; returns the report's path."""
    from .report import RunReport

    out = Path(out)
    rep = RunReport("histosr demo: super-resolution of a synthetic section with a known "
                    "8 um truth", out)
    with rep.capture_warnings():
        _demo(rep, out, seed, progress)
    return rep.write()


def _demo(rep, out: Path, seed: int, progress: bool) -> None:
    from . import features
    from .benchmark.p4 import score_superpixels
    from .methods.base import get_method
    from .outputs import spatial_images, write_h5ad, write_maps_from_anndata
    from .pl import previews
    from .report import gene_table
    from .simulate import synthetic_visium

    with rep.stage("simulate"):
        section = synthetic_visium(seed=seed)
    section.meta.setdefault("um_per_px_source", "the simulation (drawn at this pixel size)")
    rep.notes.append(repr(section))
    with rep.stage("features"):
        fm = features.compute(section, encoder="handcrafted", cache_dir=out / "cache",
                              progress=progress)
    params = {"epochs": DEMO_EPOCHS, "n_states": DEMO_STATES, "seed": seed, "consistency": True}
    rep.params = {"method": "istar", **params, "encoder": "handcrafted",
                  "note": f"epochs/n_states reduced from 400/5 to {DEMO_EPOCHS}/{DEMO_STATES} "
                          "to keep the demo near a minute on 2 CPU cores"}
    with rep.stage("fit"):
        method = get_method("istar", **params)
        method.progress = progress
        method.fit([section], [fm])
    with rep.stage("predict"):
        pred = method.predict(section, fm, at="superpixels")
    with rep.stage("score"):
        truth = truth_anndata(section, list(pred.var_names))
        scores = {f"istar ({DEMO_EPOCHS} epochs x {DEMO_STATES} states, consistency)":
                  score_superpixels(pred, section, seed=seed)}
        refs = {}
        for name, kw in (("bilinear", {"consistency": True}), ("nearest", {})):
            ref = get_method(name, **kw).fit([section], [fm])
            refs[name] = ref.predict(section, fm, at="superpixels")
            label = f"{name} (spots only, no image{', consistency' if kw else ''})"
            scores[label] = score_superpixels(refs[name], section, seed=seed)
        first = next(iter(scores.values()))
        scores["istar, prediction shuffled over the tissue (control)"] = {
            "pcc": first["shuffled_pcc"], "ssim": first["shuffled_ssim"],
            "rmse": first["shuffled_rmse"]}
        per_gene = truth_pcc(pred, truth)
        ref_gene = {name: truth_pcc(p, truth) for name, p in refs.items()}
    pred.var["truth_pcc"] = np.array([per_gene.get(g, np.nan) for g in pred.var_names],
                                     dtype=np.float32)
    ist, bil, nea = (s for s in list(scores.values())[:3])
    rep.metrics.update({f"istar_{k}": v for k, v in first.items()})
    rep.metrics.update({f"bilinear_{k}": v for k, v in bil.items()
                        if not k.startswith("shuffled")})
    rep.metrics.update({f"nearest_{k}": v for k, v in nea.items()
                        if not k.startswith("shuffled")})
    rep.comparisons.append({
        "title": "Against the known 8 um truth",
        "rows": {k: {c: v.get(c, "") for c in COLUMNS} for k, v in scores.items()},
        "caption": f"over {first['n_superpixels']:,} tissue superpixels and "
                   f"{first['n_genes']} genes; pcc = mean per-gene Pearson r of the map with "
                   "the truth; top50_within_pcc = the same inside each spot after removing the "
                   "spot's mean (detail the spots cannot show); ssim / rmse on maps scaled to "
                   "0-1; pcc_<kind> per gene kind. Best of each column in green."})
    with rep.stage("write"):
        images = spatial_images(section.image)
        rep.outputs["prediction"] = str(write_h5ad(pred, out / "prediction.h5ad",
                                                   section=section, images=images))
        rep.outputs["maps"] = str(write_maps_from_anndata(pred, out / "maps.zarr"))
        method.save(out / "model")
        rep.outputs["model"] = str(out / "model")
    kinds = section.meta.get("gene_kind", {})
    with rep.stage("previews"):
        show = [g for g in pred.var_names if kinds.get(g) == "visible"][:2]
        show += [g for g in pred.var_names if kinds.get(g) == "gradient"][:1]
        show = show or list(pred.var_names[:3])
        rep.images += previews(pred, show, out / "previews", section=section,
                               spots=section.counts[:, show].copy(), truth=truth)
    rep.describe_method(method, encoder="handcrafted", genes=method.genes_)
    rep.describe_section(section, mask=fm.mask, n_fitted_genes=len(method.genes_))
    rep.input_qc["truth"] = (f"counts per 8 um superpixel for {len(section.truth['genes'])} "
                             "genes of four kinds: VIS_* follow the cell type drawn in the H&E, "
                             "GRAD_* smooth fields the image cannot show, MIX_* both, NOISE_* "
                             "constant rate")
    rows, _ = gene_table(pred.var.drop(columns=["truth_pcc"]), section, show, extra={
        "PCC with truth (istar)": per_gene,
        "PCC with truth (bilinear)": ref_gene["bilinear"],
        "PCC with truth (nearest)": ref_gene["nearest"]})
    for r in rows:
        r.pop("held-out PCC", None)
        r["kind"] = kinds.get(r["gene"], "")
    rep.genes = rows
    rep.gene_note = ("This section is simulated, so each gene's map is scored against the "
                     "truth directly (no self-validation needed). Sorted by istar's PCC with "
                     "the truth.")
    h, w = section.image.shape[:2]
    rep.summary += [
        f"What histosr did: it drew a synthetic H&E section ({w * section.um_per_px / 1000:.1f} "
        f"x {h * section.um_per_px / 1000:.1f} mm at {section.um_per_px:g} um/px) with a known "
        f"expression map of {len(section.truth['genes'])} genes at 8 um, pooled it into "
        f"{section.n_spots} pseudo-Visium spots ({section.spot_diameter_um:g} um, 100 um "
        "apart) as a Visium run would measure them, then asked iStar to recover the 8 um maps "
        "from those spots and the H&E alone.",
        f"How good it was: against the truth over {first['n_superpixels']:,} tissue "
        f"superpixels, iStar's maps reach PCC {ist['pcc']:.2f} (bilinear interpolation of the "
        f"spots {bil['pcc']:.2f}, nearest spot {nea['pcc']:.2f}, shuffled control "
        f"{round(first['shuffled_pcc'], 2) + 0.0:.2f}). Inside a spot, where the spots "
        f"themselves show nothing, iStar reaches PCC {ist['top50_within_pcc']:.2f} against "
        f"{bil['top50_within_pcc']:.2f} for bilinear.",
        _by_kind(ist, bil),
    ]
    rep.next_steps = [
        ("Open the prediction in scanpy (drawn over the H&E)",
         f"import scanpy as sc\nad = sc.read_h5ad({str(out / 'prediction.h5ad')!r})\n"
         f"sc.pl.spatial(ad, color={show[0]!r}, img_key='hires')"),
        ("Run on a real section (her2st C2, legacy ST)",
         "histosr run configs/her2st_C2.yaml --out runs/C2"),
        ("Your own Visium data",
         "histosr run configs/visium_mouse_brain.yaml --set section.path=/absolute/path/to/outs"),
        ("Score methods on held-out spots (the benchmarks)",
         "histosr benchmark p4 --method istar --out bench/p4_istar"),
    ]
