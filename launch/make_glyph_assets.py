"""Builds the glyph experiment's feature net and source model (assets/glyphs).

What it is and how it is made: trainer/experiments/glyphs_assets.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.experiments.glyphs_assets import main  # noqa: E402

if __name__ == "__main__":
    main()
