"""Builds the embedded demo's assets (assets/demo).

What they are and how they were made: trainer/experiments/demo_assets.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.experiments.demo_assets import main  # noqa: E402

if __name__ == "__main__":
    main()
