"""Where the real data lives: ``$HISTOSR_DATA`` or ``../shared/data`` next to the repo."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path | None:
    """The real-data folder, or ``None`` when it is absent (never downloaded or copied)."""
    env = os.environ.get("HISTOSR_DATA")
    cands = [Path(env)] if env else []
    here = Path(__file__).resolve()
    cands += [p / "shared" / "data" for p in here.parents]
    cands.append(Path.cwd().parent / "shared" / "data")
    for c in cands:
        if (c / "her2st").is_dir() or (c / "fixtures").is_dir():
            return c
    return None


HER2ST_SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
