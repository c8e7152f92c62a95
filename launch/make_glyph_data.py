"""Builds the glyph data set (assets/glyphs): Latin letters and Greek capitals rendered from Debian font packages.

What it is and how it is made: trainer/experiments/glyphs_data.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.experiments.glyphs_data import main  # noqa: E402

if __name__ == "__main__":
    main()
