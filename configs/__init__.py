"""Recipes: one yaml per method and bit width (the rows of the paper's tables)."""
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent
