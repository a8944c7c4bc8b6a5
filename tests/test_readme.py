"""The README is tested: every ```bash command and ```python snippet in it runs here, in a
sandbox folder laid out like a checkout next to ../shared/data, so the README cannot drift.

Only the training length and the number of sections are reduced (INJECT below: the
commands are the README's, with tiny settings added), and the placeholder inputs the README
names (a Visium HD run, a Xenium output folder, a slide, cohort configs) are written from
synthetic sections before the commands run. Blocks fenced as ```text are illustrations that
cannot run on a CI machine (GPUs, a remote Dask scheduler, usage listings).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (pattern on a command, arguments appended): tiny settings for the CI budget
INJECT = [
    (r"^histosr (--quiet )?run configs/her2st", ["--set", "method.params.epochs=2",
                                                 "--set", "method.params.n_states=1",
                                                 "--set", "genes.n_top=300"]),
    (r"^histosr (--quiet )?benchmark p[12] ", ["--sections", "C2"]),
    (r"^histosr (--quiet )?benchmark p3 ", ["--sections", "C2,C3"]),
    (r"^histosr (--quiet )?benchmark p4 (?!.*--data)", ["--sections", "0"]),
    (r"^histosr (--quiet )?benchmark cells (?!.*--data)", ["--sections", "0"]),
    (r"^histosr (--quiet )?benchmark domains ", ["--set", "epochs=2"]),
    (r"^histosr (--quiet )?benchmark .*--method (istar|histex|deephex|hishrst|trihrge) ",
     ["--epochs", "2", "--n-states", "1"]),
    (r"^histosr (--quiet )?benchmark .*--method hespotex ", ["--set", "gate_epochs=2",
                                                            "--set", "epochs=2"]),
    (r"^histosr (--quiet )?fit .*--method hespotex", ["--set", "gate_epochs=2",
                                                      "--set", "epochs=2"]),
    (r"^histosr (--quiet )?fit .*--method (istar|hishrst|trihrge)", ["--set", "epochs=2"]),
    (r"^histosr (--quiet )?densify ", ["--set", "epochs=2", "--n-genes", "40"]),
    (r"^histosr (--quiet )?predict .*--image ", ["--pitch-um", "400"]),
    (r"^histosr (--quiet )?features .*--encoder ssl", [
        "--encoder-option", "steps=2", "--encoder-option", "n_tiles=32",
        "--encoder-option", "batch_size=8"]),
]
#: python snippets: (pattern, replacement)
PY_SUBS = [(r"epochs=\d+", "epochs=2"), (r"n_states=\d+", "n_states=1")]


def blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def commands() -> list[str]:
    out = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.strip().startswith("#") else ""
            if line and not line.startswith("make "):
                out.append(re.sub(r"^\.venv/bin/", "", line))
    return out


def _placeholders(work: Path) -> None:
    """The inputs the README names but a checkout does not have."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _layouts import write_visium_hd_layout, write_xenium_layout
    from histosr.simulate import synthetic_section

    sec = synthetic_section(seed=7, size_um=640.0, n_genes=12)
    write_visium_hd_layout(sec, work / "run")  # histosr simulate --from run/outs
    import shutil

    write_xenium_layout(sec, work / "xenium")
    shutil.move(str(work / "xenium" / "outs"), str(work / "xenium_outs"))
    for f in (work / "xenium").iterdir():  # the H&E and its alignment beside the outs
        shutil.move(str(f), str(work / f.name))
    from histosr.image import open_image
    from histosr.slide import write_pyramidal_tiff

    her2st = Path(work).parent / "shared" / "data" / "her2st" / "images" / "C4.jpg"
    crop = open_image(her2st).read(1500, 1500, 4096, 4096)  # a 4096 px slide of tissue
    write_pyramidal_tiff(crop, work / "slide.svs", um_per_px=0.74)
    (work / "sets.gmt").write_text(
        "ERBB2_amplicon\tHER2 amplicon\tERBB2\tGRB7\tPGAP3\tSTARD3\tPNMT\tMIEN1\tTCAP\n"
        "plasma_B\tplasma cells\tIGKC\tIGHG1\tIGHG3\tIGHM\tJCHAIN\tMZB1\n"
        "fibroblast_ECM\tstroma\tCOL1A1\tCOL1A2\tCOL3A1\tFN1\tDCN\tLUM\n")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, data_dir):
    base = tmp_path_factory.mktemp("readme")
    (base / "shared").mkdir()
    (base / "shared" / "data").symlink_to(data_dir)
    work = base / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    _placeholders(work)
    return work


def test_readme_has_commands_and_snippets():
    cmds = commands()
    assert len(cmds) >= 15 and len(blocks("python")) >= 3
    verbs = {c.split()[1] if c.split()[1] != "--quiet" else c.split()[2] for c in cmds}
    assert {"run", "fit", "predict", "evaluate", "benchmark", "simulate", "densify",
            "features", "doctor"} <= verbs


@pytest.mark.slow
def test_readme_commands_run(sandbox, monkeypatch, capsys, one_torch_thread):
    """Every README command. The first runs as a user runs it (a new ``python -m histosr``
    process); the others go through the same entry point, ``histosr.cli.main``, in this
    process: 25 fresh interpreters importing torch and scanpy would cost ~2 CI minutes."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HISTOSR_DEBUG", raising=False)
    monkeypatch.chdir(sandbox)
    from histosr.cli import main

    for i, cmd in enumerate(commands()):
        args = shlex.split(cmd)
        for pattern, extra in INJECT:
            if re.search(pattern, cmd + " "):
                args += extra
        assert args[0] == "histosr", f"README command is not a histosr command: {cmd}"
        t0 = time.perf_counter()
        if i == 0:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            r = subprocess.run([sys.executable, "-m", "histosr", *args[1:]], cwd=sandbox,
                               env=env, capture_output=True, text=True, timeout=600)
            rc, err = r.returncode, r.stderr
        else:
            rc = main(args[1:])
            err = capsys.readouterr().err
        with capsys.disabled():
            print(f"{time.perf_counter() - t0:6.1f} s  {cmd}")
        assert rc == 0, f"README command failed: {cmd}\n{err[-2000:]}"


@pytest.mark.slow
def test_readme_python_runs(sandbox, monkeypatch):
    monkeypatch.chdir(sandbox)
    import matplotlib

    matplotlib.use("Agg")
    for code in blocks("python"):
        for pattern, repl in PY_SUBS:
            code = re.sub(pattern, repl, code)
        exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
