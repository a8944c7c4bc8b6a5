"""Bad inputs give SectionErrors with specific messages (copies live in tmp_path only)."""

from __future__ import annotations

import json
import shutil
import warnings

import pandas as pd
import pytest

from histosr.io import (
    MissingFileError,
    read,
    read_h5ad,
    read_her2st,
    read_istar,
    read_st,
    read_visium,
    read_visium_hd,
    write_istar,
)
from histosr.section import SectionError


@pytest.fixture
def st_copy(data_dir, tmp_path):
    src = data_dir / "fixtures" / "st_mouse_olfactory_bulb"
    dst = tmp_path / "st"
    dst.mkdir()
    for n in ("counts.tsv", "spots.tsv", "image.jpg"):
        shutil.copyfile(src / n, dst / n)
    return dst


@pytest.fixture
def visium_copy(data_dir, tmp_path):
    src = data_dir / "fixtures" / "visium_v1_mouse_brain_100genes"
    dst = tmp_path / "outs"
    (dst / "spatial").mkdir(parents=True)
    shutil.copyfile(src / "filtered_feature_bc_matrix.h5", dst / "filtered_feature_bc_matrix.h5")
    for n in ("tissue_positions_list.csv", "scalefactors_json.json", "tissue_lowres_image.png"):
        shutil.copyfile(src / "spatial" / n, dst / "spatial" / n)
    return dst


@pytest.fixture
def xenium(data_dir):
    d = data_dir / "fixtures" / "xenium_cells_lung_core"
    return d / "NCBI858.h5ad", d / "NCBI858.jpg"


def _edit_tsv(path, fn, **kw):
    df = pd.read_csv(path, sep="\t", **kw)
    df = fn(df)
    df.to_csv(path, sep="\t", index="index_col" in kw)


# ------------------------------------------------------------------ missing files
def test_missing_image(st_copy):
    (st_copy / "image.jpg").unlink()
    with pytest.raises(MissingFileError, match="image.jpg") as e:
        read_st(st_copy)
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, SectionError)


def test_missing_counts(st_copy):
    (st_copy / "counts.tsv").unlink()
    with pytest.raises(SectionError, match="count table not found"):
        read_st(st_copy)


def test_her2st_unknown_section(data_dir):
    with pytest.raises(MissingFileError, match=r"Sections available: \['A1', 'C2'"):
        read_her2st(data_dir / "her2st", "Z9")


def test_visium_missing_scalefactors(visium_copy):
    (visium_copy / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(MissingFileError, match="scalefactors_json.json"):
        read_visium(visium_copy)


def test_visium_missing_matrix(visium_copy):
    (visium_copy / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(MissingFileError, match="filtered_feature_bc_matrix"):
        read_visium(visium_copy)


def test_visium_hd_missing_bin(data_dir):
    with pytest.raises(MissingFileError, match=r"available \['square_002um'\]"):
        read_visium_hd(data_dir / "fixtures" / "visium_hd_layout_10bins", bin_size=8)


def test_unknown_layout(tmp_path):
    with pytest.raises(SectionError, match="cannot tell the layout"):
        read(tmp_path)


# ------------------------------------------------------------------ coordinates
def test_swapped_xy(xenium):
    h5ad, jpg = xenium
    with pytest.raises(SectionError, match="swapped"):
        read_h5ad(h5ad, jpg, 1.7, 20.0, platform="xenium", xy_columns=("x_pixel", "y_pixel"))


def test_h5ad_without_coordinates_names_candidates(xenium):
    h5ad, jpg = xenium
    with pytest.raises(SectionError, match=r"xy_columns=.*x_pixel"):
        read_h5ad(h5ad, jpg, 1.7, 20.0)


def test_spots_outside_image(st_copy):
    _edit_tsv(st_copy / "spots.tsv", lambda d: d.assign(pixel_x=d.pixel_x + 2000))
    with pytest.raises(SectionError, match="outside the 929x990 px image"):
        read_st(st_copy)


def test_her2st_display_image_needs_coord_scale(data_dir):
    root = data_dir / "her2st"
    with pytest.raises(SectionError, match="outside"):
        read_her2st(root, "A1", image=root / "images" / "A1_display.png", coord_scale=1.0)


# ------------------------------------------------------------------ spot ids
def test_duplicated_spot_ids(st_copy):
    _edit_tsv(st_copy / "counts.tsv", lambda d: pd.concat([d, d.iloc[:1]]), index_col=0)
    with pytest.raises(SectionError, match=r"duplicated spot ids .*\['17x17'\]"):
        read_st(st_copy)


def test_duplicated_barcodes_in_positions(visium_copy):
    p = visium_copy / "spatial" / "tissue_positions_list.csv"
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(SectionError, match="duplicated spot ids"):
        read_visium(visium_copy)


def test_unmatched_spot_ids(st_copy):
    _edit_tsv(st_copy / "spots.tsv", lambda d: d[~((d.x == 17) & (d.y == 17))])
    with pytest.raises(SectionError, match=r"unmatched spot ids.*17x17"):
        read_st(st_copy)


def test_unmatched_barcodes(visium_copy):
    p = visium_copy / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(p, header=None)
    h5 = visium_copy / "filtered_feature_bc_matrix.h5"
    import h5py

    with h5py.File(h5, "r") as f:
        first = f["matrix/barcodes"][0]
    first = first.decode() if isinstance(first, bytes) else str(first)
    pos[pos[0] != first].to_csv(p, header=False, index=False)
    with pytest.raises(SectionError, match=f"unmatched spot ids.*{first}"):
        read_visium(visium_copy)


def test_selection_rows_without_counts_are_dropped(st_copy):
    _edit_tsv(st_copy / "counts.tsv", lambda d: d.iloc[5:], index_col=0)
    assert read_st(st_copy).n_spots == 277


# ------------------------------------------------------------------ counts
def test_negative_counts(st_copy):
    def neg(d):
        d.iloc[3, 2] = -4
        return d

    _edit_tsv(st_copy / "counts.tsv", neg, index_col=0)
    with pytest.raises(SectionError, match="negative values"):
        read_st(st_copy)


def test_non_numeric_counts(st_copy):
    def txt(d):
        d["Ckb"] = d["Ckb"].astype(object)
        d.iloc[0, 1] = "n/a"
        return d

    _edit_tsv(st_copy / "counts.tsv", txt, index_col=0)
    with pytest.raises(SectionError, match=r"numbers only.*Ckb"):
        read_st(st_copy)


def test_spot_table_missing_column(st_copy):
    _edit_tsv(st_copy / "spots.tsv", lambda d: d.drop(columns="pixel_y"))
    with pytest.raises(SectionError, match=r"lacks the column\(s\) \['pixel_y'\]"):
        read_st(st_copy)


def test_empty_tissue(visium_copy):
    p = visium_copy / "spatial" / "tissue_positions_list.csv"
    pos = pd.read_csv(p, header=None)
    pos[1] = 0
    pos.to_csv(p, header=False, index=False)
    with pytest.raises(SectionError, match="empty tissue"):
        read_visium(visium_copy)


# ------------------------------------------------------------------ pixel size
def test_her2st_wrong_user_pixel_size(data_dir):
    with pytest.raises(SectionError, match=r"0\.2500 um/px from the um_per_px argument disagrees "
                                           r"with the spot pitch"):
        read_her2st(data_dir / "her2st", "C2", um_per_px=0.25)


def test_visium_wrong_spot_diameter_fullres(visium_copy):
    p = visium_copy / "spatial" / "scalefactors_json.json"
    sf = json.loads(p.read_text())
    sf["spot_diameter_fullres"] *= 3
    p.write_text(json.dumps(sf))
    with pytest.raises(SectionError, match=r"spot_diameter_fullres.*disagrees with the spot pitch"):
        read_visium(visium_copy)


def test_visium_wrong_user_pixel_size(visium_copy):
    with pytest.raises(SectionError, match="from the um_per_px argument disagrees"):
        read_visium(visium_copy, um_per_px=0.25)


def test_implausible_pixel_size_istar(data_dir, tmp_path):
    s = read_st(data_dir / "fixtures" / "st_mouse_olfactory_bulb")
    d = write_istar(s, tmp_path / "ist")
    (d / "pixel-size-raw.txt").write_text("50\n")
    with pytest.raises(SectionError, match=r"implausible: expected 0\.1-10"):
        read_istar(d, platform="xenium")
    (d / "pixel-size-raw.txt").write_text("per micron: 2\n")
    with pytest.raises(SectionError, match="must hold one number"):
        read_istar(d, platform="st")


def test_implausible_pixel_size_h5ad(xenium):
    h5ad, jpg = xenium
    with pytest.raises(SectionError, match="implausible"):
        read_h5ad(h5ad, jpg, 100.0, 20.0, xy_columns=("y_pixel", "x_pixel"))


def test_istar_unmatched_and_wrong_pitch(data_dir, tmp_path):
    s = read_st(data_dir / "fixtures" / "st_mouse_olfactory_bulb")
    d = write_istar(s, tmp_path / "ist")
    (d / "pixel-size-raw.txt").write_text("3.0\n")
    with pytest.raises(SectionError, match="disagrees with the spot pitch"):
        read_istar(d, platform="st")
    locs = pd.read_csv(d / "locs-raw.tsv", sep="\t", index_col=0).iloc[1:]
    locs.to_csv(d / "locs-raw.tsv", sep="\t")
    with pytest.raises(SectionError, match="unmatched spot ids"):
        read_istar(d, platform="xenium")


def test_inputs_are_not_modified(data_dir):
    d = data_dir / "fixtures" / "visium_v1_human_100spots"
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_visium(d)
    assert before == {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
