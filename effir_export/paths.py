"""Folders of the repository that the package reads: the shipped recipes and the shipped data."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "recipes"
DATA_DIR = REPO_ROOT / "data"  # BEIR subsets, training pairs, calibration text (see data/README.md)
CALIBRATION_TEXT = DATA_DIR / "calibration" / "msmarco_passages.txt"
