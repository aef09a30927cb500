"""Models whose weights ship inside the package. Light on purpose: the CLI parser reads it at start-up."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = "lite"
SHIPPED = {DEFAULT_MODEL: ASSETS / "lite-coco"}  # name -> checkpoint folder
